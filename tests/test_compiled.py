"""The GPU's code paths, run on a CPU: torch.compile (inductor), mixed precision (bfloat16 autocast),
channels-last. CI has no GPU; these are what a first GPU run would otherwise test."""

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_args
from test_resilience import assert_same_run

import export
import predict
import train
from cars.checkpoint import load_checkpoint
from cars.cli import parse_train
from cars.config import Config, load_saved, resolve
from cars.data import load_splits
from cars.engine import Device, train_step
from cars.errors import UserError
from cars.methods import plain_objective

# timm's own test ResNet (0.5 M parameters): dynamo traces it in half the time of a ResNet-18, with the same graphs
SMALL_CNN = "timm:test_resnet.r160_in1k"


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def switches(*flags) -> tuple[str, str, str]:
    cfg, _ = resolve(parse_train(list(flags)))
    return cfg.amp, cfg.compile, cfg.channels_last


def test_speed_switches_are_auto_by_default_and_a_bare_flag_means_on(tmp_path):
    assert switches() == ("auto", "auto", "auto")
    assert switches("--amp", "--compile", "--channels-last") == ("on", "on", "on")
    assert switches("--no-amp", "--compile", "off", "--channels-last", "auto") == ("off", "off", "auto")
    # a config written before the switches took three values: true meant "with CUDA", which is auto
    (tmp_path / "config.toml").write_text('amp = true\ncompile = false\nchannels_last = "on"\n')
    saved = load_saved(tmp_path / "config.toml")
    assert (saved.amp, saved.compile, saved.channels_last) == ("auto", "off", "on")
    auto = Config()
    assert [auto.speedup_on(name, "cuda") for name in ("amp", "compile", "channels_last")] == [True, True, True]
    assert [
        auto.speedup_on(name, device) for name in ("amp", "compile", "channels_last") for device in ("cpu", "mps")
    ] == [False] * 6
    assert Config(amp="on").speedup_on("amp", "cpu") and not Config(amp="off").speedup_on("amp", "cuda")


def test_mixed_precision_on_a_cpu_is_bfloat16_without_loss_scaling_and_channels_last_reaches_the_model():
    seen = {}
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model[0].register_forward_hook(
        lambda module, inputs, output: seen.update(
            input_channels_last=inputs[0].is_contiguous(memory_format=torch.channels_last), output=output.dtype
        )
    )
    device = Device("cpu", channels_last=True, amp=True, show_progress=False)
    model(torch.zeros(2, 3, 8, 8))  # materialise the lazy layer
    model = device.place(model)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    scaler = device.scaler()
    assert not scaler.is_enabled()  # bfloat16 has float32's range: nothing to scale
    assert Device("cuda", amp=True).amp_dtype == torch.float16 and Device("mps", amp=True).amp_dtype == torch.float16
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    before = model[2].weight.detach().clone()
    loss, logits, _, _ = train_step(
        model,
        (images, torch.tensor([0, 1])),
        torch.optim.SGD(model.parameters(), lr=0.1),
        scaler,
        device,
        objective=plain_objective(),
    )
    assert seen == {"input_channels_last": True, "output": torch.bfloat16}
    # cross-entropy runs in float32 under autocast
    assert loss.dtype == torch.float32 and logits.dtype == torch.bfloat16
    # the weights stay float32 and train
    assert model[2].weight.dtype == torch.float32 and not torch.equal(model[2].weight, before)
    assert "mixed precision on (bfloat16 autocast), torch.compile off, channels-last on" in device.describe(
        compiled=False
    )


def test_compile_on_a_cpu_without_a_compiler_is_one_clear_line(tmp_path, hub_folder, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler"):
        train.main(tiny_args(hub_folder, tmp_path / "run", "--compile"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, graphs",
    [(["--freeze-epochs", "1"], [2, 4, 4]), (["--ema", "--ema-decay", "0.5"], [1] * 3)],
    ids=["frozen-then-unfrozen", "ema"],
)
def test_compiled_training_compiles_each_graph_once(tmp_path, hub_folder, monkeypatch, extra, graphs):
    """One graph for training and one for eval, per state of the backbone (a frozen one has no gradients);
    the EMA's weights are evaluated uncompiled. Never another: not for the padded last eval batch (9 test
    images in batches of 6), not in later epochs. Dynamo's guards decide recompiles whatever the backend:
    aot_eager checks them without inductor's build time."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    speed = ["--epochs", "3", "--compile", "--amp", "--channels-last"]
    after_epoch = bench_module("cuda_checks").compiles_per_epoch(  # what bench/cuda_checks.py counts on CUDA
        tiny_args(hub_folder, tmp_path / "run", *speed, *extra, arch=SMALL_CNN)
    )
    assert after_epoch == graphs, "frames compiled, counted after each epoch"
    assert counters["stats"]["unique_graphs"] == graphs[-1]


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler for inductor: install g++ (.ci/run does)"
)
def test_a_compiled_mixed_precision_channels_last_run_resumes_exactly_and_loads_everywhere(
    tmp_path, hub_folder, capsys, monkeypatch
):
    """torch.compile, bfloat16 autocast, channels-last: an uninterrupted run, and one stopped after its first
    epoch and resumed, end bit-identical. Compiled by dynamo and AOT autograd, as train.py compiles, but with their
    eager backend: inductor's C++ kernels took 90-110 s of g++ on an empty cache on 2 cores, by far the suite's
    slowest test (bench/compiled_resume.py runs this check with inductor itself)."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    speed = ["--compile", "--amp", "--channels-last", "--epochs", "2"]
    train.main(tiny_args(hub_folder, tmp_path / "whole", *speed, arch=SMALL_CNN))
    assert (tmp_path / "whole" / "train.log").read_text().splitlines()[
        0
    ] == "cpu: mixed precision on (bfloat16 autocast), torch.compile on, channels-last on"
    train.main(tiny_args(hub_folder, tmp_path / "stopped", *speed[:-1], "1", arch=SMALL_CNN))
    train.main(["--resume", str(tmp_path / "stopped"), "--epochs", "2"])
    assert_same_run(tmp_path / "whole", tmp_path / "stopped")

    # the checkpoint is the plain model's: predict.py and export.py load it as any other (and eval.py, which loads
    # checkpoints with predict's code: tests/test_eval.py)
    weights = load_checkpoint(tmp_path / "whole" / "best.pt")["model"]
    assert not [key for key in weights if key.startswith(("_orig_mod.", "module."))]
    export.main([str(tmp_path / "whole"), "--out", str(tmp_path / "export"), "--format", "safetensors"])
    image = tmp_path / "car.png"
    load_splits(str(hub_folder)).eval.open(0).save(image)
    predictions = []
    for model in (tmp_path / "whole", tmp_path / "export"):
        capsys.readouterr()
        predict.main([str(model), str(image), "--json"])
        predictions.append(json.loads(capsys.readouterr().out))
    assert predictions[0] == predictions[1] and len(predictions[0][0]["predictions"]) == 3
