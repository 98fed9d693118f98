"""Build a torchvision classifier with a fresh head, split its parameters, clean state dicts."""

import difflib
import functools
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from torch import nn

from cars import demo_clip, starts
from cars.checkpoint import read_state_dict
from cars.demo import DEMO_CLIP_ARCH, DEMO_PRETRAINED, demo_pretrained_path
from cars.errors import UserError
from cars.paths import WEIGHTS_FILE_SUFFIXES


class DropoutLinear(nn.Linear):
    """nn.Linear with dropout on its input. Keeps the plain Linear's keys (`fc.weight`), so a
    checkpoint loads whatever dropout it was trained with."""

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0):
        super().__init__(in_features, out_features)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return super().forward(self.dropout(x))


def classification_archs() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def head_name(model: nn.Module) -> str:
    """The dotted name of the final classification layer: `fc` for ResNets, `classifier.1` for EfficientNets."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise UserError(f"{type(model).__name__} has no linear classification layer to replace")
    return names[-1]


def on_head_input(model: nn.Module, receive):
    """Hand what the head reads (the pooled features) to `receive` on every forward pass of `model`; returns the hook's
    handle (handle.remove() stops it). The one place anything listens to the head's input."""
    return model.get_submodule(head_name(model)).register_forward_pre_hook(lambda _, inputs: receive(inputs[0]))


@contextmanager
def kept_head_inputs(model: nn.Module):
    """A list that every forward pass of `model` adds the head's input to (detached, float32, on the CPU) while the
    block lasts: the features of a pass that computes something else too (eval.py's scores, predict.py's answer)."""
    kept = []
    handle = on_head_input(model, lambda features: kept.append(features.detach().float().cpu()))
    try:
        yield kept
    finally:
        handle.remove()


def replace_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    name = head_name(model)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, DropoutLinear(old.in_features, num_classes, dropout))


def resolve_weights(arch: str, weights: str):
    """A torchvision weights enum for `arch`, None for 'none', a Path to a state-dict file, or for a timm or open_clip
    start 'DEFAULT': the weights its name gives."""
    if weights.lower() == "none":
        return None
    if weights == DEMO_PRETRAINED:  # a state-dict file like any other, made by train.py on the demo's source task
        path = demo_clip.weights_path() if arch == DEMO_CLIP_ARCH else demo_pretrained_path(arch)
        if not path.is_file():
            raise UserError(
                f"the demo-pretrained weights for {arch} are not made yet ({path}); train.py makes them once: "
                f"uv run train.py --config configs/demo.toml --arch {arch}"
            )
        return path
    if weights.endswith(WEIGHTS_FILE_SUFFIXES) or "/" in weights or Path(weights).exists():
        path = Path(weights).expanduser()
        if path.is_dir():
            raise UserError(
                f"{weights} is a folder, not a weights file; give the state-dict file inside it (e.g. "
                f"{path / 'best.pt'})"
            )
        if not path.is_file():
            raise UserError(f"weights file {weights} does not exist")
        return path
    if starts.is_library(arch):
        if weights == "DEFAULT":
            return weights
        raise UserError(
            f"{arch} takes its weights from its name (timm's tag, open_clip's /PRETRAINED); pass --weights DEFAULT, "
            f"'{DEMO_PRETRAINED}', 'none' or a state-dict file, not {weights!r}"
        )
    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(["DEFAULT", *enum.__members__])
        raise UserError(
            f"{arch} has no weights named {weights!r}; choose one of {names}, '{DEMO_PRETRAINED}', 'none', or a "
            "state-dict file"
        ) from None


def check_resolution(model: nn.Module, arch: str, resolution: int) -> None:
    """Vision transformers are built for one input size (vit_b_16: 224)."""
    size = getattr(model, "image_size", None)
    if isinstance(size, int) and size != resolution:
        raise UserError(f"{arch} takes {size} x {size} px images only; pass --resolution {size}")


