"""Every tool's command line, in one light module: arguments are parsed, and --help answered, before torch is
imported (which takes seconds). Each tool at the root calls `check_command_line` before its heavy imports."""

import argparse
import dataclasses
import difflib
import os
import signal
import sys
import textwrap

from cars.config import DEVICES, Config, add_config_flags
from cars.errors import UserError, flag, run_cli
from cars.paths import WEIGHTS_FILE_SUFFIXES

# the CAM methods eval.py and predict.py offer (cars.explain maps each to its pytorch_grad_cam class)
CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "scorecam", "eigencam", "finercam")
TTA_SCALES = (0.875, 1.0, 1.125)
DOCS = "docs/reference/flags.md"  # where every --help points


# what other tools (timm, fastai, torchvision's reference scripts) call flags that are named otherwise here
OTHER_NAMES = {
    "--learning-rate": "--lr",
    "--wd": "--weight-decay",
    "--bs": "--batch-size",
    "--batch": "--batch-size",
    "--model": "--arch",
    "--pretrained": "--weights",
    "--dataset": "--data",
    "--data-dir": "--data",
    "--img-size": "--resolution",
    "--image-size": "--resolution",
    "--input-size": "--resolution",
    "--output": "--out",
    "--output-dir": "--run-dir",
    "--num-workers": "--workers",
    "--smoothing": "--label-smoothing",
    "--sched": "--scheduler",
    "--opt": "--optimizer",
    "--num-epochs": "--epochs",
    "--checkpoint": "--resume",
}


class Parser(argparse.ArgumentParser):
    """argparse, forgiving: a mistake is one line (with the closest flag for an unknown one) instead of a usage dump,
    and no flag is taken for an abbreviation of another (--epoch is not --epochs)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):
        words = list(sys.argv[1:] if args is None else args)
        known = self.known_flags()
        typos = [w for w in words if w.startswith("--") and w.partition("=")[0] not in known]
        if typos:  # before argparse's own complaints: a mistyped flag is why a required one seems missing
            self.error(self.unknown(typos))
        parsed, unknown = self.parse_known_args(words, namespace)
        if unknown:
            self.error(self.unknown(unknown))
        return parsed

    def known_flags(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings]

    def unknown(self, words: list[str]) -> str:
        flag = next((w for w in words if w.startswith("-")), None)
        if flag is None:
            return f"unexpected argument {words[0]!r}"
        name, known = flag.partition("=")[0], self.known_flags()
        hyphenated = "--" + name.lstrip("-").replace("_", "-")
        if hyphenated in known:
            guess = hyphenated
        elif OTHER_NAMES.get(hyphenated) in known:
            guess = OTHER_NAMES[hyphenated]
        else:
            guess = next(iter(difflib.get_close_matches(hyphenated, known, n=1, cutoff=0.6)), None)
        return f"unknown flag {name}" + (f"; did you mean {guess}?" if guess else "")

    def error(self, message: str):
        self.exit(2, f"error: {message} (uv run {self.prog} --help)\n")


def tool_parser(tool: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A tool's parser: its description, then after the flags two or three examples and where the docs are."""
    anchor = tool.replace(".", "")  # how a code host names the heading "train.py"
    commented = [example.partition("  # ")[0].rstrip() for example in examples if "  # " in example]
    width = max(map(len, commented), default=0) + 2
    epilog = "examples:\n"
    for example in examples:  # "ARGS  # comment", the comments lined up
        args, _, comment = example.partition("  # ")
        epilog += f"  uv run {tool} {args.rstrip():{width}}# {comment}".rstrip(" #") + "\n"
    epilog += f"\nevery flag explained: {DOCS}#{anchor}; a first run step by step: docs/tutorial.md"
    return Parser(
        prog=tool,
        description=textwrap.fill(description, 100),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_model_flags(
    parser, data_help: str = "dataset to take class names from, for a bare state dict (default: the checkpoint's names)"
) -> None:
    """The positional model argument and what a bare state dict needs beside it (see load_trained)."""
    parser.add_argument(
        "checkpoint",
        metavar="MODEL",
        help="a run folder, one of its .pt files, an export folder or model.safetensors, or any state-dict file",
    )
    group = parser.add_argument_group("a bare state dict", "what a run folder says itself, for a file that does not")
    group.add_argument("--arch", metavar="ARCH", help="architecture, e.g. resnet50 (default: the checkpoint's)")
    group.add_argument("--num-classes", type=int, metavar="N", help="class count (default: the checkpoint's head's)")
    group.add_argument("--resolution", type=int, metavar="N", help="input size in px (default: the run's, else 224)")
    group.add_argument("--data", metavar="SOURCE", help=data_help)


def add_device_flag(parser) -> None:
    parser.add_argument(
        "--device", default="auto", choices=DEVICES, help="where to run: CUDA, then MPS, then CPU (default: auto)"
    )


def add_evaluation_flags(parser, cache_help: str = "preprocessing cache, as train.py's --cache") -> None:
    """How the images are fed, as eval.py feeds them."""
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch (default: 64)")
    parser.add_argument(
        "--workers",
        type=int,
        default=-1,
        metavar="N",
        help="DataLoader workers; -1: one per core, at most 8 (default: -1)",
    )
    parser.add_argument("--cache", default="auto", metavar="auto|DIR|off", help=f"{cache_help} (default: auto)")
    add_device_flag(parser)


def add_backend_flag(parser) -> None:
    parser.add_argument(
        "--backend",
        default="pytorch",
        choices=["pytorch", "onnxruntime"],
        help="onnxruntime: run an exported model.onnx (give the export folder or the .onnx file) on the CPU, without "
        "gradients, so without CAMs (default: pytorch)",
    )


def add_out_flags(parser, what: str, default: str) -> None:
    parser.add_argument("--out", metavar="DIR", help=f"{what} (default: {default})")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing one, if this tool wrote it and it holds nothing else (default: refuse)",
    )


