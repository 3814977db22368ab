"""Post-training quantization of a whole model: fold BN, calibrate, clip, allocate bits, correct.

:func:`quantize_model` turns a trained float model into a fake-quantized one made of
:class:`lowbit.nn.QConv2d`/:class:`lowbit.nn.QLinear` layers whose weight and input-activation
quantizers are :class:`RangeQuantizer` modules (a clipping range and a bit width per channel,
plus the bias-correction gain/offset for weights), and returns a :class:`PTQReport` with the
per-layer bits, clipping values and the MSE/SQNR of each tensor after each method.

Activations are the inputs of the conv/linear layers (the ``act_quant`` position of lowbit's
quantized layers); after ReLU they are non-negative and get the half-range treatment
automatically. Statistics come from one pass of the calibration data through the float
(BN-folded) model. The first and last layers get ``first_last_bits`` (the paper keeps them at
8 bits) and no bit allocation.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .bitalloc import allocate_bits
from .calibrate import calibrate
from .clipping import CLIP_METHODS, ClipRange, clip_range
from .correction import correction_params
from .fold import _bn_pairs, _bn_scale, _set_submodule
from .fold import fold_bn as _fold_bn
from .quantizer import fake_quant_range, sqnr_db
from .stats import Stats

META_VERSION = 1


@dataclass(frozen=True)
class RangeSpec:
    """What a :class:`RangeQuantizer` does, in words (``describe()`` like a QuantSpec)."""

    mean_bits: float
    granularity: str
    method: str

    def describe(self) -> str:
        bits = f"{self.mean_bits:g}"
        parts = [f"uint{bits}"]
        if self.granularity == "channel":
            parts.append("channel")
        parts.append(self.method)
        return "/".join(parts)


class RangeQuantizer(nn.Module):
    """Fake-quantizes a tensor to fixed ranges [lo, hi] with ``bits`` levels per channel.

    Buffers ``lo``, ``hi`` (float32), ``bits`` (int64), one entry per channel along ``axis``
    (or a single entry per tensor when ``axis`` is None), and optional ``gain``/``offset``
    (float32, per index of ``corr_axis``) applied after quantization:
    ``out = fake_quant(x) * gain + offset`` (bias correction of weights). Inference only: no
    gradient flows through the rounding.
    """

    kind = "int"

    def __init__(self, lo: Tensor, hi: Tensor, bits: Tensor, *, axis: int | None,
                 gain: Tensor | None = None, offset: Tensor | None = None,
                 corr_axis: int = 0, method: str = "") -> None:
        super().__init__()
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1)
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1)
        bits = torch.as_tensor(bits, dtype=torch.int64).reshape(-1)
        if not lo.shape == hi.shape == bits.shape:
            raise ValueError("lo, hi and bits must have the same number of entries")
        if axis is None and lo.numel() != 1:
            raise ValueError("a per-tensor RangeQuantizer (axis=None) takes one lo/hi/bits")
        self.axis = axis
        self.corr_axis = corr_axis
        self.method = method
        self.register_buffer("lo", lo.clone())
        self.register_buffer("hi", hi.clone())
        self.register_buffer("bits", bits.clone())
        if (gain is None) != (offset is None):
            raise ValueError("give both gain and offset, or neither")
        if gain is not None:
            self.register_buffer("gain", torch.as_tensor(gain, dtype=torch.float32).reshape(-1))
            self.register_buffer("offset",
                                 torch.as_tensor(offset, dtype=torch.float32).reshape(-1))
        else:
            self.gain = None
            self.offset = None

    @property
    def mean_bits(self) -> float:
        return float(self.bits.double().mean())

    @property
    def fmt(self):
        """The nominal unsigned format at the (rounded) mean bit width (for summaries)."""
        from lowbit.formats import get_format

        return get_format(f"uint{min(16, max(2, round(self.mean_bits)))}")

    @property
    def spec(self) -> RangeSpec:
        return RangeSpec(self.mean_bits, "tensor" if self.axis is None else "channel",
                         self.method)

    def forward(self, x: Tensor) -> Tensor:
        if self.axis is None:
            out = fake_quant_range(x, self.lo[0], self.hi[0], self.bits[0])
        else:
            out = fake_quant_range(x, self.lo, self.hi, self.bits, axis=self.axis)
        if self.gain is not None:
            shape = [1] * x.dim()
            shape[self.corr_axis] = -1
            out = out * self.gain.reshape(shape) + self.offset.reshape(shape)
        return out

    def extra_repr(self) -> str:
        bits = self.bits
        b = f"{int(bits[0])}" if bool((bits == bits[0]).all()) else (
            f"{int(bits.min())}..{int(bits.max())} (mean {self.mean_bits:g})")
        s = f"bits={b}, axis={self.axis}"
        if self.method:
            s += f", method={self.method}"
        if self.gain is not None:
            s += ", bias_corrected"
        return s


# ------------------------------------------------------------------------------------ report
@dataclass
class PTQReport:
    """Per-layer results of :func:`quantize_model` (and model metrics added by run_ptq)."""

    config: dict[str, Any]
    layers: list[dict[str, Any]]
    folded: list[list[str]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "folded_batchnorms": self.folded,
                "metrics": self.metrics, "layers": self.layers}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(_jsonable(self.to_dict()), indent=indent)

    def to_markdown(self) -> str:
        c = self.config
        lines = [
            "# Post-training quantization report",
            "",
            f"W{c['w_bits']}A{c['a_bits']}, activation clipping `{c['clip']}`, weight clipping "
            f"`{c['w_clip']}`, bit allocation {'on' if c['bit_alloc'] else 'off'}, bias "
            f"correction {c['bias_correction'] or 'off'}, first/last layers at "
            f"{c['first_last_bits'] or 'the same'} bits, {len(self.folded)} BatchNorms folded, "
            f"{c['num_samples']} calibration inputs.",
            "",
        ]
        if self.metrics:
            lines += ["| metric | value |", "|---|---|"]
            for k, v in self.metrics.items():
                if isinstance(v, Mapping):
                    continue
                lines.append(f"| {k} | {_fmt(v)} |")
            lines.append("")
            variants = self.metrics.get("variants")
            if isinstance(variants, Mapping) and variants:
                lines += ["| variant | top-1 (%) | output SQNR (dB) |", "|---|---|---|"]
                for k, v in variants.items():
                    lines.append(f"| {k} | {_fmt(v.get('top1'))} | {_fmt(v.get('sqnr_db'))} |")
                lines.append("")
        lines += [
            "Weight and activation SQNR (dB) after each method, in the order applied "
            "(naive = min/max, uniform bits; weights per output channel).",
            "",
            "| layer | W bits | A bits | W clip | A clip (choice per channel) | A clip / max | "
            "W SQNR naive → clip → alloc → bias-corr | A SQNR naive → clip → alloc |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.layers:
            w = " → ".join(_fmt(r["w_sqnr_db"][k]) for k in r["w_sqnr_db"])
            a = " → ".join(_fmt(r["a_sqnr_db"][k]) for k in r["a_sqnr_db"])
            prior = ""
            if r.get("a_prior"):
                prior = " (" + ", ".join(f"{k} {v}" for k, v in r["a_prior"].items()) + ")"
            lines.append(
                f"| {r['layer']} | {_bits(r, 'w')} | {_bits(r, 'a')} | {r['w_clip']} | "
                f"{r['a_clip']}{prior} | {_fmt(r['a_clip_ratio'])} | {w} | {a} |"
            )
        return "\n".join(lines) + "\n"


def _bits(r: Mapping[str, Any], p: str) -> str:
    lo, hi, mean = r[f"{p}_bits_min"], r[f"{p}_bits_max"], r[f"{p}_bits"]
    return f"{lo}" if lo == hi else f"{mean:g} ({lo}..{hi})"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}"
    return "" if v is None else str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Tensor):
        return _jsonable(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


# ------------------------------------------------------------------------------ quantization
def _quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def _mse(x: Tensor, y: Tensor) -> float:
    return float((x.double() - y.double()).pow(2).mean())


def _stages(x: Tensor, outs: Mapping[str, Tensor]) -> tuple[dict, dict]:
    mse = {k: _mse(x, v) for k, v in outs.items()}
    sq = {k: sqnr_db(x, v) for k, v in outs.items()}
    return mse, sq


def _prior_counts(clip: ClipRange) -> dict[str, int] | None:
    if clip.prior is None:
        return None
    return {p: clip.prior.count(p) for p in ("laplace", "gaussian", "minmax") if p in clip.prior}


def _allocate(clip: ClipRange, stats: Stats, avg_bits: int, method: str,
              percentile: float) -> ClipRange:
    """Bit allocation from the nominal clipping ranges, then clip again at the new bits."""
    widths = (clip.hi - clip.lo).double()
    bits = allocate_bits(widths, avg_bits, min_bits=1, max_bits=8)
    return clip_range(stats, bits, method, half_range=clip.half_range, percentile=percentile)


def _plan_weight(w: Tensor, bits: int, method: str, alloc: bool, correct: str | None,
                 per_channel: bool, percentile: float) -> tuple[RangeQuantizer, dict]:
    axis = 0 if per_channel else None
    stats = Stats.from_tensor(w, axis)
    naive = clip_range(stats, bits, "minmax", half_range=False)
    clipped = clip_range(stats, bits, method, half_range=False, percentile=percentile)
    outs = {"naive": naive.quantize(w, axis), "clip": clipped.quantize(w, axis)}
    final = clipped
    if alloc and per_channel and bits < 8 and stats.rows > 1:
        final = _allocate(clipped, stats, bits, method, percentile)
        outs["bit_alloc"] = final.quantize(w, axis)
    w_hat = outs[list(outs)[-1]]
    gain = offset = None
    if correct:
        gain, offset = correction_params(w, w_hat, axis=0, variance=correct == "mean_var")
    q = RangeQuantizer(final.lo, final.hi, final.bits, axis=axis, gain=gain, offset=offset,
                       corr_axis=0, method=method)
    if correct:
        with torch.no_grad():
            outs["bias_correction"] = q(w)
    mse, sq = _stages(w, outs)
    row = {
        "w_bits": float(final.bits.double().mean()),
        "w_bits_min": int(final.bits.min()), "w_bits_max": int(final.bits.max()),
        "w_clip": method, "w_prior": _prior_counts(final),
        "w_clip_ratio": float(((final.hi - final.lo).double()
                               / (stats.max - stats.min).clamp(min=1e-30)).mean()),
        "w_mse": mse, "w_sqnr_db": sq,
    }
    return q, row


def _plan_act(stats: Stats, bits: int, method: str, alloc: bool, axis: int | None,
              percentile: float) -> tuple[RangeQuantizer, dict]:
    sample = stats.sample  # [rows, K]
    naive = clip_range(stats, bits, "minmax")
    clipped = clip_range(stats, bits, method, percentile=percentile)
    outs = {"naive": naive.quantize(sample, 0), "clip": clipped.quantize(sample, 0)}
    final = clipped
    if alloc and axis is not None and bits < 8 and stats.rows > 1:
        final = _allocate(clipped, stats, bits, method, percentile)
        outs["bit_alloc"] = final.quantize(sample, 0)
    q = RangeQuantizer(final.lo, final.hi, final.bits, axis=axis, method=method)
    mse, sq = _stages(sample, outs)
    row = {
        "a_bits": float(final.bits.double().mean()),
        "a_bits_min": int(final.bits.min()), "a_bits_max": int(final.bits.max()),
        "a_clip": method, "a_prior": _prior_counts(final), "a_half_range": final.half_range,
        "a_clip_lo": float(final.lo.double().mean()), "a_clip_hi": float(final.hi.double().mean()),
        "a_clip_ratio": float(((final.hi - final.lo).double()
                               / (stats.max - stats.min).clamp(min=1e-30)).mean()),
        "a_mse": mse, "a_sqnr_db": sq,
    }
    return q, row


def _check_bits(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
        raise ValueError(f"{name} must be an int in [1, 16]{' or None' if allow_none else ''}, "
                         f"got {value!r}")


def quantize_model(
    model: nn.Module,
    calib_loader: Iterable,
    *,
    w_bits: int = 4,
    a_bits: int = 4,
    clip: str = "aciq",
    w_clip: str | None = "minmax",
    bit_alloc: bool = True,
    bias_correction: bool | str = True,
    first_last_bits: int | None = 8,
    fold_bn: bool = True,
    per_channel_acts: bool = True,
    per_channel_weights: bool = True,
    num_samples: int = 512,
    max_samples: int = 1024,
    percentile: float = 99.99,
    inplace: bool = False,
) -> tuple[nn.Module, PTQReport]:
    """Post-training quantization of ``model`` to a fake-quant model plus a report.

    Every exact ``nn.Conv2d``/``nn.Linear`` becomes a :class:`lowbit.nn.QConv2d`/``QLinear``
    with :class:`RangeQuantizer` weight and input-activation quantizers.

    Args:
        calib_loader: batches (or (input, target) pairs); ``num_samples`` inputs are used.
        w_bits, a_bits: bits of weights and activations (mean bits under bit allocation).
        clip: activation clipping method, one of :data:`~lowbit.ptq.CLIP_METHODS`
            (``"aciq"`` picks Laplace or Gaussian per channel).
        w_clip: weight clipping method; the paper's default ``"minmax"`` (weights are not
            clipped, bias correction and bit allocation do the work); ``None``: same as
            ``clip``.
        bit_alloc: per-channel bit allocation (levels proportional to alpha^(2/3)) for weights
            (per output channel) and activations (per input channel).
        bias_correction: per output channel, restore the weight mean and norm (``True`` or
            ``"mean_var"``, the paper's eq. 12-13) or only the mean (``"mean"``, what the
            authors' README runs use); ``False`` for none.
        first_last_bits: bits of the first and last layer, quantized with min/max ranges
            and no bit allocation (as in the paper); ``None`` treats them like the others.
        fold_bn: fold BatchNorms into the preceding layers first.
        per_channel_acts, per_channel_weights: per-channel ranges (else per tensor).
        max_samples: values kept per channel during calibration (percentile/MSE/report).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_bits("w_bits", w_bits)
    _check_bits("a_bits", a_bits)
    _check_bits("first_last_bits", first_last_bits, allow_none=True)
    w_clip = clip if w_clip is None else w_clip
    modes = {True: "mean_var", "mean_var": "mean_var", "mean": "mean", False: None}
    if not isinstance(bias_correction, (bool, str)) or bias_correction not in modes:
        raise ValueError("bias_correction must be True, False, 'mean' or 'mean_var', got "
                         f"{bias_correction!r}")
    correction = modes[bias_correction]
    for name, value in (("clip", clip), ("w_clip", w_clip)):
        if value not in CLIP_METHODS:
            raise ValueError(f"{name} must be one of {CLIP_METHODS}, got {value!r}")
    from lowbit.nn import QConv2d, QLinear

    m = model if inplace else copy.deepcopy(model)
    m.eval()
    folded: list[list[str]] = []
    if fold_bn:
        for layer_name, bn_name, through_pool in _bn_pairs(m):
            bn = m.get_submodule(bn_name)
            if through_pool and not bool((_bn_scale(bn) > 0).all()):
                continue
            layer = m.get_submodule(layer_name)
            had_bias = layer.bias is not None
            _fold_bn(layer, bn)
            _set_submodule(m, bn_name, nn.Identity())
            folded.append([layer_name, bn_name, "bias" if had_bias else "new_bias"])
    layers = _quantizable(m)
    if not layers:
        raise ValueError("the model has no nn.Conv2d or nn.Linear layer to quantize")
    calib = calibrate(m, calib_loader, num_samples=num_samples, layers=[n for n, _ in layers],
                      max_samples=max_samples)
    rows: list[dict[str, Any]] = []
    meta_layers: dict[str, Any] = {}
    for idx, (name, mod) in enumerate(layers):
        edge = first_last_bits is not None and idx in (0, len(layers) - 1)
        wb = first_last_bits if edge else w_bits
        ab = first_last_bits if edge else a_bits
        alloc = bit_alloc and not edge
        # the paper keeps the first and last layers unclipped: image pixels and logits are
        # far from any Laplace/Gaussian prior
        layer_wclip, layer_aclip = ("minmax", "minmax") if edge else (w_clip, clip)
        conv = isinstance(mod, nn.Conv2d)
        act_axis = (1 if conv else -1) if per_channel_acts else None
        with torch.no_grad():
            wq, wrow = _plan_weight(mod.weight.detach(), wb, layer_wclip, alloc,
                                    correction, per_channel_weights, percentile)
            a_stats = (calib[name].per_channel() if per_channel_acts
                       else calib[name].per_tensor())
            aq, arow = _plan_act(a_stats, ab, layer_aclip, alloc, act_axis, percentile)
        q = (QConv2d if conv else QLinear).from_float(mod)
        q.weight_quant = wq.to(mod.weight.device)
        q.act_quant = aq.to(mod.weight.device)
        _set_submodule(m, name, q)
        rows.append({"layer": name, "type": type(q).__name__, "first_last": edge, **wrow,
                     **arow})
        meta_layers[name] = {
            "kind": "conv2d" if conv else "linear",
            "w_axis": wq.axis, "w_rows": int(wq.lo.numel()),
            "bias_correction": correction is not None,
            "a_axis": aq.axis, "a_rows": int(aq.lo.numel()),
            "w_method": layer_wclip, "a_method": layer_aclip,
        }
    config = {
        "w_bits": w_bits, "a_bits": a_bits, "clip": clip, "w_clip": w_clip,
        "bit_alloc": bit_alloc, "bias_correction": correction or False,
        "first_last_bits": first_last_bits, "fold_bn": fold_bn,
        "per_channel_acts": per_channel_acts, "per_channel_weights": per_channel_weights,
        "num_samples": num_samples, "calibration_inputs": next(iter(calib.values())).items,
        "percentile": percentile,
    }
    meta = {"version": META_VERSION, "folded": folded, "layers": meta_layers,
            "config": config}
    return m, PTQReport(config=config, layers=rows, folded=folded, meta=meta)


def restore_quantized(model: nn.Module, meta: Mapping[str, Any]) -> nn.Module:
    """Give a freshly built float ``model`` the structure :func:`quantize_model` produced.

    Folds nothing numerically: BatchNorms listed in ``meta`` become Identity (adding a zero
    bias to their layer where the fold created one) and the listed layers become
    QConv2d/QLinear with empty :class:`RangeQuantizer` buffers of the right shapes, so that
    ``load_state_dict`` of the quantized checkpoint then restores it exactly. Edits ``model``
    in place and returns it.
    """
    from lowbit.nn import QConv2d, QLinear

    if not isinstance(meta, Mapping) or meta.get("version") != META_VERSION:
        raise ValueError(f"not a lowbit.ptq structure record (version {META_VERSION})")
    for layer_name, bn_name, bias in meta["folded"]:
        layer = model.get_submodule(layer_name)
        if bias == "new_bias" and layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0],
                                                  dtype=layer.weight.dtype,
                                                  device=layer.weight.device))
        _set_submodule(model, bn_name, nn.Identity())
    for name, info in meta["layers"].items():
        mod = model.get_submodule(name)
        cls = QConv2d if info["kind"] == "conv2d" else QLinear
        q = cls.from_float(mod)

        def empty(rows: int) -> tuple[Tensor, Tensor, Tensor]:
            return torch.zeros(rows), torch.ones(rows), torch.full((rows,), 8)

        out_ch = mod.weight.shape[0]
        gain = torch.ones(out_ch) if info["bias_correction"] else None
        offset = torch.zeros(out_ch) if info["bias_correction"] else None
        q.weight_quant = RangeQuantizer(*empty(info["w_rows"]), axis=info["w_axis"], gain=gain,
                                        offset=offset, corr_axis=0, method=info["w_method"])
        q.act_quant = RangeQuantizer(*empty(info["a_rows"]), axis=info["a_axis"],
                                     method=info["a_method"])
        q.to(mod.weight.device)
        _set_submodule(model, name, q)
    return model
