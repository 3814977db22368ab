"""Shared test helpers (imported by test modules; not collected as tests)."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(model: nn.Module, g: torch.Generator, gamma: tuple[float, float] = (-0.5, 1.5),
                 beta: tuple[float, float] = (-0.3, 0.3)) -> nn.Module:
    """Give every BatchNorm2d of ``model`` uniform random gamma/beta in the given ranges and
    random running statistics (a freshly built network's BNs are identities); returns it."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) * (gamma[1] - gamma[0]) + gamma[0]
            m.bias.data = torch.rand(n, generator=g) * (beta[1] - beta[0]) + beta[0]
            m.running_mean.data = torch.randn(n, generator=g) * 0.2
            m.running_var.data = torch.rand(n, generator=g) + 0.5
    return model
