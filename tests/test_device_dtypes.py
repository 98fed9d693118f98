"""Apple's MPS has no float64: a float64 tensor made on the training device crashes a Mac at once. A CPU has
float64, so it would never notice; these tests record every tensor the device work makes and refuse float64."""

import threading

import pytest
import torch
from conftest import SOURCE_KINDS, tiny_args, write_kinds
from torch.utils._python_dispatch import TorchDispatchMode

import eval as eval_tool
import train
from cars.demo import PAINTS
from cars.runs import read_summary


class DtypeRecorder(TorchDispatchMode):
    """The dtype of every tensor an operation returns, with the operation's name. A dispatch mode is per
    thread: the cache's reading thread (the host side, which never touches the device) is not recorded."""

    def __init__(self):
        super().__init__()
        self.float64 = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in outputs):
            self.float64.append(str(func))
        return out


def test_the_recorder_sees_a_float64_tensor():
    with DtypeRecorder() as recorder:
        torch.ones(2).sum(dtype=torch.float64)
    assert any("sum" in op for op in recorder.float64)


@pytest.mark.parametrize("augment", ["heavy", "trivialaugment"])
def test_training_and_evaluation_make_no_float64_tensor(tmp_path, hub_folder, augment):
    assert threading.current_thread() is threading.main_thread()
    run_dir = tmp_path / "run"
    with DtypeRecorder() as recorder:  # the steps, the running totals, the batched augmentation, the evaluation
        train.main(tiny_args(hub_folder, run_dir, "--augment", augment, "--epochs", "1", "--random-erasing", "0.5"))
    assert recorder.float64 == []


def test_a_prototypes_head_is_made_without_a_float64_tensor(tmp_path, hub_folder):
    """The class means and their temperature (float64 sums on the host, in NumPy), with no image trained on."""
    from cars.models import build_model

    start = tmp_path / "start.pth"
    torch.save(build_model("resnet18", "none", 3).state_dict(), start)
    run_dir = tmp_path / "run"
    with DtypeRecorder() as recorder:
        train.main(tiny_args(hub_folder, run_dir, "--weights", str(start), "--head", "prototypes", "--epochs", "0"))
    assert recorder.float64 == []
    assert read_summary(run_dir)["trainable_parameters"] == 0


def test_eval_and_its_cams_make_no_float64_tensor(tmp_path, hub_folder):
    run_dir = tmp_path / "run"
    train.main(tiny_args(hub_folder, run_dir, "--epochs", "1"))
    with DtypeRecorder() as recorder:
        eval_tool.main([str(run_dir), "--num-gradcam", "2", "--cache", "off"])
    assert recorder.float64 == []


def test_every_tool_from_a_pretrained_start_makes_no_float64_tensor(demo_pretrained, tmp_path):
    """The default path of each tool from demo-pretrained weights: training, eval with the transfer lens (weight
    change, BatchNorm drift, CKA, probes), predict, inspect_data.py --rank-models and one sweep trial."""
    import inspect_data
    import predict
    import sweep

    data = write_kinds(tmp_path / "data", SOURCE_KINDS[:3], per_class=(6, 4), seed=5, paints=list(PAINTS.values()))
    recipe = ["--arch", "shufflenet_v2_x0_5", "--weights", "demo-pretrained", "--resolution", "48", "--workers", "0"]
    recipe += ["--batch-size", "6", "--epochs", "1"]
    run_dir = tmp_path / "run"
    with DtypeRecorder() as recorder:
        train.main(["--data", str(data), "--run-dir", str(run_dir), *recipe])
    assert recorder.float64 == [], "train.py"
    with DtypeRecorder() as recorder:
        eval_tool.main([str(run_dir), "--num-gradcam", "1", "--workers", "0"])
    assert recorder.float64 == [], "eval.py"
    assert (run_dir / "eval" / "transfer" / "cka.csv").is_file(), "the lens ran"
    photo = next((data / "data").glob("*.parquet"))  # any file: predict reads images, so give it one
    from PIL import Image

    Image.new("RGB", (60, 40), (200, 30, 30)).save(photo.with_name("photo.png"))
    with DtypeRecorder() as recorder:
        predict.main([str(run_dir), str(photo.with_name("photo.png")), "--json"])
    assert recorder.float64 == [], "predict.py"
    with DtypeRecorder() as recorder:
        inspect_data.main(
            ["--data", str(data), "--out", str(tmp_path / "inspect"), "--resolution", "48", "--workers", "0"]
            + ["--rank-models", "shufflenet_v2_x0_5:demo-pretrained"]
        )
    assert recorder.float64 == [], "inspect_data.py --rank-models"
    base = tmp_path / "base.toml"
    base.write_text(
        f'data = "{data}"\narch = "shufflenet_v2_x0_5"\nweights = "demo-pretrained"\nresolution = 48\n'
        "batch_size = 6\nepochs = 1\nworkers = 0\n"
    )
    sweep_path = tmp_path / "one.toml"
    sweep_path.write_text(
        'base = "base.toml"\ntrials = 1\npruner = "none"\n[fixed]\nval_split = 0.3\n[space]\n'
        "lr = { low = 1e-4, high = 1e-2, log = true }\n"
    )
    with DtypeRecorder() as recorder:
        sweep.main(["--config", str(sweep_path), "--out", str(tmp_path / "sweep")])
    assert recorder.float64 == [], "sweep.py"
    assert read_summary(tmp_path / "sweep" / "trial-0")["status"] == "finished"
