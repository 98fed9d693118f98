"""Offline fixtures: tiny datasets in every supported layout, caches in temporary folders."""

import io
import os
import random
from pathlib import Path
from types import SimpleNamespace


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# pyproject's addopts run the suite in several processes (pytest -n auto: the cores and one more, see the hook at the
# end): each computes on its share of the cores (one thread under -n auto), so that they do not fight over them; the
# tools the tests start inherit it
if os.environ.get("PYTEST_XDIST_WORKER"):
    share = max(1, usable_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(share))

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

CLASSES = ["AM General Hummer SUV 2000", "Audi S5 Coupe 2012", "BMW M3 Coupe 2012"]
ROOT = Path(__file__).resolve().parents[1]


def quick_start() -> dict[str, list[str]]:
    """The README's quick-start commands, by tool: {"train.py": ["--config", "configs/demo.toml"], ...}. The tests
    that run the demo take their commands from here, so the README shows what is tested."""
    import shlex

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- quick start", 1)[1].split("```", 2)[1]
    commands = {}
    for line in block.strip().splitlines():
        words = shlex.split(line, comments=True)
        assert words[:2] == ["uv", "run"], f"a quick-start line that is not `uv run TOOL ...`: {line}"
        commands[words[2]] = words[3:]
    return commands


@pytest.fixture(scope="session", autouse=True)
def offline_caches(tmp_path_factory):
    """Every cache the code touches lives in a temporary folder; nothing reaches a network."""
    root = tmp_path_factory.mktemp("caches")
    env = {
        "CARS_CACHE": str(root / "cars"),
        "HF_DATASETS_CACHE": str(root / "hf_datasets"),
        "HF_HOME": str(root / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TORCH_HOME": str(root / "torch"),
        "MPLBACKEND": "Agg",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield root
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def car_image(label: int, rng: random.Random, mode: str = "RGB") -> Image.Image:
    """A small image whose colour depends on the label, so a model can learn it."""
    colour = [(220, 40, 40), (40, 200, 40), (40, 40, 220)][label % 3]
    size = (rng.randint(24, 60), rng.randint(20, 44))
    image = Image.new("RGB", size, tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in colour))
    return image.convert(mode)


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def split_rows(per_class: int, seed: int, grayscale_every: int = 7):
    rng = random.Random(seed)
    images, labels = [], []
    for i in range(per_class * len(CLASSES)):
        label = i % len(CLASSES)
        images.append(car_image(label, rng, "L" if i % grayscale_every == 0 else "RGB"))
        labels.append(label)
    return images, labels


def write_hub_folder(root: Path, per_class=(6, 3), columns=("image", "label"), classes=CLASSES, rows=None) -> Path:
    """A folder laid out like the hub repo: data/train-*.parquet and data/test-*.parquet."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    (root / "data").mkdir(parents=True)
    features = Features({columns[0]: ImageFeature(), columns[1]: ClassLabel(names=list(classes))})
    for split, n, seed in (("train", per_class[0], 1), ("test", per_class[1], 2)):
        images, labels = rows[split] if rows and split in rows else split_rows(n, seed)
        encoded = [
            {"bytes": image if isinstance(image, bytes) else jpeg_bytes(image), "path": None} for image in images
        ]
        Dataset.from_dict({columns[0]: encoded, columns[1]: labels}, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    return root


@pytest.fixture
def hub_folder(tmp_path):
    return write_hub_folder(tmp_path / "hub")


def write_image_folder(root: Path, per_class=(6, 3)) -> Path:
    for split, n, seed in (("train", per_class[0], 1), ("test", per_class[1], 2)):
        images, labels = split_rows(n, seed)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:04d}.jpg")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "imagefolder")


@pytest.fixture
def devkit_folder(tmp_path):
    """The original Stanford Cars devkit layout that torchvision.datasets.StanfordCars reads."""
    import numpy as np
    import scipy.io

    base = tmp_path / "devkit_root" / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array(CLASSES, dtype=object)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names.reshape(1, -1)})
    for split, n, seed, mat in (
        ("train", 6, 1, base / "devkit" / "cars_train_annos.mat"),
        ("test", 3, 2, base / "cars_test_annos_withlabels.mat"),
    ):
        images, labels = split_rows(n, seed)
        (base / f"cars_{split}").mkdir()
        records = []
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            fname = f"{i + 1:05d}.jpg"
            image.save(base / f"cars_{split}" / fname)
            records.append((0, 0, image.width, image.height, label + 1, fname))  # devkit classes count from 1
        dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
        scipy.io.savemat(mat, {"annotations": np.array(records, dtype=dtype).reshape(1, -1)})
    return tmp_path / "devkit_root"


@pytest.fixture
def saved_folder(tmp_path, hub_folder):
    import datasets

    path = tmp_path / "saved"
    datasets.load_dataset(str(hub_folder), data_files={"train": "data/train-*", "test": "data/test-*"}).save_to_disk(
        str(path)
    )
    return path


# the demo's network: a tiny run in half a ResNet-18's time, for tests where nothing depends on the network (but
# longer in torch.compile and the exporters: more, smaller operations; docs/benchmarks.md)
FAST_ARCH = "shufflenet_v2_x0_5"


def tiny_args(data, run_dir, *extra, arch: str = "resnet18") -> list[str]:
    """Flags for a run that takes a second or two on a CPU. A ResNet-18 by default, whose layers the tests name;
    `arch=FAST_ARCH` where nothing depends on the network."""
    recipe = f"--arch {arch} --weights none --resolution 32 --batch-size 6 --epochs 2 --workers 0 --lr 0.01"
    return ["--data", str(data), "--run-dir", str(run_dir), *recipe.split(), *extra]


def tiny_run(data, run_dir, *extra):
    """train.py's setup for a tiny run: the Run its loop works on, for tests of one epoch's steps."""
    import train

    return train.setup(train.parse_train(tiny_args(data, run_dir, *extra)), command=["train.py"])


class FixedBatches(list):
    """Batches given in advance, with what train.py sets on its training batches each epoch."""

    def __init__(self, batches):
        super().__init__(batches)
        self.batch_sampler = SimpleNamespace(generator=torch.Generator(), skip=0)
        self.dataset = SimpleNamespace(epoch=0)


# --- transfer: a demo-pretrained weights file made in seconds ---------------------------------------------------

SOURCE_KINDS = ("Bus", "Tractor", "Bicycle", "House")  # four of the demo source task's eight kinds of thing


def write_kinds(root: Path, kinds, *, per_class: tuple[int, int], seed: int, paints) -> Path:
    """A hub-layout dataset whose classes are kinds of the source task's things, each image in one of `paints`
    (RGB) at random: the class is the kind, whatever its colour."""
    from cars.demo import draw_source_thing, make_split, write_hub_layout

    def draw(kind, rng):
        return draw_source_thing(kind, rng.choice(paints), rng)

    root.parent.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": make_split(list(kinds), draw, per_class[0], seed=seed),
        "test": make_split(list(kinds), draw, per_class[1], seed=seed + 1),
    }
    write_hub_layout(root, splits, list(kinds))
    return root


TINY_SOURCE_RECIPE = """# configs/demo_source.toml, shrunk for the tests: 4 classes instead of 40
data = "{data}"
arch = "shufflenet_v2_x0_5"
weights = "none"
resolution = 48
batch_size = 16
epochs = {epochs}
optimizer = "adamw"
lr = 0.01
weight_decay = 0.05
scheduler = "cosine"
seed = 0
workers = 0
"""


@pytest.fixture(scope="session")
def demo_pretrained(tmp_path_factory, offline_caches):
    """The demo-pretrained file for shufflenet_v2_x0_5 in the session's cache, made by train.py's own pretraining
    (pretrain_on_demo_source) on a 4-class source task in seconds, instead of configs/demo_source.toml's minutes; then
    placed where --weights demo-pretrained looks for the real recipe's weights."""
    import shutil

    import train
    from cars import demo
    from cars.config import Config
    from cars.files import made_once

    # made once for the whole run: pytest -n's processes share a folder above their own
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    kept = shared / "demo-pretrained" / "shufflenet_v2_x0_5.pth"
    with made_once(kept, "the tests' demo-pretrained weights") as to_make:
        if to_make:
            root = tmp_path_factory.mktemp("source")
            data = write_kinds(
                root / "data", SOURCE_KINDS, per_class=(40, 10), seed=1, paints=list(demo.SOURCE_COLOURS.values())
            )
            recipe = root / "tiny_source.toml"
            recipe.write_text(TINY_SOURCE_RECIPE.format(data=data, epochs=8))
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(demo, "SOURCE_RECIPE", recipe)
                train.pretrain_on_demo_source(Config(arch="shufflenet_v2_x0_5", workers=0))
                made = demo.demo_pretrained_path("shufflenet_v2_x0_5")  # named after the recipe it was made by
            shutil.copyfile(made, kept.with_suffix(".partial"))
            kept.with_suffix(".partial").rename(kept)  # whole, or not there
    return place_demo_pretrained(kept)


def place_demo_pretrained(weights_file: Path) -> Path:
    """Copy a demo-pretrained file to where --weights demo-pretrained looks under the current $CARS_CACHE."""
    import shutil

    from cars.demo import demo_pretrained_path

    target = demo_pretrained_path("shufflenet_v2_x0_5")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights_file, target)
    return target


@pytest.fixture(scope="session", autouse=True)
def no_fsync():
    """fsync makes a file survive a power cut, which no test simulates (a killed process leaves the page cache
    behind); without it a tiny run's checkpoints take half as long to write."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: None)
        yield


def pytest_xdist_auto_num_workers(config):
    """pytest -n auto: one process more than the cores. A test waits part of its time (on the tools it starts, on
    the disk): two processes on two cores left a sixth of the CPU idle."""
    return usable_cores() + 1
