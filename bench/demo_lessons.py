"""The demo's lessons over three seeds: the table in docs/lessons.md.

    uv run bench/demo_lessons.py [--seeds 0 1 2] [--out runs/demo-lessons]

Trains configs/demo.toml, configs/demo_scratch.toml and every pair in configs/lessons/demo/ once per seed (a recipe
that two files share is trained once), then prints one row per file: the final test accuracy's mean and range over
the seeds, the final train accuracy's mean, and the mean training time. The first run makes the demo-pretrained
weights if they are missing; the pretraining's own time is printed too.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cars.config import Config  # noqa: E402
from cars.demo import demo_pretraining_run  # noqa: E402
from cars.report import read_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-lessons")
    args = parser.parse_args()
    files = [ROOT / "configs" / "demo.toml", ROOT / "configs" / "demo_scratch.toml"]
    files += sorted((ROOT / "configs" / "lessons" / "demo").glob("*.toml"))
    recipes = {}  # a recipe's values -> the folder name of its first file
    rows = []
    for file in files:
        recipe = json.dumps(vars(Config(**tomllib.loads(file.read_text()))), sort_keys=True)  # defaults filled in
        name = recipes.setdefault(recipe, file.stem)
        results = [train_once(file, args.out / f"{name}-seed{seed}", seed) for seed in args.seeds]
        rows.append((file.relative_to(ROOT), results))
    pretraining = demo_pretraining_run("shufflenet_v2_x0_5") / "summary.json"
    if pretraining.is_file():
        summary = json.loads(pretraining.read_text())
        print(
            f"pretraining on demo-source: {summary['seconds']:.0f} s, "
            f"final test accuracy {summary['final_eval_acc']:.1f} %"
        )
    seeds = " ".join(map(str, args.seeds))
    print(f"\n| config | final test accuracy, mean (range) over seeds {seeds} | final train accuracy | training time |")
    print("|---|---|---|---|")
    for file, results in rows:
        tests, trains, seconds = zip(*results, strict=True)
        print(
            f"| `{file}` | {statistics.mean(tests):.1f} % ({min(tests):.1f}-{max(tests):.1f}) | "
            f"{statistics.mean(trains):.1f} % | {statistics.mean(seconds):.0f} s |"
        )


def train_once(config: Path, run_dir: Path, seed: int) -> tuple[float, float, float]:
    """(final test accuracy, final train accuracy, training seconds) of one run, trained unless already finished."""
    summary_file = run_dir / "summary.json"
    if not (summary_file.is_file() and json.loads(summary_file.read_text()).get("status") == "finished"):
        command = [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--seed", str(seed)]
        subprocess.run([*command, "--run-dir", str(run_dir), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    summary = json.loads(summary_file.read_text())
    last = read_metrics(run_dir / "metrics.csv")[-1]
    return summary["final_eval_acc"], last["train_acc"], summary["seconds"]


if __name__ == "__main__":
    main()
