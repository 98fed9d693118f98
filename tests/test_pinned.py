"""The first training batch of a tiny run, pinned. A silent change in the cache, the crop or the augmentation path
shows here, where an accuracy threshold would not see it. The reference was recorded on 2026-12-02 by the code
before the training recipe moved into train.py (commit 7a609cd): the move changed none of it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run

import train
from cars.loaders import start_epoch

REFERENCE_PIXELS = Path(__file__).parent / "data" / "first_batch_pixels.npy"  # uint8, 6 x 3 x 32 x 32
FIRST_BATCH = {
    "indices": [13, 10, 14, 11, 7, 6],
    "labels": [1, 1, 2, 2, 1, 0],
    # (left, top, right, bottom) as fractions of each image, float32
    "boxes": [
        [0.07407407462596893, 0.0, 0.5, 0.8518518805503845],
        [0.3333333432674408, 0.08695652335882187, 0.6904761791229248, 0.8260869383811951],
        [0.23404255509376526, 0.10810811072587967, 0.957446813583374, 0.9729729890823364],
        [0.3392857015132904, 0.024390242993831635, 0.9464285969734192, 0.9756097793579102],
        [0.38461539149284363, 0.20000000298023224, 0.7884615659713745, 0.6571428775787354],
        [0.0810810774564743, 0.06060606241226196, 0.7837837934494019, 0.6969696879386902],
    ],
    "flips": [True, False, False, True, True, False],
    "loss": 1.3084443807601929,  # the first step's, before any update
}


def test_the_first_batch_of_seed_0_is_pinned(tmp_path, hub_folder):
    run = tiny_run(hub_folder, tmp_path / "run")
    assert run.cfg.seed == 0
    batches = run.train_batches
    start_epoch(batches, epoch=1, seed=0)
    indices = next(iter(batches.batch_sampler))
    boxes, flips = batches.dataset.crops(indices)
    assert list(indices) == FIRST_BATCH["indices"]
    assert boxes.tolist() == FIRST_BATCH["boxes"] and flips.tolist() == FIRST_BATCH["flips"]

    start_epoch(batches, epoch=1, seed=0)  # what train_epoch does, then its first batch
    images, labels = next(iter(batches))
    assert labels.tolist() == FIRST_BATCH["labels"]
    reference = torch.from_numpy(np.load(REFERENCE_PIXELS))
    assert images.dtype == torch.uint8 and images.shape == reference.shape
    # resampling kernels may round differently on other CPUs: one level at most
    assert (images.int() - reference.int()).abs().max().item() <= 1

    run.model.train()
    loss, _, _, _ = train.train_step(
        run.model, (images, labels), run.optimizer, run.scaler, run.device, objective=run.objective, step=0
    )
    assert loss.item() == pytest.approx(FIRST_BATCH["loss"], rel=1e-3)
