import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import CLASSES, write_hub_folder

import eval as eval_tool
import predict
import train
from cars import analysis
from cars.checkpoint import read_state_dict, save_checkpoint
from cars.data import load_splits, read_rgb
from cars.errors import UserError, run_cli
from cars.explain import class_activation_maps
from cars.familiarity import Familiarity
from cars.models import build_model
from cars.transforms import eval_transform, normalize


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A resnet18 trained for two epochs on a 3-class dataset that has two corrupted test copies;
    `gaussian_noise` is an exact copy of test, so its accuracy must equal the clean one."""
    root = tmp_path_factory.mktemp("evalrun")
    data = write_hub_folder(root / "data", per_class=(8, 5))
    shutil.copy(data / "data" / "test-00000-of-00001.parquet", data / "data" / "gaussian_noise-00000-of-00001.parquet")
    from datasets import load_dataset

    test = load_dataset(str(data), data_files={"test": "data/test-*"})["test"]
    test.map(lambda row: {"image": row["image"].rotate(90, expand=True)}).to_parquet(
        str(data / "data" / "motion_blur-00000-of-00001.parquet")
    )
    run_dir = root / "run"
    recipe = "--arch resnet18 --weights none --resolution 64 --batch-size 8 --epochs 2 --workers 0 --lr 0.01"
    train.main(["--data", str(data), "--run-dir", str(run_dir), *recipe.split()])
    return run_dir, data


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def independent_predictions(run_dir: Path, data: Path):
    """Logits computed without eval.py's code path: one image at a time, no DataLoader."""
    model = build_model("resnet18", "none", 3)
    model.load_state_dict(read_state_dict(run_dir / "best.pt"))
    model.eval()
    test = load_splits(str(data)).eval
    transform = eval_transform(64, interpolation="bilinear")
    with torch.no_grad():
        logits = torch.stack([model(normalize(transform(read_rgb(test, i)))[None])[0] for i in range(len(test))])
    return logits, test.labels


@pytest.fixture(scope="module")
def evaluated(trained_run):
    run_dir, data = trained_run
    eval_tool.main([str(run_dir), "--tta", "--corruptions", "--num-gradcam", "4", "--workers", "0"])
    return run_dir / "eval"


def test_numbers_equal_an_independent_computation(trained_run, evaluated):
    logits, labels = independent_predictions(*trained_run)
    predicted = logits.argmax(1).tolist()
    summary = json.loads((evaluated / "summary.json").read_text())
    assert summary["images"] == len(labels) == 15
    assert summary["top1"] == pytest.approx(
        100 * sum(p == t for p, t in zip(predicted, labels, strict=True)) / 15, abs=1e-4
    )
    assert summary["top5"] == pytest.approx(100.0)  # 3 classes: always; test_analysis_helpers_by_hand checks top-5 of 7

    rows = read_csv(evaluated / "predictions.csv")
    assert [int(r["predicted"]) for r in rows] == predicted
    assert [int(r["true"]) for r in rows] == labels

    per_class = read_csv(evaluated / "per_class.csv")
    for row in per_class:
        c = int(row["id"])
        assert row["name"] == CLASSES[c]
        assert int(row["total"]) == labels.count(c)
        assert int(row["correct"]) == sum(1 for p, t in zip(predicted, labels, strict=True) if t == c and p == c)

    counts = Counter(zip(labels, predicted, strict=True))
    matrix = read_csv(evaluated / "confusion_matrix.csv")
    for i, row in enumerate(matrix):
        assert row["true \\ predicted"] == CLASSES[i]
        assert [int(row[CLASSES[j]]) for j in range(3)] == [counts[(i, j)] for j in range(3)]

    expected_pairs = sorted(((t, p, n) for (t, p), n in counts.items() if t != p), key=lambda x: (-x[2], x[0], x[1]))
    pairs = [
        (int(r["true_id"]), int(r["predicted_id"]), int(r["count"])) for r in read_csv(evaluated / "confused_pairs.csv")
    ]
    assert pairs == expected_pairs[:10]


