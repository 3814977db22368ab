"""Fold inference-mode BatchNorm into the preceding convolution or linear layer.

For a BN in eval mode, y = gamma (x - mu) / sqrt(var + eps) + beta. If x = W * in + b, then
y = W' * in + b' with, per output channel,

    W' = W * gamma / sqrt(var + eps),      b' = (b - mu) * gamma / sqrt(var + eps) + beta.

The arithmetic is done in float64 and stored in the layer's dtype, so the folded model matches
the original up to float rounding. Any ``groups`` works (the scale is per output channel).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

_FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MAXPOOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _bn_scale(bn: nn.Module) -> torch.Tensor:
    var = bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    return gamma / torch.sqrt(var + bn.eps)


@torch.no_grad()
def fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """Fold ``bn`` into ``layer`` in place (a bias is added if missing) and return ``layer``."""
    if not isinstance(layer, _FOLDABLE_LAYERS):
        raise TypeError(f"layer must be one of {[c.__name__ for c in _FOLDABLE_LAYERS]}, "
                        f"got {type(layer).__name__}")
    if not isinstance(bn, _BATCHNORMS):
        raise TypeError(f"bn must be one of {[c.__name__ for c in _BATCHNORMS]}, "
                        f"got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics "
                         "(track_running_stats=False)")
    out = layer.weight.shape[0]
    if bn.num_features != out:
        raise ValueError(f"BatchNorm has {bn.num_features} features but the layer has {out} "
                         "output channels")
    mu = bn.running_mean.double()
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mu)
    k = _bn_scale(bn)
    w = layer.weight.double() * k.reshape([-1] + [1] * (layer.weight.dim() - 1))
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(mu)
    b = (b - mu) * k + beta
    layer.weight.copy_(w.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(b.to(layer.weight.dtype))
    else:
        layer.bias.copy_(b.to(layer.bias.dtype))
    return layer


def _bn_pairs(model: nn.Module) -> list[tuple[str, str, bool]]:
    """(layer, bn, through_pool) for every BN fed only by a foldable layer's output."""
    import torch.fx

    gm = torch.fx.symbolic_trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def single_module_input(node):
        if len(node.args) != 1 or node.kwargs:
            return None
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            return None
        return src

    triples = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BATCHNORMS):
            continue
        src = single_module_input(node)
        through_pool = False
        if src is not None and isinstance(modules.get(src.target), _MAXPOOLS):
            through_pool = True
            src = single_module_input(src)
        if src is None or not isinstance(modules.get(src.target), _FOLDABLE_LAYERS):
            continue
        # a module called at several places cannot be folded for one of them only
        if calls[src.target] == 1 and calls[node.target] == 1:
            triples.append((src.target, node.target, through_pool))
    return triples


def find_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer name, bn name) pairs where the BN's only input is the layer's output.

    A max-pool between the two is allowed (conv -> maxpool -> BN, as in BinaryNet-style
    VGGs): max-pooling commutes with a per-channel affine map whose scale is positive, which
    :func:`fold_batchnorms` checks before folding. Uses a torch.fx trace, so only true
    dataflow pairs are found; raises if the model cannot be traced.
    """
    return [(a, b) for a, b, _ in _bn_pairs(model)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fold_batchnorms(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv/linear layer; BNs become Identity.

    Returns the folded model (a copy unless ``inplace``), in eval mode. If the model cannot
    be traced by torch.fx, a warning is issued and nothing is folded.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    try:
        triples = _bn_pairs(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "cannot analyse"
        warnings.warn(f"BN folding skipped: the model could not be traced by torch.fx ({exc})",
                      stacklevel=2)
        return model
    for layer_name, bn_name, through_pool in triples:
        bn = model.get_submodule(bn_name)
        if through_pool and not bool((_bn_scale(bn) > 0).all()):
            continue  # max-pool does not commute with a negative scale
        fold_bn(model.get_submodule(layer_name), model.get_submodule(bn_name))
        _set_submodule(model, bn_name, nn.Identity())
    return model
