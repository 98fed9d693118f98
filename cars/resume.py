"""Starting or resuming a run: its config, its folder, and with --resume the checkpoint it goes on from.
Every rule here is checked before the run folder is touched, so a refused run changes nothing."""

import dataclasses
import os
from pathlib import Path

from cars import config as config_module
from cars.checkpoint import load_checkpoint
from cars.errors import UserError
from cars.runs import best_row, check_folder_free, read_summary, run_status

# the only flags that may come with --resume: none of them changes the recipe (in the order the refusal names them)
RESUMABLE_FLAGS = (
    "epochs",
    "workers",
    "device",
    "save_every_steps",
    "cache",
    "eval_every",
    "early_stop",
    "log_every_steps",
    "amp",
    "compile",
    "channels_last",
)


def resolve_run(args) -> tuple[config_module.Config, str, Path, dict | None]:
    """The config, preset name, run folder, and (with --resume) the checkpoint to continue from."""
    if not args.resume:
        cfg, preset = config_module.resolve(args)
        run_dir = Path(cfg.run_dir or f"runs/{preset}")
        check_folder_free(run_dir, args.overwrite)  # fail before any slow work
        return dataclasses.replace(cfg, run_dir=str(run_dir)), preset, run_dir, None
    run_dir = Path(args.resume)
    if not (run_dir / "last.pt").is_file() or not (run_dir / "config.toml").is_file():
        raise UserError(
            f"{run_dir} has no last.pt and config.toml to resume from; give the run folder of an interrupted run"
        )
    if args.config or args.overwrite:
        raise UserError("--resume continues a run with its own config.toml; drop --config and --overwrite")
    summary = read_summary(run_dir)
    if run_status(summary) == "running":  # two writers would leave the run inconsistent
        raise UserError(
            f"{run_dir} is still being trained by process {summary['pid']} on {summary['host']}; "
            f"wait for it to end or stop it (kill {summary['pid']}), then resume"
        )
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"cannot write {run_dir}: permission denied; resume where you may write (copy the run folder)")
    saved = config_module.load_saved(run_dir / "config.toml")
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(saved)}}
    changed = sorted(k for k, v in given.items() if k not in RESUMABLE_FLAGS and v != getattr(saved, k))
    if changed:
        flags = ", ".join("--" + config_module.flag(k) for k in changed)
        allowed = ", ".join("--" + config_module.flag(k) for k in RESUMABLE_FLAGS)
        raise UserError(
            f"{flags} would change the recipe of {run_dir}; --resume only takes {allowed} (--epochs to extend). "
            "Start a new run (--run-dir) to change the recipe"
        )
    cfg = dataclasses.replace(saved, **{k: given[k] for k in set(RESUMABLE_FLAGS) & set(given)}).validate()
    if cfg.scheduler == "cosine" and cfg.epochs != saved.epochs:  # the step schedule does not depend on the length
        raise UserError(
            f"--epochs {cfg.epochs} would change the cosine schedule of {run_dir}, which is laid over its "
            f"{saved.epochs} epochs: the lr would jump. To train on, start a new run from its weights: "
            f"--weights {run_dir / 'last.pt'} --run-dir NEW_RUN"
        )
    checkpoint = load_checkpoint(run_dir / "last.pt")
    check_best_matches_history(run_dir, checkpoint)
    if checkpoint.get("epoch", 0) >= cfg.epochs:
        raise UserError(
            f"{run_dir} already trained {checkpoint['epoch']} of {cfg.epochs} epochs; pass --epochs N to extend it"
        )
    return cfg, run_dir.name, run_dir, checkpoint


def check_best_matches_history(run_dir: Path, checkpoint: dict) -> None:
    """best.pt must hold the best epoch of last.pt's history, or an epoch after last.pt (written just before an
    interruption, and trained again on resume). Anything else would make summary.json and compare.py name one model
    while eval, export and the app use another."""
    best = best_row(checkpoint.get("history") or [])
    best_epoch = load_checkpoint(run_dir / "best.pt").get("epoch") if (run_dir / "best.pt").is_file() else None
    if best is None or best_epoch == best["epoch"] or (best_epoch or 0) > checkpoint.get("epoch", 0):
        return
    raise UserError(
        f"{run_dir / 'best.pt'} holds epoch {best_epoch} but the run's records name epoch {int(best['epoch'])} "
        "as the best (an older version could be interrupted between the two files); its best weights are lost. "
        f"Start a new run from its last weights instead: --weights {run_dir / 'last.pt'} --run-dir NEW_RUN"
    )


def check_same_classes(checkpoint: dict, class_names: list[str], *, data: str, run_dir: Path) -> None:
    """A resumed run goes on with the classes it was trained on."""
    if checkpoint.get("class_names") != class_names:
        raise UserError(
            f"the classes of {data} changed since {run_dir} was trained "
            f"({len(checkpoint.get('class_names') or [])} then, {len(class_names)} now); "
            "resume on the same dataset, or start a new run"
        )


def resumed_step(checkpoint: dict, steps_per_epoch: int) -> int:
    """The global step a checkpoint stands at: its epochs, and the steps of a mid-epoch checkpoint."""
    return checkpoint["epoch"] * steps_per_epoch + ((checkpoint.get("progress") or {}).get("steps") or 0)
