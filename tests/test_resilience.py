"""Never lose a run: resume, interruptions, divergence, full disks, hostile inputs."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_ARCH, tiny_args
from PIL import Image

import train
from cars import engine, optim, run_state
from cars import files as files_module
from cars.checkpoint import load_checkpoint, save_checkpoint
from cars.data import load_splits, read_rgb
from cars.errors import UserError, run_cli
from cars.files import atomic_write
from cars.report import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def comparable(run_dir: Path):
    """Everything a run computed, without the wall-clock seconds."""
    metrics = [{k: v for k, v in row.items() if k != "seconds"} for row in read_metrics(run_dir / "metrics.csv")]
    return metrics, load_checkpoint(run_dir / "last.pt")["model"]


def assert_same_run(a: Path, b: Path):
    metrics_a, weights_a = comparable(a)
    metrics_b, weights_b = comparable(b)
    assert metrics_a == metrics_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), "final weights must be bit-identical"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 4-epoch run; the others must end exactly like it."""
    from conftest import write_hub_folder

    root = tmp_path_factory.mktemp("resume")
    data = write_hub_folder(root / "data")
    args = tiny_args(
        data, root / "reference", "--epochs", "4", "--augment", "heavy", "--dropout", "0.2", arch=FAST_ARCH
    )
    train.main(args)
    return root, data, args


def run_args(reference_run, run_dir):
    _, data, args = reference_run
    return [str(run_dir) if a == str(reference_run[0] / "reference") else a for a in args]


def test_resume_after_each_epoch_is_exact(reference_run, tmp_path):
    run_dir = tmp_path / "stopped"
    args = run_args(reference_run, run_dir)
    train.main([*args, "--epochs", "1"])  # a run that stopped after epoch 1 ...
    config = (run_dir / "config.toml").read_text().replace("epochs = 1\n", "epochs = 4\n")
    (run_dir / "config.toml").write_text(config)  # ... of a 4-epoch plan
    train.main(["--resume", str(run_dir), "--epochs", "2"])  # extend to 2, then to 4: each resume restores every state
    assert "epochs = 2" in (run_dir / "config.toml").read_text()
    train.main(["--resume", str(run_dir), "--epochs", "4"])
    assert_same_run(reference_run[0] / "reference", run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def start_training(args, cwd):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # what went wrong shows in a failed assertion
        text=True,
        env=os.environ.copy(),
    )


def wait_for_epoch(run_dir: Path, epoch: int, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        log = run_dir / "train.log"
        if log.exists() and f"epoch {epoch:3d}/" in log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"epoch {epoch} never finished")


def test_sigterm_then_kill_9_at_a_random_point_then_resume_is_exact(reference_run, tmp_path):
    run_dir = tmp_path / "killed"
    process = start_training(run_args(reference_run, run_dir), tmp_path)
    wait_for_epoch(run_dir, 1, process)
    process.send_signal(signal.SIGTERM)  # what a scheduler or `kill` sends: a resumable stop
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 130, out[-3000:]
    assert f"Resume with: uv run train.py --resume {run_dir}" in out
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"

    process = start_training(["--resume", str(run_dir)], tmp_path)
    wait_for_epoch(run_dir, 2, process)
    time.sleep(random.Random(7).uniform(0, 1.0))  # somewhere in epoch 3, or while it writes its files
    process.send_signal(signal.SIGKILL)  # a power cut: no chance to clean up
    process.wait()
    assert load_checkpoint(run_dir / "last.pt")["epoch"] >= 2  # never a half-written checkpoint
    train.main(["--resume", str(run_dir)])
    assert_same_run(reference_run[0] / "reference", run_dir)


