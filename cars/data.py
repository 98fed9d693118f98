"""Where images come from: every source becomes (train, eval[, test]) splits plus class names.

Sources (`--data`): a hub id, a `save_to_disk` folder, a folder of parquet files laid out like
the hub repo, an ImageFolder tree, the Stanford Cars devkit layout, or the synthetic `demo` and `demo-source`.
Images stay encoded until read_rgb decodes them (once, into the cache), and every one becomes RGB there.
"""

import functools
import io
import os
import random
import re
import stat
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from cars.demo import SHIFTED, ensure_demo, ensure_shifted, ensure_source
from cars.errors import UserError

HUB_SPLIT_FILES = "data/{split}-*.parquet"  # the hub's layout; loading by pattern fetches only these splits


class HubSplit:
    """A split of a Hugging Face dataset, images kept as undecoded bytes."""

    def __init__(self, dataset, name: str):
        from datasets import Image as ImageFeature

        self.dataset = dataset.cast_column("image", ImageFeature(decode=False))
        self.name = name
        self.labels = list(dataset["label"])

    def __len__(self):
        return len(self.labels)

    def open(self, i: int) -> Image.Image:
        image = self.dataset[i]["image"]
        return Image.open(io.BytesIO(image["bytes"])) if image["bytes"] else open_image_file(image["path"])

    def where(self, i: int) -> str:
        return f"row {i} of the {self.name} split"


def open_image_file(path) -> Image.Image:
    """PIL's Image.open of a regular file only: a pipe would block forever, waiting for a writer."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError("not a regular file (a pipe, a device or a folder)")
    return Image.open(path)


class FileSplit:
    """A split of image files on disk: (path, label) pairs."""

    def __init__(self, samples: list[tuple[str, int]], name: str):
        self.paths = [path for path, _ in samples]
        self.labels = [label for _, label in samples]
        self.name = name

    def __len__(self):
        return len(self.labels)

    def open(self, i: int) -> Image.Image:
        return open_image_file(self.paths[i])

    def where(self, i: int) -> str:
        return self.paths[i]


class SubsetSplit:
    """Some rows of another split (the held-out validation fraction, or what is left of train)."""

    def __init__(self, parent, indices: list[int], name: str):
        self.parent, self.indices, self.name = parent, indices, name
        self.labels = [parent.labels[i] for i in indices]

    def __len__(self):
        return len(self.indices)

    def open(self, i: int) -> Image.Image:
        return self.parent.open(self.indices[i])

    def where(self, i: int) -> str:
        return self.parent.where(self.indices[i])


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency onto white, 16/32-bit grayscale rescaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        span = max(pixels.max() - pixels.min(), 1e-12)
        image = Image.fromarray(((pixels - pixels.min()) / span * 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


# what PIL raises for a file it cannot decode: corrupt, truncated, not an image (UnidentifiedImageError is an
# OSError), so large that it refuses (a decompression bomb), or bytes a decoder did not expect (a truncated QOI file
# raises IndexError)
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, IndexError, EOFError, struct.error)


def upright(image: Image.Image) -> Image.Image:
    """The image as a browser shows it: a phone photo's EXIF orientation applied to its pixels. EXIF that PIL cannot
    parse (a tag of the wrong type beside the orientation, common from editors) leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (*UNREADABLE, TypeError, KeyError, AttributeError):
        return image


def read_rgb(split, i: int) -> Image.Image:
    try:
        with split.open(i) as image:
            image.load()
            return to_rgb(upright(image))
    except UNREADABLE as error:
        raise UserError(f"cannot read image {split.where(i)}: {error}") from None


@dataclass
class Splits:
    train: object
    eval: object  # chooses the best epoch: the test split, or the held-out validation split
    test: object | None  # the test split when it is not the eval split (with --val-split)
    class_names: list[str]

    @property
    def eval_name(self) -> str:
        return self.eval.name


