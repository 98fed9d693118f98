"""export.py: a trained model for use without this project's code, each format checked against the
PyTorch model before it is kept:

- model.safetensors: the weights only (loading it can never run code), for torchvision's architecture;
- model.onnx: the whole network with a dynamic batch, height and width, for ONNX Runtime and every ONNX tool;
- model.pt2: torch.export's ExportedProgram, for PyTorch without the model's Python code;
- model.json: what feeding any of them needs (resolution, normalisation, class names), and each check's result.
"""

from cars.cli import check_command_line, parse_export

check_command_line(__name__, parse_export)  # --help and mistakes answer before the imports below load torch

import json
import os
import shutil
from pathlib import Path

import torch

from cars.data import load_splits, read_rgb
from cars.errors import UserError, run_cli
from cars.files import atomic_write, make_folder, recover_folder, replace_folder
from cars.inference import OnnxRuntimeModel, Trained, load_trained_from, read_model_json
from cars.models import build_model
from cars.runs import check_folder_free
from cars.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize, eval_transform, normalize

FILES = {"safetensors": "model.safetensors", "onnx": "model.onnx", "torch-export": "model.pt2"}
# the largest |logit difference| an export may show, relative to the largest |logit| (float32 kernels differ by ~1e-6)
TOLERANCE = 1e-4


def check_inputs(trained: Trained, count: int) -> tuple[torch.Tensor, str]:
    """The model's input for `count` test images of its dataset, as eval.py feeds them; random pixels when there is
    no dataset or it cannot be read."""
    transform = eval_transform(trained.resolution, interpolation=trained.interpolation)
    why = "no dataset known: pass --data for test images"
    if trained.data:
        try:
            test = load_splits(trained.data).eval
            chosen = range(min(count, len(test)))
            return normalize(
                torch.stack([transform(read_rgb(test, i)) for i in chosen])
            ), f"{len(chosen)} test images of {trained.data}"
        except UserError as error:  # offline, say, with the dataset not in the cache: check on random pixels and say so
            why = f"{trained.data} could not be read: {error}"
    print(f"note: checking on random pixels ({why})")
    pixels = torch.randint(
        0,
        256,
        (count, 3, trained.resolution, trained.resolution),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )
    return normalize(pixels), f"{count} images of random pixels ({why})"


def reference(trained: Trained, count: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """What every check compares against: the check's inputs, the PyTorch model's logits on them, and their
    description."""
    images, described = check_inputs(trained, count)
    with torch.no_grad():
        return images, trained.model.eval()(images), described


def run_export(fmt: str, path: Path, trained: Trained, images: torch.Tensor) -> torch.Tensor:
    """The logits that the exported file at `path` gives for `images`, loaded as its users would load it."""
    if fmt == "safetensors":
        from safetensors.torch import load_file

        model = build_model(trained.arch, "none", len(trained.class_names), resolution=trained.resolution)
        model.load_state_dict(load_file(str(path)))
        return model.eval()(images)
    if fmt == "onnx":
        return OnnxRuntimeModel(path)(images)  # as predict.py and eval.py run it
    return torch.export.load(str(path)).module()(images)


def write_export(fmt: str, path: Path, model: torch.nn.Module, example: torch.Tensor) -> None:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return
    # any batch, and any height and width the network allows (TTA's scales, another --resolution): Dim.AUTO lets
    # torch.export find the sizes the model works for from the example, where a fixed range would be refused
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},)
    if fmt == "onnx":
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=shapes,
            dynamo=True,
            verbose=False,
        )
        program.save(str(path))
    else:
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=shapes), str(path))


def parity(expected: torch.Tensor, got: torch.Tensor) -> dict:
    """How far an export's logits are from the PyTorch model's: the largest difference, and how often the top-1 class
    agrees.
    It passes when the difference is within TOLERANCE (a top-1 that flips then is a near tie, not an error)."""
    if got.shape != expected.shape:
        return {"passed": False, "reason": f"logits of shape {tuple(got.shape)}, expected {tuple(expected.shape)}"}
    difference = (got - expected).abs().max().item()
    allowed = TOLERANCE * max(1.0, expected.abs().max().item())
    agreement = 100 * (got.argmax(1) == expected.argmax(1)).sum().item() / len(expected)
    return {
        "passed": difference <= allowed,
        "max_abs_logit_diff": difference,
        "allowed": allowed,
        "top1_agreement": agreement,
    }


