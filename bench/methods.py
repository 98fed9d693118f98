"""The fine-tuning methods on the demo, over three seeds: the table in docs/explanation/methods.md.

    uv run bench/methods.py [--seeds 0 1 2] [--out runs/demo-methods]

Trains every configs/methods/demo/*.toml once per seed (a finished run is not trained again), each choosing its epoch
on a quarter of the training images and reading the test split once. Prints one row per method: validation and test
accuracy of the chosen epoch (mean +- standard deviation over the seeds), its expected calibration error on the test
split, the mean relative weight change of the early and of the late blocks (the first and the last third of the
blocks before the head), and the linear CKA of the last stage's features to the start's on the test images, from the
transfer lens's own functions; and the share of the parameters each method trains.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cars import calibration, finetune, transfer  # noqa: E402
from cars.checkpoint import load_checkpoint  # noqa: E402
from cars.config import load_saved  # noqa: E402
from cars.data import run_splits  # noqa: E402
from cars.engine import Device, collect_logits  # noqa: E402
from cars.loaders import eval_loader  # noqa: E402
from cars.models import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-methods")
    args = parser.parse_args()
    rows = []
    for file in sorted((ROOT / "configs" / "methods" / "demo").glob("*.toml")):
        results = [train_once(file, args.out / f"{file.stem}-seed{seed}", seed) for seed in args.seeds]
        rows.append((file.stem, results))
        print(file.stem, results, flush=True)
    seeds = " ".join(map(str, args.seeds))
    print(f"\nmean +- standard deviation over seeds {seeds}\n")
    print(
        "| method | validation | test | test ECE | change, early blocks | change, late blocks | CKA last stage | "
        "trained parameters | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, results in rows:
        columns = list(zip(*results, strict=True))
        cells = [spread(columns[0], "%"), spread(columns[1], "%"), spread(columns[7], "%")]
        cells += [spread(columns[2], ""), spread(columns[3], "")]
        cells += [spread(columns[4], ""), f"{100 * columns[6][0]:.1f} %", f"{statistics.mean(columns[5]):.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


def spread(values, unit: str) -> str:
    digits = 1 if unit else 3
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f}{unit} +- {deviation:.{digits}f}"


def train_once(config: Path, run_dir: Path, seed: int) -> tuple[float, ...]:
    """(validation accuracy, test accuracy of the chosen epoch, early and late blocks' mean relative weight change,
    CKA of the last stage, training seconds, share of the parameters trained) of one run, trained unless already
    finished."""
    summary_file = run_dir / "summary.json"
    if not (summary_file.is_file() and json.loads(summary_file.read_text()).get("status") == "finished"):
        command = [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--seed", str(seed)]
        subprocess.run([*command, "--run-dir", str(run_dir), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    summary = json.loads(summary_file.read_text())
    early, late, cka, ece = lens(run_dir)
    share = summary["trainable_parameters"] / summary["parameters"]
    return summary["best_eval_acc"], summary["test_acc_of_best"], early, late, cka, summary["seconds"], share, ece


def lens(run_dir: Path) -> tuple[float, float, float, float]:
    """What the transfer lens says of the chosen epoch's weights: the mean relative change of the early and late
    blocks, and the minibatch CKA of the last stage to the start on the test images; and the expected calibration
    error of the chosen epoch on them (as train.py measures it with the test accuracy)."""
    cfg = load_saved(run_dir / "config.toml")
    splits = run_splits(cfg)
    num_classes = len(splits.class_names)
    start = build_model(cfg.arch, cfg.weights, num_classes).eval()
    tuned = build_model(cfg.arch, "none", num_classes).eval()
    tuned.load_state_dict(load_checkpoint(run_dir / "best.pt")["model"])
    changes = [row for row in transfer.weight_change(start, tuned, head_is_new=True) if row["start"] != "new"]
    third = max(1, len(changes) // 3)
    early = statistics.mean(row["relative_change"] for row in changes[:third])
    late = statistics.mean(row["relative_change"] for row in changes[-third:])
    last_stage = finetune.stages(tuned)[-1:]
    device = Device("cpu", show_progress=False)
    loader = eval_loader(
        splits.test,
        resolution=cfg.resolution,
        interpolation=cfg.interpolation,
        cache=cfg.cache,
        skip_bad_images=False,
        batch_size=64,
        workers=0,
    )
    with torch.random.fork_rng():
        control = transfer.random_network(cfg.arch, num_classes, seed=0)
    cka = transfer.minibatch_cka(start, tuned, control, stage_list=last_stage, loader=loader, device=device)
    ece = calibration.scores(*collect_logits(tuned, loader, device))["ece"]
    return early, late, cka[last_stage[0][0]][0], ece


if __name__ == "__main__":
    main()
