"""How the weights move: optimizer and parameter groups, the lr schedule, the EMA of the weights, the AMP scaler."""

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cars.models import backbone_parameters, head_parameters


def base_lr(cfg) -> float:
    """--lr, scaled by batch/128 with --lr-scaling linear (lr 0.1 was tuned for batch 128)."""
    return cfg.lr * cfg.batch_size / 128 if cfg.lr_scaling == "linear" else cfg.lr


def no_decay_parameters(model: nn.Module) -> set[int]:
    """The ids of the normalisation layers' weights and of every bias: what --norm-weight-decay decays. Decay pulls
    a weight towards 0; a BatchNorm scale or a bias is not a weight that overfits by growing, and shrinking it only
    fights the normalisation (torchvision's and timm's recipes leave them undecayed)."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    chosen = {
        id(p) for module in model.modules() if isinstance(module, norms) for p in module.parameters(recurse=False)
    }
    return chosen | {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}


def make_optimizer(cfg, model) -> torch.optim.Optimizer:
    """Two parameter groups so the backbone can learn slower than the new head (--backbone-lr-mult); with
    --norm-weight-decay each is split in two, the normalisation weights and biases with their own decay. The head's
    groups come last: the recipe reads the lr there."""
    lr = base_lr(cfg)
    groups = [
        {"params": backbone_parameters(model), "lr": lr * cfg.backbone_lr_mult, "name": "backbone"},
        {"params": head_parameters(model), "lr": lr, "name": "head"},
    ]
    if cfg.norm_weight_decay >= 0:
        chosen, split = no_decay_parameters(model), []
        for group in groups:
            decayed = [p for p in group["params"] if id(p) not in chosen]
            undecayed = [p for p in group["params"] if id(p) in chosen]
            split.append({**group, "params": decayed})
            split.append(
                {
                    **group,
                    "params": undecayed,
                    "name": f"{group['name']} norm and bias",
                    "weight_decay": cfg.norm_weight_decay,
                }
            )
        groups = [group for group in split if group["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)


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
