"""interpolate.py: the line from the start to the fine-tune. Its ends are exactly the fine-tune eval.py scores and the
start with its probe head; a point is exactly the weighted sum of the two."""

import csv
import json

import pytest
import torch
from conftest import tiny_args, write_hub_folder
from test_models import place_in_torchvision_cache

import eval as eval_tool
import interpolate
import train
from cars import analysis, calibration, finetune
from cars.averaging import averaged, interpolated
from cars.checkpoint import load_checkpoint
from cars.cli import interpolate_parser
from cars.data import load_splits
from cars.engine import Device, collect_logits
from cars.errors import UserError
from cars.loaders import eval_loader
from cars.models import build_model

QUICK = ["--workers", "0", "--batch-size", "8"]


@pytest.fixture(scope="module")
def lp_ft_run(tmp_path_factory):
    """An LP-FT fine-tune of ImageNet-shaped ResNet-18 weights, choosing its epoch on a validation split."""
    root = tmp_path_factory.mktemp("interpolate")
    data = write_hub_folder(root / "hub")
    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    run_dir = root / "run"
    flags = ["--weights", "IMAGENET1K_V1", "--probe-init", "--val-split", "0.34", "--epochs", "2"]
    train.main(tiny_args(data, run_dir, *flags))
    return run_dir


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_the_ends_are_the_fine_tune_and_the_start_with_its_probe_head(lp_ft_run, tmp_path):
    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    out = tmp_path / "line"
    interpolate.main([str(lp_ft_run), "--alphas", "0,0.5,1", "--out", str(out), "--save-alpha", "0.5", *QUICK])
    rows = read_rows(out / "interpolation.csv")
    accuracy = {(float(r["alpha"]), r["split"]): float(r["accuracy"]) for r in rows}
    assert {split for _, split in accuracy} == {"val", "test"}

    # alpha = 1 is the fine-tune: exactly eval.py's test accuracy
    eval_tool.main([str(lp_ft_run), "--out", str(tmp_path / "eval"), "--num-gradcam", "1", "--transfer", "off", *QUICK])
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert accuracy[1.0, "test"] == evaluated["top1"]
    ece = {(float(r["alpha"]), r["split"]): float(r["ece"]) for r in rows}  # and its calibration error, eval.py's too
    assert ece[1.0, "test"] == pytest.approx(evaluated["calibration"]["ece"], abs=1e-4)
    assert "Expected calibration error (%, 15 bins" in (out / "report.md").read_text()

    # alpha = 0 is the start's backbone with the run's own probe head (LP-FT), scored by hand
    checkpoint = load_checkpoint(lp_ft_run / "best.pt")
    start = build_model("resnet18", "IMAGENET1K_V1", 3).eval()
    finetune.set_head(start, checkpoint["start_head"]["weight"], checkpoint["start_head"]["bias"])
    splits = load_splits(checkpoint["config"]["data"], 0.34, 0)
    loader = eval_loader(
        splits.test,
        resolution=32,
        interpolation="bilinear",
        cache="auto",
        skip_bad_images=False,
        batch_size=8,
        workers=0,
    )
    logits, labels = collect_logits(start, loader, Device("cpu"))
    assert accuracy[0.0, "test"] == analysis.topk_accuracy(logits, labels, 1)
    assert ece[0.0, "test"] == pytest.approx(calibration.scores(logits, labels)["ece"], abs=1e-4)
    assert "the run's own linear-probe head" in (out / "report.md").read_text()

    # the saved point is the weighted sum of the two ends, tensor by tensor, and eval.py reads it as a run
    saved = load_checkpoint(out / "model" / "best.pt")["model"]
    expected = interpolated(start.state_dict(), checkpoint["model"], 0.5)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    eval_tool.main([str(out / "model"), "--num-gradcam", "1", "--transfer", "off", *QUICK])
    assert json.loads((out / "model" / "eval" / "summary.json").read_text())["top1"] == accuracy[0.5, "test"]
    # D7: --save-alpha's help names the folder it writes
    help_of = {action.dest: action.help for action in interpolate_parser()._actions}
    assert "as a run folder <out>/model" in help_of["save_alpha"]


def test_batchnorm_statistics_estimated_again_are_a_second_line(lp_ft_run, tmp_path):
    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    out = tmp_path / "line"
    interpolate.main([str(lp_ft_run), "--alphas", "0.5", "--recalibrate-bn", "--out", str(out), *QUICK])
    modes = {(r["batch_norm"], r["split"]) for r in read_rows(out / "interpolation.csv")}
    assert modes == {
        ("interpolated", "val"),
        ("interpolated", "test"),
        ("recalibrated", "val"),
        ("recalibrated", "test"),
    }
    report = (out / "report.md").read_text()
    assert "With interpolated BatchNorm statistics" in report and "With recalibrated BatchNorm statistics" in report


