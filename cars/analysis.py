"""Numbers about a model's predictions: accuracy overall and per class, confusions, TTA."""

from dataclasses import dataclass

import numpy as np
import torch


def confusion_matrix(predicted, labels, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    return np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percent of images whose true class is among the k highest logits."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100 * hits.sum().item() / len(labels)  # counted exactly: a float32 mean makes 90 % into 89.99999


@dataclass
class ClassResult:
    index: int
    name: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return 100 * self.correct / self.total if self.total else float("nan")


def per_class_accuracy(matrix: np.ndarray, class_names: list[str]) -> list[ClassResult]:
    return [ClassResult(i, name, int(matrix[i, i]), int(matrix[i].sum())) for i, name in enumerate(class_names)]


def ranked(classes: list[ClassResult], k: int, worst: bool) -> list[ClassResult]:
    """The k worst (or best) classes with images; ties broken by class index."""
    present = [c for c in classes if c.total]
    order = sorted(present, key=lambda c: (c.accuracy if worst else -c.accuracy, c.index))
    return order[:k]


def confused_pairs(matrix: np.ndarray, k: int = 10) -> list[tuple[int, int, int]]:
    """The k largest off-diagonal counts as (true, predicted, count), largest first; ties by index."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    pairs = [(int(t), int(p), int(off[t, p])) for t, p in zip(*np.nonzero(off), strict=True)]
    return sorted(pairs, key=lambda pair: (-pair[2], pair[0], pair[1]))[:k]