UNSUPPORTED = {
    "googlenet": "its training output carries auxiliary heads",
    "inception_v3": "its training output carries auxiliary heads",
}


def check_arch(arch: str) -> None:
    if starts.is_library(arch):
        return starts.check(arch)
    if arch in UNSUPPORTED:
        raise UserError(f"{arch} is not supported: {UNSUPPORTED[arch]}; choose another architecture, e.g. resnet50")
    archs = classification_archs()
    if arch not in archs:
        close = difflib.get_close_matches(arch, archs, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise UserError(f"unknown architecture {arch!r}{hint}")


def build_model(
    arch: str, weights: str, num_classes: int, dropout: float = 0.0, *, resolution: int | None = None
) -> nn.Module:
    """A pretrained model (ImageNet, a timm or open_clip start, demo-pretrained, or a file) whose head is replaced by
    a fresh `num_classes`-way one; a file's head is kept when it already fits (a fine-tuned model). `resolution`: the
    size a timm or open_clip ViT is built for (torchvision's are built for one size, see check_resolution).

    torchvision refuses num_classes != 1000 together with ImageNet weights, so the model is
    built as published and the head swapped afterwards.
    """
    check_arch(arch)
    resolved = resolve_weights(arch, weights)
    if starts.is_library(arch):
        state = read_state_dict(resolved) if isinstance(resolved, Path) else None  # read once, whatever it holds
        whole_clip = state is not None and starts.is_clip_checkpoint(state)
        source = resolved if resolved == "DEFAULT" or whole_clip else None  # else this project's own file, below
        built = starts.build(arch, source=source, resolution=resolution)
        model = starts.wrap(built, DropoutLinear(built.features, num_classes, dropout))
        if state is not None and not whole_clip:
            load_start_file(model, resolved, arch=arch, weights=weights, state=state)
        return model
    if isinstance(resolved, Path):
        model = torchvision.models.get_model(arch, weights=None)
        replace_head(model, num_classes, dropout)
        load_start_file(model, resolved, arch=arch, weights=weights)
        return model
    model = published(arch, resolved)
    replace_head(model, num_classes, dropout)
    return model


def load_start_file(model: nn.Module, resolved: Path, *, arch: str, weights: str, state: dict | None = None) -> None:
    """A weights file loaded into the network: a state-dict file, or the demo-pretrained one (which says so).
    `state`: the file's state dict, when the caller read it already."""
    try:
        load_weights_file(model, resolved, arch, state=state)
    except UserError as error:
        if weights != DEMO_PRETRAINED:
            raise
        problem = str(error).split(";")[0]
        raise UserError(
            f"{resolved} is this project's own demo-pretrained weights file for {arch}, and it cannot be used "
            f"({problem}); delete it, and the next run with --weights {DEMO_PRETRAINED} makes it again"
        ) from None


def published(arch: str, weights) -> nn.Module:
    """torchvision's model with its weights (from its cache) and its own head, or randomly initialised for None."""
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError) as error:  # URLError is an OSError: no network, no cached file
        filename = Path(weights.url).name
        raise UserError(
            f"could not get the {weights} weights ({error}); put {filename} into $TORCH_HOME/hub/checkpoints/ "
            "(default ~/.cache/torch/hub/checkpoints/), or use --weights none or a state-dict file"
        ) from None


