"""predict.py: what car is this? Top-k classes for your own photos, optionally with a CAM overlay."""

from cars.cli import check_command_line, parse_predict

check_command_line(__name__, parse_predict)  # --help and mistakes answer before the imports below load torch

import json
import sys
from pathlib import Path

from PIL import Image

from cars import calibration, familiarity
from cars.data import FileSplit, read_rgb
from cars.errors import UserError, message_of, printable, run_cli
from cars.explain import cam_picture
from cars.inference import load_trained_from
from cars.runtime import pick_device
from cars.transforms import eval_transform


def unique_cam_names(paths: list[str]) -> list[str]:
    """<stem>_cam.png per image; car.jpg and car.png (or a/car.jpg and b/car.jpg) get distinct names."""
    names, taken = [], set()
    for path in paths:
        stem, suffix = Path(path).stem, Path(path).suffix.lstrip(".")
        candidates = [stem, f"{stem}_{suffix}"] + [f"{stem}_{suffix}_{n}" for n in range(2, len(paths) + 2)]
        name = next(f"{c}_cam.png" for c in candidates if f"{c}_cam.png" not in taken)
        taken.add(name)
        names.append(name)
    return names


def main(argv=None) -> None:
    args = parse_predict(argv)
    trained = load_trained_from(args)
    device_type = pick_device(args.device)
    trained.model.to(device_type)
    transform = eval_transform(trained.resolution, interpolation=trained.interpolation)
    images = FileSplit([(path, -1) for path in args.images], "input")
    cam_dir = Path(args.cam) if args.cam else None
    if cam_dir:
        try:
            cam_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(
                f"cannot make the --cam folder {cam_dir}: {error.strerror}; choose another folder"
            ) from None
    cam_names = unique_cam_names(args.images)
    check, why_none = familiarity.load_for(trained)  # eval.py's calibration for these weights
    if why_none:
        print(f"note: {why_none}", file=sys.stderr)
    measured, probabilities = calibration.saved_for(trained)  # eval.py's temperature and abstention curve, if any
    trained.temperature = measured["temperature"] if measured else 1.0
    print(f"note: {probabilities}", file=sys.stderr)

    results, failures = [], 0
    for i, path in enumerate(args.images):
        try:
            image = read_rgb(images, i)
            pixels = transform(image)
        except UserError as error:
            print(f"error: {printable(message_of(error))}", file=sys.stderr)
            failures += 1
            continue
        predictions, verdict = familiarity.judged(trained, check, pixels, args.topk)
        result = {"image": path, "predictions": predictions, "temperature": trained.temperature, **verdict}
        if args.abstain_below:
            result["abstained"] = predictions[0]["probability"] < args.abstain_below
        if cam_dir:
            result["cam"] = str(cam_dir / cam_names[i])
            try:
                target = result["predictions"][0]["index"]
                picture = cam_picture(
                    trained.model,
                    image,
                    resolution=trained.resolution,
                    interpolation=trained.interpolation,
                    target=target,
                    method=args.cam_method,
                )
                Image.fromarray(picture).save(result["cam"])
            except OSError as error:
                raise UserError(
                    f"cannot write {result['cam']}: {error.strerror or error}; choose another --cam folder"
                ) from None
        results.append(result)
        if not args.json:
            print(path)
            for rank, prediction in enumerate(result["predictions"], 1):
                print(f"  {rank}. {prediction['class']:<48} {100 * prediction['probability']:6.2f}%")
            if result["unfamiliar"]:
                print(f"  ! {familiarity.in_words(result, check)}")
            if result.get("abstained"):
                print(
                    f"  ! {calibration.abstention_words(predictions[0]['probability'], args.abstain_below, measured)}"
                )
    if args.json:
        print(json.dumps(results, indent=2))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
