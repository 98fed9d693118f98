"""LoRA through peft: a run trains its adapters and head only, every other tensor of the backbone stays bit-identical
to the start, the change of every adapted layer is the low-rank B A of its adapter, a resume is exact, and every tool
takes the run like any other."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import tiny_args, write_hub_folder
from test_device_dtypes import DtypeRecorder

import compare
import eval as eval_tool
import export
import interpolate
import predict
import soup
import train
from cars import methods
from cars.checkpoint import load_checkpoint
from cars.config import Config
from cars.errors import UserError
from cars.models import build_model

ROOT = Path(__file__).resolve().parents[1]
ARCH = "shufflenet_v2_x0_5"
LORA = ["--arch", ARCH, "--weights", "demo-pretrained", "--resolution", "48", "--lora", "4", "--lr", "0.005"]
QUICK = ["--workers", "0", "--batch-size", "6"]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, demo_pretrained):
    """A LoRA run of 2 epochs, and the same run stopped after its first epoch and resumed."""
    root = tmp_path_factory.mktemp("lora")
    data = write_hub_folder(root / "data")
    train.main(tiny_args(data, root / "whole", *LORA, "--optimizer", "adamw", "--val-split", "0.34"))
    train.main(tiny_args(data, root / "stopped", *LORA, "--optimizer", "adamw", "--val-split", "0.34", "--epochs", "1"))
    train.main(["--resume", str(root / "stopped"), "--epochs", "2"])
    return root, data


def adapted_layers() -> tuple[Config, list[str]]:
    cfg = Config(arch=ARCH, weights="demo-pretrained", resolution=48, lora=4)
    return cfg, methods.lora_targets(cfg, build_model(ARCH, "none", 3))


def test_only_the_adapters_train_and_each_change_is_their_low_rank_product(lora_runs):
    root, _ = lora_runs
    run = root / "whole"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_parameters"] < 0.1 * summary["parameters"]
    cfg, targets = adapted_layers()
    assert targets and all(t.startswith(("stage4.", "conv5.")) for t in targets)  # the last two stages by default

    start = build_model(ARCH, "demo-pretrained", 3).state_dict()
    tuned = load_checkpoint(run / "best.pt")["model"]
    assert set(tuned) == set(start), "best.pt holds the plain network, the adapters merged in"
    changed = {f"{t}.weight" for t in targets}
    for key, value in start.items():  # BatchNorm statistics included: LoRA keeps them
        if key not in changed and not key.startswith("fc."):
            assert torch.equal(tuned[key], value), f"{key} moved"

    adapter = safetensors.torch.load_file(str(run / "adapter.safetensors"))
    assert {k for k in adapter if not k.startswith("fc.")} == {
        f"{t}.lora_{side}.default.weight" for t in targets for side in "AB"
    }
    scale = methods.lora_alpha(cfg) / cfg.lora
    for target in targets:
        a, b = adapter[f"{target}.lora_A.default.weight"], adapter[f"{target}.lora_B.default.weight"]
        low_rank = (b.flatten(1) @ a.flatten(1)).double() * scale  # out x (in k k), of rank <= 4 by construction
        change = (tuned[f"{target}.weight"].double() - start[f"{target}.weight"].double()).flatten(1)
        assert change.abs().max() > 0, f"{target} did not move"
        assert torch.allclose(change, low_rank, atol=1e-6), target
        singular = torch.linalg.svdvals(change)
        assert len(singular) > 4 and (singular[4:] < 1e-4 * singular[0]).all(), target
    assert (run / "adapter.safetensors").stat().st_size < (run / "best.pt").stat().st_size / 5
    log = (run / "train.log").read_text()
    assert "method: LoRA rank 4 (alpha 4)" in log and "adapter.safetensors:" in log


def summary_words(run: Path) -> str:
    """compare.py's "trained parameters" cell: the adapters and the head (adapter.safetensors) of all the parameters
    the adapted network has (peft's count: the network's own and the adapters)."""
    adapter = safetensors.torch.load_file(str(run / "adapter.safetensors"))
    trained = sum(t.numel() for t in adapter.values())
    lora = sum(t.numel() for k, t in adapter.items() if ".lora_" in k)
    total = sum(p.numel() for p in build_model(ARCH, "none", 3).parameters()) + lora
    return f"{trained / 1e6:.2f} M of {total / 1e6:.2f} M, {100 * trained / total:.1f} %"


def test_a_resumed_lora_run_is_the_uninterrupted_one(lora_runs):
    root, _ = lora_runs
    whole, resumed = (load_checkpoint(root / name / "last.pt") for name in ("whole", "stopped"))
    assert any(".lora_" in k for k in whole["raw_model"])
    for key in ("model", "raw_model"):
        assert all(torch.equal(whole[key][k], resumed[key][k]) for k in whole[key]), key


def test_every_tool_takes_a_lora_run(lora_runs, tmp_path, capsys):
    root, _ = lora_runs
    run = root / "whole"
    with DtypeRecorder() as recorder:  # the lens's rank of each change too: float64 on the host only
        eval_tool.main([str(run), "--num-gradcam", "1", *QUICK])
    assert recorder.float64 == []
    report = (run / "eval" / "report.md").read_text()
    assert "Method: LoRA rank 4 (alpha 4)" in report
    assert "did not move at all, as the method froze them: conv1, stage2.0" in report  # only the adapted blocks moved
    ranks = json.loads((run / "eval" / "summary.json").read_text())["transfer"]["change_ranks"]
    assert set(ranks) == set(adapted_layers()[1]) and 1 <= max(ranks.values()) <= 4
    assert f"LoRA adapted {len(ranks)} layers, each by a change of rank at most 4" in report
    capsys.readouterr()
    compare.main([str(run)])
    assert f"| {summary_words(run)} |" in capsys.readouterr().out
    capsys.readouterr()
    predict.main([str(run), str(ROOT / "examples" / "car.png"), "--json"])
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["class"]
    export.main([str(run), "--format", "safetensors,onnx"])  # each export checked against the model
    assert (run / "export" / "model.onnx").is_file()
    interpolate.main([str(run), "--alphas", "0,1", "--out", str(tmp_path / "line"), *QUICK])
    soup.main([str(run), str(root / "stopped"), "--out", str(tmp_path / "soup"), *QUICK])
    assert (tmp_path / "soup" / "best.pt").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora-alpha", "8"], "--lora-alpha 8.0 does nothing without --lora"),
        (["--lora", "-1"], "--lora must be a rank of 1 or more"),
        (["--lora", "200"], r"--lora 200 is no low rank for stage4\.0\.branch1\.2"),
        (
            ["--lora", "4", "--lora-targets", "nowhere"],
            r"'nowhere' holds no layer LoRA can adapt .* name a stage \(conv1",
        ),
        (["--lora", "4", "--weights", "none"], "--lora needs a pretrained start"),
        (["--lora", "4", "--train-params", "norm"], "--lora and --train-params both decide which backbone parameters"),
        (["--lora", "4", "--l2sp", "0.1"], "--lora and --l2sp do not go together"),
    ],
)
def test_lora_that_means_nothing_is_one_line(tmp_path, demo_pretrained, flags, message):
    data = write_hub_folder(tmp_path / "data")
    recipe = ["--arch", ARCH, "--resolution", "48"] + (
        ["--weights", "demo-pretrained"] if "--weights" not in flags else []
    )
    with pytest.raises(UserError, match=message):
        train.main(tiny_args(data, tmp_path / "run", *recipe, *flags))
    assert not (tmp_path / "run").exists()
