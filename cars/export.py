"""export.py: a trained model as model.safetensors + model.json, for sharing and safe loading."""

import argparse
from pathlib import Path

from cars.checkpoint import export_safetensors, load_trained
from cars.errors import UserError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Export a trained model as model.safetensors plus model.json "
                                                 "(arch, resolution, normalisation, class names); eval.py and predict.py load it.")
    parser.add_argument("checkpoint", help="a run folder, one of its .pt files, or any state-dict file")
    parser.add_argument("--out", help="output folder (default: <run>/export)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    parser.add_argument("--arch", help="architecture, for a checkpoint that does not carry it")
    parser.add_argument("--num-classes", type=int, help="class count, for a bare state dict")
    parser.add_argument("--resolution", type=int, help="input size, for a bare state dict (default 224)")
    parser.add_argument("--data", help="dataset to take class names from, for a bare state dict")
    args = parser.parse_args(argv)
    trained = load_trained(args.checkpoint, args.arch, args.num_classes, args.resolution, args.data)
    given = Path(args.checkpoint)
    out = Path(args.out) if args.out else (given if given.is_dir() else trained.path.parent) / "export"
    if (out / "model.safetensors").exists() and not args.overwrite:
        raise UserError(f"{out / 'model.safetensors'} already exists; pass --overwrite or another --out")
    export_safetensors(trained, out)
    print(f"wrote {out / 'model.safetensors'} and {out / 'model.json'} ({trained.arch}, {trained.resolution} px, "
          f"{len(trained.class_names)} classes)")
