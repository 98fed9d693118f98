"""Training and eval throughput, eager against compiled + mixed precision + channels-last, side by
side in one run. For each: training end to end (cached dataset -> loader -> train step) against the
same step fed synthetic in-memory batches (the compute limit), and eval on synthetic batches.

    uv run python bench/train_throughput.py                                  # ResNet-50, 224 px, batch 128
    uv run python bench/train_throughput.py --arch resnet18 --resolution 64 --batch-size 32 --steps 10  # on a CPU

"compiled" is what `train.py --compile --amp --channels-last` runs: on CUDA float16 autocast with
loss scaling, on a CPU bfloat16 autocast and inductor's C++ kernels. The last line is the summary.
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

from cars.config import Config
from cars.data import load_splits
from cars.engine import Device, Progress, RunningTotals, collect_logits, train_step
from cars.loaders import train_loader
from cars.methods import plain_objective
from cars.models import build_model
from cars.optim import head_lr, make_optimizer
from cars.runtime import check_compiler, pick_device


def endless(loader):
    """Batches from epoch after epoch (as in training)."""
    for epoch in itertools.count(1):
        loader.dataset.epoch = epoch
        yield from loader


def wait(device: Device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: Device, work) -> tuple[float, object]:
    """How long `work()` takes, the device's queue drained before and after: (seconds, its result)."""
    wait(device)
    started = time.perf_counter()
    result = work()
    wait(device)
    return time.perf_counter() - started, result


def train_steps(model, batches, optimizer, scaler, device: Device) -> int:
    """The steps of train.py's step loop without its bookkeeping: each step, and the running totals on the
    device, read once at the end. Returns the images trained on."""
    model.train()
    progress = Progress(lr=head_lr(optimizer))
    totals, objective = RunningTotals(progress, device.type), plain_objective()
    for batch in batches:
        loss, logits, labels, terms = train_step(
            model, batch, optimizer, scaler, device, objective=objective, step=progress.steps
        )
        totals.add(progress.steps, loss, logits, labels, terms)
        progress.steps, progress.seen = progress.steps + 1, progress.seen + len(labels)
    totals.settle(progress, head_lr(optimizer))
    return progress.seen


def train_rate(model, batches, optimizer, scaler, device: Device, *, steps: int) -> float:
    """Training images per second over `steps` steps."""
    seconds, images = timed(
        device, lambda: train_steps(model, itertools.islice(batches, steps), optimizer, scaler, device)
    )
    return images / seconds


def eval_rate(model, batch, device: Device, steps: int) -> float:
    seconds, _ = timed(device, lambda: collect_logits(model, [batch] * steps, device, description="timing"))
    return steps * len(batch[0]) / seconds


def measure(mode: str, cfg: Config, *, classes: int, loader, synthetic, args, device_type: str) -> dict:
    fast = mode == "compiled"
    device = Device(device_type, channels_last=fast, amp=fast, show_progress=False)
    torch.manual_seed(0)
    model = device.place(build_model(cfg.arch, "none", classes))
    if fast:
        check_compiler(device_type)
    trained = torch.compile(model) if fast else model
    optimizer, scaler = make_optimizer(cfg, model), device.scaler()
    started = time.perf_counter()
    train_rate(trained, synthetic, optimizer, scaler, device, steps=args.warmup)  # compilation, cuDNN autotuning
    eval_rate(trained, next(synthetic), device, 2)
    warmup = time.perf_counter() - started
    real_batches = endless(loader)
    train_rate(trained, real_batches, optimizer, scaler, device, steps=2)
    rates = dict(
        mode=mode,
        warmup=warmup,
        synthetic=train_rate(trained, synthetic, optimizer, scaler, device, steps=args.steps),
        end_to_end=train_rate(trained, real_batches, optimizer, scaler, device, steps=args.steps),
        eval=eval_rate(trained, next(synthetic), device, args.steps),
    )
    print(
        f"{mode:>8} ({device.describe(fast)}): warm-up {warmup:.0f} s; training {rates['synthetic']:.0f} img/s on "
        "synthetic batches, "
        f"{rates['end_to_end']:.0f} end to end ({100 * rates['end_to_end'] / rates['synthetic']:.0f}%); eval "
        f"{rates['eval']:.0f} img/s",
        flush=True,
    )
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="a dataset folder (default: generated JPEGs sized like Stanford Cars)")
    parser.add_argument("--images", type=int, default=1024, help="generated images per split")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation, cudnn autotuning)")
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes that build the cache"
    )
    parser.add_argument("--modes", default="eager,compiled", help="eager, compiled, or both (default)")
    args = parser.parse_args()

    if args.data:
        location = args.data
    else:
        from fake_cars import fake_cars

        location = str(fake_cars(args.images))
    device_type = pick_device("auto")
    torch.backends.cudnn.benchmark = device_type == "cuda"
    cfg = Config(data=location, arch=args.arch, resolution=args.resolution, batch_size=args.batch_size, weights="none")
    splits = load_splits(location)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (args.batch_size, 3, args.resolution, args.resolution), dtype=torch.uint8, generator=generator
    )
    labels = torch.randint(0, len(splits.class_names), (args.batch_size,), generator=generator)
    if device_type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    synthetic = itertools.repeat((images, labels))

    print(
        f"{args.arch}, {args.resolution} px, batch {args.batch_size} on {device_type}; {len(splits.train)} cached "
        "training images"
    )
    with tempfile.TemporaryDirectory() as scratch:
        loader = train_loader(
            splits.train, Config(**{**cfg.__dict__, "cache": scratch}), workers=args.workers, device_type=device_type
        )
        results = [
            measure(
                mode,
                cfg,
                classes=len(splits.class_names),
                loader=loader,
                synthetic=synthetic,
                args=args,
                device_type=device_type,
            )
            for mode in args.modes.split(",")
        ]
    summary = "; ".join(
        f"{r['mode']} {r['synthetic']:.0f} img/s ({100 * r['end_to_end'] / r['synthetic']:.0f}% end to end), "
        f"eval {r['eval']:.0f}"
        for r in results
    )
    if len(results) == 2:
        summary += f"; compiled/eager training {results[1]['synthetic'] / results[0]['synthetic']:.2f}x"
    print(f"{args.arch} {args.resolution} px batch {args.batch_size}: {summary}")


if __name__ == "__main__":
    main()
