"""Hostile and careless inputs against every CLI: one `error:` line, a non-zero exit, no traceback,
and nothing of the user's lost."""

import io
import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, jpeg_bytes, split_rows, tiny_args, write_hub_folder, write_image_folder
from PIL import Image

import compare
import eval as eval_tool
import export
import lr_find
import predict
import train
from cars.errors import run_cli
from cars.report import read_metrics


def run(main, *args) -> tuple[int, str]:
    """An entry point as the shell runs it: its exit status and what it printed on stderr."""
    import contextlib
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            run_cli(main, [str(a) for a in args])
            code = 0
        except SystemExit as exit:
            code = exit.code
    return code, stderr.getvalue()


def refused(result, pattern: str) -> None:
    code, stderr = result
    assert code == 2 and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.strip().endswith(errors[0]), stderr
    assert re.search(pattern, errors[0]), errors[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_hub_folder(tmp_path_factory.mktemp("hostile") / "data")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("hostile-run") / "run"
    train.main(tiny_args(data, run_dir, "--epochs", "1"))
    return run_dir


# --- data loss --------------------------------------------------------------------------------


def test_overwrite_never_deletes_a_dataset_or_the_checkpoint_being_read(tmp_path, trained):
    dataset = write_image_folder(tmp_path / "images")
    before = snapshot(dataset)
    refused(
        run(train.main, *tiny_args(dataset, dataset, "--overwrite")),
        r"is not a run folder this project wrote \(holds 'test', 'train'",
    )
    assert snapshot(dataset) == before

    before = snapshot(trained)
    refused(
        run(eval_tool.main, trained, "--out", trained, "--overwrite"),
        "is not an eval folder this project wrote .*'best.pt'",
    )
    assert snapshot(trained) == before

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my thesis")
    refused(run(lr_find.main, "--data", dataset, "--out", tmp_path / "mine", "--overwrite"), "holds 'notes.txt'")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my thesis"


def test_overwrite_replaces_what_the_project_wrote(tmp_path, data, trained):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / ".last.pt.abc123").write_bytes(b"left by a killed write")
    train.main(tiny_args(data, run_dir, "--epochs", "1", "--overwrite"))
    assert not (run_dir / ".last.pt.abc123").exists() and len(read_metrics(run_dir / "metrics.csv")) == 1


def test_cams_of_images_that_share_a_stem_are_all_kept(tmp_path, trained):
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    (tmp_path / "a").mkdir()
    paths = [tmp_path / "car.jpg", tmp_path / "car.png", tmp_path / "a" / "car.jpg"]
    for path in paths:
        image.save(path)
    assert run(predict.main, trained, *paths, "--cam", tmp_path / "cams", "--json")[0] == 0
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == [
        "car_cam.png",
        "car_jpg_cam.png",
        "car_png_cam.png",
    ]


def test_resume_refuses_a_run_whose_process_is_alive(tmp_path, trained):
    run_dir = tmp_path / "live"
    shutil.copytree(trained, run_dir)
    summary = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(), "epochs": 1}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    before = snapshot(run_dir)
    refused(
        run(train.main, "--resume", run_dir, "--epochs", "2"),
        f"still being trained by process {os.getpid()} on .*kill {os.getpid()}",
    )
    assert snapshot(run_dir) == before


def test_a_failed_resume_changes_nothing(tmp_path, trained, data):
    run_dir = tmp_path / "moved"
    shutil.copytree(trained, run_dir)
    config = (run_dir / "config.toml").read_text()
    other = write_hub_folder(tmp_path / "other", classes=[*CLASSES, "Tesla Model S Sedan 2012"])
    (run_dir / "config.toml").write_text(config.replace(str(data), str(other)))  # the dataset changed under the run
    before = snapshot(run_dir)
    refused(run(train.main, "--resume", run_dir, "--epochs", "2"), "the classes of .* changed since .* was trained")
    assert snapshot(run_dir) == before


# --- wrong messages -------------------------------------------------------------------------------