def test_resume_refuses_recipe_changes(reference_run, capsys):
    reference = str(reference_run[0] / "reference")
    for flags, message in (
        (["--lr", "0.5"], "--lr would change the recipe"),
        (  # the refusal names every flag a resume takes, the speed switches too
            ["--lr", "0.5"],
            "--resume only takes --epochs, --workers, --device, --save-every-steps, --cache, --eval-every, "
            "--early-stop, --log-every-steps, --amp, --compile, --channels-last (--epochs to extend)",
        ),
        (["--config", str(ROOT / "configs" / "demo.toml")], "drop --config"),
        ([], "already trained 4 of 4 epochs; pass --epochs N to extend it"),
    ):
        with pytest.raises(SystemExit) as exit:
            run_cli(train.main, ["--resume", reference, *flags])
        assert exit.value.code == 2
        assert message in capsys.readouterr().err


def test_nan_loss_stops_the_run_and_keeps_best(reference_run, tmp_path, monkeypatch, capsys):
    real = engine.F.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # call 5: epoch 2, step 1 (each epoch is 3 training steps and 1 evaluation)
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(engine.F, "cross_entropy", poisoned)
    run_dir = tmp_path / "nan"
    with pytest.raises(SystemExit) as exit:
        run_cli(train.main, run_args(reference_run, run_dir))
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: training diverged in epoch 2: the training loss became nan at step 1 (lr ")
    assert "lower --lr" in error and "lr_find.py" in error
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"
    best = load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == 1 and all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1


def readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "batch-reader" and t.is_alive()]


def test_ctrl_c_as_the_first_epoch_starts_leaves_no_reading_thread(reference_run, tmp_path, monkeypatch):
    """Ctrl-C in the first step, while the cache's reading thread is inside a batch: exit 130, and the thread has
    finished before train.py returns. Left running, it met the interpreter's exit inside a torch operation, which
    aborts the process (exit 134, "terminate called without an active exception")."""
    from cars.loaders import CachedLoader

    read = CachedLoader.read

    def slow_read(loader, indices):
        time.sleep(0.3)  # the reader is mid-batch when Ctrl-C comes
        return read(loader, indices)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CachedLoader, "read", slow_read)
    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(SystemExit) as stopped:
        train.main([*run_args(reference_run, tmp_path / "ctrl-c"), "--batch-size", "2"])
    assert stopped.value.code == 130
    assert not readers()


def reading_loader(data: Path, cache: Path):
    """The cached loader of the test split's 9 images, 2 a batch: more batches than its reader reads ahead (3)."""
    from cars.loaders import eval_loader

    test = load_splits(str(data)).eval
    return eval_loader(
        test, resolution=32, interpolation="bilinear", cache=str(cache), skip_bad_images=False, batch_size=2, workers=0
    )


def test_ctrl_c_while_the_reader_starts_stops_it(reference_run, tmp_path, monkeypatch):
    """Ctrl-C that lands while an epoch's reading thread is being started (where a SIGTERM sent as the previous
    epoch's line appears lands) stops that thread too. Left reading, it met the interpreter's exit inside a torch
    operation: train.py said "interrupted", then aborted (exit -6, once in a full suite)."""
    loader = reading_loader(reference_run[1], tmp_path / "cache")
    start = threading.Thread.start

    def start_then_interrupt(thread):
        start(thread)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        next(iter(loader))
    assert not readers()


def test_the_reader_stops_when_the_thread_it_reads_for_ends(reference_run, tmp_path):
    """A thread that ends without closing its pass over a loader, as the main thread does at exit when the pass
    outlives it: the reader stops within its 0.1 s wait for room, and the interpreter waits for it (no daemon)
    rather than stopping it wherever it is."""
    loader = reading_loader(reference_run[1], tmp_path / "cache")
    passes, seen = [], []

    def read_one_batch():
        passes.append(iter(loader))
        next(passes[0])
        seen.extend(readers())  # while this thread lives, its reader waits for room (5 batches, 3 ahead at most)

    consumer = threading.Thread(target=read_one_batch)
    consumer.start()
    consumer.join()
    (reader,) = seen
    assert not reader.daemon
    reader.join(timeout=5)
    assert not reader.is_alive()


