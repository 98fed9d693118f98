"""eval.py: where a trained model is right and wrong, and what it looks at."""

import argparse
import random
from pathlib import Path

import numpy as np
import torch

from cars import analysis
from cars.checkpoint import add_model_flags, load_trained_from
from cars.cache import eval_loader
from cars.data import TransformedSplit, dataset_location, label_map, make_loader, open_hub_dataset, open_source, read_rgb
from cars.engine import Device, predict
from cars.errors import UserError
from cars.explain import CAM_METHODS, class_activation_maps, overlay
from cars.report import (markdown_table, plot_cam_grid, plot_confusion, plot_per_class, write_csv, write_json,
                         write_text)
from cars.runs import prepare_folder
from cars.train import pick_device, worker_count
from cars.transforms import eval_transform, normalize

CORRUPTIONS = ("contrast", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate", "spatter")
TTA_SCALES = (0.875, 1.0, 1.125)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a trained model: accuracy per class, confusions, GradCAM, TTA, robustness.")
    add_model_flags(parser, data_help="dataset to evaluate on and take class names from (default: the run's)")
    parser.add_argument("--out", help="output folder (default: <run>/eval, or eval-<name> beside a checkpoint file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--num-gradcam", type=int, default=16, help="random test images in gradcam_samples.png (default 16)")
    parser.add_argument("--cam-method", default="gradcam", choices=list(CAM_METHODS), help="CAM method (default gradcam)")
    parser.add_argument("--tta", action="store_true", help=f"also evaluate with test-time augmentation ({len(TTA_SCALES)} scales x flip)")
    parser.add_argument("--corruptions", action="store_true", help="also evaluate the dataset's corrupted copies of the test split")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1: one per core, at most 8)")
    parser.add_argument("--cache", default="auto", help="preprocessing cache for the test split, as train.py's --cache: auto, a folder, or off "
                        "(TTA and corrupted copies are always decoded)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--seed", type=int, default=0, help="chooses the GradCAM sample images (default 0)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_gradcam < 0 or (args.num_classes is not None and args.num_classes < 2):
        raise UserError("--batch-size must be positive, --num-gradcam not negative, --num-classes at least 2")
    return args


def output_folder(args, checkpoint: Path) -> Path:
    given = Path(args.checkpoint)
    out = Path(args.out) if args.out else given / "eval" if given.is_dir() else checkpoint.parent / f"eval-{checkpoint.stem}"
    prepare_folder(out, args.overwrite, "eval folder", "--out")
    return out


def corruption_splits(data: str) -> list[str]:
    """The corrupted test copies a hub-layout dataset has (none for other layouts)."""
    data = dataset_location(data)
    if Path(data).is_dir():
        return [c for c in CORRUPTIONS if any(Path(data).glob(f"data/{c}-*.parquet"))]
    try:
        from huggingface_hub import list_repo_files

        files = list_repo_files(data, repo_type="dataset")
    except Exception as error:
        raise UserError(f"could not list the files of {data} to find its corrupted splits: {str(error).splitlines()[0]}") from None
    return [c for c in CORRUPTIONS if any(f.startswith(f"data/{c}-") for f in files)]


def main(argv=None) -> None:
    args = parse_args(argv)
    trained = load_trained_from(args)
    if not trained.data:
        raise UserError(f"{trained.path} does not say which dataset it was trained on; pass --data")
    corruptions = corruption_splits(trained.data) if args.corruptions else []
    if args.corruptions and not corruptions:
        raise UserError(f"{trained.data} has no corrupted copies of its test split ({', '.join(CORRUPTIONS)}); drop --corruptions")
    _, test_split, dataset_names = open_source(trained.data)
    to_model = label_map(trained.class_names, dataset_names, trained.data)
    if to_model is not None:
        print(f"note: {trained.data} lists the model's {len(dataset_names)} classes in another order; its labels are matched to the model's by name")
    out = output_folder(args, trained.path)
    device_type = pick_device(args.device)
    device = Device(device_type)
    model = trained.model.to(device_type)
    workers = worker_count(args.workers)
    names = trained.class_names
    print(f"evaluating {trained.path} ({trained.arch}, {trained.resolution} px) on {len(test_split)} test images of {trained.data}")

    def logits_of(split, resolution=trained.resolution, flip=False, cache="off"):
        """The model's logits for every image of a split, and the true labels as the model's class indices."""
        if cache != "off":  # the test split at the trained resolution: what train.py cached, so usually no decoding at all
            loader = eval_loader(split, resolution, cache, False, args.batch_size, workers, device_type)
        else:
            transform = eval_transform(resolution)
            dataset = TransformedSplit(split, (lambda image: transform(image).flip(-1)) if flip else transform)
            loader = make_loader(dataset, args.batch_size, False, workers, args.seed)
        logits, labels = predict(model, loader, device)
        return logits, labels if to_model is None else to_model[labels]

    # 1-4: accuracy, per class, best and worst classes, confusions
    logits, labels = logits_of(test_split, cache=args.cache)
    predicted = logits.argmax(1)
    confidence = logits.softmax(1).max(1).values
    matrix = analysis.confusion_matrix(predicted.numpy(), labels.numpy(), len(names))
    classes = analysis.per_class_accuracy(matrix, names)
    worst, best = analysis.ranked(classes, 10, worst=True), analysis.ranked(classes, 10, worst=False)
    pairs = analysis.confused_pairs(matrix, 10)
    summary = {"checkpoint": str(trained.path), "arch": trained.arch, "resolution": trained.resolution, "data": trained.data,
               "split": "test", "images": len(labels), "top1": analysis.topk_accuracy(logits, labels, 1),
               "top5": analysis.topk_accuracy(logits, labels, 5)}
    print(f"top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%  ({len(labels)} images)")

    write_csv(out / "per_class.csv", [dict(id=c.index, name=c.name, correct=c.correct, total=c.total, accuracy=round(c.accuracy, 2))
                                      for c in classes], ["id", "name", "correct", "total", "accuracy"])
    write_csv(out / "predictions.csv", [dict(index=i, true=int(t), predicted=int(p), confidence=round(float(c), 4))
                                        for i, (t, p, c) in enumerate(zip(labels, predicted, confidence))],
              ["index", "true", "predicted", "confidence"])
    write_csv(out / "confused_pairs.csv", [dict(true_id=t, true=names[t], predicted_id=p, predicted=names[p], count=n) for t, p, n in pairs],
              ["true_id", "true", "predicted_id", "predicted", "count"])
    write_csv(out / "confusion_matrix.csv", [{"true \\ predicted": names[i], **{names[j]: int(matrix[i, j]) for j in range(len(names))}}
                                             for i in range(len(names))], ["true \\ predicted", *names])
    plot_per_class(classes, out / "per_class.png")
    plot_confusion(matrix, names, pairs, out / "confusion.png")
    class_table = lambda rows: markdown_table(["class", "correct", "accuracy"], [[c.name, f"{c.correct}/{c.total}", f"{c.accuracy:.1f}%"] for c in rows])  # noqa: E731
    pair_table = markdown_table(["true", "predicted as", "count"], [[names[t], names[p], n] for t, p, n in pairs])
    print("\nworst classes:\n" + class_table(worst) + "\n\nbest classes:\n" + class_table(best) + "\n\nmost confused pairs:\n" + pair_table)

    # 5: what the model looks at
    rng = random.Random(args.seed)
    sample = sorted(rng.sample(range(len(labels)), min(args.num_gradcam, len(labels))))
    wrong_of_worst = []
    for c in worst[:5]:
        wrong = [i for i in range(len(labels)) if labels[i] == c.index and predicted[i] != c.index]
        if wrong:
            wrong_of_worst.append(rng.choice(wrong))
    for indices, filename, title in ((sample, "gradcam_samples.png", f"{args.cam_method}: {len(sample)} random test images"),
                                     (wrong_of_worst, "gradcam_worst.png", f"{args.cam_method}: a mistake from each of the worst classes")):
        if indices:
            tiles = cam_tiles(model, test_split, indices, predicted, labels, confidence, names, trained.resolution, args.cam_method)
            plot_cam_grid(tiles, out / filename, title)

    # 6: test-time augmentation
    tta_section = ""
    if args.tta:
        tta_logits = torch.zeros_like(logits)
        for scale in TTA_SCALES:
            size = round(trained.resolution * scale)
            for flip in (False, True):
                tta_logits += logits_of(test_split, size, flip)[0]
        tta_predicted = (tta_logits / (2 * len(TTA_SCALES))).argmax(1)
        tta_classes = analysis.per_class_accuracy(analysis.confusion_matrix(tta_predicted.numpy(), labels.numpy(), len(names)), names)
        summary["tta"] = {"scales": [round(trained.resolution * s) for s in TTA_SCALES], "flip": True,
                          "top1": analysis.topk_accuracy(tta_logits, labels, 1), "top1_without": summary["top1"]}
        rows = [[c.name, f"{c.accuracy:.1f}%", f"{tta_classes[c.index].accuracy:.1f}%", f"{tta_classes[c.index].accuracy - c.accuracy:+.1f}"]
                for c in worst]
        tta_section = (f"## Test-time augmentation\n\n{len(TTA_SCALES)} scales ({', '.join(map(str, summary['tta']['scales']))} px) x "
                       f"horizontal flip, logits averaged: top-1 **{summary['tta']['top1']:.2f}%** "
                       f"(without: {summary['top1']:.2f}%, {summary['tta']['top1'] - summary['top1']:+.2f}).\n\n"
                       "The bottom-10 classes with and without TTA:\n\n" + markdown_table(["class", "without", "with TTA", "change"], rows) + "\n")
        print(f"\nTTA top-1 {summary['tta']['top1']:.2f}% (without {summary['top1']:.2f}%)")

    # 7: robustness to the dataset's corrupted copies of the test split
    robustness_section = ""
    if corruptions:
        splits = open_hub_dataset(dataset_location(trained.data), trained.data, splits=corruptions)[:-1]
        accuracy = {name: analysis.topk_accuracy(*logits_of(split), 1) for name, split in zip(corruptions, splits)}
        mean = sum(accuracy.values()) / len(accuracy)
        summary["corruptions"] = {"accuracy": accuracy, "mean": mean, "clean": summary["top1"], "mean_drop": summary["top1"] - mean}
        rows = [[name, f"{acc:.2f}%", f"{acc - summary['top1']:+.2f}"] for name, acc in accuracy.items()]
        rows.append(["**mean**", f"**{mean:.2f}%**", f"**{mean - summary['top1']:+.2f}**"])
        robustness_section = "## Robustness\n\nAccuracy on the corrupted copies of the test split, and the change from clean " \
                             f"({summary['top1']:.2f}%):\n\n" + markdown_table(["corruption", "accuracy", "change"], rows) + "\n"
        print("\nrobustness:\n" + markdown_table(["corruption", "accuracy", "change"], rows))

    # 8: one page that ties it together
    write_json(out / "summary.json", summary)
    report = [
        f"# Evaluation of `{trained.path}`",
        f"{trained.arch} at {trained.resolution} px on the test split of `{trained.data}` ({len(labels)} images, {len(names)} classes).",
        f"**Top-1 {summary['top1']:.2f}%**, top-5 {summary['top5']:.2f}%; mean per-class accuracy "
        f"{np.nanmean([c.accuracy for c in classes]):.2f}%.",
        "## Per-class accuracy", "Every class, worst first ([per_class.csv](per_class.csv)):", "![per-class accuracy](per_class.png)",
        "### Bottom 10", class_table(worst), "### Top 10", class_table(best),
        "## Most confused pairs", "True class -> predicted class, counted over the test split "
        "([confused_pairs.csv](confused_pairs.csv), full matrix in [confusion_matrix.csv](confusion_matrix.csv)):", pair_table,
        "![confusion among the most confused classes](confusion.png)",
        "## What the model looks at", f"{args.cam_method} heatmaps for the predicted class, over the image the model saw.",
    ]
    if sample:
        report.append("![CAM on random test images](gradcam_samples.png)")
    if wrong_of_worst:
        report += ["A mistake from each of the worst classes:", "![CAM on mistakes of the worst classes](gradcam_worst.png)"]
    write_text(out / "report.md", "\n\n".join(report) + "\n\n" + tta_section + ("\n" if tta_section else "") + robustness_section)
    print(f"\nreport: {out / 'report.md'}")


def cam_tiles(model, split, indices, predicted, labels, confidence, names, resolution, method) -> list[dict]:
    """CAM overlays of the predicted class for some images of a split, one CAM object for all."""
    transform = eval_transform(resolution)
    pixels = torch.stack([transform(read_rgb(split, i)) for i in indices])
    maps = class_activation_maps(model, normalize(pixels), [int(predicted[i]) for i in indices], method)
    return [{"image": overlay(pixels[k].permute(1, 2, 0).numpy(), maps[k]), "true": names[int(labels[i])],
             "predicted": names[int(predicted[i])], "confidence": float(confidence[i])} for k, i in enumerate(indices)]
