"""compare.py: the experiment log, generated from run folders."""

from cars.cli import check_command_line, parse_compare

check_command_line(__name__, parse_compare)  # --help and mistakes answer before the imports below load torch

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cars.config import Config, load_saved
from cars.errors import UserError, run_cli
from cars.files import make_folder
from cars.methods import base_lr, method_parts, start_words, term_names
from cars.report import (
    METRIC_COLUMNS,
    markdown_table,
    plot_comparison,
    read_metrics,
    trained_parameter_words,
    write_text,
)
from cars.runs import best_row, evaluated, read_summary, run_status


@dataclass
class ComparedRun:
    name: str
    config: Config
    metrics: list[dict]
    summary: dict
    status: str


def read_run(folder: Path) -> ComparedRun:
    if not (folder / "config.toml").is_file():
        raise UserError(f"{folder} is not a run folder (no config.toml)")
    config = load_saved(folder / "config.toml")
    try:
        metrics = read_metrics(folder / "metrics.csv") if (folder / "metrics.csv").is_file() else []
        columns = {*METRIC_COLUMNS, *term_names(config)}  # and a column per extra loss term of the method
        if any(set(r) != columns or r["epoch"] is None for r in metrics):
            raise ValueError("unexpected columns")
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"{folder / 'metrics.csv'} is damaged ({error})") from None
    summary = read_summary(folder)
    return ComparedRun(shown(folder), config, metrics, summary, run_status(summary))


def shown(folder: Path) -> str:
    """A run folder as the table names it: relative to where compare.py runs, when it is below it."""
    relative = os.path.relpath(folder)
    return str(folder) if relative.startswith("..") else relative


