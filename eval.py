"""eval.py: where a trained model is right and wrong, and what it looks at. `main` lists the sections in order."""

from cars.cli import check_command_line, parse_eval

check_command_line(__name__, parse_eval)  # --help and mistakes answer before the imports below load torch

import argparse
import dataclasses
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cars import adaptation, analysis, calibration, familiarity, finetune, methods, transfer
from cars.cli import TTA_SCALES
from cars.config import load_saved
from cars.data import (
    CORRUPTIONS,
    SubsetSplit,
    corruption_splits,
    dataset_location,
    label_map,
    open_hub_dataset,
    open_source,
    read_rgb,
    run_splits,
)
from cars.engine import Device, collect_logits
from cars.errors import UserError, run_cli
from cars.explain import beside, class_activation_maps, display_pixels
from cars.familiarity import Familiarity
from cars.inference import Trained, load_trained_from
from cars.loaders import TransformedSplit, eval_loader, make_loader
from cars.methods import subset_words
from cars.models import kept_head_inputs
from cars.report import (
    markdown_table,
    plot_cam_grid,
    plot_cka,
    plot_confusion,
    plot_linear_probe,
    plot_per_class,
    plot_reliability,
    plot_risk_coverage,
    plot_weight_change,
    write_csv,
    write_json,
    write_text,
)
from cars.runs import prepare_folder, read_summary, recipe_difference, scratch_twin
from cars.runtime import pick_device, worker_count
from cars.transforms import eval_transform, normalize

LENS_DOC = "What it means: docs/explanation/transfer-lens.md."  # the project's docs, not a link: the report moves
ONE_TABLE = 20  # classes up to which the report ranks every class in one table
CKA_IMAGES = 1024  # eval images the CKA is estimated on, in minibatches: enough for two decimals, 3 forward passes each


def output_folder(args, checkpoint: Path) -> Path:
    given = Path(args.checkpoint)
    out = (
        Path(args.out)
        if args.out
        else given / "eval"
        if given.is_dir()
        else checkpoint.parent / f"eval-{checkpoint.stem}"
    )
    prepare_folder(out, args.overwrite, "eval folder", "--out")
    # marked as eval's own before anything else is written: a crash part way leaves a folder --overwrite may replace
    write_json(out / "summary.json", {"status": "running", "checkpoint": str(checkpoint)})
    return out


@dataclass
class Evaluation:
    """One evaluation: the model, where it runs, the test split and where the files go."""

    args: argparse.Namespace
    trained: Trained
    device: Device
    train_split: object  # the images the run trained on, where its checkpoint says which; else the dataset's train
    train_words: str  # which images those are, in words, for the report
    val_split: object | None  # the run's validation split, where its checkpoint names one on this data
    test_split: object
    # dataset label -> the model's class index, when the dataset orders the classes otherwise
    to_model: torch.Tensor | None
    corruptions: list[str]
    out: Path
    workers: int
    start: transfer.Start | str  # the network the fine-tune started from, or why the transfer section is skipped
    scratch: Path | None  # the same recipe's run from random weights, when there is one

    @property
    def names(self) -> list[str]:
        return self.trained.class_names

    def loader_of(
        self, split, resolution: int | None = None, flip: bool = False, cache: str = "off", skip_bad_images=False
    ):
        """A split's images as the model sees them, in order (the unreadable ones left out with skip_bad_images)."""
        resolution = resolution or self.trained.resolution
        interpolation = self.trained.interpolation
        if cache != "off":  # at the trained resolution: what train.py cached, so usually no decoding at all
            return eval_loader(
                split,
                resolution=resolution,
                interpolation=interpolation,
                cache=cache,
                skip_bad_images=skip_bad_images,
                batch_size=self.args.batch_size,
                workers=self.workers,
                device_type=self.device.type,
            )
        transform = eval_transform(resolution, interpolation=interpolation)
        dataset = TransformedSplit(
            split, (lambda image: transform(image).flip(-1)) if flip else transform, skip_bad_images
        )
        return make_loader(
            dataset, batch_size=self.args.batch_size, shuffle=False, workers=self.workers, seed=self.args.seed
        )

    def logits_of(self, split, resolution: int | None = None, flip: bool = False, cache: str = "off", model=None):
        """The model's logits (or `model`'s) for every image of a split, and the true labels as the model's class
        indices."""
        loader = self.loader_of(split, resolution, flip, cache)
        logits, labels = collect_logits(model or self.trained.model, loader, self.device)
        return logits, labels if self.to_model is None else self.to_model[labels]


@dataclass
class Scores:
    """The model's answers on the test split and what they add up to."""

    logits: torch.Tensor
    labels: torch.Tensor
    names: list[str]

    def __post_init__(self):
        self.predicted = self.logits.argmax(1)
        self.confidence = self.logits.softmax(1).max(1).values
        self.matrix = analysis.confusion_matrix(self.predicted.numpy(), self.labels.numpy(), len(self.names))
        self.classes = analysis.per_class_accuracy(self.matrix, self.names)
        self.worst, self.best = (
            analysis.ranked(self.classes, 10, worst=True),
            analysis.ranked(self.classes, 10, worst=False),
        )
        self.pairs = analysis.confused_pairs(self.matrix, 10)

    def class_table(self, classes) -> str:
        return markdown_table(
            ["class", "correct", "accuracy"],
            [[c.name, f"{c.correct}/{c.total}", f"{c.accuracy:.1f}%"] for c in classes],
        )

    def pair_table(self) -> str:
        return markdown_table(
            ["true", "predicted as", "count"], [[self.names[t], self.names[p], n] for t, p, n in self.pairs]
        )


