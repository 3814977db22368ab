"""Small models: MLP, the tiny CNN for 8x8 digits, LeNet-5."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .registry import register_model

_ACTIVATIONS = {"relu": nn.ReLU, "hardtanh": nn.Hardtanh, "tanh": nn.Tanh}


def make_activation(name: str) -> nn.Module:
    """An activation module by name: ``"relu"``, ``"hardtanh"`` or ``"tanh"``."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


class MLP(nn.Module):
    """Flatten, then ``Linear -> [BN] -> act -> [dropout]`` per hidden width, then a classifier,
    optionally followed by ``BatchNorm1d`` (``final_bn``, the BinaryNet/QNN head)."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        activation: str = "relu",
        batchnorm: bool = False,
        dropout: float = 0.0,
        final_bn: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(make_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        # With a BN after it the classifier's bias is redundant (the BN shift replaces it).
        self.classifier = nn.Linear(width, num_classes, bias=not final_bn)
        self.final_bn = nn.BatchNorm1d(num_classes) if final_bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.classifier(self.features(x))
        return self.final_bn(y) if self.final_bn is not None else y


@register_model
def mlp(
    num_classes: int = 10,
    in_channels: int = 1,
    hidden: Sequence[int] = (256, 256),
    in_shape: Sequence[int] | None = None,
    in_features: int | None = None,
    activation: str = "relu",
    batchnorm: bool = False,
    dropout: float = 0.0,
    final_bn: bool = False,
) -> nn.Module:
    """Multi-layer perceptron on flattened inputs.

    The input width is ``in_features`` if given, else ``prod(in_shape)``, else
    ``in_channels * 28 * 28`` (MNIST). ``final_bn`` adds a ``BatchNorm1d`` (affine) after the
    classifier, which then has no bias: the head of the BinaryNet/QNN MNIST net, whose binary
    classifier's outputs need rescaling before a squared hinge loss.
    """
    if in_features is None:
        shape = tuple(in_shape) if in_shape is not None else (in_channels, 28, 28)
        in_features = math.prod(shape)
    if isinstance(hidden, int):
        hidden = (hidden,)
    if in_features < 1 or any(int(h) < 1 for h in hidden):
        raise ValueError(f"mlp: widths must be positive, got in={in_features} hidden={hidden}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"mlp: dropout must be in [0, 1), got {dropout}")
    return MLP(int(in_features), [int(h) for h in hidden], num_classes, activation, batchnorm,
               dropout, bool(final_bn))


def conv_bn_act(cin: int, cout: int, activation: str = "relu") -> list[nn.Module]:
    """3x3 same-padding convolution (no bias), BatchNorm, activation."""
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            make_activation(activation)]


@register_model
def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    """Tiny CNN for 8x8 digits (any input size works): 3 convs, global pool, one linear."""
    w = int(width)
    return nn.Sequential(
        *conv_bn_act(in_channels, w),
        *conv_bn_act(w, 2 * w),
        nn.MaxPool2d(2),
        *conv_bn_act(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


@register_model
def lenet5(
    num_classes: int = 10, in_channels: int = 1, in_size: int = 28, activation: str = "relu"
) -> nn.Module:
    """LeNet-5: 6C5-MP2-16C5-MP2-120FC-84FC. 28x28 inputs are zero-padded by 2 to 32x32."""
    if in_size not in (28, 32):
        raise ValueError(f"lenet5: in_size must be 28 or 32, got {in_size}")
    pad = 2 if in_size == 28 else 0
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=pad),
        make_activation(activation),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        make_activation(activation),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        make_activation(activation),
        nn.Linear(120, 84),
        make_activation(activation),
        nn.Linear(84, num_classes),
    )
