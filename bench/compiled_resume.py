"""Inductor's own C++ kernels on a CPU: a compiled, bfloat16, channels-last run stopped after its first epoch and
resumed ends bit-identical to an uninterrupted one (offline, 2.5 minutes on 2 cores, most of it g++):

    uv run python bench/compiled_resume.py

tests/test_compiled.py checks the same with torch.compile's eager backend (dynamo and AOT autograd without
inductor's code generation): inductor's first compile on an empty cache is 90-110 s of g++ on 2 cores, too much for
the suite. Inductor's CPU kernels are deterministic for a given build and thread count, and the resumed run reuses
the kernels the first run compiled, from inductor's cache.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train
from cars.checkpoint import load_checkpoint
from cars.demo import ensure_demo
from cars.report import read_metrics


def computed(run_dir: Path) -> tuple[list[dict], dict]:
    """Everything a run computed, without the wall-clock seconds."""
    metrics = [{k: v for k, v in row.items() if k != "seconds"} for row in read_metrics(run_dir / "metrics.csv")]
    return metrics, load_checkpoint(run_dir / "last.pt")["model"]


def main() -> None:
    data = ensure_demo()
    recipe = "--arch resnet18 --weights none --resolution 32 --batch-size 8 --workers 0 --lr 0.01"
    speed = ["--compile", "on", "--amp", "on", "--channels-last", "on", *recipe.split(), "--data", str(data)]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        started = time.time()
        train.main([*speed, "--epochs", "2", "--run-dir", str(scratch / "whole")])
        first = time.time() - started
        started = time.time()
        train.main([*speed, "--epochs", "1", "--run-dir", str(scratch / "stopped")])
        train.main(["--resume", str(scratch / "stopped"), "--epochs", "2"])
        again = time.time() - started
        (metrics_a, weights_a), (metrics_b, weights_b) = computed(scratch / "whole"), computed(scratch / "stopped")
    same = metrics_a == metrics_b and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    print(
        f"compiled resume (inductor, CPU, {torch.get_num_threads()} threads): "
        f"{'bit-identical' if same else 'DIFFERENT'}; the first run {first:.0f} s (compiling), "
        f"the stopped and resumed runs {again:.0f} s (inductor's cache)"
    )
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
