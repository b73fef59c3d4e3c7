"""What every tower shares: ``out_dim``, freezing that survives ``train()``, and input helpers.

An image tower maps float images in [0, 1] of shape (B, 3, H, W) to features (B, out_dim); a text
tower maps a ``list[str]`` of length B to (B, out_dim), owns its tokenizer and tokenizes on the
device of its parameters.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Tower", "parameter_device", "resize", "support_statistics"]


class Tower(nn.Module):
    """Base class of the towers built by the factory.

    ``freeze()`` turns a tower into a fixed feature extractor (the second seed paper's setting): no
    parameter requires a gradient, and the tower stays in eval mode whatever ``train()`` is later
    called with, so a pretrained backbone's dropout stays off and its normalisation statistics stay
    put while the rest of the model trains.
    """

    out_dim: int
    frozen: bool = False
    supports_grad_checkpointing: bool = False  # timm and transformers towers: their libraries checkpoint by block

    def freeze(self) -> Tower:
        """Freeze every parameter and switch to eval mode for good; returns the tower."""
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> Tower:
        return super().train(mode and not self.frozen)

    def set_grad_checkpointing(self, enable: bool = True) -> Tower:
        """Keep only some activations in training and recompute the rest in the backward pass (less memory,
        about one more forward of time), where ``supports_grad_checkpointing``; returns the tower."""
        raise ValueError(f"{type(self).__name__} has no gradient checkpointing (timm: and hf: / minilm towers have)")


def resize(images: torch.Tensor, size: tuple[int, int] | None, mode: str = "bilinear") -> torch.Tensor:
    """Resize (B, 3, H, W) images to ``size`` (antialiased) unless they have it already or size is None."""
    if size is None or tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=True)  # (B, 3, *size)
    return out.clamp(0.0, 1.0) if mode == "bicubic" else out  # bicubic overshoots at sharp edges


def parameter_device(module: nn.Module) -> torch.device:
    """The device of the first parameter (or buffer) of ``module``: where its inputs must go."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def support_statistics(tower: nn.Module, support: torch.Tensor) -> Iterator[None]:
    """Inside the block, the BatchNorm layers of ``tower`` normalise with the statistics of ``support``
    (B, 3, H, W) instead of their running ones; outside, everything is as before.

    This is AdaBN (Li et al. 2016) on an episode's support set: a domain unlike the training ones is
    normalised by its own statistics (see Bronskill et al. 2020, TaskNorm, for normalisation in
    meta-learning); the query images are never used, so evaluation stays inductive. Without BatchNorm
    layers (the tiny towers use GroupNorm) it does nothing.
    """
    layers = [m for m in tower.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers:
        yield
        return
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum, m.training)
             for m in layers]
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: after one pass, exactly the support statistics
            m.train()
        with torch.no_grad():
            tower(support)
        for m in layers:
            m.eval()
        yield
    finally:
        for m, (mean, var, count, momentum, training) in zip(layers, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            m.momentum = momentum
            m.train(training)
