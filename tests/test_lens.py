"""The transfer lens and the transferability scores, each against its definition on inputs whose answer is known;
then eval.py's section and inspect_data.py --rank-models on a real fine-tune from the demo-pretrained weights."""

import copy
import csv
import json
import shutil

import numpy as np
import pytest
import torch
import torchvision
from conftest import SOURCE_KINDS, write_kinds
from scipy.optimize import minimize

import eval as eval_tool
import inspect_data
import train
from cars import demo, finetune, transfer, transferability
from cars.checkpoint import read_state_dict
from cars.errors import UserError
from cars.finetune import start_fingerprint
from cars.models import build_model

ARCH = "shufflenet_v2_x0_5"


def read_csv(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


# --- blocks and stages -------------------------------------------------------------------------------------------


def meta_model(arch: str):
    with torch.device("meta"):
        return torchvision.models.get_model(arch)


def test_blocks_and_stages_follow_the_architecture():
    resnet = meta_model("resnet50")
    residual = [f"layer{i}.{j}" for i, n in enumerate((3, 4, 6, 3), 1) for j in range(n)]
    assert finetune.blocks(resnet) == ["conv1", "bn1", *residual, "fc"]
    assert finetune.stages(resnet) == [
        ("conv1+bn1", "bn1"),
        ("layer1", "layer1.2"),
        ("layer2", "layer2.3"),
        ("layer3", "layer3.5"),
        ("layer4", "layer4.2"),
    ]
    shufflenet = meta_model(ARCH)
    assert finetune.blocks(shufflenet)[:2] == ["conv1", "stage2.0"] and finetune.blocks(shufflenet)[-2:] == [
        "conv5",
        "fc",
    ]
    assert [label for label, _ in finetune.stages(shufflenet)] == ["conv1", "stage2", "stage3", "stage4", "conv5"]
    efficientnet = meta_model("efficientnet_b0")
    assert finetune.head_block(efficientnet) == "classifier"
    assert finetune.blocks(efficientnet)[:3] == ["features.0", "features.1.0", "features.2.0"]
    assert [label for label, _ in finetune.stages(efficientnet)] == [
        "features.0",
        *[f"features.{i}" for i in range(1, 8)],
        "features.8",
    ]


# --- weights and BatchNorm statistics ------------------------------------------------------------------------------


def test_a_planted_weight_change_comes_back_exactly():
    start = build_model("resnet18", "none", 5)
    tuned = copy.deepcopy(start)
    with torch.no_grad():
        # powers of two: float32 multiplies by them exactly
        for name, factor in (("layer2.1", 2.0), ("layer4.0", 0.25), ("conv1", 4.0)):
            for p in tuned.get_submodule(name).parameters():
                p.mul_(factor)
        tuned.layer3[0].bn1.running_mean.add_(100.0)  # a buffer, not a parameter: no weight change
    rows = {r["layer"]: r for r in transfer.weight_change(start, tuned, head_is_new=True)}
    assert list(rows) == finetune.blocks(start)
    assert rows["layer2.1"]["relative_change"] == pytest.approx(1.0, abs=1e-12)
    assert rows["layer4.0"]["relative_change"] == pytest.approx(0.75, abs=1e-12)
    assert rows["conv1"]["relative_change"] == pytest.approx(3.0, abs=1e-12)
    unchanged = [r for name, r in rows.items() if name not in ("layer2.1", "layer4.0", "conv1", "fc")]
    assert unchanged and all(r["relative_change"] == 0 for r in unchanged)
    assert rows["fc"]["start"] == "new" and rows["fc"]["relative_change"] == ""
    assert rows["layer2.1"]["parameters"] == sum(p.numel() for p in start.layer2[1].parameters())
    # a head that came with the weights is compared like any block
    with torch.no_grad():
        tuned.fc.weight.mul_(2.0)
        tuned.fc.bias.mul_(2.0)
    rows = {r["layer"]: r for r in transfer.weight_change(start, tuned, head_is_new=False)}
    assert rows["fc"]["relative_change"] == pytest.approx(1.0) and rows["fc"]["start"] == "pretrained"


def test_a_planted_batchnorm_drift_comes_back_in_starting_standard_deviations():
    start = build_model("resnet18", "none", 5)
    with torch.no_grad():
        for module in start.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    tuned = copy.deepcopy(start)
    bn = tuned.layer2[0].bn2
    sigma0 = (bn.running_var + bn.eps).sqrt()
    with torch.no_grad():
        bn.running_mean.add_(2 * sigma0)  # two starting standard deviations
        bn.running_var.copy_((3 * sigma0) ** 2 - bn.eps)  # sigma becomes 3 sigma0: it moved by 2 sigma0
    rows = {r["layer"]: r for r in transfer.bn_drift(start, tuned)}
    assert len(rows) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in start.modules())
    assert rows["layer2.0.bn2"]["mean_shift"] == pytest.approx(2.0, rel=1e-5)
    assert rows["layer2.0.bn2"]["std_shift"] == pytest.approx(2.0, rel=1e-5)
    assert all(r["mean_shift"] == r["std_shift"] == 0 for name, r in rows.items() if name != "layer2.0.bn2")