def test_interrupted_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old, complete\n")

    def crash_midway(file):
        file.write(b"new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash_midway)
    assert target.read_text() == "old, complete\n"
    assert os.listdir(tmp_path) == ["metrics.csv"], "no temporary file left behind"


def test_a_sigterm_during_a_write_waits_for_the_whole_file(tmp_path):
    target = tmp_path / "metrics.csv"

    def signalled_midway(file):
        file.write(b"first half, ")
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler at its next line: inside this write
        file.write(b"second half")

    handler = signal.signal(signal.SIGTERM, run_state.raise_interrupt)  # as a training run handles SIGTERM
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write(target, signalled_midway)
        assert signal.getsignal(signal.SIGTERM) is run_state.raise_interrupt, "the run's handler is back"
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert target.read_text() == "first half, second half"
    assert os.listdir(tmp_path) == ["metrics.csv"]


def test_a_sigterm_inside_torch_save_stops_the_run_as_an_interrupt(tmp_path, hub_folder, monkeypatch):
    """A scheduler's SIGTERM that lands while torch.save's C++ writer is writing last.pt. It used to cut the write
    short (here last.pt stayed at epoch 0); a train.py so stopped once exited 1 with the writer's own error
    ("unexpected pos"), its run marked crashed. Now last.pt is finished first, and the run stops as an interrupted
    one."""
    real_save = torch.save

    class Signalling:  # the file torch.save writes to, which sends SIGTERM from inside the writer's first write
        def __init__(self, file):
            self.file, self.sent = file, False

        def write(self, data):
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
            return self.file.write(data)

        def flush(self):
            self.file.flush()

    def save(checkpoint, file, *args, **kwargs):
        if checkpoint.get("epoch") == 1 and "optimizer" in checkpoint:  # last.pt of epoch 1
            file = Signalling(file)
        real_save(checkpoint, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_args(hub_folder, run_dir, "--epochs", "2", arch=FAST_ARCH))
    assert stopped.value.code == 130
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert "interrupted in epoch 1; last.pt holds epoch 1. Resume" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


def test_full_disk_is_one_clear_line_and_keeps_checkpoints(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "last.pt", {"epoch": 3})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_module.os, "fsync", no_space)
    with pytest.raises(UserError, match=r"cannot write .*last.pt: No space left on device; free some space"):
        save_checkpoint(tmp_path / "last.pt", {"epoch": 4})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3


# --- hostile images ------------------------------------------------------------------------------


