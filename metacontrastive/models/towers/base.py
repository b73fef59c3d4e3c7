"""What every tower shares: ``out_dim``, freezing that survives ``train()``, input helpers, weight files
read with one-line errors, and ``weights_digest``, a stable identity of a tower's weights.

An image tower maps float images in [0, 1] of shape (B, 3, H, W) to features (B, out_dim); a text
tower maps a ``list[str]`` of length B to (B, out_dim), owns its tokenizer and tokenizes on the
device of its parameters.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from metacontrastive.errors import BadInput

__all__ = ["Tower", "parameter_device", "read_state_dict", "resize", "support_statistics", "weights_digest"]


class Tower(nn.Module):
    """Base class of the towers built by the factory.

    ``freeze()`` turns a tower into a fixed feature extractor (the second seed paper's setting): no
    parameter requires a gradient, and the tower stays in eval mode whatever ``train()`` is later
    called with, so a pretrained backbone's dropout stays off and its normalisation statistics stay
    put while the rest of the model trains.
    """

    out_dim: int
    frozen: bool = False
    pretrained: bool = False  # its weights come from its name (a package, a folder, a file), set by the factory: a
    # checkpoint of a frozen pretrained tower stores its weights digest instead of its weights
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


def read_state_dict(
    path: str, what: str, reader: Callable[[str], object] | None = None
) -> dict[str, torch.Tensor]:
    """Read a state dict (names to tensors) from a weight file, or raise one ``BadInput`` line naming it.

    Args:
        path: a ``.safetensors`` file or a file of ``torch.save`` (read with ``weights_only=True``).
        what: what the file is for, to start the error message (``"weights of efficientnet-lite0"``).
        reader: reads ``path`` instead of safetensors / ``torch.load`` (timm's ``load_state_dict``, which
            also unwraps ``{"state_dict": ...}`` checkpoints).

    Raises:
        BadInput: no file at ``path``, a file neither reader can parse (a text file, a truncated
            download), or one that holds something other than names mapped to tensors.
    """
    if not os.path.isfile(path):
        raise BadInput(f"{what}: no weight file at {path}; check the path")
    try:
        state = (reader or _load_weight_file)(path)
    except Exception as err:  # torch.load and safetensors raise anything from KeyError to UnpicklingError
        reason = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:160]  # its first sentence
        raise BadInput(f"{what}: {path} is not a weight file ({type(err).__name__}: {reason}); "
                       "pass a state dict written by torch.save or safetensors") from None
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise BadInput(f"{what}: {path} holds a {type(state).__name__}, not a state dict (names mapped to tensors)")
    return dict(state)


def weights_digest(module: nn.Module) -> str:
    """A stable identity of a module's weights: sha256 (hex) over its state dict's names, shapes, dtypes and
    bytes, in order.

    Two modules share a digest exactly when their state dicts hold the same tensors under the same names, on
    any device. It covers the state dict only: settings outside it (a tower's input size, its normalisation
    buffers, which are not persistent) need their own place in a cache key. Costs one pass over the weights
    (about 0.1 s for EfficientNet-Lite0's 20 MB).
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,) whatever the dtype (bf16 too)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_weight_file(path: str) -> object:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)