# --- CKA -----------------------------------------------------------------------------------------------------------


def numpy_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. 2012's estimator, written out with a vector of ones."""
    n = len(k)
    kt, lt, one = k - np.diag(np.diag(k)), l - np.diag(np.diag(l)), np.ones(n)
    return (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ kt @ lt @ one
    ) / (n * (n - 3))


def numpy_hsic_biased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def minibatch(x: torch.Tensor, y: torch.Tensor, size: int) -> float:
    cka = transfer.MinibatchCKA()
    for start in range(0, len(x), size):
        cka.add(x[start : start + size], y[start : start + size])
    return cka.value


def test_cka_equals_the_formula_and_has_the_invariances_of_its_definition():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 40, generator=gen, dtype=torch.float64)
    y = x[:, :30] @ torch.randn(30, 25, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(
        256, 25, generator=gen, dtype=torch.float64
    )
    kx, ky = (x @ x.T).numpy(), (y @ y.T).numpy()
    # the plain estimator is the biased HSIC's CKA; the minibatch one, over one batch, the unbiased HSIC's
    biased = numpy_hsic_biased(kx, ky) / np.sqrt(numpy_hsic_biased(kx, kx) * numpy_hsic_biased(ky, ky))
    assert transfer.linear_cka(x, y) == pytest.approx(biased, rel=1e-10)
    for a, b in ((kx, ky), (kx, kx), (ky, ky)):
        assert transfer.hsic_unbiased(a, b) == pytest.approx(numpy_hsic_unbiased(a, b), rel=1e-9)
    # over several minibatches: the sums of each minibatch's HSIC
    batches = [slice(s, s + 64) for s in range(0, 256, 64)]
    kl, kk, ll = (
        sum(numpy_hsic_unbiased(a[s, s], b[s, s]) for s in batches) for a, b in ((kx, ky), (kx, kx), (ky, ky))
    )
    # (the Gram matrices are float32 products, as on the GPU: agreement to 1e-6)
    assert minibatch(x, y, 64) == pytest.approx(kl / np.sqrt(kk * ll), rel=1e-6)
    # 1 for identical features; unchanged by an orthogonal map and an isotropic scaling of either side
    assert minibatch(x, x, 64) == pytest.approx(1.0, abs=1e-9) and transfer.linear_cka(x, x) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(25, 25, generator=gen, dtype=torch.float64))
    for estimate in (lambda a, b: minibatch(a, b, 64), transfer.linear_cka):
        assert estimate(x, 7.5 * y @ q) == pytest.approx(estimate(x, y), rel=1e-6)
        assert estimate(0.01 * x, y) == pytest.approx(estimate(x, y), rel=1e-6)


def test_cka_of_independent_features_is_near_zero_where_the_plain_estimator_is_not():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4096, 512, generator=gen), torch.randn(4096, 512, generator=gen)
    assert abs(minibatch(x, y, 256)) < 0.02
    assert transfer.linear_cka(x[:256], y[:256]) > 0.5  # wide features, few images: the biased estimate is far off


