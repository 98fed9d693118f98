import dataclasses
import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import FAST_ARCH, FixedBatches, jpeg_bytes, quick_start, split_rows, tiny_args, tiny_run, write_hub_folder

import compare
import train
from cars import config as config_module
from cars import optim
from cars.checkpoint import load_checkpoint, read_state_dict
from cars.config import Config, load_saved
from cars.errors import run_cli
from cars.models import build_model
from cars.report import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_pretrained):
    """The offline demo, fine-tuned once for the tests below as the README runs it, from the session's small
    demo-pretrained file (the real pretraining takes minutes; docs/lessons.md has what it gives)."""
    run_dir = tmp_path_factory.mktemp("demo") / "demo"
    command = [str(ROOT / arg) if (ROOT / arg).is_file() else arg for arg in quick_start()["train.py"]]
    # --config configs/demo.toml, shortened: its cosine schedule laid over fewer epochs
    train.main([*command, "--run-dir", str(run_dir), "--epochs", str(DEMO["epochs"])])
    return run_dir


DEMO = {**tomllib.loads((ROOT / "configs" / "demo.toml").read_text()), "epochs": 4}


def test_the_demo_is_a_fine_tune_of_the_demo_pretrained_weights(demo_run, demo_pretrained):
    """What it reaches is measured in docs/lessons.md with the real pretraining, not asserted on the tests' small one;
    here: it ran to the end, from those weights, and the training moved them."""
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["selected_on"] == "test" and summary["epochs"] == DEMO["epochs"]
    assert DEMO["weights"] == "demo-pretrained" and "(demo-pretrained weights)" in (demo_run / "train.log").read_text()
    start, trained = read_state_dict(demo_pretrained), load_checkpoint(demo_run / "last.pt")["model"]
    assert not torch.equal(start["conv1.0.weight"], trained["conv1.0.weight"]), "the backbone was fine-tuned"


def test_the_demo_metrics_follow_its_cosine_schedule(demo_run):
    rows = read_metrics(demo_run / "metrics.csv")
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "eval_loss", "eval_acc", "seconds"]
    assert [r["epoch"] for r in rows] == list(range(1, DEMO["epochs"] + 1))
    for r in rows:  # the schedule, as configured, read back from the run
        expected = DEMO["lr"] * (1 + math.cos(math.pi * (r["epoch"] - 1) / DEMO["epochs"])) / 2
        assert r["lr"] == pytest.approx(expected, rel=1e-6)


