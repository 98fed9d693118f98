"""What only a GPU can confirm about the training loop, on the demo data (offline, a minute or two):

    uv run python bench/cuda_checks.py

1. No recompiles on CUDA: a compiled AMP run (inductor, Triton kernels) with a frozen first epoch
   compiles one graph for training and one for eval per backbone state, then nothing more
   (the same count tests/test_compiled.py asserts on a CPU: 2 after epoch 1, 4 after every later one).
2. Host waits in the training step: torch.cuda.set_sync_debug_mode counts every operation that
   makes the host wait for the GPU during steady-state steps. Two are expected, both PyTorch's own:
   the float16 GradScaler's overflow check, and (with --ema) AveragedModel's first-update check.
   Counted with basic augmentation, and with the extra augmentation that runs on the batch
   (heavy; TrivialAugment + erasing), which should add none.
"""

import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import train_steps

import train
from cars.config import Config
from cars.data import load_splits
from cars.demo import demo_root
from cars.engine import Device
from cars.loaders import train_loader
from cars.models import build_model
from cars.optim import make_optimizer


def compiles_per_epoch(argv: list[str]) -> list[int]:
    """train.main(argv), with dynamo's compiled frames (recompiles included) counted after every epoch."""
    from torch._dynamo.utils import counters

    counters.clear()
    after_epoch, write_csv = [], train.write_csv

    def counted(path, *args, **kwargs):  # metrics.csv is written once per epoch, after its training and evaluation
        write_csv(path, *args, **kwargs)
        if path.name == "metrics.csv":
            after_epoch.append(counters["frames"]["ok"])

    train.write_csv = counted
    try:
        train.main(argv)
    finally:
        train.write_csv = write_csv
    return after_epoch


def count_waits(scratch: Path, **augmentation) -> list[str]:
    cfg = Config(
        data="demo",
        arch="resnet50",
        weights="none",
        resolution=224,
        batch_size=64,
        cache=str(scratch / "cache"),
        **augmentation,
    )
    splits = load_splits("demo")
    device = Device("cuda", channels_last=True, amp=True, show_progress=False)
    model = device.place(build_model(cfg.arch, "none", len(splits.class_names)))
    optimizer, scaler = make_optimizer(cfg, model), device.scaler()
    loader = train_loader(splits.train, cfg, workers=0, device_type="cuda")
    train_steps(model, loader, optimizer, scaler, device)  # warm up: cuDNN autotuning, the scaler's first steps
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        steps = train_steps(model, loader, optimizer, scaler, device) // cfg.batch_size
        torch.cuda.set_sync_debug_mode("default")
    # where each wait was asked for
    waits = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    print(
        f"{augmentation or 'basic augmentation'}: {len(waits)} host waits in {steps} steps (one is the epoch's final "
        "read of loss and accuracy)"
    )
    return waits


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench/cuda_checks.py needs CUDA")
    demo_root()  # generated once, offline
    with tempfile.TemporaryDirectory() as scratch:
        compiles = compiles_per_epoch(
            [
                "--config",
                "configs/demo.toml",
                "--device",
                "cuda",
                "--compile",
                "--amp",
                "--channels-last",
                "--epochs",
                "4",
                "--freeze-epochs",
                "1",
                "--run-dir",
                str(Path(scratch) / "run"),
                "--workers",
                "0",
            ]
        )
        print(f"compiled frames after each epoch: {compiles} (expected [2, 4, 4, 4])")
        counts = []
        for augmentation in ({}, dict(augment="heavy"), dict(augment="trivialaugment", random_erasing=0.25)):
            waits = count_waits(Path(scratch), **augmentation)
            for wait in sorted(set(waits)):
                print(f"  {waits.count(wait)} x at {wait}")
            counts.append(len(waits))
    print(
        f"cuda checks: compiles {compiles} ({'as expected' if compiles == [2, 4, 4, 4] else 'UNEXPECTED'}), "
        f"host waits in an epoch {counts[0]} (basic), {counts[1]} (heavy), {counts[2]} (trivialaugment + erasing)"
    )


if __name__ == "__main__":
    main()