def test_a_stage_output_is_hooked_and_pooled_as_the_model_computes_it():
    model = build_model("resnet18", "none", 3).eval()
    images = torch.randn(5, 3, 64, 64)
    with transfer.stage_outputs(model, finetune.stages(model)) as outputs, torch.no_grad():
        logits = model(images)
    expected = torch.nn.functional.adaptive_avg_pool2d(outputs["layer4"], 1).flatten(1)
    assert torch.allclose(model.fc(transfer.pooled(outputs["layer4"])), logits, atol=1e-5)
    assert torch.allclose(transfer.pooled(outputs["layer4"]), expected)
    assert outputs["conv1+bn1"].shape == (5, 64, 32, 32)


# --- linear probes -------------------------------------------------------------------------------------------------


def test_a_linear_probe_finds_a_linear_rule_and_not_a_random_one():
    rng = np.random.default_rng(0)
    y = np.arange(600) % 4
    x = rng.normal(size=(600, 20))
    x[:, 0] += 6 * (y % 2) - 3  # four classes, each a quadrant of features 0 and 1 with a wide margin
    x[:, 1] += 6 * (y // 2) - 3
    probe = transfer.linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert probe.accuracy >= 98 and probe.converged
    shuffled = rng.permutation(y)
    assert transfer.linear_probe(x[:400], shuffled[:400], x[400:], shuffled[400:]).accuracy < 40  # chance: 25 %


# --- transferability scores ----------------------------------------------------------------------------------------


def test_leep_and_nce_equal_their_definitions():
    rng = np.random.default_rng(2)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 0])
    n, source = len(labels), 4
    theta = rng.dirichlet(np.ones(source), size=n)
    # LEEP written out: P(y, z), P(z), P(y | z), then the mean log of the expected empirical prediction
    joint = np.zeros((3, source))
    for i in range(n):
        for z in range(source):
            joint[labels[i], z] += theta[i, z] / n
    expected = np.mean(
        [np.log(sum(joint[labels[i], z] / joint[:, z].sum() * theta[i, z] for z in range(source))) for i in range(n)]
    )
    assert transferability.leep(theta, labels) == pytest.approx(expected, rel=1e-12)
    # NCE written out: -H(Y | Z) of the hard source labels
    z = theta.argmax(1)
    entropy = 0.0
    for zv in set(z):
        members = labels[z == zv]
        for yv in set(members):
            p_joint, p_cond = np.sum((z == zv) & (labels == yv)) / n, np.mean(members == yv)
            entropy -= p_joint * np.log(p_cond)
    assert transferability.nce(theta, labels) == pytest.approx(-entropy, rel=1e-12)
    # known answers: a source head that names the target class, and one that says nothing
    prior = -sum(np.mean(labels == c) * np.log(np.mean(labels == c)) for c in range(3))
    perfect = np.eye(source)[labels]
    assert transferability.leep(perfect, labels) == pytest.approx(0.0, abs=1e-12)
    assert transferability.nce(perfect, labels) == pytest.approx(0.0, abs=1e-12)
    uniform = np.full((n, source), 1 / source)
    assert transferability.leep(uniform, labels) == pytest.approx(-prior)
    assert transferability.nce(uniform, labels) == pytest.approx(-prior)


def test_hscore_equals_its_definition():
    labels = np.repeat(np.arange(4), 25)
    one_hot = 3.0 * np.eye(4)[labels]  # every feature is the class: all variance is between the classes
    assert transferability.hscore(one_hot, labels, shrink=False) == pytest.approx(3.0)  # C - 1: the rank
    rng = np.random.default_rng(3)
    f = rng.normal(size=(100, 6)) + labels[:, None] * np.array([1.0, 0, 0, 0.5, 0, 0])
    centred = f - f.mean(0)
    between = np.zeros((6, 6))
    for c in range(4):
        mean = centred[labels == c].mean(0)
        between += np.sum(labels == c) / len(f) * np.outer(mean, mean)
    expected = np.trace(np.linalg.inv(np.cov(f.T, bias=True)) @ between)
    assert transferability.hscore(f, labels, shrink=False) == pytest.approx(expected, rel=1e-9)
    assert transferability.hscore(f, labels) > transferability.hscore(rng.normal(size=(100, 6)), labels)