def train_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "train.py",
        "Fine-tune a pretrained model on Stanford Cars and leave a run folder that explains itself. The defaults "
        "are run 7 of the original experiment log (ResNet-50, SGD lr 0.1, lr /10 every 30 epochs, 90 epochs, "
        "batch 128, 224 px: 89.38 %). Precedence: the defaults, then the --config preset, then flags.",
        [
            "  # Stanford Cars from the hub, run 7's recipe",
            "--config configs/demo.toml  # offline: a real fine-tune on a laptop",
            "--config configs/run08_r50_448.toml --batch-size 32 --lr 0.025",
            "--resume runs/run07_baseline  # go on after an interruption",
        ],
    )
    preset = parser.add_argument_group("preset and run folder")
    preset.add_argument("--config", metavar="PRESET", help="TOML preset, e.g. configs/demo.toml (default: none)")
    preset.add_argument("--overwrite", action="store_true", help="replace an existing run folder (default: refuse)")
    preset.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from its last.pt, with its own config (default: a new run)",
    )
    add_config_flags(parser)
    return parser


def parse_train(argv=None) -> argparse.Namespace:
    return train_parser().parse_args(argv)


def eval_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "eval.py",
        "Where a trained model is right and wrong: accuracy per class with car names, the most confused pairs, "
        "CAMs, TTA, the corrupted copies, and what fine-tuning changed; all in report.md.",
        [
            "runs/demo",
            "runs/run07_baseline --tta --corruptions --cam-method finercam",
            "best_model.pth --arch resnet50 --data tanganke/stanford_cars  # a bare state dict",
        ],
    )
    add_model_flags(parser, data_help="dataset to evaluate on and take class names from (default: the run's)")
    add_out_flags(parser, "output folder", "<run>/eval, or eval-<name> beside a checkpoint file")
    parser.add_argument(
        "--num-gradcam",
        type=int,
        default=16,
        metavar="N",
        help="random test images in gradcam_samples.png (default: 16)",
    )
    parser.add_argument("--cam-method", default="gradcam", choices=CAM_METHODS, help="CAM method (default: gradcam)")
    parser.add_argument(
        "--tta",
        action="store_true",
        help=f"also evaluate with test-time augmentation ({len(TTA_SCALES)} scales x flip) (default: off)",
    )
    parser.add_argument(
        "--corruptions",
        action="store_true",
        help="also evaluate the dataset's corrupted copies of the test split (default: off)",
    )
    parser.add_argument(
        "--adapt",
        default="none",
        choices=["none", "bn", "tent"],
        help="with --corruptions, adapt to each corrupted copy without its labels, on a seeded half of it, and score "
        "the other half: bn estimates the BatchNorm statistics again, tent also trains the BatchNorm scales and "
        "shifts to make the predictions confident (Wang et al. 2021); the clean split too, for what it costs "
        "(default: none)",
    )
    parser.add_argument(
        "--transfer",
        default="on",
        choices=["on", "off"],
        help="say what fine-tuning changed, against the weights it started from: weight and BatchNorm change per "
        "block, CKA of the features, linear probes; files in <eval folder>/transfer/ (default: on)",
    )
    parser.add_argument(
        "--scratch",
        metavar="RUN",
        help="the same recipe trained from random weights, to say what pretraining bought (default: a run folder "
        "beside this one whose config differs only in its weights and seed)",
    )
    parser.add_argument(
        "--start-weights",
        metavar="WEIGHTS",
        help="the weights the fine-tune started from, for a checkpoint that does not say (a bare state dict): a "
        "torchvision weights name, demo-pretrained, or a state-dict file (default: the run's --weights)",
    )
    add_evaluation_flags(
        parser,
        cache_help="preprocessing cache for the test split, as train.py's --cache; TTA and corrupted copies are always "
        "decoded",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="chooses the GradCAM sample images, and the halves of a split where one half fits the temperature (no "
        "validation split) or adapts (--adapt) (default: 0)",
    )
    add_backend_flag(parser)
    return parser


