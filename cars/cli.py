"""Every tool's command line, in one light module: arguments are parsed, and --help answered, before torch is
imported (which takes seconds). Each tool at the root calls `check_command_line` before its heavy imports."""

import argparse
import sys

from cars.config import DEVICES, add_config_flags
from cars.errors import UserError, run_cli

# the CAM methods eval.py and predict.py offer (cars.explain maps each to its pytorch_grad_cam class)
CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "scorecam", "eigencam", "finercam")
TTA_SCALES = (0.875, 1.0, 1.125)


def add_model_flags(parser, data_help: str = "dataset to take class names from, for a bare state dict") -> None:
    """The positional model argument and what a bare state dict needs beside it (see load_trained)."""
    parser.add_argument(
        "checkpoint",
        help="a run folder, one of its .pt files, an export folder or model.safetensors, or any state-dict file",
    )
    parser.add_argument("--arch", help="architecture, for a checkpoint that does not carry it (e.g. resnet50)")
    parser.add_argument("--num-classes", type=int, help="class count, for a bare state dict (default: its head's)")
    parser.add_argument("--resolution", type=int, help="input size (default: the run's, else 224)")
    parser.add_argument("--data", help=data_help)


def add_device_flag(parser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICES)


def add_backend_flag(parser) -> None:
    parser.add_argument(
        "--backend",
        default="pytorch",
        choices=["pytorch", "onnxruntime"],
        help="pytorch (default), or onnxruntime: run an exported model.onnx (give the export folder or the .onnx file) "
        "on the CPU, without gradients, so without CAMs",
    )


def parse_train(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fine-tune an ImageNet-pretrained model on Stanford Cars. Defaults are run 7 of the original "
        "experiment log "
        "(ResNet-50, SGD lr 0.1, lr /10 every 30 epochs, 90 epochs, batch 128, 224 px).",
    )
    parser.add_argument("--config", help="TOML preset (e.g. configs/demo.toml); flags override its values")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder instead of refusing")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt, with its own config"
    )
    add_config_flags(parser)
    return parser.parse_args(argv)


