import csv
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import CLASSES, tiny_args, write_hub_folder
from PIL import Image

from cars import data
from cars.data import load_splits, read_rgb, stratified_split
from cars.demo import CLASS_NAMES as DEMO_CLASSES
from cars.errors import UserError


def check_source(location, train_len, test_len, class_names):
    splits = load_splits(str(location))
    assert splits.class_names == class_names
    assert (len(splits.train), len(splits.eval)) == (train_len, test_len)
    assert splits.test is None and splits.eval_name == "test"
    modes = {splits.train.open(i).mode for i in range(len(splits.train))}
    assert "L" in modes, "the fixture has grayscale images; they must reach read_rgb"
    for i in range(len(splits.train)):
        assert read_rgb(splits.train, i).mode == "RGB"
    return splits


def test_hub_layout_folder(hub_folder):
    splits = check_source(hub_folder, 18, 9, CLASSES)
    assert splits.train.labels[:3] == [0, 1, 2]


def test_save_to_disk_folder(saved_folder):
    check_source(saved_folder, 18, 9, CLASSES)


def test_image_folder(image_folder):
    splits = check_source(image_folder, 18, 9, sorted(CLASSES))
    # folder names are the class names; every file's label is its folder's index
    for path, label in zip(splits.train.paths, splits.train.labels, strict=True):
        assert path.split("/")[-2] == sorted(CLASSES)[label]


def test_devkit_folder(devkit_folder):
    splits = check_source(devkit_folder, 18, 9, CLASSES)
    assert splits.train.labels[:3] == [0, 1, 2]  # devkit classes count from 1; ours from 0
    check_source(devkit_folder / "stanford_cars", 18, 9, CLASSES)  # the inner folder works too


def test_demo_is_written_once_in_hub_format():
    first = load_splits("demo")
    assert first.class_names == DEMO_CLASSES and len(DEMO_CLASSES) == 10
    assert (len(first.train), len(first.eval)) == (10 * 24, 10 * 30)  # as few per class as Stanford Cars' smallest
    from cars.demo import demo_root

    files = sorted(p.name for p in (demo_root() / "data").iterdir())
    assert files[-2:] == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    stamp = (demo_root() / "data" / files[-1]).stat().st_mtime
    load_splits("demo")
    assert (demo_root() / "data" / files[-1]).stat().st_mtime == stamp, "the demo must not be regenerated"
    sizes = {first.train.open(i).size for i in range(50)}
    assert len(sizes) > 20, "image sizes vary"
    assert any(first.train.open(i).mode == "L" for i in range(len(first.train)))


def test_hub_id_reads_only_the_train_and_test_files(monkeypatch, hub_folder):
    import datasets

    calls = []
    real = datasets.load_dataset

    def fake_hub(location, data_files):
        calls.append((location, data_files))
        return real(str(hub_folder), data_files=data_files)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    splits = load_splits("tanganke/stanford_cars")
    assert calls == [("tanganke/stanford_cars", {"train": "data/train-*.parquet", "test": "data/test-*.parquet"})]
    assert splits.class_names == CLASSES


def test_hub_id_offline_is_one_clear_line():
    with pytest.raises(UserError, match="could not load the Hugging Face hub dataset nobody/no_such_cars"):
        load_splits("nobody/no_such_cars")


def test_val_split_is_stratified_and_keeps_test(hub_folder):
    splits = load_splits(str(hub_folder), val_split=1 / 3, seed=0)
    assert splits.eval_name == "val" and splits.test is not None and len(splits.test) == 9
    assert (len(splits.train), len(splits.eval)) == (12, 6)
    assert sorted(splits.eval.labels) == [0, 0, 1, 1, 2, 2]
    assert not set(splits.train.indices) & set(splits.eval.indices)


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = [0] * 10 + [1] * 2 + [2] * 30
    keep, held = stratified_split(labels, 0.2, seed=3)
    assert sorted(keep + held) == list(range(42))
    held_labels = [labels[i] for i in held]
    assert (held_labels.count(0), held_labels.count(1), held_labels.count(2)) == (2, 1, 6)