def check_eval_folder(folder: Path, class_names: list[str]) -> dict:
    """Every file of an eval folder agrees with predictions.csv, and report.md says the same numbers."""
    from PIL import Image

    summary = json.loads((folder / "summary.json").read_text())
    rows = read_csv(folder / "predictions.csv")
    true, predicted = [int(r["true"]) for r in rows], [int(r["predicted"]) for r in rows]
    assert summary["images"] == len(rows) and summary["top1"] == pytest.approx(
        100 * np.mean(np.equal(true, predicted)), abs=1e-4
    )
    per_class = read_csv(folder / "per_class.csv")
    assert [r["name"] for r in per_class] == class_names
    for c, row in enumerate(per_class):
        hits = sum(1 for t, p in zip(true, predicted, strict=True) if t == c and p == c)
        assert (int(row["correct"]), int(row["total"])) == (hits, true.count(c))
    counts = Counter(zip(true, predicted, strict=True))
    matrix = read_csv(folder / "confusion_matrix.csv")
    assert [[int(row[name]) for name in class_names] for row in matrix] == [
        [counts[(i, j)] for j in range(len(class_names))] for i in range(len(class_names))
    ]
    pairs = sorted(((t, p, n) for (t, p), n in counts.items() if t != p), key=lambda x: (-x[2], x[0], x[1]))[:10]
    assert [
        (int(r["true_id"]), int(r["predicted_id"]), int(r["count"])) for r in read_csv(folder / "confused_pairs.csv")
    ] == pairs

    report = (folder / "report.md").read_text()
    assert f"**Top-1 {summary['top1']:.2f}%**, top-5 {summary['top5']:.2f}%" in report
    worst_first = sorted(
        (r for r in per_class if int(r["total"])), key=lambda r: (int(r["correct"]) / int(r["total"]), int(r["id"]))
    )
    if len(class_names) <= 20:  # one table of every class, worst first
        ranked = report.split("![per-class accuracy](per_class.png)")[1].split("## Most confused pairs")[0]
        assert "### Bottom 10" not in report
    else:
        ranked, worst_first = report.split("### Bottom 10")[1].split("### Top 10")[0], worst_first[:10]
    assert [line.split(" | ")[0].strip("| ") for line in ranked.strip().splitlines()[2:]] == [
        r["name"] for r in worst_first
    ]
    for true_id, predicted_id, count in pairs:
        assert f"| {class_names[true_id]} | {class_names[predicted_id]} | {count} |" in report
    for image in ("per_class.png", "confusion.png", "gradcam_samples.png"):
        assert f"]({image})" in report
        with Image.open(folder / image) as png:
            assert png.format == "PNG" and png.width > 200 and png.height > 200, image
    return summary


def test_report_files_agree_with_each_other(evaluated):
    summary = check_eval_folder(evaluated, CLASSES)
    report = (evaluated / "report.md").read_text()
    assert f"top-1 **{summary['tta']['top1']:.2f}%**" in report and "| **mean** |" in report
    assert "![CAM on random test images](gradcam_samples.png)" in report
    # a run from random weights has nothing transferred to look at
    assert "Skipped: the run started from random weights (--weights none)" in report
    assert not (evaluated / "transfer").exists() and "transfer" not in summary


def test_tta_equals_an_independent_computation(trained_run, evaluated):
    """3 scales x flip, logits averaged, one image at a time from PIL: the same top-1 as eval.py's."""
    run_dir, data = trained_run
    model = build_model("resnet18", "none", 3)
    model.load_state_dict(read_state_dict(run_dir / "best.pt"))
    model.eval()
    test = load_splits(str(data)).eval
    correct = 0
    with torch.no_grad():
        for i in range(len(test)):
            image = read_rgb(test, i)
            views = [eval_transform(size, interpolation="bilinear")(image) for size in (56, 64, 72)]
            logits = (
                sum(
                    model(normalize(view.flip(-1) if flip else view)[None])[0]
                    for view in views
                    for flip in (False, True)
                )
                / 6
            )
            correct += int(logits.argmax().item() == test.labels[i])
    summary = json.loads((evaluated / "summary.json").read_text())
    assert summary["tta"]["top1"] == pytest.approx(100 * correct / len(test), abs=1e-4)


