"""Model registry: builders registered by name, created with :func:`create`."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}


def register_model(name: str | Callable | None = None) -> Any:
    """Register a model builder under ``name`` (default: the function's name).

    Usable bare (``@register_model``) or with a name (``@register_model("resnet20")``).
    A builder takes ``num_classes`` and ``in_channels`` keywords and returns an ``nn.Module``.
    """

    def deco(fn: B, key: str | None = None) -> B:
        key = key or fn.__name__
        if not isinstance(key, str) or not key:
            raise TypeError(f"register_model: name must be a non-empty str, got {key!r}")
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise ValueError(f"register_model: a model named {key!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    if callable(name):
        return deco(name)
    return lambda fn: deco(fn, name)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def create(
    name: str, num_classes: int = 10, in_channels: int | None = None, **kw: Any
) -> nn.Module:
    """Build the registered model ``name``.

    ``in_channels`` defaults to the model's own default (1 for the MNIST/digits models, 3 for
    the CIFAR/ImageNet ones). For language models ``num_classes`` is the vocabulary size.
    Unknown names or keyword arguments raise with the valid choices.
    """
    if not isinstance(name, str):
        raise TypeError(f"create: name must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}.{_suggest(name, list_models())} "
            f"Valid names: {', '.join(list_models())}"
        )
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"create: num_classes must be a positive int, got {num_classes!r}")
    fn = _REGISTRY[name]
    params = inspect.signature(fn).parameters
    args: dict[str, Any] = {"num_classes": num_classes, **kw}
    if in_channels is not None:
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"create: in_channels must be a positive int, got {in_channels!r}")
        args["in_channels"] = in_channels
    accepts_var = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not accepts_var:
        bad = [k for k in args if k not in params]
        if bad:
            valid = [k for k in params if k not in ("self",)]
            hints = "".join(_suggest(k, valid) for k in bad)
            raise TypeError(
                f"model {name!r} got unexpected argument(s) {', '.join(map(repr, bad))}.{hints} "
                f"Valid arguments: {', '.join(valid)}"
            )
    return fn(**args)
