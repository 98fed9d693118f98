"""torchrun with two CPU processes (gloo) against one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as eval_tool
import train
from cars.checkpoint import load_checkpoint
from cars.errors import UserError
from cars.loaders import GlobalBatches, make_loader
from cars.models import build_model
from cars.report import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The demo data at 8 train / 2 test images per class; one run in one process, one in two."""
    from cars.demo import demo_root, write_demo

    root = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "CARS_CACHE": str(root / "cache")}
    (root / "cache").mkdir()
    write_demo(root / "cache" / demo_root().name, train_per_class=8, test_per_class=2)
    torch.manual_seed(0)
    torch.save(build_model("shufflenet_v2_x0_5", "none", 10).state_dict(), root / "start.pth")  # both runs start here
    args = [
        "--config",
        str(ROOT / "configs" / "demo.toml"),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--optimizer",
        "sgd",
        "--lr",
        "0.02",
        "--weight-decay",
        "1e-4",
        "--freeze-epochs",
        "1",
        "--weights",
        str(root / "start.pth"),
        "--scheduler",
        "step",
        "--step-size",
        "1",
        "--gamma",
        "0",  # lr 0 after the frozen epoch: last.pt keeps its weights
        "--augment",
        "heavy",
    ]  # augmented a batch at a time: each process augments its half, with the same pixels
    old_cache = os.environ["CARS_CACHE"]
    os.environ["CARS_CACHE"] = env["CARS_CACHE"]
    train.main([*args, "--run-dir", str(root / "single")])
    os.environ["CARS_CACHE"] = old_cache
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "train.py"),
            *args,
            "--run-dir",
            str(root / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    return root, env, args, two.stdout


def norm(state: dict) -> float:
    return sum((v.double() ** 2).sum() for v in state.values()).sqrt().item()


def updates(run_dir: Path, start: dict) -> dict:
    """What training changed in the weights (BatchNorm's running statistics aside): final minus start."""
    final = load_checkpoint(run_dir / "last.pt")["model"]
    return {k: final[k] - start[k] for k in start if start[k].is_floating_point() and "running" not in k}


def test_two_processes_learn_like_one(runs):
    root, _, _, stdout = runs
    single, two = read_metrics(root / "single" / "metrics.csv"), read_metrics(root / "two" / "metrics.csv")
    assert len(two) == 2
    # Epoch 1 trains only the head, the backbone and its BatchNorm frozen: the same global batches, the same
    # per-image augmentation, gradients averaged over the processes: the same numbers as one process.
    assert two[0]["train_loss"] == pytest.approx(single[0]["train_loss"], rel=1e-4)
    # Epoch 2 runs everything in training mode: BatchNorm now normalises over 8 images per process instead of 16.
    assert two[1]["train_loss"] == pytest.approx(single[1]["train_loss"], rel=0.05)
    assert [r["lr"] for r in two] == [r["lr"] for r in single] == [0.02, 0.0]
    # What the frozen epoch taught the weights (epoch 2 has lr 0), one process against two: the same to rounding
    start = torch.load(root / "start.pth")
    single_update, two_update = updates(root / "single", start), updates(root / "two", start)
    apart = norm({k: two_update[k] - single_update[k] for k in single_update}) / norm(single_update)
    assert norm(single_update) > 0.01 and apart < 1e-3, (norm(single_update), apart)


def test_one_run_folder_written_once_and_every_test_image_counted_once(runs):
    root, _, _, stdout = runs
    log = (root / "two" / "train.log").read_text()
    assert log.count("epoch   1/2 ") == 1 and "2 processes of 8 images each" in log
    assert stdout.count("done in") == 1, "only the main process prints"
    summary = json.loads((root / "two" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["eval_images"] == 20
    state = load_checkpoint(root / "two" / "best.pt")["model"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)


def test_checkpoint_of_two_processes_evaluates_and_resumes_in_one(runs, tmp_path, monkeypatch):
    root, env, args, _ = runs
    monkeypatch.setenv("CARS_CACHE", env["CARS_CACHE"])
    two, single = tmp_path / "two", tmp_path / "single"
    shutil.copytree(root / "two", two)
    shutil.copytree(root / "single", single)
    eval_tool.main([str(two), "--num-gradcam", "2", "--workers", "0"])
    # one process, best.pt: the number the job reported
    report = json.loads((two / "eval" / "summary.json").read_text())
    assert report["images"] == 20 and report["top1"] == pytest.approx(
        json.loads((two / "summary.json").read_text())["best_eval_acc"]
    )
    for run_dir in (two, single):
        train.main(["--resume", str(run_dir), "--epochs", "3"])
    rows, reference = read_metrics(two / "metrics.csv"), read_metrics(single / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["lr"] == reference[2]["lr"]
    # epoch 3 in one process from each checkpoint: the same weights, batches and BatchNorm, so the same loss
    assert rows[2]["train_loss"] == pytest.approx(reference[2]["train_loss"], rel=1e-4)


def test_shards_cover_every_image_exactly_once():
    generator = torch.Generator().manual_seed(0)
    whole = list(GlobalBatches(23, batch_size=8, generator=generator.manual_seed(1)))
    shards = [
        list(GlobalBatches(23, batch_size=8, generator=torch.Generator().manual_seed(1), rank=rank, world=3))
        for rank in range(3)
    ]
    for b, batch in enumerate(whole):  # every global batch is split over the processes, nothing lost or repeated
        assert sorted(sum((shard[b] for shard in shards), [])) == sorted(batch)
    dataset = list(range(10))
    seen = sum(
        (
            list(make_loader(dataset, batch_size=4, shuffle=False, workers=0, seed=0, rank=r, world=3).dataset)
            for r in range(3)
        ),
        [],
    )
    assert sorted(seen) == dataset


def test_batch_not_divisible_by_processes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # refused before joining the other processes, so no one waits for it
    with pytest.raises(UserError, match="--batch-size 16 is the global batch; it must divide evenly over 3 processes"):
        train.main(["--batch-size", "16", "--data", "demo", "--run-dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_with_unreadable_images_every_process_takes_the_same_steps():
    """Two thirds of the images unreadable: many global batches leave one process's share with nothing it can read.
    Every process skips exactly those batches, so none waits in the gradient all-reduce for a step another skipped."""
    import numpy as np

    readable = np.arange(24) >= 16
    # the global batches, in one process
    whole = list(GlobalBatches(24, batch_size=4, generator=torch.Generator().manual_seed(3)))
    expected = [all(readable[batch[rank::2]].any() for rank in range(2)) for batch in whole]
    assert 0 < expected.count(False) < len(whole)
    for rank in range(2):
        shares = list(
            GlobalBatches(
                24, batch_size=4, generator=torch.Generator().manual_seed(3), rank=rank, world=2, readable=readable
            )
        )
        assert [bool(share) for share in shares] == expected
        assert all(
            share == batch[rank::2] for share, batch, taken in zip(shares, whole, expected, strict=True) if taken
        )


def test_skip_bad_images_under_torchrun_without_the_cache_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--skip-bad-images under torchrun needs the preprocessing cache"):
        train.main(
            [
                "--data",
                "demo",
                "--batch-size",
                "16",
                "--skip-bad-images",
                "--cache",
                "off",
                "--run-dir",
                str(tmp_path / "r"),
            ]
        )
    assert not (tmp_path / "r").exists()


def test_each_process_has_its_own_dropout_and_all_share_the_mixup_draw():
    from cars.runtime import seed_process
    from cars.transforms import batch_mixer

    masks = []
    for rank in range(3):  # what each process of a job of three draws after the same seeding
        torch.manual_seed(0)
        seed_process(0, rank)
        masks.append(torch.nn.functional.dropout(torch.ones(1000), 0.5))
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    torch.manual_seed(0)
    assert torch.equal(masks[0], torch.nn.functional.dropout(torch.ones(1000), 0.5))  # one process: as before

    mixer = batch_mixer(mixup=0.4, cutmix=1.0, num_classes=4, seed=0)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed = []
    for rank in range(2):  # two processes, two random streams: the same MixUp/CutMix draw for the same step
        torch.manual_seed(rank)
        state = torch.get_rng_state()
        mixed.append(mixer(images, labels, step=7)[1])
        assert torch.equal(torch.get_rng_state(), state)  # the process's own stream is left as it was
    assert torch.equal(mixed[0], mixed[1])
    # another step, another draw
    assert any(not torch.equal(mixer(images, labels, step=s)[1], mixed[0]) for s in range(8, 12))
