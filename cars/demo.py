"""A small synthetic car dataset, written once in the hub's own parquet format.

It exists so that everything (loading, training, evaluation) can be tried offline on a
laptop CPU in about a minute, through exactly the code that reads the real dataset.
Ten classes: five body shapes x two paint colours, drawn with random size, position,
direction, background, wheel size and details; a few images are grayscale.
"""

import io
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from cars.files import default_mode
from cars.paths import cache_home

# Each body: the lower body's top edge, the cabin outline (x, y) and the wheel radius, in a
# car box of width 1 and height 0.6 (y grows downwards; the body's bottom edge is at 0.5).
BODIES = {
    "Coupe": (0.34, [(0.24, 0.34), (0.4, 0.17), (0.56, 0.17), (0.9, 0.34)], 0.09),
    "Sedan": (0.28, [(0.2, 0.28), (0.32, 0.08), (0.62, 0.08), (0.76, 0.28)], 0.085),
    "SUV": (0.24, [(0.06, 0.24), (0.14, 0.02), (0.94, 0.02), (0.96, 0.24)], 0.11),
    "Pickup": (0.26, [(0.08, 0.26), (0.16, 0.04), (0.42, 0.04), (0.44, 0.26)], 0.1),
    "Van": (0.3, [(0.0, 0.3), (0.1, 0.0), (1.0, 0.0), (1.0, 0.3)], 0.075),
}
PAINTS = {"Red": (200, 30, 35), "Blue": (30, 70, 200)}
YEARS = {"Coupe": 2012, "Sedan": 2010, "SUV": 2016, "Pickup": 2008, "Van": 2014}
CLASS_NAMES = [f"Toy {body} {paint} {YEARS[body]}" for body in BODIES for paint in PAINTS]
CORRUPTIONS = ("gaussian_noise", "motion_blur", "pixelate")
VERSION = "v1"


def demo_root() -> Path:
    return cache_home() / f"demo-{VERSION}"


def jitter(colour, rng, amount=30):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)


def draw_car(body: str, paint: str, rng: random.Random) -> Image.Image:
    width = rng.randint(64, 256)
    height = int(width / rng.uniform(1.1, 1.4))
    image = Image.new("RGB", (width, height), jitter((170, 200, 230), rng, 40))
    draw = ImageDraw.Draw(image)
    horizon = int(height * rng.uniform(0.55, 0.7))
    draw.rectangle([0, horizon, width, height], fill=jitter((110, 115, 105), rng, 35))

    car_w = width * rng.uniform(0.5, 0.7)  # the eval centre crop keeps the whole car
    x0 = (width - car_w) / 2 + rng.uniform(-0.08, 0.08) * width
    y0 = horizon + height * rng.uniform(0.0, 0.12) - 0.5 * car_w
    flip = rng.random() < 0.5

    def at(x, y):
        return (x0 + (1 - x if flip else x) * car_w, y0 + y * car_w)

    top, cabin, wheel = BODIES[body]
    colour = jitter(PAINTS[paint], rng)
    draw.polygon([at(0, top), at(1, top), at(1, 0.5), at(0, 0.5)], fill=colour)
    draw.polygon([at(x, y) for x, y in cabin], fill=colour)
    glass = jitter((180, 210, 235), rng, 20)
    (ax, ay), (bx, by), (cx, cy), (dx, dy) = cabin
    inset = [(ax + 0.04, ay - 0.01), (bx + 0.02, by + 0.03), (cx - 0.02, cy + 0.03), (dx - 0.04, dy - 0.01)]
    draw.polygon([at(x, y) for x, y in inset], fill=glass)
    if body == "Coupe":  # a rear wing: what tells a coupe from the sedan at a glance
        draw.line([at(0.9, top - 0.06), at(0.99, top - 0.06)], fill=(30, 30, 30), width=max(2, int(car_w / 30)))
    if body == "Pickup":  # the open bed
        draw.line([at(0.46, top + 0.03), at(0.98, top + 0.03)], fill=(40, 40, 40), width=max(1, int(car_w / 60)))
    radius = wheel * rng.uniform(0.9, 1.1) * car_w
    for x in (0.2, 0.8):
        cx_, cy_ = at(x, 0.5)
        draw.ellipse([cx_ - radius, cy_ - radius, cx_ + radius, cy_ + radius], fill=(25, 25, 25))
        draw.ellipse(
            [cx_ - radius / 2, cy_ - radius / 2, cx_ + radius / 2, cy_ + radius / 2], fill=jitter((160, 160, 160), rng)
        )
    if rng.random() < 0.5:  # a detail that says nothing about the class: a headlight or a stripe
        lx, ly = at(0.97, top + 0.05)
        draw.ellipse([lx - car_w / 40, ly - car_w / 40, lx + car_w / 40, ly + car_w / 40], fill=(250, 240, 160))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def corrupt(image: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    """Cheap stand-ins for the hub dataset's corrupted test copies."""
    if kind == "gaussian_noise":
        noise = Image.effect_noise(image.size, 40).convert("RGB")
        return Image.blend(image.convert("RGB"), noise, 0.35)
    if kind == "motion_blur":
        return image.filter(ImageFilter.BoxBlur(max(1, image.width // 40)))
    if kind == "pixelate":
        small = image.resize((max(1, image.width // 6), max(1, image.height // 6)), Image.Resampling.BOX)
        return small.resize(image.size, Image.Resampling.NEAREST)
    raise ValueError(kind)


def encode(image: Image.Image, rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=rng.randint(80, 95))
    return buffer.getvalue()


def make_split(per_class: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    rng = random.Random(seed)
    images, labels = [], []
    for _ in range(per_class):
        for label, name in enumerate(CLASS_NAMES):
            _, body, paint, _ = name.split()
            image = draw_car(body, paint, rng)
            if rng.random() < 0.03:  # the real dataset has grayscale images too
                image = image.convert("L")
            images.append(image)
            labels.append(label)
    return images, labels


def write_demo(root: Path, train_per_class: int = 60, test_per_class: int = 30) -> None:
    """Write train, test and corrupted test splits as data/<split>-00000-of-00001.parquet."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=CLASS_NAMES)})
    train = make_split(train_per_class, seed=1)
    test = make_split(test_per_class, seed=2)
    splits = {"train": train, "test": test}
    for i, kind in enumerate(CORRUPTIONS):
        rng = random.Random(100 + i)
        splits[kind] = ([corrupt(image, kind, rng) for image in test[0]], test[1])

    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    staging.chmod(default_mode(folder=True))
    (staging / "data").mkdir()
    rng = random.Random(0)
    for split, (images, labels) in splits.items():
        rows = {"image": [{"bytes": encode(im, rng), "path": None} for im in images], "label": labels}
        Dataset.from_dict(rows, features=features).to_parquet(str(staging / "data" / f"{split}-00000-of-00001.parquet"))
    try:
        staging.rename(root)  # atomic: a half-written demo is never seen
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)


def ensure_demo() -> Path:
    root = demo_root()
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing the demo dataset to {root} (once)")
        write_demo(root)
    return root
