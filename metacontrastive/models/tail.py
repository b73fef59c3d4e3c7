"""Adaptation inside a frozen image tower: the tower cut into a trunk and a tail, with FiLM after the tail's BatchNorms.

On a frozen tower, FiLM and heads after the pooled feature have little left to adapt (a centred nearest centroid is
close to optimal there). Cross-domain few-shot methods adapt inside the backbone instead: FiLM after BatchNorm in
each block (CNAPs, Requeima et al. 2019; FLUTE, Triantafillou et al. 2021), residual adapters (TSA, Li et al. 2022)
or fine-tuning the network on the support set (BSCD-FSL, Guo et al. 2020). Here the tower is cut in two:

- the **trunk** (the frozen tower up to the split) runs once per image; its activations (B, C, h, w) are what the
  feature cache stores (``metacontrastive.data.features``);
- the **tail** (``ImageTail``) runs on them: for EfficientNet-Lite (timm's ``tf_efficientnet_lite*``),
  ``tail="head"`` is the 1x1 head conv (320 -> 1280) with its BatchNorm and ReLU6, then global average pooling;
  ``tail="last_stage"`` puts the last stage (one inverted-residual block, 192 -> 1152 -> 320) before it.

Each of the tail's BatchNorms is followed by FiLM, y = (1 + delta_gamma) * BN(x) + beta per channel, before its
activation, with coefficients that ``conditioning.TailFiLM`` generates from the domain embedding; without
coefficients (or at FiLM's zero initialisation) the tail is exactly the frozen tower's. BatchNorm always uses its
running statistics: a few support images are no estimate of a layer's statistics.

The tail's first convolution and BatchNorm come before its first FiLM, so unless the tail's own weights adapt they
give the same output for an image whatever adapts: ``ImageTail.prefix`` computes it once per task, and
``forward(..., prefixed=True)`` starts from there (the inner loop then runs only what FiLM changes).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from metacontrastive.errors import BadInput

__all__ = ["TAILS", "ImageTail", "Tail", "split_tail"]

TAILS = ("none", "head", "last_stage")
Tail = Literal[TAILS]  # the allowed values of ``EncoderConfig.tail``, for LightningCLI


def _film(x: torch.Tensor, coefficients: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """(1 + delta_gamma) * x + beta on (B, C, h, w), coefficients (B or 1, C) each."""
    if coefficients is None:
        return x
    delta_gamma, beta = coefficients
    return x * (1.0 + delta_gamma)[:, :, None, None] + beta[:, :, None, None]


def _batch_norm(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A BatchNorm with its running statistics, whatever its mode, without its activation."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class ImageTail(nn.Module):
    """The tail of a cut tower: inverted-residual blocks (possibly none), the 1x1 head conv and its BatchNorm with
    activation, global average pooling; FiLM after every BatchNorm.

    Args:
        blocks: timm ``InvertedResidual`` blocks (no squeeze-and-excitation, no skip in the first).
        conv_head: the head convolution.
        bn_head: its ``BatchNormAct2d``.

    Attributes:
        film_channels: the channels of each FiLM point, in order: per block its three BatchNorms, then the head's.
        in_channels: channels of the trunk activations it reads.
        out_dim: size of the pooled features.
    """

    def __init__(self, blocks: list[nn.Module], conv_head: nn.Module, bn_head: nn.Module) -> None:
        super().__init__()
        for i, block in enumerate(blocks):
            unsupported = [name for name, part in (("conv_s2d", block.conv_s2d), ("se", block.se), ("aa", block.aa))
                           if part is not None and not isinstance(part, nn.Identity)]
            if unsupported or (i == 0 and block.has_skip):
                raise BadInput(f"the tail's block {i} ({type(block).__name__}) has {unsupported or 'a skip connection'}: "
                               "only EfficientNet-Lite's last stage is supported as a tail")
        self.blocks = nn.ModuleList(blocks)
        self.conv_head, self.bn_head = conv_head, bn_head
        norms = [bn for block in blocks for bn in (block.bn1, block.bn2, block.bn3)] + [bn_head]
        for bn in norms:  # activations out of place: the inner loop differentiates through them (torch.func too)
            if hasattr(bn.act, "inplace"):
                bn.act.inplace = False
        self.film_channels = tuple(bn.num_features for bn in norms)
        self.in_channels = blocks[0].conv_pw.in_channels if blocks else conv_head.in_channels
        self.out_dim = bn_head.num_features

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C', h, w) the tail's first convolution and BatchNorm on trunk activations (B, C, h, w): what
        precedes its first FiLM."""
        if self.blocks:
            return _batch_norm(self.blocks[0].bn1, self.blocks[0].conv_pw(x))
        return _batch_norm(self.bn_head, self.conv_head(x))

    def forward(self, x: torch.Tensor, coefficients: tuple[torch.Tensor, torch.Tensor] | None = None,
                prefixed: bool = False) -> torch.Tensor:
        """Pooled features (B, out_dim) of trunk activations x (B, C, h, w), or of ``prefix(x)`` when ``prefixed``.

        Args:
            x: trunk activations, or their ``prefix``.
            coefficients: (delta_gamma, beta), each (B or 1, sum(film_channels)): FiLM of every BatchNorm output;
                None: no FiLM (the frozen tower itself).
            prefixed: x is ``prefix(trunk activations)``.
        """
        films = iter(self._split(coefficients))
        for i, block in enumerate(self.blocks):
            shortcut = x
            if not (prefixed and i == 0):
                x = _batch_norm(block.bn1, block.conv_pw(x))
            x = block.bn1.act(block.bn1.drop(_film(x, next(films))))
            x = block.bn2.act(block.bn2.drop(_film(_batch_norm(block.bn2, block.conv_dw(x)), next(films))))
            x = block.bn3.act(block.bn3.drop(_film(_batch_norm(block.bn3, block.conv_pwl(x)), next(films))))
            if block.has_skip:
                x = block.drop_path(x) + shortcut
        if not (prefixed and not self.blocks):
            x = _batch_norm(self.bn_head, self.conv_head(x))
        x = self.bn_head.act(self.bn_head.drop(_film(x, next(films))))
        return x.mean(dim=(2, 3))  # (B, out_dim): global average pooling

    def _split(self, coefficients: tuple[torch.Tensor, torch.Tensor] | None) -> list:
        if coefficients is None:
            return [None] * len(self.film_channels)
        gammas, betas = (c.split(self.film_channels, dim=-1) for c in coefficients)
        return list(zip(gammas, betas))


