"""app.py: a web page for a trained model. "Predict": drop in a photo, see the top-5 car names and
where the model looked. "Evaluation" (once eval.py has run): per-class accuracy, the most confused
pairs with their images and CAMs, and the report's charts. Served on 127.0.0.1 only, unless asked."""

from cars.cli import check_command_line, parse_app

check_command_line(__name__, parse_app)  # --help and mistakes answer before the imports below load torch

import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import gradio as gr

from cars import calibration, familiarity
from cars.cli import CAM_METHODS
from cars.data import FileSplit, label_map, load_splits, read_rgb
from cars.demo import CLASS_NAMES
from cars.errors import UserError, message_of, run_cli
from cars.explain import cam_picture, display_pixels
from cars.inference import Trained, load_trained_from
from cars.runtime import pick_device
from cars.transforms import eval_transform

EXAMPLES = Path(__file__).resolve().parent / "examples"  # photos the demo's generator drew (README)
MAX_UPLOAD = "20mb"  # a photo larger than this is refused on the page, before it reaches the model
CHARTS = ("per_class.png", "confusion.png", "gradcam_samples.png", "gradcam_worst.png")
# Every event that runs the model waits in this one queue, one at a time: a CAM hooks the model it explains, and a
# second request on the same model meanwhile (the page's first pair loading as a photo is uploaded) would mix its
# activations and gradients into the first, or crash it.
ONE_AT_A_TIME = {"concurrency_id": "model", "concurrency_limit": 1}


def predict_tab(trained: Trained, cam_method: str) -> None:
    transform = eval_transform(trained.resolution, interpolation=trained.interpolation)
    check, why_none = familiarity.load_for(trained)  # eval.py's calibration for these weights
    measured, probabilities = calibration.saved_for(trained)  # eval.py's temperature and abstention curve, if any
    trained.temperature = measured["temperature"] if measured else 1.0

    def answer(
        photo, method, abstain_below=0.0
    ):  # the upload as sent (not preprocessed): our reader's message, not Gradio's, for a bad file
        if not photo:
            raise gr.Error("Upload or paste a photo first.")
        # the user's own file name, not where Gradio stored it
        name = photo.get("orig_name") or Path(photo["path"]).name
        try:
            image = read_rgb(FileSplit([(photo["path"], -1)], "upload"), 0)
            pixels = transform(image)
        except UserError as error:
            reason = message_of(error).replace(photo["path"], name)
            # one line in the server's log, not a traceback
            print(f"refused an upload: {reason}", file=sys.stderr, flush=True)
            raise gr.Error(f"This is not a photo the model can read: {reason}", print_exception=False) from None
        predictions, verdict = familiarity.judged(trained, check, pixels, 5)
        top = {p["class"]: p["probability"] for p in predictions}
        if verdict["unfamiliar"] is None:
            note = "No check of how familiar the photo is: " + (
                "ONNX Runtime gives no features."
                if trained.backend != "pytorch"
                else f"{why_none.removeprefix('no unfamiliar-input check: ')}."
                if why_none
                else "run eval.py on this run first."
            )
        elif verdict["unfamiliar"]:
            note = f"**This photo is {familiarity.in_words(verdict, check)}.**"
        else:
            note = f"Like the training images (familiarity score {verdict['familiarity_score']:.1f})."
        cam = (
            cam_picture(
                trained.model,
                image,
                resolution=trained.resolution,
                interpolation=trained.interpolation,
                target=predictions[0]["index"],
                method=method,
            )
            if trained.backend == "pytorch"
            else None
        )
        if predictions[0]["probability"] < abstain_below:
            words = calibration.abstention_words(predictions[0]["probability"], abstain_below, measured)
            note = f"**The model {words}.**\n\n{note}"
        return top, cam, f"{note}\n\n{probabilities[0].upper()}{probabilities[1:]}."

    with gr.Row():
        with gr.Column():
            photo = gr.Image(
                type="filepath",
                sources=["upload", "clipboard"],
                label="Your photo (upload or paste)",
                elem_id="photo",
                height=320,
            )
            method = gr.Dropdown(
                list(CAM_METHODS), value=cam_method, label="CAM method", visible=trained.backend == "pytorch"
            )
            abstain = gr.Slider(
                0, 1, value=0, step=0.05, label="Abstain below this probability (0: always answer)", elem_id="abstain"
            )
            button = gr.Button("Predict", variant="primary", elem_id="predict")
            shipped = sorted(str(p) for p in EXAMPLES.glob("*.png"))
            if shipped and set(trained.class_names) == set(CLASS_NAMES):  # the demo's photos, for the demo's model
                gr.Examples(shipped, inputs=[photo], label="Or try one of these (bus.png is no car at all)")
            with gr.Accordion(f"The {len(trained.class_names)} classes this model knows", open=False):
                gr.Markdown(", ".join(trained.class_names))
        with gr.Column():
            top5 = gr.Label(num_top_classes=5, label="Top 5", elem_id="top5")
            note = gr.Markdown(elem_id="familiarity")
            cam = gr.Image(label="Where the model looked (top class)", interactive=False, elem_id="cam", height=320)
    outputs = [top5, cam, note]
    button.click(answer, [photo, method, abstain], outputs, api_name="predict", preprocess=False, **ONE_AT_A_TIME)
    # an upload answers at once, too
    photo.upload(answer, [photo, method, abstain], outputs, api_visibility="private", preprocess=False, **ONE_AT_A_TIME)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def evaluation_tab(trained: Trained, eval_dir: Path, cam_method: str) -> tuple:
    """The tab's components; returns what the page's load event needs to show the first pair at once."""
    per_class = read_csv(eval_dir / "per_class.csv")
    pairs = read_csv(eval_dir / "confused_pairs.csv")
    predictions = read_csv(eval_dir / "predictions.csv")
    summary = json.loads((eval_dir / "summary.json").read_text()) if (eval_dir / "summary.json").is_file() else {}
    data = summary.get("data") or trained.data
    splits = load_splits(data)  # the dataset eval.py ran on: predictions.csv indexes its test split
    # predictions.csv holds the model's class indices; the dataset may list the same classes in another order (as
    # eval.py maps them)
    to_model = label_map(trained.class_names, splits.class_names, data)
    model_labels = [int(to_model[label]) if to_model is not None else label for label in splits.train.labels]

    def with_cam(split, index: int, target: int, caption: str):
        photo = read_rgb(split, index)
        image = (
            cam_picture(
                trained.model,
                photo,
                resolution=trained.resolution,
                interpolation=trained.interpolation,
                target=target,
                method=cam_method,
            )
            if trained.backend == "pytorch"
            else display_pixels(photo, trained.resolution)
        )
        return image, caption

    def show_pair(choice):
        if choice is None:
            return [], []
        pair = pairs[choice]
        true, predicted = int(pair["true_id"]), int(pair["predicted_id"])
        wrong = [int(r["index"]) for r in predictions if int(r["true"]) == true and int(r["predicted"]) == predicted][
            :6
        ]
        mistaken = [
            with_cam(splits.eval, i, predicted, f"test #{i}: a {pair['true']}, taken for a {pair['predicted']}")
            for i in wrong
        ]
        examples = [i for i, label in enumerate(model_labels) if label == predicted][:6]
        references = [
            with_cam(splits.train, i, predicted, f"training image #{i}: a {pair['predicted']}") for i in examples
        ]
        return mistaken, references

    gr.Markdown(f"Evaluation of `{trained.path}` from `{eval_dir}`: click a column's header to sort.")
    gr.Dataframe(
        [[int(r["id"]), r["name"], int(r["correct"]), int(r["total"]), float(r["accuracy"])] for r in per_class],
        headers=["id", "class", "correct", "total", "accuracy %"],
        label="Per-class accuracy",
        interactive=False,
        elem_id="per_class",
    )
    choices = [(f"{p['true']} -> {p['predicted']} ({p['count']} images)", i) for i, p in enumerate(pairs)]
    pair = gr.Dropdown(
        choices, value=0 if choices else None, label="Most confused pairs: true class -> taken for", elem_id="pairs"
    )
    with gr.Row():
        # each picture is the photo beside its CAM: shown whole, not cropped to a square
        mistaken = gr.Gallery(
            label="The misclassified test images, with the CAM of the class they were taken for",
            columns=2,
            object_fit="contain",
        )
        references = gr.Gallery(
            label="Training images of the class they were taken for, with their CAMs", columns=2, object_fit="contain"
        )
    pair.change(show_pair, pair, [mistaken, references], **ONE_AT_A_TIME)
    charts = [(str(eval_dir / name), name) for name in CHARTS if (eval_dir / name).exists()]
    gr.Gallery(charts, label="The report's charts", columns=2, object_fit="contain", height=600, elem_id="charts")
    return pair, show_pair, mistaken, references


