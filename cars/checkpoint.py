"""Checkpoints: written atomically with clean keys, read safely whatever wrote them."""

import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cars.errors import UserError

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


def atomic_write(path: Path, write) -> None:
    """write(file) into a temporary file beside `path`, fsync, then rename over `path`:
    a crash at any instant leaves either the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        first = str(error).strip().splitlines()[0]
        raise UserError(f"refusing to load {path}: it holds more than tensors and plain data ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise UserError(f"cannot read checkpoint {path}: {error}; the file is damaged or not a PyTorch checkpoint") from None
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


@dataclass
class Trained:
    """A trained model ready for inference, with what it needs to be fed and explained."""

    model: torch.nn.Module
    arch: str
    resolution: int
    class_names: list[str]
    data: str | None  # the dataset it was trained on, when known
    path: Path  # the checkpoint file


def load_trained(path, arch=None, num_classes=None, resolution=None, data=None) -> Trained:
    """A run folder, one of our checkpoints, or any other state dict (then --arch, --num-classes,
    --resolution and --data supply what our checkpoints carry). Flags win over the checkpoint."""
    from cars.data import open_source
    from cars.models import build_model, head_name, load_checked

    path = Path(path)
    if path.is_dir():
        path = next((p for p in (path / "best.pt", path / "last.pt") if p.exists()), None)
        if path is None:
            raise UserError(f"{path} has no best.pt or last.pt; give a run folder or a checkpoint file")
    loaded = load_checkpoint(path)
    state = state_dict_of(loaded, path)
    config = loaded.get("config") if isinstance(loaded.get("config"), dict) else {}
    arch = arch or config.get("arch")
    if not arch:
        raise UserError(f"{path} does not say which architecture it holds; pass --arch (e.g. --arch resnet50)")
    resolution = resolution or config.get("resolution") or 224
    data = data or config.get("data")
    class_names = loaded.get("class_names") if isinstance(loaded.get("class_names"), list) else None
    if class_names is None and data:
        class_names = open_source(data)[2]
    if num_classes is None:
        num_classes = len(class_names) if class_names else None
    model = build_model(arch, "none", num_classes or 1000)
    if num_classes is None:  # a bare state dict without --num-classes: its head says how many
        num_classes = state.get(head_name(model) + ".weight", torch.empty(1000)).shape[0]
        model = build_model(arch, "none", num_classes)
    class_names = class_names or [f"class {i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise UserError(f"{path}: the model has {num_classes} classes but the class names number {len(class_names)}; "
                        "check --num-classes and --data")
    load_checked(model, state, f"checkpoint {path}", arch)
    return Trained(model.eval(), arch, resolution, class_names, data, path)