def test_tta_and_corruption_rows(trained_run, evaluated):
    summary = json.loads((evaluated / "summary.json").read_text())
    assert summary["tta"]["scales"] == [56, 64, 72] and summary["tta"]["top1_without"] == summary["top1"]
    corruptions = summary["corruptions"]
    assert list(corruptions["accuracy"]) == ["gaussian_noise", "motion_blur"]  # the dataset's, in the hub's order
    assert corruptions["accuracy"]["gaussian_noise"] == pytest.approx(summary["top1"])  # an exact copy of test
    assert corruptions["mean"] == pytest.approx(sum(corruptions["accuracy"].values()) / 2)
    assert corruptions["mean_drop"] == pytest.approx(summary["top1"] - corruptions["mean"])
    report = (evaluated / "report.md").read_text()
    tta_table = report.split("## Test-time augmentation")[1].split("## Robustness")[0]
    assert (
        sum(
            1
            for line in tta_table.splitlines()
            if line.startswith("| Audi") or line.startswith("| AM") or line.startswith("| BMW")
        )
        == 3
    )
    assert "| **mean** |" in report


def test_calibration_scores_an_exact_copy_of_the_test_split_as_the_test_split(evaluated):
    """Without a validation split the temperature is fitted on a seeded half of the test split and every split is
    scored on the other half: gaussian_noise, an exact copy of test, must score exactly as test."""
    saved = json.loads((evaluated / "calibration.json").read_text())
    assert saved["fitted_on"] == "a seeded half of the test split (7 images; measured on the other 8)"
    copy = saved["corruptions"]["gaussian_noise"]
    for key in ("images", "ece", "ece_calibrated", "nll", "nll_calibrated", "brier", "brier_calibrated"):
        assert copy[key] == pytest.approx(saved[key], abs=1e-9), key
    assert saved["temperature"] > 0 and saved["corruptions"]["motion_blur"]["images"] == 8
    areas = json.loads((evaluated / "summary.json").read_text())["abstention"]
    assert areas["gaussian_noise"] == pytest.approx(areas["test"], abs=1e-9)  # the same images, ranked the same


def test_eval_output_is_not_overwritten_without_flag(trained_run, evaluated, capsys):
    before = (evaluated / "summary.json").read_bytes()
    with pytest.raises(SystemExit) as exit:
        run_cli(eval_tool.main, [str(trained_run[0]), "--workers", "0"])
    assert exit.value.code == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (evaluated / "summary.json").read_bytes() == before


def test_no_corrupted_splits_is_a_clear_error(tmp_path, trained_run):
    plain = write_hub_folder(tmp_path / "plain")
    with pytest.raises(UserError, match="has no corrupted copies of its test split"):
        eval_tool.main(
            [str(trained_run[0] / "best.pt"), "--data", str(plain), "--corruptions", "--out", str(tmp_path / "o")]
        )


@pytest.mark.parametrize(
    "prefix, wrapper", [("_orig_mod.", None), ("module.", "state_dict"), ("module._orig_mod.", "model")]
)
def test_bare_compiled_and_ddp_state_dicts_give_identical_predictions(
    tmp_path, trained_run, evaluated, prefix, wrapper
):
    run_dir, data = trained_run
    state = {prefix + k: v for k, v in read_state_dict(run_dir / "best.pt").items()}
    save_checkpoint(tmp_path / "best_model.pth", {wrapper: state} if wrapper else state)
    out = tmp_path / "eval"
    eval_tool.main(
        [
            str(tmp_path / "best_model.pth"),
            "--arch",
            "resnet18",
            "--num-classes",
            "3",
            "--resolution",
            "64",
            "--data",
            str(data),
            "--out",
            str(out),
            "--num-gradcam",
            "0",
            "--workers",
            "0",
        ]
    )
    assert read_csv(out / "predictions.csv") == read_csv(evaluated / "predictions.csv")
    assert read_csv(out / "per_class.csv") == read_csv(evaluated / "per_class.csv")


