"""Transfer learning offline: the demo's source task, the demo-pretrained weights, and what they do to a fine-tune."""

import dataclasses
import tomllib
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import SOURCE_KINDS, TINY_SOURCE_RECIPE, write_kinds

import train
from cars import demo
from cars.checkpoint import read_state_dict
from cars.config import Config
from cars.data import load_splits
from cars.errors import UserError
from cars.models import build_model, head_name, resolve_weights
from cars.report import read_metrics

ARCH = "shufflenet_v2_x0_5"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def recipe(path: Path) -> dict:
    return vars(Config(**tomllib.loads(path.read_text())).validate())


def test_the_demo_lesson_pairs_differ_in_their_one_knob():
    lessons = {path.stem: recipe(path) for path in (CONFIGS / "lessons" / "demo").glob("*.toml")}
    demo_recipe, scratch_recipe = recipe(CONFIGS / "demo.toml"), recipe(CONFIGS / "demo_scratch.toml")
    assert lessons["0a_pretrained"] == lessons["1a_lr_right"] == lessons["2a_one_stage"] == demo_recipe
    assert lessons["0b_scratch"] == scratch_recipe

    def differences(a, b):
        return {k: (lessons[a][k], lessons[b][k]) for k in lessons[a] if lessons[a][k] != lessons[b][k]}

    assert differences("0a_pretrained", "0b_scratch") == {"weights": ("demo-pretrained", "none")}
    assert differences("1a_lr_right", "1b_lr_backbone_div100") == {"backbone_lr_mult": (1.0, 0.01)}
    assert differences("2a_one_stage", "2b_frozen_then_lower_backbone_lr") == {
        "freeze_epochs": (0, 5),
        "backbone_lr_mult": (1.0, 0.1),
    }
    assert differences("4b_batch16_lr_unscaled", "4c_batch16_lr_scaled") == {"lr_scaling": ("none", "linear")}
    assert differences("4a_batch128_lr0.1", "4b_batch16_lr_unscaled") == {"batch_size": (128, 16)}
    assert lessons["4a_batch128_lr0.1"]["lr"] == 0.1 and lessons["4a_batch128_lr0.1"]["optimizer"] == "sgd"


def test_the_source_task_draws_other_things_than_the_cars_and_is_reproducible():
    names = demo.SOURCE_CLASS_NAMES
    assert len(names) == len(set(names)) == 40 and not set(names) & set(demo.CLASS_NAMES)
    assert not set(demo.SOURCE_COLOURS) & set(demo.PAINTS), "no source class wears a car's paint"
    first, labels = demo.make_split(names[:3], demo.draw_source_class, 2, seed=11)
    again, _ = demo.make_split(names[:3], demo.draw_source_class, 2, seed=11)
    other, _ = demo.make_split(names[:3], demo.draw_source_class, 2, seed=12)
    assert labels == [0, 1, 2, 0, 1, 2]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, again, strict=True)), (
        "the same seed draws the same images"
    )
    assert any(a.tobytes() != b.tobytes() for a, b in zip(first, other, strict=True))


def test_demo_source_is_a_dataset_like_the_demo():
    splits = load_splits("demo-source")
    assert splits.class_names == demo.SOURCE_CLASS_NAMES
    assert (len(splits.train), len(splits.eval)) == (40 * 50, 40 * 10)
    assert demo.source_root().name == f"demo-source-{demo.SOURCE_VERSION}"


def test_demo_pretrained_is_a_torchvision_state_dict_with_its_own_head(demo_pretrained):
    state = read_state_dict(demo_pretrained)
    reference = torchvision.models.get_model(ARCH).state_dict()
    assert set(state) == set(reference), "the keys of torchvision's own model: any code that loads those loads it"
    head = head_name(torchvision.models.get_model(ARCH))
    assert state[f"{head}.weight"].shape == (len(SOURCE_KINDS), reference[f"{head}.weight"].shape[1])
    assert resolve_weights(ARCH, "demo-pretrained") == demo_pretrained


def test_demo_pretrained_is_made_once_and_never_by_torchrun(demo_pretrained, monkeypatch):
    made = demo_pretrained.stat().st_mtime_ns
    train.pretrain_on_demo_source(Config(arch=ARCH))  # already there: nothing is trained or written
    assert demo_pretrained.stat().st_mtime_ns == made
    with pytest.raises(UserError, match="the demo-pretrained weights for resnet18 are not made yet.*train.py"):
        resolve_weights("resnet18", "demo-pretrained")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="once without torchrun"):
        train.pretrain_on_demo_source(Config(arch="resnet18"))
    assert not demo.demo_pretraining_run("resnet18").exists()


def test_the_demo_pretrained_file_is_named_after_every_value_of_its_recipe(tmp_path, monkeypatch):
    recipe = tmp_path / "demo_source.toml"
    recipe.write_text(demo.SOURCE_RECIPE.read_text())
    monkeypatch.setattr(demo, "SOURCE_RECIPE", recipe)
    first = demo.demo_pretrained_path(ARCH)
    recipe.write_text("# a comment changes no value\n" + recipe.read_text())
    assert demo.demo_pretrained_path(ARCH) == first
    # nor does a knob the project adds later, at a default that changes nothing
    from cars import config as config_module

    @dataclasses.dataclass
    class Later(config_module.Config):
        a_knob_added_later: float = config_module.knob("method", 0.0, "a new method's strength")

    with monkeypatch.context() as patch:
        patch.setattr(config_module, "Config", Later)
        assert demo.demo_pretrained_path(ARCH) == first
    recipe.write_text(recipe.read_text().replace("epochs = 16", "epochs = 17"))
    assert demo.demo_pretrained_path(ARCH) != first, "an edited recipe never finds the old weights"
    assert demo.demo_pretrained_path("resnet18").name.startswith("resnet18-")


