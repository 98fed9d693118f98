"""Calibration on inputs whose answer is known: probabilities with a known gap to their accuracy, logits scaled by a
known factor (their temperature is scaled by it, and calibrated they score the same), labels drawn from a known
softmax; then eval.py's calibration.json for a run and for the same run with its logits scaled."""

import json
import math

import pytest
import torch
from conftest import tiny_args, write_hub_folder

import eval as eval_tool
import predict
import train
from cars import calibration
from cars.checkpoint import load_checkpoint, save_checkpoint
from cars.data import FileSplit, read_rgb
from cars.errors import UserError
from cars.inference import load_trained
from cars.transforms import eval_transform, normalize


def drawn(count: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits `scale` x z and labels drawn from softmax(z): the temperature that calibrates them is `scale`."""
    generator = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(count, 10, generator=generator)
    labels = torch.multinomial(z.softmax(1), 1, generator=generator)[:, 0]
    return scale * z, labels


def test_scores_of_probabilities_whose_gap_is_known():
    """Every image 90 % sure of class 0 and right: ECE 10 points, NLL -ln 0.9, Brier 0.1^2 + 0.1^2."""
    logits = torch.log(torch.tensor([[0.9, 0.1]], dtype=torch.float64)).repeat(8, 1)
    scores = calibration.scores(logits, torch.zeros(8, dtype=torch.long))
    assert scores["ece"] == pytest.approx(10.0, abs=1e-4)
    assert scores["nll"] == pytest.approx(-math.log(0.9), rel=1e-9)
    assert scores["brier"] == pytest.approx(0.02, rel=1e-9)
    rows = calibration.reliability(logits, torch.zeros(8, dtype=torch.long))
    assert rows == [dict(low=13 / 15, high=14 / 15, images=8, confidence=pytest.approx(0.9), accuracy=1.0)]


def test_logits_scaled_by_a_known_factor_get_a_temperature_scaled_by_it():
    logits, labels = drawn(20000, 1.0)
    base = calibration.fit_temperature(logits, labels)
    assert base == pytest.approx(1.0, abs=0.05)  # the labels were drawn from softmax(logits)
    for factor in (0.25, 3.0):
        temperature = calibration.fit_temperature(factor * logits, labels)
        assert temperature == pytest.approx(factor * base, rel=1e-5)
        calibrated = calibration.scores(factor * logits, labels, temperature)
        assert calibrated == pytest.approx(calibration.scores(logits, labels, base), abs=1e-6)
        before = calibration.scores(factor * logits, labels)
        assert before["ece"] > 5 * calibrated["ece"] and before["nll"] > calibrated["nll"]


def test_risk_coverage_of_a_score_that_ranks_the_right_answers_first_and_last():
    correct = torch.tensor([True, True, False, False])
    coverage, risk, area = calibration.risk_coverage(torch.tensor([4.0, 3.0, 2.0, 1.0]), correct)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0] and risk.tolist() == pytest.approx([0, 0, 1 / 3, 1 / 2])
    assert area == pytest.approx((1 / 3 + 1 / 2) / 4)
    _, risk, area = calibration.risk_coverage(torch.tensor([1.0, 2.0, 3.0, 4.0]), correct)  # wrong answers first
    assert risk.tolist() == pytest.approx([1, 1, 2 / 3, 1 / 2]) and area == pytest.approx((2 + 2 / 3 + 1 / 2) / 4)
    saved = {"abstention": {"confidence": [0.9, 0.8, 0.5, 0.3], "correct": [1, 1, 0, 1]}}
    assert calibration.at_threshold(saved, 0.8) == (0.5, 1.0) and calibration.at_threshold(saved, 0.4) == (0.75, 2 / 3)
    assert calibration.at_threshold(saved, 0.95) == (0.0, None)


@pytest.fixture(scope="module")
def evaluated_twice(tmp_path_factory):
    """A tiny run with a validation split, evaluated; then the same run with its head (weights and bias) 4 times
    larger, so its logits are too, evaluated into another folder."""
    root = tmp_path_factory.mktemp("calibration")
    data = write_hub_folder(root / "data", per_class=(12, 6))
    run = root / "run"
    train.main(tiny_args(data, run, "--val-split", "0.5"))
    quick = ["--num-gradcam", "0", "--workers", "0", "--transfer", "off"]
    eval_tool.main([str(run), *quick])
    scaled = root / "scaled"
    scaled.mkdir()
    checkpoint = load_checkpoint(run / "best.pt")
    for key in ("fc.weight", "fc.bias"):
        checkpoint["model"][key] *= 4
    save_checkpoint(scaled / "best.pt", checkpoint)
    eval_tool.main([str(scaled / "best.pt"), *quick, "--data", str(data)])
    read = lambda folder: json.loads((folder / calibration.FILE).read_text())  # noqa: E731
    return run, read(run / "eval"), read(scaled / "eval-best")


def test_eval_ranks_the_test_images_by_three_scores_and_saves_the_abstention_curve(evaluated_twice):
    run, plain, _ = evaluated_twice
    areas = json.loads((run / "eval" / "summary.json").read_text())["abstention"]["test"]
    assert set(areas) == {"softmax confidence", "calibrated confidence", "familiarity", "error"}
    assert all(0 <= value <= 1 for value in areas.values())
    assert len(plain["abstention"]["confidence"]) == len(plain["abstention"]["correct"]) == plain["images"]
    assert calibration.at_threshold(plain, 0.0) == (1.0, pytest.approx(1 - areas["error"]))
    assert (run / "eval" / "risk_coverage.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Knowing when to abstain" in (run / "eval" / "report.md").read_text()


def test_eval_fits_the_temperature_on_the_validation_split_and_scores_every_split(evaluated_twice):
    run, plain, scaled = evaluated_twice
    assert plain["fitted_on"] == "the run's validation split (18 images)"
    assert {"temperature", "ece", "ece_calibrated", "nll", "nll_calibrated"} <= set(plain)
    assert plain["images"] == 18 and "corruptions" not in plain  # the whole test split, once
    report = (run / "eval" / "report.md").read_text()
    assert "## Calibration" in report and f"is **{plain['temperature']:.2f}**" in report
    assert (run / "eval" / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_a_model_with_its_logits_scaled_gets_the_temperature_scaled_and_the_same_calibrated_scores(evaluated_twice):
    _, plain, scaled = evaluated_twice
    assert scaled["temperature"] == pytest.approx(4 * plain["temperature"], rel=1e-4)
    for key in ("ece_calibrated", "nll_calibrated", "brier_calibrated"):
        assert scaled[key] == pytest.approx(plain[key], abs=1e-4), key
    assert scaled["fitted_on"] == plain["fitted_on"]  # the checkpoint's config names the validation split


def test_predict_divides_the_logits_by_the_temperature(evaluated_twice, tmp_path, capsys):
    from PIL import Image

    run, plain, _ = evaluated_twice
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (30, 60, 200)).save(photo)
    capsys.readouterr()
    predict.main([str(run), str(photo), "--json", "--topk", "3"])
    calibrated = json.loads(capsys.readouterr().out)[0]
    assert "abstained" not in calibrated  # without --abstain-below it always answers
    predict.main([str(run), str(photo), "--abstain-below", "1"])  # no probability is above 1: it abstains
    coverage, accuracy = calibration.at_threshold(plain, 1.0)
    assert "abstains: the top class's probability" in capsys.readouterr().out and (coverage, accuracy) == (0.0, None)
    with pytest.raises(UserError, match="--abstain-below is a probability between 0 and 1, got 1.5"):
        predict.main([str(run), str(photo), "--abstain-below", "1.5"])
    (run / "eval" / calibration.FILE).rename(tmp_path / "aside.json")  # as a run evaluated before calibration
    predict.main([str(run), str(photo), "--json", "--topk", "3"])
    out, note = capsys.readouterr()
    raw = json.loads(out)[0]
    (tmp_path / "aside.json").rename(run / "eval" / calibration.FILE)
    assert calibrated["temperature"] == plain["temperature"] and raw["temperature"] == 1
    assert "not calibrated: eval.py fits a temperature for them" in note
    trained = load_trained(run / "best.pt")  # the logits, as predict.py computes them
    with torch.no_grad():
        pixels = eval_transform(trained.resolution, interpolation=trained.interpolation)(
            read_rgb(FileSplit([(photo, -1)], "photo"), 0)
        )
        logits = trained.model(normalize(pixels)[None])[0].double()
    expected = (logits / plain["temperature"]).softmax(0)[[p["index"] for p in calibrated["predictions"]]]
    assert [p["index"] for p in calibrated["predictions"]] == [p["index"] for p in raw["predictions"]]
    assert [p["probability"] for p in calibrated["predictions"]] == pytest.approx(expected.tolist(), abs=2e-6)
