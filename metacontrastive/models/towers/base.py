"""What every tower shares: ``out_dim``, freezing that survives ``train()``, and input helpers.

An image tower maps float images in [0, 1] of shape (B, 3, H, W) to features (B, out_dim); a text
tower maps a ``list[str]`` of length B to (B, out_dim), owns its tokenizer and tokenizes on the
device of its parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Tower", "parameter_device", "resize"]


class Tower(nn.Module):
    """Base class of the towers built by the factory.

    ``freeze()`` turns a tower into a fixed feature extractor (the second seed paper's setting): no
    parameter requires a gradient, and the tower stays in eval mode whatever ``train()`` is later
    called with, so a pretrained backbone's dropout stays off and its normalisation statistics stay
    put while the rest of the model trains.
    """

    out_dim: int
    frozen: bool = False

    def freeze(self) -> Tower:
        """Freeze every parameter and switch to eval mode for good; returns the tower."""
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> Tower:
        return super().train(mode and not self.frozen)


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