def test_the_demo_summary_names_the_best_epoch_of_its_metrics(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    rows = read_metrics(demo_run / "metrics.csv")
    best_row = max(rows, key=lambda r: r["eval_acc"])
    assert summary["best_epoch"] == best_row["epoch"] and summary["best_eval_acc"] == best_row["eval_acc"]
    assert summary["final_eval_acc"] == rows[-1]["eval_acc"] and summary["epochs"] == DEMO["epochs"]
    assert summary["seconds"] == pytest.approx(sum(r["seconds"] for r in rows), abs=0.1)


def test_the_demo_checkpoints_hold_the_best_and_the_last_epoch(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    best = load_checkpoint(demo_run / "best.pt")
    assert best["epoch"] == summary["best_epoch"] and best["metric"] == pytest.approx(summary["best_eval_acc"])
    assert best["config"]["arch"] == "shufflenet_v2_x0_5" and len(best["class_names"]) == 10
    last = load_checkpoint(demo_run / "last.pt")
    assert last["epoch"] == DEMO["epochs"] and {"optimizer", "scheduler", "scaler", "rng", "history"} <= set(last)
    assert [r["epoch"] for r in last["history"]] == list(range(1, DEMO["epochs"] + 1))


def test_the_demo_records_its_recipe(demo_run):
    saved = tomllib.loads((demo_run / "config.toml").read_text())
    assert saved["epochs"] == DEMO["epochs"] and saved["lr"] == DEMO["lr"] and saved["run_dir"] == str(demo_run)
    assert Config(**saved).validate() is not None
    assert (demo_run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_py_explains_the_demo_run(demo_run):
    """As the README shows: the report's numbers are the run's."""
    from test_eval import check_eval_folder

    import eval as eval_tool
    from cars.demo import CLASS_NAMES

    summary = json.loads((demo_run / "summary.json").read_text())
    # beside it, the same recipe from random weights (another seed) and a decoy that differs in its lr: hand-made
    # run folders with known accuracies
    recipe = load_saved(demo_run / "config.toml")
    for name, changes, accuracy in (("a-decoy", {"lr": 0.1}, 99.0), ("scratch", {"seed": 3}, 42.5)):
        (demo_run.parent / name).mkdir()
        dataclasses.replace(recipe, weights="none", **changes).save(demo_run.parent / name / "config.toml")
        finished = {"status": "finished", "selected_on": "test", "best_eval_acc": accuracy}
        (demo_run.parent / name / "summary.json").write_text(json.dumps(finished))
    command = quick_start()["eval.py"]  # runs/demo
    eval_tool.main([str(demo_run) if arg == "runs/demo" else arg for arg in command] + ["--corruptions"])
    report = check_eval_folder(demo_run / "eval", CLASS_NAMES)
    top1, (layer, probe) = report["top1"], list(report["transfer"]["probe"].items())[-1]
    assert report["pretraining"] == {
        "scratch_run": str(demo_run.parent / "scratch"),
        "scratch_acc": 42.5,
        "gain": pytest.approx(top1 - 42.5),
        "probe_acc": probe,
    }
    opening = (demo_run / "eval" / "report.md").read_text().split("## What pretraining bought\n\n")[1]
    assert opening.startswith(
        f"From random weights, the same recipe (`{demo_run.parent / 'scratch'}`) reaches 42.5% on the test split; "
        f"from `demo-pretrained` this run reaches {top1:.1f}%: pretraining bought **{top1 - 42.5:+.1f} points**."
    )
    assert (
        f"linear probe on the start's frozen features ({layer}, what the head reads), fitted on the 240 images the run "
        f"trained on, reaches {probe:.1f}%" in opening
    )
    assert report["top1"] == pytest.approx(summary["best_eval_acc"], abs=0.01) and report["images"] == 300
    corruptions = report["corruptions"]
    assert list(corruptions["accuracy"]) == ["gaussian_noise", "motion_blur", "pixelate"]
    assert corruptions["mean"] == pytest.approx(sum(corruptions["accuracy"].values()) / 3)
    markdown = (demo_run / "eval" / "report.md").read_text()
    for name, accuracy in corruptions["accuracy"].items():
        assert f"| {name} | {accuracy:.2f}% | {accuracy - report['top1']:+.2f} |" in markdown
    if report["top1"] < 100:
        assert "![CAM on mistakes of the worst classes](gradcam_worst.png)" in markdown


def test_predict_py_names_the_car_of_a_photo_as_eval_py_did(demo_run, tmp_path, capsys):
    """The README's predict.py command on a test photo whose answer eval.py gave with the most confidence (so that
    no rounding between a batch of one and a batch of 64 can change it)."""
    from test_eval import read_csv

    import predict
    from cars.data import load_splits
    from cars.demo import CLASS_NAMES

    if not (demo_run / "eval" / "predictions.csv").is_file():
        import eval as eval_tool

        eval_tool.main([str(demo_run), "--num-gradcam", "0", "--transfer", "off"])
    rows = read_csv(demo_run / "eval" / "predictions.csv")
    surest = max(rows, key=lambda row: float(row["confidence"]))
    photo = tmp_path / "car.png"
    load_splits("demo").eval.open(int(surest["index"])).save(photo)
    replace = {"runs/demo": str(demo_run), "examples/car.png": str(photo), "cams/": str(tmp_path / "cams")}
    command = quick_start()["predict.py"]  # runs/demo examples/car.png --cam cams/
    capsys.readouterr()
    predict.main([replace.get(arg, arg) for arg in command])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(photo) and printed[1].split()[0] == "1."
    assert " ".join(printed[1].split()[1:-1]) == CLASS_NAMES[int(surest["predicted"])]
    assert (tmp_path / "cams" / "car_cam.png").is_file()


def run_tiny(tmp_path, data, *extra):
    run_dir = tmp_path / "run"
    train.main(tiny_args(data, run_dir, *extra, arch=FAST_ARCH))
    return run_dir


def test_eval_every_skips_evaluations_but_always_evaluates_the_last_epoch(tmp_path, hub_folder):
    run_dir = run_tiny(tmp_path, hub_folder, "--epochs", "3", "--eval-every", "2")
    rows = read_metrics(run_dir / "metrics.csv")
    assert [r["eval_acc"] is not None for r in rows] == [False, True, True]
    assert load_checkpoint(run_dir / "best.pt")["epoch"] in (2, 3)
    compare.main([str(run_dir)])  # the table and the plots take runs with gaps


def test_val_split_selects_on_val_and_reports_test(tmp_path, hub_folder):
    import eval as eval_tool

    run_dir = run_tiny(tmp_path, hub_folder, "--val-split", "0.34")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["selected_on"] == "val"
    best = load_checkpoint(run_dir / "best.pt")
    rows = read_metrics(run_dir / "metrics.csv")
    assert best["metric_name"] == "val_acc" and best["metric"] == max(r["eval_acc"] for r in rows)
    # eval.py reads best.pt, on test
    eval_tool.main([str(run_dir), "--out", str(tmp_path / "eval"), "--num-gradcam", "0"])
    report = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert report["images"] == 9 and summary["test_acc_of_best"] == pytest.approx(report["top1"], abs=1e-4)
    # its expected calibration error too: eval.py fits the temperature on the same validation split, and measures
    # the uncalibrated ECE on the same whole test split
    assert report["calibration"]["images"] == 9
    assert summary["test_ece_of_best"] == pytest.approx(report["calibration"]["ece"], abs=1e-3)


def test_freeze_epochs_keep_backbone_then_release_it(tmp_path, hub_folder):
    run = tiny_run(hub_folder, tmp_path / "run", "--freeze-epochs", "1", "--lr", "0.05")

    def snapshot():
        return {k: v.clone() for k, v in run.raw_model.state_dict().items()}

    before = snapshot()
    train.train_epoch(run, 1)
    frozen = snapshot()
    backbone = [k for k in before if not k.startswith("fc.")]
    assert all(torch.equal(before[k], frozen[k]) for k in backbone), "weights and BatchNorm statistics stay put"
    assert not torch.equal(before["fc.weight"], frozen["fc.weight"]), "the head learns"

    train.train_epoch(run, 2)
    after = snapshot()
    assert not torch.equal(frozen["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(frozen["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])


def test_backbone_lr_mult_gives_two_learning_rates():
    model = build_model("resnet18", "none", 5)
    optimizer = optim.make_optimizer(Config(lr=0.01, backbone_lr_mult=0.1), model)
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [
        ("backbone", pytest.approx(0.001)),
        ("head", 0.01),
    ]
    adamw = optim.make_optimizer(Config(optimizer="adamw", lr=1e-3, weight_decay=0.05), model)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05


def lr_per_step(cfg: Config, steps_per_epoch: int) -> list[float]:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    scheduler = optim.make_scheduler(cfg, optimizer, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def lr_per_epoch(cfg: Config, steps_per_epoch: int = 3) -> list[float]:
    return lr_per_step(cfg, steps_per_epoch)[::steps_per_epoch]


def test_step_schedule_is_the_seeds_run_7():
    lrs = lr_per_epoch(Config())  # lr 0.1, /10 every 30 epochs, 90 epochs
    assert lrs[0] == lrs[29] == pytest.approx(0.1)
    assert lrs[30] == lrs[59] == pytest.approx(0.01)
    assert lrs[60] == lrs[89] == pytest.approx(0.001)


def test_cosine_schedule():
    lrs = lr_per_epoch(Config(scheduler="cosine", lr=0.2, epochs=10))
    assert lrs == pytest.approx([0.2 * (1 + math.cos(math.pi * e / 10)) / 2 for e in range(10)])
    per_step = lr_per_step(Config(scheduler="cosine", lr=0.2, epochs=2), steps_per_epoch=4)
    assert per_step == pytest.approx([0.2 * (1 + math.cos(math.pi * s / 8)) / 2 for s in range(8)])


def test_warmup_then_cosine_per_step():
    lrs = lr_per_step(Config(scheduler="cosine", lr=0.1, epochs=4, warmup_epochs=1), steps_per_epoch=5)
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])  # linear warmup reaches the base lr
    assert lrs[5:] == pytest.approx([0.1 * (1 + math.cos(math.pi * s / 15)) / 2 for s in range(15)])


def test_warmup_then_step_decay_keeps_drops_on_epoch_boundaries():
    lrs = lr_per_step(Config(lr=0.1, epochs=6, warmup_epochs=1, step_size=2, gamma=0.5), steps_per_epoch=2)
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.025])


