"""The fine-tuning methods, each one declaration in one registry (`REGISTRY`), as timm declares each optimizer once in
its `OptimInfo`: what the method is called, which knob turns it on, what it needs from setup, and how it acts: which
parameters it lets train, the lr it gives each block, its loss term, its change to the network. `prepare` builds a
run's method from the declarations of the methods that are on; nothing else in the project lists the methods.

- LP-FT, `--probe-init` (Kumar et al. 2022): fit the new head as a linear probe on the frozen start, then tune all.
- two stages, `--freeze-epochs N`: the head alone for N epochs, then everything (the original write-up's run 7).
- differential lr, `--backbone-lr-mult M`, and layer-wise lr decay, `--layer-decay D` (ULMFiT; BEiT, timm).
- surgical fine-tuning, `--train-blocks` (Lee et al. 2023), a linear probe trained by the recipe (`head`).
- BN-only, `--train-params norm` (Frankle et al. 2021); BitFit, `--train-params bias` (Ben Zaken et al. 2022).
- LoRA, `--lora R` (Hu et al. 2021), through Hugging Face `peft`: low-rank updates of chosen layers.
- L2-SP, `--l2sp` (Li et al. 2018); DELTA, `--delta` (Li et al. 2019); BSS, `--bss` (Chen et al. 2019);
  Co-Tuning, `--co-tuning` (You et al. 2020).

Adding a method is one `Method(...)` in REGISTRY (with its Term, if it adds to the loss), its knob in cars/config.py
and its test: docs/explanation/design.md walks through one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cars import starts
from cars.data import spread_sample
from cars.errors import UserError, flag
from cars.finetune import (
    STEM,
    ProbeHead,
    block_of,
    blocks,
    fit_probe_head,
    head_block,
    head_inputs,
    head_parameters,
    prototype_head,
    set_head,
    stage_runs,
    stages,
)
from cars.models import build_with_own_head, head_name, on_head_input, resolve_weights

if TYPE_CHECKING:  # for the annotations only: cars.config imports this module to check a config's methods
    from cars.config import Config

# --- the declaration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Method:
    """One fine-tuning method: everything the rest of the code needs to know of it."""

    title: str  # how train.log, the reports and compare.py name it
    knob: str  # the Config field that turns it on (its flag: --knob)
    paper: str = ""
    on: Callable[[Config], bool] | None = None  # whether a config uses it (default: its knob is not at its default)
    words: Callable[[Config], str] | None = None  # the method with its values, in a few words (default: title value)
    # what it needs from setup
    needs_pretrained: bool = False  # a start to use: refused with --weights none
    needs_backbone: bool = False  # acts through the backbone only: refused when the head alone trains
    needs_start: bool = False  # its loss reads the start's weights all through training (a frozen copy, rebuilt on
    # resume and checked against the run's fingerprint)
    needs_probe: bool = False  # the linear probe on the start's features of the training images
    needs_train_images: bool = False  # the training images as evaluated (centre crops), before training
    one_process: bool = False  # trains parameters of its own, which torchrun's processes would not average
    # how it acts
    replaces_decay: bool = False  # pulls the backbone to its start: the backbone gets no decay towards 0
    lr_per_block: Callable[[Config, int], float] | None = None  # the lr of a block k >= 1 blocks below the head, as a
    # multiple of the head's
    trains: Callable[[Config, nn.Module], set[int]] | None = None  # the ids of the only backbone parameters that train
    keeps_statistics: bool = False  # the backbone's BatchNorm statistics stay the start's (its weights barely move)
    begin: Callable[["Setup"], None] | None = None  # done once before the first epoch (not again on resume)
    writes_head: bool = False  # its begin writes the head the run starts from (kept: interpolate.py's alpha 0)
    term: Callable[["Setup"], "Term"] | None = None  # its loss term, built in setup (on resume from what last.pt kept)
    adapt: Callable[[Config, nn.Module], None] | None = None  # its change to the network, made right after it is built
    excludes: dict[str, str] = dataclasses.field(default_factory=dict)  # knobs it cannot go with, and why

    def is_on(self, cfg) -> bool:
        if self.on is not None:
            return self.on(cfg)
        return getattr(cfg, self.knob) != knob_default(cfg, self.knob)

    def describe(self, cfg) -> str:
        return self.words(cfg) if self.words else f"{self.title} {getattr(cfg, self.knob):g}"


@dataclass(kw_only=True)
class Setup:
    """What a method's `begin` and `term` are given: the run's network and what setup made for the methods that are
    on."""

    cfg: Config
    model: nn.Module  # the network that trains, on its device
    start: nn.Module | None  # a frozen copy of where it started (methods with needs_start)
    probe: ProbeHead | None  # the linear probe on the start (methods with needs_probe)
    train_split: object  # the run's training images, for what a method measures on them
    class_names: list[str]
    train_images: object | None  # those images as evaluated, centre crops (methods with needs_train_images)
    eval_loader: Callable  # split -> its loader as the run evaluates it (the run's resolution, cache, batch)
    device: object
    learned: dict  # what a resumed run's last.pt kept of the method, by term name ({} on a fresh run)
    world_size: int  # torchrun's processes, each with its share of a batch


# --- what trains -------------------------------------------------------------------------------------------------


NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def norm_parameters(model: nn.Module) -> set[int]:
    """The ids of the normalisation layers' scales and shifts."""
    return {id(p) for module in model.modules() if isinstance(module, NORMS) for p in module.parameters(False)}


def bias_parameters(model: nn.Module) -> set[int]:
    """The ids of every bias."""
    return {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}


