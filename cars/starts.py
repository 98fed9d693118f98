"""Starts beyond torchvision: any timm model (`timm:NAME`) and open_clip's image towers (`open_clip:MODEL/PRETRAINED`),
built by those libraries' own code, with their weights from those libraries' own hub cache.

Every tool here feeds a network ImageNet-normalised pixels and reads one linear head named `fc`. A `LibraryNetwork`
keeps that promise: a fixed first layer turns ImageNet's normalisation into the start's own (CLIP's mean and std,
timm's 0.5), then the library's network without its classifier, then the head. Training, eval.py, predict.py, the
page and ONNX export need nothing else to know about it.

A CLIP's image embedding is used as CLIP uses it, scaled to unit length: the head reads it so (the zero-shot head's
weights are unit text embeddings times CLIP's logit scale). Its text tower stays behind: it is needed once, to write
the zero-shot head (`zero_shot_head`).
"""

import contextlib
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from cars.errors import UserError
from cars.transforms import IMAGENET_MEAN, IMAGENET_STD

TIMM, OPEN_CLIP = "timm:", "open_clip:"
DEMO_CLIP = "demo-clip"  # the demo's own small CLIP (cars/demo_clip.py), a model open_clip builds from its config
DEMO_CLIP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / f"{DEMO_CLIP}.json"
DEMO_CLIP_INTERPOLATION = "bilinear"  # the filter of its pretraining's pictures: this project's classic pipeline's

# CLIP's prompts for Stanford Cars (Radford et al. 2021, the prompts of its zero-shot evaluation; CLIP_benchmark's
# "cars" templates): the head of a class is the mean of its name's embeddings in these sentences
CARS_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
)


def is_library(arch: str) -> bool:
    """Whether `arch` names a start built by timm or open_clip rather than torchvision."""
    return arch.startswith((TIMM, OPEN_CLIP))


def has_text_tower(arch: str) -> bool:
    return arch.startswith(OPEN_CLIP)


