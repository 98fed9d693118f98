"""A stand-in for Stanford Cars for benchmarks: JPEGs whose sizes follow the real dataset's
(about 608 x 403 on average, landscape, 3:2-ish, a long tail of large ones), with enough detail that
they cost what real photos cost to decode. Written once in the hub's parquet layout."""

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cars.paths import cache_home


def photo_like(rng: np.random.Generator) -> Image.Image:
    width = int(np.clip(rng.lognormal(np.log(570), 0.35), 100, 2600))
    height = int(np.clip(width / np.clip(rng.normal(1.5, 0.17), 1.0, 2.4), 60, 1800))
    gradient = np.linspace(rng.uniform(40, 200), rng.uniform(40, 200), height)[:, None, None] * np.ones((1, width, 3))
    image = Image.fromarray((gradient * rng.uniform(0.7, 1.2, 3)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):  # body panels, windows, wheels, background objects
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        box = [x0, y0, x0 + rng.uniform(10, width / 2), y0 + rng.uniform(10, height / 2)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.4 else draw.rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    # sensor noise, texture
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 7, (height, width, 1)).astype(np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def fake_cars(images: int = 512, classes: int = 196, seed: int = 0) -> Path:
    """The folder of a fake dataset with `images` train and `images` test images (written on first use)."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    root = cache_home() / f"bench-fake-cars-{images}-{seed}"
    if (root / "data" / "test-00000-of-00001.parquet").exists():
        return root
    rng = np.random.default_rng(seed)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[f"car {i}" for i in range(classes)])})
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        encoded = []
        for _ in range(images):
            buffer = io.BytesIO()
            photo_like(rng).save(buffer, "JPEG", quality=int(rng.integers(75, 96)))
            encoded.append({"bytes": buffer.getvalue(), "path": None})
        labels = [i % classes for i in range(images)]
        Dataset.from_dict({"image": encoded, "label": labels}, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    return root