def load_splits(
    data: str, val_split: float = 0.0, seed: int = 0, *, per_class: int = 0, fraction: float = 1.0, subset_seed: int = 0
) -> Splits:
    """The splits of `data`: with `val_split`, a stratified fraction of train held out to choose the epoch (drawn with
    `seed`); with `per_class` or `fraction`, training on part of what is left (see `training_subset`)."""
    train, test, class_names = open_source(data)
    for split in (train, test):
        check_labels(split, len(class_names))
    if val_split == 0:
        splits = Splits(train, test, None, class_names)
    else:
        splits = held_out_split(train, test, class_names, val_split, seed)
    if per_class or fraction < 1:
        splits.train = training_subset(
            splits.train, class_names, per_class=per_class, fraction=fraction, seed=subset_seed
        )
    return splits


def run_splits(cfg) -> Splits:
    """The splits a run's config names: its data, validation split and training subset."""
    return load_splits(
        cfg.data,
        cfg.val_split,
        cfg.split_seed,
        per_class=cfg.train_per_class,
        fraction=cfg.train_fraction,
        subset_seed=cfg.subset_seed,
    )


def held_out_split(train, test, class_names: list[str], val_split: float, seed: int) -> Splits:
    keep, held_out = stratified_split(train.labels, val_split, seed)
    if not held_out:
        raise UserError(
            f"--val-split {val_split} holds out no image: every class has a single training image. "
            "Use the test split to choose the epoch (--val-split 0)"
        )
    missing = len(class_names) - len({train.labels[i] for i in held_out})
    if missing:
        print(
            f"note: {missing} of {len(class_names)} classes have a single training image and are not in the validation "
            "split"
        )
    return Splits(SubsetSplit(train, keep, "train"), SubsetSplit(train, held_out, "val"), test, class_names)


def training_subset(train, class_names: list[str], *, per_class: int, fraction: float, seed: int) -> SubsetSplit:
    """Part of the training split: exactly `per_class` images of every class, or `fraction` of each class's (at least
    one). Each class's images are put in an order drawn from (seed, class) alone, and the subset is the start of that
    order: the same on any machine, and nested (the 4-image subset is inside the 8-image one of the same seed), so
    points of a curve differ only by the images added. A class with fewer than `per_class` images is refused: a curve
    point that claims K images per class must have them."""
    parent, by_class = rows_by_class(train)
    chosen = []
    for label in range(len(class_names)):
        indices = sorted(by_class[label])
        random.Random(f"subset {seed} class {label}").shuffle(indices)  # a str seed: the same on every machine
        count = per_class if per_class else max(1, round(len(indices) * fraction))
        if count > len(indices):
            raise UserError(
                f"--train-per-class {per_class}: class {class_names[label]!r} has only {len(indices)} training images"
                f"{' after the validation split' if isinstance(train, SubsetSplit) else ''}; choose at most "
                f"{min(len(v) for v in by_class.values()) if len(by_class) == len(class_names) else 0}, or use "
                "--train-fraction"
            )
        chosen += indices[:count]
    return SubsetSplit(parent, sorted(chosen), "train")


def spread_sample(split, count: int, seed: int) -> SubsetSplit:
    """`count` images of a split spread over its classes as evenly as they allow: every class gives one image before
    any class gives a second, each class's images taken in an order drawn from (seed, class). The stored order (an
    ImageFolder lists class after class) never decides which classes are seen. Fewer images when the split has fewer."""
    parent, by_class = rows_by_class(split)
    for label, indices in by_class.items():
        random.Random(f"sample {seed} class {label}").shuffle(indices)  # a str seed: the same on every machine
    chosen, depth, wanted = [], 0, min(count, len(split))
    while len(chosen) < wanted:
        round_ = [indices[depth] for _, indices in sorted(by_class.items()) if depth < len(indices)]
        random.Random(f"sample {seed} round {depth}").shuffle(round_)  # a last, partial round: classes drawn too
        chosen += round_[: wanted - len(chosen)]
        depth += 1
    return SubsetSplit(parent, sorted(chosen), split.name)


