"""A hyperparameter search on Optuna: the sweep file, the study's storage, how many trials may run, and the study's
files. sweep.py runs the trials with train.py's recipe.

A sweep file names a base preset, values fixed for every trial, and a search space over Config's knobs:

    base = "../demo.toml"          # relative to the sweep file
    trials = 12                    # the study's total, over all workers (--trials overrides it)
    pruner = "hyperband"           # hyperband, successive-halving, median or none
    [fixed]
    val_split = 0.2                # required: trials are chosen on a validation split, never on test
    [space]
    lr = { low = 1e-5, high = 0.1, log = true }
    freeze_epochs = { choices = [0, 5] }
"""

import dataclasses
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from cars.config import Config, from_dict, load_toml
from cars.errors import UserError
from cars.report import save_figure, write_csv
from cars.runs import process_alive

PRUNERS = ("hyperband", "successive-halving", "median", "none")
# set by sweep.py for every trial, or meaningless in a search
NOT_SEARCHED = {"run_dir", "sweep", "trial", "final_test", "val_split", "split_seed", "data", "device"}
# the study's budget: Hyperband's resource and the refit's length are the sweep's one number of epochs
FIXED_BUDGET = {"epochs"}
SQLITE_WAIT = 30  # seconds a worker waits for a locked SQLite study before it stops


@dataclass
class Param:
    """One knob's range: low..high (log-uniform with log), or a list of choices."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: list | None = None

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def corners(self) -> list:
        """The values that must all make a valid config: both ends, or every choice."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} in {self.choices}"
        return f"{self.name} {'log-uniform' if self.log else 'uniform'} in [{self.low:g}, {self.high:g}]"


@dataclass
class Sweep:
    name: str
    path: Path
    base: Path  # the preset every trial starts from
    fixed: dict  # the knobs every trial sets
    space: list[Param]
    trials: int
    pruner: str

    def trial_values(self, params: dict) -> dict:
        """A trial's config: the base preset, then the fixed values, then the trial's parameters."""
        return {**from_dict(load_toml(str(self.base)), str(self.base)), **self.fixed, **params}

    @property
    def epochs(self) -> int:
        return Config(**self.trial_values({})).epochs

    def refit_values(self, params: dict) -> dict:
        """The refit's knobs over the base preset: the fixed values and the chosen parameters, trained on all of the
        training split (no validation split, so no split seed) and evaluated on the test split once, after the last
        epoch: every earlier evaluation would be a look at the test split."""
        defaults = Config()
        return {
            **self.fixed,
            **params,
            "val_split": 0.0,
            "split_seed": defaults.split_seed,
            "final_test": defaults.final_test,
            "eval_every": self.epochs,
            "early_stop": 0,
        }

    def fingerprint(self) -> dict:
        """What a study is: every value of the trials' recipe (the base preset's with the defaults filled in, then
        [fixed]), the pruner and the space. Workers and refits of one study must agree on all of it."""
        recipe = dataclasses.asdict(Config(**self.trial_values({})))
        for name in ("run_dir", "sweep", "trial"):  # set per trial, not part of the recipe
            recipe.pop(name)
        return {
            "recipe": recipe,
            "pruner": self.pruner,
            "space": {p.name: p.describe() for p in self.space},
        }


