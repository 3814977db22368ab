"""Model zoo, registered by name: ``lowbit.models.create("resnet20", num_classes=10)``.

Names: mlp, small_cnn, lenet5, resnet20, resnet32, resnet56, vgg_small, binarynet_cifar,
alexnet, resnet18, resnet50, lstm_lm, transformer_lm. Layers are defined in forward order,
so the first and last ``Linear``/``Conv2d`` in ``model.modules()`` are the network's first and
last layers (what ``lowbit.convert`` keeps at higher precision).
"""

from __future__ import annotations

from . import imagenet, lm, resnet_cifar, simple, vgg  # noqa: F401  (registers the models)
from .registry import create, list_models, register_model

__all__ = ["create", "list_models", "register_model"]
