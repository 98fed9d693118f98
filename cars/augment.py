"""The extra training augmentation (rotation, colour jitter, TrivialAugment, random erasing) applied
to a whole batch at once, with each image's own random draw.

torchvision's v2 transforms give a whole batch one draw, so these ops used to run image by image.
Here it happens in three steps:
- `draw_steps` draws one image's parameters on the CPU, from the image's own generator. The draws
  are torchvision's: the same calls, in the same order, as each transform's own.
- `group_steps` groups a batch's steps by position and kind.
- `apply_steps` applies each group to all of its images at once, on the crops' device.

The kernels follow torchvision's functional ops on uint8 pixels and agree with them to within one
level of rounding (tests/test_augment.py). They reuse a few of torchvision's private helpers (the
affine matrix, HSV, TrivialAugment's op space): uv.lock pins torchvision, and the tests, which
compare with its public ops, would catch a change. Each kernel treats each image on its own, so an image
gets the same pixels in any batch: the cached pipeline augments batches, --cache off single images.
"""

import math

import torch
from torchvision.transforms.functional import _get_inverse_affine_matrix
from torchvision.transforms.v2 import ColorJitter, RandomErasing, RandomRotation, TrivialAugmentWide
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

Step = tuple[str, tuple[float, ...]]  # a kernel's name and one image's arguments to it


def draw_steps(ops: list, generator: torch.Generator, size: int) -> list[Step]:
    """One image's steps for the ops of extra_augmentation (in their order), on a size x size crop."""
    steps = []
    for op in ops:
        if isinstance(op, RandomRotation):
            steps.append(rotation(uniform(generator, *op.degrees)))
        elif isinstance(op, ColorJitter):
            order = torch.randperm(4, generator=generator).tolist()
            ranges = (op.brightness, op.contrast, op.saturation, op.hue)
            factors = [None if span is None else uniform(generator, *span) for span in ranges]
            steps += [(JITTER_KINDS[k], (factors[k],)) for k in order if factors[k] is not None]
        elif isinstance(op, TrivialAugmentWide):
            steps += trivial_augment(op, generator, size)
        elif isinstance(op, RandomErasing):
            steps += erasing(op, generator, size)
        else:
            raise TypeError(f"no batched version of {type(op).__name__}")
    return steps


JITTER_KINDS = ("brightness", "contrast", "saturation", "hue")  # ColorJitter numbers its ops so


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def affine(angle: float = 0.0, translate=(0.0, 0.0), shear=(0.0, 0.0), center=(0.0, 0.0)) -> Step:
    """An affine warp as torchvision's affine_image sets it up: the inverse matrix, from the centre
    (`center`, in pixels from the image's centre)."""
    return "affine", tuple(_get_inverse_affine_matrix(list(center), angle, list(translate), 1.0, list(shear)))


def rotation(angle: float) -> Step:
    """torchvision's rotate_image, about the centre (it turns the other way from affine's angle)."""
    return affine(angle=-(angle % 360))


def trivial_augment(op: TrivialAugmentWide, generator: torch.Generator, size: int) -> list[Step]:
    """TrivialAugmentWide: one op from its space, at one of its magnitudes (its forward's draws)."""
    names = tuple(op._AUGMENTATION_SPACE)
    name = names[int(torch.randint(len(names), (), generator=generator))]
    magnitudes_of, signed = op._AUGMENTATION_SPACE[name]
    magnitudes = magnitudes_of(op.num_magnitude_bins, size, size)
    magnitude = 0.0
    if magnitudes is not None:
        magnitude = float(magnitudes[int(torch.randint(op.num_magnitude_bins, (), generator=generator))])
        if signed and torch.rand((), generator=generator) <= 0.5:
            magnitude *= -1
    bits = int(magnitude)
    if name == "Identity":
        return []
    if name in ("ShearX", "ShearY"):  # about the top-left corner
        shear = math.degrees(math.atan(magnitude))
        return [affine(shear=(shear, 0.0) if name == "ShearX" else (0.0, shear), center=(-size * 0.5, -size * 0.5))]
    if name in ("TranslateX", "TranslateY"):
        return [affine(translate=(float(bits), 0.0) if name == "TranslateX" else (0.0, float(bits)))]
    if name == "Rotate":
        return [rotation(magnitude)]
    if name in TRIVIAL_FACTORS:
        return [(TRIVIAL_FACTORS[name], (1.0 + magnitude,))]
    if name == "Posterize":
        return [("posterize", (((1 << bits) - 1) << (8 - bits),))]  # a mask of the bits kept
    if name == "Solarize":
        return [("solarize", (255.0 * magnitude,))]
    return [(name.lower(), ())]  # AutoContrast, Equalize


TRIVIAL_FACTORS = {"Brightness": "brightness", "Color": "saturation", "Contrast": "contrast", "Sharpness": "sharpness"}


def erasing(op: RandomErasing, generator: torch.Generator, size: int) -> list[Step]:
    """RandomErasing's draws: whether to erase, then a box (ten tries, or nothing)."""
    if torch.rand(1, generator=generator) >= op.p:
        return []
    log_ratio = torch.log(torch.tensor(op.ratio))
    for _ in range(10):
        area = size * size * uniform(generator, *op.scale)
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        height, width = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if height < size and width < size:
            top = torch.randint(0, size - height + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, size - width + 1, size=(1,), generator=generator).item()
            return [("erase", (top, left, height, width, *op.value))]
    return []


