"""A trained model for inference: found in a run folder, a checkpoint, an export or a bare state dict; exported
again."""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cars.checkpoint import clean_state_dict, load_checkpoint, state_dict_of, state_fingerprint
from cars.config import Config, from_saved
from cars.data import label_map, open_source
from cars.errors import UserError
from cars.methods import describe_with_subset
from cars.models import build_model, check_resolution, head_name, load_checked
from cars.transforms import FILTERS, normalize


@dataclass
class Trained:
    """A trained model ready for inference, with what it needs to be fed and explained."""

    model: torch.nn.Module
    arch: str
    resolution: int
    class_names: list[str]
    data: str | None  # the dataset it was trained on, when known
    path: Path  # the checkpoint file
    backend: str = (
        "pytorch"  # or onnxruntime: an exported model.onnx, called like the PyTorch model (no gradients, so no CAMs)
    )
    # the resize filter it was trained with (--interpolation), its eval_transform's; a model from before the knob had
    # the knob's default
    interpolation: str = Config.interpolation
    start_weights: str | None = None  # the --weights its fine-tune started from, when known
    start_fingerprint: str | None = None  # finetune.start_fingerprint of those weights, when the run recorded it
    method: str | None = None  # the fine-tuning method, in words (finetune.describe), when the checkpoint says
    recipe: dict | None = None  # the run's whole config as its checkpoint saved it, when it did
    temperature: float = 1.0  # the logits are divided by it before the softmax (eval.py's calibration)

    @functools.cached_property
    def config(self) -> Config | None:
        """The run's config, when its checkpoint saved a whole one of this version (else None)."""
        return from_saved(self.recipe)

    @property
    def untrained(self) -> bool:
        """Whether no image was trained on (--epochs 0): the start, with a head that needed no training."""
        return bool(self.config and self.config.epochs == 0)

    @functools.cached_property
    def weights_fingerprint(self) -> str | None:
        """checkpoint.state_fingerprint of the model's weights (None for ONNX Runtime, which gives none): what eval.py's
        files for these weights record."""
        return state_fingerprint(self.model.state_dict()) if self.backend == "pytorch" else None

    def classify(self, pixels: torch.Tensor, topk: int) -> list[dict]:
        """The top-k classes for one image's uint8 pixels (as eval_transform gives them), most probable first, with
        their probabilities at the model's temperature."""
        device = next(
            self.model.parameters(), torch.empty(0)
        ).device  # ONNX Runtime's stand-in has no parameters: the CPU
        with torch.no_grad():
            logits = self.model(normalize(pixels)[None].to(device)).float()
            probabilities = (logits / self.temperature).softmax(1)[0].cpu()
        top = probabilities.topk(min(topk, len(probabilities)))
        return [
            {"class": self.class_names[c], "index": int(c), "probability": round(float(p), 6)}
            for p, c in zip(top.values, top.indices, strict=True)
        ]