def test_linear_lr_scaling():
    model = build_model("resnet18", "none", 5)
    optimizer = optim.make_optimizer(Config(lr=0.1, batch_size=32, lr_scaling="linear"), model)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.025, 0.025])


# --- bad input: one clear line, exit status 2, nothing written to an existing run -----------------


@pytest.fixture
def cli(capsys):
    """train.py's entry point in this process (a subprocess would spend 20 s importing torch here)."""

    def run(*args):
        capsys.readouterr()
        try:
            run_cli(train.main, [str(a) for a in args])
            code = 0
        except SystemExit as exit:
            code = exit.code
        return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)

    return run


def assert_clear_error(result, pattern):
    import re

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr  # progress bars may come first
    assert re.search(pattern, errors[0]), errors[0]


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--data", "/no/such/folder"], "dataset folder /no/such/folder does not exist"),
        (["--batch-size", "0"], "--batch-size must be positive, got 0"),
        (["--lr", "-0.1"], "--lr must be positive"),
        (["--val-split", "1.5"], r"--val-split must be in \[0, 1\)"),
        (["--freeze-epochs", "5", "--epochs", "5"], "--freeze-epochs .* must be smaller than --epochs"),
        (["--arch", "resnet500", "--data", "demo"], "unknown architecture 'resnet500'"),
        (["--weights", "IMAGENET9K", "--data", "demo"], "resnet50 has no weights named 'IMAGENET9K'"),
    ],
)
def test_bad_flags(cli, tmp_path, flags, pattern):
    assert_clear_error(cli("--run-dir", str(tmp_path / "r"), *flags), pattern)
    assert not (tmp_path / "r").exists()


