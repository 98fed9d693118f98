"""sweep.py: find the recipe instead of guessing it. An Optuna study over a sweep file's search space; every trial is
an ordinary train.py run, chosen on a validation split and pruned on its epochs' accuracy.

    uv run sweep.py --config configs/sweeps/demo.toml             # one machine: the study in runs/sweeps/demo/study.db
    uv run sweep.py --config configs/sweeps/demo.toml --refit     # the best trial's recipe on all of train, test once
    uv run sweep.py --config configs/sweeps/r50_224.toml --storage postgresql://user:pw@db-host/sweeps   # per worker

`main` opens the study, then `search` runs trials until the study has --trials of them (over all workers), or
`refit` retrains the best one. `objective` is one trial: the sweep's config with the trial's parameters, trained by
train.py's own `main`.
"""

from cars.cli import check_command_line, parse_sweep

check_command_line(__name__, parse_sweep)  # --help and mistakes answer before the imports below load torch

import json
import signal
import sys
import warnings
from pathlib import Path

import optuna

import train
from cars import sweeps
from cars.config import config_flags
from cars.errors import UserError, run_cli
from cars.report import best_row, markdown_table, read_metrics, write_text
from cars.runs import read_summary


class OverCap(Exception):
    """A trial started after the study had its --trials: it is not run (two workers asked at the same moment)."""


def main(argv=None) -> None:
    args = parse_sweep(argv)
    sweep = sweeps.load_sweep(args.config, args.trials)
    out = Path(args.out or f"runs/sweeps/{sweep.name}")
    if not args.storage:  # the default study lives in the sweep folder
        out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study = open_study(sweep, storage, args.heartbeat)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, train.raise_interrupt)  # a scheduler's stop (or a preemption) ends a worker as Ctrl-C
    if args.refit:
        refit(study, sweep, out, overwrite=args.overwrite)
    else:
        search(study, sweep, out, storage=storage, heartbeat=args.heartbeat)


