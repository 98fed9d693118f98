"""The fine-tuning method in one place: the network's parts (its blocks, as the transfer lens names them, and the
backbone/head split), where it starts and how that start is recognised, what trains when, the parameter groups with
their lr and decay, and the extra loss terms.

train.py's setup builds an `Objective` once (`build_objective`); every step calls it. A new regulariser is a `Term`:
a name (its column in metrics.csv), a weight, and what it adds to the loss.

The methods (the papers compare them on fine-grained classification such as Stanford Cars):
- LP-FT, `--probe-init` (Kumar et al. 2022): fit the new head as a linear probe on the frozen start, then tune all.
- layer-wise lr decay, `--layer-decay D` (ULMFiT; BEiT and timm's `layer_decay`): block k below the head at lr x D^k.
- surgical fine-tuning, `--train-blocks` (Lee et al. 2023): only some blocks train.
- BN-only, `--train-params norm` (Frankle et al. 2021), and BitFit, `--train-params bias` (Ben Zaken et al. 2022).
- L2-SP, `--l2sp` (Li et al. 2018); DELTA, `--delta` (Li et al. 2019); BSS, `--bss` (Chen et al. 2019);
  Co-Tuning, `--co-tuning` (You et al. 2020).
"""

import copy
import dataclasses
import hashlib
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cars.config import Config, from_dict
from cars.errors import UserError
from cars.models import build_with_own_head, head_name

STEM = "stem"  # --train-blocks' name for the first stage, whatever the architecture calls it
DELTA_ATTENTION_IMAGES = 64  # training images DELTA's channel attention is measured on
DELTA_ATTENTION_COPIES = 16  # channels knocked out at once (copies of those images in one forward pass)


# --- the network's parts -----------------------------------------------------------------------------------------


def is_layer(module: nn.Module) -> bool:
    """A single layer (a convolution, a BatchNorm, ...): nothing inside it holds parameters of its own."""
    return not any(True for _ in module.children())


def blocks(model: nn.Module) -> list[str]:
    """The model's blocks in forward order, by dotted name: its top-level children, with every nn.Sequential of
    multi-layer blocks opened into them (ResNet's layer1 into layer1.0, layer1.1, ...; EfficientNet's features into
    its stem and its MBConv blocks). A Sequential of single layers (ShuffleNet's conv1: conv, BN, ReLU) stays one block.
    Blocks without parameters (pooling, ReLU) are left out."""

    def opened(name: str, module: nn.Module) -> list[str]:
        children = list(module.named_children())
        if isinstance(module, nn.Sequential) and any(not is_layer(child) for _, child in children):
            return [found for child_name, child in children for found in opened(f"{name}.{child_name}", child)]
        return [name] if any(True for _ in module.parameters()) else []

    return [found for name, child in model.named_children() for found in opened(name, child)]


def head_block(model: nn.Module) -> str:
    """The block that holds the classification head: `fc` for ResNets, `classifier` for EfficientNets."""
    head = head_name(model)
    return next(b for b in blocks(model) if head == b or head.startswith(b + "."))