def ledoit_wolf_by_hand(centred: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit & Wolf 2004, lemmas 3.2-3.4, written from the paper: the shrinkage a = min(b2, d2) / d2 of the sample
    covariance S towards m I, with m = tr(S)/p, d2 = ||S - m I||^2 / p, b2 = sum_k ||x_k x_k' - S||^2 / (n^2 p)."""
    n, p = centred.shape
    s = centred.T @ centred / n
    m = np.trace(s) / p
    d2 = np.sum((s - m * np.eye(p)) ** 2) / p
    b2 = sum(np.sum((np.outer(x, x) - s) ** 2) for x in centred) / (n**2 * p)
    a = min(b2, d2) / d2
    return (1 - a) * s + a * m * np.eye(p), a


def test_the_regularised_hscore_is_the_papers_formula_where_the_shrinkage_is_large():
    """Ibrahim et al. 2022: tr(cov_a(f)^-1 (1 - a) cov(E[f|y])). With fewer images than dimensions the shrinkage is
    large, and leaving out (1 - a) gives another number, one that can exceed C - 1."""
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(4), 10)
    for d in (64, 256):
        f = rng.normal(size=(40, d)) + 0.8 * np.eye(4)[labels] @ rng.normal(size=(4, d))
        centred = f - f.mean(0)
        means = np.stack([centred[labels == c].mean(0) for c in labels])
        between = means.T @ means / len(f)
        shrunk, a = ledoit_wolf_by_hand(centred)
        assert a > 0.3  # large: the formula's factor matters
        expected = np.trace(np.linalg.inv(shrunk) @ ((1 - a) * between))
        assert transferability.hscore(f, labels) == pytest.approx(expected, rel=1e-8)
        assert transferability.hscore(f, labels) <= 3.0  # never above C - 1
        assert np.trace(np.linalg.inv(shrunk) @ between) > transferability.hscore(f, labels) * 1.3


def evidence(f: np.ndarray, y: np.ndarray, log_alpha: float, log_beta: float) -> float:
    """The log marginal evidence of Bayesian linear regression, straight from its formula (You et al. 2021, eq. 2), with
    the reference implementation's floor of 1e-5 under |m|^2 and the residual."""
    alpha, beta = np.exp(log_alpha), np.exp(log_beta)
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    return (
        n / 2 * np.log(beta)
        + d / 2 * np.log(alpha)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * (np.sum((f @ m - y) ** 2) + transferability.EPSILON)
        - alpha / 2 * (m @ m + transferability.EPSILON)
        - np.linalg.slogdet(a)[1] / 2
    )


@pytest.mark.parametrize("n,d", [(60, 5), (12, 30)])  # more images than dimensions, and fewer
def test_logme_is_the_maximum_evidence_per_image_averaged_over_classes(n, d):
    rng = np.random.default_rng(n)
    labels = np.arange(n) % 3
    f = rng.normal(size=(n, d)) + 0.8 * np.eye(3)[labels] @ rng.normal(size=(3, d))
    best = []
    for c in range(3):
        y = (labels == c).astype(float)
        result = min(
            (
                minimize(
                    lambda p, y=y: -evidence(f, y, *p),
                    start,
                    method="Nelder-Mead",
                    options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000},
                )
                for start in ([0.0, 0.0], [3.0, 1.0], [-2.0, 2.0])
            ),
            key=lambda r: r.fun,
        )
        best.append(-result.fun / n)
    assert transferability.logme(f, labels) == pytest.approx(np.mean(best), abs=1e-6)


def test_logme_stays_finite_when_the_features_fit_the_labels_exactly():
    """Fewer images than dimensions, and features that are the one-hot labels: the residual is 0. The reference
    implementation's floor keeps the evidence finite, and such features still score above random ones."""
    labels = np.arange(12) % 3
    exact = np.hstack([np.eye(3)[labels], np.zeros((12, 27))])
    score = transferability.logme(exact, labels)
    assert np.isfinite(score)
    assert score > transferability.logme(np.random.default_rng(0).normal(size=(12, 30)), labels)


def test_logme_orders_separable_features_above_random_ones():
    rng = np.random.default_rng(4)
    labels = np.arange(300) % 5
    centres = rng.normal(size=(5, 32)) * 3
    separable = centres[labels] + rng.normal(size=(300, 32))
    assert transferability.logme(separable, labels) > transferability.logme(rng.normal(size=(300, 32)), labels) + 0.1


