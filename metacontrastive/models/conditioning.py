"""Domain conditioning: a learned embedding per domain and FiLM (Perez et al., 2018) on features.

Index ``num_domains`` of the embedding table is the ``unknown`` domain, used for domains unseen in
training and, with domain dropout, learned as a generic starting point for adaptation.
The FiLM generator starts at the identity (gamma = 1, beta = 0) so that untrained conditioning
changes nothing.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DomainEmbedding", "FiLM", "TailFiLM"]


class DomainEmbedding(nn.Module):
    """Embedding table of ``num_domains`` known domains plus one ``unknown`` entry.

    Args:
        num_domains: number of known domains.
        dim: size of each domain embedding.
    """

    def __init__(self, num_domains: int, dim: int) -> None:
        super().__init__()
        self.num_domains = num_domains
        self.table = nn.Embedding(num_domains + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, domain_ids: torch.Tensor) -> torch.Tensor:
        return self.table(domain_ids)  # (B, dim)


class FiLM(nn.Module):
    """Feature-wise affine modulation h' = gamma(e) * h + beta(e), the identity at initialisation.

    Args:
        cond_dim: size of the conditioning vector e.
        feature_dim: size of the features h.
    """

    def __init__(self, cond_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.to_gamma_beta = nn.Linear(cond_dim, 2 * feature_dim)
        # zero weights and bias: gamma = 1 + 0, beta = 0 for every domain until training moves them
        nn.init.zeros_(self.to_gamma_beta.weight)
        nn.init.zeros_(self.to_gamma_beta.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Args: h (B, F) features; cond (B, C) or (C,) conditioning. Returns (B, F)."""
        delta_gamma, beta = self.to_gamma_beta(cond).chunk(2, dim=-1)  # (B, F) each
        return (1.0 + delta_gamma) * h + beta


class TailFiLM(nn.Module):
    """The FiLM coefficients of every BatchNorm of an image tail (``models.tail.ImageTail``) from a conditioning
    vector: delta_gamma and beta, zero at initialisation (the tail is then the frozen tower's).

    Args:
        cond_dim: size of the conditioning vector e.
        channels: the channels of each FiLM point of the tail.
    """

    def __init__(self, cond_dim: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.channels = tuple(channels)
        self.to_gamma_beta = nn.Linear(cond_dim, 2 * sum(self.channels))
        nn.init.zeros_(self.to_gamma_beta.weight)
        nn.init.zeros_(self.to_gamma_beta.bias)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: cond (B, C) or (C,). Returns delta_gamma and beta, (B or 1, sum(channels)) each."""
        delta_gamma, beta = self.to_gamma_beta(cond.reshape(-1, cond.shape[-1])).chunk(2, dim=-1)
        return delta_gamma, beta
