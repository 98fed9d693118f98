"""Starts beyond torchvision: timm and open_clip networks built by their libraries, weights from the Hugging Face
cache offline, the zero-shot and prototypes heads, --epochs 0, and the demo's own CLIP."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cars import finetune, starts
from cars.checkpoint import read_state_dict
from cars.inference import load_trained
from cars.models import build_model
from tests.conftest import ROOT

TIMM_VIT = "timm:test_vit.r160_in1k"  # timm's own 0.3 M-parameter test ViT, made for 160 px


def run_tool(tool: str, *args, env=None, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(ROOT / tool), *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def place_in_hub_cache(hf_home, repo: str, files: dict) -> None:
    """Files where huggingface_hub's hf_hub_download finds them offline: a snapshot of `repo` at one revision."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, write in files.items():
        write(snapshot / name)


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """A timm ViT whose published weights are only in a fresh Hugging Face cache (no network), taken by train.py at
    32 px with a prototypes head and no training; and the weights placed there."""
    import timm
    from safetensors.torch import save_file

    from tests.conftest import write_hub_folder

    root = tmp_path_factory.mktemp("timm")
    torch.manual_seed(1)
    published = timm.create_model(TIMM_VIT.removeprefix("timm:"), pretrained=False).state_dict()
    place_in_hub_cache(
        root / "hf", "timm/test_vit.r160_in1k", {"model.safetensors": lambda path: save_file(published, str(path))}
    )
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1"}
    data = write_hub_folder(root / "data")
    run_dir = root / "run"
    flags = "--weights DEFAULT --resolution 32 --batch-size 6 --workers 0 --head prototypes --epochs 0"
    run_tool("train.py", "--data", data, "--run-dir", run_dir, "--arch", TIMM_VIT, *flags.split(), env=env)
    return run_dir, published, env


def test_a_timm_start_takes_its_published_weights_from_the_hub_cache_offline(timm_run):
    run_dir, published, _ = timm_run
    kept = torch.load(run_dir / "best.pt", weights_only=True)["model"]
    body = {k.removeprefix("body."): v for k, v in kept.items() if k.startswith("body.")}
    # every tensor as published, but the position embeddings: resized by timm from 10 x 10 patches to 2 x 2
    assert body.keys() == {k for k in published if not k.startswith("head.")}
    for key, value in body.items():
        if key != "pos_embed":
            assert torch.equal(value, published[key]), key
    assert published["pos_embed"].shape == (1, 1 + 10 * 10, 64) and body["pos_embed"].shape == (1, 1 + 2 * 2, 64)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainable_parameters"] == 0 and summary["epochs"] == 0
    assert "no image trained on" in (run_dir / "train.log").read_text()


def test_a_timm_vit_run_is_exported_with_parity_and_predicted(timm_run, tmp_path, capsys):
    import export
    import predict

    run_dir = timm_run[0]
    export.main([str(run_dir), "--format", "onnx"])
    assert "top-1 agrees on 100.0%" in capsys.readouterr().out
    # fed as it was trained: with the start's own filter, which the export tells whoever feeds it
    assert load_trained(run_dir).interpolation == "bicubic"
    assert json.loads((run_dir / "export" / "model.json").read_text())["interpolation"] == "bicubic"
    image = tmp_path / "car.png"
    shutil.copyfile(ROOT / "examples" / "car.png", image)
    predict.main([str(run_dir), str(image), "--json", "--topk", "3"])
    assert len(json.loads(capsys.readouterr().out)[0]["predictions"]) == 3


