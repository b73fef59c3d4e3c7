"""DomainConditionedCLIP: towers, domain FiLM, projection heads and a learned temperature.

The forward pass is split in two so that meta-learning can reuse tower features:
``features`` runs the towers (the slow weights), ``embed`` applies domain FiLM and the projection
heads (the fast weights) to features. ``embed`` takes optional ``fast`` replacements for any of its
parts, which is how an inner loop substitutes its adapted clones (see ``metacontrastive.meta``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from metacontrastive.data.features import FrozenTower
from metacontrastive.errors import BadInput
from metacontrastive.models.conditioning import DomainEmbedding, FiLM, TailFiLM
from metacontrastive.models.tail import Tail, split_tail
from metacontrastive.models.towers import build_towers
from metacontrastive.models.towers.base import parameter_device, support_statistics, weights_digest

__all__ = ["DomainConditionedCLIP", "EncoderConfig", "ProjectionHead"]


class ProjectionHead(nn.Module):
    """Linear-GELU-Linear adapter into the shared space (the second seed paper's projection).

    Args:
        in_dim: feature size.
        hidden_dim: hidden width.
        out_dim: size of the shared space.
        residual: h + net(h) with the last layer initialised to zero, so that the untrained head is the identity
            and the pretrained space stays reachable (needs ``in_dim == out_dim``).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, residual: bool = False) -> None:
        super().__init__()
        if residual and in_dim != out_dim:
            raise ValueError(f"a residual head keeps its input's size, {in_dim}, but the shared space has {out_dim}: "
                             f"set model.encoder.embed_dim={in_dim} or model.encoder.residual_image_head=false")
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        self.residual = residual
        if residual:
            nn.init.zeros_(self.net[2].weight)
            nn.init.zeros_(self.net[2].bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.net(h) if self.residual else self.net(h)


@dataclass(frozen=True)
class EncoderConfig:
    """The dual encoder's options: towers, domain conditioning, heads and temperature (every default here).

    Read by LightningCLI as ``--model.encoder.<field>``.

    Attributes:
        image_tower: image tower name, e.g. ``tiny``, ``timm:resnet18``, ``hf-clip:/path`` (see
            ``metacontrastive.models.towers``).
        text_tower: text tower name, e.g. ``tiny``, ``minilm``, ``hf:/path``, ``hf-clip:/path``; two
            ``hf-clip`` towers share one load, and ``hf-clip`` alone takes the other tower's folder.
        image_pretrained: a local weight file for a ``timm:`` image tower (None: random init).
        image_size: side the image tower resizes its inputs to (None: the backbone's own input size;
            ``data.image_size`` is the side images are decoded at).
        freeze_image: freeze the image tower: no gradients, eval mode.
        freeze_text: freeze the text tower: no gradients, eval mode.
        embed_dim: size of the shared embedding space.
        hidden_dim: hidden width of the projection heads.
        domain_dim: size of the domain embeddings.
        condition_image: apply FiLM to image features.
        condition_text: apply FiLM to text features.
        init_temperature: initial softmax temperature (CLIP: 0.07).
        max_logit_scale: clamp on the inverse temperature (CLIP: 100).
        residual_image_head: the image head is h + MLP(h), the identity at initialisation (``ProjectionHead``),
            so the untrained model's image embeddings are the normalised tower features; needs ``embed_dim``
            equal to the image tower's feature size.
        center_support: subtract the mean of each task's support image features from all its image features
            before FiLM and the head (SimpleShot's centring, on the support set: inductive), in training and
            evaluation alike.
        support_norm: outside training (validation, test, ``evaluate``; whether or not the tower is frozen), the
            image tower's BatchNorm layers normalise each task with its support images' statistics (AdaBN on the
            support set; ``towers.base.support_statistics``) instead of their running statistics. Training
            tasks always use the running statistics. Off for pretrained towers unless a measurement says
            otherwise: it renormalises ImageNet statistics on 5 to 25 images.
        grad_checkpointing: recompute the trainable timm and transformers towers' activations in the backward
            pass instead of keeping them (``Tower.set_grad_checkpointing``): less memory for large towers and
            meta-batches, about one more tower forward of time.
        tail: where the image tower is cut (``models.tail``): ``none`` (the pooled features are the tower's output,
            image FiLM acts on them), ``head`` (the 1x1 head conv and its BatchNorm are the tail) or ``last_stage``
            (the last stage and the head). With a tail, the feature cache holds the trunk's activations, the tail
            runs on them, and ``condition_image`` puts FiLM after each of the tail's BatchNorms instead of on the
            pooled features. EfficientNet towers only.
        train_tail: the tail's weights train (and may adapt in the inner loop: ``adapt_scope=tail``) from the
            pretrained ones; else they stay frozen like the trunk.
    """

    image_tower: str = "tiny"
    text_tower: str = "tiny"
    image_pretrained: str | None = None
    image_size: int | None = None
    freeze_image: bool = False
    freeze_text: bool = False
    embed_dim: int = 128
    hidden_dim: int = 256
    domain_dim: int = 32
    condition_image: bool = True
    condition_text: bool = True
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    residual_image_head: bool = False
    center_support: bool = False
    support_norm: bool = False
    grad_checkpointing: bool = False
    tail: Tail = "none"
    train_tail: bool = False


class DomainConditionedCLIP(nn.Module):
    """A CLIP-style dual encoder whose features are modulated by a learned domain embedding.

    Args:
        num_domains: known domains; id ``num_domains`` is ``unknown``.
        config: towers, conditioning, heads and temperature.
    """

    def __init__(self, num_domains: int, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.image_tower, self.text_tower = build_towers(config.image_tower, config.text_tower, config.image_pretrained,
                                                         config.image_size, config.freeze_image, config.freeze_text)
        if config.grad_checkpointing:  # a frozen tower keeps no activations for a backward pass
            towers = [t for t in (self.image_tower, self.text_tower) if not t.frozen and t.supports_grad_checkpointing]
            if not towers:
                raise ValueError("model.encoder.grad_checkpointing=true, but no trainable tower supports it (timm: and "
                                 "hf: / minilm towers do; the small built-in towers keep few activations): set it to false")
            for tower in towers:
                tower.set_grad_checkpointing(True)
        # with a tail, the image tower returns its trunk's activations and the tail the pooled features
        self.image_tail = split_tail(self.image_tower, config.tail) if config.tail != "none" else None
        if self.image_tail is not None:
            self.image_tail.requires_grad_(not self.image_tower.frozen or config.train_tail)
        elif config.train_tail:
            raise ValueError("model.encoder.train_tail=true needs a tail: set model.encoder.tail=head or last_stage")
        img_dim = self.image_tail.out_dim if self.image_tail is not None else self.image_tower.out_dim
        txt_dim = self.text_tower.out_dim
        conditioned = config.condition_image or config.condition_text
        # without conditioning there is no domain embedding at all: an unused parameter breaks DDP
        self.domain = DomainEmbedding(num_domains, config.domain_dim) if conditioned else None
        self.num_domains = num_domains
        tail_film = config.condition_image and self.image_tail is not None
        self.film_image = FiLM(config.domain_dim, img_dim) if config.condition_image and not tail_film else None
        self.film_tail = TailFiLM(config.domain_dim, self.image_tail.film_channels) if tail_film else None
        self.film_text = FiLM(config.domain_dim, txt_dim) if config.condition_text else None
        self.head_image = ProjectionHead(img_dim, config.hidden_dim, config.embed_dim, config.residual_image_head)
        self.head_text = ProjectionHead(txt_dim, config.hidden_dim, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self._text_cache: dict[str, torch.Tensor] = {}  # prompt -> features of a frozen text tower
        self._digests: dict[str, str] = {}  # frozen tower -> weights digest (they never change)
        self.max_log_scale = math.log(config.max_logit_scale)

    @property
    def unknown_domain(self) -> int:
        return self.num_domains  # the last row of the domain table

    def scale(self) -> torch.Tensor:
        """The inverse temperature exp(logit_scale), clamped as in CLIP."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def digest(self, name: str) -> str:
        """The weights digest of a frozen tower (``image_tower`` or ``text_tower``), computed once."""
        if name not in self._digests:
            self._digests[name] = weights_digest(getattr(self, name))
        return self._digests[name]

    def frozen_tower_digests(self) -> dict[str, str]:
        """The towers a checkpoint names instead of storing (frozen, with weights that come from their name),
        by attribute, with their weights digests."""
        return {name: self.digest(name) for name in ("image_tower", "text_tower")
                if getattr(self, name).frozen and getattr(self, name).pretrained}

    def check_frozen_towers(self, digests: Mapping[str, str]) -> None:
        """Refuse a checkpoint whose named towers (``frozen_tower_digests`` when it was saved) had other weights
        than the towers built here from the same names."""
        for name, digest in digests.items():
            tower, which = getattr(self, name), getattr(self.config, name)
            ours = self.digest(name)[:16] if tower.frozen else "trainable weights"
            if not tower.frozen or self.digest(name) != digest:
                raise BadInput(f"the checkpoint's {name} ({which}) had weights with digest {digest[:16]}, but the tower "
                               f"built here has {ours}: install the weights it was trained with (the same weights "
                               "package or file), or retrain")

    @property
    def image_tower_id(self) -> str:
        """Names the image tower, its weights, its input size and where it is cut: what cached features were made by."""
        size = getattr(self.image_tower, "input_size", None)
        cut = f"@trunk-{self.config.tail}" if self.image_tail is not None else ""
        return f"{self.config.image_tower}@{self.digest('image_tower')[:16]}@{size[0] if size else 'any'}px{cut}"

    def frozen_image_tower(self, adapted: bool = False) -> FrozenTower:
        """The image tower as the data path sees it (``data.features``); ``adapted``: it sits in the inner loop's
        scope. Its features may be cached when it is frozen and they do not depend on the task."""
        tower, size = self.image_tower, getattr(self.image_tower, "input_size", None)
        why_not = ("the image tower trains (model.encoder.freeze_image=false)" if not tower.frozen else
                   "the towers adapt in the inner loop (model.adapt_scope=all)" if adapted else
                   "model.encoder.support_norm renormalises the image tower on each task" if self.config.support_norm
                   else None)
        return FrozenTower(tower, self.image_tower_id if why_not is None else "", size[0] if size else None, why_not)

    def features(
        self, images: torch.Tensor | None, texts: list[str], fast: Mapping[str, nn.Module] | None = None,
        support: int | None = None, cached: tuple[torch.Tensor, str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tower features h_I and h_T (M, F_T): ``image_features`` and ``text_features`` together."""
        return self.image_features(images, fast, support, cached), self.text_features(texts, fast)

    def image_features(
        self, images: torch.Tensor | None, fast: Mapping[str, nn.Module] | None = None, support: int | None = None,
        cached: tuple[torch.Tensor, str] | None = None,
    ) -> torch.Tensor:
        """Image tower features: h_I (B, F_I), or with a tail the trunk's activations (B, C, h, w).

        Args:
            images: (B, 3, H, W) images in [0, 1] (None when ``cached`` gives their features).
            fast: adapted replacements for parts of the model.
            support: the first ``support`` images are a task's support set (for ``support_norm``).
            cached: the image tower's features (or trunk activations, float16 in the cache), computed before, and the
                id of the tower that made them: the tower is then the identity on them, after a check that it is the
                tower they name.
        """
        if cached is not None:
            h_image, made_by = cached
            if not self.image_tower.frozen or made_by != self.image_tower_id:
                raise BadInput(f"cached image features were made by {made_by}, but this model's image tower is "
                               f"{self.config.image_tower} ({'trainable' if not self.image_tower.frozen else self.image_tower_id}): "
                               "rebuild the feature cache (data.feature_cache) for this tower, or turn it off")
            return h_image.float()
        image_tower = self._part("image_tower", fast)
        norm = (support_statistics(image_tower, images[:support])
                if self.config.support_norm and support and not self.training else contextlib.nullcontext())
        with norm:
            return image_tower(images)

    def text_features(self, texts: list[str], fast: Mapping[str, nn.Module] | None = None) -> torch.Tensor:
        """Text tower features h_T (M, F_T)."""
        return self._text_features(self._part("text_tower", fast), texts)

    def _text_features(self, tower: nn.Module, texts: list[str]) -> torch.Tensor:
        """A frozen text tower maps a prompt to the same features every time, and the same prompts recur in
        every episode of a domain: its features are computed once per prompt and kept (up to 65536)."""
        if not getattr(tower, "frozen", False):
            return tower(texts)
        device = parameter_device(tower)
        if next(iter(self._text_cache.values()), torch.empty(0, device=device)).device != device:
            self._text_cache.clear()  # the model moved
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            if len(self._text_cache) + len(missing) > 65536:
                self._text_cache.clear()
            with torch.no_grad():
                self._text_cache.update(zip(missing, tower(missing)))
        return torch.stack([self._text_cache[t] for t in texts])  # (M, F_T)

    def embed_image(self, h_image: torch.Tensor, domain_id: int | torch.Tensor,
                    fast: Mapping[str, nn.Module] | None = None) -> torch.Tensor:
        """Condition image features (B, F_I) on the domain and project them: normalised z_I (B, D)."""
        return self._embed("image", h_image, domain_id, fast)

    def embed_text(self, h_text: torch.Tensor, domain_id: int | torch.Tensor,
                   fast: Mapping[str, nn.Module] | None = None) -> torch.Tensor:
        """Condition text features (M, F_T) on the domain and project them: normalised z_T (M, D)."""
        return self._embed("text", h_text, domain_id, fast)

    def embed(
        self,
        h_image: torch.Tensor,
        h_text: torch.Tensor,
        domain_id: int | torch.Tensor,
        fast: Mapping[str, nn.Module] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition features on the domain and project them: normalised z_I (B, D) and z_T (M, D).

        Args:
            h_image: (B, F_I) image features.
            h_text: (M, F_T) text features.
            domain_id: one domain id for all rows, (B,) ids for images and texts alike when B == M, or a
                float (C,) conditioning vector (a blend of domain embeddings, ``meta.blend_domains``).
            fast: adapted replacements for parts of the model, by attribute name.
        """
        return self.embed_image(h_image, domain_id, fast), self.embed_text(h_text, domain_id, fast)

    def tail_features(self, h: torch.Tensor, domain_id: int | torch.Tensor | None = None,
                      fast: Mapping[str, nn.Module] | None = None, prefixed: bool = False) -> torch.Tensor:
        """The pooled image features (B, F_I) that FiLM and the head read: ``image_features`` themselves without a tail;
        with one, the tail on trunk activations h (B, C, h, w) (or on its prefix, ``prefixed``), its FiLM conditioned
        on ``domain_id`` (None: no FiLM, the frozen tower's own features)."""
        tail = self._part("image_tail", fast)
        if tail is None:
            return h
        film = self._part("film_tail", fast)
        coefficients = film(self._conditioning(domain_id, fast, h.device)) if film is not None and domain_id is not None else None
        return tail(h, coefficients, prefixed)

    def encode_image(self, images: torch.Tensor | None, domain_id: int | torch.Tensor,
                     cached: tuple[torch.Tensor, str] | None = None) -> torch.Tensor:
        """Normalised embeddings (B, D) of images (B, 3, H, W), or of their ``cached`` features, in the domain's
        conditioning."""
        return self.embed_image(self.tail_features(self.image_features(images, cached=cached), domain_id), domain_id)

    def _conditioning(self, domain_id: int | torch.Tensor, fast: Mapping[str, nn.Module] | None,
                      device: torch.device) -> torch.Tensor:
        """The conditioning vector of a domain id (1, C), of per-row ids (B, C), or a given vector (C,) itself."""
        if torch.is_tensor(domain_id) and domain_id.is_floating_point():  # a blend of domain embeddings
            return domain_id
        return self._part("domain", fast)(torch.as_tensor(domain_id, device=device).reshape(-1))

    def _embed(self, modality: str, h: torch.Tensor, domain_id: int | torch.Tensor,
               fast: Mapping[str, nn.Module] | None) -> torch.Tensor:
        film = self._part(f"film_{modality}", fast)
        if film is not None:
            h = film(h, self._conditioning(domain_id, fast, h.device))
        return F.normalize(self._part(f"head_{modality}", fast)(h), dim=-1)

    def forward(
        self, images: torch.Tensor, texts: list[str], domain_id: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed images and texts of one domain: normalised (B, D) and (M, D)."""
        h_image, h_text = self.features(images, texts)
        return self.embed(self.tail_features(h_image, domain_id), h_text, domain_id)

    def _part(self, name: str, fast: Mapping[str, nn.Module] | None) -> nn.Module | None:
        if fast is not None and name in fast:
            return fast[name]
        return getattr(self, name)
