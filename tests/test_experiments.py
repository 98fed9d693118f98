import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FixedBatches, place_demo_pretrained, tiny_run

import compare
import lr_find
import train
from cars import optim
from cars.checkpoint import load_checkpoint
from cars.config import Config
from cars.data import load_splits
from cars.demo import write_demo
from cars.engine import Device, train_step
from cars.errors import UserError
from cars.loaders import TransformedSplit, make_loader
from cars.methods import plain_objective
from cars.models import build_model, head_name
from cars.optim import make_ema
from cars.report import read_metrics
from cars.transforms import TrainAugmentation, batch_mixer

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.toml"))


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, demo_pretrained):
    """The demo dataset at 2 train / 1 test images per class, through the same `--data demo` path."""
    import os

    root = tmp_path_factory.mktemp("tinydemo")
    old = os.environ["CARS_CACHE"]
    os.environ["CARS_CACHE"] = str(root)
    from cars.demo import demo_root

    write_demo(demo_root(), train_per_class=2, test_per_class=1)
    place_demo_pretrained(demo_pretrained)  # configs/demo.toml starts from it
    yield root
    os.environ["CARS_CACHE"] = old


def test_every_seed_run_has_a_preset():
    names = {p.stem for p in PRESETS}
    assert {f"run0{i}" for i in range(1, 7)} | {
        "run07_baseline",
        "run08_r50_448",
        "run09_effb4_sgd",
        "run10_effb4_adamw",
        "plus_r50_224",
        "plus_r50_448",
        "demo",
    } <= names
    assert tomllib.loads((ROOT / "configs" / "run07_baseline.toml").read_text()).items() <= vars(Config()).items(), (
        "run 7 is the default recipe"
    )


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_parses_and_runs_a_short_epoch_on_the_demo(tmp_path, tiny_demo, preset):
    text = preset.read_text()
    assert text.startswith("#") and "%" in text.split("\n\n")[0], "a preset's comment names its source and accuracy"
    values = tomllib.loads(text)
    Config(**values).validate()
    # two epochs where the preset freezes the backbone first, to see it released; a warmup is left out (the schedule's
    # tests run it): a second epoch of CLIP ViT-B/16 wrote 2 GB of checkpoints for nothing more
    epochs = 2 if values.get("freeze_epochs") else 1
    # from random weights, a head written from the start (zero-shot, prototypes) cannot be had: a new one instead
    shrink = ["--head", "new"] if values.get("head", "new") != "new" else []
    shrink += [
        "--epochs",
        epochs,
        "--freeze-epochs",
        min(values.get("freeze_epochs", 0), 1),
        "--warmup-epochs",
        0,
    ]
    run_dir = tmp_path / preset.stem
    train.main(
        [
            str(a)
            for a in [
                "--config",
                preset,
                "--data",
                "demo",
                "--weights",
                "none",
                "--resolution",
                64 if values.get("arch") == "open_clip:demo-clip" else 32,  # its tower takes 64 px only
                "--batch-size",
                4,
                # the batch shrinks from the preset's to 4 and its lr with it (a random EfficientNet-B4 diverges at
                # lr 0.05 on batches of 4)
                "--lr-scaling",
                "linear",
                "--workers",
                0,
                "--run-dir",
                run_dir,
                *shrink,
            ]
        ]
    )
    rows = read_metrics(run_dir / "metrics.csv")
    assert len(rows) == epochs
    saved = tomllib.loads((run_dir / "config.toml").read_text())
    for key in set(values) - {
        "epochs",
        "freeze_epochs",
        "warmup_epochs",
        "weights",
        "resolution",
        "batch_size",
        "lr_scaling",
        "workers",
        "data",
        "head",
    }:
        assert saved[key] == values[key], key


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_a_presets_own_values_reach_the_optimizer_the_schedule_and_the_transforms(preset):
    """What makes a preset a preset, read back from the objects train.py builds from it."""
    from cars.transforms import crop_box, extra_augmentation

    cfg = Config(**tomllib.loads(preset.read_text())).validate()
    with torch.device("meta"):  # the real architecture, no memory
        model = build_model(cfg.arch, "none", 196, cfg.dropout)
    optimizer = optim.make_optimizer(cfg, model)
    lr = cfg.lr * cfg.batch_size / 128 if cfg.lr_scaling == "linear" else cfg.lr
    assert type(optimizer).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[cfg.optimizer]
    lrs, decays = [lr * cfg.backbone_lr_mult, lr], [cfg.weight_decay] * 2
    if cfg.norm_weight_decay >= 0:  # each group split: its normalisation weights and biases with their own decay
        lrs, decays = [lrs[0]] * 2 + [lrs[1]] * 2, [cfg.weight_decay, cfg.norm_weight_decay] * 2
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(lrs)
    assert [g["weight_decay"] for g in optimizer.param_groups] == decays
    if cfg.optimizer == "sgd":
        assert {g["momentum"] for g in optimizer.param_groups} == {cfg.momentum}
    assert model.get_submodule(head_name(model)).out_features == 196

    steps = 10  # per epoch
    cfg.epochs = cfg.epochs or 30  # a preset that trains nothing (--epochs 0): its schedule when given epochs
    scheduler = optim.make_scheduler(cfg, optimizer, steps)
    lrs = []
    for _ in range(cfg.epochs * steps):
        lrs.append(optimizer.param_groups[-1]["lr"])
        optimizer.step()
        scheduler.step()
    warm = cfg.warmup_epochs * steps
    if warm:
        assert lrs[0] == pytest.approx(lr / warm) and lrs[warm - 1] == pytest.approx(lr)
    if cfg.scheduler == "step":
        for epoch in range(cfg.warmup_epochs, cfg.epochs):
            assert lrs[epoch * steps] == pytest.approx(lr * cfg.gamma ** (epoch // cfg.step_size)), epoch
    else:
        assert lrs[warm] == pytest.approx(lr) and lrs[-1] < 0.01 * lr
        assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :], strict=False))

    augmentation = TrainAugmentation(cfg)
    areas = [(r - left) * (b - t) for left, t, r, b in (augmentation.draw(0, i, 400, 600)[0] for i in range(300))]
    if cfg.train_crop == "random-resized":
        assert cfg.crop_scale * 0.98 <= min(areas) < cfg.crop_scale + 0.1 and max(areas) > (1 + cfg.crop_scale) / 2
    extras = [type(t).__name__ for t in extra_augmentation(cfg)]
    assert [type(t).__name__ for t in augmentation.extra] == extras
    assert ("RandomRotation" in extras) == (cfg.augment == "heavy")
    assert ("ColorJitter" in extras) == (cfg.augment == "heavy" or cfg.color_jitter > 0)
    assert ("RandomErasing" in extras) == (cfg.augment == "heavy" or cfg.random_erasing > 0)
    # the cached path draws the same kind of crop
    left, top, right, bottom = crop_box(400, 600, cfg, __import__("random").Random(0))
    if cfg.train_crop == "resize-randomcrop":
        assert (right - left) * 600 == pytest.approx(cfg.resolution / round(cfg.resolution * 256 / 224) * 400, abs=1)


