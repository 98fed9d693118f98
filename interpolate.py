"""What lies between the start and the fine-tune: the accuracy along the straight line in weight space from the
network a run started from to the network it became (WiSE-FT, Wortsman et al. 2022).

    uv run interpolate.py runs/demo                    # alpha = 0, 0.1, ..., 1: eval split(s), corrupted copies
    uv run interpolate.py runs/demo --recalibrate-bn   # each point also with BatchNorm statistics estimated again
    uv run interpolate.py runs/demo --save-alpha 0.5   # that model as a run folder for eval, predict and export

theta(alpha) = (1 - alpha) theta_start + alpha theta_fine-tuned. The start's own head cannot name the new classes, so
the alpha = 0 end is the start's backbone with a linear-probe head: the run's own with --probe-init (LP-FT), else one
fitted here on the run's training images. Writes interpolation.csv, interpolation.png and report.md.
"""

from cars.cli import check_command_line, parse_interpolate

check_command_line(__name__, parse_interpolate)  # --help and mistakes answer before the imports below load torch

import dataclasses
from pathlib import Path

import torch

from cars import calibration, finetune, transfer
from cars.analysis import topk_accuracy
from cars.averaging import (
    fine_tune_of,
    interpolated,
    logits_on,
    out_apart_from,
    recalibrate_batch_norm,
    scored_splits,
    training_images,
)
from cars.checkpoint import save_checkpoint
from cars.data import corruption_splits, dataset_location, label_map, load_splits, open_hub_dataset
from cars.engine import Device
from cars.errors import UserError, run_cli
from cars.models import build_model
from cars.report import markdown_table, plot_interpolation, write_csv, write_json, write_text
from cars.runs import check_folder_free, check_writable, prepare_folder
from cars.runtime import pick_device, worker_count


@dataclasses.dataclass
class Line:
    """Everything the interpolation needs, checked before anything is written."""

    run: Path
    cfg: object
    start_state: dict  # the start's backbone with a probe head
    tuned_state: dict  # the run's best.pt's weights
    tuned_record: dict  # the rest of its best.pt (config, class names, fingerprint): what a saved point keeps
    probe_source: str  # where the alpha = 0 end's head comes from, in words
    model: torch.nn.Module  # the working copy every point is loaded into
    splits: dict  # name -> split, the ones each point is evaluated on
    chooser: str  # the split the best alpha is chosen on
    to_model: torch.Tensor | None  # dataset label -> model class, when the dataset orders its classes otherwise
    train_images: object  # the run's training images as evaluated, for a probe and BatchNorm statistics
    device: Device


def main(argv=None) -> None:
    args = parse_interpolate(argv)
    run = Path(args.run)
    out = Path(args.out or run / "interpolate")
    out_apart_from(out, [run])
    check_folder_free(out, args.overwrite, "interpolate folder", "--out")  # before the slow probe fit
    check_writable(out)
    line = prepare(args)
    prepare_folder(out, args.overwrite, "interpolate folder", "--out")
    columns = ["alpha", "batch_norm", "split", "accuracy", "ece"]
    write_csv(out / "interpolation.csv", [], columns)  # first: a crash part way leaves a folder --overwrite replaces
    modes = ["interpolated", "recalibrated"] if args.recalibrate_bn else ["interpolated"]
    rows = []
    for statistics in modes:
        for alpha in args.alphas:
            line.model.load_state_dict(interpolated(line.start_state, line.tuned_state, alpha))
            if statistics == "recalibrated":
                recalibrate_batch_norm(line.model, line.train_images, line.device)
            for name, split in line.splits.items():
                accuracy, ece = evaluate(line, split, args)
                rows.append(dict(alpha=alpha, batch_norm=statistics, split=name, accuracy=accuracy, ece=ece))
                print(f"alpha {alpha:.2f} ({statistics} BatchNorm statistics) {name}: {accuracy:.2f}%, ECE {ece:.1f} %")
    write_csv(out / "interpolation.csv", rows, columns)
    plot_interpolation(rows, out / "interpolation.png", title=f"{line.cfg.arch}: start (0) to fine-tuned (1)")
    summary = write_report(line, rows, out)
    written = ["interpolation.csv", "interpolation.png", "report.md", "summary.json"]
    if args.save_alpha is not None:
        save_model_at(line, args.save_alpha, out / "model")
        summary["saved_alpha"] = args.save_alpha
        written.append("model/ (best.pt, config.toml)")
    write_json(out / "summary.json", summary)
    print(f"\nwrote {', '.join(written)} in {out}")
    print(
        f"next: read {out / 'report.md'}"
        + (f", or uv run eval.py {out / 'model'}" if args.save_alpha is not None else "")
    )