def chosen_blocks(model: nn.Module, names: str) -> set[str]:
    """The blocks --train-blocks names: a block (`layer4.2`), a stage or any parent of blocks (`layer4`), a stage's
    label (`conv1+bn1`), `stem` (the first stage) or `head` (the head alone: a linear probe trained by the recipe).
    Comma- or space-separated."""
    every, runs = blocks(model), stage_runs(model)
    labels = {STEM: runs[0][1], **{label: run for label, run in runs}, "head": [head_block(model)]}
    chosen = set()
    for name in filter(None, re.split(r"[,\s]+", names)):
        found = labels.get(name) or [b for b in every if b == name or b.startswith(name + ".")]
        if not found:
            raise UserError(
                f"--train-blocks: {type(model).__name__} has no block {name!r}; name a stage ({', '.join(labels)}) "
                f"or a block ({', '.join(every)})"
            )
        chosen.update(found)
    return chosen


def frozen_blocks(cfg, model: nn.Module) -> set[str]:
    """The blocks --train-blocks leaves frozen for the whole run (weights and BatchNorm statistics)."""
    if not cfg.train_blocks.strip():
        return set()
    head = head_block(model)
    return {b for b in blocks(model) if b != head} - chosen_blocks(model, cfg.train_blocks)


def trained_parameters(cfg, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that ever train, by name, in the model's order: those of the blocks that are not frozen, and of
    them only the kind a method lets train (BN-only's norms, BitFit's biases, LoRA's adapters); the head's always. The
    rest keep their starting values: they get no gradient and are not given to the optimizer (so no weight decay or
    momentum can move them either)."""
    frozen, names = frozen_blocks(cfg, model), blocks(model)
    kinds = [method.trains(cfg, model) for method in active(cfg) if method.trains]
    allowed = set.intersection(*kinds) | {id(p) for p in head_parameters(model)} if kinds else None
    return [
        (name, p)
        for name, p in model.named_parameters()
        if (allowed is None or id(p) in allowed) and block_of(name, names) not in frozen
    ]


def set_trainable(cfg, model: nn.Module, *, backbone_frozen: bool = False) -> None:
    """What trains now. Call it after model.train(). Parameters that never train get no gradient; with
    `backbone_frozen` (--freeze-epochs' first epochs) the whole backbone gets none. A frozen block's BatchNorm layers
    go into eval mode and keep their statistics, and so does every block's with a method that keeps them (LoRA).
    (BN-only and BitFit keep estimating them: the normalisation is what they tune.) Dropout works as in any step."""
    trained = {id(p) for _, p in trained_parameters(cfg, model)}
    head, names = head_block(model), blocks(model)
    keeps = backbone_frozen or any(method.keeps_statistics for method in active(cfg))
    frozen = set(names) - {head} if keeps else frozen_blocks(cfg, model)
    head_ids = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained and (id(p) in head_ids or not backbone_frozen))
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and name and block_of(name, names) in frozen:
            module.eval()


def parameter_counts(cfg, model: nn.Module) -> tuple[int, int]:
    """(every parameter of the network, those that train): what summary.json and train.log report. With --epochs 0
    none does."""
    trained = sum(p.numel() for _, p in trained_parameters(cfg, model)) if cfg.epochs else 0
    return sum(p.numel() for p in model.parameters()), trained


# --- the lr and decay of each group ------------------------------------------------------------------------------


def base_lr(cfg) -> float:
    """--lr, scaled by batch/128 with --lr-scaling linear (lr 0.1 was tuned for batch 128)."""
    return cfg.lr * cfg.batch_size / 128 if cfg.lr_scaling == "linear" else cfg.lr


def depth_below_head(model: nn.Module) -> dict[str, int]:
    """For each block, how many blocks below the head it is (the head 0), the stem counted as one block: what
    --layer-decay raises D to."""
    order = blocks(model)
    stem = set(stage_runs(model)[0][1])
    units = [b for b in order if b not in stem]
    units.insert(0, STEM)
    position = {b: units.index(STEM if b in stem else b) for b in order}
    head = position[head_block(model)]
    return {b: head - position[b] for b in order}


def lr_scale(cfg, depth: int) -> float:
    """The lr of a block `depth` >= 1 blocks below the head, as a multiple of the head's: what the methods that set it
    (layer decay, differential lr) give, multiplied."""
    return math.prod(method.lr_per_block(cfg, depth) for method in active(cfg) if method.lr_per_block)


def undecayed(model: nn.Module) -> set[int]:
    """The ids of the normalisation layers' weights and of every bias: what --norm-weight-decay decays. Decay pulls
    a weight towards 0; a BatchNorm scale or a bias is not a weight that overfits by growing, and shrinking it only
    fights the normalisation (torchvision's and timm's recipes leave them undecayed)."""
    return norm_parameters(model) | bias_parameters(model)


def param_groups(cfg, model: nn.Module, *, extra: list[dict] = ()) -> list[dict]:
    """The optimizer's parameter groups, each with its name, lr and weight decay, only of parameters that train, made
    in one pass over them (as timm's param_groups_layer_decay): the head and the backbone, the backbone one group per
    block when a method gives blocks their own lr (layer decay); with --norm-weight-decay each split in two, the
    normalisation weights and biases with their own decay. A method that pulls the backbone to its start (L2-SP,
    DELTA) replaces the backbone's decay, as in the papers: the head keeps it. `extra` are the methods' own groups
    (Co-Tuning's source head). The head's group is named "head": the recipe reads the lr there (optim.head_lr)."""
    lr, depth, names, head = base_lr(cfg), depth_below_head(model), blocks(model), head_block(model)
    scale = {block: lr_scale(cfg, depth[block]) if block != head else 1.0 for block in names}
    per_block = len({scale[block] for block in names if block != head}) > 1  # the blocks' lrs differ: a group each
    pulled_to_start = any(method.replaces_decay for method in active(cfg))
    split_norms, norms_and_biases = cfg.norm_weight_decay >= 0, undecayed(model)
    groups: dict[str, dict] = {}
    for name, p in trained_parameters(cfg, model):
        block = block_of(name, names)
        key = "head" if block == head else block if per_block else "backbone"
        decay = 0.0 if pulled_to_start and key != "head" else cfg.weight_decay
        if split_norms and id(p) in norms_and_biases:
            key, decay = f"{key} norm and bias", 0.0 if pulled_to_start and key != "head" else cfg.norm_weight_decay
        group = groups.setdefault(key, {"params": [], "lr": lr * scale[block], "weight_decay": decay, "name": key})
        group["params"].append(p)
    return [*groups.values(), *extra]


def param_group_rows(optimizer: torch.optim.Optimizer, epoch: int) -> list[dict]:
    """param_groups.csv's rows for one epoch, read from the optimizer itself: the lr and decay each group really has
    (a scale that is set but never reaches the optimizer shows up here)."""
    return [
        dict(
            epoch=epoch,
            group=group.get("name", str(i)),
            parameters=sum(p.numel() for p in group["params"]),
            lr=group["lr"],
            weight_decay=group["weight_decay"],
        )
        for i, group in enumerate(optimizer.param_groups)
    ]


PARAM_GROUP_COLUMNS = ["epoch", "group", "parameters", "lr", "weight_decay"]


# --- the loss ----------------------------------------------------------------------------------------------------


class Capture:
    """What a network's forward pass leaves behind for the loss terms: the head's input (the features), and the
    outputs of the stages DELTA compares. Hooks fill it on every forward pass."""

    def __init__(self, model: nn.Module, *, features: bool, stage_modules: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [on_head_input(model, lambda x: self.outputs.__setitem__("features", x))] if features else []
        for name in stage_modules:
            self.handles.append(
                model.get_submodule(name).register_forward_hook(
                    lambda _, __, output, name=name: self.outputs.__setitem__(name, output)
                )
            )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Term(nn.Module):
    """An extra loss term: `name` is its column in metrics.csv, `weight` its coefficient, `reads_features` whether it
    needs the head's input of every step and `stage_modules` which stages' outputs. `forward` returns the weighted
    term for a batch, given what the trained network's forward pass captured; `param_groups` are the optimizer's
    groups of its own parameters, `learned` what last.pt keeps of it."""

    name: str
    weight: float
    reads_features: bool = False
    stage_modules: list[str] = []

    def param_groups(self, cfg) -> list[dict]:
        return []

    def learned(self) -> dict:
        return {}


class Objective(nn.Module):
    """The training loss: cross-entropy (with --label-smoothing) plus the method's terms. Called under autocast by
    the step; returns the loss to minimise, the cross-entropy alone (the train_loss of metrics.csv, comparable across
    methods), the logits, and each term's value."""

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0, terms: list[Term] = ()):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.terms = nn.ModuleList(terms)
        stage_modules = sorted({name for term in terms for name in term.stage_modules})
        needs_features = any(term.reads_features for term in terms)
        self.capture = Capture(model, features=needs_features, stage_modules=stage_modules) if terms else None

    @property
    def names(self) -> list[str]:
        return [term.name for term in self.terms]

    def forward(self, model, images, targets):
        logits = model(images)
        cross_entropy = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        values = {term.name: term(self.capture.outputs, images, targets) for term in self.terms}
        return cross_entropy + sum(values.values()), cross_entropy, logits, values

    def param_groups(self, cfg) -> list[dict]:
        """The optimizer's groups of the terms' own parameters (Co-Tuning's source head)."""
        return [group for term in self.terms for group in term.param_groups(cfg)]

    def learned(self) -> dict:
        """What last.pt keeps of the method, by term: the parts learned before training (DELTA's attention, Co-Tuning's
        relation) and during it (Co-Tuning's source head). The start's weights are not kept: a resumed run rebuilds
        them from --weights and checks them against the recorded fingerprint."""
        return {term.name: learned for term in self.terms if (learned := term.learned())}


def plain_objective(label_smoothing: float = 0.0) -> Objective:
    """Cross-entropy alone: plain fine-tuning (and lr_find's steps)."""
    return Objective(nn.Identity(), label_smoothing=label_smoothing)


# --- LP-FT -------------------------------------------------------------------------------------------------------


def probe_as_head(setup: Setup) -> None:
    set_head(setup.model, setup.probe.weight, setup.probe.bias)


LP_FT = Method(
    title="LP-FT",
    knob="probe_init",
    paper="Kumar et al. 2022",
    words=lambda cfg: "LP-FT (linear-probe head first)",
    needs_pretrained=True,
    needs_probe=True,
    needs_train_images=True,
    begin=probe_as_head,
    writes_head=True,
)


# --- heads that need no training ---------------------------------------------------------------------------------


def zero_shot_as_head(setup: Setup) -> None:
    """The class names through the start's text tower (CLIP's prompts for cars, averaged) as the head."""
    source = resolve_weights(setup.cfg.arch, setup.cfg.weights)
    weight = starts.zero_shot_head(setup.cfg.arch, setup.class_names, source=source)
    set_head(setup.model, weight, torch.zeros(len(weight)))


def prototypes_as_head(setup: Setup) -> None:
    """The class means of the start's features of the training images (centre crops) as the head."""
    features, labels = head_inputs(setup.model, setup.train_images, setup.device, description="prototype features")
    set_head(setup.model, *prototype_head(features, labels, len(setup.class_names)))


ZERO_SHOT = Method(
    title="zero-shot head",
    knob="head",
    paper="Radford et al. 2021 (CLIP); WiSE-FT, Wortsman et al. 2022",
    on=lambda cfg: cfg.head == "zero-shot",
    words=lambda cfg: "zero-shot head (the class names through CLIP's text tower)",
    needs_pretrained=True,
    begin=zero_shot_as_head,
    writes_head=True,
    excludes={"probe_init": "both write the head the run starts from"},
)
PROTOTYPES = Method(
    title="prototypes head",
    knob="head",
    paper="Snell et al. 2017; SimpleShot, Wang et al. 2019",
    on=lambda cfg: cfg.head == "prototypes",
    words=lambda cfg: "prototypes head (the class means of the start's features)",
    needs_pretrained=True,
    needs_train_images=True,
    begin=prototypes_as_head,
    writes_head=True,
    excludes={"probe_init": "both write the head the run starts from"},
)


# --- what trains when, and at which lr ---------------------------------------------------------------------------

TWO_STAGES = Method(
    title="two stages",
    knob="freeze_epochs",
    paper="the original write-up's runs",
    words=lambda cfg: f"head only for {cfg.freeze_epochs} epoch{'s' if cfg.freeze_epochs > 1 else ''}",
    excludes={knob: "both decide what trains first" for knob in ("probe_init", "train_blocks", "train_params")},
)
LAYER_DECAY = Method(
    title="layer-wise lr decay",
    knob="layer_decay",
    paper="ULMFiT, Howard & Ruder 2018; BEiT; timm's layer_decay",
    needs_backbone=True,
    lr_per_block=lambda cfg, k: cfg.layer_decay**k,
    excludes={"backbone_lr_mult": "both set the backbone's lr"},
)
DIFFERENTIAL_LR = Method(
    title="differential lr",
    knob="backbone_lr_mult",
    paper="the original write-up's lesson 1",
    words=lambda cfg: f"backbone lr x {cfg.backbone_lr_mult:g}",
    needs_backbone=True,
    lr_per_block=lambda cfg, k: cfg.backbone_lr_mult,
)
LINEAR_PROBE = Method(
    title="linear probe",
    knob="train_blocks",
    on=lambda cfg: cfg.train_blocks.strip() == "head",
    words=lambda cfg: "linear probe (the head alone trains)",
)
SURGICAL = Method(
    title="surgical",
    knob="train_blocks",
    paper="Lee et al. 2023",
    on=lambda cfg: cfg.train_blocks.strip() not in ("", "head"),
    words=lambda cfg: f"surgical: only {cfg.train_blocks} and the head train",
)
BN_ONLY = Method(
    title="BN-only",
    knob="train_params",
    paper="Frankle et al. 2021",
    on=lambda cfg: cfg.train_params == "norm",
    words=lambda cfg: "BN-only (norm and the head)",
    needs_backbone=True,
    trains=lambda cfg, model: norm_parameters(model),
)
BITFIT = Method(
    title="BitFit",
    knob="train_params",
    paper="Ben Zaken et al. 2022",
    on=lambda cfg: cfg.train_params == "bias",
    words=lambda cfg: "BitFit (bias and the head)",
    needs_backbone=True,
    trains=lambda cfg, model: bias_parameters(model),
)


# --- LoRA --------------------------------------------------------------------------------------------------------

LORA_KINDS = (nn.Conv2d, nn.Linear)  # the layers peft's LoRA adapts and merges (a grouped convolution it cannot merge)


def lora_candidates(model: nn.Module) -> list[str]:
    """The layers LoRA can adapt here, by dotted name: the backbone's linear layers and ungrouped convolutions. Not the
    output projection of an nn.MultiheadAttention (a torchvision ViT's): its forward reads that weight itself, past the
    adapter, which would train without changing anything."""
    head = head_name(model)
    attention = {name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, LORA_KINDS)
        and name != head
        and getattr(module, "groups", 1) == 1
        and name.rpartition(".")[0] not in attention
    ]


def lora_targets(cfg, model: nn.Module) -> list[str]:
    """The layers --lora-targets names: every adaptable layer inside the named blocks or stages (as --train-blocks
    names them) or a layer by its own name; by default those of the last two stages after the stem that hold any (a
    CNN's late convolutions, which transfer least as they are; a transformer's encoder blocks, which its stages hold
    in one stack, its final norm holding none)."""
    candidates = lora_candidates(model)

    def inside(name: str) -> list[str]:
        try:
            blocks = chosen_blocks(model, name)
        except UserError:
            blocks = set()
        return [c for c in candidates if c == name or any(c.startswith(b + ".") for b in blocks)]

    if not cfg.lora_targets.strip():
        names = [label for label, _ in stage_runs(model)[1:] if inside(label)][-2:]
    else:
        names = list(filter(None, re.split(r"[,\s]+", cfg.lora_targets)))
    chosen = []
    for name in names:
        found = inside(name)
        if not found:
            raise UserError(
                f"--lora-targets: {name!r} holds no layer LoRA can adapt in {type(model).__name__} (a linear layer or "
                f"an ungrouped convolution); name a stage ({', '.join(label for label, _ in stage_runs(model))}) or a "
                f"layer, e.g. {', '.join(candidates[-3:])}"
            )
        chosen += [c for c in found if c not in chosen]
    return chosen


def add_lora(cfg, model: nn.Module) -> None:
    """LoRA's low-rank adapters beside the target layers, through peft: W x + (alpha / r) B A x, with B zero at the
    start, so the network computes exactly what it did (Hu et al. 2021)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(cfg, model)
    widths = {target: lora_width(model.get_submodule(target)) for target in targets}
    too_narrow = next((t for t in targets if cfg.lora >= widths[t]), None)
    if too_narrow:
        raise UserError(
            f"--lora {cfg.lora} is no low rank for {too_narrow}, whose weight has rank {widths[too_narrow]} at most; "
            "choose a smaller rank or other --lora-targets"
        )
    config = LoraConfig(r=cfg.lora, lora_alpha=lora_alpha(cfg), target_modules=targets, lora_dropout=0.0)
    inject_adapter_in_model(config, model)


def lora_width(layer: nn.Module) -> int:
    """The largest rank a layer's weight can have."""
    if isinstance(layer, nn.Conv2d):
        return min(layer.out_channels, layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1])
    return min(layer.out_features, layer.in_features)


def lora_alpha(cfg) -> float:
    """--lora-alpha, or the rank (a scale alpha / r of 1, as Hu et al. set alpha to the first rank they tried)."""
    return cfg.lora_alpha or float(cfg.lora)


def lora_parameters(cfg, model: nn.Module) -> set[int]:
    return {id(p) for name, p in model.named_parameters() if ".lora_" in name}


def is_adapted(model: nn.Module) -> bool:
    """Whether the network carries LoRA's adapters (then checkpoints keep it merged, and last.pt also as it trains)."""
    return any(".lora_" in name for name, _ in model.named_parameters())


def merged(model: nn.Module) -> nn.Module:
    """A copy of a network with its adapters merged in (peft's merge: W + (alpha / r) B A): the plain network, with
    its keys. The network itself is left as it is."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            plain.set_submodule(name, module.get_base_layer())
    return plain


def merged_state(model: nn.Module) -> dict:
    """The state dict of a network with its adapters merged in, on the CPU: what best.pt holds and every tool loads."""
    return {key: value.detach().cpu() for key, value in merged(model).state_dict().items()}


def adapter_state(model: nn.Module) -> dict:
    """What LoRA trained, on the CPU: the adapters and the head (everything else is the start's)."""
    head = head_name(model) + "."
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if ".lora_" in k or k.startswith(head)}


LORA = Method(
    title="LoRA",
    knob="lora",
    paper="Hu et al. 2021",
    words=lambda cfg: f"LoRA rank {cfg.lora} (alpha {lora_alpha(cfg):g})",
    needs_pretrained=True,
    needs_backbone=True,
    trains=lora_parameters,
    keeps_statistics=True,
    adapt=add_lora,
    excludes={
        "train_params": "both decide which backbone parameters train",
        "l2sp": "do not go together: L2-SP pulls trained weights to their pretrained values, and LoRA's adapters have "
        "none",
    },
)


# --- L2-SP -------------------------------------------------------------------------------------------------------


class L2SP(Term):
    """L2-SP (Li, Grandvalet & Davoine 2018): alpha/2 x ||w - w0||^2 over the backbone's trained weights, w0 their
    values at the start: fine-tuning is pulled back to the start instead of to 0. One copy of the start's backbone
    stays on the device. Its gradient, alpha (w - w0), is written directly (`SquaredDistance`): a network has hundreds
    of weight tensors, and autograd through a subtract, square and sum for each costs more than the term."""

    name = "l2sp"

    def __init__(self, weight: float, pairs: list[tuple[nn.Parameter, torch.Tensor]]):
        super().__init__()
        self.weight = weight
        self.params, self.starts = [p for p, _ in pairs], [start for _, start in pairs]

    def forward(self, captured, images, targets):
        if not self.params:  # nothing of the backbone trains
            return torch.zeros(())
        return self.weight / 2 * SquaredDistance.apply(self.starts, *self.params)


class SquaredDistance(torch.autograd.Function):
    """||w - w0||^2 summed over lists of tensors, with its gradient 2 (w - w0): one autograd node for the whole
    list, computed with torch's multi-tensor (_foreach) kernels, the ones its optimizers use."""

    @staticmethod
    def forward(ctx, starts, *params):
        ctx.starts = starts
        ctx.save_for_backward(*params)
        differences = torch._foreach_sub(params, starts)
        return torch.stack(torch._foreach_norm(differences)).square().sum()

    @staticmethod
    def backward(ctx, grad_output):
        differences = torch._foreach_sub(ctx.saved_tensors, ctx.starts)
        torch._foreach_mul_(differences, 2 * grad_output)
        return None, *differences


def l2sp_term(setup: Setup) -> L2SP:
    model, start_params = setup.model, dict(setup.start.named_parameters())
    head = {id(p) for p in head_parameters(model)}
    pairs = [(p, start_params[n].detach()) for n, p in trained_parameters(setup.cfg, model) if id(p) not in head]
    return L2SP(setup.cfg.l2sp, pairs)


L2SP_METHOD = Method(
    title="L2-SP",
    knob="l2sp",
    paper="Li et al. 2018",
    needs_pretrained=True,
    needs_backbone=True,
    needs_start=True,
    replaces_decay=True,
    term=l2sp_term,
)


# --- DELTA -------------------------------------------------------------------------------------------------------

DELTA_ATTENTION_IMAGES = 320  # training images DELTA's channel attention is measured on (at least; a stratified draw)
DELTA_ATTENTION_PER_CLASS = 2  # ... and at least this many of every class
DELTA_ATTENTION_CHUNK = 64  # images per knock-out pass
DELTA_ATTENTION_COPIES = 16  # channels knocked out at once (copies of those images in one forward pass)


class Delta(Term):
    """DELTA (Li et al. 2019): alpha x the distance of the stages' feature maps to the start network's on the same
    images, each channel weighted by its attention (how much the start's loss rises without it):
    alpha/2 x mean over images of sum over stages and channels of C w_c ||F_c(x) - F0_c(x)||^2 / (H W).
    The Transfer-Learning-Library sums over its batch of 48 where this averages, and it regularises other maps (each
    ResNet stage's last conv3 before its BatchNorm, 4 maps; here every stage's output, the stem's included, 5 maps):
    its trade-off does not carry over (docs/explanation/methods.md)."""

    name = "delta"

    def __init__(self, weight: float, start: nn.Module, stage_modules: list[str], attention: list[torch.Tensor]):
        super().__init__()
        self.weight, self.stage_modules = weight, stage_modules
        self.start = start  # frozen, in eval mode: a module attribute, so it moves with the term
        self.attention = nn.ParameterList([nn.Parameter(a, requires_grad=False) for a in attention])
        self.start_capture = Capture(start, features=False, stage_modules=stage_modules)

    def forward(self, captured, images, targets):
        with torch.no_grad():
            self.start(images)
        total = 0.0
        for name, attention in zip(self.stage_modules, self.attention, strict=True):
            tuned, start = captured[name].float(), self.start_capture.outputs[name].float()
            channels = tuned.shape[1]
            distance = ((tuned - start) ** 2).flatten(2).mean(2)  # images x channels: ||F_c - F0_c||^2 / (H W)
            total = total + (channels * attention * distance).sum(1).mean() / 2
        return self.weight * total

    def train(self, mode: bool = True):
        super().train(mode)
        self.start.eval()  # the start's BatchNorm statistics stay those of the start
        return self

    def learned(self) -> dict:
        return {"attention": [a.detach().cpu() for a in self.attention]}


def attention_image_count(classes: int) -> int:
    """How many training images DELTA's attention is measured on: the Transfer-Learning-Library's 10 batches of 32,
    and at least DELTA_ATTENTION_PER_CLASS of every class where there are many classes (392 on Stanford Cars)."""
    return max(DELTA_ATTENTION_IMAGES, DELTA_ATTENTION_PER_CLASS * classes)


@torch.no_grad()
def channel_attention(model: nn.Module, stage_modules: list[str], batches) -> list[torch.Tensor]:
    """DELTA's attention, per stage: knock out each channel of the stage's output in turn and measure how much the
    loss of `model` (the start with a probe head) rises on the images of `batches` ((images, labels) on the device,
    in chunks of at most DELTA_ATTENTION_CHUNK), averaged over all of them; standardised and softmaxed with
    temperature 5 over the stage's channels, as the Transfer-Learning-Library does. Several channels are knocked out
    in one pass: the stage's output is repeated, one channel zeroed per copy."""
    model.eval()
    rise_sums: dict[str, torch.Tensor] = {}
    seen = 0
    for images, labels in batches:
        for chunk, chunk_labels in zip(
            images.split(DELTA_ATTENTION_CHUNK), labels.split(DELTA_ATTENTION_CHUNK), strict=True
        ):
            for name, rises in knockout_rises(model, stage_modules, chunk, chunk_labels).items():
                rise_sums[name] = rise_sums.get(name, 0) + rises * len(chunk)
            seen += len(chunk)
    attention = []
    for name in stage_modules:
        rises = rise_sums[name] / seen
        spread = rises.std()
        standard = (rises - rises.mean()) / spread if spread > 0 else torch.zeros_like(rises)
        attention.append(torch.softmax(standard / 5, dim=0))
    return attention


def knockout_rises(model: nn.Module, stage_modules: list[str], images, labels) -> dict[str, torch.Tensor]:
    """Per stage, the rise of the mean loss on these images when each channel of the stage's output is zeroed."""
    capture = Capture(model, features=False, stage_modules=stage_modules)  # the stages' widths
    try:
        base = F.cross_entropy(model(images), labels)
    finally:
        capture.remove()
    found = {}
    for name in stage_modules:
        if capture.outputs[name].ndim != 4:
            raise UserError(
                f"--delta regularises feature maps (images x channels x height x width), and the stage {name} of "
                f"{type(model).__name__} gives {capture.outputs[name].ndim}-d outputs (a transformer's tokens); use "
                "--l2sp or another method for this network"
            )
        channels = capture.outputs[name].shape[1]
        rises = torch.empty(channels)
        for first in range(0, channels, DELTA_ATTENTION_COPIES):
            knocked = list(range(first, min(first + DELTA_ATTENTION_COPIES, channels)))

            def knock_out(_, __, out, knocked=knocked):
                copies = out.repeat(len(knocked), *[1] * (out.ndim - 1))
                mask = torch.ones(len(knocked), out.shape[1], device=out.device, dtype=out.dtype)
                mask[torch.arange(len(knocked)), torch.tensor(knocked)] = 0
                mask = mask.repeat_interleave(len(out), 0).view(len(copies), out.shape[1], *[1] * (out.ndim - 2))
                return copies * mask

            handle = model.get_submodule(name).register_forward_hook(knock_out)
            try:
                losses = F.cross_entropy(model(images), labels.repeat(len(knocked)), reduction="none")
            finally:
                handle.remove()
            rises[first : first + len(knocked)] = losses.view(len(knocked), -1).mean(1).float().cpu() - base.cpu()
        found[name] = rises
    return found


def delta_term(setup: Setup) -> Delta:
    """The attention from last.pt on resume; else measured on a stratified draw of the training images (seeded by
    the run's seed), through the start with the probe as its head."""
    cfg, device = setup.cfg, setup.device
    stage_modules = [module for _, module in stages(setup.model)]
    attention = setup.learned.get("delta", {}).get("attention")
    if attention is None:
        reader = copy.deepcopy(setup.start)
        set_head(reader, setup.probe.weight, setup.probe.bias)
        classes = setup.model.get_submodule(head_name(setup.model)).out_features
        sample = setup.eval_loader(spread_sample(setup.train_split, attention_image_count(classes), cfg.seed))
        with device.autocast():
            attention = channel_attention(reader, stage_modules, device.batches(sample, description="DELTA attention"))
    return Delta(cfg.delta, setup.start.eval(), stage_modules, [a.to(device.type) for a in attention])


DELTA = Method(
    title="DELTA",
    knob="delta",
    paper="Li et al. 2019",
    needs_pretrained=True,
    needs_backbone=True,
    needs_start=True,
    needs_probe=True,
    needs_train_images=True,
    replaces_decay=True,
    term=delta_term,
)


# --- BSS ---------------------------------------------------------------------------------------------------------


class BSS(Term):
    """Batch Spectral Shrinkage (Chen et al. 2019): eta x the sum of the k smallest squared singular values of the
    batch's features (the head's input): the directions the target data barely spans, where negative transfer hides,
    are shrunk."""

    name = "bss"
    reads_features = True

    def __init__(self, weight: float, k: int):
        super().__init__()
        self.weight, self.k = weight, k

    def forward(self, captured, images, targets):
        singular = torch.linalg.svdvals(captured["features"].float())  # descending
        return self.weight * (singular[-self.k :] ** 2).sum()


def bss_term(setup: Setup) -> BSS:
    """k must be below the singular values a batch has: the features' width, and each process's share of a batch."""
    cfg, width = setup.cfg, setup.model.get_submodule(head_name(setup.model)).in_features
    share = cfg.batch_size // setup.world_size
    if cfg.bss_k >= min(width, share):
        raise UserError(
            f"--bss-k {cfg.bss_k} would shrink every singular value of a batch ({share} images of {width} features in "
            "each process), not the smallest few; choose a smaller --bss-k (the paper's is 1)"
        )
    return BSS(cfg.bss, cfg.bss_k)


BSS_METHOD = Method(
    title="BSS",
    knob="bss",
    paper="Chen et al. 2019",
    words=lambda cfg: f"BSS {cfg.bss:g} (k={cfg.bss_k})",
    needs_backbone=True,
    term=bss_term,
)


# --- Co-Tuning ---------------------------------------------------------------------------------------------------


class CoTuning(Term):
    """Co-Tuning (You et al. 2020): the start's own source-task head stays on top of the backbone and trains on the
    target images with soft source labels: p(source class | target class), learned before training from the start's
    predictions on the training images (the paper's direct form: their mean per target class). Adds
    lambda x cross-entropy(source head's logits, relation[label])."""

    name = "co_tuning"
    reads_features = True

    def __init__(self, weight: float, source_head: nn.Linear, relation: torch.Tensor):
        super().__init__()
        self.weight, self.source_head = weight, source_head
        self.relation = nn.Parameter(relation, requires_grad=False)  # target classes x source classes

    def forward(self, captured, images, targets):
        # hard labels pick a row; MixUp and CutMix's blended targets blend the rows
        soft = self.relation[targets] if targets.ndim == 1 else targets.float() @ self.relation
        logits = self.source_head(captured["features"].float())
        return self.weight * -(soft * F.log_softmax(logits, dim=1)).sum(1).mean()

    def param_groups(self, cfg) -> list[dict]:
        """The source head at the lr of the backbone's top (as the Transfer-Learning-Library trains it: it sits on the
        pretrained features, as the backbone's own head did) and the head's decay."""
        return [
            {
                "params": list(self.source_head.parameters()),
                "lr": base_lr(cfg) * lr_scale(cfg, 1),
                "weight_decay": cfg.weight_decay,
                "name": "co-tuning source head",
            }
        ]

    def learned(self) -> dict:
        return {"source_head": self.source_head.state_dict(), "relation": self.relation.detach().cpu()}


def source_head_of(cfg) -> tuple[nn.Module, nn.Linear]:
    """The start with its own head (ImageNet's 1000 classes, the demo source's 40), and a fresh Linear of that head's
    shape: Co-Tuning's source head."""
    try:
        own = build_with_own_head(cfg.arch, cfg.weights, resolution=cfg.resolution)
    except UserError as error:
        raise UserError(
            f"--co-tuning needs the start's source-task head, and {cfg.weights} has none ({str(error).split(';')[0]}); "
            "start from ImageNet weights, demo-pretrained ones, or a state-dict file that keeps its head"
        ) from None
    head = own.get_submodule(head_name(own))
    return own, nn.Linear(head.in_features, head.out_features).requires_grad_(True)


@torch.no_grad()
def source_relation(own: nn.Module, loader, device, num_classes: int) -> torch.Tensor:
    """p(source class | target class): the start's softmax over its own classes, averaged over each target class's
    training images (centre crops). Rows of a class without readable images are uniform."""
    own = device.place(own).eval()
    sums, counts = None, torch.zeros(num_classes)
    for images, labels in device.batches(loader, description="source relation"):
        with device.autocast():
            probabilities = torch.softmax(own(images).float(), dim=1).cpu()
        if sums is None:
            sums = torch.zeros(num_classes, probabilities.shape[1])
        sums.index_add_(0, labels.cpu(), probabilities)
        counts += torch.bincount(labels.cpu(), minlength=num_classes)
    relation = sums / counts.clamp(min=1)[:, None]
    relation[counts == 0] = 1 / sums.shape[1]
    return relation


def co_tuning_term(setup: Setup) -> CoTuning:
    """The source head and the relation from last.pt on resume; else the start's own head and the relation measured
    on the training images."""
    cfg, device = setup.cfg, setup.device
    own, source_head = source_head_of(cfg)
    saved = setup.learned.get("co_tuning")
    if saved:
        source_head.load_state_dict(saved["source_head"])
        relation = saved["relation"]
    else:
        source_head.load_state_dict(own.get_submodule(head_name(own)).state_dict())
        classes = setup.model.get_submodule(head_name(setup.model)).out_features
        relation = source_relation(own, setup.train_images, device, classes)
    return CoTuning(cfg.co_tuning, source_head.to(device.type), relation.to(device.type))


CO_TUNING = Method(
    title="Co-Tuning",
    knob="co_tuning",
    paper="You et al. 2020",
    needs_pretrained=True,
    needs_backbone=True,
    needs_train_images=True,
    one_process=True,
    term=co_tuning_term,
)


# --- the registry ------------------------------------------------------------------------------------------------

# every method, in the order train.log and the reports name them; the loss terms' order is metrics.csv's
REGISTRY = [
    ZERO_SHOT,
    PROTOTYPES,
    LP_FT,
    TWO_STAGES,
    LAYER_DECAY,
    DIFFERENTIAL_LR,
    LINEAR_PROBE,
    SURGICAL,
    BN_ONLY,
    BITFIT,
    LORA,
    L2SP_METHOD,
    DELTA,
    BSS_METHOD,
    CO_TUNING,
]


def active(cfg) -> list[Method]:
    """The methods a config uses, in the registry's order."""
    return [method for method in REGISTRY if method.is_on(cfg)]


def term_names(cfg) -> list[str]:
    """The extra loss terms of a run's method, as named in its metrics.csv (a term is named after its knob)."""
    return [method.knob for method in active(cfg) if method.term]


def needs_start(cfg) -> bool:
    """Whether the loss reads the start's weights all through training, so that a resumed run must find them again."""
    return any(method.needs_start for method in active(cfg))


def check(cfg) -> None:
    """What the declarations rule out, in one line each: two methods that decide one thing, a method that needs a
    start without one, and one that acts through the backbone when the head alone trains."""
    methods = active(cfg)
    for method in methods:
        for knob, why in method.excludes.items():
            if getattr(cfg, knob) != knob_default(cfg, knob):
                raise UserError(f"--{flag(method.knob)} and --{flag(knob)} {why}; use one of them")
    if cfg.weights.lower() == "none":
        first = next((m for m in methods if m.needs_pretrained), None)
        if first:
            raise UserError(
                f"--{flag(first.knob)} needs a pretrained start ({first.title} uses the start's weights), and "
                "--weights none starts from random weights; drop it or pass --weights"
            )
    if ZERO_SHOT in methods and not starts.has_text_tower(cfg.arch):
        raise UserError(
            f"--head zero-shot reads the class names with a text tower, and {cfg.arch} has none; start from a CLIP "
            "(open_clip:MODEL/PRETRAINED, e.g. open_clip:ViT-B-16/openai, or the demo's open_clip:demo-clip with "
            "--weights demo-pretrained), or use --head prototypes"
        )
    if LINEAR_PROBE in methods:
        first = next((m for m in methods if m.needs_backbone), None)
        if first:
            raise UserError(
                f"--train-blocks head trains the head alone, and --{flag(first.knob)} ({first.title}) acts through the "
                f"backbone: it would do nothing (the run would be a plain linear probe); drop --{flag(first.knob)}, or "
                "train backbone blocks too"
            )


def knob_default(cfg, knob: str):
    """The value of `knob` that leaves it off: its default in the config's class."""
    return next(f.default for f in dataclasses.fields(type(cfg)) if f.name == knob)


# --- a run's method, built -------------------------------------------------------------------------------------


def adapt(cfg, model: nn.Module) -> None:
    """The methods' changes to the network (LoRA's adapters), right after it is built: before it is placed, copied
    or loaded from a resumed run's last.pt."""
    for method in active(cfg):
        if method.adapt:
            method.adapt(cfg, model)


@dataclass
class Prepared:
    """What setup builds of a run's method."""

    objective: Objective
    start_head: dict | None  # the head a method wrote before training (weight, bias, kind): interpolate.py's alpha 0
    log: list[str]  # what train.log says of it


def prepare(
    cfg,
    model: nn.Module,
    *,
    train_split,
    class_names: list[str],
    eval_loader,
    device,
    learned: dict | None,
    world_size: int,
) -> Prepared:
    """A run's method, built once in setup on the network that trains (on its device, adapted): the frozen start
    copy, the training images and the probe the methods need, what they do before training, and the loss with their
    terms. On resume (`learned` is what last.pt kept of it) nothing is measured or done again."""
    methods = active(cfg)
    alone = next((m for m in methods if m.one_process), None)
    if alone and world_size > 1:
        raise UserError(
            f"--{flag(alone.knob)} ({alone.title}) runs in one process: its own parameters would not be averaged over "
            "torchrun's processes"
        )
    fresh = learned is None  # on resume, what was measured before training is in last.pt
    start = copy.deepcopy(model).eval().requires_grad_(False) if any(m.needs_start for m in methods) else None
    train_images = eval_loader(train_split) if fresh and any(m.needs_train_images for m in methods) else None
    probe = None
    if fresh and any(m.needs_probe for m in methods):
        probe = fit_probe_head(model, train_images, device, model.get_submodule(head_name(model)).out_features)
    setup = Setup(
        cfg=cfg,
        model=model,
        start=start,
        probe=probe,
        train_split=train_split,
        class_names=class_names,
        train_images=train_images,
        eval_loader=eval_loader,
        device=device,
        learned=learned or {},
        world_size=world_size,
    )
    if fresh:
        for method in methods:
            if method.begin:
                method.begin(setup)
    terms = [method.term(setup) for method in methods if method.term]
    total, trained = parameter_counts(cfg, model)
    log = [f"method: {describe(cfg)}; {trained:,} of {total:,} parameters train ({100 * trained / total:.2f} %)"]
    if probe:
        readers = [m.title for m in methods if m.needs_probe]
        log.append(
            f"linear probe on the start's features of {probe.images} training images: {probe.train_accuracy:.1f}% of "
            "them right"
            + ("" if probe.converged else " (not converged)")
            + ("; it is the head the fine-tune starts from (LP-FT)" if LP_FT in methods else f"; {readers[0]} reads it")
        )
    writer = next((m for m in methods if m.writes_head), None)
    start_head = None
    if fresh and writer:
        head = model.get_submodule(head_name(model))
        start_head = dict(weight=head.weight.detach().cpu().clone(), bias=head.bias.detach().cpu().clone())
        start_head["kind"] = writer.title
    return Prepared(Objective(model, label_smoothing=cfg.label_smoothing, terms=terms), start_head, log)


# --- in words ------------------------------------------------------------------------------------------------------


def describe(cfg) -> str:
    """The method in a few words, for train.log and eval.py's report: 'plain fine-tuning' when nothing is added."""
    parts = method_parts(cfg)
    if cfg.weights.lower() == "none":
        return "training from scratch" + (f": {', '.join(parts)}" if parts else "")
    return ", ".join(parts) if parts else "plain fine-tuning"


def method_parts(cfg) -> list[str]:
    """What a run adds to plain training, each in a few words (see describe)."""
    return [method.describe(cfg) for method in active(cfg)]


def start_words(cfg) -> str:
    """Where a run started: its --weights, or 'random'."""
    return "random" if cfg.weights.lower() == "none" else cfg.weights


def subset_words(cfg) -> str:
    """The training images a run used, in words: '' for all of them."""
    if cfg.train_per_class:
        return f"{cfg.train_per_class} training image{'s' if cfg.train_per_class > 1 else ''} per class"
    if cfg.train_fraction < 1:
        return f"{100 * cfg.train_fraction:g} % of each class's training images"
    return ""


def describe_with_subset(cfg) -> str:
    """`describe`, with the training subset when there was one: what a report says of a run's training."""
    subset = subset_words(cfg)
    return describe(cfg) + (f", on {subset} only (subset.csv)" if subset else "")