def test_mismatched_checkpoints_name_both_sides(tmp_path, trained_run):
    best = str(trained_run[0] / "best.pt")
    with pytest.raises(UserError, match="holds a resnet18 model, not resnet34; pass --arch resnet18"):
        eval_tool.main([best, "--arch", "resnet34", "--out", str(tmp_path / "a")])
    state = read_state_dict(trained_run[0] / "best.pt")
    torch.save(state, tmp_path / "bare.pth")
    with pytest.raises(UserError, match="has 3 classes but the model has 5"):
        eval_tool.main(
            [str(tmp_path / "bare.pth"), "--arch", "resnet18", "--num-classes", "5", "--out", str(tmp_path / "b")]
        )
    with pytest.raises(UserError, match="does not say which architecture it holds; pass --arch"):
        eval_tool.main([str(tmp_path / "bare.pth"), "--out", str(tmp_path / "c")])


class ColourEvidence(torch.nn.Module):
    """A CNN whose evidence is known by construction: class 0 is 'how much red', class 1 'how much
    blue'. Its feature map (the CAM target layer, 8x8 cells) holds the red and blue areas."""

    def __init__(self):
        super().__init__()
        detector = torch.nn.Conv2d(3, 2, 1)
        with torch.no_grad():  # on normalised pixels: red - blue - 1 (red), blue - red - 1 (blue); grey gives 0 on both
            detector.weight.copy_(torch.tensor([[1.0, 0, -1], [-1, 0, 1]]).view(2, 3, 1, 1))
            detector.bias.fill_(-1.0)
        self.features = torch.nn.Sequential(detector, torch.nn.ReLU(), torch.nn.AvgPool2d(8))
        self.fc = torch.nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(20 * torch.eye(2))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def red_and_blue_image() -> torch.Tensor:
    """64x64 grey, a red square in the top-left quarter, a blue one in the bottom-right quarter."""
    pixels = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    pixels[:, 8:24, 8:24] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    pixels[:, 40:56, 40:56] = torch.tensor([0, 0, 255], dtype=torch.uint8).view(3, 1, 1)
    return normalize(pixels)[None]


RED, BLUE = (slice(8, 24), slice(8, 24)), (slice(40, 56), slice(40, 56))


def peak_in(cam: np.ndarray, region) -> bool:
    y, x = np.unravel_index(cam.argmax(), cam.shape)
    return region[0].start <= y < region[0].stop and region[1].start <= x < region[1].stop


@pytest.mark.parametrize(
    "method", ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "scorecam", "finercam", "eigencam"]
)
def test_cam_maps_peak_where_the_evidence_for_the_class_is(method):
    model, image = ColourEvidence(), red_and_blue_image()
    assert model(image).argmax().item() == 1  # the blue square is the stronger evidence
    for target, region, elsewhere in ((0, RED, BLUE), (1, BLUE, RED)):
        cam = class_activation_maps(model, image, [target], method)[0]
        assert cam.shape == (64, 64) and 0 <= cam.min() and cam.max() <= 1 + 1e-6
        if (
            method == "eigencam"
        ):  # the activations' first principal component: where the evidence is, whatever the class
            assert peak_in(cam, RED) or peak_in(cam, BLUE)
            continue
        assert peak_in(cam, region), f"{method}: class {target} must peak on its colour"
        assert cam[region].mean() > 0.5 > cam[elsewhere].mean(), method


def test_unknown_cam_method():
    with pytest.raises(UserError, match="unknown --cam-method 'magic'"):
        class_activation_maps(build_model("resnet18", "none", 3), torch.zeros(1, 3, 64, 64), [0], "magic")