def test_ema_is_the_hand_computed_average():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = make_ema(model, decay=0.9)
    weights = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]]), torch.tensor([[-1.0, 4.0]])]
    expected = None
    for w in weights:
        with torch.no_grad():
            model.weight.copy_(w)
        ema.update_parameters(model)
        expected = w.clone() if expected is None else 0.9 * expected + 0.1 * w  # the first update copies
    assert torch.allclose(ema.module.weight, expected)
    assert not torch.equal(ema.module.weight, model.weight)


def test_ema_run_evaluates_and_keeps_the_ema_weights(tmp_path, tiny_demo):
    run_dir = tmp_path / "ema"
    train.main(
        [
            "--config",
            str(ROOT / "configs" / "demo.toml"),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--ema",
            "--run-dir",
            str(run_dir),
        ]
    )
    last, best = load_checkpoint(run_dir / "last.pt"), load_checkpoint(run_dir / "best.pt")
    assert set(last["raw_model"]) == set(last["model"])
    assert any(v.is_floating_point() and not torch.equal(v, last["raw_model"][k]) for k, v in last["model"].items())
    assert all(torch.equal(v, last["ema"]["module." + k]) for k, v in last["model"].items())  # "model" is the average
    if best["epoch"] == 2:
        assert all(torch.equal(v, last["model"][k]) for k, v in best["model"].items())
    decay = optim.ema_decay(Config(ema=True), steps_per_epoch=5)  # 20 images, batch 4
    assert (
        f"EMA of the weights: decay {decay:.6g} per step, a half-life of 1 epochs"
        in (run_dir / "train.log").read_text()
    )