def split_tail(tower: nn.Module, tail: str) -> ImageTail:
    """Cut ``tower`` (a ``TimmImageTower`` of an EfficientNet) in two, in place: from then on it returns its trunk's
    activations (B, C, h, w); the returned tail maps them to the pooled features the whole tower gave.

    Args:
        tower: the image tower.
        tail: ``head`` or ``last_stage`` (see the module docstring).

    Raises:
        BadInput: a tower that is not an EfficientNet (no ``conv_head``, ``bn2`` and ``blocks``), or an unknown tail.
    """
    model = getattr(tower, "model", None)
    if tail not in TAILS[1:]:
        raise BadInput(f"model.encoder.tail={tail!r}: choose one of {list(TAILS)}")
    if model is None or not all(hasattr(model, name) for name in ("blocks", "conv_head", "bn2", "forward_features")):
        raise BadInput(f"model.encoder.tail={tail}: the image tower {type(tower).__name__} cannot be cut; a tail is "
                       "defined for the efficientnet-lite towers (timm EfficientNets): use one, or model.encoder.tail=none")
    blocks = list(model.blocks[-1]) if tail == "last_stage" else []
    part = ImageTail(blocks, model.conv_head, model.bn2)
    if tail == "last_stage":
        model.blocks = model.blocks[:-1]
    model.conv_head, model.bn2 = nn.Identity(), nn.Identity()  # the trunk ends where the tail starts
    tower.trunk_only, tower.out_dim = True, part.in_channels
    return part