def rows_by_class(split) -> tuple[object, dict[int, list[int]]]:
    """The split a split's images are rows of (itself, or a subset's parent), and those rows by class, in their
    order."""
    parent = split.parent if isinstance(split, SubsetSplit) else split
    rows = split.indices if isinstance(split, SubsetSplit) else range(len(split))
    by_class = defaultdict(list)
    for row in rows:
        by_class[parent.labels[row]].append(row)
    return parent, by_class


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out `fraction` of each class (at least one image where a class has two or more)."""
    by_class = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    rng = random.Random(seed)
    keep, held_out = [], []
    for label in sorted(by_class):
        indices = by_class[label]
        rng.shuffle(indices)
        n = min(max(1, round(len(indices) * fraction)), len(indices) - 1)
        held_out += indices[:n]
        keep += indices[n:]
    return sorted(keep), sorted(held_out)


def check_labels(split, num_classes: int) -> None:
    if len(split) == 0:
        raise UserError(f"the {split.name} split is empty: the dataset needs images in both train and test")
    for i, label in enumerate(split.labels):
        if not 0 <= label < num_classes:
            raise UserError(
                f"label {label} of {split.where(i)} is outside the {num_classes} classes (0..{num_classes - 1}); fix "
                "the dataset's labels"
            )


def label_map(model_names: list[str], data_names: list[str], data: str) -> torch.Tensor | None:
    """How the dataset's labels translate to the model's class indices: None when both list the same
    names in the same order, a lookup table when the same names come in another order (label ->
    model index, matched by name). Other names are refused: the model cannot be scored on them."""
    if list(model_names) == list(data_names):
        return None
    if sorted(model_names) != sorted(data_names) or len(set(data_names)) != len(data_names):
        other = (
            sorted(set(data_names) - set(model_names))
            or sorted(set(model_names) - set(data_names))
            or ["(duplicated names)"]
        )
        raise UserError(
            f"{data} has other classes than the model ({len(data_names)} against {len(model_names)}; "
            f"first difference: {other[0]!r}); pass the --data the model was trained on"
        )
    index = {name: i for i, name in enumerate(model_names)}
    return torch.tensor([index[name] for name in data_names])


# the synthetic datasets (cars/demo.py): local folders in the hub layout, written on first use
DEMO_DATASETS = {
    "demo": (ensure_demo, "the demo dataset"),
    "demo-source": (ensure_source, "the demo's source dataset"),
    **{name: (functools.partial(ensure_shifted, name), words) for name, words in SHIFTED.items()},
}


def dataset_location(data: str) -> str:
    """The folder of `demo` or `demo-source`; anything else is itself."""
    if data in DEMO_DATASETS:
        return str(DEMO_DATASETS[data][0]())
    return data


def open_source(data: str):
    """Recognise what `data` names and open its train and test splits."""
    if data in DEMO_DATASETS:
        return open_hub_dataset(dataset_location(data), DEMO_DATASETS[data][1])
    path = Path(data).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").exists():
            return open_saved_dataset(path)
        if any(path.glob("data/train-*.parquet")):
            return open_hub_dataset(str(path), str(path))
        if (path / "train").is_dir():
            return open_image_folder(path)
        if (path / "stanford_cars" / "devkit").is_dir() or (path / "devkit").is_dir():
            return open_devkit(path)
        raise UserError(
            f"{path} is not a dataset folder I know: expected dataset_dict.json (save_to_disk), data/train-*.parquet "
            "(hub layout), "
            "train/<class>/*.jpg and test/<class>/*.jpg (ImageFolder), or stanford_cars/devkit (the original devkit)"
        )
    if path.exists():
        raise UserError(f"--data {data} is a file; give the folder that holds the dataset")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", data) and not data.startswith("."):
        return open_hub_dataset(data, f"the Hugging Face hub dataset {data}")
    raise UserError(
        f"dataset folder {data} does not exist; give a local folder, a hub id such as tanganke/stanford_cars, or 'demo'"
    )


# the corrupted copies of the test split that Stanford Cars on the hub ships
CORRUPTIONS = ("contrast", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate", "spatter")


def corruption_splits(data: str) -> list[str]:
    """The corrupted test copies a hub-layout dataset has (none for other layouts)."""
    data = dataset_location(data)
    if Path(data).is_dir():
        return [c for c in CORRUPTIONS if any(Path(data).glob(f"data/{c}-*.parquet"))]
    try:
        from huggingface_hub import list_repo_files

        files = list_repo_files(data, repo_type="dataset")
    except Exception as error:
        raise UserError(
            f"could not list the files of {data} to find its corrupted splits: {str(error).splitlines()[0]}"
        ) from None
    return [c for c in CORRUPTIONS if any(f.startswith(f"data/{c}-") for f in files)]


def open_hub_dataset(location: str, description: str, splits=("train", "test")):
    """A hub id or a local folder in the hub's layout: only the named splits' files are read."""
    import datasets

    data_files = {split: HUB_SPLIT_FILES.format(split=split) for split in splits}
    try:
        loaded = datasets.load_dataset(location, data_files=data_files)
    except Exception as error:  # the hub raises many kinds (offline, not found, gated): all mean the same to the user
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"could not load {description}: {first_line}. Check the name and your network, or pass a local folder with "
            "--data"
        ) from None
    return from_hf(loaded, description, splits)


def open_saved_dataset(path: Path):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:
        raise UserError(f"could not read the saved dataset {path}: {error}") from None
    missing = [s for s in ("train", "test") if s not in loaded]
    if missing:
        raise UserError(f"{path} has splits {list(loaded)}; it needs train and test (missing: {', '.join(missing)})")
    return from_hf(loaded, str(path), ("train", "test"))


def from_hf(loaded, description: str, splits):
    first = loaded[splits[0]]
    missing = {"image", "label"} - set(first.column_names)
    if missing:
        raise UserError(
            f"{description} has columns {first.column_names}; it needs 'image' and 'label' (missing: "
            f"{', '.join(sorted(missing))})"
        )
    label_feature = first.features["label"]
    if hasattr(label_feature, "names"):
        class_names = list(label_feature.names)
    elif label_feature.dtype not in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
        raise UserError(
            f"the label column of {description} holds {label_feature.dtype} values; it must hold class numbers "
            "(a ClassLabel column, or integers 0..N-1)"
        )
    else:
        top = max(max(loaded[s]["label"]) for s in splits)
        class_names = [f"class {i}" for i in range(top + 1)]
        print(
            f"note: {description} has no class names (its label column is not a ClassLabel); using 'class 0'..'class "
            f"{top}'"
        )
    return *(HubSplit(loaded[s], s) for s in splits), class_names


def open_image_folder(path: Path):
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    eval_dir = next((path / name for name in ("test", "val", "validation") if (path / name).is_dir()), None)
    if eval_dir is None:
        raise UserError(f"{path} has train/ but no test/ (or val/) folder next to it")
    try:
        class_names, class_to_idx = find_classes(str(path / "train"))
    except FileNotFoundError as error:
        raise UserError(f"{path / 'train'}: {error}") from None
    unknown = sorted({d.name for d in eval_dir.iterdir() if d.is_dir()} - set(class_names))
    if unknown:
        raise UserError(f"{eval_dir} has classes that train/ lacks: {', '.join(unknown[:5])}")
    extensions = (*IMG_EXTENSIONS, ".gif")  # PIL reads GIFs (their first frame); torchvision's list leaves them out
    splits = []
    for name, folder in (("train", path / "train"), ("test", eval_dir)):
        samples, seen = [], set()
        for file, label in make_dataset(str(folder), class_to_idx, extensions=extensions, allow_empty=True):
            real = os.path.realpath(file)
            if real not in seen:  # a symlink loop would list the same files again and again
                seen.add(real)
                samples.append((file, label))
        splits.append(FileSplit(samples, name))
        ignored = sum(1 for _, _, files in os.walk(folder) for f in files if not f.lower().endswith(extensions))
        if ignored:
            print(
                f"note: {folder} has {ignored} files that are not images ({', '.join(extensions)}); they were left out"
            )
    empty = sorted(set(class_names) - {class_names[label] for label in splits[0].labels})
    if empty:
        raise UserError(
            f"class folder {path / 'train' / empty[0]} has no images"
            f"{f' ({len(empty)} such folders)' if len(empty) > 1 else ''}; a class needs training images: add some or "
            "remove it"
        )
    return *splits, class_names


def open_devkit(path: Path):
    from torchvision.datasets import StanfordCars

    root = path if (path / "stanford_cars").is_dir() else path.parent
    splits = []
    for name in ("train", "test"):
        try:
            dataset = StanfordCars(str(root), split=name)
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            raise UserError(f"{path} does not hold a complete Stanford Cars devkit ({name} split: {error})") from None
        splits.append(FileSplit(dataset._samples, name))
    return *splits, [str(name) for name in dataset.classes]
