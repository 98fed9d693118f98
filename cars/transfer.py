"""What fine-tuning changed inside a network: how far each block's weights and each BatchNorm's statistics moved,
how similar the fine-tuned features stay to the starting ones (linear CKA), and how well a linear classifier on the
starting network's frozen features does (a linear probe).

Kornblith et al. 2019 (CKA; fixed features vs fine-tuning), Nguyen, Raghu & Kornblith 2021 (minibatch CKA),
Neyshabur et al. 2020 and Raghu et al. 2019 (which layers move when a pretrained network is fine-tuned).
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cars.checkpoint import read_state_dict
from cars.finetune import block_of, blocks, fit_logistic_regression, head_block, start_fingerprint
from cars.models import build_model, head_fits, resolve_weights

# --- weights -----------------------------------------------------------------------------------------------------


def host(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a float64 NumPy array on the host, for sums that must not lose digits. The cast to float64 happens
    in NumPy: Apple's MPS has no float64, so no float64 tensor is ever made on the device (or anywhere)."""
    on_host = tensor.detach().cpu()
    return (on_host if on_host.dtype == torch.float64 else on_host.float()).numpy().astype(np.float64)


def weight_change(start: nn.Module, tuned: nn.Module, *, head_is_new: bool) -> list[dict]:
    """Per block: ||W - W0|| / ||W0|| over all of the block's parameters (weights and biases; buffers are not
    parameters). The head's row has no value when the head is new: it has no starting value to move from."""
    start_params, tuned_params = dict(start.named_parameters()), dict(tuned.named_parameters())
    head, names_of_blocks = head_block(tuned), blocks(tuned)
    rows = []
    for block in names_of_blocks:
        names = [n for n in tuned_params if block_of(n, names_of_blocks) == block]
        count = sum(tuned_params[n].numel() for n in names)
        if block == head and head_is_new:
            rows.append(dict(layer=block, parameters=count, relative_change="", start="new"))
            continue
        moved = sum(float(((host(tuned_params[n]) - host(start_params[n])) ** 2).sum()) for n in names)
        size = sum(float((host(start_params[n]) ** 2).sum()) for n in names)
        rows.append(
            dict(
                layer=block,
                parameters=count,
                relative_change=(moved / size) ** 0.5 if size else 0.0,
                start="pretrained",
            )
        )
    return rows


def change_ranks(start: nn.Module, tuned: nn.Module, layers: list[str]) -> dict[str, int]:
    """Per layer, the numerical rank of its weight change W - W0 (out x everything else, as LoRA's B A is): the
    singular values above 1e-4 of the largest (in float64, on the host). A layer that did not move has rank 0."""
    ranks = {}
    for layer in layers:
        change = host(tuned.get_submodule(layer).weight) - host(start.get_submodule(layer).weight)
        singular = np.linalg.svd(change.reshape(len(change), -1), compute_uv=False)
        ranks[layer] = int((singular > 1e-4 * singular[0]).sum()) if singular[0] > 0 else 0
    return ranks


def bn_drift(start: nn.Module, tuned: nn.Module) -> list[dict]:
    """Per BatchNorm layer, how far its running statistics moved in units of the starting standard deviation
    sigma0 = sqrt(var0 + eps), averaged over channels: |mu - mu0| / sigma0 and |sigma - sigma0| / sigma0."""
    start_modules = dict(start.named_modules())
    rows = []
    for name, module in tuned.named_modules():
        if not isinstance(module, nn.modules.batchnorm._NormBase) or module.running_mean is None:
            continue
        before = start_modules[name]
        sigma0 = np.sqrt(host(before.running_var) + before.eps)
        sigma = np.sqrt(host(module.running_var) + module.eps)
        rows.append(
            dict(
                layer=name,
                channels=module.num_features,
                mean_shift=float((np.abs(host(module.running_mean) - host(before.running_mean)) / sigma0).mean()),
                std_shift=float((np.abs(sigma - sigma0) / sigma0).mean()),
            )
        )
    return rows


# --- features ----------------------------------------------------------------------------------------------------


