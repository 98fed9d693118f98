"""The fine-tuning methods of cars/finetune.py: each does exactly what its paper says, on every kind of network and
start, and bad combinations are one line."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_args, tiny_run, write_hub_folder
from test_models import place_in_torchvision_cache

import eval as eval_tool
import train
from cars import finetune, methods
from cars.checkpoint import load_checkpoint
from cars.config import Config
from cars.errors import UserError
from cars.loaders import eval_loader
from cars.models import build_model
from cars.report import read_metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_hub_folder(tmp_path_factory.mktemp("methods") / "hub")


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def start_of(arch: str, weights: str) -> dict:
    """The start's state dict as train.py builds it (the head is new: only the backbone is compared)."""
    return build_model(arch, weights, 3).state_dict()


# every method on each kind of network, from ImageNet-style weights and from demo-pretrained ones: one run each, every
# flag that can go together at once. A frozen tensor must stay bit-identical to the start.
EVERY_METHOD = ["--probe-init", "--layer-decay", "0.8", "--l2sp", "0.01", "--delta", "0.01", "--bss", "0.001"]


@pytest.mark.parametrize(
    "arch, weights, surgical, last_block",
    [
        ("resnet18", "IMAGENET1K_V1", ["--train-blocks", "layer4"], "layer4.1"),
        ("efficientnet_b0", "IMAGENET1K_V1", ["--train-params", "norm"], "features.8"),
        (
            "shufflenet_v2_x0_5",
            "demo-pretrained",
            ["--train-params", "bias", "--train-blocks", "stem,stage4"],
            "stage4.3",
        ),
    ],
)
def test_every_method_runs_on_each_network_and_frozen_tensors_stay_bit_identical(
    tmp_path, data, demo_pretrained, monkeypatch, arch, weights, surgical, last_block
):
    monkeypatch.setattr(methods, "DELTA_ATTENTION_IMAGES", 4)  # each knocked-out channel costs a pass over them
    if weights != "demo-pretrained":  # the demo_pretrained fixture placed those in the session's cache
        place_in_torchvision_cache(arch, weights)
    run_dir = tmp_path / "run"
    every = EVERY_METHOD
    if arch == "efficientnet_b0":  # its random stand-in weights give nearly constant features at 32 px: LP-FT's probe
        every = [f for f in EVERY_METHOD if f != "--probe-init"]  # gets huge weights and the run diverges (now said)
    flags = ["--arch", arch, "--weights", weights, "--epochs", "1", *every, *surgical, "--co-tuning", "0.5"]
    train.main(tiny_args(data, run_dir, *flags))

    start, tuned = start_of(arch, weights), load_checkpoint(run_dir / "last.pt")["model"]
    cfg = Config(
        arch=arch,
        weights=weights,
        train_blocks=surgical[surgical.index("--train-blocks") + 1] if "--train-blocks" in surgical else "",
        train_params=surgical[surgical.index("--train-params") + 1] if "--train-params" in surgical else "all",
    )
    model = build_model(arch, weights, 3)
    trained = {name for name, _ in methods.trained_parameters(cfg, model)}
    head = finetune.head_block(model)
    frozen_parameters = [n for n, _ in model.named_parameters() if n not in trained]
    assert frozen_parameters and any(not n.startswith(head) for n in trained)
    for name in frozen_parameters:
        assert torch.equal(tuned[name], start[name]), f"{name} is frozen but moved"
    moved = [n for n in trained if not n.startswith(head) and not torch.equal(tuned[n], start[n])]
    assert moved, "the trained blocks moved"
    frozen_blocks = methods.frozen_blocks(cfg, model)
    for name, value in start.items():  # surgical: a frozen block keeps its BatchNorm statistics too
        if "running" in name and finetune.block_of(name, finetune.blocks(model)) in frozen_blocks:
            assert torch.equal(tuned[name], value), f"{name}: a frozen block's statistics moved"

    rows = read_metrics(run_dir / "metrics.csv")
    assert all(rows[-1][term] > 0 for term in ("l2sp", "delta", "bss", "co_tuning"))
    groups = {row["group"] for row in read_rows(run_dir / "param_groups.csv")}
    assert "co-tuning source head" in groups and "head" in groups
    assert finetune.block_of(last_block, finetune.blocks(model)) in groups or "--train-blocks" not in surgical
    log = (run_dir / "train.log").read_text()
    assert "linear probe on the start's features of 18 training images" in log
    total, trained_count = methods.parameter_counts(cfg, model)
    assert f"{trained_count:,} of {total:,} parameters train" in log
    if arch == "resnet18":  # the report names the method, and its lens shows the frozen blocks at exactly 0 change
        eval_tool.main([str(run_dir), "--num-gradcam", "2", "--workers", "0", "--batch-size", "8"])
        report = (run_dir / "eval" / "report.md").read_text()
        assert (
            "Method: LP-FT (linear-probe head first), layer-wise lr decay 0.8, surgical: only layer4 and the head"
            in report
        )
        still = ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
        assert f"{len(still)} blocks did not move at all, as the method froze them: {', '.join(still)}." in report


