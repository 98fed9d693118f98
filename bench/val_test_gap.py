"""Where the gap between the validation and the test accuracy of the demo's methods comes from: every epoch of one run
scored on both splits (the test split read only for this measurement), for each validation fraction given.

    uv run bench/val_test_gap.py [--preset configs/methods/demo/surgical.toml] [--seed 0] [--val-split 0.25 0.5]

A gap that the chosen epoch alone shows is the noise of picking the best of many evaluations on few images; a gap
that every epoch shows is a difference between the images of the two splits, or in how they are fed.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from cars.engine import evaluate  # noqa: E402
from cars.loaders import run_eval_loader  # noqa: E402
from cars.run_state import supervised  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=str(ROOT / "configs" / "methods" / "demo" / "surgical.toml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-split", type=float, nargs="+", default=[0.25, 0.5])
    args = parser.parse_args()
    for fraction in args.val_split:
        rows = both_splits(args.preset, args.seed, fraction)
        print(f"\n{Path(args.preset).name}, seed {args.seed}, val_split {fraction:g}")
        print("| epoch | validation | test | gap |\n|---|---|---|---|")
        for epoch, val, test in rows:
            print(f"| {epoch} | {val:.1f} | {test:.1f} | {val - test:+.1f} |")
        best = max(rows, key=lambda row: row[1])  # the first of equals, as train.py chooses
        gaps = [val - test for _, val, test in rows]
        print(
            f"mean gap over all epochs {statistics.mean(gaps):+.1f} points (sd {statistics.stdev(gaps):.1f}); at the "
            f"chosen epoch {best[0]}: {best[1] - best[2]:+.1f}; best test epoch {max(r[2] for r in rows):.1f}"
        )


def both_splits(preset: str, seed: int, fraction: float) -> list[tuple[int, float, float]]:
    """(epoch, validation accuracy, test accuracy) of every epoch of one run of `preset`."""
    with tempfile.TemporaryDirectory() as folder:
        flags = ["--config", preset, "--seed", str(seed), "--val-split", str(fraction), "--run-dir", folder]
        run = train.setup(train.parse_train([*flags, "--overwrite", "--no-final-test"]), command=["val_test_gap.py"])
        test = run_eval_loader(run.splits.test, run.cfg, workers=run.workers, device_type=run.device.type)
        rows = []

        def both(epoch: int, val_acc: float) -> bool:
            rows.append((epoch, val_acc, evaluate(run.eval_model, test, run.device, description="test").accuracy))
            return False  # never stops the run

        with supervised(run):
            train.train(run, both)
    return rows


if __name__ == "__main__":
    main()