@contextmanager
def stage_outputs(model: nn.Module, stage_list: list[tuple[str, str]]):
    """A dict filled, on every forward pass, with each stage's output (as float32) by label."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(module).register_forward_hook(
            lambda _, __, output, label=label: outputs.__setitem__(label, output.float())
        )
        for label, module in stage_list
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def pooled(output: torch.Tensor) -> torch.Tensor:
    """A stage's output as one vector per image: the mean over its spatial positions (images x channels x height x
    width), or over its tokens (a transformer's images x tokens x width)."""
    if output.ndim == 3:
        return output.mean(dim=1)
    return output.mean(dim=tuple(range(2, output.ndim))) if output.ndim > 2 else output


@torch.no_grad()
def pooled_stage_features(model, stage_list, loader, device, *, description: str) -> tuple[dict, np.ndarray]:
    """Each stage's pooled output for every image of the loader (numpy, n x channels) and the labels."""
    model.eval()
    features, labels = {label: [] for label, _ in stage_list}, []
    with stage_outputs(model, stage_list) as outputs:
        for images, batch_labels in device.batches(loader, description=description):
            with device.autocast():
                model(images)
            for label in features:
                features[label].append(pooled(outputs[label]).cpu())
            labels.append(batch_labels.cpu())
    return {k: torch.cat(v).numpy() for k, v in features.items()}, torch.cat(labels).numpy()


# --- linear CKA --------------------------------------------------------------------------------------------------


def gram(features: torch.Tensor) -> np.ndarray:
    """The linear kernel X X^T of a batch of (flattened) features, computed where they are in float32, then summed on
    the host in float64 (see `host`)."""
    flat = features.flatten(1).float()
    return host(flat @ flat.T)


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 (K and L, as in the paper)
    """The unbiased HSIC estimator of Song et al. 2012 (used by Nguyen et al. 2021) from two n x n Gram matrices:
    1/(n(n-3)) [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1], K~ and L~ with zero diagonals."""
    n = k.shape[0]
    if n < 4:
        raise ValueError("the unbiased HSIC estimator needs at least 4 examples")
    k, l = np.array(k, dtype=np.float64), np.array(l, dtype=np.float64)  # noqa: E741 (copies: the diagonals go)
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    trace = (k * l).sum()  # tr(K L) for symmetric matrices
    ones = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = 2 * (k.sum(0) @ l.sum(1)) / (n - 2)
    return float((trace + ones - cross) / (n * (n - 3)))


class MinibatchCKA:
    """Linear CKA accumulated over minibatches (Nguyen, Raghu & Kornblith 2021): the unbiased HSIC of each minibatch
    is summed, then CKA = sum HSIC(K,L) / sqrt(sum HSIC(K,K) * sum HSIC(L,L)). Unlike the plain (biased) estimator it is
    near 0 for independent features, whatever their width, and it never holds more than one batch of features."""

    def __init__(self):
        self.kl = self.kk = self.ll = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        kx, ky = gram(x), gram(y)
        self.kl += hsic_unbiased(kx, ky)
        self.kk += hsic_unbiased(kx, kx)
        self.ll += hsic_unbiased(ky, ky)

    @property
    def value(self) -> float:
        return self.kl / (self.kk * self.ll) ** 0.5 if self.kk > 0 and self.ll > 0 else float("nan")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of all the examples at once (the plain estimator of Kornblith et al. 2019):
    ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F) on centred features."""
    x, y = host(x.flatten(1)), host(y.flatten(1))
    x, y = x - x.mean(0), y - y.mean(0)
    norm = np.linalg.norm
    return float(norm(y.T @ x) ** 2 / (norm(x.T @ x) * norm(y.T @ y)))


def closest_and_furthest(cka_rows: list[dict]) -> tuple[dict | None, dict | None]:
    """The stages whose fine-tuned features are most and least like the start's. A stage whose features never varied
    has no CKA (NaN) and is left out: NaN compares false with everything, so max and min would pick it or not by its
    place in the list. (None, None) when no stage has a value."""
    measured = [row for row in cka_rows if math.isfinite(row["cka"])]
    if not measured:
        return None, None
    return max(measured, key=lambda row: row["cka"]), min(measured, key=lambda row: row["cka"])


@torch.no_grad()
def minibatch_cka(start, tuned, control, *, stage_list, loader, device) -> dict[str, tuple[float, float]]:
    """Per stage: (CKA of the start against the fine-tuned network, CKA of the start against the control, a randomly
    initialised network), on the flattened stage outputs of the same images. Batches of fewer than 4 images are left
    out (the estimator needs 4)."""
    nets = [start.eval(), tuned.eval(), control.eval()]
    tuned_cka = {label: MinibatchCKA() for label, _ in stage_list}
    control_cka = {label: MinibatchCKA() for label, _ in stage_list}
    with (
        stage_outputs(start, stage_list) as a,
        stage_outputs(tuned, stage_list) as b,
        stage_outputs(control, stage_list) as c,
    ):
        for images, _ in device.batches(loader, description="CKA"):
            if len(images) < 4:
                continue
            with device.autocast():
                for net in nets:
                    net(images)
            for label, _ in stage_list:
                tuned_cka[label].add(a[label], b[label])
                control_cka[label].add(a[label], c[label])
    return {label: (tuned_cka[label].value, control_cka[label].value) for label, _ in stage_list}


# --- linear probes -----------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """A logistic-regression classifier on frozen features: fitted on one split, scored on another."""

    accuracy: float  # percent of the scoring split
    converged: bool


def linear_probe(train_x, train_y, test_x, test_y, *, max_iter: int = 1000) -> Probe:
    """Kornblith et al.'s fixed-feature classifier: multinomial logistic regression (L-BFGS, scikit-learn's default
    L2 strength C=1, not tuned) on standardised features. Without tuning it is a lower bound of what the features
    allow."""
    classifier, converged = fit_logistic_regression(train_x, train_y, max_iter=max_iter)
    accuracy = 100 * float((classifier.predict(test_x) == np.asarray(test_y)).sum()) / len(test_y)
    return Probe(accuracy, converged)


# --- the starting network ----------------------------------------------------------------------------------------


@dataclass
class Start:
    """The network a fine-tune started from."""

    model: nn.Module
    weights: str  # as --weights names them
    head_is_new: bool  # the head was made fresh for the target (not in the weights): it has no starting value
    fingerprint: str  # finetune.start_fingerprint of these weights
    matches_run: bool | None = None  # whether they are the ones the run recorded starting from (None: not recorded)


def starting_network(arch: str, weights: str, num_classes: int, *, resolution: int | None = None) -> Start:
    """The start rebuilt as train.py built it, from the same weights; a fresh head made as train.py makes one (its
    values are not the run's: only a head that came with the weights is compared)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(arch, weights, num_classes, resolution=resolution)
    resolved = resolve_weights(arch, weights)
    loaded_head = isinstance(resolved, Path) and head_fits(model, read_state_dict(resolved))
    return Start(model.eval(), weights, head_is_new=not loaded_head, fingerprint=start_fingerprint(model))


def random_network(arch: str, num_classes: int, seed: int, *, resolution: int | None = None) -> nn.Module:
    """The control: the architecture with torchvision's random initialisation."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(arch, "none", num_classes, resolution=resolution).eval()
