"""Which pretrained model will fine-tune best, guessed before any fine-tuning from one forward pass over the target's
training split: LogME and H-score from the model's features, LEEP and NCE from its own (source) head.
Every score is higher for a better expected transfer.

On Stanford Cars, the Transfer-Learning-Library benchmark measured how well each score ranked 10 ImageNet models by
their fine-tuned accuracy (weighted Kendall tau): NCE .750, LEEP .703, LogME .654, H-score .638. The H-score's .638 is
the plain H-score's; the regularised H-score computed here was not in that benchmark.
"""

import numpy as np
import torch

from cars.models import kept_head_inputs

# weighted Kendall tau against fine-tuned accuracy on Stanford Cars, 10 ImageNet models (Transfer-Learning-Library);
# the H-score's is the plain H-score's, not the regularised one's computed here
TAU_ON_CARS = {"nce": 0.750, "leep": 0.703, "logme": 0.654, "hscore": 0.638}
EPSILON = 1e-5  # LogME's floor under |m|^2 and the residual, the reference implementation's
SCORE_NAMES = {"logme": "LogME", "nce": "NCE", "leep": "LEEP", "hscore": "H-score"}


def logme(features: np.ndarray, labels: np.ndarray, *, iterations: int = 100, tolerance: float = 1e-6) -> float:
    """LogME (You et al. 2021): the log marginal evidence per example of a Bayesian linear regression from the
    features to each class's one-hot target, with its prior precision alpha and noise precision beta set by
    MacKay's fixed-point updates to maximise the evidence; averaged over classes. Higher is better.

    As in the reference implementation (github.com/thuml/LogME), 1e-5 is added to |m|^2 and |F m - y|^2: features
    that fit the labels exactly (fewer images than dimensions) would otherwise drive beta, and the evidence, to
    infinity."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2  # the eigenvalues of F'F that are not 0
    evidences = []
    for c in np.unique(labels):
        y = (np.asarray(labels) == c).astype(np.float64)
        z = u.T @ y  # y in the basis of F's left singular vectors
        outside = y @ y - z @ z  # the part of y that no linear function of the features reaches
        alpha, beta = 1.0, 1.0
        for _ in range(iterations):
            shrink = beta * sigma / (alpha + beta * sigma)
            gamma = shrink.sum()  # the effective number of well-determined weights
            m_norm2 = float(((beta * s * z / (alpha + beta * sigma)) ** 2).sum())  # |m|^2
            residual = float((((shrink - 1) * z) ** 2).sum() + outside)  # |F m - y|^2
            new_alpha, new_beta = gamma / (m_norm2 + EPSILON), (n - gamma) / (residual + EPSILON)
            done = abs(new_alpha - alpha) / alpha < tolerance and abs(new_beta - beta) / beta < tolerance
            alpha, beta = new_alpha, new_beta
            if done:
                break
        shrink = beta * sigma / (alpha + beta * sigma)
        m_norm2 = float(((beta * s * z / (alpha + beta * sigma)) ** 2).sum())
        residual = float((((shrink - 1) * z) ** 2).sum() + outside)
        log_det = np.log(alpha + beta * sigma).sum() + (d - len(sigma)) * np.log(alpha)  # log |alpha I + beta F'F|
        evidence = (
            n / 2 * np.log(beta)
            + d / 2 * np.log(alpha)
            - n / 2 * np.log(2 * np.pi)
            - beta / 2 * (residual + EPSILON)
            - alpha / 2 * (m_norm2 + EPSILON)
            - log_det / 2
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def joint_of(source: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
    """The empirical joint distribution P(y, z) of target labels y and source classes z, from each example's source
    distribution over z (rows of `source`, each summing to 1)."""
    joint = np.zeros((num_labels, source.shape[1]))
    np.add.at(joint, np.asarray(labels), source)
    return joint / len(labels)


def leep(source_probabilities: np.ndarray, labels: np.ndarray) -> float:
    """LEEP (Nguyen et al. 2020): the mean log-likelihood of the target labels under the classifier that maps the
    source head's distribution through the empirical P(y | z): 1/n sum_i log sum_z P(y_i | z) theta(x_i)_z."""
    theta = np.asarray(source_probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    joint = joint_of(theta, labels, int(labels.max()) + 1)
    conditional = joint / np.maximum(joint.sum(0, keepdims=True), 1e-300)  # P(y | z)
    return float(np.log((theta * conditional[labels]).sum(1)).mean())


def nce(source_probabilities: np.ndarray, labels: np.ndarray) -> float:
    """NCE (Tran et al. 2019): the negative conditional entropy -H(Y | Z) of the target labels given the source
    head's hard prediction z = argmax theta(x); 0 when z determines y."""
    theta = np.asarray(source_probabilities)
    labels = np.asarray(labels)
    hard = np.eye(theta.shape[1])[theta.argmax(1)]
    joint = joint_of(hard, labels, int(labels.max()) + 1)
    conditional = joint / np.maximum(joint.sum(0, keepdims=True), 1e-300)
    present = joint > 0
    return float((joint[present] * np.log(conditional[present])).sum())


def hscore(features: np.ndarray, labels: np.ndarray, *, shrink: bool = True) -> float:
    """H-score (Bao et al. 2019): tr(cov(f)^-1 cov(E[f | y])), how much of the features' variance lies between the
    classes; at most C - 1. With fewer images than feature dimensions the sample covariance is singular and the plain
    score is C - 1 for any features, so `shrink` computes the regularised H-score of Ibrahim et al. 2022 instead:
    tr(cov_a(f)^-1 (1 - a) cov(E[f | y])), with cov_a the Ledoit-Wolf estimate (1 - a) cov(f) + a tr(cov(f))/d I and a
    its shrinkage. The (1 - a) shrinks the between-class covariance as much as cov_a shrinks cov(f): without it, models
    whose features are shrunk by different amounts are scored on different scales and rank wrongly."""
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, dtype=np.float64)
    f = f - f.mean(0)
    labels = np.asarray(labels)
    class_means = np.zeros_like(f)
    for c in np.unique(labels):
        class_means[labels == c] = f[labels == c].mean(0)
    between = class_means.T @ class_means / len(f)
    if shrink:
        estimate = LedoitWolf(assume_centered=True).fit(f)
        covariance, between = estimate.covariance_, (1 - estimate.shrinkage_) * between
    else:
        covariance = f.T @ f / len(f)
    return float(np.trace(np.linalg.pinv(covariance, rcond=1e-10, hermitian=True) @ between))


@torch.no_grad()
def features_and_source_probabilities(model, loader, device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One forward pass: what the model's own head takes in (the features), the head's softmax (the distribution
    over the source task's classes) and the target labels, for every image of the loader."""
    model.eval()
    probabilities, labels = [], []
    with kept_head_inputs(model) as features:
        for images, batch_labels in device.batches(loader, description="scoring"):
            with device.autocast():
                logits = model(images)
            probabilities.append(logits.float().softmax(1).cpu())
            labels.append(batch_labels.cpu())
    taken = [f.flatten(1) for f in features]
    return torch.cat(taken).numpy(), torch.cat(probabilities).numpy(), torch.cat(labels).numpy()


def scores(features: np.ndarray, source_probabilities: np.ndarray | None, labels: np.ndarray) -> dict:
    """The four scores; NCE and LEEP are None for a start without a source head (a CLIP)."""
    return {
        "logme": logme(features, labels),
        "nce": nce(source_probabilities, labels) if source_probabilities is not None else None,
        "leep": leep(source_probabilities, labels) if source_probabilities is not None else None,
        "hscore": hscore(features, labels),
    }
