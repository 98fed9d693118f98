"""The preprocessing cache: every image is decoded once, stored as uint8 pixels, memory-mapped.

Decoding full-size JPEGs, not the GPU, bounds a training run (DESIGN.md). So each split is decoded
once, on first use, and kept in one flat file of pixels that every DataLoader worker maps into
memory: the operating system's page cache holds it, so RAM stays bounded and workers share it.

- eval: exactly what the eval transform's Resize + CenterCrop make, resolution x resolution.
- train: each image resized so its shorter side is `side` (never enlarged; aspect ratio kept).
  The random crops of every epoch are cut from these, with the same scale and aspect-ratio
  distribution as from the full image.

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
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cars.data import TransformedSplit, read_rgb
from cars.errors import UserError
from cars.transforms import eval_transform, shrink_for_cache, train_transform

VERSION = 1  # bump when the stored format or the preprocessing changes


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
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


class PixelCache:
    """The cached images of a split as uint8 CHW tensors; None for an image that could not be read."""

    def __init__(self, folder: Path, rows=None):
        self.folder = Path(folder)
        self.index = np.load(self.folder / "index.npy")  # one row per image: offset, height, width
        self.rows = rows  # a subset of the cached split's images (a --val-split share), or all of them
        self._pixels = None  # mapped on first use in each process, so pickling for workers copies nothing

    def subset(self, rows) -> "PixelCache":
        return PixelCache(self.folder, rows)

    def __len__(self):
        return len(self.rows) if self.rows is not None else len(self.index)

    def __getstate__(self):
        return {**self.__dict__, "_pixels": None}

    def __getitem__(self, i: int) -> torch.Tensor | None:
        offset, height, width = self.index[self.rows[i] if self.rows is not None else i]
        if height == 0:
            return None
        if self._pixels is None:  # copy-on-write: tensors may be written to without touching the file
            size = (self.folder / "pixels.u8").stat().st_size
            self._pixels = np.memmap(self.folder / "pixels.u8", np.uint8, mode="c") if size else np.empty(0, np.uint8)
        pixels = self._pixels[offset : offset + height * width * 3].reshape(height, width, 3)
        return torch.from_numpy(pixels).permute(2, 0, 1)  # a view: CHW with channels-last strides

    def unreadable(self) -> dict[int, str]:
        """Why each image that could not be read when the cache was built was not."""
        reasons = json.loads((self.folder / "meta.json").read_text())["unreadable"]
        rows = self.rows if self.rows is not None else range(len(self.index))
        return {i: reasons[str(row)] for i, row in enumerate(rows) if str(row) in reasons}


class Preprocessed(torch.utils.data.Dataset):
    """What the cache stores for each image, computed in DataLoader workers: an HWC uint8 array, or
    why the image could not be read."""

    def __init__(self, split, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        try:
            image = read_rgb(self.split, i)
        except UserError as error:
            return str(error)
        return self.transform(image).permute(1, 2, 0).contiguous().numpy()


def keep_as_is(sample):
    return sample


def is_complete(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        return (folder / "pixels.u8").stat().st_size == meta["bytes"] and len(np.load(folder / "index.npy")) == meta["images"]
    except (OSError, ValueError, KeyError):
        return False


def build(split, transform, folder: Path, description: str, workers: int, meta: dict) -> None:
    """Decode every image of `split` once (in `workers` processes) and write the pixels to `folder`."""
    folder.mkdir(parents=True)
    # its own generator: drawing the workers' seeds from the global one would make a run depend on whether the cache existed
    loader = torch.utils.data.DataLoader(Preprocessed(split, transform), batch_size=None, num_workers=workers, collate_fn=keep_as_is,
                                         generator=torch.Generator())
    index, offset, unreadable = np.zeros((len(split), 3), np.int64), 0, {}
    with open(folder / "pixels.u8", "wb") as out:
        for i, pixels in enumerate(tqdm(loader, desc=description, unit="img", dynamic_ncols=True)):
            if isinstance(pixels, str):  # unreadable: height 0; whether that is fatal is the caller's choice
                index[i], unreadable[str(i)] = (offset, 0, 0), pixels
                continue
            index[i] = (offset, *pixels.shape[:2])
            out.write(pixels.tobytes())
            offset += pixels.nbytes
    np.save(folder / "index.npy", index)
    meta = {**meta, "images": len(split), "bytes": offset, "unreadable": unreadable}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks it complete


def cached_pixels(split, kind: str, size: int, transform, root: Path, workers: int = 0, log=print) -> PixelCache:
    """The cache of `split` preprocessed by `transform` (kind 'train' or 'eval', `size` its parameter),
    built first if it does not exist yet. A subset of a split (--val-split) shares its parent's cache."""
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
                    what = f"{kind} images of {base.name} (" + (f"shorter side {size} px" if kind == "train" else f"{size} px") + ")"
                    build(base, transform, partial, f"caching {what}", workers, meta)
                    os.rename(partial, folder)
                    log(f"cached the {what} in {folder} ({(folder / 'pixels.u8').stat().st_size / 2**20:.0f} MiB)")
        except OSError as error:
            raise UserError(f"cannot write the preprocessing cache in {root}: {error}; pass --cache DIR for another folder or --cache off") from None
    cache = PixelCache(folder)
    return cache.subset(rows) if rows is not None else cache


def train_cache_side(cfg) -> int:
    """Large enough that a crop of half the image or more is shrunk, never enlarged, to the resolution."""
    return cfg.cache_side or round(1.5 * cfg.resolution)


def checked(cache: PixelCache, split, skip_bad_images: bool) -> PixelCache:
    """Unreadable images are known once the cache is built: stop now rather than in the middle of an epoch."""
    unreadable = cache.unreadable()
    if unreadable and not skip_bad_images:
        count = f" ({len(unreadable)} in all in the {split.name} split)" if len(unreadable) > 1 else ""
        raise UserError(f"{next(iter(unreadable.values()))}{count}. Replace or remove it, or pass --skip-bad-images to skip unreadable images")
    return cache


def train_dataset(split, cfg, workers: int) -> TransformedSplit:
    """The training images, augmented afresh every epoch: cropped from the cache's pre-shrunk pixels,
    or (--cache off) from the decoded image."""
    root = cache_root(cfg.cache)
    if root is None:
        return TransformedSplit(split, train_transform(cfg), cfg.skip_bad_images, seed=cfg.seed)
    side = train_cache_side(cfg)
    pixels = cached_pixels(split, "train", side, functools.partial(shrink_for_cache, side=side), root, workers)
    return TransformedSplit(split, train_transform(cfg), cfg.skip_bad_images, seed=cfg.seed, pixels=checked(pixels, split, cfg.skip_bad_images))


def eval_dataset(split, resolution: int, cache: str, skip_bad_images: bool, workers: int) -> TransformedSplit:
    """The images as evaluation sees them: the cache holds them finished, so nothing is left to do per epoch."""
    root = cache_root(cache)
    if root is None:
        return TransformedSplit(split, eval_transform(resolution), skip_bad_images)
    pixels = cached_pixels(split, "eval", resolution, eval_transform(resolution), root, workers)
    return TransformedSplit(split, None, skip_bad_images, pixels=checked(pixels, split, skip_bad_images))