def parse_eval(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate a trained model: accuracy per class, confusions, GradCAM, TTA, robustness, and what "
        "fine-tuning changed."
    )
    add_model_flags(parser, data_help="dataset to evaluate on and take class names from (default: the run's)")
    parser.add_argument("--out", help="output folder (default: <run>/eval, or eval-<name> beside a checkpoint file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--num-gradcam", type=int, default=16, help="random test images in gradcam_samples.png (default 16)"
    )
    parser.add_argument("--cam-method", default="gradcam", choices=CAM_METHODS, help="CAM method (default gradcam)")
    parser.add_argument(
        "--tta",
        action="store_true",
        help=f"also evaluate with test-time augmentation ({len(TTA_SCALES)} scales x flip)",
    )
    parser.add_argument(
        "--corruptions", action="store_true", help="also evaluate the dataset's corrupted copies of the test split"
    )
    parser.add_argument(
        "--transfer",
        default="on",
        choices=["on", "off"],
        help="on (default): also say what fine-tuning changed, against the weights it started from (weight and "
        "BatchNorm change per block, CKA of the features, linear probes; files in <eval folder>/transfer/); off: skip",
    )
    parser.add_argument(
        "--start-weights",
        metavar="WEIGHTS",
        help="the weights the fine-tune started from, for a checkpoint that does not say (a bare state dict): a "
        "torchvision weights name, demo-pretrained, or a state-dict file (default: the run's --weights)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1: one per core, at most 8)")
    parser.add_argument(
        "--cache",
        default="auto",
        help="preprocessing cache for the test split, as train.py's --cache: auto, a folder, or off "
        "(TTA and corrupted copies are always decoded)",
    )
    add_device_flag(parser)
    parser.add_argument("--seed", type=int, default=0, help="chooses the GradCAM sample images (default 0)")
    add_backend_flag(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_gradcam < 0 or (args.num_classes is not None and args.num_classes < 2):
        raise UserError("--batch-size must be positive, --num-gradcam not negative, --num-classes at least 2")
    return args


def parse_predict(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Classify images with a trained model.")
    add_model_flags(parser)
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, ...; any size, grayscale or colour)")
    parser.add_argument("--topk", type=int, default=5, help="how many classes to show per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--cam", metavar="DIR", help="write a CAM overlay of the top class per image into DIR")
    parser.add_argument("--cam-method", default="gradcam", choices=CAM_METHODS)
    add_device_flag(parser)
    add_backend_flag(parser)
    args = parser.parse_args(argv)
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    if args.cam and args.backend == "onnxruntime":
        raise UserError("--cam needs the PyTorch model's gradients; drop --cam or --backend onnxruntime")
    return args


EXPORT_FORMATS = ("safetensors", "onnx", "torch-export")


def parse_export(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Export a trained model for use without this project: model.safetensors, model.onnx "
        "and/or model.pt2 (torch.export), each checked against the PyTorch model, plus "
        "model.json (arch, resolution, normalisation, class names); eval.py and predict.py load it."
    )
    add_model_flags(parser)
    parser.add_argument(
        "--format",
        default="safetensors",
        help=f"one or more of {', '.join(EXPORT_FORMATS)}, comma-separated (default safetensors)",
    )
    parser.add_argument(
        "--check-images", type=int, default=16, help="test images each export is checked on (default 16)"
    )
    parser.add_argument(
        "--verify", action="store_true", help="check an existing export folder again against the model, write nothing"
    )
    parser.add_argument("--out", help="output folder (default: <run>/export)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = parser.parse_args(argv)
    args.format = list(dict.fromkeys(f.strip() for f in args.format.split(",")))  # in order, once each
    unknown = [f for f in args.format if f not in EXPORT_FORMATS]
    if unknown:
        raise UserError(f"--format {','.join(unknown)} is not a format; choose from {', '.join(EXPORT_FORMATS)}")
    if args.check_images < 1:
        raise UserError(f"--check-images must be at least 1, got {args.check_images}")
    return args


def parse_lr_find(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Learning-rate range test for a preset; train.py's flags override it (those of the "
        "schedule, EMA, evaluation and run length do not apply to a range test)."
    )
    parser.add_argument("--config", help="TOML preset (e.g. configs/run07_baseline.toml)")
    parser.add_argument(
        "--phase",
        choices=["full", "head"],
        default="full",
        help="full: every layer trains (one-stage, or stage 2); "
        "head: only the new head (stage 1 of a two-stage preset)",
    )
    parser.add_argument("--start-lr", type=float, default=1e-7, help="first lr of the sweep (default 1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="last lr of the sweep (default 10)")
    parser.add_argument("--steps", type=int, default=200, help="mini-batches in the sweep (default 200)")
    parser.add_argument("--out", help="output folder (default runs/lr_find-<preset>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    if not 0 < args.start_lr < args.end_lr:
        raise UserError(f"need 0 < --start-lr < --end-lr, got {args.start_lr} and {args.end_lr}")
    if args.steps < 10:
        raise UserError(f"--steps must be at least 10, got {args.steps}")
    return args


def parse_compare(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare run folders: an experiment table and their accuracy curves overlaid."
    )
    parser.add_argument("runs", nargs="+", help="run folders (e.g. runs/*)")
    parser.add_argument("--out", help="folder to write compare.md and compare.png into (default: print only)")
    return parser.parse_args(argv)


def parse_inspect(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Look at a dataset before training on it: counts, sizes, modes, unreadable files, "
        "duplicates and train/test leaks, samples, what an ImageNet model calls the pictures, and (--rank-models) "
        "which pretrained model should transfer best."
    )
    parser.add_argument(
        "--data",
        default="tanganke/stanford_cars",
        help="any dataset train.py reads (default: the hub's Stanford Cars; 'demo' works offline)",
    )
    parser.add_argument("--out", help="output folder (default runs/data-<name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    parser.add_argument("--arch", default="resnet50", help="the ImageNet model of the sanity check (default resnet50)")
    parser.add_argument("--weights", default="DEFAULT", help="its torchvision weights (default DEFAULT)")
    parser.add_argument(
        "--resolution", type=int, default=224, help="what the samples and the sanity check show the model (default 224)"
    )
    parser.add_argument(
        "--check-images", type=int, default=500, help="training images the ImageNet model looks at (default 500)"
    )
    parser.add_argument(
        "--workers", type=int, default=-1, help="processes that look at the images (-1: one per core, at most 8)"
    )
    parser.add_argument(
        "--rank-models",
        metavar="ARCH[:WEIGHTS],...",
        help="before training: score pretrained candidates on the training split, without fine-tuning (LogME, NCE, "
        "LEEP, H-score), e.g. resnet50,efficientnet_b0:IMAGENET1K_V1 (WEIGHTS as train.py's --weights; default "
        "DEFAULT)",
    )
    add_device_flag(parser)
    parser.add_argument("--seed", type=int, default=0, help="chooses the samples (default 0)")
    args = parser.parse_args(argv)
    if args.check_images < 0:
        raise UserError(f"--check-images must not be negative, got {args.check_images}")
    args.rank_models = candidates(args.rank_models) if args.rank_models is not None else []
    return args


def candidates(text: str) -> list[tuple[str, str]]:
    """--rank-models resnet50,resnet18:none -> [(resnet50, DEFAULT), (resnet18, none)], each once."""
    found = []
    for item in text.split(","):
        arch, _, weights = item.strip().partition(":")
        if not arch or (":" in item and not weights):
            raise UserError(f"--rank-models takes ARCH[:WEIGHTS],... (e.g. resnet50,resnet18:none), got {text!r}")
        found.append((arch, weights or "DEFAULT"))
    return list(dict.fromkeys(found))


def parse_sweep(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Search a recipe's hyperparameters with Optuna: every trial is a train.py run chosen on a "
        "validation split and pruned on its epochs' accuracy; workers on several machines or GPUs share one study "
        "by running the same command with the same --storage."
    )
    parser.add_argument("--config", required=True, help="the sweep file, e.g. configs/sweeps/demo.toml")
    parser.add_argument(
        "--trials",
        type=int,
        help="the study's total number of trials, over all its workers (default: the sweep file's)",
    )
    parser.add_argument(
        "--storage",
        help="where the study lives: a database URL (postgresql://user:password@host/db, sqlite:///path/study.db) "
        "or the path of a journal file on a shared file system (default: sqlite, study.db in the sweep folder)",
    )
    parser.add_argument("--out", help="the sweep folder (default runs/sweeps/<sweep file's name>)")
    parser.add_argument(
        "--refit",
        action="store_true",
        help="instead of searching: train the best trial's config on the whole training split, evaluate it once on "
        "the test split, and write result.md",
    )
    parser.add_argument("--overwrite", action="store_true", help="with --refit: replace an earlier refit")
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=30,
        help="seconds between a worker's heartbeats in a database; a trial silent for twice that is failed and run "
        "again (default 30)",
    )
    args = parser.parse_args(argv)
    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    if args.heartbeat < 1:
        raise UserError(f"--heartbeat must be at least 1 second, got {args.heartbeat}")
    if args.overwrite and not args.refit:
        raise UserError("--overwrite only replaces an earlier --refit; a search continues its study instead")
    return args


def parse_app(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A web page for a trained model: classify your own photos with a CAM of where the "
        "model looked and, once eval.py has run, browse its evaluation."
    )
    add_model_flags(parser)
    parser.add_argument(
        "--eval", help="eval.py's output folder for the Evaluation tab (default: <run>/eval when it exists)"
    )
    parser.add_argument(
        "--cam-method", default="gradcam", choices=CAM_METHODS, help="the CAM method shown first (default gradcam)"
    )
    add_device_flag(parser)
    add_backend_flag(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    return args


def check_command_line(module_name: str, parse) -> None:
    """When a tool runs as a script, parse its command line before the tool imports torch: --help and a mistake
    answer at once instead of after seconds of imports. (The tool's main parses it again: that costs nothing.)"""
    if module_name == "__main__":
        run_cli(parse, sys.argv[1:])