def main(argv=None) -> None:
    evaluation = start(parse_eval(argv))
    pytorch = evaluation.trained.backend == "pytorch"
    # the features the head reads, kept from the scoring pass: the familiarity check is calibrated on them
    logits, labels, test_features = answered(evaluation, evaluation.test_split, cache=evaluation.args.cache)
    scores = Scores(logits, labels, evaluation.names)
    summary = write_scores(evaluation, scores)
    # CAMs need gradients: none from ONNX Runtime
    cams = draw_cams(evaluation, scores) if evaluation.trained.backend == "pytorch" else []
    tta = test_time_augmentation(evaluation, scores, summary) if evaluation.args.tta else ""
    corrupted = corrupted_splits(evaluation)
    shifted_answers = {name: answered(evaluation, split) for name, split in corrupted.items()}
    shifted = {name: (logits, labels) for name, (logits, labels, _) in shifted_answers.items()}
    robustness = corrupted_copies(summary, shifted) if shifted else ""
    calibrated, temperature, measured = calibrate_probabilities(evaluation, scores, summary, shifted)
    write_predictions(evaluation, scores, temperature)
    adapted = (
        adapt_to_shifts(evaluation, scores, summary, corrupted, shifted) if evaluation.args.adapt != "none" else ""
    )
    unfamiliar, check = calibrate_familiarity(evaluation, summary, held_out=test_features) if pytorch else ("", None)
    answers = {"test": (scores.logits, scores.labels, test_features), **shifted_answers}
    abstention = knowing_when_to_abstain(
        evaluation, summary, answers=answers, temperature=temperature, measured=measured, check=check
    )
    changed = what_fine_tuning_changed(evaluation, summary)
    bought = what_pretraining_bought(evaluation, summary)
    write_json(evaluation.out / "summary.json", summary)
    sections = [tta, robustness, calibrated, abstention, adapted, unfamiliar, changed]
    write_report(evaluation, scores=scores, summary=summary, cams=cams, opening=bought, sections=sections)
    print(f"\nreport: {evaluation.out / 'report.md'}")


def answered(
    evaluation: Evaluation, split, cache: str = "off"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The model's logits for a split, its labels, and the features its head read in that same pass (None from ONNX
    Runtime, which gives none)."""
    pytorch = evaluation.trained.backend == "pytorch"
    with kept_head_inputs(evaluation.trained.model) if pytorch else nullcontext([]) as features:
        logits, labels = evaluation.logits_of(split, cache=cache)
    return logits, labels, torch.cat(features) if features else None


def start(args) -> Evaluation:
    """Every input checked (the model, its dataset and classes, the corrupted copies) before the output folder is
    made."""
    trained = load_trained_from(args)
    if not trained.data:
        raise UserError(f"{trained.path} does not say which dataset it was trained on; pass --data")
    corruptions = corruption_splits(trained.data) if args.corruptions else []
    if args.corruptions and not corruptions:
        raise UserError(
            f"{trained.data} has no corrupted copies of its test split ({', '.join(CORRUPTIONS)}); drop --corruptions"
        )
    train_split, test_split, dataset_names = open_source(trained.data)
    train_split, train_words, val_split = run_training_images(trained, train_split)
    to_model = label_map(trained.class_names, dataset_names, trained.data)
    if to_model is not None:
        print(
            f"note: {trained.data} lists the model's {len(dataset_names)} classes in another order; its labels are "
            "matched to the model's by name"
        )
    start = find_start(args, trained)
    scratch = find_scratch(args, trained)
    out = output_folder(args, trained.path)
    device = Device(pick_device(args.device))
    trained.model.to(device.type)
    print(
        f"evaluating {trained.path} ({trained.arch}, {trained.resolution} px) on {len(test_split)} test images of "
        f"{trained.data}"
    )
    return Evaluation(
        args,
        trained,
        device,
        train_split,
        train_words,
        val_split,
        test_split,
        to_model,
        corruptions,
        out,
        worker_count(args.workers),
        start,
        scratch,
    )


def run_training_images(trained: Trained, train_split) -> tuple[object, str, object | None]:
    """The images the run trained on (its validation split and any --train-per-class or --train-fraction subset taken
    out, as its saved config draws them), which they are in words (what the probes and the familiarity check are
    fitted on), and its validation split (the temperature is fitted on it) or None. The dataset's whole training split
    and no validation split when the checkpoint does not say, or was trained on other data."""
    cfg = trained.config
    if cfg is None or cfg.data != trained.data:
        return (
            train_split,
            f"all {len(train_split)} images of the training split (the checkpoint does not say which of them the run "
            "trained on)",
            None,
        )
    splits, subset = run_splits(cfg), subset_words(cfg)
    own, val = splits.train, splits.eval if cfg.val_split else None
    held_out = "its validation split held out"
    which = (
        f"{subset}, drawn after its validation split was held out; subset.csv"
        if subset and cfg.val_split
        else f"{subset}; subset.csv"
        if subset
        else held_out
        if cfg.val_split
        else ""
    )
    return own, f"the {len(own)} images the run trained on" + (f" ({which})" if which else ""), val


def find_scratch(args, trained: Trained) -> Path | None:
    """The run of the same recipe from random weights: --scratch, or a run folder beside this one that differs only in
    its weights and seed (runs.scratch_twin)."""
    if args.scratch:
        scratch = Path(args.scratch)
        if not (scratch / "config.toml").is_file() or "best_eval_acc" not in read_summary(scratch):
            raise UserError(f"--scratch {scratch} is not a finished run folder (config.toml and summary.json)")
        scratch_cfg = load_saved(scratch / "config.toml")
        if scratch_cfg.weights.lower() != "none":
            raise UserError(f"--scratch {scratch} did not start from random weights (--weights none)")
        if test_accuracy(read_summary(scratch)) is None:
            raise UserError(
                f"--scratch {scratch} chose its epoch on a validation split and never read the test split "
                "(--no-final-test), so it has no test accuracy to compare; evaluate it first (uv run eval.py "
                f"{scratch}) and train it again without --no-final-test, or name another run"
            )
        own_data = (trained.config or trained).data  # the run's own, whatever --data evaluates on
        if scratch_cfg.data != own_data:
            raise UserError(
                f"--scratch {scratch} trained on {scratch_cfg.data}, and {trained.path} on {own_data}: their test "
                f"accuracies are of different test splits; name a run on {own_data}"
            )
        return scratch
    run_dir = trained.path.parent
    if not (run_dir / "config.toml").is_file() or str(trained.start_weights).lower() in ("none", ""):
        return None
    return scratch_twin(run_dir)


def find_start(args, trained: Trained) -> transfer.Start | str:
    """The network the fine-tune started from, rebuilt, or why the transfer section is skipped. Weights given with
    --start-weights must load; a run's own that are not on this machine only skip the section."""
    if args.transfer == "off":
        return "skipped (--transfer off)"
    if trained.untrained and not args.start_weights:
        return (
            "skipped: no image was trained on (--epochs 0): the network is its start, with a head made without training"
        )
    if trained.backend != "pytorch":
        return "skipped: it compares the model's weights, which ONNX Runtime does not give (use --backend pytorch)"
    if args.start_weights is not None and not args.start_weights.strip():
        raise UserError(
            "--start-weights is empty; give a torchvision weights name, demo-pretrained or a state-dict file, or leave "
            "it out to use the run's own start"
        )
    weights = args.start_weights or trained.start_weights
    if not isinstance(weights, str) or not weights:
        return (
            f"skipped: {trained.path} does not say which weights its fine-tune started from; pass --start-weights "
            "(a torchvision weights name, demo-pretrained, or a state-dict file)"
        )
    if weights.lower() == "none":
        return (
            "skipped: the run started from random weights (--weights none), so nothing was transferred; pass "
            "--start-weights to compare it with other weights"
        )
    try:
        start = transfer.starting_network(
            trained.arch, weights, len(trained.class_names), resolution=trained.resolution
        )
        if not all(torch.isfinite(t).all() for t in start.model.state_dict().values() if t.is_floating_point()):
            raise UserError(f"the start weights {weights} hold NaN or infinite values; give weights that trained")
    except UserError as error:
        if args.start_weights:
            raise
        return f"skipped: the weights the run started from are not on this machine: {error}"
    recorded = trained.start_fingerprint
    if recorded and start.fingerprint != recorded and not args.start_weights:
        return (
            f"skipped: the {weights} weights on this machine are not the ones {trained.path} started from (fingerprint "
            f"{start.fingerprint} here, {recorded} in the run); they were made or changed since. Pass --start-weights "
            "FILE with the run's own starting weights"
        )
    start.matches_run = None if not recorded else start.fingerprint == recorded
    return start