def test_a_checkpoint_that_does_not_fit_says_why(tmp_path, data, trained):
    state = torch.load(trained / "best.pt")["model"]
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(state, tmp_path / "bent.pth")
    pattern = (
        r"does not fit resnet18: 0 missing, 0 unexpected, 1 wrongly shaped tensors \(first: layer1.0.conv1.weight\)"
    )
    refused(run(train.main, *tiny_args(data, tmp_path / "r", "--weights", tmp_path / "bent.pth")), pattern)
    refused(run(eval_tool.main, tmp_path / "bent.pth", "--arch", "resnet18", "--out", tmp_path / "e"), pattern)
    refused(run(export.main, tmp_path / "bent.pth", "--arch", "resnet18", "--num-classes", "3"), pattern)


@pytest.mark.parametrize("content", [os.urandom(300), b"hello, I am a text file\n"], ids=["garbage", "text"])
def test_a_file_that_is_not_a_checkpoint_is_named_as_such(tmp_path, content):
    (tmp_path / "model.pt").write_bytes(content)
    code, stderr = run(predict.main, tmp_path / "model.pt", "--arch", "resnet18", tmp_path / "x.jpg")
    refused((code, stderr), r"cannot read checkpoint .*model.pt: .*not a PyTorch checkpoint")
    assert "weights_only=False" not in stderr and "weights_only` set to `False" not in stderr


@pytest.mark.parametrize(
    "text, pattern",
    [
        ('{"arch": "resnet18", "resolution": 32, "class_names": ', "cannot read .*model.json"),
        ('["resnet18", 32]', "is not an export's model.json"),
        ('{"arch": "resnet18", "resolution": "big", "class_names": ["a"]}', "is not an export's model.json"),
    ],
)
def test_a_damaged_export_is_one_line(tmp_path, trained, text, pattern):
    export.main([str(trained), "--out", str(tmp_path / "export")])
    (tmp_path / "export" / "model.json").write_text(text)
    refused(run(predict.main, tmp_path / "export", tmp_path / "x.jpg"), pattern)


# --- config and flags -----------------------------------------------------------------------------


def test_bad_config_files_are_one_line(tmp_path):
    (tmp_path / "binary.toml").write_bytes(os.urandom(64) + b"\xff\xfe")
    refused(run(train.main, "--config", tmp_path / "binary.toml"), "is not text")
    refused(run(train.main, "--config", tmp_path), "cannot read config file")
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbfepochs = 3\n")
    refused(run(train.main, "--config", tmp_path / "bom.toml"), "byte-order mark")
    (tmp_path / "nan.toml").write_text("lr = nan\n")
    refused(
        run(train.main, "--config", tmp_path / "nan.toml", "--run-dir", tmp_path / "r"),
        "--lr must be a finite number, got nan",
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--seed", str(2**40)], r"--seed must be in 0\.\.4294967295"),
        (["--seed", "-1"], "--seed must be in"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--workers", "1000"], "--workers 1000 is more than 64"),
        (["--cache", ""], "--cache is empty"),
        (["--arch", "googlenet", "--weights", "none", "--data", "demo"], "googlenet is not supported"),
        (["--arch", "inception_v3", "--weights", "none", "--data", "demo"], "inception_v3 is not supported"),
        (
            ["--arch", "vit_b_16", "--weights", "none", "--resolution", "64", "--data", "demo"],
            "vit_b_16 takes 224 x 224 px images only",
        ),
    ],
)
def test_nonsense_flags_are_refused_before_the_run_folder_exists(tmp_path, flags, pattern):
    refused(run(train.main, "--run-dir", tmp_path / "r", *flags), pattern)
    assert not (tmp_path / "r").exists()