def test_param_groups_csv_shows_each_blocks_lr_as_the_optimizer_has_it(tmp_path, data):
    """--layer-decay 0.5 on a ResNet-18: the head at lr, layer4.1 at lr/2, ... the stem (conv1 and bn1, one block)
    nine blocks down at lr/2^9, in every epoch, read from the optimizer; and the step really uses those lrs."""
    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    run = tiny_run(data, tmp_path / "run", "--weights", "IMAGENET1K_V1", "--layer-decay", "0.5", "--lr", "0.08")
    depth = {"head": 0, "layer4.1": 1, "layer4.0": 2, "layer3.1": 3, "layer1.0": 8, "conv1": 9, "bn1": 9}
    groups = {group["name"]: group for group in run.optimizer.param_groups}
    for name, k in depth.items():
        assert groups[name]["lr"] == pytest.approx(0.08 * 0.5**k, rel=1e-12), name
    assert sum(len(g["params"]) for g in groups.values()) == len(list(run.raw_model.parameters()))

    # one SGD step without momentum history moves each weight by lr x (gradient + decay x weight): the applied lr
    before = {n: p.detach().clone() for n, p in run.raw_model.named_parameters()}
    train.train_epoch(run, 1)
    conv = dict(run.raw_model.named_parameters())["conv1.weight"]
    assert not torch.equal(conv, before["conv1.weight"])

    train.main(
        tiny_args(data, tmp_path / "whole", "--weights", "IMAGENET1K_V1", "--layer-decay", "0.5", "--lr", "0.08")
    )
    rows = read_rows(tmp_path / "whole" / "param_groups.csv")
    assert list(rows[0]) == ["epoch", "group", "parameters", "lr", "weight_decay"]
    by_epoch = {(int(r["epoch"]), r["group"]): r for r in rows}
    assert {epoch for epoch, _ in by_epoch} == {1, 2}
    for name, k in depth.items():
        assert float(by_epoch[1, name]["lr"]) == pytest.approx(0.08 * 0.5**k, rel=1e-9)
    # the step schedule does not drop within 2 epochs; the decay is the recipe's
    assert float(by_epoch[2, "conv1"]["lr"]) == pytest.approx(0.08 * 0.5**9, rel=1e-9)
    assert int(by_epoch[1, "conv1"]["parameters"]) == 3 * 64 * 7 * 7


def backbone_distance(run_dir: Path, start: dict) -> float:
    tuned = load_checkpoint(run_dir / "last.pt")["model"]
    return math.sqrt(
        sum(
            float(((tuned[k] - v) ** 2).sum())
            for k, v in start.items()
            if not k.startswith("fc.") and v.is_floating_point() and "running" not in k and "num_batches" not in k
        )
    )