def test_predict_top1_matches_eval_and_reports_unreadable_files(tmp_path, trained_run, evaluated, capsys):
    run_dir, data = trained_run
    test = load_splits(str(data)).eval
    paths = []
    for i in (0, 4):
        path = tmp_path / f"car{i}.png"  # PNG: lossless, the same pixels eval decoded
        test.open(i).save(path)
        paths.append(str(path))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        run_cli(
            predict.main,
            [
                str(run_dir),
                paths[0],
                str(tmp_path / "broken.jpg"),
                paths[1],
                "--json",
                "--topk",
                "2",
                "--cam",
                str(tmp_path / "cams"),
            ],
        )
    assert exit.value.code == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.strip().splitlines() if not line.startswith("note: probabilities")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot read image") and "broken.jpg" in errors[0]
    results = json.loads(captured.out)
    rows = read_csv(evaluated / "predictions.csv")
    check = Familiarity.load(evaluated / "familiarity.safetensors")
    assert [r["image"] for r in results] == paths
    for result, i in zip(results, (0, 4), strict=True):
        assert result["predictions"][0]["index"] == int(rows[i]["predicted"])
        assert result["predictions"][0]["probability"] == pytest.approx(float(rows[i]["calibrated"]), abs=1e-3)
        assert len(result["predictions"]) == 2 and Path(result["cam"]).exists()
        with PIL.Image.open(result["cam"]) as picture:  # the photo and the map over it, each 224 px or more
            assert picture.width >= 2 * 224 and picture.height >= 224
        # eval.py calibrated the unfamiliar-input check; predict.py applies it
        assert result["unfamiliar"] == (result["familiarity_score"] > check.threshold)


def test_predict_table_for_a_bare_state_dict_with_class_names_from_data(tmp_path, trained_run, capsys):
    run_dir, data = trained_run
    torch.save(
        {"_orig_mod." + k: v for k, v in read_state_dict(run_dir / "best.pt").items()}, tmp_path / "best_model.pth"
    )
    image = tmp_path / "grey.jpg"
    load_splits(str(data)).eval.open(0).convert("L").save(image)
    capsys.readouterr()
    predict.main(
        [
            str(tmp_path / "best_model.pth"),
            str(image),
            "--arch",
            "resnet18",
            "--resolution",
            "64",
            "--data",
            str(data),
            "--topk",
            "3",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(image) and len(out) == 4
    assert sorted(line.split(". ", 1)[1].rsplit(" ", 1)[0].strip() for line in out[1:]) == sorted(CLASSES)


def test_analysis_helpers_by_hand():
    matrix = analysis.confusion_matrix([0, 1, 1, 2, 2, 0], [0, 0, 1, 2, 1, 1], 3)
    assert matrix.tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 1]]
    classes = analysis.per_class_accuracy(matrix, ["a", "b", "c"])
    assert [(c.correct, c.total) for c in classes] == [(1, 2), (1, 3), (1, 1)]
    assert [c.name for c in analysis.ranked(classes, 2, worst=True)] == ["b", "a"]
    assert [c.name for c in analysis.ranked(classes, 3, worst=False)] == ["c", "a", "b"]
    assert analysis.confused_pairs(matrix, 10) == [(0, 1, 1), (1, 0, 1), (1, 2, 1)]
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert analysis.topk_accuracy(logits, torch.tensor([1, 1]), 1) == 0.0
    assert analysis.topk_accuracy(logits, torch.tensor([1, 1]), 2) == 100.0
    right = torch.tensor([0] * 270 + [1] * 30)  # 270 of 300: exactly 90 %, not a float32 mean's 89.99999761
    assert analysis.topk_accuracy(torch.eye(2)[torch.zeros(300, dtype=torch.long)], right, 1) == 90.0
    from cars.engine import Device, evaluate

    batches = [
        (torch.eye(2)[torch.zeros(100, dtype=torch.long)].view(100, 2, 1, 1), right[k : k + 100]) for k in (0, 100, 200)
    ]
    assert evaluate(torch.nn.Flatten(), batches, Device("cpu", show_progress=False)).accuracy == 90.0
    ranks = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1]] * 4)  # class i is the (i+1)-th guess
    assert analysis.topk_accuracy(ranks, torch.tensor([0, 4, 5, 6]), 5) == 50.0
    assert analysis.topk_accuracy(ranks, torch.tensor([0, 4, 5, 6]), 1) == 25.0


