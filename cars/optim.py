"""How the weights move: the optimizer (over the parameter groups of cars/finetune.py), the lr schedule, the EMA
of the weights, the AMP scaler."""

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cars.methods import base_lr, param_groups


def make_optimizer(cfg, model, *, extra: list[dict] = ()) -> torch.optim.Optimizer:
    """SGD or AdamW over the method's parameter groups (methods.param_groups: the lr and decay of each)."""
    groups = param_groups(cfg, model, extra=extra)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=base_lr(cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=base_lr(cfg), weight_decay=cfg.weight_decay)


def head_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr the head trains at now: the run's lr, as metrics.csv and the progress bar show it."""
    return next(group["lr"] for group in optimizer.param_groups if group.get("name") == "head")


def lr_factor(cfg, steps_per_epoch: int):
    """The learning rate as a multiple of the base lr after `step` optimisation steps:
    linear warmup first, then the step decay (/10 every 30 epochs) or a cosine down to 0."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "step":
            return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


def ema_decay(cfg, steps_per_epoch: int) -> float:
    """The EMA's decay per step. A fixed decay ignores the run's length: 0.9998 over run 7's 5,670
    steps would leave 32 % of the starting weights in the average. A half-life in epochs fits any
    run: after h epochs a weight counts half, so decay ** (h * steps_per_epoch) = 1/2."""
    return cfg.ema_decay or 0.5 ** (1 / (cfg.ema_half_life * steps_per_epoch))


def make_scheduler(cfg, optimizer, steps_per_epoch: int):
    """Stepped after every optimisation step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> None:
    """A run saved without mixed precision (on a CPU) has an empty scaler state; resumed with it (on
    a GPU), the scaler starts afresh, as it would have on the first step."""
    if state:
        scaler.load_state_dict(state)


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of the weights (and BatchNorm statistics), updated every step:
    ema = decay * ema + (1 - decay) * weights."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
