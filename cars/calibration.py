"""Do the probabilities mean what they say: one temperature fitted on held-out images (Guo et al. 2017), and the
scores of a network's probabilities before and after it: the expected calibration error (15 equal-width bins of the
top label's confidence, torchmetrics' MulticlassCalibrationError), the negative log-likelihood and the Brier score."""

import json

import torch
import torch.nn.functional as F

from cars.errors import UserError
from cars.runs import eval_folders

BINS = 15  # Guo et al.'s bins of the confidence
FILE = "calibration.json"  # in an eval folder: the temperature predict.py and the page use, and the scores


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the negative log-likelihood of softmax(logits / T) on these images: the one number
    temperature scaling learns. Logits k times larger get a temperature k times larger, the same calibrated
    probabilities (the loss depends on logits / T only)."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS(
        [log_t], lr=0.5, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(logits / log_t.exp(), labels)
        value.backward()
        return value

    optimizer.step(loss)
    return float(log_t.detach().exp())


def scores(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> dict:
    """ECE (in %, top label, BINS equal-width bins), NLL and Brier score (the squared distance of the probabilities
    to the one-hot label, summed over classes, averaged over images) of softmax(logits / temperature)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probabilities = (logits.double() / temperature).softmax(1)
    labels = labels.long()
    ece = multiclass_calibration_error(probabilities.float(), labels, logits.shape[1], n_bins=BINS, norm="l1")
    brier = ((probabilities - F.one_hot(labels, logits.shape[1]).double()) ** 2).sum(1).mean()
    return {
        "ece": 100 * float(ece),
        "nll": float(F.cross_entropy(logits.double() / temperature, labels)),
        "brier": float(brier),
    }


def reliability(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> list[dict]:
    """The reliability diagram's bins: per equal-width bin of the top confidence, its images, mean confidence and
    accuracy (bins without an image are left out)."""
    probabilities = (logits.double() / temperature).softmax(1)
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).double()
    which = torch.clamp((confidence * BINS).ceil().long() - 1, 0, BINS - 1)
    rows = []
    for b in range(BINS):
        inside = which == b
        if inside.any():
            rows.append(
                dict(
                    low=b / BINS,
                    high=(b + 1) / BINS,
                    images=int(inside.sum()),
                    confidence=float(confidence[inside].mean()),
                    accuracy=float(correct[inside].mean()),
                )
            )
    return rows


def risk_coverage(score: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Answering only the images a score is most sure of: for k = 1..n, the share of images answered (coverage k/n)
    and the error among the k with the highest score (the risk); and the area under that curve (AURC, the mean risk
    over every k: lower is better, the error rate itself for a score that knows nothing)."""
    order = torch.argsort(score.double(), descending=True, stable=True)
    errors = 1 - correct[order].double()
    answered = torch.arange(1, len(order) + 1, dtype=torch.float64)
    risk = errors.cumsum(0) / answered
    return answered / len(order), risk, float(risk.mean())


def at_threshold(saved: dict, threshold: float) -> tuple[float, float | None]:
    """From calibration.json's measured images: the share whose calibrated confidence is at least `threshold`, and
    the accuracy on them (None when none is)."""
    confidence = torch.tensor(saved["abstention"]["confidence"], dtype=torch.float64)
    correct = torch.tensor(saved["abstention"]["correct"], dtype=torch.float64)
    kept = confidence >= threshold
    return float(kept.double().mean()), (float(correct[kept].mean()) if kept.any() else None)


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
