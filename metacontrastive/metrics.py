"""Few-shot metrics: per-episode accuracy and macro-F1 (torchmetrics), and their mean with a 95% CI
as a torchmetrics ``Metric`` that reduces correctly across DDP ranks."""
from __future__ import annotations

import math

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

__all__ = ["COLLAPSE", "EpisodeMean", "collapse_signs", "episode_scores", "mean_cosine"]

# A validation domain whose mean over episodes passes one of these is reported as collapsing. Class embeddings
# of a narrow domain sit close (0.95 and more with 2-way tasks) and still separate; at 0.99 they no longer do.
COLLAPSE = {"label_cos": 0.99, "image_cos": 0.99, "constant": 0.5}


def episode_scores(predictions: torch.Tensor, targets: torch.Tensor, ways: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and macro-F1 of one episode.

    Args:
        predictions: (Q,) predicted class of each query, in 0..ways-1.
        targets: (Q,) true class of each query.
        ways: classes in the episode (N).

    Returns:
        (accuracy, macro-F1), two scalars. A class never predicted has F1 0 (torchmetrics' convention,
        as scikit-learn's ``zero_division=0``).
    """
    accuracy = multiclass_accuracy(predictions, targets, num_classes=ways, average="micro")
    f1 = multiclass_f1_score(predictions, targets, num_classes=ways, average="macro")
    return accuracy, f1


def mean_cosine(z: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between different rows of normalised embeddings z (n, D), n >= 2: near 1 when
    they have collapsed onto one direction."""
    n = len(z)
    return ((z @ z.t()).sum() - z.pow(2).sum()) / (n * (n - 1))


def collapse_signs(z_labels: torch.Tensor, z_query: torch.Tensor, predictions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-episode signs of collapse: ``label_cos`` (how alike the adapted class embeddings are), ``image_cos``
    (how alike the query embeddings are) and ``constant`` (1 when every query got the same answer)."""
    return {"label_cos": mean_cosine(z_labels), "image_cos": mean_cosine(z_query),
            "constant": (predictions == predictions[0]).all().float()}


class EpisodeMean(Metric):
    """Mean of a per-episode score with its 95% confidence interval, 1.96 * std / sqrt(E).

    The states are sums (of scores, of their squares, and the episode count), so every rank can
    compute the metric whether or not it saw an episode of this domain, and the ranks agree.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("episodes", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, score: torch.Tensor) -> None:
        """Add episodes: ``score`` is one episode's score or a (E,) tensor of them."""
        score = score.detach().reshape(-1).double()
        self.total += score.sum()
        self.total_sq += score.pow(2).sum()
        self.episodes += score.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"mean", "ci95", "episodes"}``; mean and ci95 are NaN before any episode, ci95 is 0 after one."""
        n = self.episodes.double()
        mean = self.total / n
        var = (self.total_sq - n * mean**2).clamp(min=0) / (n - 1) if n > 1 else torch.zeros_like(mean)
        return {"mean": mean.float(), "ci95": (1.96 * var.sqrt() / math.sqrt(max(int(n), 1))).float(),
                "episodes": self.episodes}
