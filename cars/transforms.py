"""Train and eval transforms side by side, so their difference is visible at a glance.

Both end in uint8 pixels: batches travel to the device as bytes (a quarter of float32), and
`normalize` makes them the model's input there (Device.put).

With the preprocessing cache (cars/cache.py) the same augmentation runs in two halves: a crop
box and a flip drawn per image on the CPU (`crop_box`), and the cropping and resizing of a whole
batch on the device (`crop_batch`).
"""

import math
import random

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
    return v2.Compose([*ops, v2.RandomHorizontalFlip(), v2.PILToTensor(), *extra_augmentation(cfg)])


def extra_augmentation(cfg) -> list:
    """What comes after the crop and flip (on uint8 CHW pixels), if the config asks for more."""
    ops = []
    if cfg.augment == "heavy":
        ops += [v2.RandomRotation(15), v2.ColorJitter(0.4, 0.4, 0.4, 0.1)]
    if cfg.augment == "trivialaugment":
        ops.append(v2.TrivialAugmentWide())
    if cfg.color_jitter > 0:
        ops.append(v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    erasing = cfg.random_erasing or (0.25 if cfg.augment == "heavy" else 0.0)
    if erasing > 0:
        ops.append(v2.RandomErasing(p=erasing, value=MEAN_PIXEL))
    return ops


def crop_box(height: int, width: int, cfg, rng: random.Random) -> tuple[float, float, float, float]:
    """train_transform's crop as a box (left, top, right, bottom) in fractions of the image: the
    same draws as torchvision's RandomResizedCrop (or Resize + RandomCrop), made from `rng`."""
    if cfg.train_crop == "resize-randomcrop":
        side = cfg.resolution * min(height, width) / eval_resize(cfg.resolution)  # the crop, in source pixels
        top, left = rng.randint(0, int(height - side)), rng.randint(0, int(width - side))
        return left / width, top / height, (left + side) / width, (top + side) / height
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target_area = area * rng.uniform(cfg.crop_scale, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target_area * ratio)), round(math.sqrt(target_area / ratio))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left / width, top / height, (left + w) / width, (top + h) / height
    ratio = width / height  # ten misses: a centred crop, its aspect ratio clamped into range
    w, h = (width, round(width / (3 / 4))) if ratio < 3 / 4 else (round(height * 4 / 3), height) if ratio > 4 / 3 else (width, height)
    left, top = (width - w) // 2, (height - h) // 2
    return left / width, top / height, (left + w) / width, (top + h) / height


def crop_batch(pixels: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Cut box i (fractions of the image) out of image i, resize it to size x size, mirror it where
    flips[i]. uint8 NCHW in and out, on the pixels' device: on a GPU all at once, on a CPU image by
    image through torch's vectorised uint8 resize (the batched call is 10x slower there)."""
    if pixels.device.type == "cpu":
        return crop_images(pixels, boxes, flips, size)
    return crop_batch_roi_align(pixels, boxes.to(pixels.device), flips.to(pixels.device), size)


def crop_batch_roi_align(pixels: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """crop_batch in one call: each output pixel averages the source pixels under it (roi_align's
    adaptive sampling), so shrinking does not alias."""
    from torchvision.ops import roi_align

    height, width = pixels.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=pixels.device)
    rois = torch.cat([torch.arange(len(boxes), device=pixels.device, dtype=torch.float32)[:, None], boxes * scale], 1)
    crops = roi_align(pixels.float(), rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    crops = torch.where(flips[:, None, None, None], crops.flip(-1), crops)
    return crops.round_().clamp_(0, 255).to(torch.uint8)


def crop_images(pixels: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """crop_batch one image at a time, boxes rounded to whole pixels (antialiased bilinear resize)."""
    height, width = pixels.shape[-2:]
    crops = torch.empty((len(pixels), pixels.shape[1], size, size), dtype=torch.uint8)
    for n, ((left, top, right, bottom), flip) in enumerate(zip(boxes.tolist(), flips.tolist())):
        x0, y0 = round(left * width), round(top * height)
        x1, y1 = max(x0 + 1, round(right * width)), max(y0 + 1, round(bottom * height))
        crop = F.resized_crop(pixels[n], y0, x0, y1 - y0, x1 - x0, [size, size], antialias=True)
        crops[n] = crop.flip(-1) if flip else crop
    return crops


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


def squash_for_cache(image, side: int) -> torch.Tensor:
    """What the cache keeps of a training image: side x side pixels, uint8, whatever its aspect ratio.
    Crop boxes are drawn in fractions of the original image, so a box cut from the squashed copy and
    resized is the same crop of the same scene; every cached image having one shape lets a batch be
    read and cropped in one piece."""
    return F.pil_to_tensor(F.resize(image, [side, side], antialias=True))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (one image or a batch, on any device) -> the model's input."""
    return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(v2.ToDtype(torch.float32, scale=True)(pixels))
