"""Train and eval transforms side by side, so their difference is visible at a glance.

Both end in uint8 pixels: batches travel to the device as bytes (a quarter of float32), and
`normalize` makes them the model's input there (Device.put).

Training augmentation is decided in one place, TrainAugmentation, for both pipelines: with the
preprocessing cache it runs in two halves (boxes, flips and the extra ops' parameters drawn on the
CPU; each box's pixels read from the cache, resized and augmented further on the device, a batch at
a time), without it on each decoded image. Either way the crop is cut from the image at its native
size and resized once, as torchvision's RandomResizedCrop did in the original pipeline.
"""

import math
import random

import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from cars.augment import Step, apply_steps, draw_steps, group_steps
from cars.runtime import image_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# erased regions get it: 0 once normalised, as in the classic pipeline
MEAN_PIXEL = [round(255 * m) for m in IMAGENET_MEAN]
# --interpolation: the classic pipeline's bilinear, or the bicubic most timm and CLIP weights were trained with
FILTERS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def eval_resize(resolution: int) -> int:
    """The classic 256 -> 224 ratio, scaled: 224 -> 256, 448 -> 512, 380 -> 434."""
    return round(resolution * 256 / 224)


class TrainAugmentation:
    """Every training image's augmentation, decided here for both pipelines: a crop box and a flip,
    then the config's extra ops (rotation, colour jitter, TrivialAugment, erasing), each drawn from
    (seed, epoch, image) alone: not from the worker, the process (torchrun) or an interruption (resume).

    With the preprocessing cache the two halves run apart: `draw` and `extra_steps` on the CPU, and
    on the device the resizing of each box's pixels (resize_crops) followed by the extra steps, on
    the whole batch (cars.augment.apply_steps). Without it, `__call__` does all of it on one decoded
    image, with the same kernels: the same pixels."""

    def __init__(self, cfg):
        self.cfg, self.seed, self.resolution, self.interpolation = cfg, cfg.seed, cfg.resolution, cfg.interpolation
        # torchvision's transforms, for their parameters; run batched by cars.augment
        self.extra = extra_augmentation(cfg)

    def draw(self, epoch: int, i: int, height: int, width: int) -> tuple[tuple[float, float, float, float], bool]:
        """Image i's crop box (fractions of the image) and whether it is mirrored, in `epoch`."""
        rng = random.Random(image_seed(self.seed, epoch, i))
        return crop_box(height, width, self.cfg, rng), rng.random() < 0.5

    def extra_draw(self, epoch: int, i: int) -> list[Step]:
        """Image i's extra ops in `epoch`, from a generator of its own."""
        return draw_steps(
            self.extra, torch.Generator().manual_seed(image_seed(self.seed, epoch, i, 1) % 2**62), self.resolution
        )

    def extra_steps(self, epoch: int, indices) -> list:
        """The extra ops of a batch of images, grouped to run on the whole batch (apply_steps); [] when there are
        none."""
        return group_steps([self.extra_draw(epoch, i) for i in indices]) if self.extra else []

    def __call__(self, image, epoch: int, i: int) -> torch.Tensor:
        """The whole augmentation of one decoded image (PIL) -> uint8 CHW, resolution x resolution:
        the same pixels as the cached pipeline's."""
        box, flip = self.draw(epoch, i, image.height, image.width)
        x0, y0, x1, y1 = pixel_box(box, image.height, image.width)
        region = F.pil_to_tensor(image.crop((x0, y0, x1, y1)))
        crops = resize_crops([region], [flip], self.resolution, interpolation=self.interpolation)
        return apply_steps(crops, self.extra_steps(epoch, [i]))[0]


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
    """The training crop as a box (left, top, right, bottom) in fractions of the image: the same
    draws as torchvision's RandomResizedCrop (or, with --train-crop resize-randomcrop, Resize +
    RandomCrop), made from `rng`."""
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
    w, h = (
        (width, round(width / (3 / 4)))
        if ratio < 3 / 4
        else (round(height * 4 / 3), height)
        if ratio > 4 / 3
        else (width, height)
    )
    left, top = (width - w) // 2, (height - h) // 2
    return left / width, top / height, (left + w) / width, (top + h) / height


def pixel_box(box, height: int, width: int) -> tuple[int, int, int, int]:
    """A box in fractions of an image -> whole pixels (x0, y0, x1, y1), at least one pixel wide and high."""
    left, top, right, bottom = box
    x0, y0 = round(left * width), round(top * height)
    return x0, y0, max(x0 + 1, round(right * width)), max(y0 + 1, round(bottom * height))


def resize_crops(
    regions: list[torch.Tensor], flips, size: int, *, interpolation: str, in_float: bool | None = None
) -> torch.Tensor:
    """Each crop region (uint8 CHW, any size) resized to size x size with an antialiased filter (FILTERS), the way
    PIL resizes (the original pipeline), mirrored where flips[k]; uint8 NCHW out, on the regions' device. On a CPU
    torch's uint8 kernel (PIL's fixed-point arithmetic); on a GPU in float (`in_float` chooses, to measure one path
    on the other's device)."""
    mode = FILTERS[interpolation]
    crops = []
    for region, flip in zip(regions, flips, strict=True):
        if region.device.type != "cpu" if in_float is None else in_float:
            crop = F.resize(region.float(), [size, size], mode, antialias=True).round_().clamp_(0, 255)
            crop = crop.to(torch.uint8)
        else:
            crop = F.resize(region, [size, size], mode, antialias=True)
        crops.append(crop.flip(-1) if flip else crop)
    return torch.stack(crops)


class BatchMixer:
    """MixUp or CutMix of a whole (normalised) batch, labels made soft. Its draw (which of the two, the mixing ratio,
    the box) comes from (seed, epoch, step) alone, not from the process's random stream: every process of a torchrun
    job mixes its share of a global batch alike, as one process would mix the whole, and a resume draws the same."""

    def __init__(self, transform, seed: int):
        self.transform, self.seed = transform, seed
        self.epoch = 0  # set by the recipe each epoch

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int = 0):
        with torch.random.fork_rng(
            devices=[]
        ):  # torchvision draws from the CPU's global generator: lend it, then give it back
            torch.manual_seed(image_seed(self.seed, self.epoch, step, 2) % 2**63)
            return self.transform(images, labels)


def batch_mixer(mixup: float, cutmix: float, num_classes: int, seed: int = 0) -> BatchMixer | None:
    """MixUp and/or CutMix (with both, each batch gets one of the two); None when both are off."""
    mixers = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return BatchMixer(v2.RandomChoice(mixers) if len(mixers) > 1 else mixers[0], seed)


def eval_transform(resolution: int, *, interpolation: str) -> v2.Compose:
    """What the model is shown at evaluation, as uint8 pixels a person can look at too."""
    resize = v2.Resize(eval_resize(resolution), FILTERS[interpolation], antialias=True)
    return v2.Compose([resize, v2.CenterCrop(resolution), v2.PILToTensor()])


def keep_for_cache(image, side: int = 0) -> torch.Tensor:
    """What the cache keeps of a training image: its pixels as decoded (uint8 CHW); with `side`, a
    smaller copy whose longer side is at most that many pixels (lossy: crops then lose detail)."""
    if side and max(image.size) > side:
        scale = side / max(image.size)
        image = F.resize(
            image, [max(1, round(image.height * scale)), max(1, round(image.width * scale))], antialias=True
        )
    return F.pil_to_tensor(image)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (one image or a batch, on any device) -> the model's input."""
    return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(v2.ToDtype(torch.float32, scale=True)(pixels))
