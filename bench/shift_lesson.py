"""The shift decides which block to tune (Lee et al. 2023), on the demo: the table and figure in docs/lessons.md.

    uv run bench/shift_lesson.py [--out runs/shift-lesson]

Makes the demo's fine-tuned car model when it is missing (runs/demo, `train.py --config configs/demo.toml`), then runs
the two grids of configs/curves/ with curves.py (a finished cell is not trained again): the same cars under strong
noise (shift_input_demo.toml, an input-level shift) and the same clean cars with new labels (shift_output_demo.toml,
an output-level shift), 7 arms x 3 seeds each, 5 labelled images per class, every cell chosen on a validation split and
its test split read once. Prints one row per arm (test accuracy, mean +- sd over the seeds, and the share of the
parameters it trains) and draws both shifts side by side in <out>/shift_lesson.png.
"""

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cars.report import save_figure  # noqa: E402

SHIFTS = {"input-level shift (noise)": "shift_input_demo", "output-level shift (new labels)": "shift_output_demo"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "shift-lesson")
    args = parser.parse_args()
    if not (ROOT / "runs" / "demo" / "best.pt").is_file():
        train = [sys.executable, "train.py", "--config", "configs/demo.toml", "--run-dir", "runs/demo"]
        subprocess.run(train, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    results = {}  # shift -> arm -> (test accuracies, share of the parameters trained)
    for shift, name in SHIFTS.items():
        folder = ROOT / "runs" / "curves" / name
        curves = [sys.executable, "curves.py", "--config", f"configs/curves/{name}.toml", "--out", str(folder)]
        subprocess.run(curves, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        results[shift] = arms(folder)
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "shift_lesson.png")
    print(f"\nwrote {args.out / 'shift_lesson.png'}")


def arms(folder: Path) -> dict[str, tuple[list[float], float]]:
    """Each arm's test accuracies over the seeds (the finished cells of curves.csv) and the share of the parameters
    its runs trained (from a cell's summary.json)."""
    found = {}
    with open(folder / "curves.csv", newline="") as file:
        for row in csv.DictReader(file):
            if row["status"] != "finished":
                continue
            accuracies, _ = found.setdefault(row["method"], ([], 0.0))
            accuracies.append(float(row["test_acc"]))
            summary = json.loads((folder / row["run_dir"] / "summary.json").read_text())
            found[row["method"]] = (accuracies, summary["trainable_parameters"] / summary["parameters"])
    return found


def spread(values: list[float]) -> str:
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} % +- {deviation:.1f} (n={len(values)})"


def print_table(results: dict) -> None:
    shifts = list(results)
    names = list(results[shifts[0]])
    print("\n| arm | trained parameters | " + " | ".join(shifts) + " |")
    print("|---|---|" + "---|" * len(shifts))
    for name in names:
        share = results[shifts[0]][name][1]
        cells = [spread(results[shift][name][0]) if name in results[shift] else "-" for shift in shifts]
        print(f"| {name} | {100 * share:.1f} % | " + " | ".join(cells) + " |")


def plot(results: dict, path: Path) -> None:
    """Both shifts side by side: one bar per arm, the mean over the seeds with its standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), sharey=True)
    for ax, (shift, found) in zip(axes, results.items(), strict=True):
        names = list(found)
        means = [statistics.mean(found[n][0]) for n in names]
        sds = [statistics.stdev(found[n][0]) if len(found[n][0]) > 1 else 0.0 for n in names]
        ax.bar(range(len(names)), means, yerr=sds, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), [f"{n}\n{100 * found[n][1]:.1f} %" for n in names], rotation=45, ha="right")
        ax.set_title(shift)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test accuracy (%), 5 labelled images per class")
    fig.suptitle("Which part to tune: the demo's car model under two shifts (mean +- sd over 3 seeds)")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