def check(
    fmt: str, path: Path, trained: Trained, *, images: torch.Tensor, expected: torch.Tensor, described: str
) -> dict:
    """Load the export back and compare; a failed check is an error that names the file."""
    with torch.no_grad():
        try:
            result = parity(expected, run_export(fmt, path, trained, images))
        except Exception as error:  # a file its own runtime cannot load is a failed check, said in one line
            result = {"passed": False, "reason": f"it does not load: {str(error).strip().splitlines()[0][:300]}"}
    result = {"images": described, **result}
    if not result["passed"]:
        why = result.get("reason") or (
            f"its logits differ from the PyTorch model's by up to {result['max_abs_logit_diff']:.3g} "
            f"(allowed {result['allowed']:.3g}); top-1 agrees on {result['top1_agreement']:.1f}%"
        )
        raise UserError(f"{FILES[fmt]} fails its parity check: {why}")
    return result


def agreement(result: dict) -> str:
    return (
        f"top-1 agrees on {result['top1_agreement']:.1f}% of {result['images']}, "
        f"largest |logit difference| {result['max_abs_logit_diff']:.2g}"
    )


def export_info(trained: Trained) -> dict:
    return {
        "arch": trained.arch,
        "resolution": trained.resolution,
        "eval_resize": eval_resize(trained.resolution),
        "interpolation": trained.interpolation,  # the filter of that resize (antialiased, as PIL's)
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "num_classes": len(trained.class_names),
        "class_names": trained.class_names,
        "data": trained.data,
        "weights": trained.start_weights,  # what the fine-tune started from: eval.py's transfer section reads it
        "start_fingerprint": trained.start_fingerprint,  # and checks that it finds those very weights
        "method": trained.method,  # how it was fine-tuned, in words (the report names it)
        "source": str(trained.path),
    }


def export(trained: Trained, out: Path, formats: list[str], check_images: int) -> dict:
    """Every format written beside `out`, checked, then renamed into place; model.json last, listing them."""
    make_folder(out)
    images, expected, described = reference(trained, check_images)
    info = {**export_info(trained), "formats": {}}
    for fmt in formats:
        path = out / FILES[fmt]
        # the file lands under its name only once it has passed its check
        partial = out / f".{path.stem}.partial{path.suffix}"
        try:
            write_export(fmt, partial, trained.model, images[:2])
            result = check(fmt, partial, trained, images=images, expected=expected, described=described)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        info["formats"][fmt] = {"file": path.name, "check": result}
        print(f"{path.name}: {agreement(result)}")
    atomic_write(out / "model.json", lambda file: file.write((json.dumps(info, indent=2) + "\n").encode()))
    return info


def verify(trained: Trained, out: Path, check_images: int) -> None:
    """Check an existing export folder again against the model it came from: a changed file fails."""
    formats = read_model_json(out / "model.json").get("formats") or {}
    if not formats:
        raise UserError(
            f"{out} holds no export written by export.py (no formats in model.json); export the model first"
        )
    images, expected, described = reference(trained, check_images)
    for fmt, entry in formats.items():
        result = check(fmt, out / entry["file"], trained, images=images, expected=expected, described=described)
        print(f"{out / entry['file']}: passes ({agreement(result)})")


def main(argv=None) -> None:
    args = parse_export(argv)
    trained = load_trained_from(args)
    given = Path(args.checkpoint)
    out = Path(args.out) if args.out else (given if given.is_dir() else trained.path.parent) / "export"
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; choose another --out")
    recover_folder(out)  # an export killed while it replaced this folder
    if args.verify:
        return verify(trained, out, args.check_images)
    check_folder_free(out, args.overwrite, "export folder", "--out")
    # the new export is written and checked beside the old one, then takes its place: a failed check or a crash
    # at any moment leaves the old export, or the new one, whole
    staging = out.parent / f".{out.name}.new"
    try:
        shutil.rmtree(staging, ignore_errors=True)  # left by an export that was killed
        info = export(trained, staging, args.format, args.check_images)
        replace_folder(out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(
        f"wrote {', '.join(FILES[f] for f in info['formats'])} and model.json to {out} ({trained.arch}, "
        f"{trained.resolution} px, "
        f"{len(trained.class_names)} classes)"
    )


if __name__ == "__main__":
    run_cli(main)
