"""What eval.py's transfer section costs: eval with --transfer off and on, alternated, and the linear probes' fits at
Stanford Cars' size.

    uv run bench/transfer_lens.py [--run runs/demo] [--repeats 2]

Evaluates a run folder (one fine-tuned from known weights, e.g. configs/demo.toml's) --repeats times each way, one
after the other, and prints each wall time and the section's own `seconds` from summary.json. Then it fits the five
probes of a ResNet-50 (stage widths 256, 512, 1024, 2048 and the 64-wide stem) on synthetic features of Stanford Cars'
size (8,144 training and 8,041 eval images, 196 classes, classes 0.1 standard deviations apart: hard, like real
features) and prints each fit's time: the part of the section that runs on the CPU whatever the device.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from cars.transfer import linear_probe


def eval_seconds(run: Path, out: Path, transfer: str) -> tuple[float, float | None]:
    began = time.perf_counter()
    command = [sys.executable, str(ROOT / "eval.py"), str(run), "--out", str(out), "--overwrite", "--workers", "0"]
    subprocess.run([*command, "--transfer", transfer], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - began
    lens = json.loads((out / "summary.json").read_text()).get("transfer", {}).get("seconds")
    return wall, lens


def probe_fits() -> list[tuple[int, float, float]]:
    rng = np.random.default_rng(0)
    train_labels, eval_labels = np.arange(8144) % 196, np.arange(8041) % 196
    rows = []
    for width in (64, 256, 512, 1024, 2048):
        centres = rng.normal(size=(196, width)) * 0.1
        train_x = (centres[train_labels] + rng.normal(size=(8144, width))).astype(np.float32)
        eval_x = (centres[eval_labels] + rng.normal(size=(8041, width))).astype(np.float32)
        began = time.perf_counter()
        probe = linear_probe(train_x, train_labels, eval_x, eval_labels)
        rows.append((width, time.perf_counter() - began, probe.accuracy))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for transfer in ("off", "on"):
                wall, lens = eval_seconds(args.run, Path(scratch) / transfer, transfer)
                section = f", the section {lens:.2f} s" if lens is not None else ""
                print(f"eval --transfer {transfer} (repeat {repeat + 1}): {wall:.1f} s wall{section}", flush=True)
    fits = probe_fits()
    for width, seconds, accuracy in fits:
        print(f"probe on {width} features, Stanford Cars' size: {seconds:.1f} s (accuracy {accuracy:.1f} %)")
    print(f"five probes: {sum(seconds for _, seconds, _ in fits):.1f} s")


if __name__ == "__main__":
    main()
