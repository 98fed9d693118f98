"""Files a person looks at: training curves, metrics tables."""

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed, also on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from cars.files import atomic_write  # noqa: E402
from cars.runs import best_row, evaluated  # noqa: E402

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
    """metrics.csv rows as numbers; None for the eval columns of epochs that were not evaluated (--eval-every)."""
    with open(path, newline="") as file:
        return [{k: float(v) if v != "" else None for k, v in row.items()} for row in csv.DictReader(file)]


def plot_curves(rows: list[dict], path: Path, eval_name: str = "test", title: str = "") -> None:
    """Loss and accuracy, train vs eval, and beneath them the learning rate on its own linear axis, on the same epochs:
    lr drops line up with the jumps they cause, and a cosine looks like a cosine, not a cliff."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(12, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    (loss_ax, acc_ax), lr_axes = axes
    for ax, key, label in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy (%)")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", ms=3, label="train")
        ax.plot(
            [r["epoch"] for r in evaluated(rows)],
            [r[f"eval_{key}"] for r in evaluated(rows)],
            "o-",
            ms=3,
            label=eval_name,
        )
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    for lr_ax in lr_axes:
        lr_ax.plot(epochs, [r["lr"] for r in rows], color="grey", lw=1.2)
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_xlabel("epoch")
        lr_ax.set_ylim(bottom=0)
        lr_ax.grid(alpha=0.3)
    best = best_row(rows)
    if best:  # with --eval-every N, the first plots may come before the first evaluation
        acc_ax.annotate(
            f"best {best['eval_acc']:.2f}%",
            (best["epoch"], best["eval_acc"]),
            textcoords="offset points",
            xytext=(-80, -45),
            arrowprops=dict(arrowstyle="->"),
        )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda file: file.write(buffer.getvalue()))


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda file: file.write(buffer.getvalue()))


def plot_per_class(classes, path: Path) -> None:
    """Every class's accuracy, sorted, worst at the top, names readable."""
    order = sorted((c for c in classes if c.total), key=lambda c: (c.accuracy, c.index))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.2 * len(order)))
    accuracies = [c.accuracy for c in order]
    colours = plt.cm.RdYlGn([a / 100 for a in accuracies])
    ax.barh(range(len(order)), accuracies, color=colours)
    ax.set_yticks(range(len(order)), [f"{c.name} ({c.correct}/{c.total})" for c in order], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    mean = sum(accuracies) / len(accuracies)
    ax.axvline(mean, color="black", ls="--", lw=1)
    ax.set_title(f"per-class accuracy, worst first (dashed: mean over classes, {mean:.1f}%)")
    save_figure(fig, path)


def plot_confusion(matrix, class_names: list[str], pairs, path: Path) -> None:
    """The confusion matrix restricted to the classes of the most confused pairs: 196x196 is unreadable."""
    import numpy as np

    involved = sorted({c for t, p, _ in pairs for c in (t, p)}) or list(range(min(len(class_names), 10)))
    sub = matrix[np.ix_(involved, involved)]
    names = [class_names[i] for i in involved]
    size = 2.5 + 0.45 * len(involved)
    fig, ax = plt.subplots(figsize=(size + 2, size))
    image = ax.imshow(sub, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), count in np.ndenumerate(sub):
        if count:
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > sub.max() / 2 else ("crimson" if i != j else "black"),
            )
    fig.colorbar(image, ax=ax, fraction=0.04)
    ax.set_title("confusions among the most confused classes (off-diagonal in red)")
    save_figure(fig, path)