def test_output_paths_that_are_files(tmp_path, data, trained):
    (tmp_path / "file").write_text("x")
    refused(run(train.main, *tiny_args(data, tmp_path / "file")), "is a file, not a folder")
    refused(run(eval_tool.main, trained, "--out", tmp_path / "file"), "is a file, not a folder")
    refused(run(export.main, trained, "--out", tmp_path / "file"), "is a file, not a folder")
    refused(run(predict.main, trained, tmp_path / "file", "--cam", tmp_path / "file"), "cannot make the --cam folder")
    refused(run(train.main, *tiny_args(data, tmp_path / "file" / "run")), r"cannot write .*file/run")
    refused(run(compare.main, trained, "--out", tmp_path / "file" / "cmp"), "cannot write")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("tool", ["eval", "predict"])
def test_a_negative_resolution_is_refused_and_leaves_no_folder(tmp_path, trained, tool):
    if tool == "eval":
        refused(
            run(eval_tool.main, trained, "--resolution", "-5", "--out", tmp_path / "e"),
            "--resolution must be at least 32",
        )
        assert not (tmp_path / "e").exists()
    else:
        refused(
            run(predict.main, trained, tmp_path / "x.jpg", "--resolution", "-5"), "--resolution must be at least 32"
        )


# --- data -----------------------------------------------------------------------------------------


def test_string_labels_are_one_line(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "strings" / "data"
    folder.mkdir(parents=True)
    images, labels = split_rows(2, 0)
    for split in ("train", "test"):
        Dataset.from_dict(
            {
                "image": [{"bytes": jpeg_bytes(im), "path": None} for im in images],
                "label": [CLASSES[label] for label in labels],
            }
        ).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    refused(run(train.main, *tiny_args(folder.parent, tmp_path / "r")), "label column of .* holds string values")


def test_odd_files_in_an_image_folder(tmp_path):
    data = write_image_folder(tmp_path / "images")
    red = data / "train" / CLASSES[0]
    (red / "loop").symlink_to(red)  # a symlink loop used to multiply the images
    (red / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(red / "anim.gif")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(os.fsdecode(os.fsencode(str(red)) + b"/caf\xe9.jpg"))  # not UTF-8
    (red / "readme.txt").write_text("not an image")
    run_dir = tmp_path / "run"
    code, stderr = run(train.main, *tiny_args(data, run_dir, "--epochs", "1", "--skip-bad-images"))
    assert code == 0, stderr
    assert "Traceback" not in stderr
    log = (run_dir / "train.log").read_text()
    assert "21 train" in log  # 18 + the GIF + the non-UTF-8 name + the dangling link, each once
    # the dangling link (if drawn)
    assert json.loads((run_dir / "summary.json").read_text())["skipped_images"]["train"] <= 1

    (data / "train" / "Empty Class 2020").mkdir()
    refused(run(train.main, *tiny_args(data, tmp_path / "r2")), "class folder .*Empty Class 2020 has no images")


def test_a_decompression_bomb_is_an_unreadable_image(tmp_path, trained):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 megapixels: PIL refuses to decode it
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good)
    code, stderr = run(predict.main, trained, bomb, good, "--json")
    assert code == 1 and "Traceback" not in stderr and "cannot read image" in stderr and "bomb.png" in stderr

    from cars.data import FileSplit, read_rgb
    from cars.errors import UserError

    with pytest.raises(UserError, match="cannot read image .*bomb.png"):
        read_rgb(FileSplit([(str(bomb), 0)], "train"), 0)


def exif_block(entries) -> bytes:
    """A JPEG's EXIF segment written by hand: one little-endian TIFF IFD of (tag, type, count, value) entries."""
    import struct

    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0") for tag, kind, count, value in entries
    )
    return b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def hostile_images(folder: Path) -> dict[str, Path]:
    """Files that once escaped read_rgb with a traceback, or blocked it, by what they are."""
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, entries in {
        # an orientation, and beside it a resolution stored as text (PIL: TypeError) or a tag too short (struct.error)
        "exif-text-resolution": [(0x0112, 3, 1, struct.pack("<H", 6)), (0x011A, 2, 4, b"ab\0\0")],
        "exif-short-tag": [(0x0112, 3, 1, struct.pack("<H", 6)), (0x0213, 2, 2, b"a\0")],
    }.items():
        made[name] = folder / f"{name}.jpg"
        Image.new("RGB", (40, 20), (200, 30, 30)).save(made[name], "JPEG", exif=exif_block(entries))
    qoi = io.BytesIO()
    Image.effect_noise((32, 32), 50).convert("RGB").save(qoi, "QOI")
    made["truncated-qoi"] = folder / "truncated.jpg"  # under any name: PIL goes by the bytes
    made["truncated-qoi"].write_bytes(qoi.getvalue()[:40])  # PIL's QOI decoder: IndexError
    made["fifo"] = folder / "fifo.jpg"
    os.mkfifo(made["fifo"])  # nobody writes it: opening it to read would wait forever
    return made


