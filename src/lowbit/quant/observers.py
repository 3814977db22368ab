"""Range estimators (observers): choose the scale and zero point of a quantizer.

Each observer watches tensors through :meth:`Observer.update` and keeps a running range
``[min_val, max_val]`` in buffers (so it travels with ``state_dict``), per tensor or per
channel along ``axis``. :meth:`Observer.compute_qparams` turns the range into
``(scale, zero_point)`` for a format with :func:`qparams_from_range`:

* signed integer formats: symmetric, ``scale = max(|min|, |max|) / qmax``, zero point 0;
* unsigned integer formats: affine, the range is widened to include 0, then
  ``scale = (max - min) / (qmax - qmin)`` and ``zero_point = qmin - round(min / scale)``
  clamped to ``[qmin, qmax]`` (so 0.0 is represented exactly);
* minifloats: ``scale = max(|min|, |max|) / fmt.max`` (the range maps onto the format's
  largest finite value), zero point 0.

The scale is never 0: it is clamped below by the smallest normal float32, so an all-zero
tensor quantizes to zeros instead of NaN. No method synchronises with the device
(no ``.item()``) on the update / compute path.

Observers:

``MinMaxObserver``     running minimum and maximum of everything seen.
``EMAObserver``        exponential moving average of each batch's min and max, with PyTorch
                       semantics ``running = (1 - momentum) * running + momentum * new``; the
                       first batch initialises the running values.
``PercentileObserver`` per batch the ``100 - p`` and ``p`` percentiles (linear interpolation,
                       as ``numpy.percentile``), averaged over batches.
``MSEObserver``        per batch the clipping of the range (a ratio in ``(0, 1]`` of the
                       min/max range, searched over ``num_candidates`` evenly spaced values)
                       that minimises the mean squared quantization error of the batch in the
                       observer's format; the clipped ranges are averaged over batches.

Set ``observer.frozen = True`` to stop updates (e.g. after calibration).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.formats import get_format
from lowbit.quant.spec import _format_kind

SCALE_EPS = torch.finfo(torch.float32).tiny

__all__ = [
    "SCALE_EPS",
    "Observer",
    "MinMaxObserver",
    "EMAObserver",
    "PercentileObserver",
    "MSEObserver",
    "OBSERVERS",
    "qparams_from_range",
    "tensor_range",
    "make_observer",
]


def _check_tensor(x: Any, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis={axis} does not exist for a {ndim}-d tensor; valid axes are "
            f"{-ndim}..{ndim - 1}"
        )
    return axis % ndim


def tensor_range(x: Tensor, axis: int | None = None) -> tuple[Tensor, Tensor]:
    """``(min, max)`` of ``x``, over everything (``axis=None``) or per index of ``axis``."""
    if axis is None:
        return torch.aminmax(x)
    ax = _normalize_axis(axis, x.dim())
    if x.dim() == 1:
        return x, x
    if ax == 0 and x.is_contiguous():  # (aminmax with dim= is slower than amin + amax)
        rows = x.reshape(x.shape[0], -1)
        return rows.amin(dim=1), rows.amax(dim=1)
    dims = tuple(d for d in range(x.dim()) if d != ax)
    return torch.amin(x, dim=dims), torch.amax(x, dim=dims)


def qparams_from_range(
    min_val: Tensor, max_val: Tensor, fmt: Any, *, symmetric: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map ``[min_val, max_val]`` onto the format.

    Works elementwise, so per-channel ranges give per-channel parameters. ``symmetric=None``
    picks symmetric for signed formats and affine for unsigned ones. Returns float32
    ``scale`` (never below :data:`SCALE_EPS`) and int32 ``zero_point`` tensors.
    """
    fmt = get_format(fmt)
    kind = _format_kind(fmt)
    min_val = min_val.float()
    max_val = max_val.float()
    if kind == "float":
        if symmetric is False:
            raise ValueError(f"symmetric=False (affine) needs an integer format, not {fmt.name!r}")
        amax = torch.maximum(min_val.neg(), max_val)
        scale = (amax / float(fmt.max)).clamp_min_(SCALE_EPS)
        return scale, torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
    if kind != "int":
        raise ValueError(
            f"format {fmt.name!r} chooses its own scale; observers serve integer and "
            "minifloat formats only"
        )
    qmin, qmax = int(fmt.qmin), int(fmt.qmax)
    if symmetric is None:
        symmetric = bool(fmt.signed)
    if symmetric:
        amax = torch.maximum(min_val.neg(), max_val)
        scale = (amax / float(qmax)).clamp_min_(SCALE_EPS)
        zp = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        if not fmt.signed:
            zp.fill_(qmin)
        return scale, zp
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    scale = ((max_pos - min_neg) / float(qmax - qmin)).clamp_min_(SCALE_EPS)
    zp = torch.round(min_neg / scale).neg_().add_(qmin).clamp_(qmin, qmax).to(torch.int32)
    return scale, zp


