"""Calibration: stream a few hundred images through a model once and collect statistics of
the inputs of every convolution and linear layer (per tensor and per channel)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .stats import RunningStats

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _batch_input(batch) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError("calibration batches must be tensors or (input, target) pairs, "
                    f"got {type(batch).__name__}")


def calibration_layers(model: nn.Module) -> list[str]:
    """Names of the conv/linear layers whose inputs :func:`calibrate` observes."""
    return [n for n, m in model.named_modules() if isinstance(m, (*_CONVS, nn.Linear))]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    loader: Iterable,
    *,
    num_samples: int = 512,
    layers: list[str] | None = None,
    max_samples: int = 4096,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, RunningStats]:
    """Run up to ``num_samples`` inputs through ``model`` (eval mode, one pass) and return the
    streamed statistics of each observed layer's input, keyed by layer name.

    Conv inputs use the channel axis 1, linear inputs the last axis. ``loader`` yields input
    tensors or (input, target) pairs; the last batch is truncated to ``num_samples``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    names = calibration_layers(model) if layers is None else list(layers)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; valid: {calibration_layers(model)}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    stats: dict[str, RunningStats] = {}
    handles = []
    for i, name in enumerate(names):
        mod = modules[name]
        axis = 1 if isinstance(mod, _CONVS) else -1
        stats[name] = RunningStats(axis=axis, max_samples=max_samples, seed=seed + i)

        def hook(_m, args, _name=name):
            stats[_name].update(args[0])

        handles.append(mod.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in loader:
            x = _batch_input(batch)
            if seen + x.shape[0] > num_samples:
                x = x[: num_samples - seen]
            model(x.to(device))
            seen += x.shape[0]
            if seen >= num_samples:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("the calibration loader yielded no data")
    return stats