def prepare(args) -> Line:
    """The run, its start and the probe head, its splits: every check before the output folder is touched."""
    run = Path(args.run)
    cfg, checkpoint = fine_tune_of(run)
    if cfg.weights.lower() == "none":
        raise UserError(f"{run} started from random weights (--weights none): there is no start to interpolate from")
    class_names = checkpoint["class_names"]
    start = transfer.starting_network(cfg.arch, cfg.weights, len(class_names), resolution=cfg.resolution)
    recorded = checkpoint.get("start_fingerprint")
    if recorded and start.fingerprint != recorded:
        raise UserError(
            f"the {cfg.weights} weights on this machine are not the ones {run} started from (fingerprint "
            f"{start.fingerprint} here, {recorded} in the run); put the run's starting weights back"
        )
    device = Device(pick_device(args.device), show_progress=True)
    workers = worker_count(args.workers)
    train_images = training_images(cfg, cache=args.cache, batch_size=args.batch_size, workers=workers, device=device)
    start_model = start.model.to(device.type)
    # the head the run's method wrote before training (LP-FT's probe, a zero-shot or prototypes head); "probe_head"
    # in the runs made before there were other kinds
    own = checkpoint.get("start_head") or checkpoint.get("probe_head")
    if own:
        kind = own.get("kind", "LP-FT")
        head, probe_source = (
            own,
            (
                "the run's own linear-probe head (it was trained with LP-FT)"
                if kind == "LP-FT"
                else f"the run's own {kind} (the head its fine-tune started from)"
            ),
        )
    else:
        probe = finetune.fit_probe_head(start_model, train_images, device, len(class_names))
        head = dict(weight=probe.weight, bias=probe.bias)
        probe_source = (
            f"a linear-probe head fitted here on the start's features of {probe.images} training images "
            f"({probe.train_accuracy:.1f}% of them right)"
        )
    finetune.set_head(start_model, head["weight"], head["bias"])
    chosen, chooser = scored_splits(cfg)
    class_order = load_splits(cfg.data).class_names
    try:
        corrupted = corruption_splits(cfg.data)
    except UserError as error:  # a hub id offline: the clean splits are in the hub's cache, the listing is not
        print(f"note: no corrupted copies: {error}")
        corrupted = []
    if corrupted:
        copies = open_hub_dataset(dataset_location(cfg.data), cfg.data, splits=corrupted)[:-1]
        chosen.update(zip(corrupted, copies, strict=True))
    model = build_model(cfg.arch, "none", len(class_names), resolution=cfg.resolution).to(device.type).eval()
    return Line(
        run=run,
        cfg=cfg,
        start_state={k: v.to(device.type) for k, v in start_model.state_dict().items()},
        tuned_state={k: v.to(device.type) for k, v in checkpoint["model"].items()},
        tuned_record={k: v for k, v in checkpoint.items() if k != "model"},
        probe_source=probe_source,
        model=model,
        splits=chosen,
        chooser=chooser,
        to_model=label_map(class_names, class_order, cfg.data),
        train_images=train_images,
        device=device,
    )


def evaluate(line: Line, split, args) -> tuple[float, float]:
    """The accuracy and the expected calibration error (before a temperature) of the model at a point of the line."""
    logits, labels = logits_on(
        line.model,
        split,
        resolution=line.cfg.resolution,
        interpolation=line.cfg.interpolation,
        cache=args.cache,
        batch_size=args.batch_size,
        workers=worker_count(args.workers),
        device=line.device,
        to_model=line.to_model,
    )
    return topk_accuracy(logits, labels, 1), calibration.scores(logits, labels)["ece"]