def test_l2sp_is_zero_at_the_start_pulls_the_weights_back_and_resumes_exactly(tmp_path, data):
    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    start = start_of("resnet18", "IMAGENET1K_V1")
    run = tiny_run(data, tmp_path / "first", "--weights", "IMAGENET1K_V1", "--l2sp", "1")
    images = torch.rand(4, 3, 32, 32)
    loss, cross_entropy, _, terms = run.objective(run.model, images, torch.tensor([0, 1, 2, 0]))
    assert terms["l2sp"].item() == 0.0 and torch.equal(loss, cross_entropy)
    # L2-SP replaces the backbone's weight decay; the head keeps it (Li et al. 2018)
    decay = {group["name"]: group["weight_decay"] for group in run.optimizer.param_groups}
    assert decay == {"backbone": 0.0, "head": 1e-4}

    common = ["--weights", "IMAGENET1K_V1", "--epochs", "3", "--lr", "0.05"]
    train.main(tiny_args(data, tmp_path / "plain", *common))
    train.main(tiny_args(data, tmp_path / "pulled", *common, "--l2sp", "10"))
    plain, pulled = backbone_distance(tmp_path / "plain", start), backbone_distance(tmp_path / "pulled", start)
    assert 0 < pulled < 0.7 * plain, (pulled, plain)

    # interrupted after epoch 1 and resumed: the start is rebuilt, checked, and the run ends bit-identical
    train.main(tiny_args(data, tmp_path / "stopped", *common[:3], "1", *common[4:], "--l2sp", "10"))
    train.main(["--resume", str(tmp_path / "stopped"), "--epochs", "3"])
    a, b = (load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("pulled", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    timeless = [
        [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / name / "metrics.csv")]
        for name in ("pulled", "stopped")
    ]
    assert timeless[0] == timeless[1]

    # a start that is no longer the one it was: one line, nothing changed
    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1", seed=7)  # other weights under the same name
    with pytest.raises(UserError, match="started from other weights"):
        train.main(["--resume", str(tmp_path / "stopped"), "--epochs", "4"])


def test_l2sp_value_and_gradient_are_the_formulas():
    """L2-SP writes its gradient itself (one node for every weight): it must be autograd's gradient of
    alpha/2 x ||w - w0||^2, scaled as the loss is (a gradient scaler multiplies the loss)."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(3, 4), (5,), (2, 2, 3, 3)]]
    starts = [torch.randn(p.shape, generator=generator) for p in params]
    value = methods.L2SP(0.3, list(zip(params, starts, strict=True)))(None, None, None)
    (2.5 * value).backward()
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    expected = 0.3 / 2 * sum(((p - s) ** 2).sum() for p, s in zip(params, starts, strict=True))
    (2.5 * expected).backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(torch.allclose(mine, p.grad, rtol=1e-6) for mine, p in zip(ours, params, strict=True))
    assert methods.L2SP(0.3, [])(None, None, None).item() == 0.0  # nothing of the backbone trains


def test_the_probe_head_is_the_fitted_probe(tmp_path, data):
    """LP-FT's head is the logistic regression fitted on the start's frozen features: on those features it predicts
    the regression's probabilities."""
    from sklearn.linear_model import LogisticRegression

    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    run = tiny_run(data, tmp_path / "run", "--weights", "IMAGENET1K_V1", "--probe-init")
    start = build_model("resnet18", "IMAGENET1K_V1", 3)
    loader = eval_loader(
        run.splits.train,
        resolution=32,
        interpolation="bilinear",
        cache=run.cfg.cache,
        skip_bad_images=False,
        batch_size=6,
        workers=0,
    )
    features, labels = finetune.head_inputs(start, loader, run.device, description="features")
    x = features.numpy().astype(np.float64)
    scaled = (x - x.mean(0)) / x.std(0).mean()  # by hand: centred, one scale for all features
    expected = LogisticRegression(max_iter=1000).fit(scaled, labels.numpy()).predict_proba(scaled)
    head = run.raw_model.fc.eval()
    with torch.no_grad():
        got = torch.softmax(head(features), dim=1).numpy()
    assert np.allclose(got, expected, atol=1e-4)
    assert not torch.equal(head.weight, build_model("resnet18", "IMAGENET1K_V1", 3).fc.weight)


def test_bss_shrinks_the_smallest_singular_values_and_delta_is_zero_at_the_start(tmp_path, data, demo_pretrained):
    features = torch.diag(torch.tensor([5.0, 3.0, 2.0, 0.5]))  # singular values 5, 3, 2, 0.5
    assert methods.BSS(0.1, 1)({"features": features}, None, None).item() == pytest.approx(0.1 * 0.25)
    assert methods.BSS(0.1, 2)({"features": features}, None, None).item() == pytest.approx(0.1 * (0.25 + 4))

    run = tiny_run(
        data,
        tmp_path / "run",
        "--arch",
        "shufflenet_v2_x0_5",
        "--weights",
        "demo-pretrained",
        "--resolution",
        "48",
        "--delta",
        "1",
        "--co-tuning",
        "2",
    )
    delta, co_tuning = run.objective.terms
    assert [len(a) for a in delta.attention] == [24, 48, 96, 192, 1024]  # one weight per channel of each stage
    assert all(a.sum().item() == pytest.approx(1.0) and (a > 0).all() for a in delta.attention)
    images = torch.rand(6, 3, 48, 48)
    _, _, _, terms = run.objective(run.model.eval(), images, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert terms["delta"].item() == 0.0  # the network is its start: no feature map has moved

    # Co-Tuning: the source head starts as the start's own 4-way head; p(source | target) is a distribution per class
    own = torch.load(demo_pretrained, weights_only=True)
    assert torch.equal(co_tuning.source_head.weight, own["fc.weight"]) and co_tuning.relation.shape == (3, 4)
    assert torch.allclose(co_tuning.relation.sum(1), torch.ones(3))
    features = run.objective.capture.outputs["features"]
    soft = co_tuning.relation[torch.tensor([0, 1, 2, 0, 1, 2])]
    by_hand = -(soft * torch.log_softmax(co_tuning.source_head(features), 1)).sum(1).mean()
    assert terms["co_tuning"].item() == pytest.approx(2 * by_hand.item(), rel=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train-blocks", "layer9"], r"has no block 'layer9'; name a stage \(stem, conv1\+bn1, layer1, .*layer4\.1"),
        (["--layer-decay", "0"], r"--layer-decay must be in \(0, 1\]"),
        (["--l2sp", "-1"], "--l2sp must not be negative"),
        (["--probe-init", "--freeze-epochs", "1"], "--freeze-epochs and --probe-init both decide what trains first"),
        (["--train-params", "norm", "--freeze-epochs", "1"], "--freeze-epochs and --train-params"),
        (["--layer-decay", "0.5", "--backbone-lr-mult", "0.1"], "both set the backbone's lr"),
        (["--l2sp", "0.1", "--weights", "none"], "--l2sp needs a pretrained start"),
        (["--bss-k", "3"], "--bss-k 3 does nothing without --bss"),
        (["--co-tuning", "1", "--weights", "HEADLESS"], "--co-tuning needs the start's source-task head"),
        # D9: with the head alone training, a method that acts on the backbone acts on nothing
        (["--train-blocks", "head", "--train-params", "bias"], r"and --train-params \(BitFit\) acts through"),
        (["--train-blocks", "head", "--l2sp", "0.1"], "the run would be a plain linear probe"),
        (["--train-blocks", "head", "--co-tuning", "1"], "--train-blocks head trains the head alone, and --co-tuning"),
        (["--train-blocks", "head", "--delta", "0.1"], "--train-blocks head trains the head alone, and --delta"),
        # D10: a list of no names
        (["--train-blocks", ","], "--train-blocks ',' names no block"),
        # D11: k at least the singular values a batch has
        (["--bss", "0.1", "--bss-k", "6"], "--bss-k 6 would shrink every singular value of a batch of 6 images"),
    ],
)
def test_bad_method_flags_are_one_line_and_write_nothing(tmp_path, data, flags, message):
    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    if "HEADLESS" in flags:  # a backbone saved without its head
        state = {k: v for k, v in build_model("resnet18", "IMAGENET1K_V1", 3).state_dict().items() if "fc." not in k}
        torch.save(state, tmp_path / "headless.pth")
        flags = [str(tmp_path / "headless.pth") if f == "HEADLESS" else f for f in flags]
    base = ["--weights", "IMAGENET1K_V1"] if "--weights" not in flags else []
    with pytest.raises(UserError, match=message):
        train.main(tiny_args(data, tmp_path / "run", *base, *flags))
    assert not (tmp_path / "run").exists()


def test_a_sweep_searches_the_method_knobs(tmp_path):
    """The methods are knobs: sweep.py searches them like the lr, and every trial's recipe is a valid one."""
    from cars.sweeps import load_sweep

    path = tmp_path / "methods.toml"
    path.write_text(
        f'base = "{Path(__file__).resolve().parents[1] / "configs" / "demo.toml"}"\ntrials = 4\n\n[fixed]\n'
        "val_split = 0.25\n\n[space]\nl2sp = { low = 0.001, high = 0.1, log = true }\n"
        'layer_decay = { low = 0.6, high = 1.0 }\ntrain_blocks = { choices = ["", "stage4,conv5"] }\n'
    )
    sweep = load_sweep(str(path))
    assert [p.name for p in sweep.space] == ["l2sp", "layer_decay", "train_blocks"]
    for params in (
        {"l2sp": 0.001, "layer_decay": 0.6, "train_blocks": ""},
        {"l2sp": 0.1, "layer_decay": 1.0, "train_blocks": "stage4,conv5"},
    ):
        cfg = Config(**sweep.trial_values(params)).validate()
        assert methods.describe(cfg).startswith("layer-wise lr decay 0.6" if params["layer_decay"] < 1 else "surgical")


def test_train_blocks_head_trains_the_head_alone():
    """A linear probe trained by the recipe: every backbone tensor frozen."""
    model = build_model("resnet18", "none", 3)
    trained = [name for name, _ in methods.trained_parameters(Config(train_blocks="head"), model)]
    assert trained == ["fc.weight", "fc.bias"]
    assert methods.describe(Config(train_blocks="head")) == "linear probe (the head alone trains)"


def test_delta_measures_its_attention_on_every_class_whatever_the_stored_order(tmp_path, image_folder, monkeypatch):
    """An ImageFolder tree lists class after class: the attention must not come from the first classes only. With 6
    images wanted of 3 classes stored in order, each class gives 2, drawn by the seed."""
    seen = []

    def recording(model, stage_modules, batches):
        batches = list(batches)
        seen.append(torch.cat([labels for _, labels in batches]).tolist())
        return [torch.full((w,), 1.0 / w) for w in (64, 64, 128, 256, 512)]

    monkeypatch.setattr(methods, "DELTA_ATTENTION_IMAGES", 6)
    monkeypatch.setattr(methods, "channel_attention", recording)
    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    stored = [label for _, label in sorted((p, p.parent.name) for p in (image_folder / "train").rglob("*.jpg"))]
    assert stored[:6] == [stored[0]] * 6  # the first 6 stored images are of one class
    tiny_run(image_folder, tmp_path / "run", "--weights", "IMAGENET1K_V1", "--delta", "0.1")
    assert sorted(seen[0]) == [0, 0, 1, 1, 2, 2]
    tiny_run(image_folder, tmp_path / "again", "--weights", "IMAGENET1K_V1", "--delta", "0.1", "--seed", "3")
    assert sorted(seen[1]) == [0, 0, 1, 1, 2, 2]


def test_the_spread_sample_is_stratified_nested_by_count_and_seeded(image_folder):
    from cars.data import open_source, spread_sample

    train_split = open_source(str(image_folder))[0]
    five = spread_sample(train_split, 5, seed=0)
    counts = [five.labels.count(c) for c in range(3)]
    assert sorted(counts) == [1, 2, 2] and len(five) == 5
    assert spread_sample(train_split, 5, seed=0).indices == five.indices
    assert spread_sample(train_split, 5, seed=1).indices != five.indices
    assert len(spread_sample(train_split, 100, seed=0)) == len(train_split)  # fewer when the split has fewer


def test_a_torchvision_vit_sets_up_with_each_encoder_layer_its_own_block():
    """The class token belongs to no block (it crashed setup); with it counted with the stem, layer decay gives each
    of the 12 encoder layers its own lr, as timm's layer decay does."""
    model = build_model("vit_b_16", "none", 3)
    names = finetune.blocks(model)
    assert names[0] == "conv_proj" and names[1:13] == [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    assert names[13:] == ["encoder.ln", "heads.head"]
    assert finetune.block_of("class_token", names) == "conv_proj"
    assert finetune.block_of("encoder.pos_embedding", names) == "conv_proj"
    assert [label for label, _ in finetune.stage_runs(model)] == ["conv_proj", "encoder.layers", "encoder.ln"]
    groups = {g["name"]: g for g in methods.param_groups(Config(arch="vit_b_16", layer_decay=0.5, lr=1.0), model)}
    assert groups["head"]["lr"] == 1.0 and groups["encoder.ln"]["lr"] == 0.5
    for i in range(12):
        assert groups[f"encoder.layers.encoder_layer_{i}"]["lr"] == pytest.approx(0.5 ** (13 - i))
    stem = {id(p) for p in groups["conv_proj"]["params"]}
    assert id(model.class_token) in stem and id(model.encoder.pos_embedding) in stem
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    # LoRA's default places: the MLPs of every encoder layer (the final norm holds no layer; the attention's output
    # projection is read past any adapter by nn.MultiheadAttention, so it is no candidate)
    targets = methods.lora_targets(Config(arch="vit_b_16", weights="none", lora=4), model)
    assert targets == [f"encoder.layers.encoder_layer_{i}.mlp.{j}" for i in range(12) for j in (0, 3)]


def test_a_vit_run_sets_up(tmp_path, data):
    """train.py's setup of a torchvision ViT (plain and with --layer-decay): it crashed before any step."""
    run = train.setup(
        train.parse_train(
            tiny_args(data, tmp_path / "run", "--arch", "vit_b_16", "--resolution", "224", "--layer-decay", "0.8")
        ),
        command=["train.py"],
    )
    assert len(run.optimizer.param_groups) == 15


def test_a_method_term_that_stops_being_finite_is_a_divergence(tmp_path, data):
    """The cross-entropy can stay finite while a method's term does not: the loss that was minimised is checked."""
    from cars.engine import Diverged, Progress, RunningTotals

    totals = RunningTotals(Progress(lr=0.1), "cpu", ["l2sp"])
    logits, labels = torch.zeros(2, 3), torch.tensor([0, 1])
    totals.add(0, torch.tensor(1.0), logits, labels, {"l2sp": torch.tensor(0.5)})
    totals.add(1, torch.tensor(1.0), logits, labels, {"l2sp": torch.tensor(float("inf"))})
    with pytest.raises(Diverged, match="the training loss became inf at step 2"):
        totals.settle(Progress(lr=0.1), 0.1)


def test_co_tuning_s_source_head_trains_at_the_backbone_s_lr(tmp_path, data, demo_pretrained):
    """As the Transfer-Learning-Library: the source head sits on the pretrained features, as the backbone does."""
    run = tiny_run(
        data,
        tmp_path / "run",
        *["--arch", "shufflenet_v2_x0_5", "--weights", "demo-pretrained", "--resolution", "48"],
        *["--co-tuning", "1", "--backbone-lr-mult", "0.1", "--lr", "0.01"],
    )
    lrs = {group["name"]: group["lr"] for group in run.optimizer.param_groups}
    assert lrs["head"] == 0.01 and lrs["co-tuning source head"] == pytest.approx(0.001) == lrs["backbone"]
