"""Two small synthetic datasets, written once in the hub's own parquet format.

They exist so that everything (loading, pretraining, fine-tuning, evaluation) can be tried offline on a laptop CPU
in minutes, through exactly the code that reads the real dataset.

- `demo`, the target task: ten car classes (five body shapes x two paint colours), drawn with random size,
  position, direction, background, wheel size and details; a few images are grayscale. Like Stanford Cars it has
  few training images per class (24, the fewest any Stanford Cars class has).
- `demo-source`, the source task that the demo's backbone is pretrained on (the offline stand-in for ImageNet):
  40 classes of other drawn things (buses, tractors, bicycles, houses, boats...) in five other colours. They share
  the cars' low-level structure (edges, wheels, windows, flat paint, the same sky and road) but none of their
  classes, and each class has many more images.
"""

import hashlib
import io
import json
import random
import shutil
import tempfile
import tomllib
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from cars.errors import UserError
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
VERSION = "v2"  # v2: 24 training images per class (v1 had 60). Bump whenever the images change

# The source task: eight kinds of thing in five colours none of the cars wear
SOURCE_KINDS = ("Bus", "Truck", "Tractor", "Bicycle", "House", "Wagon", "Boat", "Caravan")
SOURCE_COLOURS = {
    "Green": (40, 150, 60),
    "Yellow": (225, 195, 40),
    "Orange": (235, 120, 30),
    "Purple": (120, 50, 160),
    "Teal": (30, 140, 150),
}
SOURCE_CLASS_NAMES = [f"{kind} {colour}" for kind in SOURCE_KINDS for colour in SOURCE_COLOURS]
SOURCE_VERSION = "v1"  # bump whenever the source images change: the data and the pretrained weights are named after it
DEMO_PRETRAINED = "demo-pretrained"  # the --weights name of the backbone pretrained on the source task
DEMO_CLIP_ARCH = (
    "open_clip:demo-clip"  # the demo's own small CLIP, pretrained on captioned drawings (cars/demo_clip.py)
)
SOURCE_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo_source.toml"  # how they are made


def demo_root() -> Path:
    return cache_home() / f"demo-{VERSION}"


def source_root() -> Path:
    return cache_home() / f"demo-source-{SOURCE_VERSION}"


def demo_pretrained_path(arch: str) -> Path:
    """Where `--weights demo-pretrained` is kept for `arch`: a torchvision-form state dict with a 40-way head, named
    after what it is made from (`source_recipe_key`), so that an edited recipe never finds the old weights. The demo's
    CLIP is made by another recipe: its weights are at cars.demo_clip.weights_path()."""
    return cache_home() / "demo-pretrained" / f"{arch}-{source_recipe_key(arch)}.pth"


def demo_pretraining_run(arch: str) -> Path:
    """The run folder of the pretraining that makes demo_pretrained_path(arch)."""
    weights = demo_pretrained_path(arch)
    return weights.with_name(f"{weights.stem}-run")


def source_recipe_key(arch: str) -> str:
    """A digest of what the demo-pretrained weights of `arch` are made from: the source images' version and the values
    SOURCE_RECIPE sets (an edited comment changes nothing, an edited value does; a knob the project adds later, which
    the recipe does not set, keeps the weights)."""
    values = {**tomllib.loads(SOURCE_RECIPE.read_text()), "arch": arch}
    recipe = json.dumps(values, sort_keys=True)
    return hashlib.sha256(f"{SOURCE_VERSION}\n{recipe}".encode()).hexdigest()[:12]


def jitter(colour, rng, amount=30):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)


def scene(rng: random.Random, size=(0.5, 0.7)):
    """A sky over a road, and where to put a thing on it: `at(x, y)` maps the thing's box (width 1, y downwards,
    standing on the road at y = 0.5) into the image, facing left or right at random. Returns the image, a drawing
    context, `at` and the thing's width in pixels."""
    width = rng.randint(64, 256)
    height = int(width / rng.uniform(1.1, 1.4))
    image = Image.new("RGB", (width, height), jitter((170, 200, 230), rng, 40))
    draw = ImageDraw.Draw(image)
    horizon = int(height * rng.uniform(0.55, 0.7))
    draw.rectangle([0, horizon, width, height], fill=jitter((110, 115, 105), rng, 35))

    thing_w = width * rng.uniform(*size)  # the eval centre crop keeps the whole thing
    x0 = (width - thing_w) / 2 + rng.uniform(-0.08, 0.08) * width
    y0 = horizon + height * rng.uniform(0.0, 0.12) - 0.5 * thing_w
    flip = rng.random() < 0.5

    def at(x, y):
        return (x0 + (1 - x if flip else x) * thing_w, y0 + y * thing_w)

    return image, draw, at, thing_w