def test_ema_decay_fits_the_run_in_closed_form():
    """Run 7's full schedule (63 steps x 90 epochs): with a half-life of one epoch, the EMA computed
    by the engine-side AveragedModel equals the closed form, and the first weights are forgotten.
    The old fixed 0.9998 would have kept 32 % of them."""
    cfg = Config(ema=True)
    steps_per_epoch, steps = 63, 90 * 63
    decay = optim.ema_decay(cfg, steps_per_epoch)
    assert decay**steps_per_epoch == pytest.approx(0.5) and cfg.ema_half_life == 1.0
    assert optim.ema_decay(Config(ema=True, ema_half_life=3), steps_per_epoch) ** (
        3 * steps_per_epoch
    ) == pytest.approx(0.5)
    # given per step, taken as it is
    assert optim.ema_decay(Config(ema=True, ema_decay=0.999), steps_per_epoch) == 0.999

    model = torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)
    ema = make_ema(model, decay)
    for t in range(1, steps + 1):  # the weight of step t is t
        with torch.no_grad():
            model.weight.fill_(t)
        ema.update_parameters(model)
    # the first update copies w_1; after it, e_t = d e_(t-1) + (1 - d) w_t, so
    # e_T = d^(T-1) w_1 + (1 - d) sum_{k=0}^{T-2} d^k (T - k)
    d, n = decay, steps - 1
    geometric = (1 - d**n) / (1 - d)
    weighted = d * (1 - n * d ** (n - 1) + (n - 1) * d**n) / (1 - d) ** 2  # sum_{k<n} k d^k
    closed_form = d**n * 1 + (1 - d) * (steps * geometric - weighted)
    assert ema.module.weight.item() == pytest.approx(closed_form, rel=1e-9)
    assert d**n < 1e-20 and 0.9998**n > 0.3  # the first weights' share at the end: now nothing, before a third
    # lags the newest weights by about 1/(1-d) steps
    assert steps - ema.module.weight.item() == pytest.approx(d / (1 - d), rel=1e-6)


def test_the_recipe_updates_the_ema_after_every_step(tmp_path, hub_folder):
    """e_1 = w_1, e_t = d e_(t-1) + (1 - d) w_t over the weights each training step left."""
    run = tiny_run(hub_folder, tmp_path / "run", "--ema", "--ema-decay", "0.7", "--lr", "0.5")
    run.train_batches = FixedBatches(
        [(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2])) for _ in range(5)]
    )
    seen, update = [], run.ema.update_parameters

    def record(model):
        seen.append([p.detach().clone() for p in model.parameters()])
        update(model)

    run.ema.update_parameters = record
    train.train_epoch(run, 1)
    expected = seen[0]
    for weights in seen[1:]:
        expected = [0.7 * e + 0.3 * w for e, w in zip(expected, weights, strict=True)]
    assert len(seen) == 5
    for averaged, want in zip(run.ema.module.parameters(), expected, strict=True):
        assert torch.allclose(averaged, want, atol=1e-6)
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(run.ema.module.parameters(), seen[-1], strict=True))