def parse_eval(argv=None) -> argparse.Namespace:
    args = eval_parser().parse_args(argv)
    if args.batch_size < 1 or args.num_gradcam < 0 or (args.num_classes is not None and args.num_classes < 2):
        raise UserError("--batch-size must be positive, --num-gradcam not negative, --num-classes at least 2")
    if args.adapt != "none" and not args.corruptions:
        raise UserError(f"--adapt {args.adapt} adapts to the corrupted copies of the test split; add --corruptions")
    return args


def predict_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "predict.py",
        "What car is this? The top classes of your own photos, with a CAM of where the model looked.",
        [
            "runs/demo car1.jpg car2.png --topk 3",
            "runs/demo car.jpg --cam cams/ --json",
            "runs/demo/export car.jpg --backend onnxruntime",
        ],
    )
    add_model_flags(parser)
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, ...; any size, grayscale or colour)"
    )
    parser.add_argument("--topk", type=int, default=5, metavar="N", help="classes to show per image (default: 5)")
    parser.add_argument(
        "--abstain-below",
        type=float,
        default=0.0,
        metavar="P",
        help="abstain when the top class's probability (calibrated, where eval.py fitted a temperature) is below P, "
        "and say what accuracy eval.py measured on the test images at or above P (default: 0, always answer)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table (default: a table)")
    parser.add_argument(
        "--cam", metavar="DIR", help="write a CAM overlay of the top class per image into DIR (default: none)"
    )
    parser.add_argument("--cam-method", default="gradcam", choices=CAM_METHODS, help="CAM method (default: gradcam)")
    add_device_flag(parser)
    add_backend_flag(parser)
    return parser


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MODEL_SUFFIXES = (".pt", ".pth", ".safetensors", ".onnx")


def parse_predict(argv=None) -> argparse.Namespace:
    args = predict_parser().parse_args(argv)
    model_like = [  # a folder, a model file, or a path without a suffix (runs/demo, not yet trained)
        i for i in args.images if os.path.isdir(i) or i.endswith(MODEL_SUFFIXES) or not os.path.splitext(i)[1]
    ]
    if args.checkpoint.lower().endswith(IMAGE_SUFFIXES) and model_like:
        raise UserError(
            f"the arguments look swapped: {args.checkpoint} is an image and {model_like[0]} a model; the model comes "
            f"first: uv run predict.py {model_like[0]} {args.checkpoint}"
        )
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    if not 0 <= args.abstain_below <= 1:
        raise UserError(f"--abstain-below is a probability between 0 and 1, got {args.abstain_below:g}")
    if args.cam and args.backend == "onnxruntime":
        raise UserError("--cam needs the PyTorch model's gradients; drop --cam or --backend onnxruntime")
    return args


EXPORT_FORMATS = ("safetensors", "onnx", "torch-export")