def plot_cam_grid(tiles: list[dict], path: Path, title: str, columns: int = 4) -> None:
    """tiles: {"image": HxWx3 uint8 (the photo and the CAM over it, side by side), "true": name, "predicted": name,
    "confidence": 0..1}."""
    import textwrap

    rows = max(1, -(-len(tiles) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tile in zip(axes.flat, tiles, strict=False):
        right = tile["true"] == tile["predicted"]
        ax.imshow(tile["image"])
        label = (
            f"{'✓' if right else '✗'} true: {tile['true']}\npred: {tile['predicted']} ({100 * tile['confidence']:.0f}%)"
        )
        ax.set_title(
            "\n".join(textwrap.fill(line, 60) for line in label.split("\n")),
            fontsize=8,
            color="darkgreen" if right else "crimson",
        )
    fig.suptitle(title)
    fig.tight_layout()
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(cmap="jet"), ax=axes, shrink=0.5, pad=0.02)
    bar.set_ticks([0, 1], labels=["low", "high"])
    bar.set_label("CAM attention")
    save_figure(fig, path, dpi=100)


def trained_parameter_words(summary: dict) -> str:
    """How many parameters a run trained, and their share ("1.2 M of 23.9 M, 5.0 %"), from its summary.json; "-" for a
    run from before summaries recorded them."""
    if "trainable_parameters" not in summary:
        return "-"
    trained, total = summary["trainable_parameters"], summary["parameters"]
    return f"{trained / 1e6:.2f} M of {total / 1e6:.2f} M, {100 * trained / total:.1f} %"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_comparison(runs: dict[str, list[dict]], path: Path) -> None:
    """Eval accuracy (solid) and train accuracy (dashed) of every run on one chart, their lr schedules beneath: the gap
    between a run's two lines is what tells overfitting from underfitting."""
    fig, (acc_ax, lr_ax) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for name, rows in runs.items():
        scored = evaluated(rows)
        best = f" (best {max(r['eval_acc'] for r in scored):.2f}%)" if scored else ""
        (line,) = acc_ax.plot(
            [r["epoch"] for r in scored], [r["eval_acc"] for r in scored], "-", lw=1.5, label=name + best
        )
        # train, dashed
        acc_ax.plot([r["epoch"] for r in rows], [r["train_acc"] for r in rows], "--", lw=1, color=line.get_color())
        lr_ax.plot([r["epoch"] for r in rows], [r["lr"] for r in rows], "-", lw=1.2, color=line.get_color())
    acc_ax.set_ylabel("accuracy (%): eval solid, train dashed")
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8, loc="lower right")
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("epoch")
    lr_ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_lr_find(
    lrs: list[float], smoothed: list[float], suggestion: dict, path: Path, *, preset_lr: float, title: str = ""
) -> None:
    """The smoothed loss against the lr, the suggestions marked and the preset's lr beside them. The y axis stops a
    little above the starting loss: the blow-up at the end would squash the useful part flat."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(lrs, smoothed, lw=1.5)
    for rule, marker, colour in (("valley", "o", "crimson"), ("steepest", "s", "darkorange")):
        lr = suggestion[rule]
        ax.plot([lr], [smoothed[lrs.index(lr)]], marker, color=colour, ms=8, label=f"{rule}: {lr:.3g}")
    ax.axvline(preset_lr, color="grey", ls="--", lw=1, label=f"the preset's lr: {preset_lr:g}")
    low, start = min(smoothed), smoothed[0]
    ax.set_ylim(low - 0.1 * (start - low + 1e-9), start + 0.25 * (start - low + 1e-9))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title)
    save_figure(fig, path)


def plot_class_counts(names: list[str], train: list[int], test: list[int], path: Path) -> None:
    """Images per class, sorted, every class named: 196 bars stay readable in a tall chart."""
    order = sorted(range(len(names)), key=lambda c: (train[c], c))
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.16 * len(names)))
    ax.barh(range(len(order)), [train[c] for c in order], color="steelblue", label="train")
    ax.barh(range(len(order)), [test[c] for c in order], left=[train[c] for c in order], color="orange", label="test")
    ax.set_yticks(range(len(order)), [names[c] for c in order], fontsize=7)
    ax.set_ylim(-0.5, len(order) - 0.5)
    ax.set_xlabel("images")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("images per class, fewest training images first")
    save_figure(fig, path)


def plot_sizes(widths: list[int], heights: list[int], path: Path) -> None:
    """Width against height of every image, and the aspect ratios."""
    fig, (scatter, ratios) = plt.subplots(1, 2, figsize=(12, 4.5))
    scatter.scatter(widths, heights, s=4, alpha=0.4)
    scatter.set_xlabel("width (px)")
    scatter.set_ylabel("height (px)")
    scatter.set_title("image sizes")
    scatter.grid(alpha=0.3)
    ratios.hist([w / h for w, h in zip(widths, heights, strict=True)], bins=40, color="gray")
    ratios.set_xlabel("aspect ratio (width / height)")
    ratios.set_ylabel("images")
    ratios.set_title("aspect ratios")
    save_figure(fig, path)


def duplicate_label(distance: int, exact: bool) -> str:
    """How duplicates.png names a pair: "same pixels" only when the pixels were compared and are equal."""
    return "same pixels" if exact else f"{distance} bits apart" + (" (other pixels)" if distance == 0 else "")


def plot_duplicates(pairs: list[tuple], path: Path) -> None:
    """pairs: (image a, image b, title a, title b, distance, exact), each pair side by side; "same pixels" only where
    the pixels were compared and are equal (equal hashes alone are not)."""
    import textwrap

    fig, axes = plt.subplots(len(pairs), 2, figsize=(7, 3 * len(pairs)), squeeze=False)
    for (image_a, image_b, title_a, title_b, distance, exact), (left, right) in zip(pairs, axes, strict=False):
        for ax, image, title in ((left, image_a, title_a), (right, image_b, title_b)):
            ax.imshow(image)
            ax.axis("off")
            ax.set_title(textwrap.fill(title, 40), fontsize=8)
        left.text(1.05, 0.5, duplicate_label(distance, exact), transform=left.transAxes, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def plot_samples(rows: list[tuple], resolution: int, path: Path) -> None:
    """rows: (class name, image as stored, [training crops], eval crop); what the model sees, beside the picture."""
    import textwrap

    columns = 2 + len(rows[0][2]) if rows else 1
    fig, axes = plt.subplots(
        max(len(rows), 1), columns, figsize=(2.6 * columns, 2.8 * max(len(rows), 1)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for (name, image, crops, eval_crop), row in zip(rows, axes, strict=False):
        row[0].imshow(image)
        row[0].set_title(textwrap.fill(f"{name} ({image.width}x{image.height}, as stored)", 30), fontsize=8)
        for k, crop in enumerate(crops, 1):
            row[k].imshow(crop.permute(1, 2, 0).numpy())
            row[k].set_title(f"training crop {k} ({resolution} px)", fontsize=8)
        row[-1].imshow(eval_crop.permute(1, 2, 0).numpy())
        row[-1].set_title(f"eval crop ({resolution} px)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def plot_weight_change(rows: list[dict], path: Path, *, title: str) -> None:
    """How far each block moved from its starting weights, input side on the left; a new head is marked, not drawn
    (it has no starting value)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.38 * len(rows) + 2), 4.2))
    values = [r["relative_change"] if r["start"] != "new" else 0.0 for r in rows]
    ax.bar(range(len(rows)), values, color=["lightgrey" if r["start"] == "new" else "steelblue" for r in rows])
    for x, row in enumerate(rows):
        if row["start"] == "new":
            ax.text(x, 0, "new", rotation=90, ha="center", va="bottom", fontsize=8, color="dimgrey")
    ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=70, ha="right", fontsize=8)
    ax.set_ylabel("relative change  ||W - W0|| / ||W0||")
    ax.set_xlabel("block (input side on the left)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    save_figure(fig, path)


def plot_cka(rows: list[dict], path: Path, *, title: str) -> None:
    """CKA of the starting features against the fine-tuned ones per stage, and against a random network's (the
    control: what unrelated features score)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) + 2), 4.2))
    x = range(len(rows))
    ax.plot(x, [r["cka"] for r in rows], "o-", lw=1.8, label="start vs fine-tuned")
    ax.plot(x, [r["cka_control"] for r in rows], "s--", lw=1.2, color="grey", label="start vs random (control)")
    ax.set_xticks(x, [r["layer"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("linear CKA (1: the same features)")
    ax.set_xlabel("stage (input side on the left)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    save_figure(fig, path)


def plot_linear_probe(rows: list[dict], fine_tuned: float, path: Path, *, title: str) -> None:
    """A linear classifier on the starting network's frozen features at each stage, against the fine-tuned model."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) + 2), 4.2))
    ax.bar(range(len(rows)), [r["probe_acc"] for r in rows], color="darkseagreen", label="linear probe on the start")
    ax.axhline(fine_tuned, color="crimson", ls="--", lw=1.2, label=f"fine-tuned: {fine_tuned:.1f}%")
    ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy on the eval split (%)")
    ax.set_xlabel("stage the frozen features come from")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title)
    save_figure(fig, path)