def wheel(draw, at, centre, radius, rng, *, hub=True):
    """A wheel at `centre` (x, y in the thing's own units) of `radius` px."""
    cx, cy = at(*centre)
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(25, 25, 25))
    if hub:
        draw.ellipse(
            [cx - radius / 2, cy - radius / 2, cx + radius / 2, cy + radius / 2], fill=jitter((160, 160, 160), rng)
        )


def box(draw, at, corners, fill):
    """A filled rectangle between the `corners` (x0, y0, x1, y1, in the thing's own units)."""
    x0, y0, x1, y1 = corners
    draw.polygon([at(x0, y0), at(x1, y0), at(x1, y1), at(x0, y1)], fill=fill)


def draw_car(body: str, paint: str, rng: random.Random, *, rgb=None, size=(0.5, 0.7)) -> Image.Image:
    """A car of `body` painted about PAINTS[paint] (or `rgb`), `size` of the image's width wide."""
    image, draw, at, car_w = scene(rng, size=size)
    top, cabin, wheel_size = BODIES[body]
    colour = jitter(rgb or PAINTS[paint], rng)
    box(draw, at, (0, top, 1, 0.5), colour)
    draw.polygon([at(x, y) for x, y in cabin], fill=colour)
    glass = jitter((180, 210, 235), rng, 20)
    (ax, ay), (bx, by), (cx, cy), (dx, dy) = cabin
    inset = [(ax + 0.04, ay - 0.01), (bx + 0.02, by + 0.03), (cx - 0.02, cy + 0.03), (dx - 0.04, dy - 0.01)]
    draw.polygon([at(x, y) for x, y in inset], fill=glass)
    if body == "Coupe":  # a rear wing: what tells a coupe from the sedan at a glance
        draw.line([at(0.9, top - 0.06), at(0.99, top - 0.06)], fill=(30, 30, 30), width=max(2, int(car_w / 30)))
    if body == "Pickup":  # the open bed
        draw.line([at(0.46, top + 0.03), at(0.98, top + 0.03)], fill=(40, 40, 40), width=max(1, int(car_w / 60)))
    radius = wheel_size * rng.uniform(0.9, 1.1) * car_w
    for x in (0.2, 0.8):
        wheel(draw, at, (x, 0.5), radius, rng)
    if rng.random() < 0.5:  # a detail that says nothing about the class: a headlight or a stripe
        lx, ly = at(0.97, top + 0.05)
        draw.ellipse([lx - car_w / 40, ly - car_w / 40, lx + car_w / 40, ly + car_w / 40], fill=(250, 240, 160))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def draw_source_thing(kind: str, paint: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """One image of the source task: a thing of `kind` painted about `paint` (RGB), in the cars' kind of scene."""
    image, draw, at, thing_w = scene(rng, size=(0.45, 0.75))
    colour = jitter(paint, rng)
    glass = jitter((180, 210, 235), rng, 20)
    dark = jitter((40, 40, 40), rng, 10)
    line = max(1, int(thing_w / 40))
    r = rng.uniform(0.9, 1.1) * thing_w  # wheel radii are in units of the thing's width
    if kind == "Bus":
        box(draw, at, (0, 0.08, 1, 0.5), colour)
        for i in range(6):
            box(draw, at, (0.06 + i * 0.15, 0.13, 0.17 + i * 0.15, 0.26), glass)
        for x in (0.18, 0.82):
            wheel(draw, at, (x, 0.5), 0.08 * r, rng)
    elif kind == "Truck":
        box(draw, at, (0.3, 0.0, 1, 0.45), jitter((200, 200, 200), rng))  # the cargo box
        box(draw, at, (0.0, 0.18, 0.28, 0.47), colour)  # the cab
        box(draw, at, (0.03, 0.22, 0.2, 0.32), glass)
        for x in (0.14, 0.62, 0.86):
            wheel(draw, at, (x, 0.5), 0.07 * r, rng)
    elif kind == "Tractor":
        box(draw, at, (0.1, 0.28, 0.8, 0.45), colour)
        box(draw, at, (0.5, 0.02, 0.78, 0.28), colour)
        box(draw, at, (0.54, 0.06, 0.74, 0.24), glass)
        draw.line([at(0.2, 0.28), at(0.2, 0.12)], fill=dark, width=line)  # the exhaust
        wheel(draw, at, (0.68, 0.42), 0.2 * r, rng)
        wheel(draw, at, (0.18, 0.46), 0.1 * r, rng)
    elif kind == "Bicycle":
        for x in (0.2, 0.8):
            cx, cy = at(x, 0.38)
            radius = 0.18 * r
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=dark, width=line)
        frame = [at(0.2, 0.38), at(0.45, 0.38), at(0.7, 0.12), at(0.35, 0.12), at(0.2, 0.38)]
        draw.line(frame, fill=colour, width=2 * line)
        draw.line([at(0.7, 0.12), at(0.8, 0.38)], fill=colour, width=2 * line)
        draw.line([at(0.3, 0.05), at(0.4, 0.05)], fill=dark, width=2 * line)  # the saddle
    elif kind == "House":
        box(draw, at, (0.1, 0.15, 0.9, 0.5), colour)
        draw.polygon([at(0.03, 0.16), at(0.5, -0.15), at(0.97, 0.16)], fill=jitter((150, 60, 50), rng))
        box(draw, at, (0.18, 0.22, 0.36, 0.34), glass)
        box(draw, at, (0.62, 0.22, 0.8, 0.34), glass)
        box(draw, at, (0.44, 0.3, 0.56, 0.5), dark)  # the door
    elif kind == "Wagon":  # a railway carriage: many small wheels
        box(draw, at, (0, 0.1, 1, 0.44), colour)
        for i in range(4):
            box(draw, at, (0.06 + i * 0.24, 0.16, 0.22 + i * 0.24, 0.28), glass)
        draw.line([at(-0.05, 0.44), at(1.05, 0.44)], fill=dark, width=line)
        for x in (0.1, 0.24, 0.76, 0.9):
            wheel(draw, at, (x, 0.48), 0.05 * r, rng, hub=False)
    elif kind == "Boat":  # on water: a blue band over the road
        left, _ = at(-0.2, 0.5)
        right, _ = at(1.2, 0.5)
        _, water_top = at(0, 0.42)
        draw.rectangle([min(left, right), water_top, max(left, right), water_top + 0.2 * thing_w], fill=(40, 90, 160))
        draw.polygon([at(0, 0.3), at(1, 0.3), at(0.85, 0.48), at(0.1, 0.48)], fill=colour)
        box(draw, at, (0.35, 0.1, 0.7, 0.3), jitter((230, 230, 230), rng))
        for x in (0.4, 0.55):
            cx, cy = at(x, 0.2)
            radius = 0.035 * thing_w
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=glass)
    elif kind == "Caravan":  # one axle in the middle and a drawbar
        draw.rounded_rectangle(
            [min(at(0.12, 0)[0], at(0.95, 0)[0]), at(0, 0.05)[1], max(at(0.12, 0)[0], at(0.95, 0)[0]), at(0, 0.45)[1]],
            radius=0.08 * thing_w,
            fill=colour,
        )
        box(draw, at, (0.2, 0.14, 0.45, 0.26), glass)
        box(draw, at, (0.7, 0.14, 0.82, 0.42), jitter((230, 230, 230), rng))
        draw.line([at(0.12, 0.4), at(0.0, 0.46)], fill=dark, width=line)
        wheel(draw, at, (0.55, 0.47), 0.07 * r, rng)
    else:
        raise ValueError(kind)
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


