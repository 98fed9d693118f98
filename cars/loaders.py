"""Batches for training and evaluation: from the preprocessing cache, or (--cache off) decoded image by image."""

import functools
import queue
import threading

import numpy as np
import torch

from cars.augment import apply_steps
from cars.cache import PixelCache, cache_root, cached_pixels
from cars.data import read_rgb
from cars.errors import UserError
from cars.transforms import TrainAugmentation, eval_transform, keep_for_cache, resize_crops


class TransformedSplit(torch.utils.data.Dataset):
    """(uint8 pixels, label) pairs for a DataLoader; None for an unreadable image when skipping.
    `transform` is an eval transform (image -> pixels) or a TrainAugmentation, which augments image i
    as its draws for `epoch` say."""

    def __init__(self, split, transform, skip_bad_images: bool = False):
        self.split, self.transform, self.skip_bad_images = split, transform, skip_bad_images
        self.epoch = 0

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        try:
            image = read_rgb(self.split, i)
        except UserError as error:
            if self.skip_bad_images:
                return None
            raise UserError(
                f"{error}. Replace or remove it, or pass --skip-bad-images to skip unreadable images"
            ) from None
        if isinstance(self.transform, TrainAugmentation):
            return self.transform(image, self.epoch, i), self.split.labels[i]
        return self.transform(image), self.split.labels[i]


def collate_readable(batch):
    """default_collate without the samples that could not be read (None); None if none is left."""
    batch = [sample for sample in batch if sample is not None]
    return torch.utils.data.default_collate(batch) if batch else None


class GlobalBatches(torch.utils.data.Sampler):
    """The epoch's global batches in an order drawn from `generator`; process `rank` of `world` takes
    every world-th image of each. Every process draws the same order, so --batch-size is the global
    batch whatever the number of processes, and a run learns as it would in one process.

    A ragged last batch is dropped (a different few images each epoch): every step then has the same
    shape, so a compiled model never recompiles, and BatchNorm never sees a batch of one."""

    def __init__(
        self, length: int, *, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1, readable=None
    ):
        self.length, self.batch_size, self.generator, self.rank, self.world = length, batch_size, generator, rank, world
        self.readable = readable  # which images can be read (--skip-bad-images with the cache), or None: all
        self.skip = 0  # global batches already trained, when an epoch resumes from a mid-epoch checkpoint

    def __iter__(self):
        order = torch.randperm(self.length, generator=self.generator).tolist()
        for start in range(self.skip * self.batch_size, len(self) * self.batch_size, self.batch_size):
            batch = order[start : start + self.batch_size]
            shares = [batch[rank :: self.world] for rank in range(self.world)]
            if self.readable is not None and not all(any(self.readable[i] for i in share) for share in shares):
                # a process with nothing to train on would skip the step while the others wait for its gradients:
                # every process skips this batch (each knows, from the same order and the same list of unreadable
                # images)
                yield []
            else:
                yield shares[self.rank]

    def __len__(self):
        # a split smaller than one batch still trains, as one smaller batch (if every process gets an image)
        return self.length // self.batch_size or int(self.length >= self.world)

    @property
    def images_per_epoch(self) -> int:
        """Over all processes."""
        return min(len(self) * self.batch_size, self.length)