def export_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "export.py",
        "Export a trained model for use without this project: model.safetensors, model.onnx and/or model.pt2 "
        "(torch.export), each checked against the PyTorch model, plus model.json (arch, resolution, normalisation, "
        "class names); eval.py, predict.py and app.py load it.",
        ["runs/demo --format safetensors,onnx,torch-export", "runs/demo --verify"],
    )
    add_model_flags(parser)
    parser.add_argument(
        "--format",
        default="safetensors",
        metavar="FORMATS",
        help=f"one or more of {', '.join(EXPORT_FORMATS)}, comma-separated (default: safetensors)",
    )
    parser.add_argument(
        "--check-images", type=int, default=16, metavar="N", help="test images each export is checked on (default: 16)"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check an existing export folder again against the model, write nothing (default: export)",
    )
    add_out_flags(parser, "export folder", "<run>/export")
    return parser


def parse_export(argv=None) -> argparse.Namespace:
    args = export_parser().parse_args(argv)
    args.format = list(dict.fromkeys(f.strip() for f in args.format.split(",")))  # in order, once each
    unknown = [f for f in args.format if f not in EXPORT_FORMATS]
    if unknown:
        raise UserError(f"--format {','.join(unknown)} is not a format; choose from {', '.join(EXPORT_FORMATS)}")
    if args.check_images < 1:
        raise UserError(f"--check-images must be at least 1, got {args.check_images}")
    return args


# The knobs a range test uses. The others (the schedule and the run's length, freezing, EMA, evaluation, the run
# folder) are train.py's alone: lr_find.py refuses them as flags, and reads past them in a preset.
LR_FIND_KNOBS = {
    "data",
    "val_split",
    "split_seed",
    "skip_bad_images",
    "arch",
    "weights",
    "dropout",
    "optimizer",
    "batch_size",
    "momentum",
    "weight_decay",
    "norm_weight_decay",
    "label_smoothing",
    "backbone_lr_mult",
    "resolution",
    "train_crop",
    "crop_scale",
    "augment",
    "color_jitter",
    "random_erasing",
    "mixup",
    "cutmix",
    "device",
    "amp",
    "compile",
    "channels_last",
    "workers",
    "cache",
    "cache_side",
    "seed",
}


def lr_find_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "lr_find.py",
        "The learning-rate range test: the lr grows exponentially over --steps mini-batches on a copy of the starting "
        "weights, and the loss curve suggests an lr for the preset before a run is wasted on a bad one.",
        ["--config configs/run07_baseline.toml", "--config configs/run05.toml --phase head --steps 100"],
    )
    test = parser.add_argument_group("the range test")
    test.add_argument("--config", metavar="PRESET", help="TOML preset, e.g. configs/demo.toml (default: none)")
    test.add_argument(
        "--phase",
        choices=["full", "head"],
        default="full",
        help="full: every layer trains (one-stage, or stage 2); head: only the new head (stage 1 of a two-stage "
        "preset) (default: full)",
    )
    test.add_argument("--start-lr", type=float, default=1e-7, metavar="LR", help="first lr (default: 1e-07)")
    test.add_argument("--end-lr", type=float, default=10.0, metavar="LR", help="last lr (default: 10)")
    test.add_argument("--steps", type=int, default=200, metavar="N", help="mini-batches, at most (default: 200)")
    groups = add_config_flags(parser, only=LR_FIND_KNOBS)
    add_out_flags(groups["output"], "output folder", "runs/lr_find-<preset>")
    return parser


def parse_lr_find(argv=None) -> argparse.Namespace:
    parser = lr_find_parser()
    args, rest = parser.parse_known_args(argv)
    train_only = {
        f"--{prefix}{flag(name)}"
        for name in {f.name for f in dataclasses.fields(Config)} - LR_FIND_KNOBS
        for prefix in ("", "no-")
    }
    for token in rest:
        if token.split("=")[0] in train_only:
            raise UserError(
                f"{token.split('=')[0]} is a train.py flag that the range test does not use; drop it "
                "(lr_find.py --help lists the flags it takes)"
            )
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not 0 < args.start_lr < args.end_lr:
        raise UserError(f"need 0 < --start-lr < --end-lr, got {args.start_lr} and {args.end_lr}")
    if args.steps < 10:
        raise UserError(f"--steps must be at least 10, got {args.steps}")
    return args


