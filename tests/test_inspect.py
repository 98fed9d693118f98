"""inspect_data.py on a dataset whose answers are known: planted duplicates, a broken file, odd modes."""

import csv
import io
import json

import numpy as np
import pytest
from conftest import CLASSES, write_hub_folder
from PIL import Image

import inspect_data
from cars.errors import UserError


def picture(seed: int, size=(120, 90)) -> Image.Image:
    """A photo stand-in, different for every seed: a background, a few shapes, fine texture."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(40, 220, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.uniform(0, size[0]), rng.uniform(0, size[1])
        box = [x, y, x + rng.uniform(10, size[0] / 2), y + rng.uniform(10, size[1] / 2)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
            box, fill=tuple(int(c) for c in rng.integers(0, 256, 3))
        )
    texture = rng.normal(0, 6, (size[1], size[0], 1))
    return Image.fromarray(
        (np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=float) + texture).clip(0, 255).astype(np.uint8)
    )


def encoded(image: Image.Image, format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Train: 5, 4 and 3 images of classes 0, 1, 2 (one grayscale, one palette, one truncated); test: 2 per class.
    Planted: train 5 (class 1) = train 0 (class 0: the same pixels, saved as PNG); test 0 = train 1 (the same bytes);
    test 1 = train 2 resized to 80 % and re-encoded. Everything else is a different picture."""
    train_labels = [0] * 5 + [1] * 4 + [2] * 3
    train = [encoded(picture(seed)) for seed in range(12)]
    train[5] = encoded(Image.open(io.BytesIO(train[0])), "PNG")
    train[3] = encoded(picture(3).convert("L"))
    train[8] = encoded(picture(8).convert("P"), "PNG")
    train[7] = train[7][: len(train[7]) // 3]
    test = [encoded(picture(100 + k)) for k in range(6)]
    test[0] = train[1]
    test[1] = encoded(Image.open(io.BytesIO(train[2])).resize((96, 72), Image.Resampling.BILINEAR), quality=70)
    root = tmp_path_factory.mktemp("inspect")
    data = write_hub_folder(root / "data", rows={"train": (train, train_labels), "test": (test, [0, 0, 1, 1, 2, 2])})
    return data, root


@pytest.fixture(scope="module")
def report(planted):
    data, root = planted
    inspect_data.main(
        [
            "--data",
            str(data),
            "--out",
            str(root / "report"),
            *"--arch resnet34 --weights IMAGENET1K_V1 --resolution 64 --workers 0".split(),
        ]
    )
    return root / "report"


def test_counts_sizes_modes_and_the_broken_file(report):
    data = json.loads((report / "data.json").read_text())
    assert data["counts"] == {
        "train": 12,
        "test": 6,
        "classes": 3,
        "per_class_train": {"min": 3, "median": 4, "mean": 4.0, "max": 5},
    }
    assert (
        data["unreadable"] == [{"split": "train", "index": 7, "error": data["unreadable"][0]["error"]}]
        and data["unreadable"][0]["error"]
    )
    assert data["images"]["modes"] == {"RGB": 15, "L": 1, "P": 1}
    assert data["images"]["formats"] == {"JPEG": 15, "PNG": 2}
    # the re-encoded copy is the smallest
    assert data["images"]["width"]["max"] == 120 and data["images"]["width"]["min"] == 96
    assert data["images"]["smallest"][0] == {"split": "test", "index": 1, "width": 96, "height": 72}
    for picture_file in ("class_counts.png", "sizes.png", "samples.png", "duplicates.png"):
        assert (report / picture_file).read_bytes()[:4] == b"\x89PNG", picture_file


def test_every_planted_duplicate_and_no_other(report):
    with open(report / "duplicates.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    found = {
        (r["split_a"], int(r["index_a"]), r["split_b"], int(r["index_b"])): (int(r["distance"]), r["same_label"])
        for r in rows
    }
    exact = {(r["split_a"], int(r["index_a"]), r["split_b"], int(r["index_b"])): r["exact"] for r in rows}
    assert exact == {
        ("train", 0, "train", 5): "True",
        ("train", 1, "test", 0): "True",
        ("train", 2, "test", 1): "False",
    }
    assert set(found) == {("train", 0, "train", 5), ("train", 1, "test", 0), ("train", 2, "test", 1)}
    assert found[("train", 0, "train", 5)] == (0, "False")  # the same picture under two classes: a labelling mistake
    assert found[("train", 1, "test", 0)] == (0, "True")
    assert 0 < found[("train", 2, "test", 1)][0] <= inspect_data.NEAR and found[("train", 2, "test", 1)][1] == "True"
    data = json.loads((report / "data.json").read_text())
    duplicates = data["duplicates"]
    assert (duplicates["exact"], duplicates["near"], duplicates["train_test"]) == (2, 1, 2)
    # 2 of 6 test images have a copy in train
    assert duplicates["max_inflation_points"] == pytest.approx(100 * 2 / 6, abs=0.01)
    assert (
        "**A train/test leak can inflate test accuracy by at most 33.33 points**" in (report / "report.md").read_text()
    )


def test_the_sanity_check_says_how_to_get_missing_weights(report):
    check = json.loads((report / "data.json").read_text())["imagenet_check"]
    assert "resnet34-b627a593.pth into $TORCH_HOME/hub/checkpoints/" in check["skipped"]
    assert (
        "Skipped: the ResNet34_Weights.IMAGENET1K_V1 weights are not available offline"
        in (report / "report.md").read_text()
    )


def test_the_sanity_check_counts_what_the_imagenet_model_says(planted, tmp_path, monkeypatch):
    from test_models import place_in_torchvision_cache

    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")  # ImageNet-shaped weights, where torchvision looks
    data, _ = planted
    # the training crops are drawn as a preset trains them (the flag's resolution wins over the preset's)
    (tmp_path / "preset.toml").write_text("resolution = 48\ncrop_scale = 0.9\nlr = 0.5\n")
    drawn_with = []
    real = inspect_data.TrainAugmentation
    monkeypatch.setattr(inspect_data, "TrainAugmentation", lambda cfg: drawn_with.append(cfg) or real(cfg))
    inspect_data.main(
        [
            "--data",
            str(data),
            "--out",
            str(tmp_path / "r"),
            "--config",
            str(tmp_path / "preset.toml"),
            *"--arch resnet18 --weights IMAGENET1K_V1 --resolution 64 --workers 0 --check-images 8".split(),
        ]
    )
    assert [(c.crop_scale, c.resolution) for c in drawn_with] == [(0.9, 64)]
    check = json.loads((tmp_path / "r" / "data.json").read_text())["imagenet_check"]
    labels = [p["imagenet"] for p in check["predictions"]]
    assert (
        check["images"] == len(labels) == 8 and sum(check["top1"].values()) == 8 and sum(check["groups"].values()) == 8
    )
    group_of = {name: group for group, names in inspect_data.VEHICLES.items() for name in names}
    vehicles = sum(1 for label in labels if label in group_of)
    assert check["vehicle_share"] == pytest.approx(100 * vehicles / 8)
    assert list(check["largest_classes"]) == CLASSES  # 5, 4 and 3 training images: largest first
    assert f"**{check['vehicle_share']:.1f}%** of them a vehicle" in (tmp_path / "r" / "report.md").read_text()


def test_an_existing_report_is_kept_and_bad_data_is_one_line(planted, report):
    data, root = planted
    before = (report / "data.json").read_bytes()
    with pytest.raises(UserError, match="data report folder .* already exists; pass --overwrite"):
        inspect_data.main(["--data", str(data), "--out", str(report)])
    assert (report / "data.json").read_bytes() == before
    with pytest.raises(UserError, match="dataset folder /no/such does not exist"):
        inspect_data.main(["--data", "/no/such", "--out", str(root / "x")])
    assert not (root / "x").exists()


def test_equal_hashes_with_other_pixels_are_not_called_the_same_pixels(tmp_path):
    """Two pictures one pixel apart share their perceptual hash: a near copy at distance 0, never "same pixels"."""
    from cars.report import duplicate_label
    from inspect_data import ImageFacts, find_duplicates

    facts = [
        ImageFacts("train", 0, 0, phash="ab" * 32),
        ImageFacts("train", 1, 1, phash="ab" * 32),
        ImageFacts("test", 0, 0, phash="ab" * 32),
    ]
    # train 0 is test 0 copied
    pairs = find_duplicates(facts, same_pixels=lambda a, b: (a.index, b.split) == (0, "test"))
    assert [(p["split_b"], p["distance"], p["exact"]) for p in pairs] == [
        ("test", 0, True),
        ("test", 0, False),
        ("train", 0, False),
    ]
    assert [duplicate_label(p["distance"], p["exact"]) for p in pairs] == [
        "same pixels",
        "0 bits apart (other pixels)",
        "0 bits apart (other pixels)",
    ]
    assert duplicate_label(5, False) == "5 bits apart"


def test_no_readable_image_is_one_line_and_no_readable_training_image_skips_the_ranking(tmp_path, capsys):
    garbage = [b"not an image"] * 3
    nothing = write_hub_folder(tmp_path / "nothing", rows={"train": (garbage, [0, 1, 2]), "test": (garbage, [0, 1, 2])})
    with pytest.raises(UserError, match="none of the 6 images of .* can be read"):
        inspect_data.main(["--data", str(nothing), "--out", str(tmp_path / "a"), "--workers", "0"])
    assert not (tmp_path / "a").exists()

    good = [Image.new("RGB", (40, 30), colour) for colour in ("red", "green", "blue")]
    test_only = write_hub_folder(
        tmp_path / "test-only", rows={"train": (garbage, [0, 1, 2]), "test": (good, [0, 1, 2])}
    )
    inspect_data.main(
        ["--data", str(test_only), "--out", str(tmp_path / "b"), "--workers", "0", "--check-images", "0"]
        + ["--rank-models", "resnet18:none"]
    )
    assert "no training image can be read" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "data.json").read_text())["transferability"]["scores"] == []
