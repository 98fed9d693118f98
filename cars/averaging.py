"""Weights between and across fine-tunes: the line from the start to a fine-tune (WiSE-FT, Wortsman et al. 2022),
averages of fine-tunes from one start (model soups, Wortsman et al. 2022), and BatchNorm statistics estimated again
after averaging: averaged weights with averaged (stale) statistics lose accuracy in BatchNorm networks."""

from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from cars.analysis import topk_accuracy
from cars.checkpoint import load_checkpoint
from cars.config import Config, load_saved
from cars.data import load_splits, run_splits
from cars.engine import collect_logits
from cars.errors import UserError
from cars.loaders import eval_loader
from cars.runs import read_summary


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


def fine_tune_of(run: Path) -> tuple[Config, dict]:
    """A finished fine-tune's config and best.pt, checked: a run folder of train.py whose best weights are finite.
    A run that diverged before it saved any weights, or whose best.pt holds NaN or infinite ones, is one line."""
    if not (run / "best.pt").is_file() or not (run / "config.toml").is_file():
        if read_summary(run).get("status") == "diverged":
            raise UserError(
                f"{run} diverged in its first epoch (its summary.json says so) and saved no weights; train it again "
                "with a lower --lr"
            )
        raise UserError(f"{run} is not a run folder of train.py (no best.pt and config.toml); give run folders")
    checkpoint = load_checkpoint(run / "best.pt")
    state = checkpoint.get("model")
    if not isinstance(state, dict) or not isinstance(checkpoint.get("class_names"), list):
        raise UserError(f"{run / 'best.pt'} is not a checkpoint of train.py (no model and class names)")
    if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
        raise UserError(
            f"{run / 'best.pt'} holds NaN or infinite weights (the run diverged): nothing between or across such "
            "weights means anything; train it again with a lower --lr"
        )
    return load_saved(run / "config.toml"), checkpoint


def out_apart_from(out: Path, runs: list[Path], flag: str = "--out") -> None:
    """An output folder that is one of the input runs, or holds one, would be emptied before the run is read."""
    for run in runs:
        if out.resolve() == run.resolve() or out.resolve() in run.resolve().parents:
            raise UserError(
                f"{flag} {out} is {'the input run' if out.resolve() == run.resolve() else 'a folder holding the run'} "
                f"{run}, which would be emptied before it is read; write to a new folder"
            )


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, loader, device) -> None:
    """Every BatchNorm's running mean and variance estimated again from scratch on the loader's images (a cumulative
    average over all of them: torch.optim.swa_utils.update_bn), the model left in eval mode."""
    inputs = (images for images, _ in device.batches(loader, description="BatchNorm statistics"))
    with device.autocast():
        update_bn(inputs, model)
    model.eval()


def accuracy_on(model, split, **feeding) -> float:
    """Top-1 accuracy of `model` on a split, fed as logits_on feeds it."""
    return topk_accuracy(*logits_on(model, split, **feeding), 1)


def logits_on(
    model,
    split,
    *,
    resolution: int,
    interpolation: str,
    cache: str,
    batch_size: int,
    workers: int,
    device,
    to_model=None,
):
    """The logits of `model` on a split and its labels, fed as eval.py feeds it (the cache at the trained resolution,
    in batches), so that a model scored here and by eval.py gets the same numbers. `to_model` maps dataset labels to
    the model's classes when the dataset orders them otherwise."""
    loader = eval_loader(
        split,
        resolution=resolution,
        interpolation=interpolation,
        cache=cache,
        skip_bad_images=False,
        batch_size=batch_size,
        workers=workers,
        device_type=device.type,
    )
    logits, labels = collect_logits(model, loader, device, description=split.name)
    return logits, labels if to_model is None else to_model[labels]


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
        interpolation=cfg.interpolation,
        cache=cache,
        skip_bad_images=True,
        batch_size=batch_size,
        workers=workers,
        device_type=device.type,
    )
