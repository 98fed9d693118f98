import os
from pathlib import Path

import pytest
import torch
import torchvision

from cars import models
from cars.checkpoint import clean_state_dict, load_checkpoint, read_state_dict, save_checkpoint
from cars.errors import UserError
from cars.finetune import backbone_parameters, head_parameters
from cars.models import build_model, head_name


def place_in_torchvision_cache(arch: str, weights_name: str, seed: int = 123) -> dict:
    """An ImageNet-shaped state dict where torchvision looks before downloading."""
    weights = torchvision.models.get_model_weights(arch)[weights_name]
    torch.manual_seed(seed)
    state = torchvision.models.get_model(arch, weights=None).state_dict()
    folder = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / Path(weights.url).name)
    return state


def test_imagenet_weights_from_torchvision_cache_fill_backbone_and_fresh_head():
    imagenet = place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    model = build_model("resnet18", "IMAGENET1K_V1", num_classes=196)
    own = model.state_dict()
    backbone_keys = [k for k in imagenet if not k.startswith("fc.")]
    assert len(backbone_keys) > 100
    for key in backbone_keys:
        assert torch.equal(own[key], imagenet[key]), key
    assert own["fc.weight"].shape == (196, 512) and own["fc.bias"].shape == (196,)
    assert imagenet["fc.weight"].shape == (1000, 512)


def test_default_weights_name_resolves_through_the_same_cache():
    imagenet = place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")  # DEFAULT is V1 for resnet18
    model = build_model("resnet18", "DEFAULT", num_classes=5)
    assert torch.equal(model.conv1.weight, imagenet["conv1.weight"])


def test_efficientnet_head_is_the_last_linear():
    model = build_model("efficientnet_b0", "none", num_classes=196, dropout=0.3)
    assert head_name(model) == "classifier.1"
    assert model.classifier[1].out_features == 196
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 196)


def test_head_and_backbone_parameters_partition_the_model():
    model = build_model("resnet18", "none", num_classes=7)
    head, backbone = head_parameters(model), backbone_parameters(model)
    assert [p.shape for p in head] == [(7, 512), (7,)]
    assert len(head) + len(backbone) == len(list(model.parameters()))


def test_dropout_keeps_the_plain_keys_so_checkpoints_load_either_way():
    with_dropout = build_model("resnet18", "none", num_classes=7, dropout=0.5)
    plain = build_model("resnet18", "none", num_classes=7)
    plain.load_state_dict(with_dropout.state_dict())
    assert "fc.weight" in with_dropout.state_dict()


def test_weights_file_with_imagenet_head_loads_backbone(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18()
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "imagenet.pth")
    model = build_model("resnet18", str(tmp_path / "imagenet.pth"), num_classes=3)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.out_features == 3


def test_weights_file_for_another_arch_is_one_clear_line(tmp_path, monkeypatch):
    """Named after building the architectures named most like the one asked for, not all 63 torchvision has."""
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    models.backbone_shapes.cache_clear()  # built afresh here, and counted
    built, get_model = [], torchvision.models.get_model
    monkeypatch.setattr(torchvision.models, "get_model", lambda arch, **kw: built.append(arch) or get_model(arch, **kw))
    with pytest.raises(UserError, match=r"holds a resnet18 model, not resnet34; pass --arch resnet18"):
        build_model("resnet34", str(tmp_path / "r18.pth"), num_classes=3)
    # the model asked for, then the guesses, the closest names first: resnet34 (on the meta device), then resnet18
    assert built[0] == "resnet34" and "resnet18" in built[:4] and len(built) <= 4, built


def test_unknown_arch_and_weights_names():
    with pytest.raises(UserError, match="unknown architecture 'resnet5'.*did you mean"):
        build_model("resnet5", "none", 3)
    with pytest.raises(UserError, match="resnet50 has no weights named 'IMAGENET1K_V3'.*IMAGENET1K_V2"):
        build_model("resnet50", "IMAGENET1K_V3", 3)


def test_missing_imagenet_weights_offline_say_where_to_put_them():
    with pytest.raises(UserError, match=r"put resnet34-b627a593.pth into \$TORCH_HOME/hub/checkpoints/"):
        build_model("resnet34", "IMAGENET1K_V1", 3)


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module."])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, prefix):
    torch.manual_seed(1)
    model = build_model("resnet18", "none", num_classes=5).eval()
    state = {prefix + k: v for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "best.pt", {"model": state, "class_names": list("abcde"), "epoch": 3})
    fresh = build_model("resnet18", "none", num_classes=5).eval()
    fresh.load_state_dict(read_state_dict(tmp_path / "best.pt"))
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(model(x), fresh(x))


def test_clean_state_dict_strips_every_wrapper_prefix():
    cleaned = clean_state_dict({"_orig_mod.module.fc.weight": 1, "module.conv1.weight": 2, "layer1.0.bn1.bias": 3})
    assert list(cleaned) == ["fc.weight", "conv1.weight", "layer1.0.bn1.bias"]


def test_checkpoint_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_damaged_checkpoint_is_one_clear_line(tmp_path):
    model = build_model("resnet18", "none", num_classes=5)
    save_checkpoint(tmp_path / "ok.pt", {"model": model.state_dict()})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read checkpoint .*cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_a_frozen_backbone_keeps_its_norm_statistics_and_the_head_trains_as_usual(arch):
    """Only the backbone's normalisation statistics stop: every dropout, the head's included, stays
    in training mode, so a frozen epoch trains the head exactly as an unfrozen one would."""
    from cars.config import Config
    from cars.methods import set_trainable

    cfg = Config()
    model = build_model(arch, "none", num_classes=5, dropout=0.5).train()
    set_trainable(cfg, model, backbone_frozen=True)
    head = model.get_submodule(head_name(model))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert norms and not any(m.training for m in norms)
    assert head.training and head.dropout.training and all(m.training for m in dropouts)
    assert all(not p.requires_grad for p in backbone_parameters(model)) and all(
        p.requires_grad for p in head_parameters(model)
    )

    features = torch.ones(8, head.in_features)
    assert not torch.equal(head(features), head(features)), "the head's dropout draws a new mask each step"
    statistics = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(4, 3, 64, 64))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in statistics.items())

    set_trainable(cfg, model.train())
    assert all(m.training for m in norms) and all(p.requires_grad for p in model.parameters())