def write_scores(evaluation: Evaluation, scores: Scores) -> dict:
    """Accuracy overall and per class, the best and worst classes, the confusions: printed, and as CSVs and plots."""
    trained, out, names, labels = evaluation.trained, evaluation.out, scores.names, scores.labels
    summary = {
        "status": "finished",
        "checkpoint": str(trained.path),
        "arch": trained.arch,
        "resolution": trained.resolution,
        "data": trained.data,
        "split": "test",
        "images": len(labels),
        "top1": analysis.topk_accuracy(scores.logits, labels, 1),
        "top5": analysis.topk_accuracy(scores.logits, labels, 5),
    }
    print(f"top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%  ({len(labels)} images)")
    write_csv(
        out / "per_class.csv",
        [
            dict(id=c.index, name=c.name, correct=c.correct, total=c.total, accuracy=round(c.accuracy, 2))
            for c in scores.classes
        ],
        ["id", "name", "correct", "total", "accuracy"],
    )
    write_csv(
        out / "confused_pairs.csv",
        [dict(true_id=t, true=names[t], predicted_id=p, predicted=names[p], count=n) for t, p, n in scores.pairs],
        ["true_id", "true", "predicted_id", "predicted", "count"],
    )
    write_csv(
        out / "confusion_matrix.csv",
        [
            {"true \\ predicted": names[i], **{names[j]: int(scores.matrix[i, j]) for j in range(len(names))}}
            for i in range(len(names))
        ],
        ["true \\ predicted", *names],
    )
    plot_per_class(scores.classes, out / "per_class.png")
    plot_confusion(scores.matrix, names, scores.pairs, out / "confusion.png")
    print(
        "\nworst classes:\n"
        + scores.class_table(scores.worst)
        + "\n\nbest classes:\n"
        + scores.class_table(scores.best)
        + "\n\nmost confused pairs:\n"
        + scores.pair_table()
    )
    return summary


def write_predictions(evaluation: Evaluation, scores: Scores, temperature: float) -> None:
    """predictions.csv: every test image's true and predicted class, and the top class's probability as the network
    gives it and calibrated (what predict.py shows)."""
    calibrated, _ = calibration.confidences(scores.logits, scores.labels, temperature)
    write_csv(
        evaluation.out / "predictions.csv",
        [
            dict(index=i, true=int(t), predicted=int(p), confidence=round(float(c), 4), calibrated=round(float(k), 4))
            for i, (t, p, c, k) in enumerate(
                zip(scores.labels, scores.predicted, scores.confidence, calibrated, strict=True)
            )
        ],
        ["index", "true", "predicted", "confidence", "calibrated"],
    )


def draw_cams(evaluation: Evaluation, scores: Scores) -> list[str]:
    """What the model looks at: CAMs of random test images, and of a mistake from each of the 5 worst classes.
    Returns the names of the pictures drawn."""
    args, labels, predicted = evaluation.args, scores.labels, scores.predicted
    rng = random.Random(args.seed)
    sample = sorted(rng.sample(range(len(labels)), min(args.num_gradcam, len(labels))))
    wrong_of_worst = []
    for c in scores.worst[:5]:
        wrong = [i for i in range(len(labels)) if labels[i] == c.index and predicted[i] != c.index]
        if wrong:
            wrong_of_worst.append(rng.choice(wrong))
    drawn = []
    for indices, filename, title in (
        (sample, "gradcam_samples.png", f"{args.cam_method}: {len(sample)} random test images"),
        (wrong_of_worst, "gradcam_worst.png", f"{args.cam_method}: a mistake from each of the worst classes"),
    ):
        if indices:
            tiles = cam_tiles(
                evaluation.trained.model,
                evaluation.test_split,
                indices=indices,
                predicted=predicted,
                labels=labels,
                confidence=scores.confidence,
                names=scores.names,
                resolution=evaluation.trained.resolution,
                interpolation=evaluation.trained.interpolation,
                method=args.cam_method,
            )
            plot_cam_grid(tiles, evaluation.out / filename, title)
            drawn.append(filename)
    return drawn