def test_the_lens_reads_a_timm_vit_block_by_block(timm_run, tmp_path, monkeypatch, capsys):
    """eval.py's transfer lens against the run's own start (--start-weights DEFAULT, from the hub cache): no image was
    trained on, so no block moved and every block's features are the start's (CKA 1)."""
    import csv as csv_module

    import huggingface_hub

    import eval as eval_tool

    run_dir, _, env = timm_run
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(Path(env["HF_HOME"]) / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    eval_tool.main([str(run_dir), "--start-weights", "DEFAULT", "--out", str(tmp_path / "eval")])
    with open(tmp_path / "eval" / "transfer" / "weight_change.csv", newline="") as file:
        changes = {row["layer"]: row["relative_change"] for row in csv_module.DictReader(file)}
    assert {f"body.blocks.{i}" for i in range(6)} <= set(changes) and changes.pop("fc") == ""  # the head is new
    assert all(float(change) == 0 for change in changes.values())
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "**No image was trained on** (--epochs 0)" in report and "CKA 1.00" in report


def test_a_vit_s_tokens_become_a_map_for_its_cam():
    from cars.explain import class_activation_maps, target_layer

    model = build_model(TIMM_VIT, "none", 3, resolution=32).eval()
    assert target_layer(model) is model.body.blocks[-1]
    maps = class_activation_maps(model, torch.rand(2, 3, 32, 32), [0, 2])
    assert maps.shape == (2, 32, 32) and (maps >= 0).all() and (maps <= 1).all()


def test_the_renormalisation_feeds_the_library_s_network_its_own_normalisation():
    from cars.transforms import normalize

    model = build_model(TIMM_VIT, "none", 3, resolution=32).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    own = (pixels.float() / 255 - 0.5) / 0.5  # timm's test models: mean and std 0.5
    with torch.no_grad():
        assert torch.allclose(model(normalize(pixels)), model.fc(model.body(own)), atol=1e-5)


def test_the_blocks_of_a_library_start_are_its_network_s():
    from cars import optim
    from cars.config import Config

    model = build_model(TIMM_VIT, "none", 3, resolution=32)
    cfg = Config(arch=TIMM_VIT, layer_decay=0.5, lr=1.0, norm_weight_decay=-1).validate()
    # layer decay over the ViT's blocks one by one: the head, the final norm, six blocks, the patch embedding
    assert sorted({g["lr"] for g in optim.make_optimizer(cfg, model).param_groups}) == [0.5**k for k in range(9)][::-1]
    assert finetune.blocks(model) == [
        "body.patch_embed",
        *(f"body.blocks.{i}" for i in range(6)),
        "body.norm",
        "fc",
    ]
    clip = build_model("open_clip:demo-clip", "none", 3, resolution=64)
    assert [label for label, _ in finetune.stages(clip)][1:] == [f"body.layer{i}" for i in range(1, 5)] + [
        "body.attnpool"
    ]


def test_the_zero_shot_head_is_open_clip_s_own_classifier(tmp_path):
    """A whole CLIP's checkpoint file (random weights) as the start: the head equals open_clip's own zero-shot
    classifier times the logit scale, and the network's logits equal CLIP's own image-text similarities."""
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from cars.transforms import normalize

    torch.manual_seed(0)
    clip = starts.clip_model("open_clip:demo-clip", source=None).eval()
    weights = tmp_path / "clip.pth"
    torch.save(clip.state_dict(), weights)
    names = ["Toy Coupe Red 2012", "Toy Van Blue 2014", "Bus Green"]
    model = build_model("open_clip:demo-clip", str(weights), len(names), resolution=64).eval()
    head = starts.zero_shot_head("open_clip:demo-clip", names, source=weights)
    finetune.set_head(model, head, torch.zeros(len(names)))
    tokenizer = open_clip.get_tokenizer("demo-clip")
    with torch.no_grad():
        reference = build_zero_shot_classifier(clip, tokenizer, names, starts.CARS_TEMPLATES, device="cpu")
        scale = clip.logit_scale.exp()
        assert torch.allclose(head, scale * reference.T, atol=1e-5)
        pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
        openai = (pixels.float() / 255 - torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]) / torch.tensor(
            open_clip.OPENAI_DATASET_STD
        )[:, None, None]
        own = scale * torch.nn.functional.normalize(clip.encode_image(openai), dim=-1) @ reference
        assert torch.allclose(model(normalize(pixels)), own, atol=1e-4)


def test_the_prototypes_head_is_the_nearest_class_mean():
    torch.manual_seed(0)
    features = torch.randn(12, 5)
    labels = torch.tensor([0, 1, 2] * 4)
    weight, bias = finetune.prototype_head(features, labels, 3)
    means = torch.stack([features[labels == c].mean(0) for c in range(3)])
    distances = torch.cdist(features.double(), means.double()) ** 2
    spread = ((features - means[labels]) ** 2).sum(1).mean()
    logits = features @ weight.T + bias
    # -|x - m_c|^2 / (2 s^2), up to a term every class shares (|x|^2 / (2 s^2))
    expected = -distances / (2 * spread) + (features.double() ** 2).sum(1, keepdim=True) / (2 * spread)
    assert torch.allclose(logits.double(), expected, atol=1e-4)
    assert torch.equal(logits.argmax(1), distances.argmin(1))
    one_each = finetune.prototype_head(features[:3], labels[:3], 3)  # one image a class: no spread within a class
    assert torch.isfinite(one_each[0]).all() and torch.equal((features[:3] @ one_each[0].T).argmax(1), labels[:3])


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--arch", "timm:test_vitt"], "timm has no model 'test_vitt'; did you mean"),
        (["--arch", "open_clip:ViT-B-16/nonsense"], "open_clip has no weights 'nonsense' for ViT-B-16"),
        (
            ["--arch", "open_clip:RN50/openai", "--weights", "DEFAULT", "--resolution", "224"],
            "could not get the weights of",
        ),
        (["--arch", "open_clip:demo-clip", "--weights", "IMAGENET1K_V1"], "takes its weights from its name"),
        (["--head", "zero-shot", "--weights", "IMAGENET1K_V1"], "--head zero-shot reads the class names with a text"),
        (["--epochs", "0"], "--epochs 0 trains nothing, and a new head is random"),
        (["--arch", "open_clip:demo-clip", "--resolution", "48"], "takes 64 px images only"),
    ],
)
def test_a_start_that_cannot_be_had_is_one_line(flags, says, hub_folder, tmp_path, monkeypatch):
    import huggingface_hub

    import train
    from cars.errors import UserError
    from tests.conftest import tiny_args

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # whenever the hub was first imported
    with pytest.raises(UserError, match=re.escape(says)):
        train.main(tiny_args(hub_folder, tmp_path / "run", *flags))
    assert not (tmp_path / "run").exists()


