"""Training callbacks: hooks that later methods plug into the one training loop.

A callback is any object with some of these methods (all optional)::

    on_train_start(trainer)          # after the model, optimizer and data are built
    after_step(trainer)              # after every optimizer step (e.g. clip latent weights)
    on_epoch_end(trainer, metrics)   # may add entries to the epoch's metrics dict

Recipes name callbacks in ``train.callbacks``: either a registered name (see
:func:`register_callback`) or an import path ``"package.module:attribute"``; the attribute is
called with no arguments to make the callback.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Callback", "register_callback", "list_callbacks", "build_callbacks"]

_REGISTRY: dict[str, Callable[[], Any]] = {}


class Callback:
    """Base class with no-op hooks (subclassing it is optional)."""

    def on_train_start(self, trainer: Any) -> None:
        """Called once before the first epoch."""

    def after_step(self, trainer: Any) -> None:
        """Called after every optimizer step."""

    def on_epoch_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        """Called after evaluation; may add keys to ``metrics``."""


def register_callback(name: str, factory: Callable[[], Any] | None = None) -> Any:
    """Register a callback factory under ``name`` (usable as a decorator)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"callback name must be a non-empty str without ':', got {name!r}")

    def deco(fn: Callable[[], Any]) -> Callable[[], Any]:
        _REGISTRY[name] = fn
        return fn

    return deco(factory) if factory is not None else deco


def list_callbacks() -> list[str]:
    """Registered callback names, sorted."""
    return sorted(_REGISTRY)


def _make(name: str) -> Any:
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"train.callbacks: cannot import {name!r}: {exc}") from None
        return factory()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown callback {name!r} in train.callbacks.{hint} Registered: "
            f"{', '.join(list_callbacks()) or '(none)'}; or give 'package.module:attribute'"
        )
    return _REGISTRY[name]()


def build_callbacks(names: Iterable[str]) -> list[Any]:
    """Instantiate the callbacks named in a recipe."""
    return [_make(n) for n in names]


class ClipLatentWeights(Callback):
    """After every step, clamp the latent weights of binary/ternary layers to [-bound, bound].

    The BinaryNet rule (``lowbit.nn.clip_latent_weights``); named ``"clip_latent_weights"`` in
    ``train.callbacks``.
    """

    def __init__(self, bound: float = 1.0) -> None:
        self.bound = float(bound)

    def after_step(self, trainer: Any) -> None:
        from ..nn import clip_latent_weights

        clip_latent_weights(trainer.model, self.bound)


register_callback("clip_latent_weights", ClipLatentWeights)