def plot_reliability(before: list[dict], after: list[dict], path: Path, *, title: str) -> None:
    """Reliability diagrams before and after the temperature: each bin's accuracy against its mean confidence (on the
    diagonal: calibrated), bars as wide as the bin, with the images per bin written above."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    for ax, rows, label in ((axes[0], before, "before"), (axes[1], after, "after the temperature")):
        ax.plot([0, 1], [0, 100], color="gray", ls="--", lw=1, label="calibrated")
        ax.bar(
            [r["low"] for r in rows],
            [100 * r["accuracy"] for r in rows],
            width=[r["high"] - r["low"] for r in rows],
            align="edge",
            color="steelblue",
            edgecolor="white",
            label="accuracy in the bin",
        )
        ax.plot(
            [r["confidence"] for r in rows],
            [100 * r["accuracy"] for r in rows],
            "o",
            color="crimson",
            ms=4,
            label="at the bin's mean confidence",
        )
        for r in rows:
            ax.text(r["confidence"], 100 * r["accuracy"] + 2, str(r["images"]), ha="center", fontsize=6)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 105)
        ax.set_xlabel("confidence of the top class")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    save_figure(fig, path)


def plot_risk_coverage(curves: dict, path: Path, *, title: str) -> None:
    """One panel per split: the error among the answered images against the share answered, one line per score."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.8), sharey=True, squeeze=False)
    for ax, (split, by_score) in zip(axes[0], curves.items(), strict=True):
        for score, (coverage, risk, area) in by_score.items():
            ax.plot(coverage, 100 * risk, label=f"{score} (AURC {100 * area:.1f} %)")
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of images answered (coverage)")
        ax.set_title(split)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("error among the answered (%)")
    fig.suptitle(f"{title}: risk against coverage")
    save_figure(fig, path)


