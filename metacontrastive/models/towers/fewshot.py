"""The standard few-shot backbones, trained from scratch: Conv-4 and ResNet-12.

``conv4`` is the four-block ConvNet of Matching Networks, ProtoNet and MAML (Vinyals et al. 2016; Snell et
al. 2017; Finn et al. 2017): 3x3 convolution, BatchNorm, ReLU and 2x2 max-pooling, four times, features
flattened; here they are average-pooled to a 2 x 2 grid first, so the feature size (4 x 64 = 256) does
not depend on the input size (at 32 px the grid is already 2 x 2: the papers' flattening). ``resnet12`` is the residual network of TADAM and MetaOptNet
(Oreshkin et al. 2018; Lee et al. 2019): four residual blocks of three 3x3 convolutions with 64, 160, 320
and 640 channels, each followed by 2x2 max-pooling, then global average pooling (640). Both take float
images in [0, 1] at the size the data module decodes them (or ``image_size``) and normalise them per
channel to [-1, 1].
"""
from __future__ import annotations

import torch
from torch import nn

from metacontrastive.models.towers.base import Tower, resize

__all__ = ["Conv4", "ResNet12"]


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class Conv4(Tower):
    """Four conv blocks of ``width`` channels, pooled to a 2 x 2 grid and flattened.

    Args:
        width: channels of every block (64 in the papers).
        image_size: side inputs are resized to; None keeps the size they come at (at least 16 px).
    """

    def __init__(self, width: int = 64, image_size: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(*(_conv_block(3 if i == 0 else width, width) for i in range(4)), nn.AdaptiveAvgPool2d(2))
        self.input_size = None if image_size is None else (image_size, image_size)
        self.out_dim = 4 * width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (resize(images, self.input_size) - 0.5) / 0.5  # (B, 3, H, W) in [-1, 1]
        return self.net(x).flatten(1)  # (B, 4 * width)


class _ResBlock(nn.Module):
    """Three 3x3 conv-BN (LeakyReLU 0.1 between), a 1x1 conv-BN shortcut, LeakyReLU, 2x2 max-pooling."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(Tower):
    """ResNet-12 with global average pooling.

    Args:
        widths: channels of the four blocks ((64, 160, 320, 640) in the papers).
        image_size: side inputs are resized to; None keeps the size they come at.
    """

    def __init__(self, widths: tuple[int, ...] = (64, 160, 320, 640), image_size: int | None = None) -> None:
        super().__init__()
        chans = (3, *widths)
        self.net = nn.Sequential(*(_ResBlock(a, b) for a, b in zip(chans[:-1], chans[1:])))
        self.input_size = None if image_size is None else (image_size, image_size)
        self.out_dim = widths[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (resize(images, self.input_size) - 0.5) / 0.5  # (B, 3, H, W) in [-1, 1]
        return self.net(x).mean(dim=(2, 3))  # (B, widths[-1])