def test_averages_are_exact():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    assert torch.equal(interpolated(a, b, 1.0)["w"], b["w"]) and torch.equal(interpolated(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolated(a, b, 0.25)["w"], torch.tensor([1.5, 3.0]))
    assert torch.equal(averaged([a, b])["w"], torch.tensor([2.0, 4.0])) and averaged([a, b])["n"].item() == 3
    one = averaged([b])
    assert all(torch.equal(one[k], b[k]) for k in b)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--alphas", "0,1.5"], r"alpha 1.5 is outside \[0, 1\]"),
        (["--save-alpha", "-0.1"], r"alpha -0.1 is outside \[0, 1\]"),
        (["--weights-none"], "started from random weights"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(lp_ft_run, tmp_path, flags, message):
    run = lp_ft_run
    if flags == ["--weights-none"]:
        run, flags = tmp_path / "scratch", []
        train.main(tiny_args(write_hub_folder(tmp_path / "hub"), run, "--epochs", "1"))
    with pytest.raises(UserError, match=message):
        interpolate.main([str(run), "--out", str(tmp_path / "out"), *flags, *QUICK])
    assert not (tmp_path / "out").exists()


def test_without_lp_ft_the_start_gets_a_probe_fitted_here(tmp_path):
    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    run = tmp_path / "plain"
    train.main(tiny_args(write_hub_folder(tmp_path / "hub"), run, "--weights", "IMAGENET1K_V1", "--epochs", "1"))
    interpolate.main([str(run), "--alphas", "0", "--out", str(tmp_path / "line"), *QUICK])
    report = (tmp_path / "line" / "report.md").read_text()
    assert "a linear-probe head fitted here on the start's features of 18 training images" in report
    assert "The run has no validation split, so the best alpha is chosen on the test split" in report


def test_out_is_checked_before_the_slow_part_and_swapped_or_broken_runs_are_named(lp_ft_run, tmp_path, monkeypatch):
    """D6: an --out that is a file, or under one, is refused before the probe fit (the slow part); D16: an alpha
    given first is named as swapped; D17: a run that diverged in its first epoch is said to have diverged."""
    from cars.report import write_json

    def slow_part(args):
        raise AssertionError("the run was prepared before --out was checked")

    monkeypatch.setattr(interpolate, "prepare", slow_part)
    (tmp_path / "file").write_text("mine")
    for out, message in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "is a file, not a folder")):
        with pytest.raises(UserError, match=message):
            interpolate.main([str(lp_ft_run), "--out", str(out), *QUICK])
    assert (tmp_path / "file").read_text() == "mine"
    with pytest.raises(UserError, match="the arguments look swapped: 0.5 is an alpha and .* a run"):
        interpolate.main(["0.5", str(lp_ft_run)])
    monkeypatch.undo()
    diverged = tmp_path / "diverged"
    diverged.mkdir()
    write_json(diverged / "summary.json", {"status": "diverged", "epochs_done": 0})
    with pytest.raises(UserError, match="diverged in its first epoch"):
        interpolate.main([str(diverged), "--out", str(tmp_path / "out"), *QUICK])


def test_a_hub_dataset_offline_is_interpolated_without_its_corrupted_copies(tmp_path, monkeypatch, capsys):
    """A run on a hub id, with the hub unreachable: its train and test files come from the hub's cache (here a local
    folder stands in for it), the listing of its corrupted copies cannot be had, and the line is drawn without them."""
    import datasets

    from cars.config import load_saved

    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    local = write_hub_folder(tmp_path / "hub")
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda location, data_files: real(str(local), data_files=data_files))
    run = tmp_path / "run"
    train.main(tiny_args("nobody/offline_cars", run, "--weights", "IMAGENET1K_V1", "--epochs", "1"))
    assert load_saved(run / "config.toml").data == "nobody/offline_cars"
    interpolate.main([str(run), "--alphas", "0,1", "--out", str(tmp_path / "line"), *QUICK])
    assert "note: no corrupted copies: could not list the files of nobody/offline_cars" in capsys.readouterr().out
    assert {r["split"] for r in read_rows(tmp_path / "line" / "interpolation.csv")} == {"test"}