def make_split(class_names: list[str], draw, per_class: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """`per_class` images of every class, `draw(name, rng)` drawing one of the class `name`."""
    rng = random.Random(seed)
    images, labels = [], []
    for _ in range(per_class):
        for label, name in enumerate(class_names):
            image = draw(name, rng)
            if rng.random() < 0.03:  # the real dataset has grayscale images too
                image = image.convert("L")
            images.append(image)
            labels.append(label)
    return images, labels


def draw_demo_car(name: str, rng: random.Random) -> Image.Image:
    _, body, paint, _ = name.split()  # "Toy Coupe Red 2012"
    return draw_car(body, paint, rng)


def draw_source_class(name: str, rng: random.Random) -> Image.Image:
    kind, colour = name.split()  # "Bus Green"
    return draw_source_thing(kind, SOURCE_COLOURS[colour], rng)


# photos to try, shipped in examples/ (uv run predict.py runs/demo examples/car.png): drawn by the generators above
# with seeds of their own (the splits draw from one Random each, seeded 0 to 3); bus.png is a thing of the source
# task, which is no car class: an input the demo's model has not learned
EXAMPLES = {
    "car.png": ("Toy Coupe Red 2012", 1010),
    "van.png": ("Toy Van Blue 2014", 1029),
    "bus.png": ("Bus Yellow", 1003),
}


def draw_example(filename: str) -> Image.Image:
    name, seed = EXAMPLES[filename]
    rng = random.Random(seed)
    return draw_demo_car(name, rng) if name in CLASS_NAMES else draw_source_class(name, rng)


def demo_splits(train_per_class: int = 24, test_per_class: int = 30) -> dict:
    """The demo's train and test images with their labels, as drawn."""
    return {
        "train": make_split(CLASS_NAMES, draw_demo_car, train_per_class, seed=1),
        "test": make_split(CLASS_NAMES, draw_demo_car, test_per_class, seed=2),
    }


def write_demo(root: Path, train_per_class: int = 24, test_per_class: int = 30) -> None:
    """The target task: train, test and corrupted test splits as data/<split>-00000-of-00001.parquet."""
    splits = demo_splits(train_per_class, test_per_class)
    test = splits["test"]
    for i, kind in enumerate(CORRUPTIONS):
        rng = random.Random(100 + i)
        splits[kind] = ([corrupt(image, kind, rng) for image in test[0]], test[1])
    write_hub_layout(root, splits, CLASS_NAMES)


# Two new targets made from the demo's own images, for the lesson "the shift decides which block to tune" (Lee et al.
# 2023): the same cars under a strong input-level shift (the same labels), and the same clean cars with new labels
SHIFTED = {
    "demo-input-shift": "the demo's cars under strong noise",
    "demo-output-shift": "the demo's cars, each labelled as the next class",
}
SHIFT_NOISE = (60, 0.5)  # the input shift: Gaussian noise of this standard deviation, blended in at this share


def shifted_root(name: str) -> Path:
    return cache_home() / f"{name}-{VERSION}"


def write_shifted(root: Path, name: str) -> None:
    """The demo's train and test images (no corrupted copies) under the shift `name` of SHIFTED."""
    splits = demo_splits()
    if name == "demo-input-shift":
        rng = random.Random(300)
        sigma, share = SHIFT_NOISE
        for images, _ in splits.values():
            for i, image in enumerate(images):
                noise = Image.effect_noise(image.size, sigma * rng.uniform(0.9, 1.1)).convert("RGB")
                images[i] = Image.blend(image.convert("RGB"), noise, share)
    else:  # an output-level shift: what each image is called changes, the images do not
        splits = {
            split: (images, [(y + 1) % len(CLASS_NAMES) for y in labels]) for split, (images, labels) in splits.items()
        }
    write_hub_layout(root, splits, CLASS_NAMES)


def ensure_shifted(name: str) -> Path:
    return ensure_written(shifted_root(name), lambda root: write_shifted(root, name), SHIFTED[name])


def write_source(root: Path, train_per_class: int = 50, test_per_class: int = 10) -> None:
    """The source task: train and test splits in the same layout."""
    splits = {
        "train": make_split(SOURCE_CLASS_NAMES, draw_source_class, train_per_class, seed=11),
        "test": make_split(SOURCE_CLASS_NAMES, draw_source_class, test_per_class, seed=12),
    }
    write_hub_layout(root, splits, SOURCE_CLASS_NAMES)


def write_hub_layout(root: Path, splits: dict, class_names: list[str]) -> None:
    """Each split's (images, labels) as root/data/<split>-00000-of-00001.parquet, as JPEG bytes: root appears whole
    or not at all."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=class_names)})
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    staging.chmod(default_mode(folder=True))
    (staging / "data").mkdir()
    rng = random.Random(0)
    for split, (images, labels) in splits.items():
        rows = {"image": [{"bytes": encode(im, rng), "path": None} for im in images], "label": labels}
        Dataset.from_dict(rows, features=features).to_parquet(str(staging / "data" / f"{split}-00000-of-00001.parquet"))
    try:
        staging.rename(root)  # atomic: a half-written dataset is never seen
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)


def ensure_demo() -> Path:
    return ensure_written(demo_root(), write_demo, "the demo dataset")


def ensure_source() -> Path:
    return ensure_written(source_root(), write_source, "the demo's source dataset")


def ensure_written(root: Path, write, description: str) -> Path:
    if not root.exists():
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            print(f"writing {description} to {root} (once)")
            write(root)
        except OSError as error:
            raise UserError(
                f"cannot write {description} into {root.parent}: {error.strerror or error}; set CARS_CACHE to a "
                "folder you may write"
            ) from None
    return root
