"""Calibration, abstention and adapting without labels on the demo, over three seeds: the tables in
docs/explanation/calibration-and-shift.md.

    uv run bench/calibration_and_shift.py [--runs runs/demo-methods] [--seeds 0 1 2]

Evaluates the plain fine-tunes that bench/methods.py trains (configs/methods/demo/0_plain.toml, seeds 0-2, each with a
validation split, which fits the temperature; trained here when missing) with eval.py --corruptions, once with
--adapt bn and once with --adapt tent, and prints the mean +- sd over the seeds of: the ECE, NLL and Brier score before
and after the temperature on the clean test split and each corrupted copy; the AURC of each score; the accuracy of the
scored halves before and after each adaptation.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "demo-methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    evaluated = {"bn": [], "tent": []}
    for seed in args.seeds:
        run = args.runs / f"0_plain-seed{seed}"
        if not (run / "best.pt").is_file():
            train = ["train.py", "--config", "configs/methods/demo/0_plain.toml", "--seed", str(seed)]
            subprocess.run([sys.executable, *train, "--run-dir", str(run)], cwd=ROOT, check=True)
        for how in evaluated:
            out = run / f"eval-adapt-{how}"
            flags = ["--corruptions", "--adapt", how, "--transfer", "off", "--num-gradcam", "0", "--overwrite"]
            command = [sys.executable, "eval.py", str(run), *flags, "--out", str(out)]
            subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            evaluated[how].append(json.loads((out / "summary.json").read_text()))
    first = evaluated["bn"]  # the calibration and abstention do not depend on --adapt
    splits = ["test", *first[0]["calibration"]["corruptions"]]

    def calibration_row(summary: dict, split: str) -> dict:
        c = summary["calibration"]
        return c if split == "test" else c["corruptions"][split]

    print(f"temperature: {spread([s['calibration']['temperature'] for s in first], 2)}\n")
    print("| split | ECE | ECE calibrated | NLL | NLL calibrated | Brier | Brier calibrated |")
    print("|---|---|---|---|---|---|---|")
    for split in splits:
        rows = [calibration_row(s, split) for s in first]
        cells = [spread([r[k] for r in rows], 1 if "ece" in k else 3) for k in CALIBRATION_KEYS]
        print(f"| {split} | " + " | ".join(cells) + " |")
    scores = [k for k in first[0]["abstention"]["test"] if k != "error"]
    print("\n| split | error | " + " | ".join(f"AURC, {s}" for s in scores) + " |")
    print("|---|---|" + "---|" * len(scores))
    for split in splits:
        areas = [s["abstention"][split] for s in first]
        cells = [spread([100 * a[k] for a in areas], 1) for k in ["error", *scores]]
        print(f"| {split} | " + " | ".join(cells) + " |")
    print("\n| split | before | after --adapt bn | after --adapt tent |")
    print("|---|---|---|---|")
    for split in [*splits[1:], "mean", "clean"]:
        before = spread([adapted_accuracy(s, split, "before") for s in first], 1)
        after = [spread([adapted_accuracy(s, split, "after") for s in evaluated[how]], 1) for how in ("bn", "tent")]
        print(f"| {split} | {before} | " + " | ".join(after) + " |")


def adapted_accuracy(summary: dict, split: str, key: str) -> float:
    """The accuracy before or after --adapt of a corrupted copy, their mean, or the clean split."""
    adapted = summary["adaptation"]
    return (adapted[split] if split in ("mean", "clean") else adapted["corruptions"][split])[key]


CALIBRATION_KEYS = ["ece", "ece_calibrated", "nll", "nll_calibrated", "brier", "brier_calibrated"]


def spread(values: list[float], digits: int) -> str:
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {deviation:.{digits}f}"


if __name__ == "__main__":
    main()
