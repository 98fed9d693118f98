"""Is an input like the training data? A photo of a motorcycle still gets some car's name, often with high
confidence: the softmax must sum to one over the classes the model knows. This module gives every input a score of
how unlike the training images its features are, and a threshold calibrated on the run's own held-out images.

The score is the Mahalanobis distance of the features the head reads to the nearest class mean, with one covariance
shared by the classes (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples"),
shrunk towards a scaled identity by Ledoit-Wolf so that it inverts with few images a class. eval.py fits it and
writes familiarity.safetensors into its folder; predict.py and app.py read it from the run's eval folder.
"""

from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from cars.errors import UserError
from cars.files import atomic_write
from cars.models import kept_head_inputs
from cars.runs import eval_folders

FALSE_ALARMS = 0.05  # the share of held-out images (like the training data) that may be flagged
FILE = "familiarity.safetensors"


class Familiarity:
    """Class means and the shared precision matrix of the training features, and the threshold above which a score
    means "unlike the training data". `weights` is the fingerprint of the network whose features these are."""

    def __init__(
        self,
        means: torch.Tensor,
        precision: torch.Tensor,
        threshold: float = float("inf"),
        *,
        centre: torch.Tensor | None = None,
        weights: str | None = None,
    ):
        self.means, self.precision, self.threshold = means.float(), precision.float(), float(threshold)
        # the training features' mean, taken off every feature before the distance: x'Px - 2x'Pm + m'Pm of large,
        # uncentred features loses the distance's digits to cancellation in float32
        self.centre = torch.zeros(means.shape[1]) if centre is None else centre.float()
        self.weights = weights

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, *, weights: str | None = None) -> "Familiarity":
        from sklearn.covariance import LedoitWolf

        classes = sorted(set(labels.tolist()))
        centre = features.float().mean(0)
        features = features.float() - centre
        means = torch.zeros(int(max(classes)) + 1, features.shape[1])
        for c in classes:
            means[c] = features[labels == c].mean(0)
        centred = (features - means[labels]).numpy().astype(np.float64)  # float64 in NumPy only: MPS has none
        precision = LedoitWolf(assume_centered=True).fit(centred).get_precision().astype(np.float32)
        precision = torch.from_numpy(precision)
        present = torch.zeros(len(means), dtype=torch.bool)
        present[classes] = True
        return cls(means[present], precision, centre=centre, weights=weights)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """The squared Mahalanobis distance of each row to the nearest class mean."""
        x = features.float() - self.centre
        projected = x @ self.precision
        own = (projected * x).sum(1, keepdim=True)
        cross = projected @ self.means.T
        means = ((self.means @ self.precision) * self.means).sum(1)
        return (own - 2 * cross + means).min(1).values

    def calibrate(self, held_out: torch.Tensor) -> dict:
        """The threshold from half of the held-out images' scores (every other one), and the share of the other half
        that it flags: the false-alarm rate measured on images the threshold was not chosen on."""
        scores = self.scores(held_out)
        chosen_on, measured_on = scores[0::2], scores[1::2]
        self.threshold = float(np.quantile(chosen_on.numpy(), 1 - FALSE_ALARMS))
        return {
            "threshold": self.threshold,
            "target_false_alarms": FALSE_ALARMS,
            "false_alarms": float((measured_on > self.threshold).float().mean()) if len(measured_on) else None,
            "calibration_images": len(chosen_on),
            "measured_images": len(measured_on),
        }

    def save(self, path: Path) -> None:
        """Atomically: a kill part way leaves no half-written check for predict.py to read."""
        tensors = {
            "means": self.means,
            "precision": self.precision,
            "threshold": torch.tensor(self.threshold),
            "centre": self.centre,
        }
        metadata = {"weights": self.weights} if self.weights else None
        atomic_write(path, lambda file: file.write(safetensors.torch.save(tensors, metadata=metadata)))

    @classmethod
    def load(cls, path: Path) -> "Familiarity":
        try:
            with safetensors.safe_open(str(path), "pt") as file:
                saved = {key: file.get_tensor(key) for key in file.keys()}
                weights = (file.metadata() or {}).get("weights")
            means, precision, threshold = saved["means"], saved["precision"], float(saved["threshold"])
            return cls(means, precision, threshold, centre=saved.get("centre"), weights=weights)
        except Exception as error:  # safetensors' own errors, a missing tensor: the file is not eval.py's check
            raise UserError(
                f"{path} is damaged ({type(error).__name__}); run eval.py on the run again to make it anew"
            ) from None


def verdict(familiarity: "Familiarity | None", features: torch.Tensor) -> dict:
    """{"unfamiliar": bool, "familiarity_score": float} for one image's features, or unfamiliar None without a
    calibration."""
    if familiarity is None:
        return {"unfamiliar": None, "familiarity_score": None}
    score = float(familiarity.scores(features[None])[0])
    return {"unfamiliar": score > familiarity.threshold, "familiarity_score": round(score, 4)}


def load_for(trained) -> tuple[Familiarity | None, str]:
    """The check eval.py fitted on these very weights (in the eval folder of their checkpoint: <run>/eval or
    <run>/eval-<checkpoint>), and '' ; or None and why there is none, in a line ('' when eval.py has not run)."""
    if trained.backend != "pytorch":
        return None, ""
    fingerprint = trained.weights_fingerprint
    found = [folder / FILE for folder in eval_folders(trained.path) if (folder / FILE).is_file()]
    for path in found:
        check = Familiarity.load(path)
        if check.weights == fingerprint:
            return check, ""
    if not found:
        return None, ""
    return None, (
        f"no unfamiliar-input check: {found[0]} was fitted on other weights than {trained.path.name} holds now (a "
        f"resume changed them since, or eval.py evaluated another checkpoint); run eval.py on {trained.path} again"
    )


def judged(trained, check: "Familiarity | None", pixels: torch.Tensor, topk: int) -> tuple[list[dict], dict]:
    """trained.classify's top-k for one image, and the verdict on the features of that same forward pass."""
    if check is None:
        return trained.classify(pixels, topk), verdict(None, None)
    with kept_head_inputs(trained.model) as kept:
        predictions = trained.classify(pixels, topk)
    return predictions, verdict(check, kept[0][0])


def in_words(verdict: dict, familiarity: Familiarity) -> str:
    """What predict.py prints and the web page shows for an unfamiliar input."""
    score, threshold = verdict["familiarity_score"], familiarity.threshold
    return (
        f"unlike the training images (familiarity score {score:.1f} > {threshold:.1f}, a threshold that flags "
        f"{100 * FALSE_ALARMS:g} % of test images): the classes above are the nearest of the {len(familiarity.means)} "
        "the model knows, not an answer"
    )