def test_an_interrupted_pretraining_goes_on_and_becomes_the_weights(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the demo's pretraining: the advice is the interrupted command, and running it again resumes the
    pretraining (not from scratch) and then writes the weights file."""
    monkeypatch.setenv("CARS_CACHE", str(tmp_path / "cache"))
    data = write_kinds(
        tmp_path / "source", SOURCE_KINDS[:2], per_class=(8, 4), seed=3, paints=list(demo.PAINTS.values())
    )
    recipe = tmp_path / "tiny_source.toml"
    recipe.write_text(TINY_SOURCE_RECIPE.format(data=data, epochs=3))
    monkeypatch.setattr(demo, "SOURCE_RECIPE", recipe)
    original, epochs = train.train_epoch, []

    def interrupted_in_epoch_2(run, epoch):
        epochs.append(epoch)
        if epoch == 2 and epochs.count(2) == 1:
            raise KeyboardInterrupt
        return original(run, epoch)

    monkeypatch.setattr(train, "train_epoch", interrupted_in_epoch_2)
    fine_tune = Config(arch=ARCH, workers=0, cache="off")  # the pretraining runs on the fine-tune's settings
    with pytest.raises(SystemExit) as stopped:
        train.pretrain_on_demo_source(fine_tune)
    assert stopped.value.code == 130 and not demo.demo_pretrained_path(ARCH).exists()
    assert "run the interrupted command again" in capsys.readouterr().out
    train.pretrain_on_demo_source(fine_tune)
    assert "going on with the interrupted pretraining" in capsys.readouterr().out
    assert epochs == [1, 2, 2, 3], "epoch 1 was not trained again"
    assert demo.demo_pretrained_path(ARCH).is_file()
    assert tomllib.loads((demo.demo_pretraining_run(ARCH) / "config.toml").read_text())["cache"] == "off"
    # a damaged file is named as the project's own, with the remedy (never "pass --arch")
    demo.demo_pretrained_path(ARCH).write_bytes(b"half a file")
    with pytest.raises(UserError, match="this project's own demo-pretrained weights file .* delete it, and the next"):
        build_model(ARCH, "demo-pretrained", 3)


def test_an_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("CARS_CACHE", str(tmp_path / "file" / "cache"))  # not writable, even by root
    with pytest.raises(UserError, match="cannot write the demo-pretrained weights into .*set CARS_CACHE"):
        train.pretrain_on_demo_source(Config(arch=ARCH, workers=0))
    with pytest.raises(UserError, match="cannot write the demo dataset into .*set CARS_CACHE"):
        load_splits("demo")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A few-shot target: three of the four kinds the test's source task taught, but in the cars' paints (red, blue),
    which no source image wears; 3 training images per class. So the count of classes differs from the source's."""
    root = tmp_path_factory.mktemp("target")
    return write_kinds(root / "data", SOURCE_KINDS[:3], per_class=(3, 20), seed=7, paints=list(demo.PAINTS.values()))


def test_the_backbone_starts_as_the_file_and_the_head_is_fresh(demo_pretrained, target, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--data", str(target), "--arch", ARCH, "--weights", "demo-pretrained", "--resolution", "48"]
    run = train.setup(train.parse_train([*args, "--workers", "0", "--run-dir", str(run_dir)]), command=["train.py"])
    run.board.close()
    pretrained, started = read_state_dict(demo_pretrained), run.raw_model.state_dict()
    head = head_name(run.raw_model) + "."
    backbone = [k for k in started if not k.startswith(head)]
    assert backbone and all(torch.equal(started[k], pretrained[k]) for k in backbone)
    assert started[head + "weight"].shape[0] == 3 and pretrained[head + "weight"].shape[0] == len(SOURCE_KINDS)
    # the record says where the start came from, and never that it was ImageNet
    log = (run_dir / "train.log").read_text()
    assert f"{ARCH} (demo-pretrained weights)" in log and "imagenet" not in log.lower()
    assert 'weights = "demo-pretrained"' in (run_dir / "config.toml").read_text()


def test_the_pretrained_start_beats_a_random_one(demo_pretrained, target, tmp_path):
    """Built so that it must: the source task taught buses, tractors and bicycles from 40 images each; the target
    shows 3 of each, in colours the source never had, to a backbone frozen for 9 of the 10 epochs (only the new head
    trains). A random backbone gives the head nothing to tell the shapes apart by; the pretrained one was trained to
    tell them apart."""
    recipe = "--arch shufflenet_v2_x0_5 --resolution 48 --batch-size 3 --epochs 10 --freeze-epochs 9 --lr 0.003 "
    recipe += "--optimizer adamw --workers 0"
    frozen_end = {}
    for start, weights in (("pretrained", str(demo_pretrained)), ("random", "none")):
        run_dir = tmp_path / start
        train.main(["--data", str(target), "--weights", weights, *recipe.split(), "--run-dir", str(run_dir)])
        # the last epoch of the frozen stage: a linear classifier on what the start brings (the unfrozen last epoch
        # then moves BatchNorm statistics on batches of 3, which says nothing about the start)
        frozen_end[start] = read_metrics(run_dir / "metrics.csv")[8]["eval_acc"]
    assert frozen_end["pretrained"] >= frozen_end["random"] + 25, frozen_end
