"""Checkpoints: written atomically, loaded with a clear error when they do not fit.

A checkpoint is a ``dict`` saved with ``torch.save``: the model, optimizer, scheduler and loss
scaler states, the epoch, the best metric, the random-number states, the full resolved config and
the model name, so that ``lowbit eval`` can rebuild the model and ``--resume`` can continue
exactly where a run stopped.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit._io import atomic_write

__all__ = [
    "CheckpointError",
    "FORMAT",
    "atomic_save",
    "load_checkpoint",
    "find_checkpoint",
    "get_rng_state",
    "set_rng_state",
    "load_model_state",
    "load_init_weights",
]

FORMAT = "lowbit-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or was saved from a different model."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` through a temporary file in the same folder.

    The file appears under its final name only once it is completely written (``os.replace``),
    so a crash mid-write never leaves a broken checkpoint behind.
    """
    path = Path(path)
    with atomic_write(path) as f:
        torch.save(obj, f)
    return path


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file for ``path``: the file itself, or ``last.pt`` inside a run folder."""
    p = Path(path)
    if p.is_dir():
        if (p / "last.pt").is_file():
            return p / "last.pt"
        raise CheckpointError(f"no checkpoint to resume: {str(p)!r} holds no last.pt")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    return p


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a lowbit checkpoint (a file or a run folder) onto the CPU."""
    p = find_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"cannot read checkpoint {str(p)!r}: {exc}") from None
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{str(p)!r} is not a lowbit checkpoint (format {FORMAT})")
    ckpt = dict(ckpt)
    ckpt["path"] = str(p)
    return ckpt


def load_model_state(model: nn.Module, ckpt: Mapping[str, Any], model_name: str) -> None:
    """Load ``ckpt["model"]`` into ``model``, or raise :class:`CheckpointError` naming the mismatch."""
    saved = ckpt.get("model_name")
    if saved is not None and saved != model_name:
        raise CheckpointError(
            f"checkpoint {ckpt.get('path', '')!r} was saved from model {saved!r} but this run "
            f"builds {model_name!r}; use the matching recipe (or model.name={saved})"
        )
    state = ckpt["model"]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        raise CheckpointError(
            f"checkpoint {ckpt.get('path', '')!r} does not fit model {model_name!r} "
            f"(different model, width or quantization scheme?): {', '.join(parts)}"
        )
    model.load_state_dict(state)


# ----------------------------------------------------------------------------- RNG
def _module_generators(model: nn.Module | None) -> dict[str, torch.Generator]:
    """``torch.Generator`` attributes held by modules (e.g. for stochastic rounding)."""
    found: dict[str, torch.Generator] = {}
    if model is None:
        return found
    for mname, mod in model.named_modules():
        for attr, value in vars(mod).items():
            if isinstance(value, torch.Generator):
                found[f"{mname}:{attr}"] = value
    return found


def get_rng_state(model: nn.Module | None = None) -> dict[str, Any]:
    """Every random-number state a training step can draw from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "modules": {k: g.get_state() for k, g in _module_generators(model).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], model: nn.Module | None = None) -> None:
    """Restore the states captured by :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    gens = _module_generators(model)
    for key, gstate in state.get("modules", {}).items():
        if key in gens:
            gens[key].set_state(gstate)


def _float_state(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The state dict inside what ``torch.load`` returned for an initial-weights file."""
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        cfg = obj.get("config") or {}
        q = cfg.get("quant", {}) if isinstance(cfg, Mapping) else {}
        scheme, norm = q.get("scheme", "fp32"), q.get("norm", "bn")
        if "ptq" in obj or scheme not in ("", "fp32") or norm not in ("", "bn"):
            what = "post-training quantized" if "ptq" in obj else (
                f"quant.scheme={scheme!r}, quant.norm={norm!r}")
            raise CheckpointError(
                f"model.init needs float weights, but {where} holds a quantized model ({what}); "
                "give the FP32 checkpoint it came from, or resume this run with --resume")
        obj = obj["model"]
    elif isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):  # common wrappers
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{where} is neither a lowbit checkpoint nor a state dict of tensors")
    prefix = "module."  # saved from DistributedDataParallel / DataParallel
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def load_init_weights(model: nn.Module, path: str | os.PathLike, model_name: str) -> Path:
    """Load float weights into ``model`` (built but not yet quantized): a lowbit FP32 checkpoint
    (file or run folder: its ``model_best.pt``, else ``last.pt``) or a state-dict file
    (torchvision's layout, optionally wrapped in ``{"state_dict": ...}`` or saved from DDP).

    Raises :class:`CheckpointError` for a missing or unreadable file, a quantized checkpoint,
    and any missing, unexpected or mis-shaped tensor (``num_batches_tracked`` may be absent).
    Returns the file that was read.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "model_best.pt" if (p / "model_best.pt").is_file() else find_checkpoint(p)
    if not p.is_file():
        raise CheckpointError(f"model.init: {str(path)!r} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"model.init: cannot read {str(p)!r}: {exc}") from None
    saved = obj.get("model_name") if isinstance(obj, Mapping) else None
    state = _float_state(obj, f"model.init {str(p)!r}")
    own = model.state_dict()
    for k, v in own.items():  # older torchvision files lack the BN step counters
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v.clone()
    load_model_state(model, {"model": state, "model_name": saved, "path": str(p)}, model_name)
    return p
