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

import os
import signal
import sys
from pathlib import Path

import optuna
import torch

import train
from cars import sweeps
from cars.config import config_flags
from cars.errors import UserError, run_cli
from cars.report import markdown_table, write_text
from cars.run_state import raise_interrupt
from cars.runs import read_summary


class OverCap(Exception):
    """A trial started after the study had its --trials: it is not run (two workers asked at the same moment)."""


class TrialCrashed(Exception):
    """A trial that failed for a reason of its own (out of memory, say): it is marked failed and the worker goes on."""


CRASHES_IN_A_ROW = 3  # a worker whose trials keep failing stops: the fault is not the trials'


def main(argv=None) -> None:
    args = parse_sweep(argv)
    sweep = sweeps.load_sweep(args.config, args.trials)
    out = Path(args.out or f"runs/sweeps/{sweep.name}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the sweep's trials and files")
    if args.refit and not args.storage and not (out / "study.db").is_file():
        raise UserError(f"{out} holds no study to refit; run the search first: uv run sweep.py --config {args.config}")
    if not args.storage:  # the default study lives in the sweep folder
        out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study = open_study(sweep, storage, args.heartbeat, out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, raise_interrupt)  # a scheduler's stop (or a preemption) ends a worker as Ctrl-C
    if args.refit:
        refit(study, sweep, out, overwrite=args.overwrite)
    else:
        search(study, sweep, out, storage=storage, heartbeat=args.heartbeat)


def open_study(sweep: sweeps.Sweep, storage: str, heartbeat: int, out: Path):
    """The study named after the sweep, made by the first worker and joined by the others. A worker whose resolved
    recipe (the base preset's values, [fixed], the pruner, the space) differs from the study's is refused, and so is a
    new study over a folder that holds an earlier study's trials."""
    sweeps.quiet_optuna()
    study = optuna.create_study(
        study_name=sweep.name,
        storage=sweeps.open_storage(storage, heartbeat),
        direction="maximize",
        # parallel workers: a running trial counts as a poor result, so that TPE does not propose its neighbours
        sampler=optuna.samplers.TPESampler(constant_liar=True),
        pruner=sweeps.make_pruner(sweep.pruner, sweep.epochs),
        load_if_exists=True,
    )
    sweeps.claim_study(
        study,
        sweep.fingerprint(),
        labels={"recipe": "the trials' recipe", "pruner": "the pruner", "space": "the space"},
        storage=storage,
        earlier=sorted(p.name for p in out.glob("trial-*")),
        out=out,
        rename="Give this sweep another name (its file name) or another --storage",
    )
    return study


def search(study, sweep: sweeps.Sweep, out: Path, *, storage: str, heartbeat: int) -> None:
    """Trials, one after the other, until the study has --trials finished ones. With a database, a trial of another
    worker that is still running is waited for: if that worker died, its trial goes stale and runs again here."""
    print(
        f"sweep {sweep.name}: {sweep.trials} trials in all, in {sweeps.shown(storage)}; searching "
        + "; ".join(p.describe() for p in sweep.space)
    )
    ran, crashes = [], []
    try:
        while len(sweeps.finished_trials(study)) < sweep.trials:
            if len(crashes) >= CRASHES_IN_A_ROW:
                raise UserError(
                    f"{CRASHES_IN_A_ROW} trials in a row failed on this worker (the last: {crashes[-1]}); see their "
                    f"train.log in {out}, fix the cause and run the worker again"
                )
            sweeps.fail_stopped_trials(study)
            counted = study.get_trials(deepcopy=False, states=sweeps.counted_states())
            queued = any(t.state == optuna.trial.TrialState.WAITING for t in counted)
            if len(counted) >= sweep.trials and not queued:
                if not sweeps.has_heartbeats(study):
                    break  # a journal file: the other workers finish their own trials
                sweeps.wait_for_others(study, heartbeat)
                continue
            study.optimize(
                lambda trial: objective(trial, study=study, sweep=sweep, out=out, ran=ran, crashes=crashes),
                n_trials=1,
                catch=(OverCap, TrialCrashed),
            )
    except sweeps.storage_errors() as error:
        detail = str(getattr(error, "orig", None) or error).strip().splitlines()[0][:200]
        raise UserError(
            f"the study's storage {sweeps.shown(storage)} stopped answering ({detail}); this worker stops, and its "
            f"unfinished trial runs again when a worker goes on: uv run sweep.py --config {sweep.path}"
        ) from None
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
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise UserError(
            f"none of the study's {sweep.trials} trials finished: every one diverged or was pruned (their notes are in "
            f"{out / 'trials.csv'}). Narrow the space towards lower learning rates, or use a gentler pruner, and run a "
            "new sweep (another name or --storage)"
        )
    best = study.best_trial
    print(
        f"the study has its {sweep.trials} trials (this worker ran {ran or 'none'}). Best: trial {best.number}, "
        f"validation accuracy {best.value:.2f}%, {format_params(best.params)}\n"
        f"files: {out / 'trials.csv'}, {', '.join(str(out / p) for p in pictures)}\n"
        + (
            f"it was refitted already: {out / 'result.md'}"
            if study.user_attrs.get("refitted")
            else f"next: uv run sweep.py --config {sweep.path} --refit"
        )
    )