def test_time_augmentation(evaluation: Evaluation, scores: Scores, summary: dict) -> str:
    """3 scales x flip, logits averaged: the accuracy with and without, and for the bottom-10 classes. Returns the
    report's section."""
    resolution, labels = evaluation.trained.resolution, scores.labels
    tta_logits = torch.zeros_like(scores.logits)
    for scale in TTA_SCALES:
        for flip in (False, True):
            tta_logits += evaluation.logits_of(evaluation.test_split, round(resolution * scale), flip)[0]
    tta_predicted = (tta_logits / (2 * len(TTA_SCALES))).argmax(1)
    tta_classes = analysis.per_class_accuracy(
        analysis.confusion_matrix(tta_predicted.numpy(), labels.numpy(), len(scores.names)), scores.names
    )
    summary["tta"] = {
        "scales": [round(resolution * s) for s in TTA_SCALES],
        "flip": True,
        "top1": analysis.topk_accuracy(tta_logits, labels, 1),
        "top1_without": summary["top1"],
    }
    rows = [
        [
            c.name,
            f"{c.accuracy:.1f}%",
            f"{tta_classes[c.index].accuracy:.1f}%",
            f"{tta_classes[c.index].accuracy - c.accuracy:+.1f}",
        ]
        for c in scores.worst
    ]
    print(f"\nTTA top-1 {summary['tta']['top1']:.2f}% (without {summary['top1']:.2f}%)")
    return (
        f"## Test-time augmentation\n\n{len(TTA_SCALES)} scales ({', '.join(map(str, summary['tta']['scales']))} px) x "
        f"horizontal flip, logits averaged: top-1 **{summary['tta']['top1']:.2f}%** "
        f"(without: {summary['top1']:.2f}%, {summary['tta']['top1'] - summary['top1']:+.2f}).\n\n"
        "The bottom-10 classes with and without TTA:\n\n"
        + markdown_table(["class", "without", "with TTA", "change"], rows)
        + "\n"
    )


def corrupted_splits(evaluation: Evaluation) -> dict:
    """The dataset's corrupted copies of the test split that eval.py reads, by name ({} without --corruptions)."""
    if not evaluation.corruptions:
        return {}
    data = evaluation.trained.data
    splits = open_hub_dataset(dataset_location(data), data, splits=evaluation.corruptions)[:-1]
    return dict(zip(evaluation.corruptions, splits, strict=True))