def load_sweep(path: str, trials: int | None = None) -> Sweep:
    """The sweep file, every range checked against Config before anything runs."""
    raw = load_toml(path)
    where = Path(path)
    for table in ("fixed", "space"):
        if not isinstance(raw.get(table, {}), dict):
            raise UserError(f"{path}: {table} must be a table ([{table}] with one knob a line), got {raw[table]!r}")
    unknown = set(raw) - {"base", "trials", "pruner", "fixed", "space"}
    if unknown:
        raise UserError(
            f"{path}: unknown key {sorted(unknown)[0]!r}; a sweep file has base, trials, pruner, [fixed] and [space]"
        )
    if not isinstance(raw.get("base"), str):
        raise UserError(f'{path}: base must name the preset every trial starts from, e.g. base = "../demo.toml"')
    base = (where.parent / raw["base"]).resolve()
    if base.is_dir():
        raise UserError(f"{path}: base preset {raw['base']} ({base}) is a folder; name a preset's TOML file")
    if not base.is_file():
        raise UserError(f"{path}: base preset {raw['base']} ({base}) does not exist")
    fixed = from_dict(raw.get("fixed", {}), f"{path} [fixed]")
    total = trials if trials is not None else raw.get("trials", 20)
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise UserError(f"{path}: trials must be a positive whole number, got {total!r}")
    pruner = raw.get("pruner", "hyperband")
    if pruner not in PRUNERS:
        raise UserError(f"{path}: pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    space = [param(name, spec, f"{path} [space]") for name, spec in raw.get("space", {}).items()]
    if not space:
        raise UserError(
            f"{path}: [space] is empty; name at least one knob to search, e.g. lr = {{low = 1e-4, high = "
            "0.1, log = true}"
        )
    sweep = Sweep(where.stem, where, base, fixed, space, total, pruner)
    config = Config(**sweep.trial_values({}))
    if config.val_split <= 0:
        raise UserError(
            f"{path}: a sweep chooses on a validation split, never on the test split; set val_split in [fixed] "
            "(e.g. val_split = 0.2)"
        )
    config.validate()
    for p in space:
        for value in p.corners():
            try:
                Config(**sweep.trial_values({p.name: value})).validate()
            except UserError as error:
                raise UserError(f"{path} [space]: {p.name} = {value!r} is not a valid trial: {error}") from None
            try:
                Config(**{**sweep.trial_values({}), **sweep.refit_values({p.name: value})}).validate()
            except UserError as error:
                raise UserError(f"{path}: the refit of a trial with {p.name} = {value!r} would fail: {error}") from None
    return sweep


def param(name: str, spec, where: str) -> Param:
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if name not in fields:
        raise UserError(f"{where}: {name!r} is not a knob; the knobs are train.py's flags with '_' for '-'")
    if name in NOT_SEARCHED:
        raise UserError(f"{where}: {name} is set by sweep.py or fixed for the whole sweep; it cannot be searched")
    if name in FIXED_BUDGET:
        raise UserError(
            f"{where}: {name} cannot be searched: it is the pruner's budget and the refit's length, one number for the "
            f"whole study; set it in [fixed] or in the base preset"
        )
    keys = set(spec) if isinstance(spec, dict) else set()
    if not ({"low", "high"} <= keys <= {"low", "high", "log"} or keys == {"choices"}):
        raise UserError(f"{where}: {name} needs {{low = ..., high = ...[, log = true]}} or {{choices = [...]}}")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: {name}'s choices must be a non-empty list")
        return Param(name, choices=[from_dict({name: value}, where)[name] for value in choices])
    kind = fields[name].type
    if kind not in (int, float):
        raise UserError(f"{where}: {name} is not a number; search it with choices = [...]")
    low, high = (from_dict({name: spec[k]}, where)[name] for k in ("low", "high"))
    log = spec.get("log", False)
    if not isinstance(log, bool) or not low < high or (log and low <= 0):
        raise UserError(f"{where}: {name} needs low < high (and low > 0 with log = true), got {low!r} and {high!r}")
    return Param(name, low, high, log)


# --- the study ---------------------------------------------------------------------------------------------------


def open_storage(url: str, heartbeat: int):
    """An RDB URL (sqlite:///..., postgresql://...: whatever SQLAlchemy takes) or a journal file's path (for a shared
    file system). A database records heartbeats every `heartbeat` seconds: a trial whose worker is silent for twice
    that is failed and queued again for the next worker that looks. (Optuna has no heartbeats for a journal file.)"""
    import optuna

    try:
        if "://" in url:
            # SQLite: wait up to SQLITE_WAIT seconds for a lock (a backup, a VACUUM), not SQLAlchemy's 5
            engine = {"connect_args": {"timeout": SQLITE_WAIT}} if url.startswith("sqlite") else None
            for attempt in range(3):
                try:
                    return optuna.storages.RDBStorage(
                        url,
                        engine_kwargs=engine,
                        heartbeat_interval=heartbeat,
                        grace_period=2 * heartbeat,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
                    )
                except Exception as error:  # workers that start together race to make a new database's tables
                    if attempt == 2 or "locked" in str(error):  # a lock was waited for already
                        raise
                    time.sleep(1 + attempt)
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        repair_torn_journal(Path(url))
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    except Exception as error:  # a wrong URL, a server that is down, a missing driver: all one line
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot open the study's storage {shown(url)}: {detail}") from None


def quiet_optuna() -> None:
    """train.py's log says what each trial does: Optuna's warnings would repeat a stopped trial's traceback, and its
    heartbeats and their retries, which keep a study going, are marked experimental in Optuna 5."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def claim_study(study, fingerprint: dict, *, labels: dict, storage: str, earlier: list[str], out: Path, rename: str):
    """Record what a new study is (its fingerprint), or refuse a worker whose fingerprint differs from the study's in
    one line that names the first difference; a new study over a folder that holds an earlier study's run folders
    (`earlier`) is refused too, as their names would collide."""
    fingerprint = json.loads(json.dumps(fingerprint))  # as the storage gives it back (lists, not tuples)
    known = study.user_attrs.get("fingerprint")
    if known is not None:
        known = with_new_knobs(known, fingerprint)
    if known is None:
        if earlier and not study.get_trials(deepcopy=False):
            raise UserError(
                f"{out} holds the run folders of an earlier study ({', '.join(earlier[:3])}"
                f"{', ...' if len(earlier) > 3 else ''}) that this new study's would collide with; give it its own "
                "folder with --out DIR, or delete those folders"
            )
        study.set_user_attr("fingerprint", fingerprint)
    elif known != fingerprint:
        raise UserError(
            f"the study {study.study_name!r} in {shown(storage)} was made from another recipe: "
            f"{difference(known, fingerprint, labels)}; its results would not be comparable. {rename}"
        )


def with_new_knobs(known, now):
    """The fingerprint a study recorded, with the knobs added to this project since then filled in where `now` has
    them at their defaults: the study ran at those, the only behaviour there was (a new knob's default is the old
    behaviour), so a study made by an earlier version stays joinable."""
    if not isinstance(known, dict) or not isinstance(now, dict):
        return known
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    added = {k: v for k, v in now.items() if k not in known and k in defaults and v == defaults[k]}
    return {**{k: with_new_knobs(v, now.get(k)) for k, v in known.items()}, **added}


def difference(known: dict, now: dict, labels: dict[str, str]) -> str:
    """The first value that differs between two fingerprints, in words: labels name their parts."""
    for part, label in labels.items():
        old, new = known.get(part), now.get(part)
        while isinstance(old, dict) and isinstance(new, dict) and old != new:
            key = next(k for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k))
            label, old, new = f"{label}'s {key}", old.get(key), new.get(key)
        if old != new:
            return f"{label} was {old!r}, now {new!r}"
    return "it differs"


def repair_torn_journal(path: Path) -> None:
    """A journal file whose last record was cut off (a full disk, a machine lost mid-write) never loads again, and a
    worker that appended after the cut would bury it. The cut-off record is removed (the whole file kept beside it)
    before anything is appended; a record still being written by a live worker is left alone."""
    if not path.is_file():
        return
    size = path.stat().st_size
    with open(path, "rb") as file:
        file.seek(max(0, size - (1 << 20)))
        tail = file.read()
    complete = tail.rfind(b"\n") + 1  # where the last whole record ends, in the tail
    if complete == len(tail):
        return
    time.sleep(1)
    if path.stat().st_size != size:  # another worker is writing it
        return
    cut = size - (len(tail) - complete)
    kept = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.copyfile(path, kept)
    os.truncate(path, cut)
    print(
        f"note: the last record of the journal {path} was cut off ({size - cut} bytes, a lost write); it was removed "
        f"so that the study loads again. The file as it was is kept in {kept}"
    )


def shown(url: str) -> str:
    """A storage URL as it may be printed: without its password."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


def storage_errors() -> tuple:
    """What a storage that stopped answering raises (a SQLite study locked for longer than SQLITE_WAIT, a database
    server gone)."""
    import optuna
    import sqlalchemy.exc

    return (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)


def has_heartbeats(study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def worker_name() -> str:
    """host:pid, recorded in every trial a worker runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_stopped_trials(study) -> None:
    """Running trials whose worker is gone become failed, and their parameters are queued again. With a database,
    Optuna's heartbeats tell; with a journal file, a worker can only tell the workers of its own machine."""
    import optuna

    optuna.storages.fail_stale_trials(study)
    if has_heartbeats(study):
        return
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker_host, _, pid = trial.user_attrs.get("worker", "").rpartition(":")
        if worker_host != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker of this machine failed it first, and queues it again
        study.enqueue_trial(trial.params, user_attrs={"note": f"runs trial {trial.number} again: its worker stopped"})


def make_pruner(name: str, epochs: int):
    """The pruner by name; none judges a trial before a fifth of its epochs (the first epochs of a frozen start, or
    of a warmup, say little about the end)."""
    import optuna

    first = max(1, epochs // 5)
    return {
        "hyperband": lambda: optuna.pruners.HyperbandPruner(
            min_resource=first, max_resource=epochs, reduction_factor=3
        ),
        "successive-halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3),
        "median": lambda: optuna.pruners.MedianPruner(n_warmup_steps=first),
        "none": lambda: optuna.pruners.NopPruner(),
    }[name]()


def counted_states():
    """The trials that count towards --trials: done, or running or queued (a failed one is retried as a new trial)."""
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def has_slot(study, trial, cap: int) -> bool:
    """Whether this just-started trial is one of the study's first `cap` counted trials. Every worker asks the same
    storage, so two workers that start trials at once agree on which one is over the cap: the later number."""
    earlier = [t for t in study.get_trials(deepcopy=False, states=counted_states()) if t.number < trial.number]
    return len(earlier) < cap


def finished_trials(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def wait_for_others(study, seconds: float) -> None:
    """Let trials of other workers finish, or go stale if their worker died (then they are queued again)."""
    time.sleep(seconds)
    fail_stopped_trials(study)


def write_study_files(study, out: Path) -> list[str]:
    """trials.csv and the study's plots (optimisation history, parallel coordinates, parameter importances), from
    what the storage holds now. Returns the names of the pictures drawn."""
    import warnings

    from optuna.visualization import matplotlib as plots

    trials = study.get_trials(deepcopy=False)
    rows = [
        dict(
            number=t.number,
            state=t.state.name.lower(),
            value=t.value,
            **{f"params_{k}": v for k, v in t.params.items()},
            epochs=len(t.intermediate_values),
            run_dir=t.user_attrs.get("run_dir", ""),
            worker=t.user_attrs.get("worker", ""),
            note=t.user_attrs.get("note", ""),
        )
        for t in trials
    ]
    names = sorted({k for r in rows for k in r if k.startswith("params_")})
    write_csv(out / "trials.csv", rows, ["number", "state", "value", *names, "epochs", "run_dir", "worker", "note"])
    # the pictures count the pruned trials too, at their last reported value: a search whose low-lr trials were all
    # pruned would otherwise rank the other knobs above lr
    scored = with_pruned_trials(study)
    if not scored.trials:
        return []
    counted = (
        f"{sum(not t.user_attrs.get('pruned') for t in scored.trials)} finished trials and "
        f"{sum(bool(t.user_attrs.get('pruned')) for t in scored.trials)} pruned ones (at their last reported value)"
    )
    plot_history(scored, out / "optimization_history.png", counted=counted)
    drawn = ["optimization_history.png"]
    pictures = [("parallel_coordinate.png", plots.plot_parallel_coordinate)]
    if len(scored.trials) >= 2 and len(names) >= 1:
        pictures.append(("param_importances.png", plots.plot_param_importances))
    for filename, plot in pictures:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                axes = plot(scored)
            except (ValueError, RuntimeError):  # e.g. importances of parameters that never varied
                continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        where = "left" if first.get_title(loc="left") else "center"  # where Optuna put its title
        first.set_title(f"{first.get_title(loc=where)}\n{counted}", loc=where, fontsize=9)
        save_figure(first.figure, out / filename)
        drawn.append(filename)
    return drawn


def with_pruned_trials(study):
    """An in-memory copy of the study's finished trials, the pruned ones among them as complete at the last value
    they reported (marked with the user attribute `pruned`)."""
    import optuna

    copy = optuna.create_study(direction="maximize")
    for trial in study.get_trials(deepcopy=False):
        if trial.state == optuna.trial.TrialState.COMPLETE:
            copy.add_trial(trial)
        elif trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
            last = trial.intermediate_values[max(trial.intermediate_values)]
            copy.add_trial(
                optuna.trial.create_trial(
                    params=trial.params, distributions=trial.distributions, value=last, user_attrs={"pruned": True}
                )
            )
    return copy


def plot_history(scored, path: Path, *, counted: str) -> None:
    """Every trial's validation accuracy in order, pruned trials hollow at their last value, and the best so far of
    the finished ones."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for pruned, style in ((False, dict(marker="o", color="C0")), (True, dict(marker="o", mfc="none", color="C1"))):
        points = [(n, t.value) for n, t in enumerate(scored.trials) if bool(t.user_attrs.get("pruned")) == pruned]
        if points:
            ax.plot(
                *zip(*points, strict=True), ls="none", label="pruned (last value)" if pruned else "finished", **style
            )
    best, line = float("-inf"), []
    for n, t in enumerate(scored.trials):
        best = max(best, t.value) if not t.user_attrs.get("pruned") else best
        line.append((n, best if best > float("-inf") else None))
    ax.plot([n for n, b in line if b is not None], [b for _, b in line if b is not None], color="C2", label="best")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"the study's trials: {counted}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)