class Observer(nn.Module):
    """Base class: a running range per tensor (``axis=None``) or per channel along ``axis``.

    Args:
        axis: channel axis for per-channel ranges, ``None`` for one range per tensor.
        channels: number of channels, if known (sizes the buffers up front; otherwise they
            take their size from the first update or from a loaded ``state_dict``).
        fmt: default format for :meth:`compute_qparams`.
    """

    def __init__(self, *, axis: int | None = None, channels: int | None = None,
                 fmt: Any = None) -> None:
        super().__init__()
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"axis must be an int or None, got {type(axis).__name__}")
        if channels is not None and (not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels must be a positive int or None, got {channels!r}")
        self.axis = axis
        self.fmt = None if fmt is None else get_format(fmt)
        self.frozen = False
        shape: tuple[int, ...] = () if axis is None else (channels or 0,)
        self.register_buffer("min_val", torch.full(shape, math.inf))
        self.register_buffer("max_val", torch.full(shape, -math.inf))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))
        self._n = 0  # mirror of num_batches kept on the host (no device sync)

    # -- statistics ---------------------------------------------------------------------
    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(min, max) of this batch, per tensor or per channel."""
        return tensor_range(x, self.axis)

    def _channels_view(self, x: Tensor) -> Tensor:
        """x as ``[C, N]`` (per channel) or ``[1, N]`` (per tensor)."""
        if self.axis is None:
            return x.reshape(1, -1)
        ax = _normalize_axis(self.axis, x.dim())
        return x.movedim(ax, 0).reshape(x.shape[ax], -1)

    def _accumulate(self, new_min: Tensor, new_max: Tensor) -> None:
        """Combine a batch range with the running one (first batch: copy)."""
        raise NotImplementedError

    def _set(self, new_min: Tensor, new_max: Tensor) -> None:
        if self.min_val.shape == new_min.shape:
            self.min_val.copy_(new_min)
            self.max_val.copy_(new_max)
        else:  # per-channel buffers sized by the first batch
            self.min_val = new_min.detach().float().clone()
            self.max_val = new_max.detach().float().clone()

    @torch.no_grad()
    def batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The range this observer reads from one batch (min/max, percentiles, MSE clip),
        without updating anything."""
        _check_tensor(x)
        return self._batch_range(x.detach())

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Fold the range of ``x`` into the running range (no-op when ``frozen``)."""
        if self.frozen:
            return
        self.update_range(*self.batch_range(x))

    @torch.no_grad()
    def update_range(self, new_min: Tensor, new_max: Tensor) -> None:
        """Fold a batch range from :meth:`batch_range` into the running range (no-op when
        ``frozen``)."""
        if self.frozen:
            return
        if self.axis is not None and self._n > 0 and new_min.shape != self.min_val.shape:
            raise ValueError(
                f"x has {new_min.shape[0]} channels along axis {self.axis}, the observer "
                f"was built for {self.min_val.shape[0]}"
            )
        if self._n == 0:
            self._set(new_min, new_max)
        else:
            self._accumulate(new_min, new_max)
        self.num_batches += 1
        self._n += 1

    def forward(self, x: Tensor) -> Tensor:
        """Observe ``x`` and return it unchanged."""
        self.update(x)
        return x

    @property
    def initialized(self) -> bool:
        """True once the observer has seen data (or loaded a state that had)."""
        return self._n > 0

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.min_val.fill_(math.inf)
        self.max_val.fill_(-math.inf)
        self.num_batches.zero_()
        self._n = 0

    def compute_qparams(self, fmt: Any = None, *, symmetric: bool | None = None
                        ) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` for ``fmt`` (default: the observer's format)."""
        fmt = self._resolve_fmt(fmt)
        if self._n == 0:
            raise RuntimeError(
                f"{type(self).__name__} has seen no data: call update(x) (train the model or "
                "run calibration batches) before compute_qparams()"
            )
        return qparams_from_range(self.min_val, self.max_val, fmt, symmetric=symmetric)

    def _resolve_fmt(self, fmt: Any) -> Any:
        if fmt is None:
            if self.fmt is None:
                raise ValueError(f"fmt is required: {type(self).__name__} was built without one")
            return self.fmt
        return get_format(fmt)

    # -- state_dict: per-channel buffers may change size, host mirror follows --------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        for name in ("min_val", "max_val"):
            key = prefix + name
            current = getattr(self, name)
            if (self.axis is not None and current.numel() == 0 and key in state_dict
                    and state_dict[key].dim() == 1):
                # lazily sized per-channel buffer: take the saved size
                setattr(self, name, torch.empty(state_dict[key].shape, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._n = int(self.num_batches)

    def extra_repr(self) -> str:
        parts = [f"axis={self.axis}"]
        if self.fmt is not None:
            parts.append(f"fmt={self.fmt.name}")
        if self.frozen:
            parts.append("frozen=True")
        return ", ".join(parts)


class MinMaxObserver(Observer):
    """Running minimum and maximum of every tensor seen."""

    def _accumulate(self, new_min: Tensor, new_max: Tensor) -> None:
        torch.minimum(self.min_val, new_min, out=self.min_val)
        torch.maximum(self.max_val, new_max, out=self.max_val)


class EMAObserver(Observer):
    """Exponential moving average of per-batch min and max (PyTorch convention).

    ``running = (1 - momentum) * running + momentum * batch``; the first batch sets the
    running values.
    """

    def __init__(self, momentum: float = 0.1, *, axis: int | None = None,
                 channels: int | None = None, fmt: Any = None) -> None:
        super().__init__(axis=axis, channels=channels, fmt=fmt)
        if not isinstance(momentum, (int, float)) or not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be a number in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)

    def _accumulate(self, new_min: Tensor, new_max: Tensor) -> None:
        # written as running + m * (new - running), the exact arithmetic of
        # torch.ao's MovingAverageMinMaxObserver (lerp_ rounds differently)
        self.min_val.add_((new_min.float() - self.min_val).mul_(self.momentum))
        self.max_val.add_((new_max.float() - self.max_val).mul_(self.momentum))

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, " + super().extra_repr()


def _cumulative_mean(running: Tensor, new: Tensor, n: int) -> None:
    """running <- running + (new - running) / (n + 1), where n batches are in running."""
    running.add_((new.float() - running) / float(n + 1))


def _percentile_rows(rows: Tensor, q: float) -> Tensor:
    """q-th percentile (0..100) of each row of a 2-d tensor, linear interpolation."""
    n = rows.shape[1]
    pos = q / 100.0 * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    v_lo = torch.kthvalue(rows, lo + 1, dim=1).values
    if frac == 0.0 or hi == lo:
        return v_lo
    v_hi = torch.kthvalue(rows, hi + 1, dim=1).values
    return v_lo + (v_hi - v_lo) * frac


class PercentileObserver(Observer):
    """Per-batch ``100 - percentile`` and ``percentile`` percentiles, averaged over batches.

    Interpolates linearly between order statistics like ``numpy.percentile``.
    """

    def __init__(self, percentile: float = 99.99, *, axis: int | None = None,
                 channels: int | None = None, fmt: Any = None) -> None:
        super().__init__(axis=axis, channels=channels, fmt=fmt)
        if not isinstance(percentile, (int, float)) or not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be a number in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        rows = self._channels_view(x).float()
        lo = _percentile_rows(rows, 100.0 - self.percentile)
        hi = _percentile_rows(rows, self.percentile)
        if self.axis is None:
            return lo[0], hi[0]
        return lo, hi

    def _accumulate(self, new_min: Tensor, new_max: Tensor) -> None:
        _cumulative_mean(self.min_val, new_min, self._n)
        _cumulative_mean(self.max_val, new_max, self._n)

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, " + super().extra_repr()


class MSEObserver(Observer):
    """Clipped range minimising the mean squared quantization error, averaged over batches.

    For each batch, candidate ranges ``r * [min, max]`` with ``r`` in
    ``{1/K, 2/K, ..., 1}`` (``K = num_candidates``) are quantized in ``fmt`` and the ``r``
    with the smallest mean squared error (per tensor or per channel; the smallest ``r``
    on ties) is kept. Needs ``fmt`` at construction.
    """

    def __init__(self, num_candidates: int = 100, *, axis: int | None = None,
                 channels: int | None = None, fmt: Any = None) -> None:
        super().__init__(axis=axis, channels=channels, fmt=fmt)
        if not isinstance(num_candidates, int) or isinstance(num_candidates, bool) or (
            num_candidates < 1
        ):
            raise ValueError(f"num_candidates must be a positive int, got {num_candidates!r}")
        self.num_candidates = num_candidates

    def candidate_ratios(self) -> Tensor:
        k = self.num_candidates
        return torch.arange(1, k + 1, dtype=torch.float64).div_(k).float()

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        from lowbit.quant.functional import fake_quantize

        if self.fmt is None:
            raise ValueError("MSEObserver needs fmt (the format whose error it minimises)")
        mn, mx = super()._batch_range(x)
        rows = self._channels_view(x).float()
        axis = None if self.axis is None else 0
        best_err = None
        best_r = None
        for r in self.candidate_ratios().tolist():
            scale, zp = qparams_from_range(mn * r, mx * r, self.fmt)
            if axis is None:
                q = fake_quantize(rows, self.fmt, scale=scale, zero_point=zp)
            else:
                q = fake_quantize(rows, self.fmt, scale=scale, zero_point=zp, axis=0)
            err = (q - rows).square_().mean(dim=1)
            ratio = torch.full_like(err, r)
            if best_err is None:
                best_err, best_r = err, ratio
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_r = torch.where(better, ratio, best_r)
        if self.axis is None:
            best_r = best_r[0]
        return mn.float() * best_r, mx.float() * best_r

    def _accumulate(self, new_min: Tensor, new_max: Tensor) -> None:
        _cumulative_mean(self.min_val, new_min, self._n)
        _cumulative_mean(self.max_val, new_max, self._n)

    def compute_qparams(self, fmt: Any = None, *, symmetric: bool | None = None
                        ) -> tuple[Tensor, Tensor]:
        if fmt is not None and self.fmt is not None and get_format(fmt) != self.fmt:
            raise ValueError(
                f"MSEObserver searched its range for {self.fmt.name!r}; compute_qparams was "
                f"asked for {get_format(fmt).name!r}"
            )
        return super().compute_qparams(fmt, symmetric=symmetric)

    def extra_repr(self) -> str:
        return f"num_candidates={self.num_candidates}, " + super().extra_repr()


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, *, axis: int | None = None, channels: int | None = None,
                  fmt: Any = None, **kwargs: Any) -> Observer:
    """Build an observer by its short name (``"minmax"``, ``"ema"``, ``"percentile"``,
    ``"mse"``)."""
    if name not in OBSERVERS:
        from lowbit.quant.spec import _choices_error

        raise _choices_error("observer", name, tuple(OBSERVERS))
    return OBSERVERS[name](axis=axis, channels=channels, fmt=fmt, **kwargs)