def group_steps(plans: list[list[Step]]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """A batch's steps (plans[n]: image n's) as (kernel, images, their arguments), to run in order:
    every image's k-th step runs after its (k-1)-th, and one kernel call serves all images taking
    the same kind of step at the same position."""
    groups = []
    for position in range(max(map(len, plans), default=0)):
        kinds: dict[str, tuple[list, list]] = {}
        for n, steps in enumerate(plans):
            if position < len(steps):
                kind, args = steps[position]
                images, arguments = kinds.setdefault(kind, ([], []))
                images.append(n)
                arguments.append(args)
        groups += [
            (kind, torch.tensor(images), torch.tensor(arguments, dtype=torch.float32))
            for kind, (images, arguments) in kinds.items()
        ]
    return groups


def apply_steps(crops: torch.Tensor, groups) -> torch.Tensor:
    """The grouped steps on a batch of crops (uint8 NCHW, on any device), in place."""
    for kind, images, args in groups:
        images, args = images.to(crops.device, non_blocking=True), args.to(crops.device, non_blocking=True)
        crops[images] = KERNELS[kind](crops[images], args)
    return crops


# --- the kernels: uint8 NCHW crops and one row of arguments per image -> uint8 NCHW ----------------


def per_image(args: torch.Tensor, column: int = 0) -> torch.Tensor:
    return args[:, column].view(-1, 1, 1, 1)


def to_pixels(values: torch.Tensor) -> torch.Tensor:
    return values.clamp(0, 255).to(torch.uint8)


def warp(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour affine warp, zeros outside: torchvision's grid (pixel centres from the image
    centre, mapped by each image's inverse matrix), computed element by element so that no image's
    grid depends on the others'."""
    n, _, height, width = x.shape
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=x.device).view(1, 1, width)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=x.device).view(1, height, 1)
    # to [-1, 1]
    to_x = (matrix[:, :3] / (0.5 * width)).view(n, 3, 1, 1)
    to_y = (matrix[:, 3:] / (0.5 * height)).view(n, 3, 1, 1)
    grid = torch.stack([xs * m[:, 0] + ys * m[:, 1] + m[:, 2] for m in (to_x, to_y)], dim=-1)
    warped = torch.nn.functional.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return warped.to(torch.uint8)


def blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return to_pixels(x * ratio + other * (1 - ratio))


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma, rounded down as torchvision's colour ops round it."""
    r, g, b = x.float().unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).floor().unsqueeze(1)


def brightness(x, args):
    return to_pixels(x * per_image(args))


def contrast(x, args):
    gray = grayscale(x)  # whole numbers: summed as int64, exact whatever the order (and no float64, which MPS lacks)
    mean = gray.to(torch.int64).sum(dim=(1, 2, 3), keepdim=True).float() / gray[0].numel()
    return blend(x, mean, per_image(args))


def saturation(x, args):
    return blend(x, grayscale(x), per_image(args))


def hue(x, args):
    h, s, v = _rgb_to_hsv(F.to_dtype(x, torch.float32, scale=True)).unbind(1)
    h = (h + args[:, :1, None]).remainder(1.0)
    return F.to_dtype(_hsv_to_rgb(torch.stack((h, s, v), dim=1)), torch.uint8, scale=True)


def sharpness(x, args):
    """Blend with a 3x3 blur (1s around a 5, over 13), inside a one-pixel border that stays."""
    kernel = torch.full((3, 1, 3, 3), 1 / 13, device=x.device)  # made on the device: no copy that waits
    kernel[:, :, 1, 1] = 5 / 13
    out = x.float()
    blurred = torch.nn.functional.conv2d(out, kernel, groups=3).round()
    inside = out[..., 1:-1, 1:-1]
    inside += (blurred - inside) * (1 - per_image(args))
    return to_pixels(out)


def posterize(x, args):
    return x & per_image(args).to(torch.uint8)


def solarize(x, args):
    return torch.where(x >= per_image(args), 255 - x, x)


def autocontrast(x, args):
    """Each channel stretched to 0-255 (one without contrast left as it is): torchvision's
    autocontrast, with `where` in place of its masked assignment, which may make the host wait."""
    low, high = x.amin(dim=(-2, -1), keepdim=True).float(), x.amax(dim=(-2, -1), keepdim=True).float()
    flat = high == low
    step = torch.where(flat, 1.0, (high - low) * (1.0 / 255))
    return to_pixels((x - torch.where(flat, 0.0, low)) / step)


def erase(x, args):
    """Each image's box (top, left, height, width) filled with its value (one per channel)."""
    rows = torch.arange(x.shape[-2], device=x.device).view(1, 1, -1, 1)
    columns = torch.arange(x.shape[-1], device=x.device).view(1, 1, 1, -1)
    top, left, height, width = (per_image(args, k) for k in range(4))
    inside = (rows >= top) & (rows < top + height) & (columns >= left) & (columns < left + width)
    return torch.where(inside, args[:, 4:7, None, None].to(torch.uint8), x)


KERNELS = {
    "affine": warp,
    "brightness": brightness,
    "contrast": contrast,
    "saturation": saturation,
    "hue": hue,
    "sharpness": sharpness,
    "posterize": posterize,
    "solarize": solarize,
    "erase": erase,
    "autocontrast": autocontrast,
    "equalize": lambda x, args: F.equalize(x),
}