class OnnxRuntimeModel(torch.nn.Module):
    """An exported model.onnx run by ONNX Runtime on the CPU, called as the PyTorch model is: a
    normalised float batch in, logits out (on the batch's device)."""

    def __init__(self, path: Path):
        super().__init__()
        import onnxruntime

        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for a damaged or foreign file
            raise UserError(
                f"cannot load {path} with ONNX Runtime: {str(error).strip().splitlines()[0][:200]}; export it again"
            ) from None
        self.input = self.session.get_inputs()[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(None, {self.input.name: images.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(logits).to(images.device)


def read_model_file(path: Path) -> tuple[dict, dict]:
    """(state dict with clean keys, what the file says about the model: arch, resolution, data, weights (those its
    fine-tune started from), class_names).
    Our checkpoints carry these; an exported model.safetensors has them in the model.json beside it."""
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise UserError(f"cannot read {path}: {error}; the file is damaged or not a safetensors file") from None
        return clean_state_dict(state), read_model_json(path.parent / "model.json")
    loaded = load_checkpoint(path)
    config = loaded.get("config") if isinstance(loaded.get("config"), dict) else {}
    names = loaded.get("class_names") if isinstance(loaded.get("class_names"), list) else None
    return state_dict_of(loaded, path), {
        **{k: config.get(k) for k in ("arch", "resolution", "interpolation", "data", "weights")},
        "class_names": names,
        "start_fingerprint": loaded.get("start_fingerprint"),
        "method": describe_with_subset(cfg) if (cfg := from_saved(config)) else None,
        "config": config or None,
    }


def read_model_json(path: Path) -> dict:
    """What export.py wrote beside model.safetensors ({} when there is none); damaged is one clear line."""
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}; export the model again") from None
    names = info.get("class_names") if isinstance(info, dict) else None
    if (
        not isinstance(info, dict)
        or not (names is None or isinstance(names, list) and all(isinstance(n, str) for n in names))
        or not isinstance(info.get("arch", ""), str)
        or not isinstance(info.get("resolution", 0), int)
        or info.get("interpolation", Config.interpolation) not in FILTERS
    ):
        raise UserError(
            f"{path} is not an export's model.json (expected arch, resolution and class_names); export the model again"
        )
    return info


def load_trained_from(args) -> "Trained":
    if getattr(args, "backend", "pytorch") == "onnxruntime":
        return load_onnx(args.checkpoint, args.resolution, args.data)
    return load_trained(
        args.checkpoint, arch=args.arch, num_classes=args.num_classes, resolution=args.resolution, data=args.data
    )


def load_onnx(path, resolution=None, data=None) -> Trained:
    """An export folder's model.onnx (with the model.json beside it), or any .onnx file of an image classifier
    (then --resolution and --data supply what model.json would)."""
    path = Path(path)
    if path.is_dir():
        found = next((p for p in (path / "model.onnx", path / "export" / "model.onnx") if p.is_file()), None)
        if found is None:
            raise UserError(f"{path} has no model.onnx; export one with: uv run export.py RUN --format onnx")
        path = found
    if path.suffix != ".onnx" or not path.is_file():
        raise UserError(
            f"--backend onnxruntime runs a .onnx file or an export folder holding model.onnx; {path} is neither"
        )
    info = read_model_json(path.parent / "model.json")
    model = OnnxRuntimeModel(path)
    resolution = resolution or info.get("resolution") or model.input.shape[-1]
    if not isinstance(resolution, int):
        raise UserError(f"{path} does not say its input size; pass --resolution")
    data = data or info.get("data")
    class_names = info.get("class_names") or (open_source(data)[2] if data else None)
    num_classes = model.session.get_outputs()[0].shape[-1]
    class_names = class_names or [f"class {i}" for i in range(num_classes)]
    if isinstance(num_classes, int) and len(class_names) != num_classes:
        raise UserError(
            f"{path}: the model has {num_classes} classes but the class names number {len(class_names)}; check --data"
        )
    return Trained(
        model,
        info.get("arch") or "onnx",
        resolution,
        class_names,
        data,
        path,
        backend="onnxruntime",
        interpolation=info.get("interpolation", Config.interpolation),
    )


def load_trained(path, *, arch=None, num_classes=None, resolution=None, data=None) -> Trained:
    """A run folder, one of our checkpoints, an exported model (folder or model.safetensors), or any
    other state dict (then --arch, --num-classes, --resolution and --data supply what our files
    carry). Flags win over what the file says."""
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
    if (
        data and class_names and data != info.get("data")
    ):  # another dataset than the run's: it must have the model's classes
        label_map(class_names, open_source(data)[2], data)
    data = data or info.get("data")
    if class_names is None and data:
        class_names = open_source(data)[2]
    if num_classes is None:
        num_classes = len(class_names) if class_names else None
    model = build_model(arch, "none", num_classes or 1000, resolution=resolution)
    if num_classes is None:  # a bare state dict without --num-classes: its head says how many
        num_classes = state.get(head_name(model) + ".weight", torch.empty(1000)).shape[0]
        model = build_model(arch, "none", num_classes, resolution=resolution)
    class_names = class_names or [f"class {i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise UserError(
            f"{path}: the model has {num_classes} classes but the class names number {len(class_names)}; "
            "check --num-classes and --data"
        )
    load_checked(model, state, what=f"checkpoint {path}", arch=arch)
    check_resolution(model, arch, resolution)
    return Trained(
        model.eval(),
        arch,
        resolution,
        class_names,
        data,
        path,
        interpolation=info.get("interpolation") or Config.interpolation,
        start_weights=info.get("weights"),
        start_fingerprint=info.get("start_fingerprint"),
        method=info.get("method"),
        recipe=info.get("config"),
    )
