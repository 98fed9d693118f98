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


def train_transform(cfg) -> v2.Compose:
    """The per-image training augmentation a config asks for (see Config's input knobs)."""
    if cfg.train_crop == "resize-randomcrop":
        ops = [v2.Resize(eval_resize(cfg.resolution), antialias=True), v2.RandomCrop(cfg.resolution)]
    else:
        ops = [v2.RandomResizedCrop(cfg.resolution, scale=(cfg.crop_scale, 1.0), antialias=True)]
    ops.append(v2.RandomHorizontalFlip())
    if cfg.augment == "heavy":
        ops += [v2.RandomRotation(15), v2.ColorJitter(0.4, 0.4, 0.4, 0.1)]
    if cfg.augment == "trivialaugment":
        ops.append(v2.TrivialAugmentWide())
    if cfg.color_jitter > 0:
        ops.append(v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    ops += to_normalized_tensor()
    erasing = 0.25 if cfg.augment == "heavy" else cfg.random_erasing
    if erasing > 0:
        ops.append(v2.RandomErasing(p=erasing))
    return v2.Compose(ops)


def batch_mixer(mixup: float, cutmix: float, num_classes: int):
    """MixUp and/or CutMix over a whole batch (labels become soft); None when both are off."""
    mixers = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    return v2.RandomChoice(mixers) if len(mixers) > 1 else (mixers[0] if mixers else None)


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