def linear_model_loss(label_smoothing=0.0, mixer=None):
    """The loss of a training step at lr 0, on one fixed batch, for a model without BatchNorm."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    images, labels = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, _, _, _ = train_step(
        model,
        (images, labels),
        optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        Device("cpu"),
        objective=plain_objective(label_smoothing),
        mixer=mixer,
    )
    return loss.item(), model(images.flatten(1).view(6, 3, 4, 4)).detach(), labels


def test_label_smoothing_changes_the_loss_as_expected():
    plain, logits, labels = linear_model_loss()
    smoothed, _, _ = linear_model_loss(label_smoothing=0.1)
    log_p = logits.log_softmax(1)
    nll = -log_p[torch.arange(6), labels].mean()
    uniform = -log_p.mean(1).mean()
    assert plain == pytest.approx(nll.item(), rel=1e-5)
    assert smoothed == pytest.approx((0.9 * nll + 0.1 * uniform).item(), rel=1e-5)


def test_mixup_blends_two_labels_and_the_loss_follows():
    torch.manual_seed(3)
    mixer = batch_mixer(mixup=0.4, cutmix=0.0, num_classes=3)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    mixed, targets = mixer(images, labels)
    assert targets.shape == (4, 3) and torch.allclose(targets.sum(1), torch.ones(4))
    rolled = labels.roll(1)  # MixUp pairs each image with the previous one in the batch
    lam = targets[1, 1].item()  # image 1 is class 1, its partner class 0: its target is lam * e1 + (1 - lam) * e0
    assert targets[1, 0].item() == pytest.approx(1 - lam) and 0 < lam < 1
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)
    logits = torch.randn(4, 3)
    soft = F.cross_entropy(logits, targets)
    assert soft.item() == pytest.approx(
        (lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, rolled)).item(), rel=1e-5
    )
    assert batch_mixer(0.0, 0.0, 3) is None


def test_cutmix_pastes_a_box_of_the_neighbour_and_the_label_follows_its_area():
    torch.manual_seed(5)
    mixer = batch_mixer(mixup=0.0, cutmix=1.0, num_classes=4)
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16).clone()  # image k is all k
    labels = torch.tensor([0, 1, 2, 3])
    mixed, targets = mixer(images, labels)
    for i in range(4):
        pasted = mixed[i, 0] == (i - 1) % 4  # CutMix takes the box from the previous image of the batch
        assert torch.all((mixed[i, 0] == i) | pasted)
        rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
        if len(rows):  # one rectangle
            assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        share = pasted.float().mean().item()
        assert targets[i, (i - 1) % 4].item() == pytest.approx(share, abs=1e-6)
        assert targets[i, i].item() == pytest.approx(1 - share, abs=1e-6)


def test_train_augmentation_options():
    from PIL import Image

    cfg = Config(resolution=32, train_crop="resize-randomcrop", augment="trivialaugment", random_erasing=0.5)
    augmentation = TrainAugmentation(cfg)
    assert [type(t).__name__ for t in augmentation.extra] == ["TrivialAugmentWide", "RandomErasing"]
    image = Image.new("RGB", (90, 60), (10, 200, 30))
    crop = augmentation(image, epoch=3, i=7)
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8
    assert torch.equal(crop, augmentation(image, epoch=3, i=7)), "the same draws for the same (seed, epoch, image)"
    flips = {augmentation.draw(epoch, 7, 60, 90)[1] for epoch in range(20)}
    assert flips == {True, False} and TrainAugmentation(Config()).extra == []


# --- compare.py ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, tiny_demo):
    """Two finished demo runs and one that crashed after its first epoch."""
    root = tmp_path_factory.mktemp("runs")
    base = ["--config", str(ROOT / "configs" / "demo.toml"), "--epochs", "2"]
    train.main([*base, "--run-dir", str(root / "a")])
    train.main([*base, "--run-dir", str(root / "b"), "--lr", "0.003", "--freeze-epochs", "1", "--val-split", "0.5"])
    crashed = root / "c"
    train.main([*base, "--run-dir", str(crashed), "--label-smoothing", "0.1"])
    lines = (crashed / "metrics.csv").read_text().splitlines()
    (crashed / "metrics.csv").write_text("\n".join(lines[:2]) + "\n")  # it died during epoch 2
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    summary = {
        "status": "running",
        "pid": int(gone.stdout),
        "host": __import__("socket").gethostname(),
        "epochs": 2,
        "selected_on": "test",
    }
    (crashed / "summary.json").write_text(json.dumps(summary))
    return root


def test_compare_rows(three_runs, tmp_path, capsys):
    compare.main([str(three_runs / n) for n in ("a", "b", "c")] + ["--out", str(tmp_path / "cmp")])
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {
        Path(cells[0]).name: dict(zip(header, cells, strict=True))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:5])
    }
    assert set(rows) == {"a", "b", "c"}

    for name in ("a", "b"):
        metrics = read_metrics(three_runs / name / "metrics.csv")
        best = max(metrics, key=lambda r: r["eval_acc"])
        split = "val" if name == "b" else "test"
        assert rows[name]["status"] == "finished" and rows[name]["epochs"] == "2/2"
        assert rows[name]["best eval (epoch, split)"] == f"{best['eval_acc']:.2f}% @{int(best['epoch'])} ({split})"
        assert rows[name]["final epoch"] == f"{metrics[-1]['eval_acc']:.2f}%"
    test_of_best = json.loads((three_runs / "b" / "summary.json").read_text())["test_acc_of_best"]
    assert rows["b"]["test of best"] == f"{test_of_best:.2f}%" and rows["a"]["test of best"] == "(= best)"
    ece = json.loads((three_runs / "b" / "summary.json").read_text())["test_ece_of_best"]
    assert rows["b"]["test ECE"] == f"{ece:.1f} %" and rows["a"]["test ECE"] == "-"  # measured with the test of best
    assert rows["b"]["method"] == "head only for 1 epoch" and rows["a"]["method"] == "plain"
    assert rows["a"]["start"] == "demo-pretrained"
    assert rows["b"]["lr"] == "0.003" and rows["a"]["arch"] == "shufflenet_v2_x0_5"

    every = sum(
        t.numel()
        for k, t in load_checkpoint(three_runs / "a" / "best.pt")["model"].items()
        if "running" not in k and "num_batches" not in k
    )
    assert rows["a"]["trained parameters"] == f"{every / 1e6:.2f} M of {every / 1e6:.2f} M, 100.0 %"
    assert rows["b"]["trained parameters"] == rows["a"]["trained parameters"]  # of the whole run, unfrozen at the end
    assert rows["c"]["trained parameters"] == "-"  # its summary (written before they were counted) does not say
    assert rows["c"]["status"] == "crashed" and rows["c"]["epochs"] == "1/2"
    assert rows["c"]["augmentation"] == "crop+flip, ls 0.1"
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert f"| {three_runs / 'a'} | finished |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_without_run_folders_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="is a run folder"):
        compare.main([str(tmp_path)])


# --- lr_find.py ----------------------------------------------------------------------------------


def test_lr_find_reports_the_suggestion_of_the_curve_it_recorded(tmp_path, tiny_demo, capsys):
    out = tmp_path / "lr"
    preset = tmp_path / "scaled.toml"  # the demo with the lr scaled by the batch
    preset.write_text((ROOT / "configs" / "demo.toml").read_text() + 'lr_scaling = "linear"\n')
    lr_find.main(
        [
            "--config",
            str(preset),
            "--arch",
            "resnet18",
            "--weights",
            "none",
            "--resolution",
            "32",
            "--batch-size",
            "8",
            "--steps",
            "30",
            "--start-lr",
            "1e-5",
            "--end-lr",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = read_metrics(out / "lr_find.csv")
    lrs, losses = [r["lr"] for r in rows], [r["loss"] for r in rows]
    assert lrs == pytest.approx([1e-5 * 1e5 ** (i / 29) for i in range(len(rows))])  # exponential, from start to end
    assert [r["smoothed_loss"] for r in rows] == pytest.approx(lr_find.smooth(losses))
    expected = lr_find.suggest(lrs, lr_find.smooth(losses))
    printed = capsys.readouterr().out
    assert (
        f"suggested lr: {expected['valley']:.3g} (valley rule" in printed
        and f"steepest descent at {expected['steepest']:.3g}" in printed
    )
    # the lr the preset trains at is the scaled one: demo.toml's 0.005 x 8/128
    assert "your preset's lr: 0.0003125 (--lr 0.005 x batch 8/128, --lr-scaling linear)" in printed
    assert (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def demo_loader(splits):
    augmentation = TrainAugmentation(Config(resolution=32))
    return make_loader(TransformedSplit(splits.train, augmentation), batch_size=8, shuffle=True, workers=0, seed=0)


def test_range_test_works_on_a_copy_and_stops_on_divergence(tiny_demo):
    splits = load_splits("demo")
    model = build_model("resnet18", "none", 10)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loader = demo_loader(splits)
    cfg = Config(optimizer="sgd", momentum=0.9, weight_decay=0)
    lrs, losses, swept = lr_find.range_test(
        model, loader, cfg, Device("cpu"), start_lr=1e-3, end_lr=1e6, steps=60, phase="full", num_classes=10
    )
    assert len(lrs) < 60, "a loss that explodes ends the sweep early"
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert not torch.equal(swept.conv1.weight, model.conv1.weight)


def test_lr_find_head_phase_sweeps_the_head_only(tiny_demo):
    """--phase head: stage 1 of a two-stage preset, the backbone and its BatchNorm statistics frozen."""
    splits = load_splits("demo")
    model = build_model("resnet18", "none", 10)
    loader = demo_loader(splits)
    _, _, swept = lr_find.range_test(
        model, loader, Config(), Device("cpu"), start_lr=1e-4, end_lr=1e-1, steps=10, phase="head", num_classes=10
    )
    start, after = model.state_dict(), swept.state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed and all(k.startswith("fc.") for k in changed), changed


def test_lr_find_suggestion_rules_on_a_known_curve():
    lrs = [10 ** (i / 10 - 5) for i in range(60)]  # 1e-5 .. ~1e1
    # flat, falls, explodes
    losses = [3.0] * 20 + [3.0 - 0.1 * i for i in range(25)] + [0.6 + 0.5 * i for i in range(15)]
    suggestion = lr_find.suggest(lrs, losses)
    assert lrs[20] < suggestion["valley"] < lrs[44]
    assert lrs[20] <= suggestion["steepest"] <= lrs[44]


@pytest.mark.parametrize(
    "rows, status, expected",
    [
        (
            [(1, 60.0, 50.0), (2, 73.0, 52.0)],
            "finished",
            "overfitting",
        ),  # the original experiment log's run 5: 73 % train against 52 % test
        ([(1, 40.0, 38.0), (2, 55.0, 51.0)], "finished", "underfitting"),  # runs 1-2: over-regularised, neither fits
        ([(1, 90.0, 80.0), (2, 99.0, 89.4)], "finished", "fine"),  # run 7: 9.6 points apart, both high
        ([(1, 90.0, 80.0), (2, 99.0, None)], "finished", "fine"),  # the last evaluated epoch decides
        ([(1, 30.0, 20.0)], "diverged", "diverged"),
        (
            [(1, 40.0, 38.0), (2, 55.0, 51.0)],
            "stopped early",
            "underfitting",
        ),  # --early-stop ended it: judged as it ended
        ([(1, 40.0, 38.0), (2, 55.0, 51.0)], "interrupted", "-"),  # epoch 2 of 90: not underfitting, just unfinished
        ([(1, 40.0, 38.0), (2, 55.0, 51.0)], "crashed", "-"),
        ([(1, 40.0, 38.0), (2, 55.0, 51.0)], "running", "-"),
    ],
)
def test_compare_verdicts_on_hand_made_metrics(tmp_path, capsys, rows, status, expected):
    from cars.config import Config
    from cars.report import METRIC_COLUMNS, write_csv

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Config(epochs=len(rows)).save(run_dir / "config.toml")
    write_csv(
        run_dir / "metrics.csv",
        [
            dict(epoch=e, lr=0.1, train_loss=1.0, train_acc=t, eval_loss=1.0 if v else None, eval_acc=v, seconds=1.0)
            for e, t, v in rows
        ],
        METRIC_COLUMNS,
    )
    summary = {"status": status, "selected_on": "test"}
    if status == "running":  # this process: alive, so compare.py takes the run for a live one
        summary.update(pid=os.getpid(), host=socket.gethostname())
    (run_dir / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()
    compare.main([str(run_dir)])
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = dict(zip(header, [c.strip() for c in lines[2].strip("|").split("|")], strict=True))
    last = [r for r in rows if r[2] is not None][-1]
    best = max((r for r in rows if r[2] is not None), key=lambda r: r[2])
    assert cells["verdict"] == expected and cells["status"] == status
    assert cells["train-eval gap"] == f"{last[1] - last[2]:+.2f}"
    assert cells["train at best / final"] == f"{best[1]:.2f}% / {last[1]:.2f}%"
    # the rule, printed under the table
    assert any("at the last evaluated epoch: diverged if" in line for line in lines)


LESSONS = ROOT / "configs" / "lessons"


def lesson_config(name: str) -> dict:
    return vars(Config(**tomllib.loads((LESSONS / f"{name}.toml").read_text())).validate())


def differences(a: str, b: str) -> dict:
    first, second = lesson_config(a), lesson_config(b)
    return {key: (first[key], second[key]) for key in first if first[key] != second[key]}


def test_each_lesson_is_a_pair_of_presets_that_differ_in_one_variable():
    files = sorted(path.stem for path in LESSONS.glob("*.toml"))
    pairs = sorted({name[0] for name in files})
    assert pairs == ["1", "2", "3", "4", "5"] and len(files) == 10
    expected = {
        "1": {"backbone_lr_mult": (1.0, 0.005)},
        "2": {"freeze_epochs": (0, 5)},
        "3": {"resolution": (224, 448)},
        "4": {"lr_scaling": ("none", "linear")},
        "5": {"augment": ("basic", "heavy")},
    }
    for lesson in pairs:
        a, b = [name for name in files if name.startswith(lesson)]
        assert differences(a, b) == expected[lesson], (a, b)
        assert "Expect:" in (LESSONS / f"{b}.toml").read_text(), f"{b} says what to expect and why"
    # lesson 4's other pair
    assert differences("3b_448px_batch64", "4b_448px_batch16_lr_scaled") == {"batch_size": (64, 16)}
    assert lesson_config("1a_lr_same_for_all") == vars(Config()), "the a side of lesson 1 is run 7 itself"


def test_compare_sorts_runs_naturally_and_names_them_from_where_it_runs(tmp_path, capsys, monkeypatch):
    from cars.config import Config
    from cars.report import METRIC_COLUMNS, write_csv

    for name, weights in (("trial-10", "none"), ("trial-2", "IMAGENET1K_V2"), ("trial-1", "demo-pretrained")):
        run_dir = tmp_path / "sweep" / name
        run_dir.mkdir(parents=True)
        Config(epochs=1, weights=weights, l2sp=0.01 if name == "trial-2" else 0.0).save(run_dir / "config.toml")
        row = dict(epoch=1, lr=0.1, train_loss=1.0, train_acc=50.0, eval_loss=1.0, eval_acc=40.0, seconds=1.0)
        write_csv(
            run_dir / "metrics.csv",
            [{**row, **({"l2sp": 0.5} if name == "trial-2" else {})}],
            METRIC_COLUMNS + (["l2sp"] if name == "trial-2" else []),
        )
        (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "selected_on": "test"}))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    compare.main([f"sweep/{name}" for name in ("trial-10", "trial-2", "trial-1")])
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    table = [dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True)) for line in lines[2:5]]
    assert [(r["run"], r["start"], r["method"]) for r in table] == [
        ("sweep/trial-1", "demo-pretrained", "plain"),
        ("sweep/trial-2", "IMAGENET1K_V2", "L2-SP 0.01"),
        ("sweep/trial-10", "random", "plain"),
    ]
