"""Image and text towers, built by name through one factory.

Training, evaluation, tests and notebooks all build towers with ``build_image_tower``,
``build_text_tower`` or ``build_towers`` (see ``factory`` for the names). Every tower is a ``Tower``:
an ``nn.Module`` with ``out_dim``; image towers take float images in [0, 1], (B, 3, H, W), text towers
a ``list[str]``; both return (B, out_dim). timm and transformers are imported only when a tower
needs them. ``weights_digest(tower)`` names a tower's weights (sha256), e.g. for a feature cache.
"""
from metacontrastive.models.towers.base import Tower, weights_digest
from metacontrastive.models.towers.efficientnet_lite import efficientnet_lite_model, efficientnet_lite_tower
from metacontrastive.models.towers.factory import (
    IMAGE_TOWERS,
    TEXT_TOWERS,
    build_image_tower,
    build_text_tower,
    build_towers,
)
from metacontrastive.models.towers.fewshot import Conv4, ResNet12
from metacontrastive.models.towers.hf_clip import CLIPImageTower, CLIPTextTower
from metacontrastive.models.towers.hf_text import HFTextTower
from metacontrastive.models.towers.timm_image import TimmImageTower
from metacontrastive.models.towers.tiny import TinyImageTower, TinyTextTower

__all__ = [
    "IMAGE_TOWERS",
    "TEXT_TOWERS",
    "CLIPImageTower",
    "CLIPTextTower",
    "Conv4",
    "HFTextTower",
    "ResNet12",
    "TimmImageTower",
    "TinyImageTower",
    "TinyTextTower",
    "Tower",
    "build_image_tower",
    "build_text_tower",
    "build_towers",
    "efficientnet_lite_model",
    "efficientnet_lite_tower",
    "weights_digest",
]
