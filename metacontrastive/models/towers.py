"""The tower factory: image and text encoders built from a name.

Every part of the project (training, evaluation, tests, notebooks) builds towers through
``build_image_tower`` and ``build_text_tower``. A tower is an ``nn.Module`` with an ``out_dim``
attribute; an image tower maps float images in [0, 1] of shape (B, 3, H, W) to (B, out_dim), a text
tower maps a list of strings to (B, out_dim) and owns its tokenizer.

Names:
    ``tiny``: small towers that train from scratch on a CPU in minutes.
"""
from __future__ import annotations

import re
import zlib

import torch
from torch import nn

__all__ = ["TinyImageTower", "TinyTextTower", "build_image_tower", "build_text_tower", "set_trainable"]


class TinyImageTower(nn.Module):
    """A four-stage convolutional encoder (GroupNorm, GELU), global average pooled.

    Args:
        width: channels of the first stage; doubled at each of the next two.
        out_dim: feature size.
    """

    def __init__(self, width: int = 32, out_dim: int = 128) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, out_dim]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.GroupNorm(8, c_out),
                nn.GELU(),
            ]
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - 0.5) / 0.5  # (B, 3, H, W) in [-1, 1]
        return self.net(x).mean(dim=(2, 3))  # (B, out_dim)


class TinyTextTower(nn.Module):
    """Hashed word tokens, a small Transformer encoder and masked mean pooling.

    Words are hashed with CRC32 into ``vocab_size`` buckets, so the tower needs no vocabulary file
    and any caption template works.

    Args:
        vocab_size: number of hash buckets (ids 0 and 1 are reserved for padding).
        dim: model width and feature size.
        depth: Transformer layers.
        heads: attention heads.
        max_len: tokens kept per text.
    """

    def __init__(self, vocab_size: int = 4096, dim: int = 128, depth: int = 1, heads: int = 4, max_len: int = 32) -> None:
        super().__init__()
        self.vocab_size, self.max_len, self.out_dim = vocab_size, max_len, dim
        self.token = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(B, max_len) token ids, 0 for padding."""
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for row, text in enumerate(texts):
            words = re.findall(r"[a-z0-9]+", text.lower())[: self.max_len]
            for col, word in enumerate(words):
                ids[row, col] = 2 + zlib.crc32(word.encode()) % (self.vocab_size - 2)
        return ids

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenize(texts).to(self.token.weight.device)  # (B, L)
        mask = ids != 0  # (B, L)
        x = self.token(ids) + self.position[: ids.shape[1]]  # (B, L, D)
        x = self.encoder(x, src_key_padding_mask=~mask)
        x = self.norm(x) * mask[..., None]
        return x.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, D)


def build_image_tower(name: str = "tiny") -> nn.Module:
    """Build an image tower from a name (see the module docstring)."""
    if name == "tiny":
        return TinyImageTower()
    raise ValueError(f"unknown image tower {name!r}; known: 'tiny'")


def build_text_tower(name: str = "tiny") -> nn.Module:
    """Build a text tower from a name (see the module docstring)."""
    if name == "tiny":
        return TinyTextTower()
    raise ValueError(f"unknown text tower {name!r}; known: 'tiny'")


def set_trainable(module: nn.Module, trainable: bool) -> nn.Module:
    """Freeze or unfreeze every parameter of ``module``; returns it for chaining."""
    for p in module.parameters():
        p.requires_grad_(trainable)
    return module
