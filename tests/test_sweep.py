"""sweep.py: the sweep file's checks, a search and its refit in one process, pruning, and workers sharing a study on a
real PostgreSQL server and on a journal file, killed and interrupted at random moments."""

import glob
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import write_hub_folder

import compare
import sweep as sweep_tool
import train
from cars import sweeps
from cars.data import HubSplit
from cars.errors import UserError
from cars.runs import read_summary
from cars.sweeps import load_sweep, open_storage

ROOT = Path(__file__).resolve().parents[1]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

BASE = """data = "{data}"
arch = "shufflenet_v2_x0_5"
weights = "none"
resolution = 32
batch_size = 6
epochs = 2
lr = 0.01
workers = 0
split_seed = 3
final_test = false
"""
SWEEP = """base = "base.toml"
trials = {trials}
pruner = "{pruner}"
[fixed]
val_split = 0.3
[space]
lr = {{ low = 1e-4, high = 0.05, log = true }}
"""


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A base preset (ShuffleNet V2 x0.5 at 32 px, 2 epochs, about a second each: ResNet-18 took twice as long) on a
    3-class dataset, and a folder to write sweep files into beside it. The preset sets a split seed and
    final_test = false, which the refit must undo."""
    root = tmp_path_factory.mktemp("sweep")
    data = write_hub_folder(root / "data", per_class=(10, 3))
    (root / "base.toml").write_text(BASE.format(data=data))
    return root


def sweep_file(folder: Path, name: str, *, trials: int = 3, pruner: str = "none", extra: str = "") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(SWEEP.format(trials=trials, pruner=pruner) + extra)
    return path


def load_study(name: str, storage: str):
    """The study as sweep.py opens it: a database URL, or a journal file's path."""
    return optuna.load_study(study_name=name, storage=open_storage(storage, heartbeat=1))


