"""The extra augmentation (heavy; TrivialAugment + erasing): image by image, as torchvision's
transforms run it, against a whole batch at once (cars.augment), side by side in one run.

    uv run python bench/augment.py                       # 224 px, batch 64, on CUDA if there is one
    uv run python bench/augment.py --device cpu --batch-size 32

Both sides get the same crops and the same per-image draws. "draw" is the CPU time to draw and
group a batch's parameters (in the training process's read-ahead thread, off the training path).
"ops" counts the tensor operations a batch dispatches: on a GPU, about one kernel launch each.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import timed  # noqa: E402  (the device's queue drained before and after)

from cars.augment import apply_steps
from cars.config import Config
from cars.runtime import image_seed
from cars.transforms import TrainAugmentation

CONFIGS = {
    "heavy": dict(augment="heavy"),
    "trivialaugment + erasing 0.25": dict(augment="trivialaugment", random_erasing=0.25),
}


def median_ms(work, device: torch.device, repeats: int) -> float:
    work()  # a warm-up
    return 1000 * statistics.median(timed(device, work)[0] for _ in range(repeats))


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops(work) -> int:
    with CountOps() as counter:
        work()
    return counter.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    crops = torch.randint(
        0, 256, (args.batch_size, 3, args.resolution, args.resolution), dtype=torch.uint8, generator=generator
    ).to(device)
    indices = list(range(args.batch_size))
    print(f"{args.batch_size} crops of {args.resolution} px on {device}, median of {args.repeats} batches")
    ratios = []
    for name, extra in CONFIGS.items():
        augmentation = TrainAugmentation(Config(resolution=args.resolution, **extra))
        pipeline = v2.Compose(augmentation.extra)

        def image_by_image(augmentation=augmentation, pipeline=pipeline):  # this config's, not the loop's last
            for n, i in enumerate(indices):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(image_seed(augmentation.seed, 0, i, 1) % 2**62)
                    pipeline(crops[n])

        steps = augmentation.extra_steps(0, indices)
        draw = median_ms(
            lambda augmentation=augmentation: augmentation.extra_steps(0, indices), torch.device("cpu"), args.repeats
        )
        one_by_one = median_ms(image_by_image, device, args.repeats)
        batched = median_ms(lambda steps=steps: apply_steps(crops.clone(), steps), device, args.repeats)
        ratios.append(one_by_one / batched)
        counts = ops(image_by_image), ops(lambda steps=steps: apply_steps(crops.clone(), steps))
        print(
            f"{name}: image by image {one_by_one:.1f} ms ({counts[0]} ops), batched {batched:.1f} ms ({counts[1]} "
            "ops): "
            f"{one_by_one / batched:.2f}x; draw {draw:.1f} ms"
        )
    print(
        f"summary: batched extra augmentation {', '.join(f'{r:.2f}x' for r in ratios)} the speed of image by image "
        f"({', '.join(CONFIGS)}; {args.batch_size} x {args.resolution} px on {device})"
    )


if __name__ == "__main__":
    main()
