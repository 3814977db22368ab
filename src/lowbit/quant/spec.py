"""QuantSpec: everything needed to quantize one tensor, as a small typed record.

A spec names a number format (``"int8"``, ``"uint4"``, ``"binary"``, ``"e5m2"``...), the
granularity of its scale (one per tensor, per channel along ``axis``, or per group of
``group_size`` values), the rounding, and the range estimator (observer) that chooses the
scale. Specs are plain data: they can be written as a short string (``QuantSpec.parse("int8")``)
or as a dict (from a TOML recipe) and are validated once, at construction.

Observers (the ``observer`` field):

``"dynamic"``
    the range of the tensor being quantized, recomputed at every call, nothing stored
    (weights in QAT; the current-batch range of the 8-bit training paper).
``"minmax"`` | ``"ema"`` | ``"percentile"`` | ``"mse"``
    stateful range estimators from :mod:`lowbit.quant.observers` (activations in QAT,
    calibration for post-training quantization).
``"none"``
    no scale at all: minifloats are used at their native range (the FP8 training paper),
    binary/ternary as the format defines them. Not valid for integer formats.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("nearest", "stochastic")
TRAIN_RANGES = ("running", "batch")
STATELESS_OBSERVERS = ("dynamic", "none")


def _choices_error(arg: str, value: object, choices: tuple[str, ...] | list[str]) -> ValueError:
    """A ValueError naming the argument, the valid choices and the closest match."""
    msg = f"{arg}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}"
    if isinstance(value, str):
        close = difflib.get_close_matches(value, list(choices), n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    return ValueError(msg)


def _observer_classes() -> dict[str, type]:
    from lowbit.quant.observers import OBSERVERS

    return OBSERVERS


def _format_kind(fmt: Any) -> str:
    """'int', 'float', 'binary', 'ternary' or 'other' for a resolved format."""
    from lowbit import formats

    for kind, cls_name in (
        ("int", "IntFormat"),
        ("float", "FloatFormat"),
        ("binary", "BinaryFormat"),
        ("ternary", "TernaryFormat"),
    ):
        cls = getattr(formats, cls_name, None)
        if cls is not None and isinstance(fmt, cls):
            return kind
    return "other"


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    Args:
        fmt: number format name (see :func:`lowbit.formats.get_format`) or a Format.
        granularity: ``"tensor"``, ``"channel"`` (one scale per index of ``axis``) or
            ``"group"`` (one scale per ``group_size`` consecutive values along ``axis``).
        axis: channel axis; ``None`` lets the module choose (weights 0, activations the
            feature axis).
        group_size: values per group when ``granularity="group"``.
        rounding: ``"nearest"`` (round half to even) or ``"stochastic"``.
        observer: ``"dynamic"``, ``"minmax"``, ``"ema"``, ``"percentile"``, ``"mse"`` or
            ``"none"`` (see the module docstring); ``None`` (default) picks ``"dynamic"``
            for integer formats and ``"none"`` for the others (the format as it is).
        observer_kwargs: keyword arguments of the observer class (e.g. ``momentum``).
        symmetric: ``None`` chooses from the format: symmetric for signed formats, affine
            (with a zero point) for unsigned ones.
        enabled: ``False`` turns the quantizer into the identity.
        train_range: ``"running"`` or ``"batch"``: the range that quantizes a training batch
            when the observer is stateful (see the module docstring).
    """

    fmt: Any
    granularity: str = "tensor"
    axis: int | None = None
    group_size: int | None = None
    rounding: str = "nearest"
    observer: str | None = None
    observer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    symmetric: bool | None = None
    enabled: bool = True
    train_range: str = "running"

    def __post_init__(self) -> None:
        from lowbit.formats import get_format

        fmt = get_format(self.fmt)  # raises ValueError listing the valid names
        kind = _format_kind(fmt)
        if self.granularity not in GRANULARITIES:
            raise _choices_error("granularity", self.granularity, GRANULARITIES)
        if self.rounding not in ROUNDINGS:
            raise _choices_error("rounding", self.rounding, ROUNDINGS)
        if self.train_range not in TRAIN_RANGES:
            raise _choices_error("train_range", self.train_range, TRAIN_RANGES)
        if self.observer is None:  # the format as it is; integers need a range
            object.__setattr__(self, "observer", "dynamic" if kind == "int" else "none")
        observers = (*STATELESS_OBSERVERS, *_observer_classes())
        if self.observer not in observers:
            raise _choices_error("observer", self.observer, observers)
        if self.axis is not None and (isinstance(self.axis, bool) or not isinstance(self.axis, int)):
            raise TypeError(f"axis must be an int or None, got {type(self.axis).__name__}")
        if self.granularity == "tensor" and self.axis is not None:
            raise ValueError(
                f"axis={self.axis} given with granularity='tensor'; use granularity='channel' "
                "or 'group' for a per-axis scale"
            )
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or (
                self.group_size < 1
            ):
                raise ValueError(
                    f"granularity='group' needs group_size, a positive int; got {self.group_size!r}"
                )
            if self.observer != "dynamic":
                raise ValueError(
                    f"granularity='group' works with observer='dynamic' only, got {self.observer!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} given with granularity={self.granularity!r}; "
                "group_size needs granularity='group'"
            )
        if self.observer == "none" and kind == "int":
            raise ValueError(
                f"observer='none' is not valid for the integer format {fmt.name!r}: an integer "
                "format needs a scale; choose observer 'dynamic', 'minmax', 'ema', "
                "'percentile' or 'mse'"
            )
        if kind in ("binary", "ternary") and self.observer not in STATELESS_OBSERVERS:
            raise ValueError(
                f"format {fmt.name!r} chooses its own scale; use observer 'none' or 'dynamic', "
                f"not {self.observer!r}"
            )
        if self.symmetric is False and kind != "int":
            raise ValueError(f"symmetric=False (affine) needs an integer format, not {fmt.name!r}")
        if not isinstance(self.observer_kwargs, Mapping):
            raise TypeError("observer_kwargs must be a mapping of keyword arguments")
        if self.observer_kwargs:
            if self.observer in STATELESS_OBSERVERS:
                raise ValueError(
                    f"observer_kwargs given but observer={self.observer!r} takes no arguments"
                )
            cls = _observer_classes()[self.observer]
            params = inspect.signature(cls.__init__).parameters
            valid = [
                p for p in params
                if p not in ("self", "axis", "channels", "fmt") and not p.startswith("_")
            ]
            for key in self.observer_kwargs:
                if key not in valid:
                    raise _choices_error(f"observer_kwargs key for {self.observer!r}", key, valid)
        object.__setattr__(self, "observer_kwargs", dict(self.observer_kwargs))

    __hash__ = None  # type: ignore[assignment]  # observer_kwargs is a dict

    @property
    def format(self) -> Any:
        """The resolved :class:`lowbit.formats` Format object."""
        from lowbit.formats import get_format

        return get_format(self.fmt)

    @property
    def format_name(self) -> str:
        return str(self.format.name)

    @property
    def stateful(self) -> bool:
        """True when the observer keeps running statistics (buffers)."""
        return self.observer not in STATELESS_OBSERVERS

    def describe(self) -> str:
        """A short human-readable form, e.g. ``'int8/channel'`` or ``'uint8/ema'``."""
        parts = [self.format_name]
        if self.granularity == "channel":
            parts.append("channel")
        elif self.granularity == "group":
            parts.append(f"group{self.group_size}")
        if self.observer not in STATELESS_OBSERVERS:
            parts.append(self.observer)
            if self.train_range == "batch":
                parts.append("batch")
        if self.rounding == "stochastic":
            parts.append("sr")
        if not self.enabled:
            parts.append("off")
        return "/".join(parts)

    @classmethod
    def parse(cls, spec: QuantSpec | str | Mapping[str, Any] | None, **overrides: Any
              ) -> QuantSpec | None:
        """Build a spec from a format name, a dict (e.g. from TOML), or a spec.

        ``None`` stays ``None`` (no quantization). Keyword arguments override fields.
        """
        if spec is None:
            return None
        if isinstance(spec, QuantSpec):
            return replace(spec, **overrides) if overrides else spec
        if isinstance(spec, str):
            return cls(fmt=spec, **overrides)
        if isinstance(spec, Mapping):
            names = [f.name for f in fields(cls)]
            for key in spec:
                if key not in names:
                    raise _choices_error("QuantSpec field", key, names)
            return cls(**{**spec, **overrides})
        from lowbit.formats import get_format

        try:  # a Format object
            get_format(spec)
        except (TypeError, ValueError):
            raise TypeError(
                "spec must be a QuantSpec, a format name (str), a dict of QuantSpec fields or "
                f"None, got {type(spec).__name__}"
            ) from None
        return cls(fmt=spec, **overrides)