def test_a_dataset_with_the_classes_in_another_order_is_matched_by_name(tmp_path, trained_run, evaluated, capsys):
    """The same test images, the class list reversed: eval.py matches labels to the model's classes by
    name and says so; the numbers are the run's own. Other classes are refused, in eval and predict."""
    from conftest import split_rows

    run_dir, _ = trained_run
    rows = {}
    for split, per_class, seed in (("train", 8, 1), ("test", 5, 2)):  # the fixture's images
        images, labels = split_rows(per_class, seed)
        rows[split] = (images, [2 - label for label in labels])
    reordered = write_hub_folder(tmp_path / "reordered", rows=rows, classes=list(reversed(CLASSES)))
    capsys.readouterr()
    eval_tool.main(
        [
            str(run_dir),
            "--data",
            str(reordered),
            "--out",
            str(tmp_path / "eval"),
            "--num-gradcam",
            "0",
            "--workers",
            "0",
        ]
    )
    assert (
        "lists the model's 3 classes in another order; its labels are matched to the model's by name"
        in capsys.readouterr().out
    )
    assert read_csv(tmp_path / "eval" / "predictions.csv") == read_csv(evaluated / "predictions.csv")
    assert read_csv(tmp_path / "eval" / "per_class.csv") == read_csv(evaluated / "per_class.csv")
    # the web page's Evaluation tab: the training examples of the class a mistake was taken for are of that class
    import gradio as gr

    from app import evaluation_tab
    from cars.inference import load_trained
    from cars.report import write_csv

    pairs = [
        dict(true_id=t, true=CLASSES[t], predicted_id=(t + 1) % 3, predicted=CLASSES[(t + 1) % 3], count=1)
        for t in range(3)
    ]
    # every class once as "taken for", whatever the model did
    write_csv(tmp_path / "eval" / "confused_pairs.csv", pairs, list(pairs[0]))
    with gr.Blocks():
        show_pair = evaluation_tab(load_trained(run_dir), tmp_path / "eval", "gradcam")[1]
    data_names, data_labels = list(reversed(CLASSES)), load_splits(str(reordered)).train.labels
    for choice, pair in enumerate(pairs):
        _, references = show_pair(choice)
        shown = [int(caption.split("#")[1].split(":")[0]) for _, caption in references]
        assert len(shown) == 6 and all(data_names[data_labels[i]] == pair["predicted"] for i in shown)

    other = write_hub_folder(tmp_path / "other", classes=[*CLASSES[:2], "Tesla Model S Sedan 2012"])
    with pytest.raises(
        UserError, match="has other classes than the model .*'Tesla Model S Sedan 2012'.*pass the --data the model"
    ):
        eval_tool.main([str(run_dir), "--data", str(other), "--out", str(tmp_path / "eval2")])
    assert not (tmp_path / "eval2").exists()
    image = tmp_path / "car.png"
    load_splits(str(other)).eval.open(0).save(image)
    with pytest.raises(UserError, match="has other classes than the model"):
        predict.main([str(run_dir), str(image), "--data", str(other)])


def test_an_eval_that_crashed_part_way_is_replaced_with_overwrite(tmp_path, trained_run, monkeypatch):
    run_dir, _ = trained_run
    out = tmp_path / "eval"

    def crash(*args, **kwargs):
        raise RuntimeError("the CAMs ran out of memory")

    with monkeypatch.context() as patched:
        patched.setattr(eval_tool, "cam_tiles", crash)
        with pytest.raises(RuntimeError, match="out of memory"):
            eval_tool.main([str(run_dir), "--out", str(out), "--num-gradcam", "2", "--workers", "0"])
    assert json.loads((out / "summary.json").read_text())["status"] == "running" and (out / "per_class.csv").exists()
    eval_tool.main([str(run_dir), "--out", str(out), "--num-gradcam", "2", "--workers", "0", "--overwrite"])
    assert json.loads((out / "summary.json").read_text())["status"] == "finished" and (out / "report.md").exists()


