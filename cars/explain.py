"""Class activation maps: where the model looked to decide.

Pitfalls avoided here: CAM runs on the plain (uncompiled) model, in fp32, with gradients on and
no autocast; every image gets its own target (fewer targets silently give blank maps); one CAM
object serves a whole grid; maps are drawn over the displayed, un-normalised image.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from torch import nn

from cars.checkpoint import unwrap
from cars.errors import UserError
from cars.starts import LibraryNetwork
from cars.transforms import eval_transform, normalize

DISPLAY_SIDE = 224  # the smallest side a CAM is drawn at, whatever the model's resolution

# each --cam-method's class in pytorch_grad_cam, imported when a map is made: the library imports scikit-learn, which
# took 2-3 s of eval.py's and predict.py's start-up on 2 cores
CAM_METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
    "eigencam": "EigenCAM",
    "finercam": "FinerCAM",  # contrasts the class with its most similar classes: made for fine-grained data
}


def target_layer(model: nn.Module) -> nn.Module:
    """`layer4[-1]` for ResNets; the last feature block for other architectures; a timm or open_clip ViT's last
    transformer block (its tokens made a grid again by `token_grid`)."""
    if isinstance(model, LibraryNetwork):
        stack = next((s for s in ("blocks", "transformer.resblocks", "stages") if has_submodule(model.body, s)), None)
        if stack and isinstance(model.body.get_submodule(stack), nn.Sequential | nn.ModuleList):
            return model.body.get_submodule(stack)[-1]
        model = model.body
    for name in ("layer4", "features", "conv5", "trunk_output"):
        block = getattr(model, name, None)
        if block is not None:
            return block[-1] if isinstance(block, nn.Sequential) else block
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convolutions:
        raise UserError(f"{type(model).__name__} has no convolutional layer to compute a CAM on")
    return convolutions[-1]


def has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def token_grid(model: nn.Module):
    """For a ViT, what makes its block's output (images x tokens x channels) a map again: the class (and register)
    tokens dropped and the patches laid out on their square grid, channels first. None for a network of maps."""
    if not isinstance(model, LibraryNetwork) or not model.prefix_tokens:
        return None

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3:  # a map already (a ConvNeXt stage)
            return tokens
        patches = tokens[:, model.prefix_tokens :]
        side = math.isqrt(patches.shape[1])
        return patches.reshape(len(patches), side, side, -1).permute(0, 3, 1, 2)

    return reshape


def class_activation_maps(
    model: nn.Module, images: torch.Tensor, classes: list[int], method: str = "gradcam"
) -> np.ndarray:
    """One map in [0, 1] per image, of the image's size, for the given class of each image."""
    if method not in CAM_METHODS:
        raise UserError(f"unknown --cam-method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    if len(classes) != len(images):
        raise ValueError("one target class per image")
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = unwrap(model).float().eval()
    images = images.float().to(next(model.parameters()).device)
    with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
        with getattr(pytorch_grad_cam, CAM_METHODS[method])(
            model=model, target_layers=[target_layer(model)], reshape_transform=token_grid(model)
        ) as cam:
            if method == "scorecam":
                cam.batch_size = 32
            if method == "finercam":
                targets = finer_targets(model, images, classes)
            else:
                targets = [ClassifierOutputTarget(int(c)) for c in classes]
            return cam(input_tensor=images, targets=targets)


def finer_targets(model: nn.Module, images: torch.Tensor, classes: list[int], similar: int = 3) -> list:
    """FinerCAM's targets: each class against the classes whose logits are closest to it."""
    from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget

    with torch.no_grad():
        logits = model(images)
    targets = []
    for row, c in zip(logits, classes, strict=True):
        distance = (row - row[c]).abs()
        distance[c] = float("inf")
        targets.append(FinerWeightedTarget(int(c), distance.argsort()[:similar].tolist(), alpha=1.0))
    return targets


def overlay(display_image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The heatmap blended over an HxWx3 uint8 image, the map resized to the image; returns uint8."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if cam.shape != display_image.shape[:2]:  # computed at the model's resolution, drawn at the display's
        cam = F.interpolate(torch.from_numpy(cam)[None, None], size=display_image.shape[:2], mode="bilinear")[0, 0]
        cam = cam.clamp(0, 1).numpy()
    return show_cam_on_image(display_image.astype(np.float32) / 255, cam, use_rgb=True)


def beside(shown: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The image untinted, then the map over it, side by side (a white gap between): the paint's colour, half of
    every class name, stays visible."""
    gap = np.full((shown.shape[0], max(4, shown.shape[1] // 30), 3), 255, np.uint8)
    return np.concatenate([shown, gap, overlay(shown, cam)], axis=1)


def display_pixels(image, resolution: int) -> np.ndarray:
    """What the model saw of a PIL image (the same centre crop), at DISPLAY_SIDE px or more: HxWx3 uint8. The map of a
    48 px model is drawn over the photo's own detail, not over the 48 px it was shown (a picture for people: the
    model's resize filter does not matter to it)."""
    return eval_transform(max(DISPLAY_SIDE, resolution), interpolation="bilinear")(image).permute(1, 2, 0).numpy()


def cam_picture(
    model: nn.Module, image, *, resolution: int, interpolation: str, target: int, method: str = "gradcam"
) -> np.ndarray:
    """The CAM of class `target` for a PIL image: computed at the model's resolution, drawn at DISPLAY_SIDE px or more,
    the untinted image beside the overlay, and a colour bar that says what the colours mean. HxWx3 uint8, composed
    with PIL: a web page draws one per request, and a matplotlib figure costs ten times as long."""
    from PIL import Image, ImageDraw

    pixels = eval_transform(resolution, interpolation=interpolation)(image)
    cam = class_activation_maps(model, normalize(pixels)[None], [target], method)[0]
    panels = beside(display_pixels(image, resolution), cam)
    height, width = panels.shape[:2]
    bar = (colormaps["jet"](np.linspace(1, 0, height))[:, :3] * 255).astype(np.uint8)  # high at the top
    header, gap, bar_width, labels = 18, 10, 14, 44
    canvas = Image.new("RGB", (width + gap + bar_width + labels, height + header), "white")
    canvas.paste(Image.fromarray(panels), (0, header))
    canvas.paste(Image.fromarray(np.repeat(bar[:, None], bar_width, axis=1)), (width + gap, header))
    draw, left = ImageDraw.Draw(canvas), width + gap + bar_width + 4
    draw.text((4, 3), "the photo, as the model saw it", fill="black")
    draw.text((width // 2 + 8, 3), f"where it looked ({method})", fill="black")
    draw.text((left, header), "high", fill="black")
    draw.text((left, header + height - 12), "low", fill="black")
    return np.asarray(canvas)
