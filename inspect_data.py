"""inspect_data.py: know the data before training on it.

Counts per split and class, image sizes, modes and formats, unreadable files, exact and near
duplicates (within train, and between train and test: a leak), samples as stored next to what the
model sees, the original write-up's sanity check: what an ImageNet model calls these pictures, and, with
--rank-models, which pretrained candidate should fine-tune best (transferability scores, no fine-tuning).
"""

from cars.cli import check_command_line, parse_inspect

check_command_line(__name__, parse_inspect)  # --help and mistakes answer before the imports below load torch

import random
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import torch
from tqdm import tqdm

from cars import transferability
from cars.cache import keep_as_is
from cars.config import Config, from_dict, load_toml
from cars.data import UNREADABLE, load_splits, read_rgb, to_rgb, upright
from cars.engine import Device
from cars.errors import UserError, run_cli
from cars.loaders import TransformedSplit, make_loader
from cars.models import build_model, build_with_own_head, check_arch, resolve_weights
from cars.report import (
    markdown_table,
    plot_class_counts,
    plot_duplicates,
    plot_samples,
    plot_sizes,
    write_csv,
    write_json,
    write_text,
)
from cars.runs import check_folder_free, prepare_folder
from cars.runtime import pick_device, worker_count
from cars.starts import has_text_tower
from cars.transforms import TrainAugmentation, eval_transform, normalize

HASH_SIZE = 16  # a 16 x 16 = 256-bit perceptual hash: 64 bits cannot tell look-alike pictures (the demo's) apart
NEAR = 14  # the most bits two hashes may differ by for a near duplicate: a resized, re-encoded copy is 0-8 apart,
# different pictures 22 or more (measured on the demo's look-alikes; photos are about 128 apart)
# ImageNet classes that are road vehicles of the kinds Stanford Cars holds, grouped as a person would
VEHICLES = {
    "sports car": ["sports car", "racer"],
    "convertible": ["convertible"],
    "sedan / wagon": ["beach wagon", "cab", "limousine", "Model T"],
    "pickup / jeep": ["pickup", "jeep"],
    "minivan / van": ["minivan", "moving van", "police van", "ambulance"],
    "car parts": ["grille", "car wheel", "car mirror"],
    "truck": ["tow truck", "trailer truck", "garbage truck", "fire engine"],
}


@dataclass
class ImageFacts:
    """What inspecting one image found: computed in DataLoader workers."""

    split: str
    index: int
    label: int
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    phash: str = ""  # perceptual hash: a few bits apart means a near copy
    error: str = ""


