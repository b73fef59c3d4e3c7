"""The ``tiny`` towers: small encoders that train from scratch on a CPU in minutes."""
from __future__ import annotations

import re
import zlib

import torch
from torch import nn

from metacontrastive.models.towers.base import Tower, resize

__all__ = ["TinyImageTower", "TinyTextTower"]


class TinyImageTower(Tower):
    """A four-stage convolutional encoder (GroupNorm, GELU), global average pooled.

    Args:
        width: channels of the first stage; doubled at each of the next two.
        out_dim: feature size.
        image_size: side inputs are resized to; None keeps the size they come at.
    """

    def __init__(self, width: int = 32, out_dim: int = 128, image_size: int | None = None) -> None:
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
        self.input_size = None if image_size is None else (image_size, image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (resize(images, self.input_size) - 0.5) / 0.5  # (B, 3, H, W) in [-1, 1]
        return self.net(x).mean(dim=(2, 3))  # (B, out_dim)


class TinyTextTower(Tower):
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
