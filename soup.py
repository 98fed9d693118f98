"""Model soups (Wortsman et al. 2022): average the weights of runs fine-tuned from one start.

    uv run soup.py runs/seed0 runs/seed1 runs/seed2 --out runs/soup    # then: uv run eval.py runs/soup

Scores every ingredient, a uniform soup of them all, and a greedy soup: the ingredients in order of validation
accuracy, each kept only if the soup's validation accuracy does not fall. The chosen soup (--recipe) is written as a
run folder (best.pt, config.toml) that eval.py, predict.py and export.py read, with soup.csv and report.md beside it.
At most two models' weights and one working copy are held: the running sum of the soup, one ingredient, the model.
"""

from cars.cli import check_command_line, parse_soup

check_command_line(__name__, parse_soup)  # --help and mistakes answer before the imports below load torch

from pathlib import Path

from cars.averaging import (
    accuracy_on,
    fine_tune_of,
    out_apart_from,
    recalibrate_batch_norm,
    scored_splits,
    training_images,
)
from cars.checkpoint import load_checkpoint, save_checkpoint
from cars.engine import Device
from cars.errors import UserError, run_cli
from cars.models import build_model
from cars.report import markdown_table, write_csv, write_json, write_text
from cars.runs import check_folder_free, prepare_folder
from cars.runtime import pick_device, worker_count


def main(argv=None) -> None:
    args = parse_soup(argv)
    runs = [Path(run) for run in args.runs]
    out = Path(args.out or "runs/soup")
    out_apart_from(out, runs)
    first, cfg = check_runs(runs)
    check_folder_free(out, args.overwrite, "soup folder", "--out")
    device = Device(pick_device(args.device))
    workers = worker_count(args.workers)
    scored, chooser = scored_splits(cfg)
    model = build_model(cfg.arch, "none", len(first["class_names"]), resolution=cfg.resolution).to(device.type).eval()
    train_images = training_images(cfg, cache=args.cache, batch_size=args.batch_size, workers=workers, device=device)

    def score(state: dict, recalibrate: bool) -> dict:
        """The accuracy of a state dict on every scored split, in the working model."""
        model.load_state_dict(state)
        if recalibrate and args.recalibrate_bn:
            recalibrate_batch_norm(model, train_images, device)
        common = dict(
            resolution=cfg.resolution,
            interpolation=cfg.interpolation,
            cache=args.cache,
            batch_size=args.batch_size,
            workers=workers,
        )
        return {name: accuracy_on(model, split, **common, device=device) for name, split in scored.items()}

    prepare_folder(out, args.overwrite, "soup folder", "--out")
    write_csv(out / "soup.csv", [], ["model", "val_acc", "test_acc", "in_soup"])  # first: marks the folder as a soup's
    rows = []
    for run in runs:
        rows.append(dict(model=str(run), **score(load_checkpoint(run / "best.pt")["model"], False)))
        print(f"{run}: {scores_words(rows[-1])}")
    order = sorted(range(len(runs)), key=lambda i: -rows[i][chooser])  # best first; ties keep the given order

    total = None  # the running sum of the uniform soup's ingredients
    for run in runs:
        total = add(total, load_checkpoint(run / "best.pt")["model"])
    uniform = divided(total, len(runs))
    uniform_scores = score(uniform, True)

    kept, greedy_total, greedy_scores = [], None, None
    for i in order:
        candidate_total = add(greedy_total, load_checkpoint(runs[i] / "best.pt")["model"])
        candidate = score(divided(candidate_total, len(kept) + 1), True)
        if greedy_scores is None or candidate[chooser] >= greedy_scores[chooser]:
            kept.append(i)
            greedy_total, greedy_scores = candidate_total, candidate
    greedy = divided(greedy_total, len(kept))
    for i, row in enumerate(rows):
        row["in_soup"] = "uniform, greedy" if i in kept else "uniform"
    rows += [
        dict(model="uniform soup", **uniform_scores, in_soup=runs_words(len(runs))),
        dict(model="greedy soup", **greedy_scores, in_soup=runs_words(len(kept))),
    ]
    chosen = greedy if args.recipe == "greedy" else uniform
    if args.recalibrate_bn:  # the statistics estimated again, as scored
        model.load_state_dict(chosen)
        recalibrate_batch_norm(model, train_images, device)
        chosen = {k: v.cpu() for k, v in model.state_dict().items()}
    table = [
        dict(model=row["model"], val_acc=row.get("val", ""), test_acc=row["test"], in_soup=row["in_soup"])
        for row in rows
    ]
    write_csv(out / "soup.csv", table, ["model", "val_acc", "test_acc", "in_soup"])
    save_checkpoint(
        out / "best.pt",
        {
            **{k: v for k, v in first.items() if k not in ("start_head", "probe_head")},
            "model": chosen,
            "soup": args.recipe,
        },
    )
    cfg.save(out / "config.toml")
    write_report(out, rows, chooser=chooser, recipe=args.recipe, recalibrated=args.recalibrate_bn)
    summary = {"recipe": args.recipe, "runs": [str(r) for r in runs], "greedy_kept": [str(runs[i]) for i in kept]}
    write_json(out / "summary.json", summary)
    print(f"\nwrote best.pt ({args.recipe} soup), config.toml, soup.csv, report.md in {out}")
    print(f"next: uv run eval.py {out}")


