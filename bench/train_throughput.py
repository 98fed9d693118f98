"""Training throughput end to end (cached dataset -> DataLoader -> train step) against the same
train step fed synthetic in-memory batches (the compute limit), side by side in one run.

    uv run python bench/train_throughput.py                                  # ResNet-50, 224 px, batch 128
    uv run python bench/train_throughput.py --arch resnet18 --resolution 64 --batch-size 32 --steps 10   # a CPU smoke run

On CUDA it trains as train.py does by default: AMP, channels_last, torch.compile. The last line is
the summary: end-to-end images/s as a percentage of synthetic.
"""

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cars.config import Config  # noqa: E402
from cars.data import load_splits  # noqa: E402
from cars.engine import Device, train_one_epoch  # noqa: E402
from cars.loaders import train_loader  # noqa: E402
from cars.models import build_model  # noqa: E402
from cars.optim import make_optimizer  # noqa: E402
from cars.runtime import pick_device  # noqa: E402


def endless(loader):
    """Batches from epoch after epoch (workers restart each epoch, as in training)."""
    for epoch in itertools.count(1):
        loader.dataset.epoch = epoch
        yield from loader


def timed_steps(model, batches, optimizer, scaler, device: Device, steps: int) -> float:
    """Images per second over `steps` training steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = train_one_epoch(model, itertools.islice(batches, steps), optimizer, scaler, device, description="timing")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result.images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="a dataset folder (default: generated JPEGs sized like Stanford Cars)")
    parser.add_argument("--images", type=int, default=1024, help="generated images per split")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation, cudnn autotuning)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes that build the cache")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    if args.data:
        location = args.data
    else:
        from fake_cars import fake_cars

        location = str(fake_cars(args.images))
    device_type = pick_device("auto")
    on_cuda = device_type == "cuda"
    device = Device(device_type, channels_last=on_cuda, amp=on_cuda, show_progress=False)
    cfg = Config(data=location, arch=args.arch, resolution=args.resolution, batch_size=args.batch_size, weights="none")
    splits = load_splits(location)
    model = build_model(cfg.arch, "none", len(splits.class_names)).to(device_type)
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    trained = torch.compile(model) if on_cuda and not args.no_compile else model
    optimizer = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device_type, enabled=on_cuda)

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.resolution, args.resolution), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, len(splits.class_names), (args.batch_size,), generator=generator)
    if on_cuda:
        images, labels = images.pin_memory(), labels.pin_memory()
    synthetic = itertools.repeat((images, labels))

    with tempfile.TemporaryDirectory() as scratch:
        loader = train_loader(splits.train, Config(**{**cfg.__dict__, "cache": scratch}), args.workers, device_type)
        print(f"{args.arch}, {args.resolution} px, batch {args.batch_size} on {device_type} "
              f"(amp {device.amp}, channels_last {device.channels_last}, compile {trained is not model}); "
              f"{len(splits.train)} cached training images")
        timed_steps(trained, synthetic, optimizer, scaler, device, args.warmup)
        real_batches = endless(loader)
        timed_steps(trained, real_batches, optimizer, scaler, device, 2)  # start the workers
        synthetic_rate = timed_steps(trained, synthetic, optimizer, scaler, device, args.steps)
        real_rate = timed_steps(trained, real_batches, optimizer, scaler, device, args.steps)
    print(f"synthetic in-memory batches: {synthetic_rate:.0f} img/s")
    print(f"end to end (cache -> loader -> step): {real_rate:.0f} img/s")
    print(f"end-to-end {100 * real_rate / synthetic_rate:.0f}% of synthetic ({real_rate:.0f} vs {synthetic_rate:.0f} img/s, {args.arch} {args.resolution} px batch {args.batch_size})")


if __name__ == "__main__":
    main()