def test_images_that_used_to_raise_or_block_are_upright_or_unreadable(tmp_path, trained):
    from cars.data import FileSplit, read_rgb
    from cars.errors import UserError

    images = hostile_images(tmp_path / "images")
    split = FileSplit([(str(p), 0) for p in images.values()], "input")
    for i, name in enumerate(images):
        if name.startswith("exif"):  # its EXIF cannot be parsed: kept as stored, 40 x 20
            assert read_rgb(split, i).size == (40, 20)
        else:
            with pytest.raises(UserError, match="cannot read image"):
                read_rgb(split, i)
    code, stderr = run(predict.main, trained, *images.values(), "--json")
    assert code == 1 and "Traceback" not in stderr, stderr
    assert stderr.count("cannot read image") == 2 and "not a regular file" in stderr


def test_a_val_split_that_holds_out_nothing_is_refused(tmp_path):
    data = write_hub_folder(tmp_path / "single", per_class=(1, 1))
    refused(
        run(train.main, *tiny_args(data, tmp_path / "r", "--val-split", "0.1")), "--val-split 0.1 holds out no image"
    )
    assert not (tmp_path / "r").exists()


# --- compare.py -----------------------------------------------------------------------------------


def test_compare_shows_damaged_runs_as_unreadable_and_the_others(tmp_path, trained, capsys):
    runs = {}
    for name in ("good", "metrics", "summary", "config"):
        runs[name] = tmp_path / name
        shutil.copytree(trained, runs[name])
    (runs["metrics"] / "metrics.csv").write_text("epoch,lr\n1,abc\n")
    (runs["summary"] / "summary.json").write_text('{"status": "fini')
    with open(runs["config"] / "config.toml", "a") as file:
        file.write("colour = 'red'\n")
    capsys.readouterr()
    compare.main([str(p) for p in runs.values()])
    rows = {
        Path(line.split("|")[1].strip()).name: line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ")
    }
    assert "| finished |" in rows["good"] and "| crashed |" in rows["summary"]
    assert "| unreadable |" in rows["metrics"] and "metrics.csv is damaged" in rows["metrics"]
    assert "| unreadable |" in rows["config"] and "unknown key 'colour'" in rows["config"]


def test_a_crash_leaves_the_run_marked_crashed_not_running(tmp_path, data, monkeypatch):
    def failing_step(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(train, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train.main(tiny_args(data, tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "crashed" and summary["epochs_done"] == 0
    assert torch.load(tmp_path / "run" / "last.pt")["epoch"] == 0  # still resumable from its start


def test_a_last_step_that_blows_the_weights_up_is_a_divergence(tmp_path, data):
    """D12: one step at lr 1e30 leaves a finite training loss and weights that give a NaN evaluation loss: the run
    diverged, it did not finish with one class predicted everywhere."""
    run_dir = tmp_path / "run"
    code, stderr = run(train.main, *tiny_args(data, run_dir, "--epochs", "1", "--batch-size", "18", "--lr", "1e30"))
    refused((code, stderr), r"training diverged in epoch 1: the test loss became nan after epoch 1")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"
    assert not (run_dir / "best.pt").exists() and (run_dir / "last.pt").exists()