def make_loader(
    dataset,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
):
    """Training (shuffle): global batches, this process's share of each. Evaluation: this process's
    share of the images (every world-th), each image exactly once over all processes.

    The order of the training batches comes from the sampler's own generator (train.py reseeds it every epoch).
    The DataLoader draws its workers' seed from a generator of its own before the first batch: from the sampler's, it
    would shift the order away from CachedLoader's, and a resume that switches --cache would not be exact."""
    options = dict(
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_readable,
        pin_memory=pin_memory,
    )
    if shuffle:
        order = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=GlobalBatches(len(dataset), batch_size=batch_size, generator=order, rank=rank, world=world),
            **options,
        )
    if world > 1:
        dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    return torch.utils.data.DataLoader(dataset, batch_size=max(1, batch_size // world), shuffle=False, **options)


class CachedSplit:
    """A split's cached images; for training, with the augmentation that draws each image's crop and
    flip of each epoch (`epoch`)."""

    def __init__(self, cache: PixelCache, split, augmentation: TrainAugmentation | None = None):
        self.cache, self.labels, self.augmentation = cache, torch.as_tensor(split.labels), augmentation
        self.readable = np.ones(len(cache), bool)  # False for the images skipped with --skip-bad-images
        self.readable[list(cache.unreadable())] = False
        self.epoch = 0

    def __len__(self):
        return len(self.cache)

    def crops(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop boxes (fractions of each image) and horizontal flips for images `indices`."""
        draws = [self.augmentation.draw(self.epoch, int(i), *self.cache.sources[self.cache.rows[i]]) for i in indices]
        return torch.tensor([box for box, _ in draws], dtype=torch.float32), torch.tensor([flip for _, flip in draws])


class CachedLoader:
    """Batches of a CachedSplit on the device, uint8 NCHW, and their labels: read in this process by
    a thread that stays a few batches ahead; for training, each crop's pixels read at native size,
    resized and flipped on the device, then given the config's extra augmentation as a batch.
    Same batches as make_loader would make."""

    def __init__(
        self,
        dataset: CachedSplit,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        device_type: str,
        rank: int = 0,
        world: int = 1,
    ):
        self.dataset, self.device_type = dataset, device_type
        if shuffle:
            self.batch_sampler = GlobalBatches(
                len(dataset),
                batch_size=batch_size,
                generator=torch.Generator().manual_seed(seed),
                rank=rank,
                world=world,
                readable=dataset.readable,
            )
        else:  # this process's share of the images, in order
            share, per_process = list(range(rank, len(dataset), world)), max(1, batch_size // world)
            self.batch_sampler = [share[start : start + per_process] for start in range(0, len(share), per_process)]

    def __len__(self):
        return len(self.batch_sampler)

    def read(self, indices):
        indices = [i for i in indices if self.dataset.readable[i]]
        if not indices:
            return None
        labels, pin = self.dataset.labels[indices], self.device_type == "cuda"
        if self.dataset.augmentation is None:  # evaluation: the cached pixels are final
            return dict(pixels=self.dataset.cache.batch(indices, pin_memory=pin), labels=labels)
        boxes, flips = self.dataset.crops(indices)
        regions = self.dataset.cache.regions(indices, boxes)  # only the pixels each crop needs, at native size
        flat = torch.cat([region.reshape(-1) for region in regions])  # one buffer: one copy to the device
        steps = self.dataset.augmentation.extra_steps(self.dataset.epoch, indices)
        shapes = [region.shape for region in regions]
        return dict(pixels=flat.pin_memory() if pin else flat, labels=labels, shapes=shapes, flips=flips, steps=steps)

    def __iter__(self):
        ready, stop = queue.Queue(maxsize=3), threading.Event()
        consumer = threading.current_thread()

        def offer(item) -> bool:  # wait for room; False once the consumer has gone (a break, an error, its end)
            while not stop.is_set() and consumer.is_alive():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def read_ahead():
            try:
                for indices in self.batch_sampler:
                    if not offer(self.read(indices)):
                        return
                offer(StopIteration)
            except BaseException as error:  # handed to the training loop, which raises it
                offer(error)

        # Not a daemon: at exit the interpreter waits for it (the main thread counts as gone by then) instead of
        # stopping it, and a thread stopped inside a torch operation aborts the process ("terminate called without an
        # active exception", exit 134 instead of 130 after Ctrl-C)
        reader = threading.Thread(target=read_ahead, name="batch-reader")
        try:
            reader.start()  # inside the try: Ctrl-C can land while start() waits for the thread to run
            while (batch := ready.get()) is not StopIteration:
                if isinstance(batch, BaseException):
                    raise batch
                yield None if batch is None else self.finish(**batch)
        finally:
            stop.set()
            if reader.ident is not None:  # started
                reader.join(timeout=10)  # the batch it is reading, at most

    def finish(self, *, pixels, labels, shapes=None, flips=None, steps=None):
        """On the device: an eval batch made NCHW (channels-last in memory); training crops resized,
        then augmented further, the whole batch at once."""
        pixels = pixels.to(self.device_type, non_blocking=True)
        labels = labels.to(self.device_type, non_blocking=True)
        if shapes is None:
            return pixels.permute(0, 3, 1, 2), labels
        sizes = [height * width * 3 for height, width, _ in shapes]
        regions = [part.view(shape).permute(2, 0, 1) for part, shape in zip(pixels.split(sizes), shapes, strict=True)]
        augmentation = self.dataset.augmentation
        crops = resize_crops(regions, flips.tolist(), augmentation.resolution, interpolation=augmentation.interpolation)
        return apply_steps(crops, steps), labels


def checked(cache: PixelCache, skip_bad_images: bool) -> PixelCache:
    """Unreadable images are known once the cache is built: stop now rather than in the middle of an epoch."""
    unreadable = cache.unreadable()
    if unreadable and not skip_bad_images:
        count = f" ({len(unreadable)} in all)" if len(unreadable) > 1 else ""
        raise UserError(
            f"{next(iter(unreadable.values()))}{count}. Replace or remove it, or pass --skip-bad-images to skip "
            "unreadable images"
        )
    return cache


def train_loader(split, cfg, *, workers: int, device_type: str = "cpu", rank: int = 0, world: int = 1):
    """The training batches, augmented afresh every epoch: from the cache (built on first use), or
    (--cache off) decoded and augmented image by image in DataLoader workers."""
    root = cache_root(cfg.cache)
    if root is None:
        dataset = TransformedSplit(split, TrainAugmentation(cfg), cfg.skip_bad_images)
        return make_loader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            workers=workers,
            seed=cfg.seed,
            pin_memory=device_type == "cuda",
            rank=rank,
            world=world,
        )
    keep = functools.partial(keep_for_cache, side=cfg.cache_side)
    cache = checked(
        cached_pixels(split, "train", size=cfg.cache_side, transform=keep, root=root, workers=workers),
        cfg.skip_bad_images,
    )
    return CachedLoader(
        CachedSplit(cache, split, TrainAugmentation(cfg)),
        batch_size=cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        device_type=device_type,
        rank=rank,
        world=world,
    )


def start_epoch(train_batches, *, epoch: int, seed: int, done_steps: int = 0) -> None:
    """Set the training batches to `epoch`: its image order and each image's augmentation depend on (seed, epoch)
    alone, so a resumed epoch repeats them; the `done_steps` a mid-epoch checkpoint already trained are skipped."""
    train_batches.batch_sampler.generator.manual_seed(seed * 1_000_003 + epoch)
    train_batches.dataset.epoch = epoch
    train_batches.batch_sampler.skip = done_steps


def run_eval_loader(split, cfg, *, workers: int, device_type: str, rank: int = 0, world: int = 1):
    """eval_loader with a run's resolution, interpolation, cache, batch size and --skip-bad-images."""
    return eval_loader(
        split,
        resolution=cfg.resolution,
        interpolation=cfg.interpolation,
        cache=cfg.cache,
        skip_bad_images=cfg.skip_bad_images,
        batch_size=cfg.batch_size,
        workers=workers,
        device_type=device_type,
        rank=rank,
        world=world,
    )


def eval_loader(
    split,
    *,
    resolution: int,
    interpolation: str,
    cache: str,
    skip_bad_images: bool,
    batch_size: int,
    workers: int,
    device_type: str = "cpu",
    rank: int = 0,
    world: int = 1,
):
    """The images as evaluation sees them; the cache holds them finished, so nothing is left to do per epoch."""
    root = cache_root(cache)
    transform = eval_transform(resolution, interpolation=interpolation)
    if root is None:
        dataset = TransformedSplit(split, transform, skip_bad_images)
        return make_loader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            workers=workers,
            seed=0,
            pin_memory=device_type == "cuda",
            rank=rank,
            world=world,
        )
    pixels = checked(
        cached_pixels(
            split,
            "eval",
            size=resolution,
            transform=transform,
            root=root,
            workers=workers,
            interpolation=interpolation,
        ),
        skip_bad_images,
    )
    return CachedLoader(
        CachedSplit(pixels, split),
        batch_size=batch_size,
        shuffle=False,
        seed=0,
        device_type=device_type,
        rank=rank,
        world=world,
    )