def test_bad_config_files(cli, tmp_path):
    (tmp_path / "unknown.toml").write_text("learning_rate = 0.1\n")
    assert_clear_error(cli("--config", str(tmp_path / "unknown.toml")), "unknown key 'learning_rate'")
    (tmp_path / "type.toml").write_text('epochs = "ninety"\n')
    assert_clear_error(cli("--config", str(tmp_path / "type.toml")), "epochs must be int, got 'ninety'")
    assert_clear_error(cli("--config", str(tmp_path / "none.toml")), "config file .*none.toml does not exist")


def test_not_a_dataset_folder(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clear_error(cli("--data", str(tmp_path / "empty")), "is not a dataset folder I know")


def test_dataset_without_image_and_label_columns(cli, tmp_path):
    folder = write_hub_folder(tmp_path / "cols", columns=("picture", "target"))
    assert_clear_error(cli("--data", str(folder)), r"needs 'image' and 'label' \(missing: image, label\)")


def test_label_outside_class_range(cli, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = write_hub_folder(tmp_path / "labels")
    path = folder / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(path)  # ClassLabel refuses to encode 7, so edit the stored column directly
    labels = table.column("label").to_pylist()
    labels[4] = 7
    field = table.schema.field("label")
    pq.write_table(table.set_column(table.schema.get_field_index("label"), field, pa.array(labels, field.type)), path)
    assert_clear_error(
        cli("--data", str(folder)), r"label 7 of row 4 of the train split is outside the 3 classes \(0..2\)"
    )


def corrupt_dataset(tmp_path) -> Path:
    images, labels = split_rows(6, 1)
    images = [jpeg_bytes(im) for im in images]
    images[5] = images[5][: len(images[5]) // 2]  # truncated JPEG
    images[8] = b"not an image at all"
    return write_hub_folder(tmp_path / "corrupt", rows={"train": (images, labels)})


def test_corrupt_image_names_the_image(cli, tmp_path):
    folder = corrupt_dataset(tmp_path)
    # --workers 1: the error crosses a DataLoader worker and still arrives as one line
    result = cli(*tiny_args(folder, tmp_path / "run", "--workers", "1", arch=FAST_ARCH))
    assert_clear_error(result, r"cannot read image row (5|8) of the train split: .*--skip-bad-images")


def test_skip_bad_images_skips_and_counts(tmp_path):
    run_dir = run_tiny(tmp_path, corrupt_dataset(tmp_path), "--skip-bad-images")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_images"] == {"train": 2, "test": 0}


def test_existing_run_is_never_overwritten_without_flag(cli, tmp_path, hub_folder):
    run_dir = run_tiny(tmp_path, hub_folder)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    result = cli(*tiny_args(hub_folder, run_dir, "--epochs", "1", arch=FAST_ARCH))
    assert_clear_error(result, "run folder .* already exists; pass --overwrite")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before

    # an input error found later (bad weights) must not cost the run either, even with --overwrite
    result = cli(
        *tiny_args(hub_folder, run_dir, "--overwrite", "--weights", str(tmp_path / "missing.pth"), arch=FAST_ARCH)
    )
    assert_clear_error(result, "weights file .*missing.pth does not exist")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before

    train.main(tiny_args(hub_folder, run_dir, "--overwrite", "--epochs", "1", arch=FAST_ARCH))
    assert len(read_metrics(run_dir / "metrics.csv")) == 1


def test_two_stage_run_end_to_end(tmp_path, hub_folder):
    run_dir = run_tiny(
        tmp_path,
        hub_folder,
        "--freeze-epochs",
        "1",
        "--backbone-lr-mult",
        "0.1",
        "--optimizer",
        "adamw",
        "--lr",
        "0.001",
        "--augment",
        "heavy",
        "--dropout",
        "0.2",
        "--color-jitter",
        "0.2",
    )
    model = build_model(FAST_ARCH, "none", 3)
    model.load_state_dict(read_state_dict(run_dir / "last.pt"))


def test_train_py_help_documents_every_knob_and_bad_input_exits_2(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    bad = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--batch-size", "0"], capture_output=True, text=True, cwd=tmp_path
    )
    assert (bad.returncode, bad.stderr) == (2, "error: --batch-size must be positive, got 0\n")
    import dataclasses

    for field in dataclasses.fields(Config):
        assert f"--{field.name.replace('_', '-')}" in result.stdout
    assert "--no-amp" in result.stdout and "--overwrite" in result.stdout


def test_curves_are_drawn_before_the_first_evaluation(tmp_path):
    """With --eval-every N, the plot drawn every 30 s can come before any epoch was evaluated."""
    from cars.report import plot_curves

    rows = [dict(epoch=1, lr=0.1, train_loss=2.0, train_acc=10.0, eval_loss=None, eval_acc=None, seconds=1.0)]
    plot_curves(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (
            ["--train-crop", "resize-randomcrop", "--crop-scale", "0.5"],
            "--crop-scale 0.5 does nothing without --train-crop random-resized",
        ),
        (["--scheduler", "cosine", "--gamma", "0.5"], "--gamma 0.5 does nothing without --scheduler step"),
        (["--scheduler", "cosine", "--step-size", "10"], "--step-size 10 does nothing without --scheduler step"),
        (["--optimizer", "adamw", "--momentum", "0.5"], "--momentum 0.5 does nothing without --optimizer sgd"),
        (["--ema-half-life", "3"], r"--ema-half-life 3.0 does nothing without --ema \(and no --ema-decay\)"),
        (["--ema", "--ema-decay", "0.99", "--ema-half-life", "3"], "--ema-half-life 3.0 does nothing without --ema"),
    ],
)
def test_knobs_that_would_be_ignored_are_refused(cli, tmp_path, flags, pattern):
    assert_clear_error(cli("--run-dir", str(tmp_path / "r"), *flags), pattern)
    assert not (tmp_path / "r").exists()


def test_explicit_random_erasing_wins_over_the_heavy_default():
    from cars.transforms import extra_augmentation

    def erasing(cfg):
        return [op.p for op in extra_augmentation(cfg) if type(op).__name__ == "RandomErasing"]

    assert erasing(Config(augment="heavy")) == [0.25]
    assert erasing(Config(augment="heavy", random_erasing=0.6)) == [0.6]
    assert erasing(Config(random_erasing=0.3)) == [0.3] and erasing(Config()) == []


def test_a_training_step_never_waits_for_the_device(tmp_path, hub_folder, monkeypatch):
    """Loss and accuracy add up on the device; the host reads them when the progress bar refreshes, before a
    mid-epoch save and at the end: with no refresh due, 6 steps make exactly one read (the epoch's last)."""
    from cars.engine import Progress

    run = tiny_run(hub_folder, tmp_path / "run", "--save-every-steps", "4")
    run.train_batches = FixedBatches(
        [(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0])) for _ in range(6)]
    )
    saved = []  # a mid-epoch save reads the sums first, so the checkpoint holds them
    monkeypatch.setattr(train, "save_last", lambda run, epoch, progress: saved.append(Progress(**vars(progress))))
    monkeypatch.setattr(train, "PROGRESS_SECONDS", 1e9)
    reads = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor,
            name,
            lambda self, *a, _real=real, _name=name, **k: reads.append(_name) or _real(self, *a, **k),
        )
    progress = train.train_epoch(run, 1)
    monkeypatch.undo()
    assert reads == ["tolist", "tolist"], reads  # the mid-epoch save's read, and the epoch's last
    assert progress.result().images == 24
    assert [(p.steps, p.seen) for p in saved] == [(4, 16)] and saved[0].loss_sum > 0 and 0 <= saved[0].correct <= 16


