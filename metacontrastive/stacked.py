"""Stacked copies: one copy of a few Linear layers per episode, trained together, each on its own episode.

``evaluation``'s ``projection`` and ``finetune`` train fresh heads (or FiLM + heads) on each episode's support set.
Here the copies of a chunk of episodes are stacked on dim 0 and trained as one: a few large batched matmuls per
step instead of many small ones, with Adam working element by element, so each copy ends exactly where it would
trained alone (tests/test_evaluation.py checks it against plain PyTorch training in float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metacontrastive.losses import contrastive_loss
from metacontrastive.models.clip import ProjectionHead

__all__ = ["Copies", "LayerPath", "model_path", "stacked_copies", "support_losses", "train_copies"]


# The trained methods train one copy of some Linear layers per episode, stacked on dim 0: a (B, in, out) weight
# (stored transposed, so that batched matmuls read it without a copy) and a (B, out) bias per layer. Adam works
# element by element and each copy's loss reads only its own episode, so this equals training each copy on its
# own, at the cost of a few large matmuls per step instead of many small ones. The layers' backward is written
# out (the loss's own gradient still comes from autograd) to write each step's gradients into buffers kept for the
# whole training: autograd allocates a new (B, in, out) gradient per layer and step, and once that outgrows what
# the allocator reuses (tens of MB), mapping in its fresh pages costs nearly as much as the matmul that fills it.
Copies = dict[str, torch.Tensor]


def stacked_copies(module: nn.Module, count: int) -> Copies:
    """``count`` copies of the parameters of ``module``'s Linear layers, by parameter name: trainable copies of
    the trainable ones (with a gradient buffer), a shared read-only view of the frozen ones.

    Raises:
        TypeError: ``module`` holds parameters outside Linear layers (no stacked layer is written for them).
    """
    copies = {}
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Linear):
            prefix = f"{name}." if name else ""
            for key, value in (("weight", layer.weight.t()), ("bias", layer.bias)):
                if value is None:
                    continue
                stacked = value.detach().unsqueeze(0).expand(count, *value.shape)  # (B, ...)
                if value.requires_grad:
                    stacked = stacked.clone(memory_format=torch.contiguous_format).requires_grad_()
                    stacked.grad = torch.zeros_like(stacked)
                copies[prefix + key] = stacked
        elif any(True for _ in layer.parameters(recurse=False)):
            raise TypeError(f"cannot train stacked copies of {type(layer).__name__} {name!r}: only Linear layers")
    return copies


class _Linear:
    """Each copy's ``nn.Linear`` on its own rows; ``backward`` fills the trained copies' gradient buffers."""

    def __init__(self, p: Copies, prefix: str) -> None:
        self.weight, self.bias = p[prefix + "weight"], p.get(prefix + "bias")  # (B, in, out), (B, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, n, in) -> (B, n, out)
        self.x = x
        return torch.bmm(x, self.weight) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)

    def backward(self, dy: torch.Tensor, input_grad: bool = True) -> torch.Tensor | None:
        if self.weight.grad is not None:
            torch.bmm(self.x.transpose(1, 2), dy, out=self.weight.grad)  # (B, in, out)
        if self.bias is not None and self.bias.grad is not None:
            torch.sum(dy, dim=1, out=self.bias.grad)  # (B, out)
        return torch.bmm(dy, self.weight.transpose(1, 2)) if input_grad else None  # (B, n, in)


class _GELU:
    """``nn.GELU`` (exact or tanh, as the layer says)."""

    def __init__(self, layer: nn.GELU) -> None:
        self.approximate = layer.approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x = x
        return F.gelu(x, approximate=self.approximate)

    def backward(self, dy: torch.Tensor, input_grad: bool = True) -> torch.Tensor:
        return torch.ops.aten.gelu_backward(dy, self.x, approximate=self.approximate)


class _Normalize:
    """``F.normalize(x, dim=-1)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, n, 1)
        self.z = x / self.norm
        return self.z

    def backward(self, dz: torch.Tensor, input_grad: bool = True) -> torch.Tensor:
        return (dz - self.z * (self.z * dz).sum(dim=-1, keepdim=True)) / self.norm  # the tangent part, over the norm


class _FiLM:
    """Each copy's ``FiLM`` on its own conditioning vector: h' = (1 + delta_gamma(e)) * h + beta(e)."""

    def __init__(self, p: Copies, prefix: str, cond: torch.Tensor) -> None:
        self.linear, self.cond = _Linear(p, prefix + "to_gamma_beta."), cond.unsqueeze(1)  # cond (B, 1, C)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, n, F)
        self.h = h
        self.delta_gamma, beta = self.linear.forward(self.cond).chunk(2, dim=-1)  # (B, 1, F) each
        return (1.0 + self.delta_gamma) * h + beta

    def backward(self, dy: torch.Tensor, input_grad: bool = True) -> torch.Tensor | None:
        d_gamma_beta = torch.cat([(dy * self.h).sum(dim=1, keepdim=True), dy.sum(dim=1, keepdim=True)], dim=-1)  # (B, 1, 2F)
        self.linear.backward(d_gamma_beta, input_grad=False)
        return (1.0 + self.delta_gamma) * dy if input_grad else None


