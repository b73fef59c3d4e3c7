"""Episode-level few-shot metrics as torchmetrics, so that they reduce correctly across DDP ranks."""
from __future__ import annotations

import math

import torch
from torchmetrics import Metric

__all__ = ["EpisodeAccuracy"]


class EpisodeAccuracy(Metric):
    """Mean per-episode accuracy with its 95% confidence interval, 1.96 * std / sqrt(E).

    The states are sums (of accuracies, of their squares, and the episode count), so every rank can
    compute the metric whether or not it saw an episode of this domain, and the ranks agree.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("episodes", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, accuracy: torch.Tensor) -> None:
        """Add episodes: ``accuracy`` is one episode's accuracy or a (E,) tensor of them."""
        acc = accuracy.detach().reshape(-1).double()
        self.total += acc.sum()
        self.total_sq += acc.pow(2).sum()
        self.episodes += acc.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"mean", "ci95", "episodes"}``; mean and ci95 are NaN before any episode."""
        n = self.episodes.double()
        mean = self.total / n
        var = (self.total_sq - n * mean**2).clamp(min=0) / (n - 1) if n > 1 else torch.zeros_like(mean)
        return {"mean": mean.float(), "ci95": (1.96 * var.sqrt() / math.sqrt(max(int(n), 1))).float(),
                "episodes": self.episodes}
