"""torchrun with two CPU processes (gloo) against one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cars import evaluate, train
from cars.checkpoint import load_checkpoint
from cars.data import GlobalBatches, make_loader
from cars.errors import UserError
from cars.report import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The demo data at 8 train / 2 test images per class; one run in one process, one in two."""
    from cars.demo import write_demo

    root = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "CARS_CACHE": str(root / "cache")}
    (root / "cache").mkdir()
    write_demo(root / "cache" / "demo-v1", train_per_class=8, test_per_class=2)
    args = ["--config", str(ROOT / "configs" / "demo.toml"), "--epochs", "2", "--batch-size", "16", "--optimizer", "sgd",
            "--lr", "0.02", "--weight-decay", "1e-4", "--freeze-epochs", "1"]
    old_cache = os.environ["CARS_CACHE"]
    os.environ["CARS_CACHE"] = env["CARS_CACHE"]
    train.main([*args, "--run-dir", str(root / "single")])
    os.environ["CARS_CACHE"] = old_cache
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
                          *args, "--run-dir", str(root / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    return root, env, args, two.stdout


def relative_distance(a: dict, b: dict) -> float:
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]
    return (sum(((a[k] - b[k]) ** 2).sum() for k in keys) / sum((a[k] ** 2).sum() for k in keys)).sqrt().item()


def test_two_processes_learn_like_one(runs):
    root, _, _, stdout = runs
    single, two = read_metrics(root / "single" / "metrics.csv"), read_metrics(root / "two" / "metrics.csv")
    assert len(two) == 2
    # Epoch 1 trains only the head, the backbone and its BatchNorm frozen: the same global batches, the same
    # per-image augmentation, gradients averaged over the processes: the same numbers as one process.
    assert two[0]["train_loss"] == pytest.approx(single[0]["train_loss"], rel=1e-4)
    # Epoch 2 trains everything: BatchNorm now normalises over 8 images per process instead of 16.
    assert two[1]["train_loss"] == pytest.approx(single[1]["train_loss"], rel=0.05)
    assert [r["lr"] for r in two] == [r["lr"] for r in single]
    apart = relative_distance(load_checkpoint(root / "single" / "last.pt")["model"], load_checkpoint(root / "two" / "last.pt")["model"])
    assert apart < 0.2, apart


def test_one_run_folder_written_once_and_every_test_image_counted_once(runs):
    root, _, _, stdout = runs
    log = (root / "two" / "train.log").read_text()
    assert log.count("epoch   1/2 ") == 1 and "2 processes of 8 images each" in log
    assert stdout.count("done in") == 1, "only the main process prints"
    summary = json.loads((root / "two" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["eval_images"] == 20
    state = load_checkpoint(root / "two" / "best.pt")["model"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)


def test_checkpoint_of_two_processes_evaluates_and_resumes_in_one(runs):
    root, env, args, _ = runs
    old_cache = os.environ["CARS_CACHE"]
    os.environ["CARS_CACHE"] = env["CARS_CACHE"]
    evaluate.main([str(root / "two"), "--num-gradcam", "2", "--workers", "0"])
    assert json.loads((root / "two" / "eval" / "summary.json").read_text())["images"] == 20
    train.main(["--resume", str(root / "two"), "--epochs", "3"])
    os.environ["CARS_CACHE"] = old_cache
    rows = read_metrics(root / "two" / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["train_loss"] > 0


def test_shards_cover_every_image_exactly_once():
    generator = torch.Generator().manual_seed(0)
    whole = list(GlobalBatches(23, 8, generator.manual_seed(1), 0, 1))
    shards = [list(GlobalBatches(23, 8, torch.Generator().manual_seed(1), rank, 3)) for rank in range(3)]
    for b, batch in enumerate(whole):  # every global batch is split over the processes, nothing lost or repeated
        assert sorted(sum((shard[b] for shard in shards), [])) == sorted(batch)
    dataset = list(range(10))
    seen = sum((list(make_loader(dataset, 4, False, 0, 0, rank=r, world=3).dataset) for r in range(3)), [])
    assert sorted(seen) == dataset


def test_batch_not_divisible_by_processes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # refused before joining the other processes, so no one waits for it
    with pytest.raises(UserError, match="--batch-size 16 is the global batch; it must divide evenly over 3 processes"):
        train.main(["--batch-size", "16", "--data", "demo", "--run-dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
