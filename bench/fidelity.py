"""Crop fidelity: the training and eval pixels each path makes, against the original pipeline's, in PSNR.

    uv run python bench/fidelity.py                  # the scikit-learn sample photos (427 x 640) at three sizes
    uv run python bench/fidelity.py --data DIR       # the first images of any dataset train.py reads

The original pipeline's training crop: PIL, RandomResizedCrop on the full-size image (crop the box, resize it
bilinear to 224). Each path below cuts the same boxes (TrainAugmentation's draws, scale 0.08-1):
- noise floor: torch's antialiased resize of the crop cut from the decoded image (another resampler
  than PIL's, the only difference left);
- cache, CPU: the default: the cache's native-size pixels, the box read, torch's uint8 antialiased
  resize (what a machine without a GPU runs, and what --cache off runs on each decoded image);
- cache, device ops: the same read, resized in float as on a GPU (on the GPU when there is one,
  else on CPU tensors as a proxy);
- lossy --cache-side 336: the cache's smaller copy (longer side 336 px);
- eval: the eval cache, and the TTA scales, against the original pipeline's Resize + CenterCrop (corrupted copies
  go through the same eval transform).
A table per path (median, 5th percentile, minimum PSNR), then the summary line.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as v1

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cars.cache import cached_pixels
from cars.config import Config
from cars.data import FileSplit, load_splits, read_rgb
from cars.transforms import TrainAugmentation, eval_resize, eval_transform, keep_for_cache, pixel_box, resize_crops


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def sample_photos(scales=(0.5, 1.0, 1.5)) -> list[Image.Image]:
    """scikit-learn's two sample photos (427 x 640, about Stanford Cars' size), at a few sizes."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(image) for image in load_sample_images().images]
    return [
        photo.resize((round(photo.width * s), round(photo.height * s)), Image.Resampling.LANCZOS)
        for photo in photos
        for s in scales
    ]


def original_crop(image: Image.Image, box, size: int) -> torch.Tensor:
    """The original pipeline's pixels: RandomResizedCrop on the PIL image, for this box (torchvision v1 on PIL)."""
    x0, y0, x1, y1 = pixel_box(box, image.height, image.width)
    return torch.from_numpy(
        np.array(v1.functional.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [size, size]))
    ).permute(2, 0, 1)