def natural(name: str) -> list:
    """Sort key: trial-2 before trial-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def unreadable_row(folder: Path, why: str) -> list[str]:
    return [shown(folder), "unreadable", why, *["-"] * (len(HEADER) - 3)]


def method(cfg: Config) -> str:
    """What the run added to plain training (finetune.method_parts), and EMA."""
    return ", ".join(method_parts(cfg) + (["EMA"] if cfg.ema else [])) or "plain"


def augmentation(cfg: Config) -> str:
    parts = ["crop+flip" if cfg.augment == "basic" else cfg.augment]
    if cfg.train_crop == "resize-randomcrop":
        parts[0] = parts[0].replace("crop", "resize+randomcrop")
    extras = [
        ("cj", cfg.color_jitter),
        ("erase", cfg.random_erasing),
        ("mixup", cfg.mixup),
        ("cutmix", cfg.cutmix),
        ("ls", cfg.label_smoothing),
    ]
    parts += [f"{name} {value:g}" for name, value in extras if value]
    return ", ".join(parts)


# points of train accuracy above eval accuracy at the last evaluation (the original experiment log's run 5: 73 %
# against 52 %)
OVERFIT_GAP = 15.0
# % of its own training images a model must get right; below, it underfits (the original experiment log's runs 1-2)
UNDERFIT_TRAIN = 80.0
VERDICT_RULE = (
    "Verdict, for finished runs and runs stopped early, at the last evaluated epoch: diverged if the loss stopped "
    "being finite; overfitting if train accuracy is "
    f"more than {OVERFIT_GAP:g} points above eval accuracy; else underfitting if train accuracy is below "
    f"{UNDERFIT_TRAIN:g} %; "
    "else fine. (Train accuracy is measured on the augmented training crops, so heavy augmentation, MixUp or CutMix "
    "lower it.)"
)


JUDGED = ("finished", "stopped early")  # a run still running or stopped part way is not judged on its first epochs


def verdict(status: str, metrics: list[dict]) -> str:
    """The original write-up's diagnosis of a run from the gap between train and eval accuracy (VERDICT_RULE);
    "-" for a run that has not ended its training (its status column says why)."""
    if status == "diverged":
        return "diverged"
    if status not in JUDGED or not evaluated(metrics):
        return "-"
    last = evaluated(metrics)[-1]
    if last["train_acc"] - last["eval_acc"] > OVERFIT_GAP:
        return "overfitting"
    return "underfitting" if last["train_acc"] < UNDERFIT_TRAIN else "fine"


def row(run: ComparedRun) -> list[str]:
    cfg, metrics, summary = run.config, run.metrics, run.summary
    split = summary.get("selected_on", "val" if cfg.val_split else "test")
    if evaluated(metrics):
        best = best_row(metrics)
        last = evaluated(metrics)[-1]
        best_text = f"{best['eval_acc']:.2f}% @{int(best['epoch'])} ({split})"
        final_text = f"{last['eval_acc']:.2f}%"
        train_text = f"{best['train_acc']:.2f}% / {last['train_acc']:.2f}%"
        gap_text = f"{last['train_acc'] - last['eval_acc']:+.2f}"
        seconds = summary.get("seconds", sum(r["seconds"] for r in metrics))
    else:
        best_text, final_text, train_text, gap_text, seconds = "-", "-", "-", "-", 0
    test_text = (
        f"{summary['test_acc_of_best']:.2f}%"
        if "test_acc_of_best" in summary
        else ("(= best)" if split == "test" else "-")
    )
    minutes = f"{seconds / 60:.1f} min"
    lr = f"{base_lr(cfg):g}" + (" (scaled)" if cfg.lr_scaling == "linear" else "")
    return [
        run.name,
        run.status,
        cfg.arch,
        start_words(cfg),
        method(cfg),
        str(cfg.resolution),
        cfg.optimizer,
        lr,
        f"{cfg.weight_decay:g}",
        str(cfg.batch_size),
        augmentation(cfg),
        f"{len(metrics)}/{cfg.epochs}",
        best_text,
        final_text,
        train_text,
        gap_text,
        verdict(run.status, metrics),
        test_text,
        f"{summary['test_ece_of_best']:.1f} %" if "test_ece_of_best" in summary else "-",
        trained_parameter_words(summary),
        minutes,
    ]


HEADER = [
    "run",
    "status",
    "arch",
    "start",
    "method",
    "res",
    "optimizer",
    "lr",
    "wd",
    "batch",
    "augmentation",
    "epochs",
    "best eval (epoch, split)",
    "final epoch",
    "train at best / final",
    "train-eval gap",
    "verdict",
    "test of best",
    "test ECE",
    "trained parameters",
    "time",
]


def main(argv=None) -> None:
    args = parse_compare(argv)
    folders = [Path(p) for p in args.runs if Path(p).is_dir() and (Path(p) / "config.toml").exists()]
    folders.sort(key=lambda folder: natural(shown(folder)))
    skipped = [p for p in args.runs if Path(p) not in folders]
    if not folders:
        raise UserError(f"none of {', '.join(args.runs)} is a run folder (a folder with config.toml)")
    runs, rows = [], []
    for folder in folders:  # one damaged run does not hide the others
        try:
            runs.append(read_run(folder))
            rows.append(row(runs[-1]))
        except UserError as error:
            rows.append(unreadable_row(folder, str(error).replace("|", "/")))
    table = markdown_table(HEADER, rows)
    notes = (
        "The best epoch is chosen on the split in brackets; chosen on test (the original experiments' practice), it "
        "flatters the result: the final-epoch column is the honest one. With --val-split the test column is the test "
        "accuracy of the epoch chosen on val, and test ECE its expected calibration error (before a temperature; "
        "eval.py fits one). " + VERDICT_RULE
    )
    print(table + "\n\n" + notes)
    if skipped:
        print(f"\nnot run folders, skipped: {', '.join(skipped)}")
    if args.out:
        out = Path(args.out)
        make_folder(out)
        plot_comparison(
            {f"{r.name} ({start_words(r.config)}; {method(r.config)})": r.metrics for r in runs if r.metrics},
            out / "compare.png",
        )
        write_text(
            out / "compare.md",
            f"# Experiments\n\n{table}\n\n{notes}\n\n![eval accuracy and lr of every run](compare.png)\n",
        )
        print(f"\nwrote {out / 'compare.md'} and {out / 'compare.png'}")


if __name__ == "__main__":
    run_cli(main)