class _Residual:
    """x + path(x) (a residual ``ProjectionHead``)."""

    def __init__(self, path: LayerPath) -> None:
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.path.forward(x)

    def backward(self, dy: torch.Tensor, input_grad: bool = True) -> torch.Tensor | None:
        dx = self.path.backward(dy, input_grad)
        return dy + dx if input_grad else None


class LayerPath:
    """Layers from features (B, n, F) to normalised embeddings (B, n, D), run forward and backward by hand."""

    def __init__(self, layers: list) -> None:
        self.layers = layers

    @classmethod
    def of(cls, head: ProjectionHead, p: Copies, prefix: str, film: _FiLM | None = None) -> LayerPath:
        """``film`` (if any), then ``head`` (its Linear and GELU layers), then normalisation."""
        layers = [] if film is None else [film]
        net = []
        for i, layer in enumerate(head.net):
            if isinstance(layer, nn.Linear):
                net.append(_Linear(p, f"{prefix}net.{i}."))
            elif isinstance(layer, nn.GELU):
                net.append(_GELU(layer))
            else:
                raise TypeError(f"no stacked layer for {type(layer).__name__} in {prefix}net.{i}")
        layers += [_Residual(cls(net))] if getattr(head, "residual", False) else net
        return cls(layers + [_Normalize()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dz: torch.Tensor, input_grad: bool = False) -> torch.Tensor | None:
        """Fill the gradient buffers of the trained copies, from d loss / d embeddings; the features get a gradient
        only with ``input_grad`` (a path inside a residual layer)."""
        for i in reversed(range(len(self.layers))):
            dz = self.layers[i].backward(dz, input_grad=i > 0 or input_grad)
        return dz


def support_losses(z_image: torch.Tensor, z_text: torch.Tensor, scale: torch.Tensor | float,
                    labels: torch.Tensor) -> torch.Tensor:
    """(B,) each episode's contrastive loss between its support images (B, S, D) and class prompts (B, N, D)."""
    classes = torch.arange(z_text.shape[1], device=labels.device)
    return torch.func.vmap(lambda zi, zt: contrastive_loss(zi, zt, scale, labels, classes))(z_image, z_text)


@torch.no_grad()
def train_copies(p: Copies, image: LayerPath, support: torch.Tensor, text: LayerPath, texts: torch.Tensor,
                  scale: torch.Tensor | float, labels: torch.Tensor, steps: int, lr: float) -> None:
    """Train the trainable copies in ``p`` with Adam on each episode's own support loss, in place.

    Args:
        p: stacked copies (``stacked_copies``).
        image: the image path, read from ``p``.
        support: (B, S, F_I) support image features.
        text: the text path, read from ``p``.
        texts: (B, N, F_T) class prompt features.
        scale: the inverse temperature of the loss.
        labels: (S,) the support labels, the same in every episode of a set.
        steps: Adam steps.
        lr: Adam's learning rate.
    """
    trained = [t for t in p.values() if t.requires_grad]
    # fused: one pass over each tensor per step (the copies are large: the optimiser's memory traffic dominates)
    optimizer = torch.optim.Adam(trained, lr=lr, fused=True)
    for _ in range(steps):
        z_image = image.forward(support).requires_grad_()  # (B, S, D) leaves: autograd differentiates the loss alone
        z_text = text.forward(texts).requires_grad_()  # (B, N, D)
        with torch.enable_grad():
            total = support_losses(z_image, z_text, scale, labels).sum()  # episodes are independent
            dz_image, dz_text = torch.autograd.grad(total, (z_image, z_text))
        image.backward(dz_image)  # each copy gets its own gradient; the model's own weights get none
        text.backward(dz_text)
        optimizer.step()


def model_path(model: nn.Module, p: Copies, modality: str, conds: torch.Tensor) -> LayerPath:
    """What ``model.embed_image`` (or ``embed_text``) computes, with each copy's FiLM (on its own conditioning
    vector, conds (B, C)) and head from ``p``."""
    film = _FiLM(p, f"film_{modality}.", conds) if getattr(model, f"film_{modality}") is not None else None
    return LayerPath.of(getattr(model, f"head_{modality}"), p, f"head_{modality}.", film)
