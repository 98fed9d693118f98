"""Weights between and across fine-tunes: the line from the start to a fine-tune (WiSE-FT, Wortsman et al. 2022),
averages of fine-tunes from one start (model soups, Wortsman et al. 2022), and BatchNorm statistics estimated again
after averaging: averaged weights with averaged (stale) statistics lose accuracy in BatchNorm networks."""

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from cars.analysis import topk_accuracy
from cars.data import load_splits, run_splits
from cars.engine import collect_logits
from cars.loaders import eval_loader


def interpolated(start: dict, tuned: dict, alpha: float) -> dict:
    """(1 - alpha) x start + alpha x tuned, tensor by tensor: the weights and BatchNorm's running statistics alike.
    Written as that sum, alpha 1 gives the tuned tensors exactly and alpha 0 the start's. Integer buffers (BatchNorm's
    count of batches) are the tuned model's."""
    return {
        key: start[key] * (1 - alpha) + value * alpha if value.is_floating_point() else value.clone()
        for key, value in tuned.items()
    }


def averaged(states: list[dict]) -> dict:
    """The uniform average of state dicts (a uniform soup); integer buffers are the first one's. A single state is
    returned unchanged, bit for bit."""
    if len(states) == 1:
        return {key: value.clone() for key, value in states[0].items()}
    return {
        key: sum(state[key] for state in states) / len(states) if value.is_floating_point() else value.clone()
        for key, value in states[0].items()
    }


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, loader, device) -> None:
    """Every BatchNorm's running mean and variance estimated again from scratch on the loader's images (a cumulative
    average over all of them: torch.optim.swa_utils.update_bn), the model left in eval mode."""
    inputs = (device.put(*batch)[0] for batch in loader if batch is not None)
    with device.autocast():
        update_bn(inputs, model)
    model.eval()


def accuracy_on(model, split, *, resolution: int, cache: str, batch_size: int, workers: int, device, to_model=None):
    """Top-1 accuracy of `model` on a split, fed as eval.py feeds it (the cache at the trained resolution, in
    batches), so that a model scored here and by eval.py gets the same number. `to_model` maps dataset labels to the
    model's classes when the dataset orders them otherwise."""
    loader = eval_loader(
        split,
        resolution=resolution,
        cache=cache,
        skip_bad_images=False,
        batch_size=batch_size,
        workers=workers,
        device_type=device.type,
    )
    logits, labels = collect_logits(model, loader, device, description=split.name)
    return topk_accuracy(logits, labels if to_model is None else to_model[labels], 1)


def scored_splits(cfg) -> tuple[dict, str]:
    """The splits a run's averaged models are scored on, by name, and the one that chooses among them: the run's
    validation split when it has one (and then the test split beside it), else the test split."""
    splits = load_splits(cfg.data, cfg.val_split, cfg.split_seed)
    if splits.test is None:
        return {"test": splits.eval}, "test"
    return {"val": splits.eval, "test": splits.test}, "val"


def training_images(cfg, *, cache: str, batch_size: int, workers: int, device):
    """The images a run trained on (its subset, if it had one) as evaluated, centre crops: for a probe head and for
    BatchNorm statistics."""
    return eval_loader(
        run_splits(cfg).train,
        resolution=cfg.resolution,
        cache=cache,
        skip_bad_images=True,
        batch_size=batch_size,
        workers=workers,
        device_type=device.type,
    )