def test_to_rgb_handles_every_mode():
    import numpy as np
    from PIL import Image

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent: becomes the white background
    assert data.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.array([[0, 65535], [1000, 30000]], dtype=np.uint16))
    converted = data.to_rgb(sixteen)
    assert (
        converted.mode == "RGB"
        and converted.getpixel((1, 0)) == (255, 255, 255)
        and converted.getpixel((0, 0)) == (0, 0, 0)
    )
    for mode in ("CMYK", "P", "L", "1", "LA"):
        assert data.to_rgb(Image.new("RGB", (3, 3), (10, 20, 30)).convert(mode)).mode == "RGB"


def sideways_photo(path):
    """A phone photo: its pixels stored turned a quarter (as the sensor saw them) and an EXIF orientation (6) that
    says how to turn them upright. Returns the upright picture, 40 wide and 20 high: red on the left, blue on the
    right."""
    upright_picture = Image.new("RGB", (40, 20), (200, 30, 30))
    upright_picture.paste((30, 30, 200), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright_picture.transpose(Image.Transpose.ROTATE_90).save(path, "PNG", exif=exif)
    return upright_picture


def test_phone_photos_are_read_upright_everywhere(tmp_path):
    from cars.cache import cached_pixels
    from cars.data import FileSplit, read_rgb
    from cars.transforms import keep_for_cache
    from inspect_data import Facts

    expected = sideways_photo(tmp_path / "photo.png")
    assert Image.open(tmp_path / "photo.png").size == (20, 40)  # as stored
    split = FileSplit([(str(tmp_path / "photo.png"), 0)], "train")
    image = read_rgb(split, 0)  # predict.py, the web page, eval's CAMs and --cache off read through here
    assert image.size == (40, 20) and image.tobytes() == expected.tobytes()
    cache = cached_pixels(
        split, "train", size=0, transform=keep_for_cache, root=tmp_path / "cache"
    )  # the training cache
    assert torch.equal(cache.image(0), torch.from_numpy(np.array(expected)))
    import imagehash

    assert Facts(split)[0].phash == str(imagehash.phash(expected, hash_size=16))  # inspect_data's duplicates


def test_a_training_subset_has_exactly_k_per_class_nested_and_drawn_after_the_validation_split(tmp_path):
    data = str(write_hub_folder(tmp_path / "hub", per_class=(10, 2)))
    full = load_splits(data, 0.2, 3)
    val = set(full.eval.indices)

    def subset(k, seed=0, fraction=1.0):
        return load_splits(data, 0.2, 3, per_class=k, fraction=fraction, subset_seed=seed).train

    for k in (1, 2, 4, 8):
        chosen = subset(k)
        assert Counter(chosen.labels) == {0: k, 1: k, 2: k}
        assert not set(chosen.indices) & val  # drawn from what the validation split left
        assert chosen.indices == subset(k).indices  # the same draw every time
        if k > 1:
            assert set(subset(k // 2).indices) < set(chosen.indices)  # nested
    assert subset(4, seed=1).indices != subset(4).indices
    half = subset(0, fraction=0.5)
    assert Counter(half.labels) == {0: 4, 1: 4, 2: 4} and set(subset(2).indices) < set(half.indices)
    with pytest.raises(UserError, match="--train-per-class 9: class 'AM General Hummer SUV 2000' has only 8 training"):
        subset(9)


def test_train_py_records_its_subset_and_eval_names_it(tmp_path, hub_folder):
    import eval as eval_tool
    import train

    run_dir = tmp_path / "run"
    train.main(tiny_args(hub_folder, run_dir, "--epochs", "1", "--train-per-class", "2", "--subset-seed", "5"))
    with open(run_dir / "subset.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    expected = load_splits(str(hub_folder), per_class=2, subset_seed=5).train
    assert [int(r["index"]) for r in rows] == expected.indices and [int(r["label"]) for r in rows] == expected.labels
    assert "training on a subset: 2 training images per class (subset seed 5)" in (run_dir / "train.log").read_text()
    eval_tool.main([str(run_dir), "--num-gradcam", "1", "--workers", "0"])
    assert "on 2 training images per class only (subset.csv)" in (run_dir / "eval" / "report.md").read_text()
    with pytest.raises(UserError, match="--train-per-class and --train-fraction both choose"):
        train.main(tiny_args(hub_folder, tmp_path / "r2", "--train-per-class", "2", "--train-fraction", "0.5"))