def train_fidelity(
    images: list[Image.Image], *, crops: int, resolution: int, cache_dir: Path, device: str = "cpu"
) -> dict[str, list[float]]:
    """PSNR of every path's crop against the original pipeline's, over `crops` draws spread over the images."""
    augmentation = TrainAugmentation(Config(resolution=resolution))
    split = FileSplit([], "train")
    split.paths, split.labels = [], []
    for n, image in enumerate(images):
        path = cache_dir / f"{n}.png"
        image.save(path)
        split.paths.append(str(path))
        split.labels.append(0)
    native = cached_pixels(
        split, "train", size=0, transform=keep_for_cache, root=cache_dir / "cache", log=lambda line: None
    )
    lossy = cached_pixels(
        split,
        "train",
        size=336,
        transform=lambda image: keep_for_cache(image, 336),
        root=cache_dir / "cache",
        log=lambda line: None,
    )
    results = {
        "noise floor: torch's resize of the decoded full-size crop": [],
        "cache, CPU": [],
        f"cache, device ops ({device})": [],
        "lossy --cache-side 336, CPU": [],
    }
    for draw in range(crops):
        i = draw % len(images)
        box, _ = augmentation.draw(draw // len(images), i, images[i].height, images[i].width)
        original = original_crop(images[i], box, resolution)
        boxes = torch.tensor([box])
        x0, y0, x1, y1 = pixel_box(box, images[i].height, images[i].width)
        decoded = torch.from_numpy(np.array(images[i])).permute(2, 0, 1)[:, y0:y1, x0:x1]
        results["noise floor: torch's resize of the decoded full-size crop"].append(
            psnr(resize_crops([decoded], [False], resolution, interpolation="bilinear")[0], original)
        )
        region = native.regions([i], boxes)[0].permute(2, 0, 1)
        results["cache, CPU"].append(
            psnr(resize_crops([region], [False], resolution, interpolation="bilinear")[0], original)
        )
        on_device = resize_crops([region.to(device)], [False], resolution, interpolation="bilinear", in_float=True)[
            0
        ].cpu()
        results[f"cache, device ops ({device})"].append(psnr(on_device, original))
        small = lossy.regions([i], boxes)[0].permute(2, 0, 1)
        results["lossy --cache-side 336, CPU"].append(
            psnr(resize_crops([small], [False], resolution, interpolation="bilinear")[0], original)
        )
    return results


def eval_fidelity(images: list[Image.Image], resolution: int, cache_dir: Path) -> dict[str, list[float]]:
    """The eval cache and the TTA scales against the original pipeline's Resize + CenterCrop on PIL."""
    split = FileSplit([(str(cache_dir / f"{n}.png"), 0) for n in range(len(images))], "test")
    cache = cached_pixels(
        split,
        "eval",
        size=resolution,
        transform=eval_transform(resolution, interpolation="bilinear"),
        root=cache_dir / "cache",
        log=lambda line: None,
    )
    results = {"eval cache": [], "eval, TTA scales": []}
    for i in range(len(images)):
        image = read_rgb(split, i)
        for size, key in (
            (resolution, "eval cache"),
            (round(resolution * 0.875), "eval, TTA scales"),
            (round(resolution * 1.125), "eval, TTA scales"),
        ):
            original = torch.from_numpy(
                np.array(v1.Compose([v1.Resize(eval_resize(size)), v1.CenterCrop(size)])(image))
            ).permute(2, 0, 1)
            ours = cache[i] if key == "eval cache" else eval_transform(size, interpolation="bilinear")(image)
            results[key].append(psnr(ours, original))
    return results


def summary(values: list[float]) -> tuple[float, float, float]:
    """Median, 5th percentile and minimum; identical crops count as infinitely many dB."""
    values = np.sort(np.array(values))
    return float(values[len(values) // 2]), float(values[int(0.05 * (len(values) - 1))]), float(values[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", help="any dataset train.py reads (default: the scikit-learn sample photos at three sizes)"
    )
    parser.add_argument("--images", type=int, default=60, help="images to take from --data")
    parser.add_argument("--crops", type=int, default=1200)
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    if args.data:
        train = load_splits(args.data).train
        images = [read_rgb(train, i) for i in range(min(args.images, len(train)))]
    else:
        images = sample_photos()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"{len(images)} images "
        f"({', '.join(f'{im.width}x{im.height}' for im in images[:6])}{', ...' if len(images) > 6 else ''}), "
        f"{args.crops} crops at {args.resolution} px"
    )
    with tempfile.TemporaryDirectory() as scratch:
        results = train_fidelity(
            images, crops=args.crops, resolution=args.resolution, cache_dir=Path(scratch), device=device
        )
        results.update(eval_fidelity(images, args.resolution, Path(scratch)))
    print("\n| path | median PSNR vs the original pipeline | 5th percentile | minimum |\n|---|---|---|---|")
    for name, values in results.items():
        median, p5, low = summary(values)
        print(f"| {name} | {median:.1f} dB | {p5:.1f} dB | {low:.1f} dB |")
    median, p5, _ = summary(results["cache, CPU"])
    floor_median, floor_p5, _ = summary(results["noise floor: torch's resize of the decoded full-size crop"])
    print(
        f"\ncrop fidelity vs the original pipeline: median {median:.1f} dB, p5 {p5:.1f} dB "
        f"(noise floor: median {floor_median:.1f} dB, p5 {floor_p5:.1f} dB)"
    )


if __name__ == "__main__":
    main()