def build_with_own_head(arch: str, weights: str, *, resolution: int | None = None) -> nn.Module:
    """A pretrained model as it was trained, its source task's head kept (ImageNet's 1000 classes, the demo source's
    40): what LEEP and NCE read. 'none' is torchvision's random initialisation, with a random 1000-way head."""
    check_arch(arch)
    resolved = resolve_weights(arch, weights)
    if starts.has_text_tower(arch):
        raise UserError(f"{arch} has no head of its source task (a CLIP has its text tower instead)")
    if starts.is_library(arch) and not isinstance(resolved, Path):
        built = starts.build(arch, source=resolved, resolution=resolution)
        if built.own_head is None:
            raise UserError(f"{arch} has no linear head of its source task to score with")
        return starts.wrap(built, built.own_head)
    if not isinstance(resolved, Path):
        return published(arch, resolved)
    state = read_state_dict(resolved)
    if starts.is_library(arch):
        built = starts.build(arch, source=None, resolution=resolution)
        model = starts.wrap(built, nn.Linear(built.features, 1))
    else:
        model = torchvision.models.get_model(arch, weights=None)
    head = head_name(model)
    if f"{head}.weight" not in state:
        raise UserError(f"weights file {resolved} has no {head} head; scoring it needs the head of its source task")
    replace_head(model, state[f"{head}.weight"].shape[0], 0.0)
    load_checked(model, state, what=f"weights file {resolved}", arch=arch)
    return model


def head_fits(model: nn.Module, state: dict) -> bool:
    """Whether a state dict holds a head of the model's shape (a fine-tuned model's), not another task's or none."""
    head, own = head_name(model) + ".", model.state_dict()
    head_keys = [k for k in own if k.startswith(head)]
    return all(k in state and state[k].shape == own[k].shape for k in head_keys)


def load_weights_file(model: nn.Module, path: Path, arch: str, *, state: dict | None = None) -> None:
    """Load a state dict into the backbone; the head too when its shape fits (a fine-tuned model). `state`: the
    file's, when the caller read it already."""
    state = read_state_dict(path) if state is None else state
    if not head_fits(model, state):  # e.g. an ImageNet 1000-way head
        head = head_name(model) + "."
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    load_checked(model, state, what=f"weights file {path}", arch=arch, allow_missing_head=True)


def load_checked(model: nn.Module, state: dict, *, what: str, arch: str, allow_missing_head: bool = False) -> None:
    """load_state_dict with one clear line instead of a wall of missing keys."""
    own = model.state_dict()
    head = head_name(model)
    missing = [k for k in own if k not in state and not (allow_missing_head and k.startswith(head + "."))]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        if wrong_shape and all(k.startswith(head + ".") for k in wrong_shape) and not (missing or unexpected):
            k = wrong_shape[0]
            raise UserError(
                f"{what} has {state[k].shape[0]} classes but the model has {own[k].shape[0]}; "
                "pass the matching --num-classes / dataset"
            )
        guess = guess_arch(state, near=arch)
        if guess and guess != arch:
            raise UserError(f"{what} holds a {guess} model, not {arch}; pass --arch {guess}")
        detail = (missing or unexpected or wrong_shape)[0]
        raise UserError(
            f"{what} does not fit {arch}: {len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} "
            f"wrongly shaped tensors (first: {detail}); it was probably saved from another architecture"
        )
    model.load_state_dict(state, strict=not allow_missing_head)


def guess_arch(state: dict, *, near: str) -> str | None:
    """The torchvision architecture whose backbone has exactly these tensor names and shapes. Those named most like
    `near` (the one asked for, which did not fit: resnet34 for a resnet18 file) are tried first, and the search stops
    at the first that fits: the common mistake is named at once, not after building all 63 (10 s on a CPU)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for arch in sorted(classification_archs(), key=lambda name: -difflib.SequenceMatcher(None, name, near).ratio()):
        found = backbone_shapes(arch)
        if found is None:
            continue
        head, own = found
        if own == {k: v for k, v in shapes.items() if not k.startswith(head)}:
            return arch
    return None


@functools.cache
def backbone_shapes(arch: str) -> tuple[str, dict] | None:
    """A torchvision classifier's head prefix and backbone tensor shapes, built once per process on the meta device (no
    memory, no weights); None for one that needs arguments or has no linear head, which is never guessed."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # googlenet and inception warn about their initialisation
            model = torchvision.models.get_model(arch)
    except Exception:  # some architectures need arguments
        return None
    try:
        head = head_name(model) + "."
    except UserError:  # no linear head (SqueezeNet)
        return None
    return head, {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(head)}