def compare_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "compare.py",
        "Compare run folders: an experiment table like the original experiment log's, with a verdict per run, and "
        "their accuracy curves overlaid.",
        ["runs/* --out runs/compare", "runs/demo runs/demo_scratch"],
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (e.g. runs/*)")
    parser.add_argument(
        "--out", metavar="DIR", help="folder to write compare.md and compare.png into (default: print only)"
    )
    return parser


def parse_compare(argv=None) -> argparse.Namespace:
    return compare_parser().parse_args(argv)


def inspect_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "inspect_data.py",
        "Look at a dataset before training on it: counts, sizes, modes, unreadable files, duplicates and train/test "
        "leaks, samples, what an ImageNet model calls the pictures, and (--rank-models) which pretrained model should "
        "transfer best.",
        [
            "--data demo --config configs/demo.toml  # crops drawn as the demo trains",
            "--data data/cars --arch resnet50 --weights DEFAULT",
            "--rank-models resnet50,resnet101,efficientnet_b0",
        ],
    )
    parser.add_argument(
        "--data",
        default="tanganke/stanford_cars",
        metavar="SOURCE",
        help="any dataset train.py reads; 'demo' works offline (default: tanganke/stanford_cars)",
    )
    add_out_flags(parser, "report folder", "runs/data-<name>")
    parser.add_argument(
        "--arch", default="resnet50", metavar="ARCH", help="the ImageNet model of the sanity check (default: resnet50)"
    )
    parser.add_argument(
        "--weights", default="DEFAULT", metavar="WEIGHTS", help="its torchvision weights (default: DEFAULT)"
    )
    parser.add_argument(
        "--config",
        metavar="PRESET",
        help="draw the training crops as this preset trains: its resolution, crop and augmentation (default: the "
        "defaults, run 7's)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        metavar="N",
        help="what the samples, the sanity check and --rank-models show the model, in px (default: the preset's, "
        "else 224)",
    )
    parser.add_argument(
        "--check-images",
        type=int,
        default=500,
        metavar="N",
        help="training images the ImageNet model looks at (default: 500)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=-1,
        metavar="N",
        help="processes that look at the images; -1: one per core, at most 8 (default: -1)",
    )
    parser.add_argument(
        "--rank-models",
        metavar="ARCH[:WEIGHTS],...",
        help="before training: score pretrained candidates on the training split, without fine-tuning (LogME, NCE, "
        "LEEP, H-score), e.g. resnet50,efficientnet_b0:IMAGENET1K_V1; WEIGHTS as train.py's --weights, DEFAULT when "
        "left out (default: none)",
    )
    add_device_flag(parser)
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="chooses the samples (default: 0)")
    return parser


def parse_inspect(argv=None) -> argparse.Namespace:
    args = inspect_parser().parse_args(argv)
    if args.check_images < 0:
        raise UserError(f"--check-images must not be negative, got {args.check_images}")
    args.rank_models = candidates(args.rank_models) if args.rank_models is not None else []
    return args


def candidates(text: str) -> list[tuple[str, str]]:
    """--rank-models resnet50,resnet18:none -> [(resnet50, DEFAULT), (resnet18, none)], each once. A timm or
    open_clip name keeps its own colons: its WEIGHTS, when given, is none, DEFAULT, demo-pretrained or a file."""
    found = []
    for item in text.split(","):
        item = item.strip()
        if item.startswith(("timm:", "open_clip:")):
            named, _, last = item.rpartition(":")
            given = last in ("none", "DEFAULT", "demo-pretrained") or last.endswith(WEIGHTS_FILE_SUFFIXES)
            arch, weights = (named, last) if given else (item, "")
        else:
            arch, _, weights = item.partition(":")
            if ":" in item and not weights:
                arch = ""
        if not arch:
            raise UserError(f"--rank-models takes ARCH[:WEIGHTS],... (e.g. resnet50,resnet18:none), got {text!r}")
        found.append((arch, weights or "DEFAULT"))
    return list(dict.fromkeys(found))


def sweep_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "sweep.py",
        "Search a recipe's hyperparameters with Optuna: every trial is a train.py run chosen on a validation split "
        "and pruned on its epochs' accuracy; workers on several machines or GPUs share one study by running the same "
        "command with the same --storage.",
        [
            "--config configs/sweeps/demo.toml",
            "--config configs/sweeps/demo.toml --refit",
            "--config configs/sweeps/r50_224.toml --storage postgresql://USER:PASSWORD@HOST/sweeps",
        ],
    )
    parser.add_argument(
        "--config", required=True, metavar="SWEEP_FILE", help="the sweep file, e.g. configs/sweeps/demo.toml"
    )
    parser.add_argument(
        "--trials",
        type=int,
        metavar="N",
        help="the study's total number of trials, over all its workers (default: the sweep file's)",
    )
    add_study_flags(parser, "sweep", "runs/sweeps/<sweep file's name>")
    parser.add_argument(
        "--refit",
        action="store_true",
        help="instead of searching: train the best trial's config on the whole training split, evaluate it once on "
        "the test split, and write result.md (default: search)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="with --refit: replace an earlier refit (default: refuse)"
    )
    return parser


def add_study_flags(parser, folder: str, default: str) -> None:
    """Where the Optuna study of sweep.py's trials or curves.py's cells lives, and its workers' heartbeats."""
    parser.add_argument(
        "--storage",
        metavar="URL|PATH",
        help="where the study lives: a database URL (postgresql://user:password@host/db, sqlite:///path/study.db) "
        f"or the path of a journal file on a shared file system (default: study.db in the {folder} folder)",
    )
    parser.add_argument("--out", metavar="DIR", help=f"the {folder} folder (default: {default})")
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=30,
        metavar="SECONDS",
        help="seconds between a worker's heartbeats in a database; a run silent for twice that is failed and run "
        "again (default: 30)",
    )


def parse_sweep(argv=None) -> argparse.Namespace:
    args = sweep_parser().parse_args(argv)
    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    if args.heartbeat < 1:
        raise UserError(f"--heartbeat must be at least 1 second, got {args.heartbeat}")
    if args.overwrite and not args.refit:
        raise UserError("--overwrite only replaces an earlier --refit; a search continues its study instead")
    return args


def curves_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "curves.py",
        "How much labelled data pretraining saves: every method of a curves file trained on 1, 2, 4, ... images per "
        "class, over several seeds, each cell an ordinary run folder; then curves.csv, curves.png and report.md. "
        "Workers share the cells through one --storage, as sweep.py's do; a rerun skips the finished cells.",
        [
            "--config configs/curves/demo.toml",
            "--config configs/curves/r50.toml --storage postgresql://USER:PASSWORD@HOST/curves  # on each machine",
        ],
    )
    parser.add_argument(
        "--config", required=True, metavar="CURVES_FILE", help="the curves file, e.g. configs/curves/demo.toml"
    )
    add_study_flags(parser, "curves", "runs/curves/<curves file's name>")
    return parser


def parse_curves(argv=None) -> argparse.Namespace:
    args = curves_parser().parse_args(argv)
    if args.heartbeat < 1:
        raise UserError(f"--heartbeat must be at least 1 second, got {args.heartbeat}")
    return args


def app_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "app.py",
        "A web page for a trained model: classify your own photos with a CAM of where the model looked and, once "
        "eval.py has run, browse its evaluation.",
        ["runs/demo", "runs/demo/export --backend onnxruntime --port 8000"],
    )
    add_model_flags(parser)
    parser.add_argument(
        "--eval",
        metavar="DIR",
        help="eval.py's output folder for the Evaluation tab (default: <run>/eval when it exists)",
    )
    parser.add_argument(
        "--cam-method", default="gradcam", choices=CAM_METHODS, help="the CAM method shown first (default: gradcam)"
    )
    add_device_flag(parser)
    add_backend_flag(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address to listen on; 127.0.0.1 is this machine only (default: 127.0.0.1)",
    )
    parser.add_argument("--port", type=int, default=7860, metavar="N", help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (default: off)")
    return parser


def parse_app(argv=None) -> argparse.Namespace:
    args = app_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    return args


ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def interpolate_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "interpolate.py",
        "What lies between the start and the fine-tune (WiSE-FT): the accuracy of (1 - alpha) x start + alpha x "
        "fine-tuned for alpha from 0 to 1, on the eval split and the corrupted copies; in report.md.",
        [
            "runs/demo",
            "runs/demo --recalibrate-bn  # also with BatchNorm statistics estimated again",
            "runs/demo --save-alpha 0.5  # that model as a run folder for eval, predict and export",
        ],
    )
    parser.add_argument("run", metavar="RUN", help="a run folder of train.py that started from known weights")
    # a stray second word (an alpha without its flag) is caught to say so, not as an unexpected argument
    parser.add_argument("stray", nargs="?", help=argparse.SUPPRESS)
    add_out_flags(parser, "output folder", "<run>/interpolate")
    parser.add_argument(
        "--alphas",
        type=alpha_list,
        default=ALPHAS,
        metavar="A,B,...",
        help="the points on the line, each in [0, 1] (default: 0,0.1,...,1)",
    )
    parser.add_argument(
        "--recalibrate-bn",
        action="store_true",
        help="also evaluate every point with its BatchNorm statistics estimated again on the training images, beside "
        "the interpolated ones (default: interpolated only)",
    )
    parser.add_argument(
        "--save-alpha",
        type=float,
        metavar="A",
        help="also write the model at alpha A (interpolated statistics) as a run folder <out>/model (default: none)",
    )
    add_evaluation_flags(parser)
    return parser


def alpha_list(text: str) -> tuple[float, ...]:
    try:
        alphas = tuple(float(a) for a in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers such as 0,0.5,1") from None
    return alphas


def is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def parse_interpolate(argv=None) -> argparse.Namespace:
    args = interpolate_parser().parse_args(argv)
    if args.stray is not None:
        run, alpha = (args.stray, args.run) if is_number(args.run) else (args.run, args.stray)
        if not is_number(alpha):
            raise UserError(f"unexpected argument {args.stray!r}: interpolate.py takes one run folder")
        raise UserError(
            (
                f"the arguments look swapped: {alpha} is an alpha and {run} a run"
                if alpha == args.run
                else f"{alpha} looks like an alpha"
            )
            + f"; an alpha comes with its flag: uv run interpolate.py {run} --save-alpha {alpha} (the model at that "
            f"point), or --alphas {alpha} (the points evaluated)"
        )
    if is_number(args.run) and not os.path.exists(args.run):
        raise UserError(
            f"{args.run} is a number, not a run folder: uv run interpolate.py RUN --save-alpha {args.run} (or --alphas)"
        )
    outside = [
        a for a in (*args.alphas, *([args.save_alpha] if args.save_alpha is not None else [])) if not 0 <= a <= 1
    ]
    if outside:
        raise UserError(
            f"alpha {outside[0]:g} is outside [0, 1]: the line runs from the start (0) to the fine-tune (1)"
        )
    if args.batch_size < 1:
        raise UserError("--batch-size must be positive")
    return args


def soup_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "soup.py",
        "Average the weights of runs fine-tuned from one start (model soups): a uniform soup of them all, and a "
        "greedy soup that adds them best first and keeps each only if the validation accuracy does not fall.",
        [
            "runs/seed0 runs/seed1 runs/seed2 --out runs/soup",
            "runs/lr* --out runs/soup --recipe uniform --recalibrate-bn",
        ],
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders of train.py, from the same start")
    add_out_flags(parser, "the soup's folder, a run folder that eval.py, predict.py and export.py read", "runs/soup")
    parser.add_argument(
        "--recipe",
        default="greedy",
        choices=["greedy", "uniform"],
        help="which soup becomes the folder's best.pt (both are scored) (default: greedy)",
    )
    parser.add_argument(
        "--recalibrate-bn",
        action="store_true",
        help="estimate the soups' BatchNorm statistics again on the training images instead of averaging them "
        "(default: averaged)",
    )
    add_evaluation_flags(parser)
    return parser


def parse_soup(argv=None) -> argparse.Namespace:
    args = soup_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError("--batch-size must be positive")
    return args


# every tool's parser, in the order the reference lists them
PARSERS = {
    "train.py": train_parser,
    "eval.py": eval_parser,
    "predict.py": predict_parser,
    "inspect_data.py": inspect_parser,
    "lr_find.py": lr_find_parser,
    "compare.py": compare_parser,
    "sweep.py": sweep_parser,
    "curves.py": curves_parser,
    "export.py": export_parser,
    "app.py": app_parser,
    "interpolate.py": interpolate_parser,
    "soup.py": soup_parser,
}


def check_command_line(module_name: str, parse) -> None:
    """When a tool runs as a script, parse its command line before the tool imports torch: --help and a mistake
    answer at once instead of after seconds of imports. (The tool's main parses it again: that costs nothing.)"""
    if module_name == "__main__":
        run_cli(parse, sys.argv[1:])
        # Ctrl-C during the slow imports that follow: "interrupted" and exit 130, not a traceback out of them
        signal.signal(signal.SIGINT, quiet_interrupt)


def quiet_interrupt(signum, frame):
    print("interrupted", file=sys.stderr)
    os._exit(130)  # nothing is written yet, and an import cut in half cannot be unwound cleanly