class Renormalise(nn.Module):
    """ImageNet-normalised pixels to the start's own normalisation: (x * s_in + m_in - m) / s per channel, exactly."""

    def __init__(self, mean, std):
        super().__init__()
        mean, std = torch.tensor(mean), torch.tensor(std)
        # not in the state dict: they follow from the arch, and a checkpoint stays the library's network and the head
        self.register_buffer("scale", (torch.tensor(IMAGENET_STD) / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((torch.tensor(IMAGENET_MEAN) - mean) / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return x * self.scale + self.shift


class LibraryNetwork(nn.Module):
    """A timm or open_clip network as this project's tools see it: ImageNet-normalised pixels in, the start's own
    normalisation, its body (the network without its classifier: pooled features out), then the head `fc`."""

    def __init__(self, body: nn.Module, head: nn.Linear, *, mean, std, unit_features: bool, prefix_tokens: int):
        super().__init__()
        self.renormalise = Renormalise(mean, std)
        self.body = body
        self.unit_features = unit_features  # a CLIP's embedding, scaled to unit length as CLIP compares them
        self.prefix_tokens = prefix_tokens  # a ViT's class (and register) tokens: not image patches, for CAMs
        self.fc = head

    def forward(self, x):
        features = self.body(self.renormalise(x))
        return self.fc(F.normalize(features, dim=-1) if self.unit_features else features)


@dataclass(frozen=True)
class Built:
    """A library's network, its classifier taken off: pooled features out, and what its pretraining fed it."""

    body: nn.Module
    features: int
    mean: tuple
    std: tuple
    own_head: nn.Linear | None  # its source task's classifier (timm's ImageNet head), when it has one
    unit_features: bool
    prefix_tokens: int


def wrap(built: Built, head: nn.Linear) -> LibraryNetwork:
    return LibraryNetwork(
        built.body,
        head,
        mean=built.mean,
        std=built.std,
        unit_features=built.unit_features,
        prefix_tokens=built.prefix_tokens,
    )


def build(arch: str, *, source: "str | Path | None", resolution: int | None) -> Built:
    """The library's network for `arch`, built for `resolution` px where it is made for one size (a ViT: its position
    embeddings resized as the library resizes them), with the weights of `source`: 'DEFAULT', those its name gives
    (through the library's hub code and cache); for open_clip a whole CLIP's checkpoint file (the demo's CLIP); None,
    the library's random initialisation. The name is checked by the caller (models.check_arch)."""
    if arch.startswith(TIMM):
        return build_timm(arch.removeprefix(TIMM), pretrained=source == "DEFAULT", resolution=resolution)
    return build_open_clip(arch, source=source, resolution=resolution)


def is_clip_checkpoint(state: dict) -> bool:
    """Whether a state dict is a whole CLIP's (open_clip's form: both towers and the logit scale), not a network of
    this project's (`body.*` and `fc.*`)."""
    return "logit_scale" in state and any(key.startswith("visual.") for key in state)


def check(arch: str) -> None:
    """One clear line for a name the library does not know."""
    if arch.startswith(TIMM):
        import timm

        name = arch.removeprefix(TIMM)
        if not name or not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
            raise UserError(f"timm has no model {name!r}{hint}")
        return
    model, tag = open_clip_name(arch)
    if model.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip_models()
    if model not in known:
        close = difflib.get_close_matches(model, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise UserError(f"open_clip has no model {model!r}{hint}")


def own_preprocessing(arch: str) -> dict:
    """The input size and resize filter the start's weights were trained with, from its pretrained config (no weights
    are read): timm's input_size and interpolation, open_clip's image_size and its tag's interpolation; the library's
    defaults (224, bicubic) where the config is not on this machine (an open_clip hub name)."""
    check(arch)
    if arch.startswith(TIMM):
        import timm

        config = timm.models.get_pretrained_cfg(arch.removeprefix(TIMM))
        if not config:
            return {"resolution": 224, "interpolation": "bicubic"}
        return {"resolution": int(config.input_size[-1]), "interpolation": pipeline_filter(config.interpolation)}
    import open_clip

    model, tag = open_clip_name(arch)
    size = vision_config(model).get("image_size", 224)
    if model == DEMO_CLIP:
        interpolation = DEMO_CLIP_INTERPOLATION
    else:
        interpolation = ((tag and open_clip.get_pretrained_cfg(model, tag)) or {}).get("interpolation", "bicubic")
    return {
        "resolution": int(size if isinstance(size, int) else size[-1]),
        "interpolation": pipeline_filter(interpolation),
    }


def pipeline_filter(interpolation: str) -> str:
    """A library's resize filter as one of this pipeline's two (a start trained with a rare third gets bicubic)."""
    return "bilinear" if interpolation == "bilinear" else "bicubic"


def vision_config(model: str) -> dict:
    """open_clip's config of a model's image tower ({} for a hub config that is not on this machine: create_model
    says so when it is built)."""
    import open_clip

    try:
        return (open_clip.get_model_config(model) or {}).get("vision_cfg", {})
    except (OSError, RuntimeError, ValueError):
        return {}


def open_clip_models() -> list[str]:
    import open_clip

    if DEMO_CLIP not in open_clip.list_models():
        open_clip.add_model_config(DEMO_CLIP_CONFIG)
    return open_clip.list_models()


def open_clip_name(arch: str) -> tuple[str, str | None]:
    """(model, pretrained tag) of `open_clip:MODEL/TAG`; open_clip's own `hf-hub:ORG/REPO` and `local-dir:PATH`
    carry their weights and have no tag."""
    rest = arch.removeprefix(OPEN_CLIP)
    if rest.startswith(("hf-hub:", "local-dir:")) or "/" not in rest:
        return rest, None
    model, _, tag = rest.rpartition("/")
    return model, tag


@contextlib.contextmanager
def quiet_libraries():
    """open_clip and timm log each model they build at WARNING ('initialized randomly'): train.log says what matters."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def hub_failure(what: str, error: Exception) -> UserError:
    """One line for weights a library could not get: no network and not in its cache."""
    return UserError(
        f"could not get the weights of {what} ({str(error).splitlines()[0][:200]}); with no network they must be in "
        "the Hugging Face cache ($HF_HOME/hub, default ~/.cache/huggingface/hub): run once with a network, or use "
        "--weights none or a state-dict file"
    )


def build_timm(name: str, *, pretrained: bool, resolution: int | None) -> Built:
    import timm

    config = timm.models.get_pretrained_cfg(name)  # with its tag, or the model's default weights
    # a ViT is made for one size: built for another, timm resizes its position embeddings (as it loads weights too)
    kwargs = {"img_size": resolution} if resolution and config and config.fixed_input_size else {}
    try:
        with quiet_libraries():
            network = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as error:  # no network and nothing in the hub cache
        raise hub_failure(f"timm:{name}", error) from None
    except TypeError as error:
        raise UserError(
            f"timm:{name} cannot be built at {resolution} px ({error}); pass its own --resolution"
        ) from None
    classifier = network.get_classifier()
    own_head = classifier if isinstance(classifier, nn.Linear) else None
    network.reset_classifier(0)
    cfg = network.pretrained_cfg
    return Built(
        body=network,
        features=network.num_features,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        own_head=own_head,
        unit_features=False,
        prefix_tokens=getattr(network, "num_prefix_tokens", 0),
    )


def clip_model(arch: str, *, source: "str | Path | None", resolution: int | None = None):
    """The whole CLIP model (image and text towers) for `arch`, with the weights of `source` (see `build`)."""
    import open_clip

    open_clip_models()  # the demo's CLIP is known to open_clip
    model, tag = open_clip_name(arch)
    if source == "DEFAULT" and tag is None and not model.startswith(("hf-hub:", "local-dir:")):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none published"
        raise UserError(
            f"{arch} names no pretrained weights; name them as open_clip:{model}/TAG (its tags: {tags}), or pass "
            "--weights none, demo-pretrained or a state-dict file"
        )
    if tag is not None and not open_clip.get_pretrained_cfg(model, tag):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise UserError(f"open_clip has no weights {tag!r} for {model}; its tags: {tags}")
    # the activation the weights were trained with (OpenAI's and DFN's QuickGELU), as open_clip's -quickgelu names do
    quick_gelu = bool(tag and open_clip.get_pretrained_cfg(model, tag).get("quick_gelu", False))
    vision = vision_config(model)
    if resolution and not vision.get("patch_size") and vision.get("image_size", resolution) != resolution:
        # a ViT's position embeddings are resized; a ResNet tower's attention pooling has a fixed grid
        raise UserError(f"{arch} takes {vision['image_size']} px images only; pass --resolution {vision['image_size']}")
    if not vision.get("patch_size"):
        resolution = None
    try:
        with quiet_libraries():
            return open_clip.create_model(
                model,
                pretrained=tag if source == "DEFAULT" else str(source) if source else None,
                load_weights=source is not None,
                force_quick_gelu=quick_gelu,
                force_image_size=resolution,
                device=torch.get_default_device(),  # where open_clip moves it: the caller's (the meta device too)
            )
    except (OSError, RuntimeError) as error:
        raise hub_failure(arch, error) from None


def build_open_clip(arch: str, *, source, resolution: int | None) -> Built:
    import open_clip

    clip = clip_model(arch, source=source, resolution=resolution)
    visual = clip.visual
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    return Built(
        body=visual,
        features=visual.output_dim,
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        own_head=None,
        unit_features=True,
        prefix_tokens=1 if hasattr(visual, "class_embedding") else 0,
    )


@torch.no_grad()
def zero_shot_head(arch: str, class_names: list[str], *, source, templates=CARS_TEMPLATES) -> torch.Tensor:
    """A CLIP's zero-shot classifier for these classes: each class's text embedding averaged over the prompt
    templates, scaled to unit length, times CLIP's logit scale, as a (classes x features) weight (bias 0). The text
    tower comes with `source`: the published weights ('DEFAULT') or a whole CLIP's checkpoint file (the demo's)."""
    import open_clip

    clip = clip_model(arch, source=source).eval()
    tokenizer = open_clip.get_tokenizer(open_clip_name(arch)[0])
    rows = []
    for name in class_names:
        embedded = F.normalize(clip.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
        rows.append(F.normalize(embedded.mean(0), dim=-1))
    return torch.stack(rows) * clip.logit_scale.exp()
