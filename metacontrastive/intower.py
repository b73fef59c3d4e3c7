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

A tail that is only the 1x1 head conv (``tail=head``) runs as a matmul on channels-last activations, its BatchNorm
(running statistics: an affine map per channel) folded into the conv's weight and bias: the same function of the
same parameters, in one ``addmm`` instead of a grouped convolution per copy and three passes over the activations
(``tests/test_tail.py`` checks it against the general path in float64).
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


def _pointwise_head(tail: nn.Module) -> bool:
    """Whether ``tail`` is a 1x1 head conv without bias and its BatchNorm, nothing else: the matmul path applies."""
    conv = tail.conv_head
    return (not tail.blocks and isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.bias is None and isinstance(tail.bn_head.drop, nn.Identity))


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, n, C, h, w) -> (B, n, h * w, C): a 1x1 conv is then a matmul on the last dim, FiLM a broadcast on it."""
    return x.flatten(3).transpose(2, 3).contiguous()


def _head_pooled(tail: nn.Module) -> Pooled:
    """What ``tail`` (``_pointwise_head``) computes from one copy's parameters, on channels-last activations (n, hw, C):
    BN(conv(x)) = x @ (W * s)^T + (b - mean * s) with s = gamma / sqrt(var + eps), then activation and pooling."""
    bn = tail.bn_head
    inv_std = torch.rsqrt(bn.running_var + bn.eps)

    def pooled(p: Params, x: torch.Tensor) -> torch.Tensor:
        scale = p["bn_head.weight"] * inv_std  # (out,)
        weight = p["conv_head.weight"].flatten(1) * scale[:, None]  # (out, in)
        shift = p["bn_head.bias"] - bn.running_mean * scale
        z = torch.addmm(shift, x.flatten(0, 1), weight.t()).unflatten(0, x.shape[:2])  # (n, hw, out)
        return bn.act(z).mean(dim=1)  # (n, out)
    return pooled


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
    optimizer = torch.optim.Adam(trained, lr=lr, fused=True)  # one pass over each (large) stacked tensor per step
    step = vmap(grad(loss, argnums=(0, 1)))
    for _ in range(steps):
        # grad of detached inputs: gradients without a graph of their own. From the trained leaves themselves each
        # gradient would hold a graph back to its leaf, which holds it as .grad: a cycle that no collector frees
        # (about 0.5 MB per scored image, 24 GB in a few thousand episodes)
        with torch.enable_grad():
            grads, w.grad = step({name: p.detach() for name, p in params.items()}, w.detach(), support)
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
    own = _stacked({name: p for name, p in tail.named_parameters()}, len(trunk))
    if _pointwise_head(tail):
        return _train_and_predict(own, _head_pooled(tail), _channels_last(trunk), labels, ways, steps, lr, scale)
    return _train_and_predict(own, lambda p, xs: functional_call(tail, p, (xs,)), trunk, labels, ways, steps, lr, scale)


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
    if _pointwise_head(tail):  # the head's FiLM and activation on channels-last prefixes: one fused pass for FiLM
        act = tail.bn_head.act
        return _train_and_predict(film, lambda p, xs: act(torch.addcmul(p["beta"], xs, 1.0 + p["delta_gamma"])).mean(dim=1),
                                  _channels_last(prefix), labels, ways, steps, lr, scale)
    return _train_and_predict(film, lambda p, xs: tail(xs, (p["delta_gamma"][None], p["beta"][None]), True), prefix,
                              labels, ways, steps, lr, scale)


TAIL_METHODS = ("tail_finetune", "tail_film")