def write_report(line: Line, rows: list[dict], out: Path) -> dict:
    """report.md: the best alpha on the chooser split, and what it gains over the fine-tune on clean and shifted
    data. Returns the summary."""
    modes = list(dict.fromkeys(r["batch_norm"] for r in rows))
    at = {(r["alpha"], r["batch_norm"], r["split"]): r["accuracy"] for r in rows}
    alphas = sorted({r["alpha"] for r in rows})
    shifted = [s for s in line.splits if s not in ("val", "test")]
    summary = {"probe_head": line.probe_source, "chosen_on": line.chooser, "best": {}}
    lines = [
        f"# Between the start and the fine-tune: `{line.run}`",
        f"theta(alpha) = (1 - alpha) theta_start + alpha theta_fine-tuned, for alpha in "
        f"{', '.join(f'{a:g}' for a in alphas)}: {line.cfg.arch} from `{line.cfg.weights}`. The alpha = 0 end is the "
        f"start's backbone with {line.probe_source}. Accuracy per point: [interpolation.csv](interpolation.csv).",
        "![accuracy along the line](interpolation.png)",
    ]
    for mode in modes:
        best = max(alphas, key=lambda a: (at[a, mode, line.chooser], a))  # a tie goes to the fine-tune's side
        gains = {
            split: at[best, mode, split] - at[1.0, mode, split] for split in line.splits if (1.0, mode, split) in at
        }
        summary["best"][mode] = {"alpha": best, "accuracy": {s: at[best, mode, s] for s in line.splits}}
        clean = gains.get("test")
        said = (
            f"With {mode} BatchNorm statistics, the best point on the {line.chooser} split is alpha = {best:g}"
            + (" (the fine-tune itself)" if best == 1.0 else "")
            + (f": {clean:+.2f} points on the test split against alpha = 1" if clean is not None else "")
        )
        if shifted and all((1.0, mode, s) in at for s in shifted):
            mean_gain = sum(gains[s] for s in shifted) / len(shifted)
            said += f", {mean_gain:+.2f} on the corrupted copies on average"
        lines.append(said + ".")
    if line.chooser == "test":
        lines.append(
            "The run has no validation split, so the best alpha is chosen on the test split: its gain is an "
            "optimistic estimate. Train with --val-split to choose on validation."
        )
    header = ["alpha", *[f"{split} ({mode})" for mode in modes for split in line.splits]]
    table = [[f"{a:g}", *[f"{at[a, mode, split]:.2f}%" for mode in modes for split in line.splits]] for a in alphas]
    lines.append(markdown_table(header, table))
    # WiSE-FT's other claim: the points between the ends are better calibrated, under shift too
    ece = {(r["alpha"], r["batch_norm"], r["split"]): r["ece"] for r in rows}
    lines.append(
        "Expected calibration error (%, 15 bins, before a temperature) along the line; lower is better:\n\n"
        + markdown_table(
            header,
            [[f"{a:g}", *[f"{ece[a, mode, split]:.1f}" for mode in modes for split in line.splits]] for a in alphas],
        )
    )
    summary["ece"] = {f"{a:g}": {s: ece[a, modes[0], s] for s in line.splits} for a in alphas}
    write_text(out / "report.md", "\n\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[3:-2]))
    return summary


def save_model_at(line: Line, alpha: float, folder: Path) -> None:
    """The model at `alpha` (interpolated statistics) as a run folder's best.pt and config.toml."""
    folder.mkdir()
    state = {k: v.cpu() for k, v in interpolated(line.start_state, line.tuned_state, alpha).items()}
    save_checkpoint(folder / "best.pt", {**line.tuned_record, "model": state, "interpolated_alpha": alpha})
    line.cfg.save(folder / "config.toml")


if __name__ == "__main__":
    run_cli(main)
