"""Train and eval transforms side by side, so their difference is visible at a glance."""

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_resize(resolution: int) -> int:
    """The classic 256 -> 224 ratio, scaled: 224 -> 256, 448 -> 512, 380 -> 434."""
    return round(resolution * 256 / 224)


def to_normalized_tensor() -> list:
    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(resolution: int, augment: str = "basic", color_jitter: float = 0.0, crop_scale: float = 0.08) -> v2.Compose:
    ops = [v2.RandomResizedCrop(resolution, scale=(crop_scale, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if augment == "heavy":
        ops += [v2.RandomRotation(15), v2.ColorJitter(0.4, 0.4, 0.4, 0.1)]
    if color_jitter > 0:
        ops.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    ops += to_normalized_tensor()
    if augment == "heavy":
        ops.append(v2.RandomErasing(p=0.25))
    return v2.Compose(ops)


def eval_crop(resolution: int) -> list:
    return [v2.Resize(eval_resize(resolution), antialias=True), v2.CenterCrop(resolution)]


def eval_transform(resolution: int) -> v2.Compose:
    return v2.Compose([*eval_crop(resolution), *to_normalized_tensor()])


def display_transform(resolution: int) -> v2.Compose:
    """What eval_transform shows the model, as uint8 pixels a person can look at."""
    return v2.Compose([*eval_crop(resolution), v2.PILToTensor()])


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels from display_transform -> the model's input, exactly as eval_transform makes it."""
    return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(v2.ToDtype(torch.float32, scale=True)(pixels))
