"""The machine a run uses, and every random number generator: seeded, saved and restored here."""

import os
import random
import shutil

import numpy as np
import torch

from cars.errors import UserError


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not available[name]:
        raise UserError(f"--device {name} is not available on this machine; use --device auto")
    return name


def check_compiler(device_type: str) -> None:
    """torch.compile on a CPU builds C++ kernels: refuse at once, not at the first step, when no compiler is there."""
    if device_type == "cpu" and not any(
        shutil.which(name) for name in (os.environ.get("CXX", "g++"), "c++", "clang++")
    ):
        raise UserError(
            "--compile on a CPU needs a C++ compiler (inductor builds its kernels with one) and none was found; "
            "install g++ (e.g. apt-get install g++) or set CXX, or drop --compile"
        )


def worker_count(workers: int) -> int:
    """--workers: -1 means one per CPU core, at most 8."""
    return min(8, os.cpu_count() or 1) if workers < 0 else workers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_process(seed: int, rank: int) -> None:
    """Under torchrun, each process its own random stream (dropout, stochastic depth), on the CPU and the GPU: with
    one seed for all, every process would drop the same units of its images. The first process keeps the stream one
    process has, so a run in one process is as before. Called after the model is built (every process builds the
    same)."""
    if rank > 0:
        torch.manual_seed(hash((seed, rank, 3)) % 2**63)


def rng_state() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    """This process's random streams; on a GPU, the stream of its own device only (a torchrun job has one per
    process)."""
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(states, rank: int = 0) -> None:
    """rng_state's twin, for process `rank` of a job that saved `states` (one per process; a dict: one process, as
    written before there was a state per process). A process the checkpoint has no state for keeps the stream
    seed_process gave it; a GPU stream is restored on any machine, whatever its number of GPUs."""
    states = [states] if isinstance(states, dict) else states
    if rank >= len(states):
        return
    state = states[rank]
    random.setstate(state["python"])
    numpy_state = dict(
        state["numpy"],
        state=dict(state["numpy"]["state"], key=state["numpy"]["state"]["key"].numpy().astype(np.uint32)),
    )
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # written by get_rng_state_all: every GPU of the machine that saved it
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        cuda = cuda[device] if device < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def image_seed(seed: int, epoch: int, i: int, *stream: int) -> int:
    """The seed of image i's random draws in `epoch` (and an optional stream of them): a function of
    these numbers alone, so resume and torchrun draw the same. (A hash of numbers only: a string's
    hash differs from process to process.)"""
    return hash((seed, epoch, i, *stream))