def build_app(trained: Trained, eval_dir: Path | None, cam_method: str = "gradcam") -> gr.Blocks:
    with gr.Blocks(title=f"{trained.arch}: {len(trained.class_names)} car models") as app:
        gr.Markdown(
            f"## {trained.arch} at {trained.resolution} px, {len(trained.class_names)} classes\n`{trained.path}`"
        )
        with gr.Tab("Predict"):
            predict_tab(trained, cam_method)
        if eval_dir is not None:
            with gr.Tab("Evaluation"):
                pair, show_pair, mistaken, references = evaluation_tab(trained, eval_dir, cam_method)
            app.load(show_pair, pair, [mistaken, references], **ONE_AT_A_TIME)
    return app


def find_eval(checkpoint: str, given: str | None) -> Path | None:
    """eval.py's folder for this model: --eval, else <run>/eval beside a run folder or its checkpoint."""
    if given:
        if not (Path(given) / "per_class.csv").is_file():
            raise UserError(
                f"--eval {given} is not an eval.py folder (no per_class.csv); run eval.py first or drop --eval"
            )
        return Path(given)
    path = Path(checkpoint)
    candidates = [path / "eval"] if path.is_dir() else [path.parent / "eval", path.parent / f"eval-{path.stem}"]
    return next((c for c in candidates if (c / "per_class.csv").is_file()), None)


def main(argv=None) -> None:
    args = parse_app(argv)
    trained = load_trained_from(args)
    trained.model.to(pick_device(args.device))
    eval_dir = find_eval(args.checkpoint, args.eval)
    if eval_dir is not None and not trained.data:
        raise UserError(
            f"{trained.path} does not say which dataset it was trained on; pass --data for the Evaluation tab"
        )
    app = build_app(trained, eval_dir, args.cam_method)
    try:
        app.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            max_file_size=MAX_UPLOAD,
            quiet=True,
            show_error=True,
            prevent_thread_lock=True,
        )
    except OSError as error:  # Gradio's "cannot find empty port"
        raise UserError(f"cannot listen on {args.host}:{args.port}: {error}; choose another --port") from None
    print(
        f"serving {trained.path} at http://{args.host}:{args.port}"
        + ("" if eval_dir else " (no Evaluation tab: run eval.py first)")
        + " (Ctrl+C stops)",
        flush=True,
    )
    app.block_thread()


if __name__ == "__main__":
    run_cli(main)