def objective(trial, *, study, sweep: sweeps.Sweep, out: Path, ran: list, crashes: list) -> float:
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
        # an answer about this region of the space, not a fault; pruned, so never the best: its peak came before
        # it diverged, and a refit of it would diverge again
        trial.set_user_attr("note", "diverged")
        ran.append(trial.number)
        crashes.clear()
        raise optuna.TrialPruned("diverged") from None
    except sweeps.storage_errors():
        raise  # the study's storage, not the trial: the worker stops
    except Exception as error:  # out of memory, a driver fault: this trial failed, the study goes on
        line = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]
        trial.set_user_attr("note", f"failed: {line}")
        print(f"trial {trial.number} failed ({line}); its train.log is in {run_dir}. The next trial starts")
        crashes.append(f"trial {trial.number}, {line}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise TrialCrashed(line) from None
    ran.append(trial.number)
    crashes.clear()
    summary = read_summary(run_dir)
    if summary["status"] == "pruned":
        raise optuna.TrialPruned(f"pruned after epoch {summary['epochs_done']}")
    return summary["best_eval_acc"]


def refit(study, sweep: sweeps.Sweep, out: Path, *, overwrite: bool) -> None:
    """The best trial's config trained on the whole training split for the same epochs, with no validation split,
    evaluated on the test split once at the end; result.md says what was chosen on validation and what test gave.
    Only a finished study is refitted, and only once: a second refit is a second look at the test split."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise UserError(
            f"the study {sweep.name!r} has no finished trial yet; run the search first: uv run sweep.py "
            f"--config {sweep.path}"
        )
    finished, running = (
        len(sweeps.finished_trials(study)),
        study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)),
    )
    if finished < sweep.trials or running:
        state = (
            f"{finished} of its {sweep.trials} trials are done"
            if finished < sweep.trials
            else f"{len(running)} trials are still running or queued"
        )
        raise UserError(
            f"the study {sweep.name!r} is not finished: {state}. Finish it first (uv run sweep.py --config "
            f"{sweep.path}), then refit"
        )
    if study.user_attrs.get("refitted") and not overwrite:
        raise UserError(
            f"the study {sweep.name!r} was refitted already and its test accuracy is in {out / 'result.md'}; a second "
            "refit would look at the test split again. Pass --overwrite to refit anyway"
        )
    best = study.best_trial
    run_dir = out / "refit"
    values = {**sweep.refit_values(best.params), "run_dir": str(run_dir), "sweep": str(out), "trial": best.number}
    epochs = sweep.epochs
    base = os.path.relpath(sweep.base)  # as result.md shows it: relative to where the sweep runs, when below it
    command = ["--config", str(sweep.base) if base.startswith("..") else base, *config_flags(values)]
    command += ["--overwrite"] if overwrite else []
    if run_dir.exists() and not overwrite:
        raise UserError(f"{run_dir} holds an earlier refit; pass --overwrite to replace it")
    print(f"refit of trial {best.number} ({format_params(best.params)}) on the whole training split, {epochs} epochs")
    train.main(command)
    study.set_user_attr("refitted", True)  # the test split has been read
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
