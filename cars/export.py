"""export.py: a trained model as model.safetensors + model.json, for sharing and safe loading."""

from pathlib import Path

from cars.cli import parse_export
from cars.errors import UserError
from cars.trained import export_safetensors, load_trained_from


def main(argv=None) -> None:
    args = parse_export(argv)
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
