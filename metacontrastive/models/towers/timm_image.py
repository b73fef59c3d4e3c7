"""timm image towers: any timm model by name, pooled features, its own normalisation and input size.

A local weight file goes through timm's loader (its checkpoint filters: renamed keys, resampled position
embeddings), but must fit the model: timm loads a file without its classifier non-strictly, so a file of
another architecture would load nothing and leave a random model; here it ends in one ``BadInput`` line.
"""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from metacontrastive.errors import BadInput
from metacontrastive.models.towers.base import Tower, read_state_dict, resize

__all__ = ["TimmImageTower", "timm_image_tower"]


class TimmImageTower(Tower):
    """A timm backbone without its classifier: float images in [0, 1] (B, 3, H, W) to (B, out_dim).

    The tower resizes its inputs to ``input_size`` and normalises them with the model's data-config
    statistics, so it takes the project's images at whatever size the data module decodes them.
    No crop: the data module already framed the image.

    Args:
        model: a timm model built with ``num_classes=0`` (pooled features).
        mean: per-channel mean of the model's data config.
        std: per-channel standard deviation of the model's data config.
        input_size: (H, W) the backbone runs at.
        interpolation: ``bilinear`` or ``bicubic``, as in the model's data config.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_size: tuple[int, int],
        interpolation: str = "bicubic",
    ) -> None:
        super().__init__()
        # channels-last activations: about 1.5x faster convolutions on a CPU (oneDNN), and what GPU kernels prefer
        self.model = model.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.input_size = tuple(input_size)
        self.interpolation = interpolation if interpolation in ("bilinear", "bicubic") else "bilinear"
        # some heads (MobileNetV3, ...) add a layer after pooling: head_hidden_size is then the output size
        self.out_dim = getattr(model, "head_hidden_size", None) or model.num_features

    supports_grad_checkpointing = True
    trunk_only = False  # cut by ``models.tail.split_tail``: the activations before the tail, (B, C, h, w)

    def set_grad_checkpointing(self, enable: bool = True) -> TimmImageTower:
        self.model.set_grad_checkpointing(enable)  # timm checkpoints block by block
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize(images, self.input_size, self.interpolation)  # (B, 3, S, S)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.model.forward_features(x) if self.trunk_only else self.model(x)  # (B, C, h, w) or (B, out_dim)


def timm_image_tower(model_name: str, pretrained: str | None = None, image_size: int | None = None) -> TimmImageTower:
    """Build a ``TimmImageTower`` from a timm model name.

    Args:
        model_name: any name of ``timm.list_models()``, e.g. ``resnet18`` or ``vit_tiny_patch16_224``.
        pretrained: a local weight file for that model (``.safetensors``, ``.pth``, ``.bin``), loaded
            by timm (classifier weights dropped); None: random initialisation.
        image_size: side the backbone runs at; None: the model's default input size. Fixed-size
            models (ViTs) are built for it, and timm resamples pretrained position embeddings.

    Raises:
        BadInput: ``pretrained`` is missing, is not a state dict, or does not fit the model (other
            tensors, other shapes; only the classifier may differ or be absent).
    """
    import timm  # imported here: it takes seconds that runs with the tiny towers should not pay
    from timm.data import resolve_model_data_config

    if not timm.is_model(model_name):
        raise BadInput(f"unknown timm model {model_name!r}; see timm.list_models()")
    kwargs: dict = {}
    if image_size is not None and getattr(timm.models.get_pretrained_cfg(model_name), "fixed_input_size", False):
        kwargs["img_size"] = image_size
    if pretrained is None:
        model = timm.create_model(model_name, num_classes=0, **kwargs)
    else:
        model = _load_timm_model(model_name, os.fspath(pretrained), kwargs)
    config = resolve_model_data_config(model)
    input_size = (image_size, image_size) if image_size is not None else tuple(config["input_size"][-2:])
    return TimmImageTower(model, config["mean"], config["std"], input_size, config.get("interpolation", "bicubic"))


def _load_timm_model(model_name: str, path: str, kwargs: dict) -> nn.Module:
    """``timm.create_model`` with the weights of a local file, or one ``BadInput`` line naming the file."""
    import timm

    what = f"weights of timm model {model_name!r}"
    if not os.path.isfile(path):
        raise BadInput(f"{what}: no weight file at {path}; check the path")
    try:
        with _timm_load_report() as report:
            model = timm.create_model(model_name, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={"file": path}, **kwargs)  # a local file, never a download
    except Exception as err:
        read_state_dict(path, what, reader=timm.models.load_state_dict)  # a file that is no state dict: BadInput
        if isinstance(err, RuntimeError) and "loading state_dict" in str(err):  # a shape that differs
            reason = " ".join(str(err).split())[:300]
            raise BadInput(f"{what}: {path} does not fit the model ({reason}); "
                           f"is it a {model_name} checkpoint?") from None
        raise
    if report:
        raise BadInput(f"{what}: {path} does not fit the model: {'; '.join(report)}; is it a {model_name} checkpoint? "
                       "(the classifier may differ or be absent, nothing else)")
    return model


@contextmanager
def _timm_load_report() -> Iterator[list[str]]:
    """Collect what timm's loader reports as missing or unexpected keys (it logs them instead of raising)."""
    found: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            match = re.match(r"(Missing|Unexpected) keys \((.*)\)", record.getMessage())
            if match:
                keys = match.group(2).split(", ")
                where = "missing from the file" if match.group(1) == "Missing" else "in the file but not the model"
                found.append(f"{len(keys)} tensors {where} (first: {', '.join(keys[:3])})")

    logger, handler = logging.getLogger("timm.models._builder"), _Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # timm reports missing keys at INFO
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
