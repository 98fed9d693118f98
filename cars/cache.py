"""The preprocessing cache, and the loaders that read batches from it.

Decoding full-size JPEGs, not the GPU, bounds a training run (DESIGN.md). So each split is decoded
once, on first use, into one file of uint8 pixels that is memory-mapped: the operating system's page
cache holds it, so RAM stays bounded and every process shares it.

- eval: exactly what the eval transform's Resize + CenterCrop make, resolution x resolution.
- train: every image squashed to side x side (`squash_for_cache`), its original size kept. The
  random crops of every epoch are drawn in fractions of the original image and cut from the
  squashed copy on the device, a batch at a time (transforms.crop_box / crop_batch).

All images of a cache have one shape, so a batch is one indexed read of the file: cheaper than the
copy a DataLoader worker process makes of every batch it hands over. So batches are read in the
training process itself, by a thread that keeps a few ready (CachedLoader).

A cache lives in a folder named after what it holds and a hash of the dataset's fingerprint and
the preprocessing parameters, so a changed dataset or parameter means another folder. It is built
under a temporary name and renamed when complete; a lock makes a second process (torchrun, or a
second run) wait for the first instead of building it twice.
"""

import fcntl
import functools
import hashlib
import json
import os
import queue
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2
from tqdm import tqdm

from cars.data import GlobalBatches, TransformedSplit, make_loader, read_rgb, seeded_torch_rng
from cars.errors import UserError
from cars.transforms import crop_batch, crop_box, eval_transform, extra_augmentation, squash_for_cache, train_transform

VERSION = 2  # bump when the stored format or the preprocessing changes


def cache_home() -> Path:
    """$CARS_CACHE, or ~/.cache/transfer-stanford-cars (the demo dataset lives here too)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transfer-stanford-cars"
    return Path(os.environ.get("CARS_CACHE") or default)


def cache_root(setting: str) -> Path | None:
    """--cache: off (None), auto (the cache home), or a folder."""
    if setting == "off":
        return None
    return cache_home() / "pixels" if setting == "auto" else Path(setting).expanduser()


def fingerprint(split) -> str:
    """What identifies a split's images: the Hugging Face dataset's own fingerprint (it changes with
    the files), or every file's path, size and modification time."""
    if hasattr(split, "dataset"):
        return split.dataset._fingerprint
    digest = hashlib.sha256()
    for path, label in zip(split.paths, split.labels):
        stat = os.lstat(path) if not os.path.exists(path) else os.stat(path)  # a dangling link is an unreadable image, later
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


class PixelCache:
    """A cached split: image i is pixels[i] (HWC uint8, all the same shape); its original size is
    sources[i]. `rows` picks some of the cached split's images (a --val-split share)."""

    def __init__(self, folder: Path, rows=None):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.shape, self.reasons = tuple(meta["shape"]), meta["unreadable"]
        self.sources = np.load(self.folder / "sources.npy")  # (height, width) of each original image
        self.rows = np.arange(len(self.sources)) if rows is None else np.asarray(rows)
        self._pixels = None  # mapped on first use in each process

    def subset(self, rows) -> "PixelCache":
        return PixelCache(self.folder, rows)

    def __len__(self):
        return len(self.rows)

    @property
    def pixels(self) -> torch.Tensor:
        if self._pixels is None:  # copy-on-write: a writable mapping that never writes to the file
            mapped = np.memmap(self.folder / "pixels.u8", np.uint8, mode="c", shape=(len(self.sources), *self.shape, 3))
            self._pixels = torch.from_numpy(mapped)
        return self._pixels

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.pixels[self.rows[i]].permute(2, 0, 1)

    def batch(self, indices, pin_memory: bool = False) -> torch.Tensor:
        """Images `indices` as one NHWC uint8 tensor (in page-locked memory, for a fast copy to the GPU)."""
        rows = torch.from_numpy(self.rows[indices])
        out = torch.empty((len(rows), *self.shape, 3), dtype=torch.uint8, pin_memory=pin_memory)
        return torch.index_select(self.pixels, 0, rows, out=out)

    def unreadable(self) -> dict[int, str]:
        """Why each image that could not be read when the cache was built was not (its pixels are 0)."""
        return {i: self.reasons[str(row)] for i, row in enumerate(self.rows) if str(row) in self.reasons}