def test_what_pretraining_bought_never_compares_two_test_sets_or_a_missing_one(tmp_path):
    """Item 6 and D3, D4: a run chosen on validation with --no-final-test has a twin beside it that never read the test
    split (eval.py died with KeyError); named by --scratch, such a run is refused in one line, and so is a run on
    other data; and with --resolution another test set is read, so the gain is not computed."""
    import dataclasses

    from conftest import tiny_args
    from test_models import place_in_torchvision_cache

    from cars.config import load_saved

    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    data = write_hub_folder(tmp_path / "data")
    run_dir = tmp_path / "runs" / "run"
    flags = ["--weights", "IMAGENET1K_V1", "--epochs", "1", "--val-split", "0.34", "--no-final-test"]
    train.main(tiny_args(data, run_dir, *flags))
    recipe = load_saved(run_dir / "config.toml")

    def scratch_run(name: str, summary: dict, **changes) -> Path:
        folder = tmp_path / "runs" / name
        folder.mkdir()
        dataclasses.replace(recipe, weights="none", seed=3, **changes).save(folder / "config.toml")
        (folder / "summary.json").write_text(json.dumps({"status": "finished", **summary}))
        return folder

    scratch_run("twin", {"selected_on": "val", "best_eval_acc": 50.0})  # --no-final-test: no test_acc_of_best
    quick = ["--num-gradcam", "1", "--workers", "0", "--transfer", "off"]
    eval_tool.main([str(run_dir), *quick])
    report = (run_dir / "eval" / "report.md").read_text()
    assert "never read the test split" in report and "pretraining" not in json.loads(
        (run_dir / "eval" / "summary.json").read_text()
    )

    for name, summary, changes, message in (
        ("untested", {"selected_on": "val", "best_eval_acc": 50.0}, {}, "never read the test split"),
        ("elsewhere", {"selected_on": "test", "best_eval_acc": 50.0}, {"data": "demo"}, "trained on demo, and"),
    ):
        other = scratch_run(name, summary, **changes)
        with pytest.raises(UserError, match=message):
            eval_tool.main([str(run_dir), "--scratch", str(other), "--out", str(tmp_path / "out"), *quick])
        assert not (tmp_path / "out").exists()

    tested = scratch_run("tested", {"selected_on": "val", "best_eval_acc": 50.0, "test_acc_of_best": 40.0})
    eval_tool.main(
        [str(run_dir), "--scratch", str(tested), "--resolution", "48", "--out", str(tmp_path / "o48"), *quick]
    )
    opening = (tmp_path / "o48" / "report.md").read_text()
    assert "not measured here: this evaluation reads another resolution (48 px)" in opening
    eval_tool.main([str(run_dir), "--scratch", str(tested), "--out", str(tmp_path / "same"), *quick])
    assert json.loads((tmp_path / "same" / "summary.json").read_text())["pretraining"]["scratch_acc"] == 40.0


def test_eval_adapting_to_an_exact_copy_of_the_test_split_scores_it_as_the_clean_split(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "adapted"
    eval_tool.main(
        [
            str(run_dir),
            "--corruptions",
            "--adapt",
            "bn",
            "--transfer",
            "off",
            "--num-gradcam",
            "0",
            "--workers",
            "0",
            "--out",
            str(out),
        ]
    )
    adapted = json.loads((out / "summary.json").read_text())["adaptation"]
    assert adapted["method"] == "bn" and adapted["clean"]["images"] == 8  # the 7 others adapted the copy
    assert adapted["corruptions"]["gaussian_noise"] == adapted["clean"]  # gaussian_noise is the test split itself
    assert "## Adapting without labels" in (out / "report.md").read_text()
    with pytest.raises(UserError, match="--adapt tent adapts to the corrupted copies of the test split; add "):
        eval_tool.main([str(run_dir), "--adapt", "tent", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