def check_runs(runs: list[Path]) -> tuple[dict, object]:
    """Every run a finished fine-tune (finite weights), all of one architecture and class list, fine-tuned from one
    recorded start, their epochs chosen on one split. Returns the first run's best.pt (without its weights) and
    config."""
    checkpoints, configs = [], []
    for run in runs:
        cfg, checkpoint = fine_tune_of(run)
        configs.append(cfg)
        # what the checks read: the weights of every run are not held at once
        checkpoints.append({k: v for k, v in checkpoint.items() if k != "model"})
    for run, cfg, checkpoint in zip(runs, configs, checkpoints, strict=True):
        if cfg.arch != configs[0].arch or checkpoint.get("class_names") != checkpoints[0].get("class_names"):
            raise UserError(
                f"{run} is a {cfg.arch} for {len(checkpoint.get('class_names') or [])} classes, {runs[0]} a "
                f"{configs[0].arch} for {len(checkpoints[0].get('class_names') or [])}: a soup averages one network"
            )
        fingerprint = checkpoint.get("start_fingerprint")
        if not fingerprint:
            raise UserError(
                f"{run} does not record a pretrained start (trained from random weights, or by an older version): "
                "a soup averages fine-tunes of one start"
            )
        if fingerprint != checkpoints[0].get("start_fingerprint"):
            raise UserError(
                f"{run} started from other weights than {runs[0]} (fingerprints {fingerprint} and "
                f"{checkpoints[0]['start_fingerprint']}): a soup averages fine-tunes of one start"
            )
        if cfg.held_out != configs[0].held_out:
            raise UserError(
                f"{run} chose its epoch on {split_words(cfg)}, {runs[0]} on {split_words(configs[0])}: the greedy soup "
                "would be chosen on images some ingredients trained on, and its test accuracy would not be clean; "
                "soup runs that held out one split (the same --data, --val-split and --split-seed)"
            )
    return checkpoints[0], configs[0]


def split_words(cfg) -> str:
    """The split a run chose its epoch on, in words: two runs with the same words held out the same images."""
    if not cfg.val_split:
        return f"the test split of {cfg.data} (no validation split)"
    return f"a validation split of {cfg.data} (--val-split {cfg.val_split:g}, --split-seed {cfg.split_seed})"


def add(total: dict | None, state: dict) -> dict:
    """A running sum of state dicts (integer buffers: the first one's)."""
    if total is None:
        return {k: v.clone() for k, v in state.items()}
    return {k: v + state[k] if v.is_floating_point() else v for k, v in total.items()}


def divided(total: dict, count: int) -> dict:
    """The running sum into the average; a sum of one is returned as it is, bit for bit."""
    return {k: v / count if v.is_floating_point() and count > 1 else v for k, v in total.items()}


def runs_words(count: int) -> str:
    return f"{count} run" + ("s" if count != 1 else "")


def scores_words(row: dict) -> str:
    return ", ".join(f"{name} {row[name]:.2f}%" for name in ("val", "test") if name in row)


def write_report(out: Path, rows: list[dict], *, chooser: str, recipe: str, recalibrated: bool) -> None:
    ingredients, uniform, greedy = rows[:-2], rows[-2], rows[-1]
    best = max(ingredients, key=lambda r: r[chooser])
    statistics = (
        "BatchNorm statistics estimated again on the training images"
        if recalibrated
        else "BatchNorm statistics averaged"
    )
    lines = [
        f"# A model soup of {len(ingredients)} runs",
        f"The soups average the runs' weights ({statistics}). "
        f"The greedy soup adds the runs best first on the {chooser} split and keeps each only if that accuracy does "
        f"not fall; best.pt holds the {recipe} soup.",
        f"The best single run scores {best['test']:.2f}% on the test split; the uniform soup {uniform['test']:.2f}% "
        f"({uniform['test'] - best['test']:+.2f}), the greedy soup {greedy['test']:.2f}% "
        f"({greedy['test'] - best['test']:+.2f}).",
    ]
    if chooser == "test":
        lines.append(
            "The runs have no validation split, so the greedy soup chose on the test split: its test accuracy is "
            "optimistic. Train with --val-split to choose on validation."
        )
    header = ["model", *(["validation"] if chooser == "val" else []), "test", "in the soups"]
    table = [
        [row["model"], *([f"{row['val']:.2f}%"] if chooser == "val" else []), f"{row['test']:.2f}%", row["in_soup"]]
        for row in rows
    ]
    lines.append(markdown_table(header, table))
    write_text(out / "report.md", "\n\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[1:]))


if __name__ == "__main__":
    run_cli(main)
