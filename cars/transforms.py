"""Train and eval transforms side by side, so their difference is visible at a glance.

Both end in uint8 pixels: batches travel to the device as bytes (a quarter of float32), and
`normalize` makes them the model's input there (Device.put). Both accept a PIL image (read
from the dataset) or a uint8 CHW tensor (from the preprocessing cache, cars/cache.py).
"""

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_PIXEL = [round(255 * m) for m in IMAGENET_MEAN]  # erased regions get it: 0 once normalised, as in the classic pipeline


def eval_resize(resolution: int) -> int:
    """The classic 256 -> 224 ratio, scaled: 224 -> 256, 448 -> 512, 380 -> 434."""
    return round(resolution * 256 / 224)


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
    ops.append(v2.PILToTensor())  # a tensor from the cache passes through
    erasing = 0.25 if cfg.augment == "heavy" else cfg.random_erasing
    if erasing > 0:
        ops.append(v2.RandomErasing(p=erasing, value=MEAN_PIXEL))
    return v2.Compose(ops)


def batch_mixer(mixup: float, cutmix: float, num_classes: int):
    """MixUp and/or CutMix over a whole (normalised) batch (labels become soft); None when both are off."""
    mixers = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    return v2.RandomChoice(mixers) if len(mixers) > 1 else (mixers[0] if mixers else None)


def eval_transform(resolution: int) -> v2.Compose:
    """What the model is shown at evaluation, as uint8 pixels a person can look at too."""
    return v2.Compose([v2.Resize(eval_resize(resolution), antialias=True), v2.CenterCrop(resolution), v2.PILToTensor()])


def shrink_for_cache(image, side: int) -> torch.Tensor:
    """What the cache keeps of a training image: shorter side `side` (never enlarged), uint8.
    Random crops are relative to the image, so their scale/aspect distribution is unchanged."""
    if min(image.size) > side:
        image = F.resize(image, side, antialias=True)
    return F.pil_to_tensor(image)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (one image or a batch, on any device) -> the model's input."""
    return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(v2.ToDtype(torch.float32, scale=True)(pixels))
