"""Do the probabilities mean what they say: one temperature fitted on held-out images (Guo et al. 2017), and the
scores of a network's probabilities before and after it: the expected calibration error (15 equal-width bins of the
top label's confidence, torchmetrics' MulticlassCalibrationError), the negative log-likelihood and the Brier score."""

import json

import numpy as np
import torch

from cars.errors import UserError
from cars.runs import eval_folders
from cars.transfer import host

BINS = 15  # Guo et al.'s bins of the confidence
FILE = "calibration.json"  # in an eval folder: the temperature predict.py and the page use, and the scores

# The sums below run in NumPy's float64 on the host: exact enough for a fit to 1e-6, and no float64 tensor is made
# (a Mac's MPS device has none; tests/test_device_dtypes.py refuses them).


def on_host(logits: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels as NumPy arrays of float64 and int64 (transfer.host's cast)."""
    return host(logits), labels.detach().cpu().numpy().astype(np.int64)


def log_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    from scipy.special import log_softmax

    return log_softmax(logits / temperature, axis=1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the negative log-likelihood of softmax(logits / T) on these images: the one number
    temperature scaling learns (a bounded search over log T, scipy's). Logits k times larger get a temperature k
    times larger, the same calibrated probabilities (the loss depends on logits / T only)."""
    from scipy.optimize import minimize_scalar

    z, y = on_host(logits, labels)
    rows = np.arange(len(y))
    found = minimize_scalar(
        lambda log_t: -log_probabilities(z, np.exp(log_t))[rows, y].mean(),
        bounds=(-10.0, 10.0),
        method="bounded",
        options={"xatol": 1e-10},
    )
    return float(np.exp(found.x))


def scores(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> dict:
    """ECE (in %, top label, BINS equal-width bins, torchmetrics'), NLL and Brier score (the squared distance of the
    probabilities to the one-hot label, summed over classes, averaged over images) of softmax(logits / temperature)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    z, y = on_host(logits, labels)
    log_p = log_probabilities(z, temperature)
    probabilities = np.exp(log_p)
    ece = multiclass_calibration_error(
        torch.from_numpy(probabilities.astype(np.float32)), labels.long().cpu(), z.shape[1], n_bins=BINS, norm="l1"
    )
    one_hot = np.eye(z.shape[1])[y]
    return {
        "ece": 100 * float(ece),
        "nll": float(-log_p[np.arange(len(y)), y].mean()),
        "brier": float(((probabilities - one_hot) ** 2).sum(1).mean()),
    }


def confidences(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Each image's top probability at the temperature, and whether its top class is right."""
    z, y = on_host(logits, labels)
    log_p = log_probabilities(z, temperature)
    return np.exp(log_p.max(1)), log_p.argmax(1) == y


def reliability(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> list[dict]:
    """The reliability diagram's bins: per equal-width bin of the top confidence, its images, mean confidence and
    accuracy (bins without an image are left out)."""
    confidence, correct = confidences(logits, labels, temperature)
    which = np.clip(np.ceil(confidence * BINS).astype(int) - 1, 0, BINS - 1)
    return [
        dict(
            low=b / BINS,
            high=(b + 1) / BINS,
            images=int((which == b).sum()),
            confidence=float(confidence[which == b].mean()),
            accuracy=float(correct[which == b].mean()),
        )
        for b in range(BINS)
        if (which == b).any()
    ]


def risk_coverage(score, correct) -> tuple[np.ndarray, np.ndarray, float]:
    """Answering only the images a score is most sure of: for k = 1..n, the share of images answered (coverage k/n)
    and the error among the k with the highest score (the risk); and the area under that curve (AURC, the mean risk
    over every k: lower is better, the error rate itself for a score that knows nothing)."""
    score, correct = np.asarray(score, dtype=np.float64), np.asarray(correct, dtype=bool)
    order = np.argsort(-score, kind="stable")
    answered = np.arange(1, len(order) + 1)
    risk = np.cumsum(~correct[order]) / answered
    return answered / len(order), risk, float(risk.mean())


def at_threshold(saved: dict, threshold: float) -> tuple[float, float | None]:
    """From calibration.json's measured images: the share whose calibrated confidence is at least `threshold`, and
    the accuracy on them (None when none is)."""
    confidence = np.asarray(saved["abstention"]["confidence"], dtype=np.float64)
    correct = np.asarray(saved["abstention"]["correct"], dtype=np.float64)
    kept = confidence >= threshold
    return float(kept.mean()), (float(correct[kept].mean()) if kept.any() else None)


def abstention_words(probability: float, threshold: float, measured: dict | None) -> str:
    """Why the model abstains, and what eval.py measured of answering only at or above the threshold."""
    words = f"abstains: the top class's probability {probability:.2f} is below {threshold:g}"
    if not measured:
        return words + " (eval.py has not measured how accurate the answers above it are)"
    coverage, accuracy = at_threshold(measured, threshold)
    if accuracy is None:
        return words + "; eval.py found no test image that sure"
    return (
        f"{words}; eval.py measured {100 * accuracy:.1f} % accuracy on the {100 * coverage:.0f} % of test images at or "
        "above it"
    )


def saved_for(trained) -> tuple[dict | None, str]:
    """What eval.py measured of these very weights' probabilities (calibration.json in the eval folder of their
    checkpoint: the temperature, the scores, the abstention curve), or None; and a line that says which."""
    if trained.backend != "pytorch":
        return None, "probabilities as the network gives them (an ONNX Runtime model carries no temperature)"
    found = [folder / FILE for folder in eval_folders(trained.path) if (folder / FILE).is_file()]
    for path in found:
        try:
            saved = json.loads(path.read_text())
            weights, temperature = saved["weights"], float(saved["temperature"])
            at_threshold(saved, 0.5)  # its abstention curve reads
        except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError) as error:
            raise UserError(f"{path} is damaged ({type(error).__name__}); run eval.py on the run again") from None
        if weights == trained.weights_fingerprint:
            return saved, f"probabilities calibrated by eval.py's temperature {temperature:.2f} ({path})"
    if found:
        return None, (
            f"probabilities not calibrated: {found[0]} was fitted on other weights than {trained.path.name} holds now; "
            f"run eval.py on {trained.path} again"
        )
    return None, "probabilities as the network gives them, not calibrated: eval.py fits a temperature for them"
