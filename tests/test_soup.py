"""soup.py: a soup of one run is that run, a uniform soup of two is their average, and only fine-tunes of one start
go into a soup."""

import csv
import json

import pytest
import torch
from conftest import tiny_args, write_hub_folder
from test_models import place_in_torchvision_cache

import eval as eval_tool
import soup
import train
from cars.averaging import averaged
from cars.checkpoint import load_checkpoint
from cars.errors import UserError

QUICK = ["--workers", "0", "--batch-size", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two fine-tunes of one ImageNet-shaped start that differ in their seed, choosing on a validation split."""
    root = tmp_path_factory.mktemp("soup")
    data = write_hub_folder(root / "hub")
    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    made = []
    for seed in (0, 1):
        run = root / f"seed{seed}"
        train.main(tiny_args(data, run, "--weights", "IMAGENET1K_V1", "--val-split", "0.34", "--seed", str(seed)))
        made.append(run)
    return root, data, made


def weights(folder):
    return load_checkpoint(folder / "best.pt")["model"]


def test_a_soup_of_one_is_that_run_a_soup_of_two_their_average_and_greedy_keeps_the_best(runs, tmp_path):
    _, _, (a, b) = runs
    soup.main([str(a), "--out", str(tmp_path / "one"), *QUICK])
    one, original = weights(tmp_path / "one"), weights(a)
    assert all(torch.equal(one[k], original[k]) for k in original)

    soup.main([str(a), str(b), "--out", str(tmp_path / "two"), "--recipe", "uniform", *QUICK])
    two, expected = weights(tmp_path / "two"), averaged([weights(a), weights(b)])
    assert all(torch.equal(two[k], expected[k]) for k in expected)
    with open(tmp_path / "two" / "soup.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["model"] for r in rows] == [str(a), str(b), "uniform soup", "greedy soup"]
    # the greedy soup starts from the best run on validation, and never scores below it there
    best = max(rows[:2], key=lambda row: float(row["val_acc"]))
    assert "greedy" in best["in_soup"] and float(rows[3]["val_acc"]) >= float(best["val_acc"])

    # the soup is a run folder eval.py reads, and the table's test accuracy is eval.py's
    eval_tool.main([str(tmp_path / "two"), "--num-gradcam", "1", "--transfer", "off", *QUICK])
    top1 = json.loads((tmp_path / "two" / "eval" / "summary.json").read_text())["top1"]
    assert float(rows[2]["test_acc"]) == top1


def test_runs_of_other_starts_or_networks_are_one_line_and_nothing_is_written(runs, tmp_path):
    root, data, (a, _) = runs
    other = place_in_torchvision_cache("resnet18", "IMAGENET1K_V1", seed=7)  # other weights under another file
    torch.save(other, tmp_path / "other.pth")
    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    train.main(tiny_args(data, tmp_path / "elsewhere", "--weights", str(tmp_path / "other.pth"), "--epochs", "1"))
    train.main(tiny_args(data, tmp_path / "scratch", "--epochs", "1"))
    for run, message in (
        (tmp_path / "elsewhere", "started from other weights than"),
        (tmp_path / "scratch", "does not record a pretrained start"),
        (tmp_path / "nothing", "is not a run folder of train.py"),
    ):
        with pytest.raises(UserError, match=message):
            soup.main([str(a), str(run), "--out", str(tmp_path / "out"), *QUICK])
        assert not (tmp_path / "out").exists()


def test_a_soup_refuses_to_empty_its_inputs_or_mix_splits_diverged_or_broken_runs(runs, tmp_path):
    """D1: --out naming an input is refused before anything is deleted; D5 and item 3: a run chosen on another
    validation split, or on test, does not go into a soup chosen on validation; D2 and D17: NaN weights and a run that
    diverged in its first epoch are named as such."""
    import shutil

    from cars.checkpoint import save_checkpoint
    from cars.report import write_json

    root, data, (a, b) = runs
    mine = tmp_path / "mine"
    shutil.copytree(a, mine)
    before = sorted(p.name for p in mine.iterdir())
    with pytest.raises(UserError, match="is the input run .* which would be emptied"):
        soup.main([str(mine), str(b), "--out", str(mine), "--overwrite", *QUICK])
    assert sorted(p.name for p in mine.iterdir()) == before and weights(mine)

    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    for name, flags, message in (
        ("other-split", ["--val-split", "0.34", "--split-seed", "1"], r"--split-seed 1\), .* on a validation split"),
        ("on-test", [], r"the test split of .* \(no validation split\)"),
    ):
        train.main(tiny_args(data, tmp_path / name, "--weights", "IMAGENET1K_V1", "--epochs", "1", *flags))
        with pytest.raises(UserError, match=message):
            soup.main([str(a), str(tmp_path / name), "--out", str(tmp_path / "out"), *QUICK])
        assert not (tmp_path / "out").exists()

    broken = tmp_path / "broken"
    shutil.copytree(a, broken)
    checkpoint = load_checkpoint(broken / "best.pt")
    checkpoint["model"]["fc.weight"][0, 0] = float("nan")
    save_checkpoint(broken / "best.pt", checkpoint)
    diverged = tmp_path / "diverged"
    diverged.mkdir()
    write_json(diverged / "summary.json", {"status": "diverged", "epochs_done": 0})
    for run, message in ((broken, "holds NaN or infinite weights"), (diverged, "diverged in its first epoch")):
        with pytest.raises(UserError, match=message):
            soup.main([str(a), str(run), "--out", str(tmp_path / "out"), *QUICK])
        assert not (tmp_path / "out").exists()