def halves(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded half of `count` images and the other half, each in order: one fits or adapts, the other is scored."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[: count // 2].sort().values, order[count // 2 :].sort().values


def adapt_to_shifts(evaluation: Evaluation, scores: Scores, summary: dict, corrupted: dict, shifted: dict) -> str:
    """--adapt: per corrupted copy (and the clean split, for what adaptation costs where nothing shifted), a copy of
    the network adapted on a seeded half of it without labels (cars/adaptation.py), and the accuracy of the other half
    before and after. Returns the report's section."""
    how, trained = evaluation.args.adapt, evaluation.trained
    title = "## Adapting without labels\n\n"
    norms = adaptation.batch_norms(trained.model) if trained.backend == "pytorch" else []
    if not norms:
        why = (
            "ONNX Runtime gives no BatchNorm to adapt"
            if trained.backend != "pytorch"
            else f"{trained.arch} has no BatchNorm layer to adapt"
        )
        print(f"\nadaptation (--adapt {how}): skipped, {why}")
        return f"{title}--adapt {how}: skipped, {why}.\n"
    results = {}
    for name, split, (before_logits, labels) in [
        ("test (clean)", evaluation.test_split, (scores.logits, scores.labels)),
        *((n, corrupted[n], shifted[n]) for n in corrupted),
    ]:
        adapt_on, measured = halves(len(labels), evaluation.args.seed)
        batches = evaluation.device.batches(evaluation.loader_of(SubsetSplit(split, adapt_on.tolist(), name)))
        model = adaptation.adapted(trained.model, batches, how)
        after_logits, after_labels = evaluation.logits_of(SubsetSplit(split, measured.tolist(), name), model=model)
        results[name] = {
            "images": len(measured),
            "before": analysis.topk_accuracy(before_logits[measured], labels[measured], 1),
            "after": analysis.topk_accuracy(after_logits, after_labels, 1),
        }
    clean, shifts = results.pop("test (clean)"), results
    mean = {key: sum(r[key] for r in shifts.values()) / len(shifts) for key in ("before", "after")}
    summary["adaptation"] = {"method": how, "clean": clean, "corruptions": shifts, "mean": mean}
    shown = [*shifts.items(), ("**mean of the corrupted copies**", {"images": "", **mean}), ("test (clean)", clean)]
    rows = [
        [name, str(r["images"]), f"{r['before']:.2f}%", f"{r['after']:.2f}%", f"{r['after'] - r['before']:+.2f}"]
        for name, r in shown
    ]
    table = markdown_table(["split", "images scored", "before", f"after --adapt {how}", "change"], rows)
    print(f"\nadaptation (--adapt {how}):\n{table}")
    words = {
        "bn": "its BatchNorm statistics estimated again on them",
        "tent": "its BatchNorm statistics estimated again and its BatchNorm scales and shifts trained to make the "
        "predictions confident (the mean entropy, by SGD, one pass; Tent, Wang et al. 2021)",
    }[how]
    return (
        f"{title}Each split was halved by the seed: a copy of the network adapted on one half, without its labels, "
        f"{words}; the other half is scored, before and after. The clean split says what adaptation costs where "
        f"nothing shifted.\n\n{table}\n"
    )


def corrupted_copies(summary: dict, shifted: dict) -> str:
    """Robustness: the accuracy on each of the dataset's corrupted copies of the test split. Returns the report's
    section."""
    accuracy = {name: analysis.topk_accuracy(logits, labels, 1) for name, (logits, labels) in shifted.items()}
    mean = sum(accuracy.values()) / len(accuracy)
    summary["corruptions"] = {
        "accuracy": accuracy,
        "mean": mean,
        "clean": summary["top1"],
        "mean_drop": summary["top1"] - mean,
    }
    rows = [[name, f"{acc:.2f}%", f"{acc - summary['top1']:+.2f}"] for name, acc in accuracy.items()]
    rows.append(["**mean**", f"**{mean:.2f}%**", f"**{mean - summary['top1']:+.2f}**"])
    print("\nrobustness:\n" + markdown_table(["corruption", "accuracy", "change"], rows))
    return (
        "## Robustness\n\nAccuracy on the corrupted copies of the test split, and the change from clean "
        f"({summary['top1']:.2f}%):\n\n" + markdown_table(["corruption", "accuracy", "change"], rows) + "\n"
    )


def what_fine_tuning_changed(evaluation: Evaluation, summary: dict) -> str:
    """The transfer lens: how far each block's weights and BatchNorm statistics moved from the start, how similar the
    features stayed (CKA, against a random network's as the control), and what a linear classifier on the starting
    features reaches. Files in <eval folder>/transfer/; returns the report's section."""
    start, trained, args = evaluation.start, evaluation.trained, evaluation.args
    if isinstance(start, str):
        print(f"\nwhat fine-tuning changed: {start}")
        return f"## What fine-tuning changed\n\n{start[0].upper()}{start[1:]}.\n"
    began = time.perf_counter()
    out, device, tuned = evaluation.out / "transfer", evaluation.device, trained.model
    out.mkdir(exist_ok=True)
    start.model.to(device.type)
    control = transfer.random_network(
        trained.arch, len(trained.class_names), args.seed, resolution=trained.resolution
    ).to(device.type)
    stage_list = finetune.stages(tuned)

    changes = transfer.weight_change(start.model, tuned, head_is_new=start.head_is_new)
    write_csv(out / "weight_change.csv", changes, ["layer", "parameters", "relative_change", "start"])
    drift = transfer.bn_drift(start.model, tuned)
    write_csv(out / "bn_drift.csv", drift, ["layer", "channels", "mean_shift", "std_shift"])

    rng = random.Random(args.seed)
    test = evaluation.test_split
    subset = sorted(rng.sample(range(len(test)), min(CKA_IMAGES, len(test))))
    cka = transfer.minibatch_cka(
        start.model,
        tuned,
        control,
        stage_list=stage_list,
        loader=evaluation.loader_of(SubsetSplit(test, subset, "test"), cache=args.cache),
        device=device,
    )
    cka_rows = [
        dict(layer=label, cka=tuned_cka, cka_control=control_cka) for label, (tuned_cka, control_cka) in cka.items()
    ]
    write_csv(out / "cka.csv", cka_rows, ["layer", "cka", "cka_control"])

    train_x, train_y = transfer.pooled_stage_features(
        start.model,
        stage_list,
        evaluation.loader_of(evaluation.train_split, cache=args.cache, skip_bad_images=True),
        device,
        description="probe: train",
    )
    test_x, test_y = transfer.pooled_stage_features(
        start.model, stage_list, evaluation.loader_of(test, cache=args.cache), device, description="probe: test"
    )
    probes = {label: transfer.linear_probe(train_x[label], train_y, test_x[label], test_y) for label, _ in stage_list}
    probe_rows = [dict(layer=label, probe_acc=probe.accuracy) for label, probe in probes.items()]
    write_csv(
        out / "linear_probe.csv",
        [*probe_rows, dict(layer="fine-tuned", probe_acc=summary["top1"])],
        ["layer", "probe_acc"],
    )
    seconds = time.perf_counter() - began

    title = f"{trained.arch} fine-tuned from {start.weights}"
    plot_weight_change(changes, out / "weight_change.png", title=title)
    plot_cka(cka_rows, out / "cka.png", title=f"{title}: features on {len(subset)} eval images")
    plot_linear_probe(probe_rows, summary["top1"], out / "linear_probe.png", title=title)

    moved = sorted((r for r in changes if r["start"] != "new"), key=lambda r: -r["relative_change"])
    # the probe to beat is the one on the features the head reads: choosing the best stage on the eval split would
    # choose on the test split
    final_probe = probe_rows[-1]
    closest, lowest = transfer.closest_and_furthest(cka_rows)
    summary["transfer"] = {
        "start_weights": start.weights,
        "start_fingerprint": start.fingerprint,
        "start_matches_run": start.matches_run,
        "most_moved": {r["layer"]: r["relative_change"] for r in moved[:3]},
        "least_moved": {moved[-1]["layer"]: moved[-1]["relative_change"]},
        "cka": {r["layer"]: r["cka"] for r in cka_rows},
        "cka_control": {r["layer"]: r["cka_control"] for r in cka_rows},
        "cka_images": len(subset),
        "probe": {r["layer"]: r["probe_acc"] for r in probe_rows},
        "probe_fitted_on": evaluation.train_words,
        "probes_converged": all(p.converged for p in probes.values()),
        "fine_tuned": summary["top1"],
        "forward_passes": {"train": len(train_y), "test": len(test_y), "cka": 3 * len(subset)},
        "seconds": round(seconds, 2),
    }
    own = trained.config
    # LoRA's promise, measured: each adapted layer moved by a matrix of rank at most --lora
    ranks = transfer.change_ranks(start.model, tuned, methods.lora_targets(own, tuned)) if own and own.lora else {}
    if ranks:
        summary["transfer"]["change_ranks"] = ranks
    largest_drift = max(drift, key=lambda r: r["mean_shift"], default=None)
    still = [r["layer"] for r in changes if r["start"] != "new" and r["relative_change"] == 0]
    summary["transfer"]["unchanged_blocks"] = still
    most = ", ".join(f"{r['layer']} ({r['relative_change']:.3f})" for r in moved[:3])
    identity = {
        True: "",
        False: f" (these are not the weights the run started from: their fingerprint {start.fingerprint} differs from "
        f"the run's {trained.start_fingerprint})",
        None: " (the run does not record a fingerprint of its start: the weights are taken by name)",
    }[start.matches_run]
    reading = [
        f"Fine-tuning from `{start.weights}`{identity} moved the blocks {most} "
        f"most and {moved[-1]['layer']} least ({moved[-1]['relative_change']:.3f}); relative change is "
        "||W - W0|| / ||W0|| over a block's weights and biases"
        + (", and the head is new." if start.head_is_new else ".")
        + (f" {len(still)} blocks did not move at all, as the method froze them: {', '.join(still)}." if still else "")
        + (
            f" LoRA adapted {len(ranks)} layers, each by a change of rank at most {own.lora}: the numerical rank of "
            f"their measured changes W - W0 is at most {max(ranks.values())} (singular values above 1e-4 of the "
            "largest)."
            if ranks
            else ""
        ),
        f"The BatchNorm statistics moved most in {largest_drift['layer']}: its running means by "
        f"{largest_drift['mean_shift']:.2f} starting standard deviations on average."
        if largest_drift
        else "The network has no BatchNorm statistics to move.",
        f"The fine-tuned features are closest to the start at {closest['layer']} (CKA {closest['cka']:.2f}; a randomly "
        f"initialised network scores {closest['cka_control']:.2f} there) and furthest at {lowest['layer']} "
        f"(CKA {lowest['cka']:.2f}; random: {lowest['cka_control']:.2f})."
        if closest
        else "CKA is undefined at every stage: the features did not vary over the images.",
        f"A linear classifier on the starting network's frozen final features ({final_probe['layer']}, what the head "
        f"reads), fitted on {evaluation.train_words}, reaches {final_probe['probe_acc']:.1f}%; the fine-tune reaches "
        f"{summary['top1']:.1f}%: fine-tuning bought **{summary['top1'] - final_probe['probe_acc']:+.1f} points** "
        "over fixed features.",
    ]
    print("\nwhat fine-tuning changed:\n" + "\n".join(reading))
    return (
        "## What fine-tuning changed\n\n"
        + " ".join(reading)
        + "\n\n![relative weight change per block](transfer/weight_change.png)\n\n"
        + "*How far each block's weights moved from the start, relative to their size. There is no control to read "
        "it against (it grows with the lr, the epochs and the weight decay): compare the blocks with each other, and "
        f"runs of one recipe with each other. {LENS_DOC}*\n\n"
        + "Per block: [transfer/weight_change.csv](transfer/weight_change.csv); per BatchNorm layer: "
        "[transfer/bn_drift.csv](transfer/bn_drift.csv).\n\n"
        + f"Linear CKA between the starting and the fine-tuned network's outputs at each stage, on {len(subset)} eval "
        "images (the minibatch estimator of Nguyen et al. 2021, unbiased HSIC per minibatch of "
        f"{args.batch_size}), beside the start against a randomly initialised network "
        "([transfer/cka.csv](transfer/cka.csv)):\n\n![CKA per stage](transfer/cka.png)\n\n"
        + "*1 means the fine-tuned features are the start's up to a rotation and a scale; the control, a random "
        f"network against the start, is the floor to read each stage against. {LENS_DOC}*\n\n"
        + markdown_table(
            ["stage", "CKA start vs fine-tuned", "CKA start vs random", "linear probe on the start"],
            [
                [r["layer"], f"{r['cka']:.3f}", f"{r['cka_control']:.3f}", f"{p['probe_acc']:.1f}%"]
                for r, p in zip(cka_rows, probe_rows, strict=True)
            ],
        )
        + f"\n\nThe probes are logistic regressions (scikit-learn, L2 with C=1, not tuned: a lower bound) on each "
        f"stage's average-pooled output, fitted on {evaluation.train_words} and scored on the "
        f"{len(test_y)} eval images ([transfer/linear_probe.csv](transfer/linear_probe.csv)):\n\n"
        "![linear probes](transfer/linear_probe.png)\n\n"
        + "*What a classifier on the start's frozen features reaches at each stage, and last the fine-tune: the gap "
        f"is what training the backbone bought over keeping it as it came. {LENS_DOC}*\n\n"
        + f"Cost: {len(train_y) + len(test_y)} images through the starting network for the probes and "
        f"{len(subset)} through each of three networks for CKA, {seconds:.1f} s on {device.type}.\n"
    )


def calibrate_probabilities(
    evaluation: Evaluation, scores: Scores, summary: dict, shifted: dict
) -> tuple[str, float, torch.Tensor]:
    """One temperature fitted on the run's validation split (or, without one, on a seeded half of the test split),
    and the probabilities' ECE, NLL and Brier score before and after it on the test split (its other half) and on
    each corrupted copy (the same images): calibration.json, reliability.png. Returns the report's section, the
    temperature and the test images it was measured on."""
    logits, labels = scores.logits, scores.labels
    if evaluation.val_split is not None:
        fit_logits, fit_labels = evaluation.logits_of(evaluation.val_split, cache=evaluation.args.cache)
        fitted_on, measured = f"the run's validation split ({len(fit_labels)} images)", torch.arange(len(labels))
    else:  # half of the test split fits the temperature; it is measured on the other half only
        fitting, measured = halves(len(labels), evaluation.args.seed)
        fit_logits, fit_labels = logits[fitting], labels[fitting]
        fitted_on = f"a seeded half of the test split ({len(fitting)} images; measured on the other {len(measured)})"
    temperature = calibration.fit_temperature(fit_logits, fit_labels)

    def measured_on(split_logits, split_labels) -> dict:
        if len(split_labels) == len(labels):  # a corrupted copy holds the test split's images, in its order
            split_logits, split_labels = split_logits[measured], split_labels[measured]
        before, after = (calibration.scores(split_logits, split_labels, t) for t in (1.0, temperature))
        return {
            "images": len(split_labels),
            **before,
            **{f"{key}_calibrated": value for key, value in after.items()},
        }

    result = {
        "temperature": temperature,
        "fitted_on": fitted_on,
        "weights": evaluation.trained.weights_fingerprint,  # predict.py uses the temperature for these weights only
        **measured_on(logits, labels),
    }
    if shifted:
        result["corruptions"] = {name: measured_on(*pair) for name, pair in shifted.items()}
    # what predict.py --abstain-below says of a threshold: the calibrated confidence of every measured test image
    confidence, correct = calibration.confidences(logits[measured], labels[measured], temperature)
    result["abstention"] = {"confidence": [round(float(c), 6) for c in confidence], "correct": correct.tolist()}
    write_json(evaluation.out / calibration.FILE, result)
    summary_result = {k: v for k, v in result.items() if k != "abstention"}
    summary["calibration"] = summary_result
    plot_reliability(
        calibration.reliability(logits[measured], labels[measured]),
        calibration.reliability(logits[measured], labels[measured], temperature),
        evaluation.out / "reliability.png",
        title=f"{evaluation.trained.arch}: test split, temperature {temperature:.2f}",
    )
    rows = [
        [
            name,
            str(row["images"]),
            f"{row['ece']:.1f} % -> {row['ece_calibrated']:.1f} %",
            f"{row['nll']:.3f} -> {row['nll_calibrated']:.3f}",
            f"{row['brier']:.3f} -> {row['brier_calibrated']:.3f}",
        ]
        for name, row in [("test", result), *result.get("corruptions", {}).items()]
    ]
    table = markdown_table(["split", "images", "ECE", "NLL", "Brier"], rows)
    print(f"\ncalibration: temperature {temperature:.3f}, fitted on {fitted_on}\n{table}")
    section = (
        "## Calibration\n\n"
        f"Does a probability of 0.8 mean right 8 times in 10? One temperature T, fitted on {fitted_on} by minimising "
        f"the negative log-likelihood of softmax(logits / T), is **{temperature:.2f}** "
        + (
            "(above 1: the network was overconfident)"
            if temperature > 1
            else "(below 1: the network was underconfident)"
        )
        + ". Before -> after it: the expected calibration error (ECE: the mean gap between confidence and accuracy "
        f"over {calibration.BINS} equal-width bins of the top confidence), the negative log-likelihood (NLL) and the "
        "Brier score; lower is better for all three, and the temperature never changes which class wins.\n\n"
        + table
        + f"\n\n![reliability diagram before and after the temperature](reliability.png)\n\n[{calibration.FILE}]"
        f"({calibration.FILE}) holds the numbers; predict.py and the web page use the temperature.\n"
    )
    return section, temperature, measured


def knowing_when_to_abstain(
    evaluation: Evaluation, summary: dict, *, answers: dict, temperature: float, measured: torch.Tensor, check
) -> str:
    """Risk-coverage curves and their area (AURC) on the test split and each corrupted copy (the images the
    calibration was measured on), for three scores of how sure the model is: its softmax confidence, the calibrated
    confidence, and the familiarity score (nearer the training images: surer). risk_coverage.png; returns the report's
    section."""
    curves, areas = {}, {}
    for name, (logits, labels, features) in answers.items():
        if len(labels) == len(answers["test"][1]):  # a corrupted copy holds the test split's images, in its order
            logits, labels = logits[measured], labels[measured]
            features = features[measured] if features is not None else None
        confidence, correct = calibration.confidences(logits, labels)
        scores_of = {
            "softmax confidence": confidence,
            "calibrated confidence": calibration.confidences(logits, labels, temperature)[0],
        }
        if check is not None and features is not None:
            scores_of["familiarity"] = -check.scores(features).numpy()  # a smaller distance: surer
        curves[name] = {score: calibration.risk_coverage(value, correct) for score, value in scores_of.items()}
        areas[name] = {score: curve[2] for score, curve in curves[name].items()}
        areas[name]["error"] = 1 - float(correct.mean())
    summary["abstention"] = areas
    plot_risk_coverage(curves, evaluation.out / "risk_coverage.png", title=evaluation.trained.arch)
    names = [score for score in areas["test"] if score != "error"]
    rows = [[name, f"{100 * a['error']:.1f} %", *(f"{100 * a[s]:.1f} %" for s in names)] for name, a in areas.items()]
    table = markdown_table(["split", "error (all answered)", *(f"AURC, {s}" for s in names)], rows)
    print(f"\nknowing when to abstain (AURC, lower is better):\n{table}")
    return (
        "## Knowing when to abstain\n\n"
        "Answer only the images the model is surest of, and the error among them falls: the risk-coverage curve "
        "draws that error against the share answered, for three ways to rank the images, and its area (AURC, the "
        "mean error over every share) says how well each ranks right answers first; lower is better, and a ranking "
        "that knows nothing scores the error rate itself. predict.py --abstain-below P and the page's slider abstain "
        "below a calibrated probability and say what accuracy was measured at it.\n\n"
        + table
        + "\n\n![risk against coverage](risk_coverage.png)\n"
    )


def calibrate_familiarity(evaluation: Evaluation, summary: dict, *, held_out: torch.Tensor) -> tuple[str, Familiarity]:
    """The unfamiliar-input check that predict.py and app.py apply: fitted on the features of the training images
    (centre crops), its threshold calibrated on the test split's (`held_out`, kept from the scoring pass), written to
    familiarity.safetensors. Returns the report's section and the check."""
    model, device, args = evaluation.trained.model, evaluation.device, evaluation.args
    train = evaluation.loader_of(evaluation.train_split, cache=args.cache, skip_bad_images=True)
    features, labels = finetune.head_inputs(model, train, device, description="familiarity: train")
    if evaluation.to_model is not None:
        labels = evaluation.to_model[labels]
    check = Familiarity.fit(features, labels, weights=evaluation.trained.weights_fingerprint)
    calibrated = check.calibrate(held_out)
    check.save(evaluation.out / familiarity.FILE)
    summary["familiarity"] = calibrated
    rate = calibrated["false_alarms"]
    section = (
        "## Unfamiliar inputs\n\n"
        f"predict.py and app.py flag a photo as unlike the training data when the features the head reads are further "
        f"from every class's training images than {100 * (1 - familiarity.FALSE_ALARMS):g} % of test images are "
        f"(Mahalanobis distance to the nearest class mean above {calibrated['threshold']:.1f}, chosen on "
        f"{calibrated['calibration_images']} test images). On the other {calibrated['measured_images']} test "
        "images it flags "
        + (f"{100 * rate:.1f} %" if rate is not None else "none (too few images to measure)")
        + f": the false-alarm rate. The check is in [{familiarity.FILE}]({familiarity.FILE}); docs/explanation/"
        "unfamiliar-inputs.md says what it can and cannot tell.\n"
    )
    return section, check


def test_accuracy(summary: dict) -> float | None:
    """A finished run's test accuracy: of the epoch chosen on validation (read once at the end), or, without a
    validation split, its best on the test split; None when it never read the test split (--no-final-test)."""
    return summary.get("test_acc_of_best") if summary.get("selected_on") == "val" else summary.get("best_eval_acc")


def changed_test_set(evaluation: Evaluation) -> str:
    """How --data or --resolution make this evaluation's test images other than the run's own, in words ('' when they
    do not)."""
    own = evaluation.trained.config
    if own is None:
        return ""
    changes = [f"another dataset ({evaluation.trained.data})"] if own.data != evaluation.trained.data else []
    if own.resolution != evaluation.trained.resolution:
        changes.append(f"another resolution ({evaluation.trained.resolution} px)")
    return " and ".join(changes)


def what_pretraining_bought(evaluation: Evaluation, summary: dict) -> str:
    """The report's opening answer: this run against the same recipe from random weights, and against a quick linear
    probe on the start's frozen features (from the transfer section). Returns the section, '' for a run from random
    weights or one that does not say where it started."""
    trained, top1 = evaluation.trained, summary["top1"]
    if not trained.start_weights or trained.start_weights.lower() == "none":
        return ""
    lines = []
    scratch = evaluation.scratch
    if scratch is None:
        lines.append(
            "No run of the same recipe from random weights was found beside this one, so what the start is worth is "
            "not measured: train one (the same command with `--weights none` and its own `--run-dir` in the same "
            "folder), or name it with `--scratch RUN`."
        )
    elif changed_test_set(evaluation):
        lines.append(
            f"What the start is worth is not measured here: this evaluation reads {changed_test_set(evaluation)} than "
            f"the run was trained with, and `{scratch}`'s test accuracy was measured the run's way; evaluate without "
            "--data and --resolution to compare them."
        )
    elif (scratch_acc := test_accuracy(read_summary(scratch))) is None:
        lines.append(
            f"`{scratch}` is the same recipe from random weights, but it never read the test split (it chose its epoch "
            "on validation and ran with --no-final-test), so what the start is worth is not measured."
        )
    else:
        # a twin found beside the run differs in nothing else by construction; one named by --scratch may
        own = trained.path.parent / "config.toml"
        differs = (
            recipe_difference(
                dataclasses.asdict(load_saved(scratch / "config.toml")),
                dataclasses.asdict(load_saved(own)),
                also={"weights"},
            )
            if evaluation.args.scratch and own.is_file()
            else []
        )
        summary["pretraining"] = {"scratch_run": str(scratch), "scratch_acc": scratch_acc, "gain": top1 - scratch_acc}
        lines.append(
            f"From random weights, the same recipe (`{scratch}`) reaches {scratch_acc:.1f}% on the test split; from "
            f"`{trained.start_weights}` this run reaches {top1:.1f}%: pretraining bought **{top1 - scratch_acc:+.1f} "
            "points**." + (f" (The two runs' recipes also differ in {', '.join(differs)}.)" if differs else "")
        )
    probe = summary.get("transfer", {}).get("probe")
    if probe:
        layer, accuracy = list(probe.items())[-1]
        summary.setdefault("pretraining", {})["probe_acc"] = accuracy
        lines.append(
            f"A quick, untuned linear probe on the start's frozen features ({layer}, what the head reads), fitted on "
            f"{evaluation.train_words}, reaches {accuracy:.1f}%: training the network bought {top1 - accuracy:+.1f} "
            "points over keeping the features as they came."
        )
    lines.append("What these numbers mean: docs/explanation/transfer-lens.md.")
    return "## What pretraining bought\n\n" + "\n\n".join(lines)


def write_report(
    evaluation: Evaluation, *, scores: Scores, summary: dict, cams: list[str], opening: str, sections: list[str]
) -> None:
    """report.md: one page that ties it all together, pictures embedded."""
    trained = evaluation.trained
    report = [
        f"# Evaluation of `{trained.path}`",
        f"{trained.arch} at {trained.resolution} px on the test split of `{trained.data}` ({len(scores.labels)} "
        f"images, {len(scores.names)} classes)"
        + (f". Method: {trained.method}; started from `{trained.start_weights}`." if trained.method else ".")
        + (" **No image was trained on** (--epochs 0): this is the start as it is." if trained.untrained else ""),
        f"**Top-1 {summary['top1']:.2f}%**, top-5 {summary['top5']:.2f}%; mean per-class accuracy "
        f"{np.nanmean([c.accuracy for c in scores.classes]):.2f}%.",
        *([opening] if opening else []),
        "## Per-class accuracy",
        "Every class, worst first ([per_class.csv](per_class.csv)):",
        "![per-class accuracy](per_class.png)",
        *(
            [scores.class_table(analysis.ranked(scores.classes, len(scores.classes), worst=True))]
            if len(scores.classes) <= ONE_TABLE  # a bottom 10 and a top 10 of 20 classes or fewer repeat each other
            else ["### Bottom 10", scores.class_table(scores.worst), "### Top 10", scores.class_table(scores.best)]
        ),
        "## Most confused pairs",
        "True class -> predicted class, counted over the test split "
        "([confused_pairs.csv](confused_pairs.csv), full matrix in [confusion_matrix.csv](confusion_matrix.csv)):",
        scores.pair_table(),
        "![confusion among the most confused classes](confusion.png)",
        "## What the model looks at",
        f"{evaluation.args.cam_method} heatmaps for the predicted class, over the image the model saw."
        if trained.backend == "pytorch"
        else "No heatmaps: CAMs need the model's gradients, and ONNX Runtime gives none (use --backend pytorch).",
    ]
    if "gradcam_samples.png" in cams:
        report.append("![CAM on random test images](gradcam_samples.png)")
    if "gradcam_worst.png" in cams:
        report += [
            "A mistake from each of the worst classes:",
            "![CAM on mistakes of the worst classes](gradcam_worst.png)",
        ]
    tail = "\n".join(section for section in sections if section)
    write_text(evaluation.out / "report.md", "\n\n".join(report) + "\n\n" + tail)


def cam_tiles(
    model, split, *, indices, predicted, labels, confidence, names, resolution, interpolation, method
) -> list[dict]:
    """CAM overlays of the predicted class for some images of a split, one CAM object for all."""
    transform = eval_transform(resolution, interpolation=interpolation)
    photos = [read_rgb(split, i) for i in indices]
    pixels = torch.stack([transform(photo) for photo in photos])
    maps = class_activation_maps(model, normalize(pixels), [int(predicted[i]) for i in indices], method)
    return [
        {
            "image": beside(display_pixels(photos[k], resolution), maps[k]),  # drawn at 224 px or more
            "true": names[int(labels[i])],
            "predicted": names[int(predicted[i])],
            "confidence": float(confidence[i]),
        }
        for k, i in enumerate(indices)
    ]


if __name__ == "__main__":
    run_cli(main)