def test_tensorboard_events_match_metrics_csv(tmp_path, hub_folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = run_tiny(tmp_path, hub_folder, "--epochs", "3", "--eval-every", "2", "--log-every-steps", "1")
    events = EventAccumulator(str(run_dir))
    events.Reload()
    rows = read_metrics(run_dir / "metrics.csv")
    for key, tag in (
        ("lr", "epoch/lr"),
        ("train_loss", "epoch/train_loss"),
        ("train_acc", "epoch/train_acc"),
        ("eval_loss", "epoch/test_loss"),
        ("eval_acc", "epoch/test_acc"),
    ):
        logged = {e.step: e.value for e in events.Scalars(tag)}
        # 18 images, batch 6: 3 steps an epoch
        expected = {int(r["epoch"]) * 3: r[key] for r in rows if r[key] is not None}
        assert logged.keys() == expected.keys(), tag
        assert all(logged[s] == pytest.approx(v, rel=1e-6) for s, v in expected.items()), tag
    steps = events.Scalars("step/train_loss")
    assert [e.step for e in steps] == list(range(1, 10)) and all(e.value > 0 for e in steps)
    # an epoch's mean training loss is the mean of its steps' losses (every batch has 6 images)
    assert sum(e.value for e in steps[:3]) / 3 == pytest.approx(rows[0]["train_loss"], rel=1e-5)


def test_tensorboard_keeps_one_point_per_epoch_and_tag_after_resumes(tmp_path, hub_folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = run_tiny(tmp_path, hub_folder, "--epochs", "1", "--log-every-steps", "1")
    train.main(["--resume", str(run_dir), "--epochs", "2"])  # resumed from the end of epoch 1, then of epoch 2
    train.main(["--resume", str(run_dir), "--epochs", "3"])
    events = EventAccumulator(str(run_dir))
    events.Reload()
    epochs = [int(r["epoch"]) for r in read_metrics(run_dir / "metrics.csv")]
    assert epochs == [1, 2, 3]
    for tag in ("epoch/lr", "epoch/train_loss", "epoch/train_acc", "epoch/test_loss", "epoch/test_acc"):
        assert [e.step for e in events.Scalars(tag)] == [3 * epoch for epoch in epochs], tag  # 3 steps an epoch
    assert [e.step for e in events.Scalars("step/train_loss")] == list(range(1, 10))


def test_early_stop_stops_after_n_evaluations_without_improvement_and_resumes(
    tmp_path, hub_folder, monkeypatch, capsys
):
    from cars.engine import EpochResult

    accuracies = iter([50.0, 60.0, 55.0, 58.0, 59.0, 70.0])  # scripted evaluations: the best is epoch 2

    def scripted(model, loader, device, description="eval", world=None, pad_to=None):
        return EpochResult(1.0, next(accuracies), 9)

    monkeypatch.setattr(train, "evaluate", scripted)
    run_dir = run_tiny(tmp_path, hub_folder, "--epochs", "6", "--early-stop", "2")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped early" and summary["epochs_done"] == 4 and summary["best_epoch"] == 2
    assert [r["eval_acc"] for r in read_metrics(run_dir / "metrics.csv")] == [50.0, 60.0, 55.0, 58.0]
    capsys.readouterr()
    compare.main([str(run_dir)])
    assert "| stopped early |" in capsys.readouterr().out

    train.main(["--resume", str(run_dir), "--early-stop", "3"])  # one more evaluation is allowed: 59 is still no better
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped early" and summary["epochs_done"] == 5
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.csv")] == [1, 2, 3, 4, 5]


def test_the_validation_split_stays_put_when_only_the_seed_changes(tmp_path, hub_folder, monkeypatch):
    held_out = []
    real = train.run_splits
    monkeypatch.setattr(train, "run_splits", lambda cfg: held_out.append(real(cfg).eval.indices) or real(cfg))
    held = ["--epochs", "1", "--val-split", "0.34"]
    for seed in (0, 1):
        train.main(tiny_args(hub_folder, tmp_path / f"seed{seed}", *held, "--seed", str(seed), arch=FAST_ARCH))
    train.main(tiny_args(hub_folder, tmp_path / "other", *held, "--split-seed", "5", arch=FAST_ARCH))
    assert held_out[0] == held_out[1] != held_out[2] and len(held_out[0]) == 6  # 2 of each class's 6 images
    assert tomllib.loads((tmp_path / "other" / "config.toml").read_text())["split_seed"] == 5
    # a run saved before --split-seed drew its split with --seed, and keeps it
    legacy = (tmp_path / "seed1" / "config.toml").read_text().replace("split_seed = 0\n", "")
    (tmp_path / "seed1" / "config.toml").write_text(legacy)
    assert config_module.load_saved(tmp_path / "seed1" / "config.toml").split_seed == 1


def test_split_seed_without_val_split_is_refused(cli, tmp_path, hub_folder):
    cli(
        train.main,
        tiny_args(hub_folder, tmp_path / "r", "--split-seed", "3", arch=FAST_ARCH),
        "--split-seed 3 does nothing without --val-split",
    )


def test_norm_weight_decay_gives_normalisation_weights_and_biases_their_own_decay():
    model = build_model("resnet18", "none", 3)
    norm_and_bias = {name for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)}
    expected = {f"{name}.{p}" for name in norm_and_bias for p in ("weight", "bias")} | {"fc.bias"}
    optimizer = optim.make_optimizer(Config(norm_weight_decay=0.0, weight_decay=0.1), model)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert {name for name, p in model.named_parameters() if decay_of[id(p)] == 0.0} == expected
    assert all(decay_of[id(p)] == 0.1 for name, p in model.named_parameters() if name not in expected)
    assert [g["name"] for g in optimizer.param_groups] == [
        "backbone",
        "backbone norm and bias",
        "head",
        "head norm and bias",
    ]
    # a step without gradients: only decay moves the weights, so the chosen ones stay and the others shrink by lr x
    # decay
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        assert (
            torch.equal(p, before[name]) if name in expected else torch.allclose(p, before[name] * (1 - 0.1 * 0.1))
        ), name
    default = optim.make_optimizer(Config(), model)  # the original runs': one decay for all, two groups
    assert [(g["name"], g["weight_decay"]) for g in default.param_groups] == [("backbone", 1e-4), ("head", 1e-4)]
