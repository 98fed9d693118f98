"""Checkpoints: written atomically with clean keys, read safely whatever wrote them."""

import hashlib
import pickle
from pathlib import Path

import torch

from cars.errors import UserError
from cars.files import atomic_write

PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel


def clean_state_dict(state: dict) -> dict:
    """Strip compile and DDP prefixes, in either order or both."""
    cleaned = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        cleaned[key] = value
    return cleaned


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under torch.compile and DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    atomic_write(path, lambda file: torch.save(checkpoint, file))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint is untrusted input: weights_only=True never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        code = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), None)
        if code:  # a pickle that names a function or class to call: it was not run
            raise UserError(
                f"refusing to load {path}: it holds code or objects, not only tensors ({code}); only load checkpoints "
                "you trust, and convert them to a plain state dict first"
            ) from None
        raise UserError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint, or it is damaged") from None
    except Exception as error:  # untrusted bytes can make torch.load fail in many ways; all mean the same
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot read checkpoint {path}: {detail}; the file is damaged or not a PyTorch checkpoint"
        ) from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path} holds a {type(loaded).__name__}, not a state dict or checkpoint dict")
    return loaded


def read_state_dict(path: Path) -> dict:
    return state_dict_of(load_checkpoint(path), path)


def state_dict_of(loaded: dict, path: Path) -> dict:
    """The model weights of any common checkpoint form, with clean keys: a bare state dict,
    ours ('model'), the PyTorch ImageNet example's or timm's ('state_dict'), torchvision references' ('model')."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    state = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UserError(f"{path} holds no tensors; it is not a model checkpoint")
    return clean_state_dict(state)


def state_fingerprint(state: dict, *, leave_out: str | None = None) -> str:
    """A digest of a state dict's tensors (every key but those starting with `leave_out`): two state dicts with the same
    fingerprint hold the same weights, whatever file or name they came from."""
    digest = hashlib.sha256()
    for key, tensor in sorted(state.items()):
        if leave_out and key.startswith(leave_out):
            continue
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
