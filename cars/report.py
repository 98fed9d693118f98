"""Files a person looks at: training curves, metrics tables."""

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed, also on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from cars.checkpoint import atomic_write  # noqa: E402

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "eval_loss", "eval_acc", "seconds"]


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(file)]


def plot_curves(rows: list[dict], path: Path, eval_name: str = "test", title: str = "") -> None:
    """Loss and accuracy, train vs eval, with the learning rate on a second axis so lr drops
    line up with the jumps they cause."""
    epochs = [r["epoch"] for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy (%)")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", ms=3, label="train")
        ax.plot(epochs, [r[f"eval_{key}"] for r in rows], "o-", ms=3, label=eval_name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        lr_ax = ax.twinx()
        lr_ax.plot(epochs, [r["lr"] for r in rows], color="grey", ls="--", lw=1, label="lr")
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate", color="grey")
        handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="center right")
    best = max(rows, key=lambda r: r["eval_acc"])
    acc_ax.annotate(f"best {best['eval_acc']:.2f}%", (best["epoch"], best["eval_acc"]), textcoords="offset points", xytext=(-80, -45),
                    arrowprops=dict(arrowstyle="->"))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda file: file.write(buffer.getvalue()))
