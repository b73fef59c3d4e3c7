"""HF CLIP towers: the two halves of one ``transformers.CLIPModel``, each with its own projection.

``load_clip`` loads the model once; ``clip_image_tower`` and ``clip_text_tower`` take their half of
it, so a run with both towers from one folder holds (and reads) the weights once.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from metacontrastive.models.towers.base import Tower, parameter_device, resize

__all__ = ["CLIPImageTower", "CLIPTextTower", "clip_image_tower", "clip_text_tower", "load_clip"]


class CLIPImageTower(Tower):
    """CLIP's vision transformer and visual projection: float images in [0, 1] (B, 3, H, W) to (B, out_dim).

    Args:
        vision_model: a ``CLIPVisionModel`` (``CLIPModel.vision_model``).
        projection: ``CLIPModel.visual_projection``.
        mean: per-channel mean of the CLIP image processor.
        std: per-channel standard deviation of the CLIP image processor.
        image_size: side inputs are resized to; None: the model's own ``image_size``. Another size
            interpolates the position embeddings.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        projection: nn.Linear,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.vision_model, self.projection = vision_model, projection
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        native = vision_model.config.image_size
        side = image_size or native
        self.input_size = (side, side)
        self._forward_kwargs = {"interpolate_pos_encoding": True} if side != native else {}
        self.out_dim = projection.out_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (resize(images, self.input_size, "bicubic") - self.mean) / self.std  # (B, 3, S, S)
        pooled = self.vision_model(pixel_values=x, **self._forward_kwargs).pooler_output  # (B, width)
        return self.projection(pooled)  # (B, out_dim)


class CLIPTextTower(Tower):
    """CLIP's text transformer (end-of-text token pooled) and text projection: B strings to (B, out_dim).

    Args:
        text_model: a ``CLIPTextModel`` (``CLIPModel.text_model``).
        projection: ``CLIPModel.text_projection``.
        tokenizer: the CLIP tokenizer saved with the model.
    """

    def __init__(self, text_model: nn.Module, projection: nn.Linear, tokenizer) -> None:
        super().__init__()
        self.text_model, self.projection, self.tokenizer = text_model, projection, tokenizer
        self.max_length = min(tokenizer.model_max_length, text_model.config.max_position_embeddings)  # CLIP: 77
        self.out_dim = projection.out_features

    def forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(parameter_device(self))  # (B, L) ids and mask
        pooled = self.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        return self.projection(pooled)  # (B, out_dim)


def load_clip(path: str) -> nn.Module:
    """Load a ``transformers.CLIPModel`` in float32 from a local folder or a hub id (where you have access)."""
    from transformers import CLIPModel  # imported here: transformers takes seconds to import

    return CLIPModel.from_pretrained(path).float()  # float32 master weights whatever the checkpoint's dtype


def clip_image_tower(clip: nn.Module, path: str, image_size: int | None = None) -> CLIPImageTower:
    """The image half of a loaded CLIP; ``path`` supplies the processor's mean and std if it saved them."""
    mean, std = _image_statistics(path)
    return CLIPImageTower(clip.vision_model, clip.visual_projection, mean, std, image_size)


def clip_text_tower(clip: nn.Module, path: str) -> CLIPTextTower:
    """The text half of a loaded CLIP, with the tokenizer saved in ``path``."""
    from transformers import AutoTokenizer

    return CLIPTextTower(clip.text_model, clip.text_projection, AutoTokenizer.from_pretrained(path))


def _image_statistics(path: str) -> tuple[list[float], list[float]]:
    """(mean, std) from ``preprocessor_config.json`` beside the model, else OpenAI CLIP's."""
    from transformers.utils import cached_file
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    try:
        file = cached_file(path, "preprocessor_config.json")
    except OSError:  # saved without its processor: every released CLIP uses OpenAI's statistics
        file = None
    config = json.loads(Path(file).read_text()) if file else {}
    return config.get("image_mean", OPENAI_CLIP_MEAN), config.get("image_std", OPENAI_CLIP_STD)