def stage_runs(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(label, its blocks) for each stage before the head: a run of consecutive blocks with one parent, labelled by
    the parent when the run is all of it (ResNet's layer1.0-layer1.2 is layer1), else by joining the blocks' names
    (ResNet's stem, conv1 and bn1, is conv1+bn1; EfficientNet's is features.0)."""
    every = blocks(model)
    body = every[: every.index(head_block(model))]
    parent_of = {block: block.rpartition(".")[0] for block in body}
    runs: list[list[str]] = []
    for block in body:
        if runs and parent_of[runs[-1][0]] == parent_of[block]:
            runs[-1].append(block)
        else:
            runs.append([block])
    whole = {parent: sum(p == parent for p in parent_of.values()) for parent in parent_of.values()}
    return [
        (parent_of[run[0]] if parent_of[run[0]] and len(run) == whole[parent_of[run[0]]] else "+".join(run), run)
        for run in runs
    ]


def stages(model: nn.Module) -> list[tuple[str, str]]:
    """(label, module whose output is the stage's) for each stage before the head (see `stage_runs`)."""
    return [(label, run[-1]) for label, run in stage_runs(model)]


def block_of(name: str, block_names: list[str]) -> str:
    """The block a parameter (or buffer, or module) of this dotted name belongs to."""
    return next(b for b in block_names if name == b or name.startswith(b + "."))


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_submodule(head_name(model)).parameters())


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    head = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head]


def start_fingerprint(model: nn.Module) -> str:
    """A digest of a network's starting weights: every tensor of its state dict but the head's (a head made fresh for
    the target is random, and not part of what was transferred). Two starts with the same fingerprint are the same
    weights, whatever file or name they came from."""
    digest = hashlib.sha256()
    head = head_name(model) + "."
    for key, tensor in sorted(model.state_dict().items()):
        if key.startswith(head):
            continue
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# --- what trains when --------------------------------------------------------------------------------------------


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


NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def kind_trains(cfg, model: nn.Module) -> set[int]:
    """The ids of the parameters --train-params lets train: all of them, the normalisation layers' (BN-only) or the
    biases (BitFit); the head's always."""
    if cfg.train_params == "all":
        return {id(p) for p in model.parameters()}
    chosen = norm_parameters(model) if cfg.train_params == "norm" else bias_parameters(model)
    return chosen | {id(p) for p in head_parameters(model)}


def norm_parameters(model: nn.Module) -> set[int]:
    """The ids of the normalisation layers' scales and shifts."""
    return {id(p) for module in model.modules() if isinstance(module, NORMS) for p in module.parameters(False)}


def bias_parameters(model: nn.Module) -> set[int]:
    """The ids of every bias."""
    return {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}


def trained_parameters(cfg, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that ever train, by name, in the model's order. The rest keep their starting values: they get no
    gradient and are not given to the optimizer (so no weight decay or momentum can move them either)."""
    frozen, kinds, names = frozen_blocks(cfg, model), kind_trains(cfg, model), blocks(model)
    return [(name, p) for name, p in model.named_parameters() if id(p) in kinds and block_of(name, names) not in frozen]


def set_trainable(cfg, model: nn.Module, *, backbone_frozen: bool = False) -> None:
    """What trains now. Call it after model.train(). Parameters that never train (surgical, BN-only, BitFit) get no
    gradient; with `backbone_frozen` (--freeze-epochs' first epochs) the whole backbone gets none. A frozen block's
    BatchNorm layers go into eval mode: they keep their statistics. (BN-only and BitFit keep estimating them: the
    normalisation is what they tune.) Dropout works as in any training step."""
    trained = {id(p) for _, p in trained_parameters(cfg, model)}
    head = head_block(model)
    frozen = set(blocks(model)) - {head} if backbone_frozen else frozen_blocks(cfg, model)
    head_ids = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained and (id(p) in head_ids or not backbone_frozen))
    names = blocks(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and name and block_of(name, names) in frozen:
            module.eval()


# --- parameter groups --------------------------------------------------------------------------------------------


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


def param_groups(cfg, model: nn.Module, *, extra: list[dict] = ()) -> list[dict]:
    """The optimizer's parameter groups, each with its name, lr and weight decay, only of parameters that train:
    - the backbone and the head (--backbone-lr-mult scales the backbone's lr), or with --layer-decay one group per
      block, lr x D^k k blocks below the head;
    - with --norm-weight-decay each split in two, the normalisation weights and biases with their own decay;
    - L2-SP and DELTA replace the backbone's weight decay (they pull it to its start instead of to 0), as in the
      papers: the head keeps the ordinary decay.
    `extra` groups (Co-Tuning's source head) come before the head's, which comes last: the recipe reads the lr there.
    """
    lr, trained, names, head = base_lr(cfg), trained_parameters(cfg, model), blocks(model), head_block(model)
    pulled_to_start = bool(cfg.l2sp or cfg.delta)  # then the backbone has no decay towards 0
    depth = depth_below_head(model)

    def group_of(name: str) -> str:
        block = block_of(name, names)
        return "head" if block == head else block if cfg.layer_decay != 1 else "backbone"

    def scale(key: str) -> float:
        if key == "head":
            return 1.0
        return cfg.backbone_lr_mult if key == "backbone" else cfg.layer_decay ** depth[key]

    groups = []
    for key in dict.fromkeys(group_of(n) for n, _ in trained):  # in the model's order
        decay = 0.0 if pulled_to_start and key != "head" else cfg.weight_decay
        params = [p for n, p in trained if group_of(n) == key]
        groups.append({"params": params, "lr": lr * scale(key), "weight_decay": decay, "name": key})
    if cfg.norm_weight_decay >= 0:
        undecayed_ids, split = undecayed(model), []
        for group in groups:
            norm_decay = 0.0 if pulled_to_start and group["name"] != "head" else cfg.norm_weight_decay
            split.append({**group, "params": [p for p in group["params"] if id(p) not in undecayed_ids]})
            split.append(
                {
                    **group,
                    "params": [p for p in group["params"] if id(p) in undecayed_ids],
                    "name": f"{group['name']} norm and bias",
                    "weight_decay": norm_decay,
                }
            )
        groups = [group for group in split if group["params"]]
    heads = [g for g in groups if g["name"].startswith("head")]
    return [g for g in groups if not g["name"].startswith("head")] + list(extra) + heads


def undecayed(model: nn.Module) -> set[int]:
    """The ids of the normalisation layers' weights and of every bias: what --norm-weight-decay decays. Decay pulls
    a weight towards 0; a BatchNorm scale or a bias is not a weight that overfits by growing, and shrinking it only
    fights the normalisation (torchvision's and timm's recipes leave them undecayed)."""
    return norm_parameters(model) | bias_parameters(model)


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


# --- features of the start ---------------------------------------------------------------------------------------


@contextmanager
def kept_head_inputs(model: nn.Module):
    """A list that every forward pass of `model` adds the head's input (the pooled features) to, on the CPU, while the
    block lasts: the features of a pass that computes something else too (eval.py's scores)."""
    kept = []
    handle = model.get_submodule(head_name(model)).register_forward_pre_hook(
        lambda _, inputs: kept.append(inputs[0].detach().float().cpu())
    )
    try:
        yield kept
    finally:
        handle.remove()


@torch.no_grad()
def head_inputs(model: nn.Module, loader, device, *, description: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head reads (the pooled features) for every image of the loader, and the labels, on the CPU."""
    model.eval()
    labels = []
    with kept_head_inputs(model) as features:
        for batch in tqdm(loader, desc=description, leave=False, dynamic_ncols=True, disable=not device.show_progress):
            if batch is None:
                continue
            images, batch_labels = device.put(*batch)
            with device.autocast():
                model(images)
            labels.append(batch_labels.cpu())
    return torch.cat(features), torch.cat(labels)


def fit_logistic_regression(features, labels, *, max_iter: int = 1000, per_feature: bool = True):
    """Multinomial logistic regression (L-BFGS, scikit-learn's default L2 strength C=1) on standardised features,
    fitted to convergence or `max_iter`: each feature scaled to unit variance, or with `per_feature=False` all of them
    by one number (the features' mean standard deviation), which keeps a nearly constant feature from getting a huge
    weight. Returns the fitted pipeline and whether it converged."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    features = np.asarray(features, dtype=np.float64)
    if per_feature:
        scaler = StandardScaler()
    else:
        mean, spread = features.mean(0), float(features.std(0).mean()) or 1.0
        scaler = FunctionTransformer(lambda x: (x - mean) / spread)
        scaler.mean_, scaler.scale_ = mean, np.full(features.shape[1], spread)
    classifier = make_pipeline(scaler, LogisticRegression(max_iter=max_iter))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        classifier.fit(features, np.asarray(labels))
    return classifier, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


@dataclass
class ProbeHead:
    """A linear probe folded into a head's weight and bias: W x + b = coef ((x - mean) / scale) + intercept."""

    weight: torch.Tensor
    bias: torch.Tensor
    train_accuracy: float  # percent, on the images it was fitted on
    converged: bool
    images: int


def fit_probe_head(model: nn.Module, loader, device, num_classes: int) -> ProbeHead:
    """LP-FT's first stage: a logistic-regression probe on the start's frozen features of the training images (centre
    crops, as evaluated), folded into the head's weight and bias. Every class must appear in the images."""
    features, labels = head_inputs(model, loader, device, description="probe features")
    classes = sorted(set(labels.tolist()))
    if classes != list(range(num_classes)):
        raise UserError(
            f"the linear probe needs training images of every class; {num_classes - len(classes)} of {num_classes} "
            "classes have none readable"
        )
    # one scale for all features: per-feature standardising would give a nearly constant feature a weight large enough
    # to blow the logits up as soon as fine-tuning moves it
    classifier, converged = fit_logistic_regression(features.numpy(), labels.numpy(), per_feature=False)
    scaler, regression = classifier[0], classifier[-1]
    coef = torch.from_numpy(regression.coef_).float()
    scale = torch.from_numpy(scaler.scale_).float()
    mean = torch.from_numpy(scaler.mean_).float()
    weight = coef / scale
    bias = torch.from_numpy(regression.intercept_).float() - weight @ mean
    accuracy = 100 * float((classifier.predict(features.numpy()) == labels.numpy()).mean())
    return ProbeHead(weight, bias, accuracy, converged, len(labels))


def set_head(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    head = model.get_submodule(head_name(model))
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)


# --- the loss ----------------------------------------------------------------------------------------------------


class Capture:
    """What a network's forward pass leaves behind for the loss terms: the head's input (the features), and the
    outputs of the stages DELTA compares. Hooks fill it on every forward pass."""

    def __init__(self, model: nn.Module, *, features: bool, stage_modules: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        if features:
            self.handles.append(
                model.get_submodule(head_name(model)).register_forward_pre_hook(
                    lambda _, inputs: self.outputs.__setitem__("features", inputs[0])
                )
            )
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
    """An extra loss term: `name` is its column in metrics.csv, `weight` its coefficient. `forward` returns the
    weighted term for a batch, given what the trained network's forward pass captured."""

    name: str
    weight: float


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


class Delta(Term):
    """DELTA (Li et al. 2019): alpha x the distance of the stages' feature maps to the start network's on the same
    images, each channel weighted by its attention (how much the start's loss rises without it):
    alpha/2 x mean over images of sum over stages and channels of C w_c ||F_c(x) - F0_c(x)||^2 / (H W).
    (The Transfer-Learning-Library sums over its batch of 48 where this averages: its 0.01 is 0.48 here.)"""

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
        for name, attention in zip(self.stage_modules, self.attention):
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


class BSS(Term):
    """Batch Spectral Shrinkage (Chen et al. 2019): eta x the sum of the k smallest squared singular values of the
    batch's features (the head's input): the directions the target data barely spans, where negative transfer hides,
    are shrunk."""

    name = "bss"

    def __init__(self, weight: float, k: int):
        super().__init__()
        self.weight, self.k = weight, k

    def forward(self, captured, images, targets):
        singular = torch.linalg.svdvals(captured["features"].float())  # descending
        return self.weight * (singular[-self.k :] ** 2).sum()


class CoTuning(Term):
    """Co-Tuning (You et al. 2020): the start's own source-task head stays on top of the backbone and trains on the
    target images with soft source labels: p(source class | target class), learned before training from the start's
    predictions on the training images (the paper's direct form: their mean per target class). Adds
    lambda x cross-entropy(source head's logits, relation[label])."""

    name = "co_tuning"

    def __init__(self, weight: float, source_head: nn.Linear, relation: torch.Tensor):
        super().__init__()
        self.weight, self.source_head = weight, source_head
        self.relation = nn.Parameter(relation, requires_grad=False)  # target classes x source classes

    def forward(self, captured, images, targets):
        # hard labels pick a row; MixUp and CutMix's blended targets blend the rows
        soft = self.relation[targets] if targets.ndim == 1 else targets.float() @ self.relation
        logits = self.source_head(captured["features"].float())
        return self.weight * -(soft * F.log_softmax(logits, dim=1)).sum(1).mean()

    def learned(self) -> dict:
        return {"source_head": self.source_head.state_dict(), "relation": self.relation.detach().cpu()}


class Objective(nn.Module):
    """The training loss: cross-entropy (with --label-smoothing) plus the method's terms. Called under autocast by
    the step; returns the loss to minimise, the cross-entropy alone (the train_loss of metrics.csv, comparable across
    methods), the logits, and each term's value."""

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0, terms: list[Term] = ()):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.terms = nn.ModuleList(terms)
        stage_modules = sorted({name for term in terms for name in getattr(term, "stage_modules", [])})
        needs_features = any(isinstance(term, BSS | CoTuning) for term in terms)
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
        """The optimizer's groups of the terms' own parameters: Co-Tuning's source head, at the head's lr and decay."""
        return [
            {
                "params": list(term.source_head.parameters()),
                "lr": base_lr(cfg),
                "weight_decay": cfg.weight_decay,
                "name": "co-tuning source head",
            }
            for term in self.terms
            if isinstance(term, CoTuning)
        ]

    def learned(self) -> dict:
        """What last.pt keeps of the method, by term: the parts learned before training (DELTA's attention, Co-Tuning's
        relation) and during it (Co-Tuning's source head). The start's weights are not kept: a resumed run rebuilds
        them from --weights and checks them against the recorded fingerprint."""
        return {term.name: term.learned() for term in self.terms if hasattr(term, "learned")}


def plain_objective(label_smoothing: float = 0.0) -> Objective:
    """Cross-entropy alone: plain fine-tuning (and lr_find's steps)."""
    return Objective(nn.Identity(), label_smoothing=label_smoothing)


# --- building the method -----------------------------------------------------------------------------------------


@torch.no_grad()
def channel_attention(model: nn.Module, stage_modules: list[str], images, labels) -> list[torch.Tensor]:
    """DELTA's attention, per stage: knock out each channel of the stage's output in turn and measure how much the
    loss of `model` (the start with a probe head) rises on these images; standardised and softmaxed with temperature
    5 over the stage's channels, as the Transfer-Learning-Library does. Several channels are knocked out in one pass:
    the stage's output is repeated, one channel zeroed per copy."""
    model.eval()
    capture = Capture(model, features=False, stage_modules=stage_modules)  # the stages' widths
    try:
        base = F.cross_entropy(model(images), labels)
    finally:
        capture.remove()
    attention = []
    for name in stage_modules:
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
            rises[first : first + len(knocked)] = losses.view(len(knocked), -1).mean(1).cpu() - base.cpu()
        spread = rises.std()
        standard = (rises - rises.mean()) / spread if spread > 0 else torch.zeros_like(rises)
        attention.append(torch.softmax(standard / 5, dim=0))
    return attention


TERM_KNOBS = ("l2sp", "delta", "bss", "co_tuning")  # the knobs that add a loss term, in the Objective's order


def term_names(cfg) -> list[str]:
    """The extra loss terms of a run's method, as named in its metrics.csv."""
    return [name for name in TERM_KNOBS if getattr(cfg, name)]


def needs_start(cfg) -> bool:
    """Whether the loss reads the start's weights all through training (L2-SP, DELTA), so that a resumed run must
    find them again."""
    return bool(cfg.l2sp or cfg.delta)


def source_head_of(cfg) -> tuple[nn.Module, nn.Linear]:
    """The start with its own head (ImageNet's 1000 classes, the demo source's 40), and a fresh Linear of that head's
    shape: Co-Tuning's source head."""
    try:
        own = build_with_own_head(cfg.arch, cfg.weights)
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
    for batch in tqdm(
        loader, desc="source relation", leave=False, dynamic_ncols=True, disable=not device.show_progress
    ):
        if batch is None:
            continue
        images, labels = device.put(*batch)
        with device.autocast():
            probabilities = torch.softmax(own(images).float(), dim=1).cpu()
        if sums is None:
            sums = torch.zeros(num_classes, probabilities.shape[1])
        sums.index_add_(0, labels.cpu(), probabilities)
        counts += torch.bincount(labels.cpu(), minlength=num_classes)
    relation = sums / counts.clamp(min=1)[:, None]
    relation[counts == 0] = 1 / sums.shape[1]
    return relation


def first_images(loader, device, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` readable images of a loader, on the device, with their labels."""
    images, labels = [], []
    for batch in loader:
        if batch is None:
            continue
        images.append(batch[0])
        labels.append(batch[1])
        if sum(len(i) for i in images) >= count:
            break
    return device.put(torch.cat(images)[:count], torch.cat(labels)[:count])


def build_objective(
    cfg, model: nn.Module, *, start: nn.Module | None, probe: ProbeHead | None, train_images, device, learned: dict
) -> Objective:
    """The run's loss, built once in setup. `model` is the network that trains (on its device), `start` a frozen copy
    of where it started (on the device; needed by L2-SP and DELTA), `probe` the linear probe on the start (DELTA's
    attention reads the start through it), `train_images` the training split as evaluated (centre crops), `learned`
    what a resumed run's last.pt kept of the method (nothing is measured again then)."""
    terms: list[Term] = []
    if cfg.l2sp:
        head, start_params = {id(p) for p in head_parameters(model)}, dict(start.named_parameters())
        pairs = [(p, start_params[n].detach()) for n, p in trained_parameters(cfg, model) if id(p) not in head]
        terms.append(L2SP(cfg.l2sp, pairs))
    if cfg.delta:
        stage_modules = [module for _, module in stages(model)]
        attention = learned.get("delta", {}).get("attention")
        if attention is None:
            reader = copy.deepcopy(start)
            set_head(reader, probe.weight, probe.bias)
            images, labels = first_images(train_images, device, DELTA_ATTENTION_IMAGES)
            with device.autocast():
                attention = channel_attention(reader, stage_modules, images, labels)
        terms.append(Delta(cfg.delta, start.eval(), stage_modules, [a.to(device.type) for a in attention]))
    if cfg.bss:
        terms.append(BSS(cfg.bss, cfg.bss_k))
    if cfg.co_tuning:
        saved = learned.get("co_tuning")
        own, source_head = source_head_of(cfg)
        if saved:
            source_head.load_state_dict(saved["source_head"])
            relation = saved["relation"]
        else:
            source_head.load_state_dict(own.get_submodule(head_name(own)).state_dict())
            relation = source_relation(own, train_images, device, model.get_submodule(head_name(model)).out_features)
        terms.append(CoTuning(cfg.co_tuning, source_head.to(device.type), relation.to(device.type)))
    return Objective(model, label_smoothing=cfg.label_smoothing, terms=terms)


def check_start(start: nn.Module, *, recorded: str | None, weights: str, run_dir) -> str:
    """A resumed run whose loss reads its start (L2-SP, DELTA) must find the very weights it started from."""
    found = start_fingerprint(start)
    if recorded and found != recorded:
        raise UserError(
            f"{run_dir} started from other weights than --weights {weights} gives now (fingerprint {recorded}, found "
            f"{found}), and its loss pulls towards that start; put the original weights back where {weights} is read "
            "from, or start a new run"
        )
    return found


def describe(cfg) -> str:
    """The method in a few words, for train.log and eval.py's report: 'plain fine-tuning' when nothing is added."""
    parts = method_parts(cfg)
    if cfg.weights.lower() == "none":
        return "training from scratch" + (f": {', '.join(parts)}" if parts else "")
    return ", ".join(parts) if parts else "plain fine-tuning"


def start_words(cfg) -> str:
    """Where a run started: its --weights, or 'random'."""
    return "random" if cfg.weights.lower() == "none" else cfg.weights


def method_parts(cfg) -> list[str]:
    """What a run adds to plain training, each in a few words (see describe)."""
    parts = []
    if cfg.probe_init:
        parts.append("LP-FT (linear-probe head first)")
    if cfg.freeze_epochs:
        parts.append(f"head only for {cfg.freeze_epochs} epoch{'s' if cfg.freeze_epochs > 1 else ''}")
    if cfg.layer_decay != 1:
        parts.append(f"layer-wise lr decay {cfg.layer_decay:g}")
    if cfg.backbone_lr_mult != 1:
        parts.append(f"backbone lr x {cfg.backbone_lr_mult:g}")
    if cfg.train_blocks.strip() == "head":
        parts.append("linear probe (the head alone trains)")
    elif cfg.train_blocks.strip():
        parts.append(f"surgical: only {cfg.train_blocks} and the head train")
    if cfg.train_params != "all":
        parts.append({"norm": "BN-only", "bias": "BitFit"}[cfg.train_params] + f" ({cfg.train_params} and the head)")
    for name, what in zip(TERM_KNOBS, ("L2-SP", "DELTA", "BSS", "Co-Tuning")):
        if getattr(cfg, name):
            parts.append(f"{what} {getattr(cfg, name):g}" + (f" (k={cfg.bss_k})" if name == "bss" else ""))
    return parts


def subset_words(cfg) -> str:
    """The training images a run used, in words: '' for all of them."""
    if cfg.train_per_class:
        return f"{cfg.train_per_class} training images per class"
    if cfg.train_fraction < 1:
        return f"{100 * cfg.train_fraction:g} % of each class's training images"
    return ""


def describe_saved(config: dict) -> str | None:
    """`describe` of a checkpoint's saved config, with the training subset when there was one; None when it is not a
    whole config of this version."""
    try:
        cfg = dataclasses.replace(Config(), **from_dict(config, "the checkpoint's config"))
    except (UserError, TypeError):
        return None
    subset = subset_words(cfg)
    return describe(cfg) + (f", on {subset} only (subset.csv)" if subset else "")
