"""Apple's MPS has no float64: a float64 tensor made on the training device crashes a Mac at once. A CPU has
float64, so it would never notice; these tests record every tensor the device work makes and refuse float64."""

import threading

import pytest
import torch
from conftest import tiny_args
from torch.utils._python_dispatch import TorchDispatchMode

import eval as eval_tool
import train


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


def test_eval_and_its_cams_make_no_float64_tensor(tmp_path, hub_folder):
    run_dir = tmp_path / "run"
    train.main(tiny_args(hub_folder, run_dir, "--epochs", "1"))
    with DtypeRecorder() as recorder:
        eval_tool.main([str(run_dir), "--num-gradcam", "2", "--cache", "off"])
    assert recorder.float64 == []
