"""Adapting without labels on inputs whose answer is known: a shift that is an affine change of the input is undone
exactly by BatchNorm statistics estimated again; Tent trains the BatchNorm scales and shifts and nothing else. eval.py
--adapt: tests/test_eval.py."""

import torch
from torch import nn

from cars import adaptation


def toy_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)
    )


def batches_of(images: torch.Tensor, size: int = 16):
    return [(images[i : i + size], None) for i in range(0, len(images), size)]


def test_statistics_estimated_again_undo_an_affine_shift_of_the_input():
    model = toy_network()
    clean = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    shifted = 3 * clean + 1  # every channel scaled and moved: BatchNorm's first layer can undo it exactly
    model(clean)  # the lazy layer takes its shape
    model.eval()
    kept = model[0].running_mean.clone()
    on_clean = adaptation.adapted(model, batches_of(clean), "bn")
    on_shifted = adaptation.adapted(model, batches_of(shifted), "bn")
    with torch.no_grad():
        assert not torch.allclose(model(shifted), model(clean), atol=0.1)  # the shift hurts the unadapted network
        assert torch.allclose(on_shifted(shifted), on_clean(clean), atol=1e-3)
    assert torch.equal(model[0].running_mean, kept)  # the network itself is left as it was


def test_tent_trains_the_batchnorm_scales_and_shifts_only_and_lowers_the_entropy():
    model = toy_network()
    images = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    model(images)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def entropy(network) -> float:
        with torch.no_grad():
            p = network.train()(images).softmax(1)  # as Tent measures it: on the batch's own statistics
        return float(-(p * p.log()).sum(1).mean())

    tuned = adaptation.adapted(model, batches_of(images, 64) * 20, "tent")
    affine = {f"{i}.{name}" for i in (0, 2) for name in ("weight", "bias")}
    for key, value in tuned.state_dict().items():
        if key in affine:
            assert not torch.equal(value, before[key]), key
        elif "running" not in key and "num_batches" not in key:
            assert torch.equal(value, before[key]), key
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert entropy(tuned) < entropy(adaptation.adapted(model, batches_of(images, 64), "bn"))