def hostile_folder(root: Path) -> Path:
    """An ImageFolder with every kind of image the wild has, in two classes."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls, colour in (("red car", (200, 30, 30)), ("blue car", (30, 30, 200))):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), colour).save(folder / f"plain{i}.jpg")
    odd = root / "train" / "red car"
    Image.new("RGB", (40, 30), (200, 30, 30)).convert("CMYK").save(odd / "cmyk.jpg")
    Image.new("RGBA", (40, 30), (200, 30, 30, 128)).save(odd / "rgba.png")
    Image.new("RGB", (40, 30), (200, 30, 30)).convert("P").save(odd / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (30, 40), dtype=np.uint16)).save(odd / "sixteen.png")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(odd / "tiny.png")
    Image.new("RGB", (6000, 4000), (200, 30, 30)).save(odd / "huge.jpg", quality=50)
    (odd / "empty.jpg").write_bytes(b"")
    good = (root / "train" / "blue car" / "plain0.jpg").read_bytes()
    (root / "train" / "blue car" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return root


def test_every_image_mode_and_size_becomes_rgb(tmp_path):
    splits = load_splits(str(hostile_folder(tmp_path / "hostile")))
    readable = {"cmyk.jpg", "rgba.png", "palette.png", "sixteen.png", "tiny.png", "huge.jpg"}
    for i, path in enumerate(splits.train.paths):
        if Path(path).name in readable:
            image = read_rgb(splits.train, i)
            assert image.mode == "RGB" and image.size[0] >= 1
        elif Path(path).name in ("empty.jpg", "truncated.jpg"):
            with pytest.raises(UserError, match=f"cannot read image .*{Path(path).name}"):
                read_rgb(splits.train, i)


def test_training_skips_and_counts_broken_images(tmp_path):
    data = hostile_folder(tmp_path / "hostile")
    run_dir = tmp_path / "run"
    train.main(tiny_args(data, run_dir, "--epochs", "1", "--skip-bad-images", arch=FAST_ARCH))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_images"] == {"train": 2, "test": 0}


def test_empty_split_and_missing_class_names(tmp_path, capsys):
    data = hostile_folder(tmp_path / "hostile")
    for image in (data / "test").rglob("*.*"):
        image.unlink()
    with pytest.raises(UserError, match="the test split is empty"):
        load_splits(str(data))

    from conftest import jpeg_bytes, split_rows
    from datasets import Dataset

    folder = tmp_path / "nameless" / "data"
    folder.mkdir(parents=True)
    images, labels = split_rows(2, 0)
    for split in ("train", "test"):
        Dataset.from_dict(
            {"image": [{"bytes": jpeg_bytes(im), "path": None} for im in images], "label": labels}
        ).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    splits = load_splits(str(folder.parent))
    assert splits.class_names == ["class 0", "class 1", "class 2"]
    assert "has no class names" in capsys.readouterr().out


def test_export_safetensors_loads_in_predict_and_eval(reference_run, tmp_path, capsys):
    import eval as eval_tool
    import export
    import predict

    reference = reference_run[0] / "reference"
    export.main([str(reference), "--out", str(tmp_path / "export")])
    info = json.loads((tmp_path / "export" / "model.json").read_text())
    assert info["arch"] == FAST_ARCH and info["resolution"] == 32 and len(info["class_names"]) == 3
    assert info["mean"] == [0.485, 0.456, 0.406]
    with pytest.raises(UserError, match="export folder .* already exists; pass --overwrite"):
        export.main([str(reference), "--out", str(tmp_path / "export")])

    image = tmp_path / "car.png"
    load_splits(info["data"]).eval.open(0).save(image)
    capsys.readouterr()
    predict.main([str(reference), str(image), "--json"])
    from_checkpoint = json.loads(capsys.readouterr().out)
    predict.main([str(tmp_path / "export" / "model.safetensors"), str(image), "--json"])
    from_safetensors = json.loads(capsys.readouterr().out)
    assert from_safetensors == from_checkpoint

    eval_tool.main([str(tmp_path / "export"), "--out", str(tmp_path / "eval"), "--num-gradcam", "0", "--workers", "0"])
    eval_tool.main([str(reference), "--out", str(tmp_path / "eval_pt"), "--num-gradcam", "0", "--workers", "0"])
    assert (tmp_path / "eval" / "predictions.csv").read_text() == (tmp_path / "eval_pt" / "predictions.csv").read_text()


def test_damaged_safetensors_is_one_clear_line(tmp_path):
    from cars.inference import read_model_file

    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(UserError, match="cannot read .*model.safetensors: .*damaged or not a safetensors file"):
        read_model_file(tmp_path / "model.safetensors")


def test_mid_epoch_checkpoints_resume_exactly(reference_run, tmp_path, monkeypatch):
    real = engine.F.cross_entropy
    calls = {"n": 0}

    def interrupt_in_epoch_2(
        *args, **kwargs
    ):  # calls 1-3: epoch 1's steps, 4: its evaluation, 5-6: epoch 2's first steps
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.F, "cross_entropy", interrupt_in_epoch_2)
    run_dir = tmp_path / "mid"
    with pytest.raises(SystemExit) as exit:
        train.main([*run_args(reference_run, run_dir), "--save-every-steps", "1"])
    assert exit.value.code == 130
    last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 1 and last["progress"]["steps"] == 2  # two of epoch 2's three steps are kept
    monkeypatch.undo()
    train.main(["--resume", str(run_dir)])
    assert_same_run(reference_run[0] / "reference", run_dir)


def test_resume_refuses_to_stretch_a_cosine_schedule(tmp_path, capsys):
    """A cosine laid over 2 epochs, stretched to 3, would raise the lr again: refused, the run untouched."""
    from conftest import write_hub_folder

    data = write_hub_folder(tmp_path / "data")
    run_dir = tmp_path / "cosine"
    train.main(tiny_args(data, run_dir, "--scheduler", "cosine", arch=FAST_ARCH))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(SystemExit) as exit:
        run_cli(train.main, ["--resume", str(run_dir), "--epochs", "3"])
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        error.startswith(f"error: --epochs 3 would change the cosine schedule of {run_dir}")
        and f"--weights {run_dir}/last.pt" in error
    )
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_extending_a_step_schedule_never_raises_the_lr_after_warmup(tmp_path):
    from conftest import write_hub_folder

    data = write_hub_folder(tmp_path / "data")
    run_dir = tmp_path / "step"
    train.main(
        tiny_args(
            data, run_dir, "--warmup-epochs", "1", "--step-size", "2", "--gamma", "0.5", "--epochs", "3", arch=FAST_ARCH
        )
    )
    train.main(["--resume", str(run_dir), "--epochs", "5"])
    lrs = [row["lr"] for row in read_metrics(run_dir / "metrics.csv")]
    assert len(lrs) == 5 and lrs[0] < lrs[1]  # warmup
    assert (
        all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
        and lrs[1] == pytest.approx(0.01)
        and lrs[4] == pytest.approx(0.0025)
    )


def test_a_run_saved_without_mixed_precision_resumes_with_it():
    """CPU (no AMP, an empty scaler state) -> CUDA (AMP on): the scaler starts afresh. And back."""
    saved_on_cpu = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved_on_cpu == {}
    with_amp = torch.amp.GradScaler("cpu", enabled=True)  # stands in for CUDA's: the same class and state
    with pytest.raises(RuntimeError):
        with_amp.load_state_dict(saved_on_cpu)  # what resuming did before
    optim.load_scaler_state(with_amp, saved_on_cpu)
    assert with_amp.get_scale() == 65536.0

    with_amp.scale(torch.ones(()))
    without = torch.amp.GradScaler("cpu", enabled=False)
    optim.load_scaler_state(without, with_amp.state_dict())
    assert not without.is_enabled()


def test_written_files_and_folders_follow_the_umask(tmp_path):
    """Reports, plots, CSVs and checkpoints are shared like any file the user writes (0644 under umask 022)."""
    from conftest import write_hub_folder

    from cars.demo import write_demo

    data = write_hub_folder(tmp_path / "data")
    old = os.umask(0o022)
    try:
        run_dir = tmp_path / "run"
        train.main(tiny_args(data, run_dir, "--epochs", "1", arch=FAST_ARCH))
        modes = {p.name: p.stat().st_mode & 0o777 for p in run_dir.iterdir()}
        assert {"best.pt", "last.pt", "metrics.csv", "summary.json", "config.toml", "curves.png"} <= set(modes)
        assert set(modes.values()) == {0o644}, modes
        write_demo(tmp_path / "demo", train_per_class=1, test_per_class=1)
        assert (tmp_path / "demo").stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        atomic_write(tmp_path / "private.txt", lambda file: file.write(b"x"))
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def rising_accuracy(monkeypatch):
    """Every evaluation 10 points better than the one before: each epoch is a new best, whatever the model does."""
    real, calls = train.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(None)
        return engine.EpochResult(real(*args, **kwargs).loss, 10.0 * len(calls), 18)

    monkeypatch.setattr(train, "evaluate", evaluate)


def test_best_pt_never_falls_behind_the_records(tmp_path, hub_folder, monkeypatch, capsys):
    """An interruption between the epoch's two checkpoints leaves best.pt ahead of last.pt, never behind its history."""
    rising_accuracy(monkeypatch)
    real_save, written = run_state.save_checkpoint, []

    def save(path, checkpoint):
        written.append(path.name)
        if (
            len(written) == 5
        ):  # last.pt at epoch 0; best.pt and last.pt of epoch 1; then epoch 2's two files: the second
            raise KeyboardInterrupt
        real_save(path, checkpoint)

    monkeypatch.setattr(run_state, "save_checkpoint", save)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        train.main(tiny_args(hub_folder, run_dir, "--epochs", "3", arch=FAST_ARCH))
    last, best = load_checkpoint(run_dir / "last.pt"), load_checkpoint(run_dir / "best.pt")
    history_best = max(last["history"], key=lambda r: r["eval_acc"])["epoch"]
    assert best["epoch"] == history_best or best["epoch"] > last["epoch"], (best["epoch"], history_best, last["epoch"])
    assert json.loads((run_dir / "summary.json").read_text())["epochs_done"] == last["epoch"] == 1
    assert "last.pt holds epoch 1. Resume" in (run_dir / "train.log").read_text()
    monkeypatch.setattr(run_state, "save_checkpoint", real_save)
    train.main(["--resume", str(run_dir)])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_epoch"] == load_checkpoint(run_dir / "best.pt")["epoch"] == 3

    # a run left inconsistent by an older version is refused, in one line, and left as it was
    stale = load_checkpoint(run_dir / "best.pt")
    save_checkpoint(run_dir / "best.pt", {**stale, "epoch": 2})
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="best.pt holds epoch 2 but the run's records name epoch 3 as the best"):
        train.main(["--resume", str(run_dir), "--epochs", "4"])
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_the_interrupt_message_names_the_epoch_last_pt_holds(tmp_path, hub_folder, monkeypatch):
    def interrupted(*args, **kwargs):  # Ctrl-C after epoch 2's files are written, while its curves are drawn
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "plot_curves", interrupted)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        train.main(tiny_args(hub_folder, run_dir, "--epochs", "2", arch=FAST_ARCH))
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2
    assert "interrupted in epoch 2; last.pt holds epoch 2. Resume" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["epochs_done"] == 2