# --- on a real fine-tune -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fine_tuned(demo_pretrained, tmp_path_factory):
    """ShuffleNet fine-tuned for 3 epochs from the session's demo-pretrained weights on three of its source kinds in
    the cars' paints; then evaluated."""
    root = tmp_path_factory.mktemp("lens")
    data = write_kinds(root / "data", SOURCE_KINDS[:3], per_class=(8, 6), seed=5, paints=list(demo.PAINTS.values()))
    run_dir = root / "run"
    recipe = f"--arch {ARCH} --weights demo-pretrained --resolution 48 --batch-size 8 --epochs 3 --lr 0.003 "
    recipe += "--optimizer adamw --workers 0"
    train.main(["--data", str(data), "--run-dir", str(run_dir), *recipe.split()])
    eval_tool.main([str(run_dir), "--num-gradcam", "2", "--workers", "0", "--batch-size", "8"])
    return run_dir, data


def test_eval_reports_what_fine_tuning_changed(fine_tuned, demo_pretrained):
    run_dir, _ = fine_tuned
    out = run_dir / "eval" / "transfer"
    assert {p.name for p in out.iterdir()} == {
        "weight_change.csv",
        "weight_change.png",
        "bn_drift.csv",
        "cka.csv",
        "cka.png",
        "linear_probe.csv",
        "linear_probe.png",
    }
    # the weight change, computed again from the two files: the demo-pretrained start and best.pt
    start, tuned = read_state_dict(demo_pretrained), read_state_dict(run_dir / "best.pt")
    parameters = {name for name, _ in torchvision.models.get_model(ARCH).named_parameters()}
    rows = read_csv(out / "weight_change.csv")
    assert rows[-1] == {
        "layer": "fc",
        "parameters": str(tuned["fc.weight"].numel() + 3),
        "relative_change": "",
        "start": "new",
    }
    for row in rows[:-1]:
        names = [k for k in parameters if k.startswith(row["layer"] + ".")]
        moved = sum(float((tuned[k].double() - start[k].double()).pow(2).sum()) for k in names)
        size = sum(float(start[k].double().pow(2).sum()) for k in names)
        assert float(row["relative_change"]) == pytest.approx((moved / size) ** 0.5, rel=1e-9), row["layer"]
    drift = read_csv(out / "bn_drift.csv")
    assert len(drift) == sum(k.endswith("running_mean") for k in start)
    # every stage, each CKA a CKA, the probes on the 24 training and 18 eval images, the fine-tuned accuracy last
    stages = ["conv1", "stage2", "stage3", "stage4", "conv5"]
    cka = read_csv(out / "cka.csv")
    assert [r["layer"] for r in cka] == stages and all(
        -0.2 < float(r[k]) <= 1 + 1e-9 for r in cka for k in ("cka", "cka_control")
    )
    probes = read_csv(out / "linear_probe.csv")
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert [r["layer"] for r in probes] == [*stages, "fine-tuned"]
    assert float(probes[-1]["probe_acc"]) == pytest.approx(summary["top1"])
    assert all(round(float(r["probe_acc"]) * 18 / 100, 6).is_integer() for r in probes[:-1]), "counted on 18 images"
    lens = summary["transfer"]
    assert (
        lens["forward_passes"] == {"train": 24, "test": 18, "cka": 3 * 18}
        and lens["start_weights"] == "demo-pretrained"
    )
    # the paragraph reads the files
    report = (run_dir / "eval" / "report.md").read_text()
    final = probes[-2]  # the last stage's: what the head reads, not a stage chosen on the eval (here the test) split
    assert "## What fine-tuning changed" in report and "![CKA per stage](transfer/cka.png)" in report
    assert (
        f"frozen final features ({final['layer']}, what the head reads), fitted on the 24 images the run trained on, "
        f"reaches {float(final['probe_acc']):.1f}%" in (report.replace("\n", " "))
    )
    assert f"bought **{summary['top1'] - float(final['probe_acc']):+.1f} points**" in report
    assert lens["start_matches_run"] is True and len(lens["start_fingerprint"]) == 16