def test_the_demo_s_clip_is_made_once_from_captioned_drawings_and_reads_class_names(tmp_path, monkeypatch):
    """The demo CLIP's pretraining, shrunk (2 pictures a combination, 2 epochs): a whole CLIP's state dict in the
    cache, named after its recipe; none of its pictures is a picture of the demo's splits."""
    import random

    from cars import demo, demo_clip

    monkeypatch.setenv("CARS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_clip, "RECIPE", {**demo_clip.RECIPE, "per_combination": 2, "epochs": 2})
    pictures, captions, things = demo_clip.captioned_pictures(random.Random(demo_clip.SEED))
    assert "a photo of a red coupe." in captions or "a red toy coupe." in captions or len(set(captions)) > 50
    drawn = {picture.tobytes() for picture in pictures}
    target = demo.demo_splits(train_per_class=24, test_per_class=30)
    assert not drawn & {image.tobytes() for split in target.values() for image in split[0]}
    demo_clip.ensure_made()
    path = demo_clip.weights_path()
    state = read_state_dict(path)
    assert starts.is_clip_checkpoint(state) and "token_embedding.weight" in state
    modified = path.stat().st_mtime_ns
    demo_clip.ensure_made()  # once
    assert path.stat().st_mtime_ns == modified
    head = starts.zero_shot_head(demo.DEMO_CLIP_ARCH, demo.CLASS_NAMES, source=path)
    assert head.shape == (10, 64) and torch.isfinite(head).all()


def test_rank_models_reads_library_names_with_their_colons(tmp_path):
    from cars.cli import candidates

    assert candidates("resnet18:none,timm:test_vit.r160_in1k,open_clip:demo-clip:demo-pretrained") == [
        ("resnet18", "none"),
        ("timm:test_vit.r160_in1k", "DEFAULT"),
        ("open_clip:demo-clip", "demo-pretrained"),
    ]
    assert candidates("open_clip:ViT-B-16/openai,timm:test_resnet.r160_in1k:none") == [
        ("open_clip:ViT-B-16/openai", "DEFAULT"),
        ("timm:test_resnet.r160_in1k", "none"),
    ]


def test_a_clip_is_ranked_on_its_features_alone():
    """LogME and H-score read features; NCE and LEEP read a source head, which a CLIP has not: left empty."""
    import numpy as np

    from cars import transferability

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    features = rng.normal(size=(30, 8)) + labels[:, None]
    scores = transferability.scores(features, None, labels)
    assert scores["nce"] is None and scores["leep"] is None
    assert np.isfinite(scores["logme"]) and np.isfinite(scores["hscore"])


def test_a_library_start_takes_its_own_size_and_filter_unless_the_preset_or_a_flag_sets_one():
    from cars import config
    from cars.cli import parse_train

    def resolution(*argv):
        return config.resolve(parse_train(list(argv)))[0].resolution

    def interpolation(*argv):
        return config.resolve(parse_train(list(argv)))[0].interpolation

    assert resolution("--arch", TIMM_VIT) == 160  # its pretrained config's input size
    assert resolution("--arch", TIMM_VIT, "--resolution", "32") == 32
    assert resolution("--arch", "open_clip:demo-clip") == 64
    assert resolution("--arch", "resnet18") == 224  # torchvision's: the default, as before
    assert resolution("--config", str(ROOT / "configs" / "demo.toml"), "--arch", TIMM_VIT) == 48  # the preset's
    # the resize filter its weights were trained with: timm's interpolation, an open_clip tag's
    assert interpolation("--arch", TIMM_VIT) == "bicubic"
    assert interpolation("--arch", "timm:resnet18.tv_in1k") == "bilinear"  # torchvision's weights, in timm
    assert interpolation("--arch", TIMM_VIT, "--interpolation", "bilinear") == "bilinear"
    assert interpolation("--arch", "open_clip:RN50/openai") == "bicubic"
    assert interpolation("--arch", "open_clip:demo-clip") == "bilinear"  # pretrained through this project's pipeline
    assert interpolation("--arch", "resnet18") == "bilinear"  # torchvision's: the default, as before
    assert interpolation("--config", str(ROOT / "configs" / "demo.toml"), "--arch", TIMM_VIT) == "bicubic"
