"""The extra augmentation on whole batches (cars.augment): torchvision's draws, torchvision's pixels
to within a rounding step, and an image's pixels independent of the batch it is in."""

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cars.augment import KERNELS, affine, apply_steps, group_steps, rotation
from cars.config import Config
from cars.runtime import image_seed
from cars.transforms import MEAN_PIXEL, TrainAugmentation

SIZE = 40


def crops(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 crops with smooth colour, noise, a flat grey corner and saturated pixels: every op has work."""
    generator = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(
        torch.rand(n, 3, 5, 5, generator=generator) * 255, size=(SIZE, SIZE), mode="bicubic"
    )
    pixels = (smooth + torch.randn(n, 3, SIZE, SIZE, generator=generator) * 10).clamp(0, 255).round().to(torch.uint8)
    pixels[:, :, :8, :8] = 128
    pixels[:, 0, -4:, -4:] = 255
    return pixels


def differing(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """The fraction of values that differ."""
    assert ours.shape == reference.shape and ours.dtype == reference.dtype == torch.uint8
    return (ours != reference).float().mean().item()


N = 12
FACTORS = torch.linspace(0.0, 2.0, N).tolist()
ANGLES = torch.linspace(-30.0, 30.0, N).tolist()
BITS = [1 + n % 8 for n in range(N)]
# kernel, each image's arguments, torchvision's functional op on one image with the same parameters
CASES = {
    "brightness": ([(f,) for f in FACTORS], lambda x, n: F.adjust_brightness(x, FACTORS[n])),
    "contrast": ([(f,) for f in FACTORS], lambda x, n: F.adjust_contrast(x, FACTORS[n])),
    "saturation": ([(f,) for f in FACTORS], lambda x, n: F.adjust_saturation(x, FACTORS[n])),
    "sharpness": ([(f,) for f in FACTORS], lambda x, n: F.adjust_sharpness(x, FACTORS[n])),
    "hue": (
        [(h,) for h in torch.linspace(-0.5, 0.5, N).tolist()],
        lambda x, n: F.adjust_hue(x, torch.linspace(-0.5, 0.5, N)[n].item()),
    ),
    "posterize": ([(((1 << b) - 1) << (8 - b),) for b in BITS], lambda x, n: F.posterize(x, BITS[n])),
    "solarize": (
        [(t,) for t in torch.linspace(0, 255, N).tolist()],
        lambda x, n: F.solarize(x, torch.linspace(0, 255, N)[n].item()),
    ),
    "autocontrast": ([()] * N, lambda x, n: F.autocontrast(x)),
    "equalize": ([()] * N, lambda x, n: F.equalize(x)),
    "erase": (
        [(n, 2 * n, SIZE - 3 * n, n + 1, *MEAN_PIXEL) for n in range(N)],
        lambda x, n: F.erase(x, n, 2 * n, SIZE - 3 * n, n + 1, torch.tensor(MEAN_PIXEL)[:, None, None]),
    ),
    "rotate": ([rotation(a)[1] for a in ANGLES], lambda x, n: F.rotate(x, ANGLES[n])),
    "shear": (
        [affine(shear=(a, -a / 2), center=(-SIZE / 2, -SIZE / 2))[1] for a in ANGLES],
        lambda x, n: F.affine(
            x, angle=0.0, translate=[0, 0], scale=1.0, shear=[ANGLES[n], -ANGLES[n] / 2], center=[0, 0]
        ),
    ),
    "translate": (
        [affine(translate=(float(n - 6), float(2 * n - 9)))[1] for n in range(N)],
        lambda x, n: F.affine(x, angle=0.0, translate=[n - 6, 2 * n - 9], scale=1.0, shear=[0.0, 0.0]),
    ),
}
EXACT = {
    "brightness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
    "erase",
}  # no float blend to round differently


@pytest.mark.parametrize("case", CASES)
def test_each_batched_kernel_gives_torchvisions_pixels(case):
    """A batch, each image with its own parameter, against torchvision's op on each image alone.
    Where torchvision blends two images with a fused multiply-add, ours rounds twice (which keeps an
    image's pixels independent of its batch): a value in a few hundred may be one level apart. A
    warp's grid may put a sample on the other side of a tie between two pixels."""
    args, reference = CASES[case]
    x = crops(N)
    kernel = KERNELS["affine" if case in ("rotate", "shear", "translate") else case]
    ours = kernel(x.clone(), torch.tensor(args, dtype=torch.float32))
    expected = torch.stack([reference(x[n], n) for n in range(N)])
    assert differing(ours, x) > 0.05, "the parameters must change pixels, or the test shows nothing"
    if case in EXACT:
        assert torch.equal(ours, expected)
    else:
        blend = case in ("contrast", "saturation", "sharpness", "hue")
        assert differing(ours, expected) < (1e-2 if blend else 1e-3)
        assert (ours.int() - expected.int()).abs().max() <= (1 if blend else 255)


CONFIGS = {
    "heavy": dict(augment="heavy"),
    "trivialaugment+erasing": dict(augment="trivialaugment", random_erasing=0.5),
    "jitter+erasing": dict(color_jitter=0.3, random_erasing=0.5),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_each_image_draws_what_torchvisions_transforms_would_draw(config):
    """The batched extra augmentation of 48 images against torchvision's own transforms applied to
    each image with the image's seed: the same draws (an angle, an order, a box: any difference would
    change most pixels), the same pixels but for a rounding step here and there."""
    augmentation = TrainAugmentation(Config(resolution=SIZE, **CONFIGS[config]))
    x, indices = crops(48, seed=1), list(range(100, 148))
    for epoch in range(2):
        ours = apply_steps(x.clone(), augmentation.extra_steps(epoch, indices))
        expected = []
        for n, i in enumerate(indices):
            with torch.random.fork_rng():
                torch.manual_seed(image_seed(augmentation.seed, epoch, i, 1) % 2**62)
                expected.append(v2.Compose(augmentation.extra)(x[n]))
        assert differing(ours, x) > 0.5
        assert differing(ours, torch.stack(expected)) < 1e-3, epoch


def test_an_image_gets_the_same_pixels_in_any_batch():
    """Alone (--cache off augments one image at a time), in a batch, or in a batch in another order:
    the same pixels, bit for bit, for every kernel and with real draws."""
    x = crops(N)
    plans = [
        [(kind, args[n]) for kind, (args, _) in CASES.items() if kind not in ("shear", "translate")] for n in range(N)
    ]
    plans = [
        [("affine" if kind == "rotate" else kind, args) for kind, args in plan[n % 5 :] + plan[: n % 5]]
        for n, plan in enumerate(plans)
    ]
    real = TrainAugmentation(Config(resolution=SIZE, augment="heavy"))
    plans += [real.extra_draw(3, i) for i in range(N)]
    x = torch.cat([x, crops(N, seed=2)])
    batch = apply_steps(x.clone(), group_steps(plans))
    order = torch.randperm(len(plans), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = apply_steps(x[order].clone(), group_steps([plans[n] for n in order]))
    for n in range(len(plans)):
        alone = apply_steps(x[n : n + 1].clone(), group_steps([plans[n]]))[0]
        assert torch.equal(batch[n], alone), plans[n]
        assert torch.equal(shuffled[order.index(n)], alone)


def test_steps_run_in_each_images_own_order():
    """A brightness then a solarize is not a solarize then a brightness: each image's order holds,
    though the two images take the same kinds of step in opposite orders."""
    x = crops(1).expand(2, -1, -1, -1).clone()
    steps = [("brightness", (1.6,)), ("solarize", (128.0,))]
    out = apply_steps(x.clone(), group_steps([steps, steps[::-1]]))
    assert torch.equal(out[0], F.solarize(F.adjust_brightness(x[0], 1.6), 128.0))
    assert torch.equal(out[1], F.adjust_brightness(F.solarize(x[1], 128.0), 1.6))
    assert not torch.equal(out[0], out[1])


def test_trivial_augment_draws_every_op_of_its_space():
    augmentation = TrainAugmentation(Config(resolution=SIZE, augment="trivialaugment"))
    kinds = {step[0] for i in range(400) for step in augmentation.extra_draw(0, i)}
    assert kinds == {
        "affine",
        "brightness",
        "saturation",
        "contrast",
        "sharpness",
        "posterize",
        "solarize",
        "autocontrast",
        "equalize",
    }
    assert sum(not augmentation.extra_draw(0, i) for i in range(400)) > 0, "Identity: some images are left as they are"
