"""The preprocessing cache: every image of a split decoded once, kept as uint8 pixels.

Decoding full-size JPEGs, not the GPU, bounds a training run (see docs/benchmarks.md, input pipeline). So
each split is decoded once, on first use, into one file of uint8 pixels that is memory-mapped: the operating
system's page cache holds it, so RAM stays bounded and every process shares it.

- eval: exactly what the eval transform's Resize + CenterCrop make, resolution x resolution: the
  original pipeline's pixels, finished; a batch is one indexed read.
- train: every image at its native size, so each epoch's random crop is cut from the same pixels
  the original pipeline cut it from (cars.loaders reads only each crop's box, cars.transforms resizes it).
  `--cache-side N` keeps a smaller, lossy copy instead: the longer side at most N pixels.

A cache lives in a folder named after what it holds and a hash of the dataset's fingerprint and
the preprocessing parameters, so a changed dataset or parameter means another folder. It is built
under a temporary name and renamed when complete; a lock makes a second process (torchrun, or a
second run) wait for the first instead of building it twice.
"""

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cars.data import read_rgb
from cars.errors import UserError
from cars.paths import cache_home
from cars.transforms import pixel_box

VERSION = 4  # 4: EXIF orientation applied. Bump when the stored format or the preprocessing changes


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
    for path, label in zip(split.paths, split.labels, strict=True):
        # a dangling link is an unreadable image, later
        stat = os.lstat(path) if not os.path.exists(path) else os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


class PixelCache:
    """A cached split, one file of uint8 pixels: image i (HWC) is `shapes[i]` in size, at `offsets[i]`
    in the file; its original size is `sources[i]`. Evaluation caches hold one shape for all (a batch
    is one indexed read); training caches keep every image at its own, native size. `rows` picks
    some of the cached split's images (a --val-split share)."""

    def __init__(self, folder: Path, rows=None):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.uniform, self.reasons = meta["uniform"], meta["unreadable"]
        self.shapes = np.load(self.folder / "shapes.npy")  # (height, width) as stored
        self.sources = np.load(self.folder / "sources.npy")  # (height, width) of each original image
        self.offsets = np.concatenate([[0], np.cumsum(self.shapes.prod(1) * 3)])
        self.rows = np.arange(len(self.sources)) if rows is None else np.asarray(rows)
        self._pixels = None  # mapped on first use in each process

    def subset(self, rows) -> "PixelCache":
        return PixelCache(self.folder, rows)

    def __len__(self):
        return len(self.rows)

    @property
    def pixels(self) -> torch.Tensor:
        """The whole file, flat (a uniform cache: N x H x W x 3)."""
        if self._pixels is None:  # copy-on-write: a writable mapping that never writes to the file
            mapped = torch.from_numpy(
                np.memmap(self.folder / "pixels.u8", np.uint8, mode="c", shape=(int(self.offsets[-1]),))
            )
            self._pixels = mapped.view(len(self.shapes), *self.uniform, 3) if self.uniform else mapped
        return self._pixels

    def image(self, i: int) -> torch.Tensor:
        """Image i as stored, HWC uint8 (a view of the file)."""
        row = self.rows[i]
        if self.uniform:
            return self.pixels[row]
        return self.pixels[self.offsets[row] : self.offsets[row + 1]].view(*self.shapes[row], 3)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.image(i).permute(2, 0, 1)

    def batch(self, indices, pin_memory: bool = False) -> torch.Tensor:
        """Images `indices` of a uniform cache as one NHWC uint8 tensor (in page-locked memory, for a fast copy to the
        GPU)."""
        rows = torch.from_numpy(self.rows[indices])
        out = torch.empty((len(rows), *self.uniform, 3), dtype=torch.uint8, pin_memory=pin_memory)
        return torch.index_select(self.pixels, 0, rows, out=out)

    def regions(self, indices, boxes: torch.Tensor) -> list[torch.Tensor]:
        """The pixels of box k (fractions of the image, rounded to whole pixels) of image indices[k], HWC:
        only what a crop needs is read."""
        out = []
        for i, box in zip(indices, boxes.tolist(), strict=True):
            height, width = self.shapes[self.rows[i]]
            x0, y0, x1, y1 = pixel_box(box, height, width)
            out.append(self.image(i)[y0:y1, x0:x1])
        return out

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
        shapes = np.load(folder / "shapes.npy")
        return (
            (folder / "pixels.u8").stat().st_size == int(shapes.prod(1).sum()) * 3
            and len(shapes) == meta["images"]
            and len(np.load(folder / "sources.npy")) == meta["images"]
        )
    except (OSError, ValueError, KeyError):
        return False