class Facts(torch.utils.data.Dataset):
    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i) -> ImageFacts:
        facts = ImageFacts(self.split.name, i, int(self.split.labels[i]))
        try:
            with self.split.open(i) as image:
                facts.width, facts.height, facts.mode, facts.format = (
                    image.width,
                    image.height,
                    image.mode,
                    image.format or "?",
                )
                # a JPEG decodes at 1/2 to 1/8 of its size, several times faster: plenty for a 16 x 16 hash
                image.draft("RGB", (max(HASH_SIZE * 8, image.width // 4), max(HASH_SIZE * 8, image.height // 4)))
                image.load()
                facts.phash = str(imagehash.phash(to_rgb(upright(image)), hash_size=HASH_SIZE))
        except UNREADABLE as error:
            facts.error = str(error)
        return facts


def inspect_split(split, workers: int) -> list[ImageFacts]:
    """Every image of a split, looked at once, in `workers` processes."""
    loader = torch.utils.data.DataLoader(Facts(split), batch_size=None, num_workers=workers, collate_fn=keep_as_is)
    return list(tqdm(loader, desc=f"inspecting {split.name}", unit="img", dynamic_ncols=True, disable=None))


def find_duplicates(facts: list[ImageFacts], same_pixels, max_distance: int = NEAR) -> list[dict]:
    """Pairs of readable images that are the same picture (`same_pixels(a, b)`, checked on the few pairs
    whose hashes match; distance 0) or a near copy (perceptual hashes at most `max_distance` bits apart),
    within train and between train and test."""
    readable = [f for f in facts if not f.error]
    words = HASH_SIZE**2 // 64
    hashes = np.array(
        [[int(f.phash[16 * w : 16 * (w + 1)], 16) for w in range(words)] for f in readable], dtype=np.uint64
    ).reshape(-1, words)
    pairs = []
    for a in range(len(readable)):
        if readable[a].split != "train":
            continue
        distance = np.bitwise_count(hashes[a + 1 :] ^ hashes[a]).sum(1)  # differing bits, against every later image
        for offset in np.nonzero(distance <= max_distance)[0]:
            fa, fb = readable[a], readable[a + 1 + offset]
            exact = int(distance[offset]) == 0 and same_pixels(fa, fb)  # only matching hashes can be the same pixels
            pairs.append(
                dict(
                    split_a=fa.split,
                    index_a=fa.index,
                    split_b=fb.split,
                    index_b=fb.index,
                    distance=int(distance[offset]),
                    exact=exact,
                    same_label=fa.label == fb.label,
                )
            )
    return sorted(pairs, key=lambda p: (p["split_b"] != "test", p["distance"], p["index_a"], p["index_b"]))


def imagenet_check(by_split: dict, sample: list[tuple[str, int]], cfg: Config, device: str) -> dict:
    """The original write-up's check: the ImageNet model itself (its own 1000-way head) on a sample of images."""
    import torchvision

    check_arch(cfg.arch)
    weights = resolve_weights(cfg.arch, cfg.weights)
    if not hasattr(weights, "meta"):
        return {
            "skipped": f"--weights {cfg.weights} is not ImageNet weights; pass a torchvision weights name such as "
            "DEFAULT"
        }
    try:
        model = torchvision.models.get_model(cfg.arch, weights=weights).eval().to(device)
    except (OSError, RuntimeError):
        return {
            "skipped": f"the {weights} weights are not available offline; put {Path(weights.url).name} into "
            "$TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/checkpoints/), or run once with a network"
        }
    categories = weights.meta["categories"]
    transform = eval_transform(cfg.resolution, interpolation=cfg.interpolation)
    predictions = []
    with torch.no_grad():
        for start in range(0, len(sample), 32):
            chunk = sample[start : start + 32]
            pixels = torch.stack([transform(read_rgb(by_split[s], i)) for s, i in chunk])
            predictions += model(normalize(pixels).to(device)).argmax(1).tolist()
    group_of = {name: group for group, names in VEHICLES.items() for name in names}
    labels = [categories[p] for p in predictions]
    groups = Counter(group_of.get(label, "other") for label in labels)
    return {
        "arch": cfg.arch,
        "weights": str(weights),
        "images": len(sample),
        "top1": dict(Counter(labels).most_common()),
        "groups": dict(groups.most_common()),
        "vehicle_share": 100 * (len(labels) - groups.get("other", 0)) / max(len(labels), 1),
        "predictions": [dict(split=s, index=i, imagenet=label) for (s, i), label in zip(sample, labels, strict=True)],
    }


def size_stats(values: list[int]) -> dict:
    return {
        "min": min(values),
        "median": statistics.median(values),
        "mean": round(statistics.mean(values), 1),
        "max": max(values),
    }


SAMPLE_KNOBS = ("resolution", "interpolation", "train_crop", "crop_scale", "augment", "color_jitter", "random_erasing")


def main(argv=None) -> None:
    args = parse_inspect(argv)
    # what a training crop looks like depends on the recipe: a preset's augmentation knobs, else the defaults
    preset = from_dict(load_toml(args.config), args.config) if args.config else {}
    drawn = {k: v for k, v in preset.items() if k in SAMPLE_KNOBS}
    if args.resolution is not None:
        drawn["resolution"] = args.resolution
    cfg = Config(
        data=args.data, arch=args.arch, weights=args.weights, workers=args.workers, **{"resolution": 224, **drawn}
    ).validate()
    for arch, _ in args.rank_models:
        check_arch(arch)
    name = Path(args.data).name if Path(args.data).exists() else args.data.replace("/", "_")
    out = Path(args.out or f"runs/data-{name}")
    check_folder_free(out, args.overwrite, "data report folder", "--out")
    splits = load_splits(args.data)
    workers = worker_count(cfg.workers)
    names = splits.class_names
    facts = inspect_split(splits.train, workers) + inspect_split(splits.eval, workers)
    readable = [f for f in facts if not f.error]
    unreadable = [f for f in facts if f.error]
    if not readable:
        raise UserError(
            f"none of the {len(facts)} images of {args.data} can be read (the first: {unreadable[0].error}); check "
            "that the files are images and whole"
        )
    prepare_folder(out, args.overwrite, "data report folder", "--out")

    # counts
    counts = {split: Counter(f.label for f in facts if f.split == split) for split in ("train", "test")}
    per_class = [counts["train"].get(c, 0) for c in range(len(names))]
    count_stats = {
        "train": len(splits.train),
        "test": len(splits.eval),
        "classes": len(names),
        "per_class_train": size_stats(per_class),
    }
    plot_class_counts(names, per_class, [counts["test"].get(c, 0) for c in range(len(names))], out / "class_counts.png")

    # image properties
    widths, heights = [f.width for f in readable], [f.height for f in readable]
    by_area = sorted(readable, key=lambda f: f.width * f.height)
    properties = {
        "width": size_stats(widths),
        "height": size_stats(heights),
        "aspect_ratio": size_stats([round(f.width / f.height, 3) for f in readable]),
        "modes": dict(Counter(f.mode for f in readable).most_common()),
        "formats": dict(Counter(f.format for f in readable).most_common()),
        "smallest": [dict(split=f.split, index=f.index, width=f.width, height=f.height) for f in by_area[:5]],
        "largest": [dict(split=f.split, index=f.index, width=f.width, height=f.height) for f in by_area[-5:][::-1]],
    }
    plot_sizes(widths, heights, out / "sizes.png")

    # duplicates
    by_split = {"train": splits.train, "test": splits.eval}

    def same_pixels(a: ImageFacts, b: ImageFacts) -> bool:
        first, second = read_rgb(by_split[a.split], a.index), read_rgb(by_split[b.split], b.index)
        return first.size == second.size and first.tobytes() == second.tobytes()

    pairs = find_duplicates(facts, same_pixels)
    columns = ["split_a", "index_a", "split_b", "index_b", "distance", "exact", "same_label"]
    write_csv(out / "duplicates.csv", [{k: p[k] for k in columns} for p in pairs], columns)
    leaked = sorted({p["index_b"] for p in pairs if p["split_b"] == "test"})
    leak_bound = 100 * len(leaked) / max(len(splits.eval), 1)
    if pairs:
        plot_duplicates(
            [
                (
                    read_rgb(by_split[p["split_a"]], p["index_a"]),
                    read_rgb(by_split[p["split_b"]], p["index_b"]),
                    f"{p['split_a']} {p['index_a']}: {names[by_split[p['split_a']].labels[p['index_a']]]}",
                    f"{p['split_b']} {p['index_b']}: {names[by_split[p['split_b']].labels[p['index_b']]]}",
                    p["distance"],
                    p["exact"],
                )
                for p in pairs[:12]
            ],
            out / "duplicates.png",
        )

    # samples: as stored, the training crops and the eval crop
    rng = random.Random(args.seed)
    train_by_class = defaultdict(list)
    for f in readable:
        if f.split == "train":
            train_by_class[f.label].append(f.index)
    shown = sorted(rng.sample(sorted(train_by_class), min(4, len(train_by_class))))
    augmentation = TrainAugmentation(cfg)
    rows = []
    for c in shown:
        i = rng.choice(train_by_class[c])
        image = read_rgb(splits.train, i)
        rows.append(
            (
                names[c],
                image,
                [augmentation(image, epoch, i) for epoch in range(3)],
                eval_transform(cfg.resolution, interpolation=cfg.interpolation)(image),
            )
        )
    plot_samples(rows, cfg.resolution, out / "samples.png")

    # the sanity check of the original write-up
    sample = rng.sample(
        [(f.split, f.index) for f in readable if f.split == "train"],
        min(args.check_images, len([f for f in readable if f.split == "train"])),
    )
    check = imagenet_check(by_split, sorted(sample), cfg, pick_device(args.device))
    if "predictions" in check:
        labels_of = {(p["split"], p["index"]): p["imagenet"] for p in check["predictions"]}
        largest = sorted(range(len(names)), key=lambda c: (-per_class[c], c))[:10]
        check["largest_classes"] = {
            names[c]: dict(
                Counter(labels_of[("train", i)] for i in train_by_class[c] if ("train", i) in labels_of).most_common(3)
            )
            for c in largest
        }

    data = {
        "data": args.data,
        "counts": count_stats,
        "images": properties,
        "unreadable": [dict(split=f.split, index=f.index, error=f.error) for f in unreadable],
        "duplicates": {
            "pairs": len(pairs),
            "exact": sum(p["exact"] for p in pairs),
            "near": sum(not p["exact"] for p in pairs),
            "train_test": sum(p["split_b"] == "test" for p in pairs),
            "test_images_with_a_train_copy": len(leaked),
            "max_inflation_points": round(leak_bound, 2),
            "max_distance": NEAR,
        },
        "imagenet_check": check,
    }
    if args.rank_models and not train_by_class:
        data["transferability"] = {"images": 0, "resolution": cfg.resolution, "scores": [], "skipped": {}}
        print("--rank-models: no training image can be read, so no candidate can be scored")
    elif args.rank_models:
        data["transferability"] = rank_models(
            args.rank_models,
            splits.train,
            resolution=cfg.resolution,
            interpolation=cfg.interpolation,
            device=args.device,
            workers=workers,
            out=out,
        )
    write_json(out / "data.json", data)
    write_text(out / "report.md", report(data, names, per_class, pairs))
    print(
        f"{len(facts)} images inspected: {len(unreadable)} unreadable, {len(pairs)} duplicate pairs "
        f"({data['duplicates']['train_test']} between train and test)"
    )
    if "skipped" in check:
        print(f"ImageNet check skipped: {check['skipped']}")
    else:
        print(
            f"ImageNet check: {check['vehicle_share']:.1f}% of {check['images']} training images called a vehicle by "
            f"{check['arch']}"
        )
    print(f"report: {out / 'report.md'}")


def rank_models(
    candidates, split, *, resolution: int, interpolation: str, device: str, workers: int, out: Path
) -> dict:
    """Each candidate's transferability scores from one forward pass over the training split (its eval crop), best
    LogME first, in transferability.csv; candidates whose weights are not on this machine are skipped, one line each."""
    device = Device(pick_device(device))
    loader = make_loader(
        TransformedSplit(split, eval_transform(resolution, interpolation=interpolation), skip_bad_images=True),
        batch_size=64,
        shuffle=False,
        workers=workers,
        seed=0,
    )
    rows, skipped, scored = [], {}, 0
    for arch, weights in candidates:
        name = f"{arch}:{weights}"
        own_head = not has_text_tower(arch)  # a CLIP has none: LogME and H-score read its features alone
        try:
            with torch.random.fork_rng():
                torch.manual_seed(0)  # 'none': the same random network every time
                if own_head:
                    model = build_with_own_head(arch, weights, resolution=resolution)
                else:
                    model = build_model(arch, weights, 1, resolution=resolution)
        except UserError as error:
            skipped[name] = str(error)
            print(f"--rank-models: skipped {name}: {error}")
            continue
        features, probabilities, labels = transferability.features_and_source_probabilities(
            model.to(device.type), loader, device
        )
        del model
        if not (np.isfinite(features).all() and np.isfinite(probabilities).all()):
            skipped[name] = "its outputs hold NaN or infinite values: the weights are damaged"
            print(f"--rank-models: skipped {name}: {skipped[name]}")
            continue
        rows.append({"model": name, **transferability.scores(features, probabilities if own_head else None, labels)})
        scored = len(labels)
    rows.sort(key=lambda r: -r["logme"])
    write_csv(out / "transferability.csv", rows, ["model", "logme", "nce", "leep", "hscore"])
    if rows:
        print("transferability (higher is better):\n" + transferability_table(rows))
    return {"images": scored, "resolution": resolution, "scores": rows, "skipped": skipped}


def transferability_table(rows: list[dict]) -> str:
    return markdown_table(
        ["model", "LogME", "NCE", "LEEP", "H-score"],
        [
            [r["model"], f"{r['logme']:.4f}", *(f"{r[k]:.4f}" if r[k] is not None else "" for k in ("nce", "leep"))]
            + [f"{r['hscore']:.3f}"]
            for r in rows
        ],
    )


def report(data: dict, names: list[str], per_class: list[int], pairs: list[dict]) -> str:
    counts, images, duplicates, check = data["counts"], data["images"], data["duplicates"], data["imagenet_check"]
    stats = counts["per_class_train"]
    lines = [
        f"# The data: `{data['data']}`",
        f"{counts['train']} train and {counts['test']} test images in {counts['classes']} classes; training images per "
        "class: "
        f"min {stats['min']}, median {stats['median']}, max {stats['max']}.",
        "![images per class](class_counts.png)",
        "## Images",
        markdown_table(
            ["", "min", "median", "mean", "max"],
            [[k.replace("_", " "), *images[k].values()] for k in ("width", "height", "aspect_ratio")],
        ),
        f"Pixel modes: {', '.join(f'{k} {v}' for k, v in images['modes'].items())} (every image becomes RGB for the "
        "model). "
        f"Formats: {', '.join(f'{k} {v}' for k, v in images['formats'].items())}.",
        "Smallest: "
        + ", ".join(f"{s['split']} {s['index']} ({s['width']}x{s['height']})" for s in images["smallest"])
        + ". Largest: "
        + ", ".join(f"{s['split']} {s['index']} ({s['width']}x{s['height']})" for s in images["largest"])
        + ".",
        "![image sizes](sizes.png)",
        "## Unreadable images",
        markdown_table(["split", "index", "error"], [[u["split"], u["index"], u["error"]] for u in data["unreadable"]])
        if data["unreadable"]
        else "None: every image decodes.",
        "## Duplicates",
        f"{duplicates['pairs']} pairs ({duplicates['exact']} exact: the same pixels; {duplicates['near']} near: "
        "perceptual hashes at most "
        f"{duplicates['max_distance']} of {HASH_SIZE**2} bits apart), {duplicates['train_test']} of them between train "
        "and test "
        "([duplicates.csv](duplicates.csv)).",
        f"**A train/test leak can inflate test accuracy by at most {duplicates['max_inflation_points']:.2f} points**: "
        f"{duplicates['test_images_with_a_train_copy']} test images have a copy in train, which a model may have "
        "memorised.",
    ]
    if pairs:
        lines.append("![duplicate pairs](duplicates.png)")
    lines += [
        "## What the model sees",
        "A few classes as stored, three of their training crops (random resized crop and flip, "
        "as train.py draws them) and the eval crop:",
        "![samples](samples.png)",
        "## The original's sanity check",
    ]
    if "skipped" in check:
        lines.append(f"Skipped: {check['skipped']}.")
    else:
        lines += [
            f"{check['arch']} with its ImageNet head ({check['weights']}) on {check['images']} training images calls "
            f"**{check['vehicle_share']:.1f}%** of them a vehicle:",
            markdown_table(["ImageNet group", "images"], [[g, n] for g, n in check["groups"].items()]),
            "Its most frequent ImageNet labels for the 10 largest classes:",
            markdown_table(
                ["class", "ImageNet top-1 labels (count)"],
                [
                    [name, ", ".join(f"{k} ({v})" for k, v in top.items())]
                    for name, top in check["largest_classes"].items()
                ],
            ),
        ]
    if "transferability" in data:
        lines += transferability_section(data["transferability"])
    return "\n\n".join(lines) + "\n"


def transferability_section(ranking: dict) -> list[str]:
    tau = transferability.TAU_ON_CARS
    lines = [
        "## Which pretrained model transfers best",
        f"Scored before any fine-tuning, from one forward pass over the {ranking['images']} training images at "
        f"{ranking['resolution']} px ([transferability.csv](transferability.csv)); higher is better for every score, "
        "best LogME first. LogME (You et al. 2021) and H-score (Bao et al. 2019) read the features the head takes in; "
        "NCE (Tran et al. 2019) and LEEP (Nguyen et al. 2020) read the model's own head, trained on its source task.",
        transferability_table(ranking["scores"]) if ranking["scores"] else "No candidate could be scored.",
        "How far to trust them: on Stanford Cars, the Transfer-Learning-Library benchmark compared each score's "
        "ranking of 10 ImageNet models with their fine-tuned accuracy (weighted Kendall tau, 1 is a perfect ranking): "
        + ", ".join(f"{transferability.SCORE_NAMES[name]} {value:.3f}" for name, value in tau.items())
        + " (the plain H-score's; the table's is the regularised H-score of Ibrahim et al. 2022, which that benchmark "
        "did not measure). A score ranks candidates; it does not predict an accuracy.",
    ]
    if ranking["skipped"]:
        lines.append(
            "Skipped: " + "; ".join(f"`{name}`: {reason}" for name, reason in ranking["skipped"].items()) + "."
        )
    return lines


if __name__ == "__main__":
    run_cli(main)