def test_against_itself_nothing_changed(fine_tuned, tmp_path):
    """--start-weights best.pt: the start is the fine-tuned model itself, its head included, so every change is 0 and
    every CKA is 1."""
    run_dir, _ = fine_tuned
    out = tmp_path / "self"
    quick = "--num-gradcam 0 --workers 0 --batch-size 8".split()
    eval_tool.main([str(run_dir), "--start-weights", str(run_dir / "best.pt"), "--out", str(out), *quick])
    rows = read_csv(out / "transfer" / "weight_change.csv")
    assert rows[-1]["start"] == "pretrained" and all(float(r["relative_change"]) == 0 for r in rows)
    assert all(
        float(r["mean_shift"]) == float(r["std_shift"]) == 0 for r in read_csv(out / "transfer" / "bn_drift.csv")
    )
    assert all(float(r["cka"]) == pytest.approx(1.0, abs=1e-9) for r in read_csv(out / "transfer" / "cka.csv"))


def test_the_section_is_skipped_with_a_reason_and_bad_start_weights_are_one_line(fine_tuned, tmp_path, capsys):
    run_dir, _ = fine_tuned
    eval_tool.main(
        [str(run_dir), "--transfer", "off", "--out", str(tmp_path / "off"), "--num-gradcam", "0", "--workers", "0"]
    )
    assert not (tmp_path / "off" / "transfer").exists()
    assert "skipped (--transfer off)" in capsys.readouterr().out
    other = tmp_path / "resnet18.pth"
    torch.save(build_model("resnet18", "none", 3).state_dict(), other)
    nan = tmp_path / "nan.pth"
    state = read_state_dict(run_dir / "best.pt")
    torch.save({k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()}, nan)
    for weights, message in (
        (other, "holds a resnet18 model, not shufflenet_v2_x0_5"),
        (nan, "hold NaN or infinite values"),
        ("", "--start-weights is empty"),
        (tmp_path, "is a folder, not a weights file"),
    ):
        with pytest.raises(UserError, match=message):
            eval_tool.main([str(run_dir), "--start-weights", str(weights), "--out", str(tmp_path / "bad")])
        assert not (tmp_path / "bad").exists(), "bad input is refused before the output folder is made"


def test_a_start_that_is_not_the_run_s_own_is_never_measured_as_if_it_were(fine_tuned, tmp_path, capsys):
    """The run records a fingerprint of its start. When the weights found under the run's start name are other
    weights (the demo's pretraining was made again, a file was replaced), the lens says so and measures nothing."""
    run_dir, _ = fine_tuned
    elsewhere = tmp_path / "run"
    shutil.copytree(run_dir, elsewhere, ignore=shutil.ignore_patterns("eval"))
    checkpoint = torch.load(elsewhere / "best.pt", weights_only=True)
    assert checkpoint["start_fingerprint"] == start_fingerprint(build_model(ARCH, "demo-pretrained", 3))
    checkpoint["start_fingerprint"] = "0123456789abcdef"  # as if it had started from other demo-pretrained weights
    torch.save(checkpoint, elsewhere / "best.pt")
    eval_tool.main([str(elsewhere), "--num-gradcam", "0", "--workers", "0"])
    assert "are not the ones" in capsys.readouterr().out and not (elsewhere / "eval" / "transfer").exists()
    report = (elsewhere / "eval" / "report.md").read_text()
    assert "fingerprint" in report and "0123456789abcdef" in report


