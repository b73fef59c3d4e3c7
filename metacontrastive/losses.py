"""Contrastive and cross-domain alignment losses, as pure functions on tensors.

The contrastive loss is CLIP's symmetric InfoNCE (Radford et al., 2021) with multi-positive targets:
two items that share a label (a class, or an identical caption) are positives of each other, never
negatives. The alignment regularisers compare embedding distributions of two domains: MMD^2 with a
multi-bandwidth RBF kernel (Gretton et al., 2012), CORAL (Sun & Saenko, 2016) and the distance between
domain means. ``alignment_loss`` sums one of them over every pair of domains present in a batch.
``alignment`` and ``uniformity`` are Wang & Isola's (2020) diagnostics of a normalised embedding: how
close positives sit, and how evenly the embeddings spread over the sphere.
"""
from __future__ import annotations

import itertools
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ALIGNMENTS",
    "Alignment",
    "alignment",
    "alignment_loss",
    "contrastive_loss",
    "coral",
    "mean_distance",
    "mmd_rbf",
    "soft_cross_entropy",
    "uniformity",
]

DEFAULT_BANDWIDTHS = (0.25, 0.5, 1.0, 2.0, 4.0)


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target spread uniformly over each row's positives.

    Args:
        logits: (B, M) scores.
        positives: (B, M) boolean mask, at least one True per row.

    Returns:
        Scalar mean over rows.
    """
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every row needs at least one positive: check that each image has a matching text")
    targets = positives.float()
    targets = targets / targets.sum(dim=1, keepdim=True)  # (B, M), rows sum to 1
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    image_labels: torch.Tensor,
    text_labels: torch.Tensor,
) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE between L2-normalised image and text embeddings.

    With all labels distinct and one text per image this is exactly the CLIP loss. An N-way K-shot
    episode passes N*K images and N class prompts: every image has one positive text, every text has
    K positive images.

    Args:
        image_emb: (B, D) normalised image embeddings.
        text_emb: (M, D) normalised text embeddings.
        logit_scale: the inverse temperature (already exponentiated).
        image_labels: (B,) label of each image.
        text_labels: (M,) label of each text.

    Returns:
        Scalar loss, the mean of the image-to-text and text-to-image terms.
    """
    logits = logit_scale * image_emb @ text_emb.t()  # (B, M)
    positives = image_labels[:, None] == text_labels[None, :]  # (B, M)
    image_to_text = soft_cross_entropy(logits, positives)
    text_to_image = soft_cross_entropy(logits.t(), positives.t())
    return 0.5 * (image_to_text + text_to_image)


def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x[:, None, :] - y[None, :, :]).pow(2).sum(-1)  # (N, M)


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS) -> torch.Tensor:
    """Biased (V-statistic) MMD^2 between samples x (N, D) and y (M, D), summed over RBF bandwidths.

    exactly 0 when x and y hold the same points; k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2)).
    """
    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = _sq_dists(a, b)
        return sum(torch.exp(-d2 / (2.0 * s * s)) for s in bandwidths)

    return kernel(x, x).mean() + kernel(y, y).mean() - 2.0 * kernel(x, y).mean()


def coral(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CORAL: squared Frobenius distance between the covariances of x (N, D) and y (M, D), over 4 D^2."""
    d = x.shape[1]

    def cov(a: torch.Tensor) -> torch.Tensor:
        centred = a - a.mean(dim=0, keepdim=True)
        return centred.t() @ centred / max(a.shape[0] - 1, 1)  # (D, D)

    return (cov(x) - cov(y)).pow(2).sum() / (4.0 * d * d)


def mean_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance between the means of x (N, D) and y (M, D)."""
    return (x.mean(dim=0) - y.mean(dim=0)).pow(2).sum()


ALIGNMENTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mmd": mmd_rbf,
    "coral": coral,
    "mean": mean_distance,
}
Alignment = Literal[tuple(ALIGNMENTS)]  # the allowed values, for LightningCLI, written once above


def alignment_loss(embeddings: torch.Tensor, domain_ids: torch.Tensor, kind: str = "mmd") -> torch.Tensor:
    """Sum of a two-sample discrepancy over every pair of domains present in the batch.

    Args:
        embeddings: (B, D) embeddings from several domains.
        domain_ids: (B,) the domain of each row.
        kind: one of ``ALIGNMENTS`` (mmd, coral, mean).

    Returns:
        Scalar; zero (with a graph) when fewer than two domains are present.
    """
    if kind not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {kind!r}; choose one of {sorted(ALIGNMENTS)}")
    fn = ALIGNMENTS[kind]
    present = torch.unique(domain_ids).tolist()
    total = embeddings.sum() * 0.0
    for a, b in itertools.combinations(present, 2):
        total = total + fn(embeddings[domain_ids == a], embeddings[domain_ids == b])
    return total


def alignment(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Wang & Isola's alignment: the mean squared distance between positives, here two different rows of
    one class. Lower is tighter. NaN when no class has two rows.

    Args:
        embeddings: (B, D) normalised embeddings.
        labels: (B,) class of each row.
    """
    positives = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return _sq_dists(embeddings, embeddings)[positives].mean()


def uniformity(embeddings: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola's uniformity: log of the mean Gaussian potential exp(-t |a - b|^2) over pairs of
    different rows. Lower is more uniform; 0 when every row is the same point (collapse).

    Args:
        embeddings: (B, D) normalised embeddings, B >= 2.
        t: the potential's sharpness (the paper's 2).
    """
    pairs = ~torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    return torch.exp(-t * _sq_dists(embeddings, embeddings)[pairs]).mean().log()