def build(
    split, *, transform, uniform: tuple[int, int] | None, folder: Path, description: str, workers: int, meta: dict
) -> None:
    """Decode every image of `split` once (in `workers` processes) and write its pixels to `folder`."""
    folder.mkdir(parents=True)
    # its own generator: drawing the workers' seeds from the global one would make a run depend on whether the cache
    # existed
    loader = torch.utils.data.DataLoader(
        Preprocessed(split, transform),
        batch_size=None,
        num_workers=workers,
        collate_fn=keep_as_is,
        generator=torch.Generator(),
    )
    sources, shapes, unreadable = np.zeros((len(split), 2), np.int64), np.zeros((len(split), 2), np.int64), {}
    blank = np.zeros((*(uniform or (1, 1)), 3), np.uint8)
    with open(folder / "pixels.u8", "wb") as out:
        for i, sample in enumerate(tqdm(loader, desc=description, unit="img", dynamic_ncols=True, disable=None)):
            if isinstance(sample, str):  # unreadable: zeros in its place; whether that is fatal is the caller's choice
                unreadable[str(i)] = sample
                pixels = blank
            else:
                pixels, sources[i] = sample
            shapes[i] = pixels.shape[:2]
            out.write(pixels.tobytes())
    np.save(folder / "sources.npy", sources)
    np.save(folder / "shapes.npy", shapes)
    meta = {**meta, "uniform": list(uniform) if uniform else None, "images": len(split), "unreadable": unreadable}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the cache complete


def cached_pixels(
    split, kind: str, *, size: int, transform, root: Path, workers: int = 0, interpolation: str = "bilinear", log=print
) -> PixelCache:
    """The cache of `split` made by `transform`, built first if it does not exist yet: kind 'eval'
    holds size x size images (resized with `interpolation`), kind 'train' every image at its native size (size 0)
    or with its longer side at most `size`. A subset of a split (--val-split) shares its parent's cache."""
    rows = getattr(split, "indices", None)
    base = split.parent if rows is not None else split
    meta = {"version": VERSION, "fingerprint": fingerprint(base), "split": base.name, "kind": kind, "size": size}
    if interpolation != "bilinear":  # another filter, another cache; the bilinear caches built before keep their key
        meta["interpolation"] = interpolation
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
                    # left over only by a killed build: nobody else holds the lock
                    partial = root / f"{folder.name}.partial"
                    shutil.rmtree(partial, ignore_errors=True)
                    what = f"{kind} images of the {base.name} split " + (
                        f"({size} x {size} px, {interpolation})"
                        if kind == "eval"
                        else f"(longer side at most {size} px)"
                        if size
                        else "(native size)"
                    )
                    build(
                        base,
                        transform=transform,
                        uniform=(size, size) if kind == "eval" else None,
                        folder=partial,
                        description=f"caching {what}",
                        workers=workers,
                        meta=meta,
                    )
                    os.rename(partial, folder)
                    log(f"cached the {what} in {folder} ({(folder / 'pixels.u8').stat().st_size / 2**20:.0f} MiB)")
        except OSError as error:
            raise UserError(
                f"cannot write the preprocessing cache in {root}: {error}; pass --cache DIR for another folder or "
                "--cache off"
            ) from None
    cache = PixelCache(folder)
    return cache.subset(rows) if rows is not None else cache
