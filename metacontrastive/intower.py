"""The baselines that adapt inside the frozen image tower, a copy per episode: ``tail_finetune`` and ``tail_film``.

They are what DCMCL's adaptation inside the tower (``models.tail``) has to beat without meta-learning. Both read the
pretrained tower alone, never a trained weight of the model: on each episode's support set they train a cosine
classifier over the tail's pooled features, centred on the support mean and L2-normalised (CL2N, as
``feature_centroid``), whose class weights start at the support class means, so that before any step either method
is ``feature_centroid``. With the classifier they train:

- ``tail_finetune``: the tail's own weights, from the pretrained ones: fine-tuning on the support set, BSCD-FSL's
  strongest baseline (Guo et al. 2020), on the part of the network after the split;
- ``tail_film``: the FiLM coefficients of the tail's BatchNorms (delta_gamma, beta per channel) from the identity:
  the parameters that DCMCL's tail FiLM generates, without a meta-learned start.

The copies of a chunk of episodes train together: ``torch.func.vmap`` over the gradient of each episode's own loss,
and Adam on the stacked parameters, which works element by element, so each copy trains as it would alone.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from metacontrastive.meta import class_means

__all__ = ["TAIL_METHODS", "tail_film", "tail_finetune"]

Params = dict[str, torch.Tensor]
Pooled = Callable[[Params, torch.Tensor], torch.Tensor]  # one copy's parameters, (n, ...) inputs -> (n, F) features


def _stacked(tensors: Params, count: int) -> Params:
    """``count`` trainable copies of each tensor, stacked on dim 0."""
    return {name: t.detach().unsqueeze(0).expand(count, *t.shape).clone().requires_grad_() for name, t in tensors.items()}


def _cl2n(h: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return F.normalize(h - mean, dim=-1)


def _train_and_predict(params: Params, pooled: Pooled, x: torch.Tensor, labels: torch.Tensor, ways: int,
                       steps: int, lr: float, scale: float) -> torch.Tensor:
    """Train each episode's copy (``params``, stacked on dim 0) and a cosine classifier from its support class means
    on its support cross-entropy; (B, Q) the predicted class of each query.

    Args:
        params: the stacked copies (B, ...) of what trains besides the classifier.
        pooled: one copy's parameters and inputs (n, ...) to pooled features (n, F).
        x: (B, S + Q, ...) each episode's inputs, support first.
        labels: (S,) the support labels, the same in every episode of a set.
        ways: classes per episode.
        steps: Adam steps.
        lr: Adam's learning rate.
        scale: the classifier's inverse temperature on cosines.
    """
    n = len(labels)
    support, query = x[:, :n], x[:, n:]

    def centred_support(p: Params, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = pooled(p, xs)  # (S, F)
        mean = h.mean(dim=0)
        return _cl2n(h, mean), mean

    def loss(p: Params, w: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        z = centred_support(p, xs)[0]
        return F.cross_entropy(scale * z @ F.normalize(w, dim=-1).t(), labels)

    with torch.no_grad():
        z = vmap(lambda p, xs: centred_support(p, xs)[0])(params, support)  # (B, S, F)
        w = torch.stack([class_means(zi, labels, ways) for zi in z]).requires_grad_()  # (B, N, F) the classifier
    trained = [*params.values(), w]
    optimizer = torch.optim.Adam(trained, lr=lr)
    step = vmap(grad(loss, argnums=(0, 1)))
    for _ in range(steps):
        with torch.enable_grad():
            grads, w.grad = step(params, w, support)
        for name, p in params.items():
            p.grad = grads[name]
        optimizer.step()

    def predict(p: Params, w: torch.Tensor, xs: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        mean = centred_support(p, xs)[1]
        return (_cl2n(pooled(p, xq), mean) @ F.normalize(w, dim=-1).t()).argmax(dim=-1)  # (Q,)

    with torch.no_grad():
        return vmap(predict)(params, w, support, query)


def tail_finetune(tail: nn.Module, trunk: torch.Tensor, labels: torch.Tensor, ways: int, steps: int, lr: float,
                  scale: float) -> torch.Tensor:
    """(B, Q) predictions after fine-tuning a copy of ``tail`` (its pretrained weights) and the classifier per episode.

    Args:
        tail: the model's ``ImageTail``.
        trunk: (B, S + Q, C, h, w) each episode's trunk activations, support first.
        labels, ways, steps, lr, scale: as ``_train_and_predict``.
    """
    own = {name: p for name, p in tail.named_parameters()}
    return _train_and_predict(_stacked(own, len(trunk)), lambda p, xs: functional_call(tail, p, (xs,)), trunk, labels,
                              ways, steps, lr, scale)


def tail_film(tail: nn.Module, trunk: torch.Tensor, labels: torch.Tensor, ways: int, steps: int, lr: float,
              scale: float) -> torch.Tensor:
    """(B, Q) predictions after training FiLM of the tail's BatchNorms from the identity, and the classifier, per episode.

    The tail's weights stay the pretrained ones, so its prefix (what precedes the first FiLM) is computed once.

    Args: as ``tail_finetune``.
    """
    with torch.no_grad():
        prefix = tail.prefix(trunk.flatten(0, 1)).unflatten(0, trunk.shape[:2])  # (B, S + Q, C', h, w)
    zeros = torch.zeros(sum(tail.film_channels), dtype=prefix.dtype, device=trunk.device)
    film = _stacked({"delta_gamma": zeros, "beta": zeros}, len(trunk))
    return _train_and_predict(film, lambda p, xs: tail(xs, (p["delta_gamma"][None], p["beta"][None]), True), prefix,
                              labels, ways, steps, lr, scale)


TAIL_METHODS = ("tail_finetune", "tail_film")
