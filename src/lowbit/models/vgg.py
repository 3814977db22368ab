"""VGG-style CIFAR nets: VGG-small and the BinaryNet CIFAR-10 ConvNet."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model
from .simple import make_activation


def _conv_stack(in_channels: int, widths: list[int], activation: str) -> list[nn.Module]:
    """(2 x C3) per width, max-pool after the second conv of each pair; conv-[MP]-BN-act order
    as in the BinaryNet Theano code."""
    layers: list[nn.Module] = []
    cin = in_channels
    for w in widths:
        for k in range(2):
            layers.append(nn.Conv2d(cin, w, 3, padding=1, bias=False))
            if k == 1:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.BatchNorm2d(w), make_activation(activation)]
            cin = w
    return layers


def _scaled(width: float, *base: int) -> list[int]:
    if width <= 0:
        raise ValueError(f"width multiplier must be positive, got {width}")
    return [max(1, round(b * width)) for b in base]


class VGGCifar(nn.Module):
    """Conv stack 2x(a)C3-MP2-2x(b)C3-MP2-2x(c)C3-MP2, then fully connected layers."""

    def __init__(
        self,
        conv_widths: list[int],
        fc_widths: list[int],
        num_classes: int,
        in_channels: int,
        in_size: int,
        activation: str,
        final_bn: bool,
    ) -> None:
        super().__init__()
        if in_size % 8 != 0:
            raise ValueError(f"in_size must be a multiple of 8, got {in_size}")
        self.features = nn.Sequential(*_conv_stack(in_channels, conv_widths, activation))
        flat = conv_widths[-1] * (in_size // 8) ** 2
        layers: list[nn.Module] = [nn.Flatten()]
        for w in fc_widths:
            layers += [nn.Linear(flat, w, bias=False), nn.BatchNorm1d(w),
                       make_activation(activation)]
            flat = w
        layers.append(nn.Linear(flat, num_classes, bias=not final_bn))
        if final_bn:
            layers.append(nn.BatchNorm1d(num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model
def vgg_small(
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    in_size: int = 32,
    activation: str = "relu",
) -> nn.Module:
    """VGG-Small: 2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-FC, BN after every conv (~4.7M params)."""
    return VGGCifar(_scaled(width, 128, 256, 512), [], num_classes, in_channels, in_size,
                    activation, final_bn=False)


@register_model
def binarynet_cifar(
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    in_size: int = 32,
    activation: str = "hardtanh",
) -> nn.Module:
    """The BinaryNet CIFAR-10 ConvNet (Courbariaux/Hubara et al. 2016):
    2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-2x1024FC-10, BN after every layer including the last,
    hard-tanh activations (~14M params). ``width`` scales every hidden width."""
    return VGGCifar(_scaled(width, 128, 256, 512), _scaled(width, 1024, 1024), num_classes,
                    in_channels, in_size, activation, final_bn=True)
