"""export.py: a trained model as model.safetensors + model.json, for sharing and safe loading."""

import argparse
from pathlib import Path

from cars.checkpoint import add_model_flags, export_safetensors, load_trained_from
from cars.errors import UserError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Export a trained model as model.safetensors plus model.json "
                                                 "(arch, resolution, normalisation, class names); eval.py and predict.py load it.")
    add_model_flags(parser)
    parser.add_argument("--out", help="output folder (default: <run>/export)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = parser.parse_args(argv)
    trained = load_trained_from(args)
    given = Path(args.checkpoint)
    out = Path(args.out) if args.out else (given if given.is_dir() else trained.path.parent) / "export"
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; choose another --out")
    if (out / "model.safetensors").exists() and not args.overwrite:
        raise UserError(f"{out / 'model.safetensors'} already exists; pass --overwrite or another --out")
    export_safetensors(trained, out)
    print(f"wrote {out / 'model.safetensors'} and {out / 'model.json'} ({trained.arch}, {trained.resolution} px, "
          f"{len(trained.class_names)} classes)")
