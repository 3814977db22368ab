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
# callbacks that became recipe keys: name -> what to write instead
_MOVED = {
    "shift_batchnorm": 'quant.norm = "shift" (a module swap by lowbit.nn.convert, so the model '
                       "rebuilt for evaluation has shift BN too)",
}


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
    if name in _MOVED:
        raise ValueError(f"train.callbacks: {name!r} is no longer a callback; use {_MOVED[name]}")
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


class GlorotLRScale(Callback):
    """Per-layer learning rates of BNN/QNN: the latent-weight update of every layer with
    binary or ternary weights (the weights ``"clip_latent_weights"`` clips) is multiplied by
    the inverse of its Glorot initialisation range, ``1 / sqrt(1.5 / (fan_in + fan_out))``
    (:func:`lowbit.train.shift_adamax.glorot_lr_scale`).

    The Theano code's rule ``W <- W_old + scale * (W_new - W_old)`` is applied after each
    optimizer step through step hooks, so it works with any optimizer and leaves the
    optimizer's state (and resuming) unchanged. Biases, BN parameters and the weights of
    layers kept at higher precision (e.g. an 8-bit classifier) keep the plain rate.
    Named ``"glorot_lr"`` in ``train.callbacks``; ``"glorot_lr_pow2"`` rounds each scale to a
    power of two (the Torch7 code, used with shift-based AdaMax so the update stays a shift).
    The scaling happens inside the optimizer step, before after-step callbacks such as
    ``"clip_latent_weights"`` run.
    """

    def __init__(self, power_of_two: bool = False) -> None:
        self.power_of_two = bool(power_of_two)
        self.scales: list[tuple[Any, float]] = []
        self._before: list[Any] | None = None
        self._handles: list[Any] = []

    def on_train_start(self, trainer: Any) -> None:
        from ..nn import quantized_modules
        from .shift_adamax import glorot_lr_scale

        for h in self._handles:
            h.remove()
        self.scales = [
            (m.weight, glorot_lr_scale(m, power_of_two=self.power_of_two))
            for _, m in quantized_modules(trainer.model)
            if m.weight_quant is not None and m.weight_quant.kind in ("binary", "ternary")
        ]
        opt = trainer.optimizer
        self._handles = [opt.register_step_pre_hook(self._pre),
                         opt.register_step_post_hook(self._post)]

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._before = [p.detach().clone() for p, _ in self.scales]

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        import torch

        if self._before is None:
            return
        with torch.no_grad():
            for (p, scale), old in zip(self.scales, self._before):
                p.sub_(old).mul_(scale).add_(old)
        self._before = None


register_callback("glorot_lr", GlorotLRScale)
register_callback("glorot_lr_pow2", lambda: GlorotLRScale(power_of_two=True))
