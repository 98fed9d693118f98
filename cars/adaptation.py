"""Adapting to shifted inputs without their labels (eval.py --adapt): a copy of the network whose BatchNorm
statistics are estimated again on unlabelled images of the shifted split (bn), or whose BatchNorm scales and shifts are
also trained to make its predictions on them confident, one pass, online (tent: Wang et al. 2021, "Tent: fully
test-time adaptation by entropy minimization"). The network itself is left as it is."""

import copy

import torch
from torch import nn

TENT_LR = 0.00025  # Tent's SGD lr for ImageNet at batch 64 (momentum 0.9); scaled linearly with the batch
TENT_BATCH = 64


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def adapted(model: nn.Module, batches, how: str) -> nn.Module:
    """A copy of `model` adapted on `batches` (images on the model's device; their labels are never read): its
    BatchNorm layers' running statistics are those of these images (a cumulative average over every batch), and with
    how="tent" their scales and shifts were trained by SGD on the mean entropy of the predictions of each batch, as it
    came. Everything else is the model's. In eval mode."""
    adapted_model = copy.deepcopy(model).eval()
    norms = batch_norms(adapted_model)
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: every image counts the same
        norm.train()  # normalise each batch by its own statistics, as Tent does, and record them
    if how == "tent":
        adapted_model.requires_grad_(False)
        affine = [p for norm in norms for p in (norm.weight, norm.bias) if p is not None]
        for parameter in affine:
            parameter.requires_grad_(True)
        optimizer = None
        for images, _ in batches:
            if optimizer is None:  # the lr scales with the batch, as Tent's does
                optimizer = torch.optim.SGD(affine, lr=TENT_LR * len(images) / TENT_BATCH, momentum=0.9)
            probabilities = adapted_model(images).float().softmax(1)
            entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(1).mean()
            optimizer.zero_grad()
            entropy.backward()
            optimizer.step()
        adapted_model.requires_grad_(False)
    else:
        with torch.no_grad():
            for images, _ in batches:
                adapted_model(images)
    return adapted_model.eval()