def open_study(sweep: sweeps.Sweep, storage: str, heartbeat: int):
    """The study named after the sweep, made by the first worker and joined by the others; a worker whose sweep file
    says something else than the study's first is refused."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # train.py's log says what each trial does
    # heartbeats and their retries are marked experimental in Optuna 5; they are what keeps a study going
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = optuna.create_study(
        study_name=sweep.name,
        storage=sweeps.open_storage(storage, heartbeat),
        direction="maximize",
        pruner=sweeps.make_pruner(sweep.pruner, sweep.epochs),
        load_if_exists=True,
    )
    recipe = json.dumps(
        {"base": sweep.base.name, "fixed": sweep.fixed, "space": [vars(p) for p in sweep.space]}, sort_keys=True
    )
    known = study.user_attrs.get("recipe")
    if known is None:
        study.set_user_attr("recipe", recipe)
    elif known != recipe:
        raise UserError(
            f"the study {sweep.name!r} in {sweeps.shown(storage)} was made from another sweep file (another base, "
            "[fixed] or [space]); give this one another name or --storage"
        )
    return study


def search(study, sweep: sweeps.Sweep, out: Path, *, storage: str, heartbeat: int) -> None:
    """Trials, one after the other, until the study has --trials finished ones. With a database, a trial of another
    worker that is still running is waited for: if that worker died, its trial goes stale and runs again here."""
    print(
        f"sweep {sweep.name}: {sweep.trials} trials in all, in {sweeps.shown(storage)}; searching "
        + "; ".join(p.describe() for p in sweep.space)
    )
    ran = []
    try:
        while len(sweeps.finished_trials(study)) < sweep.trials:
            sweeps.fail_stopped_trials(study)
            counted = study.get_trials(deepcopy=False, states=sweeps.counted_states())
            queued = any(t.state == optuna.trial.TrialState.WAITING for t in counted)
            if len(counted) >= sweep.trials and not queued:
                if not sweeps.has_heartbeats(study):
                    break  # a journal file: the other workers finish their own trials
                sweeps.wait_for_others(study, heartbeat)
                continue
            study.optimize(lambda trial: objective(trial, study, sweep, out, ran), n_trials=1, catch=(OverCap,))
    except KeyboardInterrupt:
        sweeps.write_study_files(study, out)
        print(
            f"stopped; this worker ran trials {ran or 'none'} to the end. Its unfinished trial runs again when the "
            f"study goes on: uv run sweep.py --config {sweep.path} (with the same --storage)"
        )
        sys.exit(130)
    pictures = sweeps.write_study_files(study, out)
    finished = len(sweeps.finished_trials(study))
    if finished < sweep.trials:
        print(f"{finished} of {sweep.trials} trials are finished; the rest are running in other workers")
        return
    best = study.best_trial
    print(
        f"the study has its {sweep.trials} trials (this worker ran {ran or 'none'}). Best: trial {best.number}, "
        f"validation accuracy {best.value:.2f}%, {format_params(best.params)}\n"
        f"files: {out / 'trials.csv'}, {', '.join(str(out / p) for p in pictures)}\n"
        f"next: uv run sweep.py --config {sweep.path} --refit"
    )


def objective(trial, study, sweep: sweeps.Sweep, out: Path, ran: list) -> float:
    """One trial: train.py on the sweep's config with this trial's parameters, in runs/sweeps/<name>/trial-<k>/.
    Returns its best validation accuracy."""
    if not sweeps.has_slot(study, trial, sweep.trials):
        trial.set_user_attr("note", f"not run: the study had its {sweep.trials} trials")
        raise OverCap
    params = {p.name: p.suggest(trial) for p in sweep.space}
    run_dir = out / f"trial-{trial.number}"
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", sweeps.worker_name())
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    if retried is not None:
        trial.set_user_attr("note", f"runs trial {retried} again: its worker stopped")
    flags = config_flags(
        {
            **sweep.fixed,
            **params,
            "run_dir": str(run_dir),
            "sweep": str(out),
            "trial": trial.number,
            "final_test": False,
        }
    )

    def report(epoch: int, accuracy: float) -> bool:
        trial.report(accuracy, epoch)
        return trial.should_prune()

    print(f"\ntrial {trial.number}: {format_params(params)}")
    try:
        train.main(["--config", str(sweep.base), *flags], after_evaluation=report)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C or SIGTERM (train.py's answer to them in training is exit 130)
        study.enqueue_trial(params, user_attrs={"note": f"runs trial {trial.number} again: it was interrupted"})
        raise KeyboardInterrupt from None
    except UserError:
        if read_summary(run_dir).get("status") != "diverged":
            raise
        trial.set_user_attr("note", "diverged")  # an answer about this region of the space, not a fault
        ran.append(trial.number)
        best = best_row(read_metrics(run_dir / "metrics.csv")) if (run_dir / "metrics.csv").exists() else None
        return best["eval_acc"] if best else 0.0
    ran.append(trial.number)
    summary = read_summary(run_dir)
    if summary["status"] == "pruned":
        raise optuna.TrialPruned(f"pruned after epoch {summary['epochs_done']}")
    return summary["best_eval_acc"]


def refit(study, sweep: sweeps.Sweep, out: Path, *, overwrite: bool) -> None:
    """The best trial's config trained on the whole training split for the same epochs, with no validation split,
    evaluated on the test split once at the end; result.md says what was chosen on validation and what test gave."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise UserError(
            f"the study {sweep.name!r} has no finished trial yet; run the search first: uv run sweep.py "
            f"--config {sweep.path}"
        )
    best = study.best_trial
    run_dir = out / "refit"
    values = {**sweep.fixed, **best.params, "val_split": 0.0}
    values.pop("split_seed", None)
    epochs = sweep.epochs
    # evaluated once, after the last epoch: every earlier evaluation would be a look at the test split
    values.update(eval_every=epochs, early_stop=0, run_dir=str(run_dir), sweep=str(out), trial=best.number)
    command = ["--config", str(sweep.base), *config_flags(values)] + (["--overwrite"] if overwrite else [])
    print(f"refit of trial {best.number} ({format_params(best.params)}) on the whole training split, {epochs} epochs")
    train.main(command)
    summary = read_summary(run_dir)
    test_acc = summary["final_eval_acc"]
    rows = [[p, f"{v:.4g}" if isinstance(v, float) else v] for p, v in best.params.items()]
    write_text(
        out / "result.md",
        "\n\n".join(
            [
                f"# Sweep `{sweep.name}`: the result",
                f"{len(done)} trials finished ({len(sweeps.finished_trials(study)) - len(done)} more were pruned), "
                f"each trained on the training split less its validation part (val_split "
                f"{sweep.trial_values({})['val_split']}) from `{sweep.base.name}` with the sweep's [fixed] values.",
                f"**Best configuration** (trial {best.number}, chosen on validation only):",
                markdown_table(["parameter", "value"], rows),
                f"Its validation accuracy: **{best.value:.2f}%**.",
                f"Retrained with it on the whole training split for {epochs} epochs, with no validation split, and "
                f"evaluated once on the test split: **test accuracy {test_acc:.2f}%** (run folder `{run_dir}`).",
                "The test split was read for this number only: no trial saw it, and nothing was chosen on it.",
                "To reproduce the refit: `uv run train.py " + " ".join(command) + "`",
            ]
        )
        + "\n",
    )
    print(
        f"validation {best.value:.2f}% (trial {best.number}) -> test {test_acc:.2f}% after the refit; "
        f"{out / 'result.md'}"
    )


def format_params(params: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


if __name__ == "__main__":
    run_cli(main)
