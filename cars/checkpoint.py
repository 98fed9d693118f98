"""Checkpoints: written atomically with clean keys, read safely whatever wrote them."""

import json
import pickle
from dataclasses import dataclass
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
            raise UserError(f"refusing to load {path}: it holds code or objects, not only tensors ({code}); only load checkpoints "
                            "you trust, and convert them to a plain state dict first") from None
        raise UserError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint, or it is damaged") from None
    except Exception as error:  # untrusted bytes can make torch.load fail in many ways; all mean the same
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read checkpoint {path}: {detail}; the file is damaged or not a PyTorch checkpoint") from None
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


def read_model_file(path: Path) -> tuple[dict, dict]:
    """(state dict with clean keys, what the file says about the model: arch, resolution, data, class_names).
    Our checkpoints carry these; an exported model.safetensors has them in the model.json beside it."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise UserError(f"cannot read {path}: {error}; the file is damaged or not a safetensors file") from None
        return clean_state_dict(state), read_model_json(path.parent / "model.json")
    loaded = load_checkpoint(path)
    config = loaded.get("config") if isinstance(loaded.get("config"), dict) else {}
    names = loaded.get("class_names") if isinstance(loaded.get("class_names"), list) else None
    return state_dict_of(loaded, path), {**{k: config.get(k) for k in ("arch", "resolution", "data")}, "class_names": names}


def read_model_json(path: Path) -> dict:
    """What export.py wrote beside model.safetensors ({} when there is none); damaged is one clear line."""
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}; export the model again") from None
    names = info.get("class_names") if isinstance(info, dict) else None
    if not isinstance(info, dict) or not (names is None or isinstance(names, list) and all(isinstance(n, str) for n in names)) \
            or not isinstance(info.get("arch", ""), str) or not isinstance(info.get("resolution", 0), int):
        raise UserError(f"{path} is not an export's model.json (expected arch, resolution and class_names); export the model again")
    return info


def add_model_flags(parser, data_help: str = "dataset to take class names from, for a bare state dict") -> None:
    """The positional model argument and what a bare state dict needs beside it (see load_trained)."""
    parser.add_argument("checkpoint", help="a run folder, one of its .pt files, an export folder or model.safetensors, or any state-dict file")
    parser.add_argument("--arch", help="architecture, for a checkpoint that does not carry it (e.g. resnet50)")
    parser.add_argument("--num-classes", type=int, help="class count, for a bare state dict (default: its head's)")
    parser.add_argument("--resolution", type=int, help="input size (default: the run's, else 224)")
    parser.add_argument("--data", help=data_help)


def load_trained_from(args) -> "Trained":
    return load_trained(args.checkpoint, args.arch, args.num_classes, args.resolution, args.data)


def load_trained(path, arch=None, num_classes=None, resolution=None, data=None) -> Trained:
    """A run folder, one of our checkpoints, an exported model (folder or model.safetensors), or any
    other state dict (then --arch, --num-classes, --resolution and --data supply what our files
    carry). Flags win over what the file says."""
    from cars.data import label_map, open_source
    from cars.models import build_model, check_resolution, head_name, load_checked

    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "best.pt", path / "last.pt"]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise UserError(f"{path} has no best.pt, last.pt or model.safetensors; give a run folder or a model file")
        path = found
    state, info = read_model_file(path)
    arch = arch or info.get("arch")
    if not arch:
        raise UserError(f"{path} does not say which architecture it holds; pass --arch (e.g. --arch resnet50)")
    if resolution is not None and resolution < 32:
        raise UserError(f"--resolution must be at least 32, got {resolution}")
    resolution = resolution or info.get("resolution") or 224
    class_names = info.get("class_names")
    if data and class_names and data != info.get("data"):  # another dataset than the run's: it must have the model's classes
        label_map(class_names, open_source(data)[2], data)
    data = data or info.get("data")
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
    check_resolution(model, arch, resolution)
    return Trained(model.eval(), arch, resolution, class_names, data, path)


def export_safetensors(trained: Trained, out: Path) -> None:
    """model.safetensors (weights only: loading it can never run code) and model.json (what it needs)."""
    from safetensors.torch import save

    from cars.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write {out}: {error.strerror or error}; choose another --out") from None
    state = {k: v.contiguous() for k, v in unwrap(trained.model).state_dict().items()}
    atomic_write(out / "model.safetensors", lambda file: file.write(save(state)))
    info = {"arch": trained.arch, "resolution": trained.resolution, "eval_resize": eval_resize(trained.resolution),
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "num_classes": len(trained.class_names),
            "class_names": trained.class_names, "data": trained.data}
    atomic_write(out / "model.json", lambda file: file.write((json.dumps(info, indent=2) + "\n").encode()))
