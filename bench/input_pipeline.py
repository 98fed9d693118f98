"""Input pipeline throughput: the original pipeline against ours, side by side in one run.

    uv run python bench/input_pipeline.py                 # 512+512 generated JPEGs sized like Stanford Cars
    uv run python bench/input_pipeline.py --data DIR      # any dataset train.py reads

(a) the original pipeline's: Hugging Face dataset -> PIL decode -> RandomResizedCrop/flip/ToTensor/Normalize
    (eval: Resize/CenterCrop/ToTensor/Normalize) in a DataLoader, 1 worker and one per core;
(b) ours: the preprocessing cache (built once first, its time shown apart; training images at
    native size), read a batch at a time by one thread of the training process: crop boxes and
    flips drawn per image, each box's pixels read into one buffer. This is all the CPU does;
    resizing, flipping and normalising happen on the GPU (measured with the model by
    bench/train_throughput.py). The row "ours, device half on this CPU" adds that work done on the
    CPU instead, as on a machine without a GPU.

Images per second per CPU core: the original pipeline's with n workers is divided by n; ours uses one core.
The last line is the summary (per core, ours against the original pipeline's better per-core figure).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision import transforms as v1

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cars.config import Config
from cars.data import load_splits
from cars.loaders import eval_loader, train_loader
from cars.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize


class SeedDataset(torch.utils.data.Dataset):
    """The original pipeline's data path: the hub dataset decodes each image (full size, PIL) on access."""

    def __init__(self, hf_split, transform):
        self.hf_split, self.transform = hf_split, transform

    def __len__(self):
        return len(self.hf_split)

    def __getitem__(self, i):
        row = self.hf_split[i]
        return self.transform(row["image"].convert("RGB")), row["label"]


def seed_datasets(location: str, resolution: int):
    import datasets

    loaded = datasets.load_dataset(
        location, data_files={"train": "data/train-*.parquet", "test": "data/test-*.parquet"}
    )
    normalize = [v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = v1.Compose([v1.RandomResizedCrop(resolution), v1.RandomHorizontalFlip(), *normalize])
    test = v1.Compose([v1.Resize(eval_resize(resolution)), v1.CenterCrop(resolution), *normalize])
    return SeedDataset(loaded["train"], train), SeedDataset(loaded["test"], test)


def images_per_second(batches) -> float:
    """Images delivered per second in the steady state: timed from the end of the first batch (worker start-up and a
    cold page cache are not throughput). Each batch is (pixels, labels, ...)."""
    count, started = 0, None
    for _, labels, *_ in batches:
        if started is None:
            started = time.perf_counter()
            continue
        count += len(labels)
    return count / (time.perf_counter() - started)


def cpu_half(loader, repeats: int):
    """What our reading thread does for each batch, and nothing else, as (pixels, labels). (The reader's batch is a
    dict: counted as it was, its keys were taken for (pixels, labels), and every batch counted as 6 images.)"""
    for epoch in range(repeats):
        loader.dataset.epoch = epoch
        for indices in loader.batch_sampler:
            batch = loader.read(indices)
            yield batch["pixels"], batch["labels"]


def whole(loader, repeats: int):
    for epoch in range(repeats):
        loader.dataset.epoch = epoch
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", help="a dataset folder in the hub layout (default: generated JPEGs sized like Stanford Cars)"
    )
    parser.add_argument("--images", type=int, default=512, help="generated images per split")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--cores",
        type=int,
        default=os.cpu_count(),
        help="the original pipeline's 'all cores' run uses this many workers",
    )
    parser.add_argument("--cache-dir", help="where to build our cache (default: a temporary folder, removed after)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.data:
        location = args.data
    else:
        from fake_cars import fake_cars

        location = str(fake_cars(args.images))
    splits = load_splits(location)
    sizes = [splits.train.open(i).size for i in range(min(len(splits.train), 200))]
    print(
        f"data: {location}: {len(splits.train)} train / {len(splits.eval)} test images, "
        f"mean size {sum(w for w, _ in sizes) / len(sizes):.0f} x {sum(h for _, h in sizes) / len(sizes):.0f} (first "
        "200)"
    )

    with tempfile.TemporaryDirectory() as scratch:
        cfg = Config(
            data=location, resolution=args.resolution, batch_size=args.batch_size, cache=args.cache_dir or scratch
        )
        started = time.perf_counter()
        ours = {
            "train": train_loader(splits.train, cfg, workers=args.cores),
            "eval": eval_loader(
                splits.eval,
                resolution=cfg.resolution,
                interpolation=cfg.interpolation,
                cache=cfg.cache,
                skip_bad_images=False,
                batch_size=cfg.batch_size,
                workers=args.cores,
            ),
        }
        build_seconds = time.perf_counter() - started
        cached_bytes = sum((loader.dataset.cache.folder / "pixels.u8").stat().st_size for loader in ours.values())
        images = len(splits.train) + len(splits.eval)
        print(
            f"our cache: built in {build_seconds:.1f} s with {args.cores} workers (once per dataset and resolution), "
            f"{cached_bytes / 2**20:.0f} MiB for {images} images ({cached_bytes / images / 1024:.0f} KiB per image)"
        )
        seed = dict(zip(("train", "eval"), seed_datasets(location, args.resolution), strict=True))

        per_core = {}
        print("\n| pipeline | split | CPU cores | img/s | img/s per core |\n|---|---|---|---|---|")

        def report(name, split, cores, rate):
            per_core[name, split, cores] = rate / cores
            print(f"| {name} | {split} | {cores} | {rate:.0f} | {rate / cores:.0f} |", flush=True)

        for split in ("train", "eval"):
            for workers in (1, args.cores):
                loader = torch.utils.data.DataLoader(
                    seed[split], args.batch_size, shuffle=split == "train", num_workers=workers
                )
                report("seed", split, workers, images_per_second(loader))
            report("ours", split, 1, images_per_second(cpu_half(ours[split], repeats=20)))
            report("ours, device half on this CPU", split, 1, images_per_second(whole(ours[split], repeats=3)))

    speedup = {
        split: per_core["ours", split, 1] / max(per_core["seed", split, w] for w in (1, args.cores))
        for split in ("train", "eval")
    }
    print(
        f"\ntrain-input speedup {speedup['train']:.1f}x ({per_core['ours', 'train', 1]:.0f} img/s/core), "
        f"eval-input speedup {speedup['eval']:.1f}x"
    )


if __name__ == "__main__":
    main()