# --- the sweep file ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ('base = "base.toml"\n[space]\nlr = {low = 1e-4, high = 0.1}\n', "a sweep chooses on a validation split"),
        (
            'base = "base.toml"\n[fixed]\nval_split = 0.3\n[space]\nlrr = {low = 1e-4, high = 0.1}\n',
            "'lrr' is not a knob",
        ),
        (
            'base = "base.toml"\n[fixed]\nval_split = 0.3\n[space]\nlr = {low = 0.1, high = 1e-4}\n',
            "lr needs low < high",
        ),
        (
            'base = "base.toml"\n[fixed]\nval_split = 0.3\n[space]\nfreeze_epochs = {choices = [0, 5]}\n',
            "freeze_epochs = 5 is not a valid trial: --freeze-epochs (5) must be smaller than --epochs (2)",
        ),
        ('base = "nope.toml"\n[fixed]\nval_split = 0.3\n[space]\nlr = {low = 1e-4, high = 0.1}\n', "does not exist"),
        ('base = "base.toml"\n[fixed]\nval_split = 0.3\n[space]\nrun_dir = {choices = ["a"]}\n', "cannot be searched"),
        ('base = "base.toml"\n[fixed]\nval_split = 0.3\n[space]\n', "[space] is empty"),
        (
            'base = "base.toml"\ntrials = 0\n[fixed]\nval_split = 0.3\n[space]\nlr = {low = 1e-4, high = 0.1}\n',
            "trials",
        ),
        ('base = "base.toml"\nspace = 3\n[fixed]\nval_split = 0.3\n', "space must be a table"),
        ('base = "base.toml"\nfixed = "x"\n[space]\nlr = {low = 1e-4, high = 0.1}\n', "fixed must be a table"),
        ('base = "."\n[fixed]\nval_split = 0.3\n[space]\nlr = {low = 1e-4, high = 0.1}\n', "is a folder"),
        (
            'base = "base.toml"\n[fixed]\nval_split = 0.3\n[space]\nepochs = {low = 1, high = 3}\n',
            "epochs cannot be searched: it is the pruner's budget and the refit's length",
        ),
    ],
)
def test_a_bad_sweep_file_is_one_line_before_anything_runs(sweep_dir, tmp_path, text, message):
    path = sweep_dir / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        sweep_tool.main(["--config", str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_presets_load():
    for path in sorted((ROOT / "configs" / "sweeps").glob("*.toml")):
        sweep = load_sweep(str(path))
        assert sweep.trial_values({})["val_split"] > 0 and sweep.space, path


# --- one machine -------------------------------------------------------------------------------------------------


def test_a_search_chooses_on_validation_and_only_the_refit_reads_the_test_split(
    sweep_dir, tmp_path, monkeypatch, capsys
):
    reads = Counter()
    original = HubSplit.open

    def counting_open(split, i):
        reads[split.name] += 1
        return original(split, i)

    monkeypatch.setattr(HubSplit, "open", counting_open)
    path = sweep_file(sweep_dir, "local")
    out = tmp_path / "local"
    sweep_tool.main(["--config", str(path), "--out", str(out)])
    assert reads["train"] > 0 and reads["test"] == 0, "no trial reads a test image"
    study = load_study("local", f"sqlite:///{out / 'study.db'}")
    trials = study.get_trials(states=FINISHED)
    assert len(trials) == 3 and len(study.trials) == 3
    for trial in trials:
        run_dir = out / f"trial-{trial.number}"
        config = tomllib.loads((run_dir / "config.toml").read_text())
        assert config["trial"] == trial.number and config["sweep"] == str(out) and config["val_split"] == 0.3
        assert config["lr"] == trial.params["lr"] and not config["final_test"]
        summary = read_summary(run_dir)
        assert summary["status"] == "finished" and trial.value == summary["best_eval_acc"]
        assert "test_acc_of_best" not in summary
    csv_rows = (out / "trials.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and csv_rows[0].startswith("number,state,value,params_lr")
    assert all((out / p).is_file() for p in ("optimization_history.png", "parallel_coordinate.png"))

    # the same command again: the study is complete, nothing more runs; --trials 4 adds one trial
    sweep_tool.main(["--config", str(path), "--out", str(out)])
    assert len(study.trials) == 3
    sweep_tool.main(["--config", str(path), "--out", str(out), "--trials", "4"])
    assert len(study.get_trials(states=FINISHED)) == 4 and (out / "trial-3" / "best.pt").is_file()
    assert reads["test"] == 0

    # the refit: the best trial's recipe on all of train, then the test split once
    best = study.best_trial
    sweep_tool.main(["--config", str(path), "--out", str(out), "--refit"])
    assert reads["test"] > 0
    refit = out / "refit"
    config = tomllib.loads((refit / "config.toml").read_text())
    assert config["val_split"] == 0 and config["lr"] == best.params["lr"] and config["trial"] == best.number
    rows = (refit / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and [r.split(",")[5] != "" for r in rows] == [False, True], "test evaluated once"
    summary = read_summary(refit)
    result = (out / "result.md").read_text()
    assert f"trial {best.number}, chosen on validation only" in result
    assert f"validation accuracy: **{best.value:.2f}%**" in result
    assert f"**test accuracy {summary['final_eval_acc']:.2f}%**" in result
    with pytest.raises(UserError, match="was refitted already .* look at the test split again. Pass --overwrite"):
        sweep_tool.main(["--config", str(path), "--out", str(out), "--refit"])
    capsys.readouterr()
    sweep_tool.main(["--config", str(path), "--out", str(out), "--trials", "4"])  # a finished, refitted study
    said = capsys.readouterr().out
    assert f"it was refitted already: {out / 'result.md'}" in said and "--refit" not in said
    # the study grows by a trial: it is unfinished, and so not refitted
    study.enqueue_trial({"lr": 0.01})
    with pytest.raises(UserError, match="is not finished: 1 trials are still running or queued"):
        sweep_tool.main(["--config", str(path), "--out", str(out), "--refit", "--overwrite"])


def test_another_recipe_cannot_join_a_study(sweep_dir, tmp_path):
    """Two sweep files of one name, or one whose base preset was edited, or one whose base is another file with other
    values, would mix two searches in one study: refused, naming what differs. Another file with the same values is
    the same recipe."""
    out, storage = tmp_path / "clash", f"sqlite:///{tmp_path / 'clash.db'}"
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "base.toml").write_text((sweep_dir / "base.toml").read_text())
    path = sweep_file(folder, "clash", trials=1)

    def join():
        return sweep_tool.open_study(load_sweep(str(path)), storage, 1, out)

    # parallel workers' TPE counts a running trial as a poor result (Optuna keeps the setting private)
    assert join().sampler._constant_liar  # makes the study
    (folder / "copy.toml").write_text((folder / "base.toml").read_text())
    path.write_text(path.read_text().replace('base = "base.toml"', 'base = "copy.toml"'))
    join()  # the same values under another name
    path.write_text(path.read_text() + "weight_decay = { low = 1e-5, high = 1e-2, log = true }\n")
    with pytest.raises(UserError, match="another recipe: the space's weight_decay was None, now"):
        join()
    path.write_text(SWEEP.format(trials=1, pruner="none"))
    (folder / "base.toml").write_text((folder / "base.toml").read_text().replace("lr = 0.01", "lr = 0.02"))
    with pytest.raises(UserError, match="another recipe: the trials' recipe's lr was 0.01, now 0.02"):
        join()
    # a study made before a knob existed ran at the knob's default: joinable at it, refused away from it
    (folder / "base.toml").write_text((folder / "base.toml").read_text().replace("lr = 0.02", "lr = 0.01"))
    study = join()
    recorded = study.user_attrs["fingerprint"]
    del recorded["recipe"]["interpolation"]
    study.set_user_attr("fingerprint", recorded)
    join()
    (folder / "base.toml").write_text((folder / "base.toml").read_text() + 'interpolation = "bicubic"\n')
    with pytest.raises(UserError, match="the trials' recipe's interpolation was None, now 'bicubic'"):
        join()


def test_a_new_study_never_writes_into_an_earlier_study_s_trial_folders(sweep_dir, tmp_path):
    out = tmp_path / "old"
    (out / "trial-0").mkdir(parents=True)
    (out / "trial-0" / "best.pt").write_bytes(b"an earlier study's")
    with pytest.raises(UserError, match=r"holds the run folders of an earlier study \(trial-0\).*--out DIR"):
        sweep_tool.main(["--config", str(sweep_file(sweep_dir, "fresh", trials=1)), "--out", str(out)])
    assert (out / "trial-0" / "best.pt").read_bytes() == b"an earlier study's"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="--out .*file is a file"):
        sweep_tool.main(["--config", str(sweep_file(sweep_dir, "fresh", trials=1)), "--out", str(tmp_path / "file")])
    with pytest.raises(UserError, match="holds no study to refit"):
        sweep_tool.main(["--config", str(sweep_file(sweep_dir, "fresh")), "--out", str(tmp_path / "n"), "--refit"])
    assert not (tmp_path / "n").exists()


def test_a_diverged_trial_is_pruned_and_a_crashed_one_fails_while_the_worker_goes_on(sweep_dir, tmp_path, monkeypatch):
    """Trial 0 diverges (lr 1e6): pruned, never the best, never refitted. Trial 1 runs out of memory: failed, with a
    note, and the worker runs trial 2, which finishes."""
    path = sweep_file(sweep_dir, "faults", trials=2)
    path.write_text(
        path.read_text().replace("lr = { low = 1e-4, high = 0.05, log = true }", "lr = {choices = [1e6, 0.01]}")
    )
    out = tmp_path / "faults"
    study = optuna.create_study(
        study_name="faults", storage=f"sqlite:///{tmp_path / 'faults.db'}", direction="maximize"
    )
    study.enqueue_trial({"lr": 1e6})
    study.enqueue_trial({"lr": 0.01})
    study.enqueue_trial({"lr": 0.01})
    original, calls = train.train_epoch, []

    def out_of_memory_once(run, epoch):
        calls.append(run.cfg.lr)
        if calls.count(0.01) == 1 and run.cfg.lr == 0.01:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(run, epoch)

    monkeypatch.setattr(train, "train_epoch", out_of_memory_once)
    sweep_tool.main(["--config", str(path), "--out", str(out), "--storage", f"sqlite:///{tmp_path / 'faults.db'}"])
    states = [(t.state, t.user_attrs.get("note", "")) for t in study.get_trials()]
    assert states[0] == (optuna.trial.TrialState.PRUNED, "diverged")
    assert states[1][0] == optuna.trial.TrialState.FAIL and states[1][1].startswith("failed: RuntimeError: CUDA out")
    assert states[2][0] == optuna.trial.TrialState.COMPLETE and study.best_trial.number == 2
    sweep_tool.main(
        ["--config", str(path), "--out", str(out), "--storage", f"sqlite:///{tmp_path / 'faults.db'}", "--refit"]
    )
    assert tomllib.loads((out / "refit" / "config.toml").read_text())["trial"] == 2


def test_a_locked_sqlite_study_is_waited_for_and_a_torn_journal_is_repaired(tmp_path, monkeypatch, capsys):
    import sqlite3
    import threading

    url = f"sqlite:///{tmp_path / 'locked.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url, heartbeat=1))

    def hold_lock(seconds):
        connection = sqlite3.connect(tmp_path / "locked.db")
        connection.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        connection.rollback()
        connection.close()

    holder = threading.Thread(target=hold_lock, args=(6,))  # longer than SQLAlchemy's 5 s default
    holder.start()
    time.sleep(0.3)
    study.set_user_attr("waited", True)  # waits for the lock instead of failing
    holder.join()
    assert optuna.load_study(study_name="s", storage=url).user_attrs["waited"]
    monkeypatch.setattr(sweeps, "SQLITE_WAIT", 0.5)
    holder = threading.Thread(target=hold_lock, args=(2,))
    holder.start()
    time.sleep(0.3)
    began = time.monotonic()
    with pytest.raises(UserError, match="cannot open the study's storage .*locked"):
        open_storage(url, heartbeat=1).get_all_studies()
    assert time.monotonic() - began < 1.9
    holder.join()

    journal = tmp_path / "study.journal"
    study = optuna.create_study(study_name="j", storage=open_storage(str(journal), heartbeat=1))
    study.enqueue_trial({"lr": 0.1})
    whole = journal.read_bytes()
    with open(journal, "ab") as file:
        file.write(b'{"op_code": 5, "worker_id": "lost-')  # the write a full disk cut off
    study = optuna.load_study(study_name="j", storage=open_storage(str(journal), heartbeat=1))
    assert len(study.trials) == 1 and journal.read_bytes() == whole
    kept = list(tmp_path.glob("study.journal.torn-*"))
    assert len(kept) == 1 and kept[0].read_bytes().endswith(b"lost-")
    assert "was cut off" in capsys.readouterr().out


def test_a_pruned_trial_is_marked_in_its_folder_and_stays_valid(sweep_dir, tmp_path, capsys):
    """train.py stops where the pruner says; the folder says pruned, compare.py shows it, and it resumes."""
    run_dir = tmp_path / "pruned"
    flags = ["--config", str(sweep_dir / "base.toml"), "--run-dir", str(run_dir), "--val-split", "0.3"]
    seen = []
    train.main(flags, after_evaluation=lambda epoch, accuracy: seen.append((epoch, accuracy)) or epoch == 1)
    summary = read_summary(run_dir)
    assert summary["status"] == "pruned" and summary["epochs_done"] == 1 and [e for e, _ in seen] == [1]
    metrics = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 2 and [float(m.split(",")[5]) for m in metrics[1:]] == [a for _, a in seen]
    compare.main([str(run_dir)])
    assert "| pruned |" in capsys.readouterr().out
    train.main(["--resume", str(run_dir)])  # a pruned trial's folder is an ordinary run: it can go on
    assert read_summary(run_dir)["status"] == "finished"


def test_the_pruner_s_answer_becomes_a_pruned_trial(sweep_dir, tmp_path):
    class PruneAll(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    path = sweep_file(sweep_dir, "pruneall", trials=1)
    sweep = load_sweep(str(path))
    study = optuna.create_study(study_name="pruneall", direction="maximize", pruner=PruneAll())
    study.optimize(
        lambda trial: sweep_tool.objective(trial, study=study, sweep=sweep, out=tmp_path, ran=[], crashes=[]),
        n_trials=1,
    )
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [1]
    assert read_summary(tmp_path / "trial-0")["status"] == "pruned"


# --- many workers --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own on a free port, for this module; as the postgres user when the tests run as
    root (PostgreSQL refuses to run as root)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or (
        [shutil.which("initdb")] if shutil.which("initdb") else []
    )
    if not found:
        pytest.skip("no PostgreSQL server here (Debian: apt-get install postgresql; .ci/run installs it)")
    bindir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="cars-postgres-"))  # in /tmp: the postgres user can reach it
    as_user = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no postgres user to run the PostgreSQL server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data, log = root / "data", root / "server.log"

    def run(*command):
        return subprocess.run([*as_user, *map(str, command)], capture_output=True, text=True, timeout=120)

    steps = [
        (bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"),
        (
            bindir / "pg_ctl", "-D", data, "-l", log, "-w", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start",
        ),
        (bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "sweeps"),
    ]  # fmt: skip
    for step in steps:
        done = run(*step)
        if done.returncode != 0:
            run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
            shutil.rmtree(root, ignore_errors=True)
            detail = (done.stderr or done.stdout).strip().splitlines()
            pytest.skip(f"the PostgreSQL server could not start ({Path(step[0]).name}): {detail[-1] if detail else ''}")
    yield f"postgresql://postgres@127.0.0.1:{port}/sweeps"
    run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
    shutil.rmtree(root, ignore_errors=True)


def worker(path: Path, out: Path, storage: str, trials: int) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "sweep.py"), "--config", str(path), "--out", str(out), "--storage", storage]
    return subprocess.Popen(
        [*command, "--trials", str(trials), "--heartbeat", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # each line as it is printed: the tests act on them
        # Ctrl-C reaches the worker even when pytest runs in the background (`cmd &`), where a shell ignores SIGINT
        # for the job and its children would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def trials_run(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"^trial (\d+):", output, re.MULTILINE)]


def check_shared_study(storage: str, name: str, out: Path, outputs: list[str], trials: int, stopped: set) -> None:
    """Exactly `trials` finished, each run by one worker once; the trials in `stopped` failed and were queued again."""
    study = load_study(name, storage)
    done = study.get_trials(states=FINISHED)
    assert len(done) == trials, [(t.number, t.state) for t in study.trials]
    ran = [n for output in outputs for n in trials_run(output) if n not in stopped]
    assert sorted(ran) == sorted(t.number for t in done), "every finished trial ran in exactly one worker, once"
    for trial in done:
        log = (out / f"trial-{trial.number}" / "train.log").read_text()
        assert log.count("\n$ train.py") == 1 and read_summary(out / f"trial-{trial.number}")["status"] == "finished"
    states = {t.number: t.state for t in study.trials}
    assert all(states[n] == optuna.trial.TrialState.FAIL for n in stopped)
    assert set(states.values()) <= {*FINISHED, optuna.trial.TrialState.FAIL}, "nothing left running or queued"


def stop_in_a_trial(process: subprocess.Popen, rng: random.Random, sig: int) -> tuple[int, str]:
    """Wait until the worker's first trial has trained its first epoch (of two), then send `sig` at a random moment
    of the second; returns the number of the last trial the worker began (the one the signal stopped) and what the
    worker printed. (A fixed delay after the trial began could land after a trial of a second or two had ended; on
    a loaded machine this process can read the line late, and the signal then stops a later trial.)"""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if trials_run("".join(lines)) and line.startswith("epoch   1/"):
            time.sleep(rng.uniform(0, 0.1))
            process.send_signal(sig)
            output = "".join(lines) + process.communicate(timeout=120)[0]
            return trials_run(output)[-1], output
    raise AssertionError("the worker never trained a trial's first epoch: " + "".join(lines))


def test_two_workers_on_postgresql_finish_exactly_the_trials_though_one_is_killed(postgres, sweep_dir, tmp_path):
    """Two workers share a study on a real PostgreSQL server; one is killed (kill -9) at a random moment of a trial.
    Optuna's heartbeats show its trial silent, and the other worker, running the same command, runs it again and
    finishes exactly --trials trials."""
    for attempt in range(3):
        name = f"shared{attempt}"
        path, out = sweep_file(sweep_dir, name, trials=4), tmp_path / name
        survivor, doomed = worker(path, out, postgres, 4), worker(path, out, postgres, 4)
        killed, killed_output = stop_in_a_trial(doomed, random.Random(attempt), signal.SIGKILL)
        output = survivor.communicate(timeout=900)[0]
        if read_summary(out / f"trial-{killed}").get("status") != "finished":
            break
        # the kill came after the worker's last trial had ended (this process read its line late on a loaded
        # machine): set up again
    assert survivor.returncode == 0, output
    check_shared_study(postgres, name, out, [output, killed_output], 4, stopped={killed})
    notes = [t.user_attrs.get("note", "") for t in load_study(name, postgres).trials]
    assert f"runs trial {killed} again: its worker stopped" in notes


def test_two_workers_share_a_journal_file_and_ctrl_c_stops_one_cleanly(sweep_dir, tmp_path):
    """The same on a journal file; one worker gets Ctrl-C at a random moment of a trial: its trial's folder says
    interrupted, the trial is queued again, and the same command (the other worker, or run again) completes it."""
    for attempt in range(3):
        name = f"journal{attempt}"
        path, out = sweep_file(sweep_dir, name, trials=4), tmp_path / name
        journal = str(tmp_path / "shared-fs" / f"{name}.log")
        survivor, stopping = worker(path, out, journal, 4), worker(path, out, journal, 4)
        interrupted, stopped_output = stop_in_a_trial(stopping, random.Random(attempt), signal.SIGINT)
        if stopping.returncode == 130 and "stopped; this worker ran trials" in stopped_output:
            break
        # most likely the signal came after the worker's last trial (this process read its line late on a loaded
        # machine): set up again. A worker that mishandles Ctrl-C in a trial fails all three times
        survivor.communicate(timeout=900)
    assert stopping.returncode == 130 and "stopped; this worker ran trials" in stopped_output, stopped_output
    assert "Traceback" not in stopped_output, "Optuna's report of the interrupted trial is not printed"
    importing = worker(path, out, journal, 4)
    time.sleep(0.5)  # Ctrl-C while sweep.py imports torch and Optuna
    importing.send_signal(signal.SIGINT)
    output = importing.communicate(timeout=60)[0]
    assert importing.returncode == 130 and output.strip().endswith("interrupted") and "Traceback" not in output
    outputs = [survivor.communicate(timeout=900)[0], stopped_output]
    assert survivor.returncode == 0, outputs[0]
    if len(load_study(name, journal).get_trials(states=FINISHED)) < 4:  # the survivor ended before the re-queue
        again = worker(path, out, journal, 4)
        outputs.append(again.communicate(timeout=900)[0])
        assert again.returncode == 0, outputs[-1]
    check_shared_study(journal, name, out, outputs, 4, stopped={interrupted})
    assert read_summary(out / f"trial-{interrupted}")["status"] == "interrupted"  # stopped within the trial
    notes = [t.user_attrs.get("note", "") for t in load_study(name, journal).trials]
    assert f"runs trial {interrupted} again: it was interrupted" in notes


def test_a_journal_trial_whose_worker_is_gone_is_failed_and_queued_again(tmp_path):
    """Optuna has no heartbeats for a journal file: a running trial whose process on this machine is gone is failed
    by the next worker here, and its parameters queued again; a live worker's trial is left alone."""
    storage = open_storage(str(tmp_path / "journal.log"), heartbeat=1)
    study = optuna.create_study(study_name="gone", storage=storage, direction="maximize")
    finished_process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    for pid in (int(finished_process.stdout), os.getpid()):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{pid}")
    sweeps.fail_stopped_trials(study)
    dead, alive, queued = study.get_trials()
    assert dead.state == optuna.trial.TrialState.FAIL and alive.state == optuna.trial.TrialState.RUNNING
    assert queued.state == optuna.trial.TrialState.WAITING and queued.system_attrs["fixed_params"] == dead.params
    assert queued.user_attrs["note"] == "runs trial 0 again: its worker stopped"
    sweeps.fail_stopped_trials(study)  # once only
    assert len(study.get_trials()) == 3


def test_workers_that_start_at_once_agree_on_the_trial_over_the_cap():
    study = optuna.create_study(direction="maximize")
    first, second, third = study.ask(), study.ask(), study.ask()  # three workers asked at the same moment, cap 2
    assert [sweeps.has_slot(study, t, 2) for t in (first, second, third)] == [True, True, False]
    study.tell(first, state=optuna.trial.TrialState.FAIL)  # a failed trial does not count; its retry will
    assert sweeps.has_slot(study, third, 2)


def test_the_study_pictures_count_pruned_trials_at_their_last_value(tmp_path):
    """A search whose pruned trials were left out of its pictures would tell another lesson: they count, at the last
    validation accuracy they reported, and each picture says how many trials it used."""
    study = optuna.create_study(direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    for value, lr_value in ((60.0, 0.01), (70.0, 0.02)):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr_value}, distributions={"lr": lr}, value=value))
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 1e-4},
            distributions={"lr": lr},
            state=optuna.trial.TrialState.PRUNED,
            intermediate_values={1: 20.0, 2: 25.0},
        )
    )
    scored = sweeps.with_pruned_trials(study)
    assert [(t.value, bool(t.user_attrs.get("pruned"))) for t in scored.trials] == [
        (60.0, False),
        (70.0, False),
        (25.0, True),
    ]
    drawn = sweeps.write_study_files(study, tmp_path)
    assert "optimization_history.png" in drawn and "param_importances.png" in drawn


def test_a_sweep_whose_every_trial_diverged_ends_in_one_line(sweep_dir, tmp_path):
    """Item 8: no trial completed (each diverged: pruned), so the study has no best trial; it ended in Optuna's
    'Record does not exist'."""
    path = sweep_file(sweep_dir, "all-diverge", trials=2)
    path.write_text(
        path.read_text().replace("lr = { low = 1e-4, high = 0.05, log = true }", "lr = { low = 1e6, high = 1e7 }")
    )
    out = tmp_path / "all-diverge"
    with pytest.raises(UserError, match="none of the study's 2 trials finished: every one diverged or was pruned"):
        sweep_tool.main(["--config", str(path), "--out", str(out)])
    assert (out / "trials.csv").is_file()