def plot_interpolation(rows: list[dict], path: Path, *, title: str) -> None:
    """Accuracy and expected calibration error against alpha, one line per split; dashed with BatchNorm statistics
    estimated again."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = list(dict.fromkeys((r["split"], r["batch_norm"]) for r in rows))
    colours = {split: f"C{i}" for i, split in enumerate(dict.fromkeys(r["split"] for r in rows))}
    for ax, measure, label in (
        (axes[0], "accuracy", "accuracy (%)"),
        (axes[1], "ece", "expected calibration error (%)"),
    ):
        for split, statistics in keys:
            points = [(r["alpha"], r[measure]) for r in rows if r["split"] == split and r["batch_norm"] == statistics]
            ax.plot(
                *zip(*points, strict=True),
                marker="o",
                color=colours[split],
                linestyle="--" if statistics == "recalibrated" else "-",
                label=split + (" (BatchNorm statistics estimated again)" if statistics == "recalibrated" else ""),
            )
        ax.set_xlabel("alpha: 0 = the start with a probe head, 1 = the fine-tuned network")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_data_curves(series: dict[str, list[tuple]], path: Path, *, all_at: float, title: str) -> None:
    """Test accuracy against training images per class (log axis), per method: the mean over seeds, and a band of
    one standard deviation. `series` maps a method to (shots, mean, sd) points; "all" is drawn at `all_at` images, 0
    (no labelled image) at half an image, the log axis's left end."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ticks = {}
    for i, (name, points) in enumerate(series.items()):
        xs = [all_at if shots == "all" else shots or 0.5 for shots, _, _ in points]
        means, sds = [m for _, m, _ in points], [s for _, _, s in points]
        ax.plot(xs, means, marker="o", color=f"C{i}", label=name)
        ax.fill_between(
            xs,
            [m - s for m, s in zip(means, sds, strict=True)],
            [m + s for m, s in zip(means, sds, strict=True)],
            color=f"C{i}",
            alpha=0.2,
        )
        # "all" a line lower: it can sit close to the largest count (19 beside 16)
        ticks.update(
            {
                x: f"\nall ({all_at:g})" if shots == "all" else str(shots)
                for x, (shots, _, _) in zip(xs, points, strict=True)
            }
        )
    ax.set_xscale("log")
    ax.set_xticks(list(ticks), list(ticks.values()))
    ax.minorticks_off()
    ax.set_xlabel("training images per class")
    ax.set_ylabel("test accuracy (%): mean over seeds, band ±1 sd")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside: the lines fill the plot
    save_figure(fig, path)