def test_rank_models_puts_the_pretrained_start_above_a_random_one(fine_tuned, demo_pretrained, tmp_path, capsys):
    _, data = fine_tuned
    damaged = tmp_path / "damaged.pth"  # the demo-pretrained weights, every value NaN: "SVD did not converge"
    torch.save(
        {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in read_state_dict(demo_pretrained).items()},
        damaged,
    )
    candidates = f"{ARCH}:none,{ARCH}:demo-pretrained,resnet34:IMAGENET1K_V1,{ARCH}:{damaged}"
    inspect_data.main(
        [
            "--data",
            str(data),
            "--out",
            str(tmp_path / "r"),
            "--resolution",
            "48",
            "--workers",
            "0",
            "--rank-models",
            candidates,
        ]
    )
    rows = {
        r["model"]: {k: float(v) for k, v in r.items() if k != "model"}
        for r in read_csv(tmp_path / "r" / "transferability.csv")
    }
    # best LogME first; resnet34's weights are never on the test machine
    assert list(rows) == [f"{ARCH}:demo-pretrained", f"{ARCH}:none"]
    pretrained, random = rows[f"{ARCH}:demo-pretrained"], rows[f"{ARCH}:none"]
    assert (
        pretrained["logme"] > random["logme"]
        and pretrained["nce"] > random["nce"]
        and pretrained["leep"] > random["leep"]
    )
    printed = capsys.readouterr().out
    assert "skipped resnet34:IMAGENET1K_V1: could not get the ResNet34_Weights.IMAGENET1K_V1 weights" in printed
    assert f"skipped {ARCH}:{damaged}: its outputs hold NaN or infinite values" in printed
    report = (tmp_path / "r" / "report.md").read_text()
    assert (
        "## Which pretrained model transfers best" in report
        and "NCE 0.750, LEEP 0.703, LogME 0.654, H-score 0.638" in report
    )
    with pytest.raises(UserError, match="unknown architecture 'resnet5'"):
        inspect_data.main(["--data", str(data), "--out", str(tmp_path / "x"), "--rank-models", "resnet5"])
    with pytest.raises(UserError, match="--rank-models takes ARCH"):
        inspect_data.main(["--data", str(data), "--rank-models", "resnet50:"])


def test_a_start_that_is_not_on_this_machine_skips_the_section_unless_it_was_asked_for():
    from types import SimpleNamespace

    trained = SimpleNamespace(
        backend="pytorch",
        arch="resnet34",
        class_names=["a", "b"],
        start_weights="IMAGENET1K_V1",
        path="best.pt",
        resolution=224,
        untrained=False,
    )
    args = eval_tool.parse_eval(["best.pt"])
    assert eval_tool.find_start(args, trained).startswith(
        "skipped: the weights the run started from are not on this machine: could not get the "
        "ResNet34_Weights.IMAGENET1K_V1 weights"
    )
    with pytest.raises(UserError, match="put resnet34-b627a593.pth into"):
        eval_tool.find_start(eval_tool.parse_eval(["best.pt", "--start-weights", "IMAGENET1K_V1"]), trained)
    trained.start_weights = None
    assert "does not say which weights its fine-tune started from; pass --start-weights" in eval_tool.find_start(
        args, trained
    )


def test_a_stage_without_a_cka_is_neither_the_closest_nor_the_furthest():
    nan = float("nan")
    rows = [dict(layer="stem", cka=nan), dict(layer="a", cka=0.9), dict(layer="b", cka=nan), dict(layer="c", cka=0.2)]
    for order in (rows, rows[::-1], rows[1:] + rows[:1]):
        closest, furthest = transfer.closest_and_furthest(order)
        assert (closest["layer"], furthest["layer"]) == ("a", "c")
    assert transfer.closest_and_furthest([dict(layer="stem", cka=nan)]) == (None, None)


def test_the_probes_are_fitted_on_the_images_the_run_trained_on(demo_pretrained, tmp_path):
    """A run on 2 images a class, its epoch chosen on a validation split: the probe behind "what fine-tuning bought"
    reads those 6 images, not the dataset's whole training split (validation images included), and says so."""
    data = write_kinds(tmp_path / "data", SOURCE_KINDS[:3], per_class=(8, 4), seed=5, paints=list(demo.PAINTS.values()))
    run_dir = tmp_path / "run"
    recipe = f"--arch {ARCH} --weights demo-pretrained --resolution 48 --batch-size 6 --epochs 1 --workers 0"
    train.main(
        ["--data", str(data), "--run-dir", str(run_dir), *recipe.split()]
        + ["--train-per-class", "2", "--val-split", "0.25"]
    )
    eval_tool.main([str(run_dir), "--num-gradcam", "1", "--workers", "0", "--batch-size", "6"])
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["transfer"]["forward_passes"]["train"] == 6
    words = (
        "the 6 images the run trained on (2 training images per class, drawn after its validation split was held out; "
        "subset.csv)"
    )
    assert summary["transfer"]["probe_fitted_on"] == words
    assert f"fitted on {words}, reaches" in (run_dir / "eval" / "report.md").read_text().replace("\n", " ")