def test_a_resume_that_switches_the_cache_is_exact(tmp_path, hub_folder):
    """--cache off and the cache draw the same batches in the same order for a seed: switching on resume changes
    nothing."""
    reference, switched = tmp_path / "reference", tmp_path / "switched"
    train.main(tiny_args(hub_folder, reference, "--epochs", "2", "--augment", "heavy", arch=FAST_ARCH))
    train.main(tiny_args(hub_folder, switched, "--epochs", "1", "--augment", "heavy", "--cache", "off", arch=FAST_ARCH))
    train.main(["--resume", str(switched), "--epochs", "2", "--cache", "auto"])
    assert_same_run(reference, switched)


def test_a_resume_that_fails_changes_nothing_in_the_run_folder(tmp_path, hub_folder):
    run_dir = tmp_path / "run"
    train.main(tiny_args(hub_folder, run_dir, "--epochs", "1", arch=FAST_ARCH))
    last = load_checkpoint(run_dir / "last.pt")
    del last["model"]["fc.weight"]  # the weights of another model, or a damaged file
    save_checkpoint(run_dir / "last.pt", last)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(UserError, match="last.pt does not fit this run .*Nothing in .* was changed"):
        train.main(["--resume", str(run_dir), "--epochs", "2"])
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # config.toml, train.log, events, summary.json


def test_random_streams_are_restored_per_process_whatever_the_job_size():
    """What each process of a job saved is restored in the process of the same rank; a process the checkpoint has no
    state for keeps its own stream. (On a CPU the GPU part is absent: restore_rng's pick of this process's own GPU
    stream from an older checkpoint's list of every GPU is not exercised here.)"""
    from cars.runtime import restore_rng, rng_state, seed_process

    states = []
    for rank in range(2):  # a job of two processes saves each one's streams
        torch.manual_seed(0)
        seed_process(0, rank)
        states.append(rng_state())

    def next_draw(rank):
        restore_rng(states, rank)
        return torch.rand(3)

    assert torch.equal(next_draw(0), next_draw(0)) and torch.equal(next_draw(1), next_draw(1))
    assert not torch.equal(next_draw(0), next_draw(1))  # two processes, two streams
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    restore_rng(states, 2)  # a third process, new to the job: nothing was saved for it, its stream is left alone
    assert torch.equal(torch.rand(3), expected)
    restore_rng(states[0])  # a checkpoint of one process, as written before there was a state per process
    assert torch.equal(torch.rand(3), next_draw(0))