class Preprocessed(torch.utils.data.Dataset):
    """What the cache stores of each image, computed in DataLoader workers: HWC uint8 pixels and
    the original (height, width), or why the image could not be read."""

    def __init__(self, split, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        try:
            image = read_rgb(self.split, i)
        except UserError as error:
            return str(error)
        return self.transform(image).permute(1, 2, 0).contiguous().numpy(), (image.height, image.width)


def keep_as_is(sample):
    return sample


def is_complete(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        expected = meta["images"] * meta["shape"][0] * meta["shape"][1] * 3
        return (folder / "pixels.u8").stat().st_size == expected and len(np.load(folder / "sources.npy")) == meta["images"]
    except (OSError, ValueError, KeyError):
        return False


def build(split, transform, shape: tuple[int, int], folder: Path, description: str, workers: int, meta: dict) -> None:
    """Decode every image of `split` once (in `workers` processes) and write its pixels to `folder`."""
    folder.mkdir(parents=True)
    # its own generator: drawing the workers' seeds from the global one would make a run depend on whether the cache existed
    loader = torch.utils.data.DataLoader(Preprocessed(split, transform), batch_size=None, num_workers=workers, collate_fn=keep_as_is,
                                         generator=torch.Generator())
    sources, unreadable = np.zeros((len(split), 2), np.int64), {}
    blank = np.zeros((*shape, 3), np.uint8)
    with open(folder / "pixels.u8", "wb") as out:
        for i, sample in enumerate(tqdm(loader, desc=description, unit="img", dynamic_ncols=True)):
            if isinstance(sample, str):  # unreadable: zeros in its place; whether that is fatal is the caller's choice
                unreadable[str(i)] = sample
                out.write(blank.tobytes())
                continue
            pixels, sources[i] = sample
            out.write(pixels.tobytes())
    np.save(folder / "sources.npy", sources)
    meta = {**meta, "shape": list(shape), "images": len(split), "unreadable": unreadable}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the cache complete


def cached_pixels(split, kind: str, size: int, transform, root: Path, workers: int = 0, log=print) -> PixelCache:
    """The cache of `split` made by `transform` (kind 'train' or 'eval': size x size pixels), built
    first if it does not exist yet. A subset of a split (--val-split) shares its parent's cache."""
    rows = getattr(split, "indices", None)
    base = split.parent if rows is not None else split
    meta = {"version": VERSION, "fingerprint": fingerprint(base), "split": base.name, "kind": kind, "size": size}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    folder = root / f"{base.name}-{kind}{size}-{key}"
    if not is_complete(folder):
        try:
            root.mkdir(parents=True, exist_ok=True)
            with open(root / f"{folder.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another process building this cache: wait for it to finish
                if not is_complete(folder):
                    if folder.exists():
                        log(f"cache {folder} is incomplete (a build was interrupted?); rebuilding it")
                        shutil.rmtree(folder)
                    partial = root / f"{folder.name}.partial"  # left over only by a killed build: nobody else holds the lock
                    shutil.rmtree(partial, ignore_errors=True)
                    what = f"{kind} images of the {base.name} split ({size} x {size} px)"
                    build(base, transform, (size, size), partial, f"caching {what}", workers, meta)
                    os.rename(partial, folder)
                    log(f"cached the {what} in {folder} ({(folder / 'pixels.u8').stat().st_size / 2**20:.0f} MiB)")
        except OSError as error:
            raise UserError(f"cannot write the preprocessing cache in {root}: {error}; pass --cache DIR for another folder or --cache off") from None
    cache = PixelCache(folder)
    return cache.subset(rows) if rows is not None else cache


class CachedSplit:
    """A split's cached images, with the per-image random crop and flip of each epoch: drawn from
    (seed, epoch, i) alone, like TransformedSplit's, whatever the process or an interruption."""

    def __init__(self, cache: PixelCache, split, crop_config=None, seed: int = 0):
        self.cache, self.labels, self.crop_config, self.seed = cache, torch.as_tensor(split.labels), crop_config, seed
        self.readable = np.ones(len(cache), bool)  # False for the images skipped with --skip-bad-images
        self.readable[list(cache.unreadable())] = False
        self.epoch = 0

    def __len__(self):
        return len(self.cache)

    def crops(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop boxes (fractions of each image) and horizontal flips for images `indices`."""
        boxes, flips = [], []
        for i in indices:
            rng = random.Random(hash((self.seed, self.epoch, int(i))))
            boxes.append(crop_box(*self.cache.sources[self.cache.rows[i]], self.crop_config, rng))
            flips.append(rng.random() < 0.5)
        return torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips)


class CachedLoader:
    """Batches of a CachedSplit on the device, uint8 NCHW, and their labels: read in this process by
    a thread that stays a few batches ahead; for training, cropped and flipped on the device, then
    given the config's extra augmentation image by image. Same batches as make_loader would make."""

    def __init__(self, dataset: CachedSplit, batch_size: int, shuffle: bool, seed: int, device_type: str, rank: int = 0, world: int = 1,
                 extra=None):
        self.dataset, self.device_type, self.extra = dataset, device_type, extra
        self.generator = torch.Generator().manual_seed(seed)
        if shuffle:
            self.batch_sampler = GlobalBatches(len(dataset), batch_size, self.generator, rank, world)
        else:  # this process's share of the images, in order
            share, per_process = list(range(rank, len(dataset), world)), max(1, batch_size // world)
            self.batch_sampler = [share[start : start + per_process] for start in range(0, len(share), per_process)]

    def __len__(self):
        return len(self.batch_sampler)

    def read(self, indices):
        indices = [i for i in indices if self.dataset.readable[i]]
        if not indices:
            return None
        batch = [self.dataset.cache.batch(indices, pin_memory=self.device_type == "cuda"), self.dataset.labels[indices]]
        if self.dataset.crop_config is None:  # evaluation: the cached pixels are final
            return batch
        boxes, flips = self.dataset.crops(indices)
        return [*batch, boxes, flips, indices]

    def __iter__(self):
        ready, stop = queue.Queue(maxsize=3), threading.Event()

        def offer(item) -> None:  # wait for room, unless the consumer has gone (a break, an error)
            while not stop.is_set():
                try:
                    return ready.put(item, timeout=0.1)
                except queue.Full:
                    pass

        def read_ahead():
            try:
                for indices in self.batch_sampler:
                    offer(self.read(indices))
                offer(StopIteration)
            except BaseException as error:  # handed to the training loop, which raises it
                offer(error)

        threading.Thread(target=read_ahead, daemon=True).start()
        try:
            while (batch := ready.get()) is not StopIteration:
                if isinstance(batch, BaseException):
                    raise batch
                yield None if batch is None else self.finish(*batch)
        finally:
            stop.set()

    def finish(self, pixels, labels, boxes=None, flips=None, indices=None):
        pixels = pixels.to(self.device_type, non_blocking=True).permute(0, 3, 1, 2)  # NCHW, channels-last in memory
        labels = labels.to(self.device_type, non_blocking=True)
        if boxes is None:
            return pixels, labels
        crops = crop_batch(pixels, boxes, flips, self.dataset.crop_config.resolution)
        if self.extra is not None:  # per image, each seeded from (seed, epoch, i): v2 would give a whole batch one draw
            for n, i in enumerate(indices):  # (a hash of numbers only: a string's hash differs from process to process)
                with seeded_torch_rng(hash((self.dataset.seed, self.dataset.epoch, i, 1)) % 2**62):
                    crops[n] = self.extra(crops[n])
        return crops, labels


def train_cache_side(cfg) -> int:
    """1.5 x resolution: a crop spanning two thirds of the image's width and height or more (about
    half its area) is shrunk, never enlarged, to the resolution."""
    return cfg.cache_side or round(1.5 * cfg.resolution)


def checked(cache: PixelCache, skip_bad_images: bool) -> PixelCache:
    """Unreadable images are known once the cache is built: stop now rather than in the middle of an epoch."""
    unreadable = cache.unreadable()
    if unreadable and not skip_bad_images:
        count = f" ({len(unreadable)} in all)" if len(unreadable) > 1 else ""
        raise UserError(f"{next(iter(unreadable.values()))}{count}. Replace or remove it, or pass --skip-bad-images to skip unreadable images")
    return cache


def train_loader(split, cfg, workers: int, device_type: str = "cpu", rank: int = 0, world: int = 1):
    """The training batches, augmented afresh every epoch: from the cache (built on first use), or
    (--cache off) decoded and augmented image by image in DataLoader workers."""
    root = cache_root(cfg.cache)
    if root is None:
        dataset = TransformedSplit(split, train_transform(cfg), cfg.skip_bad_images, seed=cfg.seed)
        return make_loader(dataset, cfg.batch_size, True, workers, cfg.seed, device_type == "cuda", rank, world)
    side = train_cache_side(cfg)
    cache = checked(cached_pixels(split, "train", side, functools.partial(squash_for_cache, side=side), root, workers), cfg.skip_bad_images)
    extra = extra_augmentation(cfg)
    return CachedLoader(CachedSplit(cache, split, cfg, cfg.seed), cfg.batch_size, True, cfg.seed, device_type, rank, world,
                        extra=v2.Compose(extra) if extra else None)


def eval_loader(split, resolution: int, cache: str, skip_bad_images: bool, batch_size: int, workers: int, device_type: str = "cpu",
                rank: int = 0, world: int = 1):
    """The images as evaluation sees them; the cache holds them finished, so nothing is left to do per epoch."""
    root = cache_root(cache)
    if root is None:
        dataset = TransformedSplit(split, eval_transform(resolution), skip_bad_images)
        return make_loader(dataset, batch_size, False, workers, 0, device_type == "cuda", rank, world)
    pixels = checked(cached_pixels(split, "eval", resolution, eval_transform(resolution), root, workers), skip_bad_images)
    return CachedLoader(CachedSplit(pixels, split), batch_size, False, 0, device_type, rank, world)
