"""learn2learn wrapping: which parts adapt, MAML or MetaSGD around them, and the inner loop.

The fast weights are a ``nn.ModuleDict`` of the model's parts named by ``ADAPT_SCOPES``; learn2learn
clones that dict per task and ``DomainConditionedCLIP.embed(..., fast=clone)`` uses the adapted copies
in place of the originals. Parts outside the scope (the towers, by default) are the slow weights: the
outer loop trains them, the inner loop does not touch them, and their features are computed once per
task.
"""
from __future__ import annotations

import contextlib
import io
from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

with contextlib.redirect_stderr(io.StringIO()):  # learn2learn imports gym, which prints a notice on import
    from learn2learn.algorithms import MAML, MetaSGD

__all__ = ["ADAPT_SCOPES", "adapt", "build_learner"]

ADAPT_SCOPES: dict[str, tuple[str, ...]] = {
    "film": ("film_image", "film_text"),
    "heads": ("head_image", "head_text"),
    "film+heads": ("film_image", "film_text", "head_image", "head_text"),
    "all": ("image_tower", "text_tower", "domain", "film_image", "film_text", "head_image", "head_text"),
}


def build_learner(
    model: nn.Module,
    scope: str = "film+heads",
    algorithm: str = "maml",
    inner_lr: float = 0.1,
    first_order: bool = False,
) -> MAML | MetaSGD:
    """Wrap the parts of ``model`` named by ``scope`` in a learn2learn MAML or MetaSGD learner.

    Args:
        model: a ``DomainConditionedCLIP``.
        scope: a key of ``ADAPT_SCOPES``.
        algorithm: ``maml`` (one learning rate) or ``metasgd`` (a learned rate per parameter).
        inner_lr: the inner-loop learning rate alpha (MetaSGD's initial rate).
        first_order: drop second-order terms from the outer gradient.
    """
    if scope not in ADAPT_SCOPES:
        raise ValueError(f"unknown adapt_scope {scope!r}; choose one of {sorted(ADAPT_SCOPES)}")
    parts = nn.ModuleDict({name: getattr(model, name) for name in ADAPT_SCOPES[scope] if getattr(model, name) is not None})
    if not any(p.requires_grad for p in parts.parameters()):
        raise ValueError(f"adapt_scope {scope!r} holds no trainable parameter (is conditioning off or the part frozen?)")
    # allow_nograd: frozen parts inside the scope (a frozen tower under `all`) are carried, not adapted
    if algorithm == "maml":
        return MAML(parts, lr=inner_lr, first_order=first_order, allow_nograd=True)
    if algorithm == "metasgd":
        if not all(p.requires_grad for p in parts.parameters()):
            raise ValueError(f"metasgd adapts every parameter of its scope, but {scope!r} holds frozen ones; "
                             "use algorithm=maml or a scope without the frozen towers")
        return MetaSGD(parts, lr=inner_lr, first_order=first_order)
    raise ValueError(f"unknown algorithm {algorithm!r}; choose 'maml' or 'metasgd'")


def adapt(
    learner: MAML | MetaSGD, support_loss: Callable[[nn.ModuleDict], torch.Tensor], steps: int
) -> list[torch.Tensor]:
    """Take ``steps`` gradient steps of a cloned learner on its support loss, in place.

    Args:
        learner: a clone from ``build_learner(...).clone()``.
        support_loss: maps the learner's current parts to the support loss.
        steps: inner-loop steps k.

    Returns:
        The detached support loss before each step, for logging; no host sync happens here.
    """
    # Second-order MAML differentiates the support forward twice; the fused attention kernels have no
    # double backward, so attention inside the scope (adapt_scope=all) must use the math kernel.
    kernel = contextlib.nullcontext() if learner.first_order else sdpa_kernel(SDPBackend.MATH)
    losses = []
    with kernel:
        for _ in range(steps):
            loss = support_loss(learner.module)
            learner.adapt(loss)
            losses.append(loss.detach())
    return losses
