"""The unfamiliar-input check on features whose answer is known: three Gaussian clusters, a point at a class mean and
one far from every class."""

import pytest
import torch

from cars.errors import UserError
from cars.familiarity import FALSE_ALARMS, Familiarity, verdict


def clusters(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes in 8 dimensions, their means 6 apart along the axes, unit noise."""
    generator = torch.Generator().manual_seed(seed)
    means = 6 * torch.eye(8)[:3]
    labels = torch.arange(3).repeat_interleave(per_class)
    return means[labels] + torch.randn(len(labels), 8, generator=generator), labels


def test_a_point_far_from_every_class_is_flagged_and_one_at_a_class_mean_is_not(tmp_path):
    features, labels = clusters(200, seed=0)
    check = Familiarity.fit(features, labels)
    held_out, _ = clusters(1000, seed=1)
    calibration = check.calibrate(held_out)
    # squared Mahalanobis distance of unit Gaussian noise in 8 dimensions: chi-square with 8 degrees of freedom, whose
    # 95th percentile is 15.5
    assert 13 < calibration["threshold"] < 18 and calibration["calibration_images"] == 1500
    assert abs(calibration["false_alarms"] - FALSE_ALARMS) < 0.025  # measured on the other 1,500
    at_a_mean, far = 6 * torch.eye(8)[1], torch.full((8,), 30.0)
    assert verdict(check, at_a_mean)["unfamiliar"] is False and verdict(check, at_a_mean)["familiarity_score"] < 1
    assert verdict(check, far)["unfamiliar"] is True
    assert verdict(None, far) == {"unfamiliar": None, "familiarity_score": None}  # no calibration: no answer

    check.save(tmp_path / "check.safetensors")
    again = Familiarity.load(tmp_path / "check.safetensors")
    assert again.threshold == check.threshold and torch.equal(again.scores(held_out), check.scores(held_out))


def test_the_score_is_the_distance_to_the_nearest_class_mean():
    features, labels = clusters(50, seed=2)
    check = Familiarity.fit(features, labels)
    points, _ = clusters(5, seed=3)
    means = check.means + check.centre  # kept centred on the training features' mean
    expected = torch.tensor([min(float((x - m) @ check.precision @ (x - m)) for m in means) for x in points])
    assert check.scores(points) == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_a_damaged_check_is_one_line(tmp_path):
    features, labels = clusters(20, seed=4)
    check = Familiarity.fit(features, labels)
    check.save(tmp_path / "check.safetensors")
    (tmp_path / "check.safetensors").write_bytes((tmp_path / "check.safetensors").read_bytes()[:100])  # cut off
    with pytest.raises(UserError, match="check.safetensors is damaged .*run eval.py on the run again"):
        Familiarity.load(tmp_path / "check.safetensors")


def test_features_far_from_the_origin_score_as_near_it():
    """Features with a large common offset (ReLU features are all positive) must score as the same features without
    it: the distance is taken from centred features, not as x'Px - 2x'Pm + m'Pm in float32 (which lost it)."""
    features, labels = clusters(100, seed=5)
    points, _ = clusters(10, seed=6)
    offset = torch.full((8,), 3000.0)
    near, far = Familiarity.fit(features, labels), Familiarity.fit(features + offset, labels)
    assert far.scores(points + offset) == pytest.approx(near.scores(points), rel=1e-3, abs=1e-2)


def test_the_check_belongs_to_the_weights_it_was_fitted_on(tmp_path, capsys):
    """D15: after best.pt changes (a resume), predict.py does not judge the new weights with the old check, nor
    scale their logits with the old temperature: it says so, one line each; eval.py of that very checkpoint file
    writes eval-best/, whose check and temperature predict.py then uses."""
    import json

    from conftest import tiny_args, write_hub_folder
    from PIL import Image
    from test_models import place_in_torchvision_cache

    import eval as eval_tool
    import predict
    import train
    from cars.checkpoint import load_checkpoint, save_checkpoint

    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    data = write_hub_folder(tmp_path / "data")
    run = tmp_path / "run"
    train.main(tiny_args(data, run, "--weights", "IMAGENET1K_V1", "--epochs", "1"))
    quick = ["--num-gradcam", "1", "--workers", "0", "--transfer", "off"]
    eval_tool.main([str(run), *quick])
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(photo)

    def judged(model) -> tuple[dict, str]:
        capsys.readouterr()
        predict.main([str(model), str(photo), "--json"])
        out, err = capsys.readouterr()
        return json.loads(out)[0], err

    calibrated = "note: probabilities calibrated by eval.py's temperature"
    temperature = json.loads((run / "eval" / "calibration.json").read_text())["temperature"]
    answer, note = judged(run)
    assert isinstance(answer["unfamiliar"], bool) and note.startswith(calibrated) and note.count("\n") == 1
    assert answer["temperature"] == temperature != 1

    checkpoint = load_checkpoint(run / "best.pt")  # other weights, as a resume would leave them
    checkpoint["model"]["fc.bias"] += 1.0
    save_checkpoint(run / "best.pt", checkpoint)
    answer, note = judged(run)
    assert answer["unfamiliar"] is None and answer["familiarity_score"] is None and answer["temperature"] == 1
    assert "no unfamiliar-input check: " in note and "probabilities not calibrated: " in note
    assert note.count("fitted on other weights than best.pt holds now") == 2 and note.count("\n") == 2

    eval_tool.main([str(run / "best.pt"), *quick])  # eval of that file: into run/eval-best
    answer, note = judged(run / "best.pt")
    assert isinstance(answer["unfamiliar"], bool) and note.startswith(calibrated) and note.count("\n") == 1
    assert answer["temperature"] == json.loads((run / "eval-best" / "calibration.json").read_text())["temperature"]
