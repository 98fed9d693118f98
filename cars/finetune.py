"""The network as fine-tuning sees it: its parts (its blocks, as the transfer lens and --train-blocks name them, and
the backbone/head split), where it starts and how that start is recognised, and the linear probe on the start's
features (LP-FT's head, DELTA's reader, the lens's probes). The methods themselves are in cars/methods.py.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cars.checkpoint import state_fingerprint
from cars.errors import UserError
from cars.models import head_name, kept_head_inputs
from cars.starts import LibraryNetwork

STEM = "stem"  # --train-blocks' name for the first stage, whatever the architecture calls it
ONE_THREAD_FITS = 1e9  # images x features x classes below which a logistic regression is fitted on one BLAS thread


# --- the network's parts -----------------------------------------------------------------------------------------


def is_layer(module: nn.Module) -> bool:
    """A single layer (a convolution, a BatchNorm, ...): nothing inside it holds parameters of its own."""
    return not any(True for _ in module.children())


def blocks(model: nn.Module) -> list[str]:
    """The model's blocks in forward order, by dotted name: its top-level children, opened where they hold a stack of
    blocks: an nn.Sequential of multi-layer blocks (ResNet's layer1 into layer1.0, layer1.1, ...; EfficientNet's
    features into its stem and its MBConv blocks), and any module holding a stack of repeated blocks (a
    torchvision ViT's encoder into its 12 encoder layers and its final norm). A Sequential of single layers
    (ShuffleNet's conv1: conv, BN, ReLU) stays one block. Blocks without parameters (pooling, ReLU) are left out."""

    def opened(name: str, module: nn.Module, *, in_stack: bool = False) -> list[str]:
        children = list(module.named_children())
        is_stack = isinstance(module, nn.Sequential | nn.ModuleList)
        # a block of a stack (an MBConv, whose layers may repeat) is one block, whatever it holds
        holds_stack = not in_stack and any(repeated_blocks(child) for _, child in children)
        if (is_stack and any(not is_layer(child) for _, child in children)) or holds_stack:
            return [
                found
                for child_name, child in children
                for found in opened(f"{name}.{child_name}", child, in_stack=is_stack)
            ]
        return [name] if any(True for _ in module.parameters()) else []

    return [found for name, child in parts(model) for found in opened(name, child)]


def parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's top-level parts by dotted name: its children; for a timm or open_clip start, its library network's
    children (`body.blocks`, ...) and its head, since the library's network is the model."""
    if isinstance(model, LibraryNetwork):
        return [*((f"body.{name}", child) for name, child in model.body.named_children()), ("fc", model.fc)]
    return list(model.named_children())


def repeated_blocks(module: nn.Module) -> bool:
    """A stack of two or more multi-layer blocks of one kind: ResNet's Bottlenecks, a ViT's encoder layers."""
    children = list(module.children())
    return (
        isinstance(module, nn.Sequential | nn.ModuleList)
        and len(children) > 1
        and len({type(child) for child in children}) == 1
        and not is_layer(children[0])
    )


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
    # every block under a parent, nested ones included (a ViT's encoder holds its layers and its final norm)
    whole = {parent: sum(b.startswith(parent + ".") for b in body) for parent in parent_of.values()}
    return [
        (parent_of[run[0]] if parent_of[run[0]] and len(run) == whole[parent_of[run[0]]] else "+".join(run), run)
        for run in runs
    ]


def stages(model: nn.Module) -> list[tuple[str, str]]:
    """(label, module whose output is the stage's) for each stage before the head (see `stage_runs`)."""
    return [(label, run[-1]) for label, run in stage_runs(model)]


def block_of(name: str, block_names: list[str]) -> str:
    """The block a parameter (or buffer, or module) of this dotted name belongs to. What no block holds (a ViT's class
    token and position embeddings, held by the model or its encoder itself) counts with the first block, the stem, as
    timm's layer decay counts it."""
    return next((b for b in block_names if name == b or name.startswith(b + ".")), block_names[0])


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_submodule(head_name(model)).parameters())


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    head = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head]


def start_fingerprint(model: nn.Module) -> str:
    """A digest of a network's starting weights: every tensor of its state dict but the head's (a head made fresh for
    the target is random, and not part of what was transferred)."""
    return state_fingerprint(model.state_dict(), leave_out=head_name(model) + ".")


# --- features of the start ---------------------------------------------------------------------------------------


@torch.no_grad()
def head_inputs(model: nn.Module, loader, device, *, description: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head reads (the pooled features) for every image of the loader, and the labels, on the CPU."""
    model.eval()
    labels = []
    with kept_head_inputs(model) as features:
        for images, batch_labels in device.batches(loader, description=description):
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
    from threadpoolctl import threadpool_limits

    features = np.asarray(features, dtype=np.float64)
    if per_feature:
        scaler = StandardScaler()
    else:
        mean, spread = features.mean(0), float(features.std(0).mean()) or 1.0
        scaler = FunctionTransformer(lambda x: (x - mean) / spread)
        scaler.mean_, scaler.scale_ = mean, np.full(features.shape[1], spread)
    classifier = make_pipeline(scaler, LogisticRegression(max_iter=max_iter))
    size = features.shape[0] * features.shape[1] * len(np.unique(labels))
    # small fits on one BLAS thread: OpenBLAS's threads cost more than they bring below about 1e9 multiply-adds an
    # iteration, and on a busy machine their spinning made a fit 7-30x slower (docs/benchmarks.md)
    with (
        threadpool_limits(1 if size < ONE_THREAD_FITS else None, user_api="blas"),
        warnings.catch_warnings(record=True) as caught,
    ):
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


def prototype_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest class mean written as a linear layer (weight, bias): logit_c = -|x - m_c|^2 / (2 s^2) up to a term
    every class shares, = (x . m_c - |m_c|^2 / 2) / s^2, with m_c the mean of class c's features. The largest logit is
    the nearest mean. s^2, a temperature, is the images' mean squared distance to their own class's mean: a typical
    image is one unit from its class, whatever the features' scale and number. With one image per class there is no
    distance within a class: s^2 is then the images' mean squared distance to their overall mean."""
    present = torch.bincount(labels, minlength=num_classes)
    if (present == 0).any():
        raise UserError(
            f"the prototypes head needs training images of every class; {int((present == 0).sum())} of {num_classes} "
            "classes have none readable"
        )
    # float64 sums on the host, in NumPy: no float64 tensor (a Mac's MPS has none)
    x, y = features.detach().cpu().numpy().astype(np.float64), labels.cpu().numpy()
    means = np.zeros((num_classes, x.shape[1]))
    np.add.at(means, y, x)
    means /= present.cpu().numpy()[:, None]
    spread = x - means[y] if len(y) > num_classes else x - x.mean(0)
    variance = max(float((spread**2).sum(1).mean()), 1e-12)
    weight, bias = means / variance, -(means**2).sum(1) / (2 * variance)
    return torch.from_numpy(weight.astype(np.float32)), torch.from_numpy(bias.astype(np.float32))


def set_head(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    head = model.get_submodule(head_name(model))
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)


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
