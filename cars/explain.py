"""Class activation maps: where the model looked to decide.

Pitfalls avoided here: CAM runs on the plain (uncompiled) model, in fp32, with gradients on and
no autocast; every image gets its own target (fewer targets silently give blank maps); one CAM
object serves a whole grid; maps are drawn over the displayed, un-normalised image.
"""

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, FinerCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget, FinerWeightedTarget
from torch import nn

from cars.checkpoint import unwrap
from cars.errors import UserError
from cars.transforms import normalize

CAM_METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "scorecam": ScoreCAM,
    "eigencam": EigenCAM,
    "finercam": FinerCAM,  # contrasts the class with its most similar classes: made for fine-grained data
}


def target_layer(model: nn.Module) -> nn.Module:
    """`layer4[-1]` for ResNets; the last feature block for other architectures."""
    for name in ("layer4", "features", "conv5", "trunk_output"):
        block = getattr(model, name, None)
        if block is not None:
            return block[-1] if isinstance(block, nn.Sequential) else block
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convolutions:
        raise UserError(f"{type(model).__name__} has no convolutional layer to compute a CAM on")
    return convolutions[-1]


def class_activation_maps(
    model: nn.Module, images: torch.Tensor, classes: list[int], method: str = "gradcam"
) -> np.ndarray:
    """One map in [0, 1] per image, of the image's size, for the given class of each image."""
    if method not in CAM_METHODS:
        raise UserError(f"unknown --cam-method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    if len(classes) != len(images):
        raise ValueError("one target class per image")
    model = unwrap(model).float().eval()
    images = images.float().to(next(model.parameters()).device)
    with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
        with CAM_METHODS[method](model=model, target_layers=[target_layer(model)]) as cam:
            if method == "scorecam":
                cam.batch_size = 32
            if method == "finercam":
                targets = finer_targets(model, images, classes)
            else:
                targets = [ClassifierOutputTarget(int(c)) for c in classes]
            return cam(input_tensor=images, targets=targets)


def finer_targets(model: nn.Module, images: torch.Tensor, classes: list[int], similar: int = 3) -> list:
    """FinerCAM's targets: each class against the classes whose logits are closest to it."""
    with torch.no_grad():
        logits = model(images)
    targets = []
    for row, c in zip(logits, classes):
        distance = (row - row[c]).abs()
        distance[c] = float("inf")
        targets.append(FinerWeightedTarget(int(c), distance.argsort()[:similar].tolist(), alpha=1.0))
    return targets


def overlay(display_image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The heatmap blended over an HxWx3 uint8 image; returns uint8."""
    return show_cam_on_image(display_image.astype(np.float32) / 255, cam, use_rgb=True)


def cam_overlay(model: nn.Module, pixels: torch.Tensor, target: int, method: str = "gradcam") -> np.ndarray:
    """The CAM of class `target` for one image's uint8 pixels, blended over them (HxWx3 uint8)."""
    cam = class_activation_maps(model, normalize(pixels)[None], [target], method)[0]
    return overlay(pixels.permute(1, 2, 0).numpy(), cam)
