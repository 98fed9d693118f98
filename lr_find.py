"""lr_find.py: the learning-rate range test, before a run is wasted on a bad lr.

The lr grows exponentially from --start-lr to --end-lr over --steps mini-batches, on a copy of the
starting weights; the smoothed loss is recorded until it diverges. Two suggestions, after fastai's: the
valley, the point two thirds down the longest stretch of falling loss (fastai's `valley` takes the point about
half way down; two thirds stays further from where the loss turns up), and the steepest descent.
"""

from cars.cli import check_command_line, parse_lr_find

check_command_line(__name__, parse_lr_find)  # --help and mistakes answer before the imports below load torch

import copy
import math
from pathlib import Path

import numpy as np

from cars import config as config_module
from cars.checkpoint import unwrap
from cars.data import run_splits
from cars.engine import Device, train_step
from cars.errors import UserError, run_cli
from cars.loaders import train_loader
from cars.methods import base_lr, plain_objective, set_trainable
from cars.models import build_model, check_resolution
from cars.optim import head_lr, make_optimizer
from cars.report import plot_lr_find, write_csv
from cars.runs import check_folder_free, prepare_folder
from cars.runtime import pick_device, seed_everything, worker_count
from cars.transforms import batch_mixer

SMOOTHING = 0.98  # fastai's recorder


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction, as fastai's recorder."""
    average, smoothed = 0.0, []
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**i))
    return smoothed


def suggest(lrs: list[float], losses: list[float]) -> dict:
    """The valley (two thirds down the longest fall) and the steepest descent of the smoothed loss curve."""
    n = len(losses)
    longest = [1] * n  # longest strictly falling subsequence ending at i
    for i in range(n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
    end = int(np.argmax(longest))
    start = end - longest[end] + 1
    valley = start + (end - start) * 2 // 3
    slopes = np.gradient(np.array(losses), np.log(np.array(lrs)))
    first = n // 10  # the smoothed curve's first points are mostly its start-up
    steepest = first + int(np.argmin(slopes[first : max(end, first) + 1]))
    return {"valley": lrs[valley], "steepest": lrs[steepest]}


def readable_batches(loader):
    """Batches epoch after epoch (a sweep may be longer than one), without the wholly unreadable ones."""
    while True:
        found = False
        for batch in loader:
            if batch is not None:
                found = True
                yield batch
        if not found:
            raise UserError("the training split has no readable batch to sweep the learning rate on")


def range_test(
    model, loader, cfg, device: Device, *, start_lr: float, end_lr: float, steps: int, phase: str, num_classes: int
):
    """Sweep on a deep copy: `model` itself is never touched. Returns the lrs and raw losses seen, and the swept
    copy."""
    model = device.place(copy.deepcopy(model))
    optimizer = make_optimizer(cfg, model)
    # keep --backbone-lr-mult
    ratios = [group["lr"] / head_lr(optimizer) for group in optimizer.param_groups]
    mixer = batch_mixer(cfg.mixup, cfg.cutmix, num_classes, cfg.seed)
    scaler = device.scaler()
    objective = plain_objective(cfg.label_smoothing)  # the range test measures cross-entropy alone
    lrs, losses, best, average = [], [], math.inf, 0.0
    batches = readable_batches(loader)
    for step in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (step / (steps - 1))
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        model.train()
        set_trainable(cfg, unwrap(model), backbone_frozen=phase == "head")
        loss, _, _, _ = train_step(
            model, next(batches), optimizer, scaler, device, objective=objective, mixer=mixer, step=step
        )
        lrs.append(lr)
        losses.append(loss.item())
        average = SMOOTHING * average + (1 - SMOOTHING) * losses[-1]
        # the last value of smooth(losses), without recomputing it all
        smoothed = average / (1 - SMOOTHING ** len(losses))
        best = min(best, smoothed)
        if not math.isfinite(smoothed) or (step > 5 and smoothed > 4 * best):  # diverged: the rest tells nothing
            break
    return lrs, losses, model


def main(argv=None) -> None:
    args = parse_lr_find(argv)
    cfg, preset = config_module.resolve(args)
    out = Path(args.out or f"runs/lr_find-{preset}")
    check_folder_free(out, args.overwrite, "lr_find folder", "--out")
    device_type = pick_device(cfg.device)
    device = Device.for_run(cfg, device_type)
    seed_everything(cfg.seed)
    splits = run_splits(cfg)
    model = build_model(cfg.arch, cfg.weights, len(splits.class_names), cfg.dropout, resolution=cfg.resolution)
    check_resolution(model, cfg.arch, cfg.resolution)
    workers = worker_count(cfg.workers)
    loader = train_loader(splits.train, cfg, workers=workers, device_type=device_type)
    prepare_folder(out, args.overwrite, "lr_find folder", "--out")

    print(
        f"lr range test: {cfg.arch}, {cfg.optimizer}, batch {cfg.batch_size}, phase {args.phase}, "
        f"lr {args.start_lr:g} -> {args.end_lr:g} over at most {args.steps} steps"
    )
    lrs, losses, _ = range_test(
        model,
        loader,
        cfg,
        device,
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        steps=args.steps,
        phase=args.phase,
        num_classes=len(splits.class_names),
    )
    smoothed = smooth(losses)
    stopped_early = len(lrs) < args.steps
    suggestion = suggest(lrs, smoothed)
    write_csv(
        out / "lr_find.csv",
        [
            dict(step=i, lr=lr, loss=loss, smoothed_loss=s)
            for i, (lr, loss, s) in enumerate(zip(lrs, losses, smoothed, strict=True))
        ],
        ["step", "lr", "loss", "smoothed_loss"],
    )
    plot_lr_find(
        lrs,
        smoothed,
        suggestion,
        out / "lr_find.png",
        preset_lr=base_lr(cfg),
        title=f"{preset}: {cfg.arch}, {cfg.optimizer}, phase {args.phase}",
    )
    if stopped_early:
        print(f"stopped after {len(lrs)} steps: the loss diverged at lr {lrs[-1]:.3g}")
    print(
        f"suggested lr: {suggestion['valley']:.3g} (valley rule: two thirds down the longest fall of the smoothed "
        "loss); "
        f"steepest descent at {suggestion['steepest']:.3g}"
    )
    # the lr a run of this preset trains at: --lr-scaling linear scales it by the batch, and the test tried raw lrs
    linear = cfg.lr_scaling == "linear"
    scaled = f" (--lr {cfg.lr:g} x batch {cfg.batch_size}/128, --lr-scaling linear)" if linear else ""
    print(f"your preset's lr: {base_lr(cfg):g}{scaled}. Plot and numbers: {out / 'lr_find.png'}, {out / 'lr_find.csv'}")


if __name__ == "__main__":
    run_cli(main)
