"""``to_integer``: a calibrated fake-quant lowbit model -> an integer-only :class:`IntegerModel`.

The model is traced with ``torch.fx`` (``QConv2d``/``QLinear`` as leaves) and each value of the
graph is followed symbolically as one of

* the float input image;
* a quantized activation (an integer tensor on a :class:`~lowbit.integer.executor.Grid`);
* a *pending* value: an integer tensor ``v`` (a convolution's accumulator, a residual sum, a
  pooled sum) whose real value is ``unit_c·v + offset_c`` per channel, exact rationals, with
  an optional clamp from ReLU/ReLU6/Hardtanh. BatchNorm and biases fold into ``unit``/``offset``.

A pending value is requantized only where the model needs integers on a grid: at the input of
the next quantized layer (its ``act_quant`` gives scale and zero point), with the certified
fixed-point rule of :func:`~lowbit.integer.fixed_point.fixed_point_affine` over the accumulator's
proven bound and ReLU as the clamp (one rounding: conv -> BN -> ReLU -> int8 in one step). Other
consumers keep exact arithmetic in accumulator units:

* residual add ``branch + shortcut``: the quantized shortcut is requantized into the branch's
  accumulator units (a 256-input map, certified; its rounding error is far below one output
  step), added as integers, and the sum is requantized once at the next layer's input;
* average pooling: the values are first rounded onto per-channel units ``|unit|·2^j``
  (ReLU applied) by a shift with a tie correction, exact by construction with no search
  (:func:`_power_of_two_map`; ``j`` makes one output step about 2^14 units of the pooled
  sum), summed in int64, and the division by the window size goes into the next
  requantization; max pooling and BatchNorm after ReLU with no quantized consumer in between
  use the same units;
* the final linear layer's accumulator is the integer output; ``unit·acc + offset`` (float64)
  gives the logits.

Quantization of a real ``y`` onto a grid is ``clamp(R(y·inv_scale) + z)`` with ``inv_scale`` the
float32 reciprocal lowbit's fake quantizer multiplies by, taken exactly. Every requantization of
the integer model is therefore the exactly rounded value of the real computation with exact
parameters; the fake-quant model computes the same in float32 and can differ where float32
rounding moves a value across a rounding boundary (:func:`compare_models` measures how often).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.integer.exact import ExactAffine, check_rounding, round_exact_int, round_fraction
from lowbit.integer.executor import Grid, IntegerModel, Node, RequantSpec, dtype_name
from lowbit.integer.fixed_point import fixed_point_affine
from lowbit.integer.ops import Requantizer, _storage_dtype, accumulator_bounds

__all__ = ["to_integer", "IntegerConversionError", "compare_models", "export_checkpoint",
           "evaluate_checkpoint", "checkpoint_model"]

INT64_LIMIT = 2**62


class IntegerConversionError(ValueError):
    """A model (or one of its layers) that the integer path cannot express."""


def _err(layer: str, msg: str) -> IntegerConversionError:
    return IntegerConversionError(f"layer {layer!r}: {msg}")


# --------------------------------------------------------------------------- symbolic values
@dataclass
class _FloatInput:
    name: str


@dataclass
class _Quant:
    name: str  # tensor in the program
    grid: Grid
    lo: int  # value range of the integers
    hi: int


@dataclass
class _Deferred:
    """A conv/linear whose requantization is not chosen yet."""

    op: str
    layer: str
    weight: Tensor
    attrs: dict[str, Any]
    source: _Quant


@dataclass
class _Pending:
    """Integer ``v`` (channels on dim 1) with real value ``unit_c·v + offset_c``, then clamp."""

    unit: list[Fraction]
    offset: list[Fraction]
    bounds: np.ndarray  # [C, 2] python ints (object) bounds of v
    producer: _Deferred | str  # deferred layer, or the name of an existing tensor
    layer: str
    clamp_lo: Fraction | None = None
    clamp_hi: Fraction | None = None
    emitted: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return len(self.unit)

    @property
    def clamped(self) -> bool:
        return self.clamp_lo is not None or self.clamp_hi is not None


# ------------------------------------------------------------------------------- tracing
def _lowbit_leaf_types() -> tuple[type, ...]:
    from lowbit.nn.modules import QConv2d, QLinear

    return (QConv2d, QLinear)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _lowbit_leaf_types()):
            return True
        if type(m).__module__.startswith("lowbit.") and not list(m.children()):
            return False  # small helper modules (e.g. the ResNet option-A shortcut): trace in
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # data-dependent control flow and friends
        raise IntegerConversionError(
            f"cannot trace the model with torch.fx ({type(exc).__name__}: {exc}); the integer "
            "path needs a model whose forward is a static graph of layers") from exc
    return fx.GraphModule(model, graph)


# ---------------------------------------------------------------------- quantizer reading
def _frac(v: Any) -> Fraction:
    return Fraction(float(v))


def _unsupported_quantizer(layer: str, role: str, q: nn.Module) -> IntegerConversionError:
    msg = f"{role} quantizer {type(q).__name__} is not supported"
    if type(q).__module__.startswith("lowbit.ptq"):
        msg += (" (lowbit.ptq models keep per-channel activation ranges and bit widths, "
                "asymmetric weight grids and bias-correction offsets, which the integer path "
                "cannot express); for an integer model, convert the float model with "
                "lowbit.nn.convert(model, 'w8a8') and calibrate it: to_integer(model, "
                "calib_data)")
    else:
        msg += "; use lowbit.nn.Quantizer (lowbit.nn.convert with an integer scheme)"
    return _err(layer, msg)


def _act_grid(layer: str, m: nn.Module) -> Grid:
    from lowbit.formats import IntFormat
    from lowbit.nn.modules import Quantizer

    q = getattr(m, "act_quant", None)
    if q is None:
        raise _err(layer, "its input activations are not quantized (no act_quant); the integer "
                          "path needs quantized inputs on every layer (e.g. convert(model, "
                          "'w8a8', first_last='same'))")
    if not isinstance(q, Quantizer):
        raise _unsupported_quantizer(layer, "activation", q)
    spec = q.spec
    if not spec.enabled:
        raise _err(layer, "its activation quantizer is disabled")
    if not isinstance(q.fmt, IntFormat) or q.fmt.bits > 8:
        raise _err(layer, f"activation format {q.fmt.name!r} is not an integer format of at "
                          "most 8 bits (int8/uint8/int4/uint4/...)")
    if spec.granularity != "tensor":
        raise _err(layer, f"activation granularity {spec.granularity!r}: the integer path "
                          "needs one scale per tensor")
    if spec.rounding != "nearest":
        raise _err(layer, f"activation rounding {spec.rounding!r}: inference needs 'nearest'")
    if q.observer is None:
        raise _err(layer, f"activation observer {spec.observer!r} takes the range of each batch "
                          "at run time; an integer graph needs fixed scales: use a stateful "
                          "observer ('ema', 'minmax', ...) and calibrate")
    if not q.observer.initialized:
        raise _err(layer, "the activation quantizer was never calibrated (its observer has no "
                          "statistics): train the model, or pass calib_data to to_integer")
    scale = q.scale.detach().float().cpu().reshape(-1)
    zp = q.zero_point.detach().cpu().reshape(-1)
    if scale.numel() != 1:
        raise _err(layer, "activation scale must be one value per tensor")
    if not (math.isfinite(float(scale)) and float(scale) > 0):
        raise _err(layer, f"activation scale {float(scale)} is not positive and finite")
    inv = (1.0 / scale).float()  # the reciprocal the fake quantizer multiplies by
    return Grid(float(scale[0]), float(inv[0]), int(zp[0]), int(q.fmt.qmin), int(q.fmt.qmax))


def _int_weight(layer: str, m: nn.Module) -> tuple[Tensor, list[Fraction]]:
    """int8 weights and the per-output-channel scale, identical to the fake quantizer's."""
    from lowbit.formats import IntFormat
    from lowbit.nn.modules import Quantizer

    wq = getattr(m, "weight_quant", None)
    if wq is None:
        raise _err(layer, "its weights are not quantized (no weight_quant)")
    if not isinstance(wq, Quantizer):
        raise _unsupported_quantizer(layer, "weight", wq)
    spec = wq.spec
    fmt = wq.fmt
    if not isinstance(fmt, IntFormat):
        raise _err(layer, f"weight format {fmt.name!r} is not an integer format; binary, "
                          "ternary and minifloat weights are not supported by to_integer")
    if not fmt.signed or fmt.bits > 8 or not spec.enabled:
        raise _err(layer, f"weight format {fmt.name!r}: the integer path needs signed weights "
                          "of at most 8 bits")
    if spec.granularity not in ("tensor", "channel") or (
            spec.granularity == "channel" and (wq.axis or 0) % m.weight.dim() != 0):
        raise _err(layer, "weights must be quantized per tensor or per output channel (axis 0)")
    if spec.rounding != "nearest":
        raise _err(layer, f"weight rounding {spec.rounding!r}: inference needs 'nearest'")
    w = m.weight.detach().float().cpu()
    with torch.no_grad():
        if wq.observer is None:
            scale, zp = wq.dynamic_qparams(w)
        else:
            if not wq.observer.initialized:
                raise _err(layer, "the weight quantizer was never calibrated")
            scale, zp = wq.scale, wq.zero_point
        was = wq.training
        wq.eval()
        try:
            fq = wq(w).detach().float()
        finally:
            wq.train(was)
    scale = scale.detach().float().cpu().reshape(-1)
    zp = zp.detach().cpu().reshape(-1)
    if bool((zp != 0).any()):
        raise _err(layer, "weights have a non-zero zero point; the integer path needs "
                          "symmetric weights")
    out = w.shape[0]
    s = scale.expand(out) if scale.numel() == 1 else scale
    if s.numel() != out:
        raise _err(layer, f"weight scale has {s.numel()} values for {out} output channels")
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(fq.double() / s.double().view(shape))
    if not torch.equal((q.float() * s.view(shape)), fq) or bool(
            (q < fmt.qmin).any() or (q > fmt.qmax).any()):
        raise _err(layer, "fake-quantized weights are not integers times the scale")
    return q.to(torch.int8), [_frac(v) for v in s.tolist()]


# ---------------------------------------------------------------------- the converter
def _hull(bounds: np.ndarray) -> tuple[int, int]:
    return int(min(bounds[:, 0].tolist())), int(max(bounds[:, 1].tolist()))


def _saturation_ranges(a: list[Fraction], b: list[Fraction], ranges: list[tuple[int, int]],
                       lo: int, hi: int, zp: int, z_in: int, rounding: str
                       ) -> list[tuple[int, int]]:
    """Per channel ``[L, U]`` inside the input range with ``out(x) = out(L)`` for ``x <= L``
    and ``out(x) = out(U)`` for ``x >= U`` (the output is monotone in ``x``), so clamping the
    input to ``[L, U]`` changes nothing."""
    aff = ExactAffine.from_affine(a, b, z_in)
    out = []
    for c, (x0, x1) in enumerate(ranges):
        A, B, D = aff.num_a[c], aff.num_b[c], aff.den[c]

        def f(x: int, A: int = A, B: int = B, D: int = D) -> int:
            return min(max(round_exact_int(A, B, D, x, rounding) + zp, lo), hi)

        f0, f1 = f(x0), f(x1)
        if f0 == f1:
            out.append((x0, x0))
            continue
        i, j = x0, x1  # largest x with f(x) == f0 (a prefix, by monotonicity)
        while i < j:
            m = (i + j + 1) // 2
            i, j = (m, j) if f(m) == f0 else (i, m - 1)
        L = i
        i, j = x0, x1  # smallest x with f(x) == f1 (a suffix)
        while i < j:
            m = (i + j) // 2
            i, j = (i, m) if f(m) == f1 else (m + 1, j)
        out.append((L, i))
    return out


def _power_of_two_map(u: Fraction, off: Fraction, j: int, dead_unit: Fraction, rounding: str
                      ) -> tuple[Fraction, Fraction, int, int, int, int, Fraction]:
    """``R((u·v + off)/u')`` with ``u' = |u|·2^j`` as an exact integer rule.

    Returns ``(a, b, M, C, k, w, u')`` with ``a = u/u'``, ``b = off/u'`` (the definition) and
    ``clamp(((M·v + C) >> k) - tie)``. For ``j <= 0``: ``M = ±2^-j``, ``k = 0`` and
    ``C = R(b)``, with ``j`` lowered until ``b`` is no tie (``R(n + b) = n + R(b)`` then). For
    ``j > 0``: with ``c = off/|u| = C0 + f`` (``C0`` integer, ``0 <= f < 1``),
    ``R(x) = floor((±v + C0 + 2^(j-1)) / 2^j)`` rounding half up, because ``f < 1`` cannot carry
    an integer past a multiple of ``2^j``; ties need ``f = 0`` and zero low bits, where the tie
    window ``w = 1`` moves an odd result to the even one (half to even). ``u = 0``: the
    constant ``R(off/dead_unit)``.
    """
    if u == 0:
        b = off / dead_unit
        return Fraction(0), b, 0, round_fraction(b, rounding), 0, 0, dead_unit
    sign = 1 if u > 0 else -1
    if j <= 0:
        g = 2 ** (-j)
        while True:
            up = abs(u) / g
            b = off / up
            if rounding == "half_up" or b - math.floor(b) != Fraction(1, 2):
                break
            g *= 2
        return Fraction(sign * g), b, sign * g, round_fraction(b, rounding), 0, 0, up
    up = abs(u) * 2**j
    c = off / abs(u)
    c0 = math.floor(c)
    tie = 1 if (c == c0 and rounding == "half_even") else 0
    return Fraction(sign, 2**j), off / up, sign, c0 + 2 ** (j - 1), j, tie, up


class _Converter:
    def __init__(self, gm: fx.GraphModule, rounding: str, accumulator_bits: int) -> None:
        self.gm = gm
        self.rounding = rounding
        self.acc_limit = 2 ** (accumulator_bits - 1)
        self.nodes: list[Node] = []
        self.state: dict[fx.Node, Any] = {}
        self.counter = 0
        self.modules = dict(gm.named_modules())

    # ---------------------------------------------------------------- helpers
    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint.replace('.', '_')}__{self.counter}"

    def emit(self, node: Node) -> str:
        self.nodes.append(node)
        return node.output

    def R(self, f: Fraction) -> int:
        return round_fraction(f, self.rounding)

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise _err(node.name, "no shape information (the model returned a non-tensor?)")
        return tuple(meta.shape)

    # ------------------------------------------------------- requantizer construction
    def certified(self, layer: str, a: list[Fraction], b: list[Fraction], bounds: Any,
                  lo: int, hi: int, zp: int, dtype: torch.dtype | None,
                  input_zero_point: int = 0) -> RequantSpec:
        """Certified fixed point of ``clamp(R(a(x - z_in) + b) + zp, lo, hi)`` over bounds."""
        if lo > hi:
            raise _err(layer, f"empty output range [{lo}, {hi}] after clamping")
        ranges = [(int(r[0]), int(r[1])) for r in np.asarray(bounds, dtype=object).tolist()]
        try:
            fp = fixed_point_affine(a, b, ranges, (lo, hi), rounding=self.rounding,
                                    input_zero_point=input_zero_point, output_zero_point=zp)
        except ValueError:  # no shift up to 62 works over the whole proven range
            fp = None
        clamp = None
        if fp is None or int(fp.acc_bits().max()) > 63:  # certify the unsaturated range only
            clamp = _saturation_ranges(a, b, ranges, lo, hi, zp, input_zero_point,
                                       self.rounding)
            try:
                fp = fixed_point_affine(a, b, clamp, (lo, hi), rounding=self.rounding,
                                        input_zero_point=input_zero_point, output_zero_point=zp)
            except ValueError as exc:
                raise _err(layer, f"no fixed-point requantization fits int64 ({exc})") from exc
        try:
            rq = Requantizer.from_fixed_point(fp, dtype)
        except ValueError as exc:
            raise _err(layer, f"the requantization would overflow int64 ({exc})") from exc
        return RequantSpec(tuple(a), tuple(b), input_zero_point, zp, lo, hi, self.rounding,
                           np.array(ranges, dtype=np.int64), rq, fp,
                           None if clamp is None else np.array(clamp, dtype=np.int64))

    def constructed(self, layer: str, a: list[Fraction], b: list[Fraction], M: list[int],
                    C: list[int], k: list[int], w: list[int], bounds: np.ndarray,
                    lo: int | None = None, hi: int | None = None
                    ) -> tuple[RequantSpec, np.ndarray]:
        """A requantization whose integer rule ``(M, C, k, w)`` the caller built to equal
        ``clamp(R(a·x + b), lo, hi)`` exactly (see :func:`_power_of_two_map`); returns it
        with the per-channel output bounds. ``lo``/``hi`` default to the outputs' hull."""
        out = []
        for ac, bc, (x0, x1) in zip(a, b, bounds.tolist()):
            e0, e1 = self.R(ac * int(x0) + bc), self.R(ac * int(x1) + bc)
            out.append((min(e0, e1), max(e0, e1)))
        h_lo, h_hi = _hull(np.array(out, dtype=object))
        lo = h_lo if lo is None else lo
        hi = h_hi if hi is None else hi
        worst = max(abs(m) * max(abs(int(x)) for x in r) + abs(c)
                    for m, c, r in zip(M, C, bounds.tolist()))
        if worst >= INT64_LIMIT:
            raise _err(layer, "the accumulator-unit arithmetic would overflow int64")
        t = lambda v: torch.tensor([int(x) for x in v], dtype=torch.int64)  # noqa: E731
        rq = Requantizer(t(M), t(C), t(k), t(w), 0, lo, hi, _storage_dtype(lo, hi),
                         _hull(np.asarray(bounds, dtype=object)))
        out = np.array([(min(max(e0, lo), hi), max(min(e1, hi), lo)) for e0, e1 in out],
                       dtype=object)
        spec = RequantSpec(tuple(a), tuple(b), 0, 0, lo, hi, self.rounding,
                           np.array([(int(r[0]), int(r[1])) for r in bounds.tolist()],
                                    dtype=np.int64), rq, None)
        return spec, out

    # ------------------------------------------------------- emitting pending values
    def emit_pending(self, p: _Pending, spec: RequantSpec, key: Any,
                     extra: dict[str, Any] | None = None) -> str:
        """Produce ``p``'s integers through ``spec``; returns the tensor name. ``extra``:
        attributes for exporters (the output grid's scale)."""
        extra = extra or {}
        if key in p.emitted:
            return p.emitted[key]
        if isinstance(p.producer, _Deferred) and spec.input_clamp is not None:
            src, _ = self.pending_identity(p)  # the accumulator, then a clamped requant
            name = self.emit(Node("requant", (src,), self.fresh(p.layer), p.layer,
                                  dict(extra), None, spec))
        elif isinstance(p.producer, _Deferred):
            d = p.producer
            name = self.emit(Node(d.op, (d.source.name,), self.fresh(d.layer), d.layer,
                                  {**d.attrs, **extra}, d.weight, spec))
        else:
            name = self.emit(Node("requant", (p.producer,), self.fresh(p.layer), p.layer,
                                  dict(extra), None, spec))
        p.emitted[key] = name
        return name

    def pending_to_grid(self, p: _Pending, grid: Grid) -> _Quant:
        """Requantize ``p`` onto ``grid`` (one certified rounding, clamps included)."""
        lo, hi = grid.qmin, grid.qmax
        inv = _frac(grid.inv_scale)
        if p.clamp_lo is not None:
            lo = max(lo, grid.zero_point + self.R(p.clamp_lo * inv))
        if p.clamp_hi is not None:
            hi = min(hi, grid.zero_point + self.R(p.clamp_hi * inv))
        a = [u * inv for u in p.unit]
        b = [o * inv for o in p.offset]
        spec = self.certified(p.layer, a, b, p.bounds, lo, hi, grid.zero_point, grid.dtype)
        name = self.emit_pending(p, spec, ("grid", grid), {"output_scale": grid.scale})
        return _Quant(name, grid, lo, hi)

    def pending_exact(self, p: _Pending, target: Fraction | None = None
                      ) -> tuple[str, _Pending]:
        """``p`` rounded onto per-channel units ``u' = |unit|·2^j`` (ReLU applied), exactly:
        ``v' = R((unit·v + offset)/u')`` by a shift, no search (:func:`_power_of_two_map`).
        ``j`` brings ``u'`` near ``target`` (``None``: ``j <= 0``, as fine as the units)."""
        if p.clamp_hi is not None or (p.clamp_lo is not None and p.clamp_lo != 0):
            raise _err(p.layer, "only ReLU (clamp at 0) is supported before average pooling "
                                "or the output; ReLU6/Hardtanh there are not")
        nonzero = [abs(u) for u in p.unit if u != 0]
        base = target if target is not None else (min(nonzero) if nonzero else Fraction(1))
        a, b, M, C, k, w, units = [], [], [], [], [], [], []
        for u, off in zip(p.unit, p.offset):
            j = 0
            if u != 0 and target is not None:
                j = math.floor(math.log2(float(target)) - math.log2(float(abs(u))))
            row = _power_of_two_map(u, off, j, base, self.rounding)
            for lst, v in zip((a, b, M, C, k, w, units), row):
                lst.append(v)
        lo = 0 if p.clamp_lo is not None else None
        spec, out = self.constructed(p.layer, a, b, M, C, k, w, p.bounds, lo=lo)
        name = self.emit_pending(p, spec, ("exact", target))
        zero = [Fraction(0)] * p.channels
        return name, _Pending(units, zero, out, name, p.layer)

    # ------------------------------------------------------------ graph-level helpers
    def grids_ahead(self, node: fx.Node, seen: set | None = None) -> list[Grid]:
        """Grids of the quantized layers reached from ``node`` through layout-only ops."""
        seen = set() if seen is None else seen
        grids: list[Grid] = []
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            kind = self.classify(user)
            if kind == "qlayer":
                grids.append(_act_grid(str(user.target), self.modules[user.target]))
            elif kind in ("maxpool", "flatten", "identity", "slice", "pad", "act"):
                grids += self.grids_ahead(user, seen)
        uniq: list[Grid] = []
        for g in grids:
            if not any(g.same_as(h) for h in uniq):
                uniq.append(g)
        return uniq

    def materialize(self, node: fx.Node, value: Any, why: str) -> _Quant:
        """Turn the value of ``node`` into a quantized activation (the grid of the quantized
        layer it feeds), and remember it."""
        if isinstance(value, _Quant):
            return value
        grids = self.grids_ahead(node)
        if not grids:
            raise _err(node.name, f"{why}: its value must be integers on a grid, but no "
                                  "quantized layer consumes it to give one")
        if len(grids) > 1:
            raise _err(node.name, f"feeds quantized layers with {len(grids)} different "
                                  "activation scales; use one scale (share the quantizer)")
        grid = grids[0]
        if isinstance(value, _FloatInput):
            q = self.quantize_input(value, grid)
        else:
            q = self.pending_to_grid(value, grid)
        self.state[node] = q
        return q

    def quantize_input(self, value: _FloatInput, grid: Grid) -> _Quant:
        if self.nodes:
            raise IntegerConversionError("the model input reaches quantized layers with "
                                         "different scales; the integer path quantizes it once")
        attrs = {**grid.to_dict(), "dtype": dtype_name(grid.dtype)}
        name = self.emit(Node("quantize", (value.name,), self.fresh("input"), "input", attrs))
        return _Quant(name, grid, grid.qmin, grid.qmax)

    def regrid(self, q: _Quant, grid: Grid, layer: str, channels: int) -> _Quant:
        """A quantized activation moved to another grid (certified over its integers)."""
        if q.grid.same_as(grid):
            return q
        a = [_frac(q.grid.scale) * _frac(grid.inv_scale)] * channels
        spec = self.certified(layer, a, [Fraction(0)] * channels, [(q.lo, q.hi)] * channels,
                              grid.qmin, grid.qmax, grid.zero_point, grid.dtype,
                              input_zero_point=q.grid.zero_point)
        lo_hi = spec.exact(np.array([[q.lo, q.hi]] * channels, dtype=np.int64))[0]
        name = self.emit(Node("requant", (q.name,), self.fresh(layer), layer, {}, None, spec))
        return _Quant(name, grid, int(lo_hi.min()), int(lo_hi.max()))

    # ------------------------------------------------------------ classification
    def classify(self, n: fx.Node) -> str:
        if n.op == "output":
            return "output"
        if n.op == "placeholder":
            return "input"
        if n.op == "call_module":
            m = self.modules[n.target]
            if isinstance(m, _lowbit_leaf_types()):
                return "qlayer"
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                return "float_layer"
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and type(m) in (
                    nn.BatchNorm1d, nn.BatchNorm2d):
                return "bn"
            if type(m) in (nn.ReLU, nn.ReLU6, nn.Hardtanh):
                return "act"
            if type(m) is nn.MaxPool2d:
                return "maxpool"
            if type(m) in (nn.AvgPool2d, nn.AdaptiveAvgPool2d):
                return "avgpool"
            if type(m) is nn.Flatten:
                return "flatten"
            if type(m) in (nn.Identity, nn.Dropout):
                return "identity"
            return "unknown"
        if n.op == "call_function":
            t = n.target
            if t in (operator.add, torch.add):
                return "add"
            if t in (torch.flatten,):
                return "flatten"
            if t in (F.relu, torch.relu, F.relu6, F.hardtanh):
                return "act"
            if t is operator.getitem:
                return "slice"
            if t is F.pad:
                return "pad"
            if t in (F.adaptive_avg_pool2d, F.avg_pool2d):
                return "avgpool"
            if t is F.max_pool2d:
                return "maxpool"
            return "unknown"
        if n.op == "call_method":
            if n.target == "flatten":
                return "flatten"
            if n.target == "relu":
                return "act"
            return "unknown"
        return "unknown"

    # ------------------------------------------------------------------- main loop
    def run(self) -> tuple[str, str]:
        input_name = output_name = None
        for n in self.gm.graph.nodes:
            kind = self.classify(n)
            if kind == "input":
                if input_name is not None:
                    raise IntegerConversionError("the integer path takes models with one input")
                input_name = n.name
                self.state[n] = _FloatInput(n.name)
                continue
            if kind == "output":
                output_name = self.output(n)
                continue
            handler = getattr(self, f"on_{kind}")
            self.state[n] = handler(n)
        return input_name, output_name

    def arg(self, n: fx.Node, i: int = 0) -> tuple[fx.Node, Any]:
        src = n.args[i]
        if not isinstance(src, fx.Node):
            raise _err(n.name, f"argument {i} is not a tensor of the graph")
        return src, self.state[src]

    def layer_name(self, n: fx.Node) -> str:
        return str(n.target) if n.op == "call_module" else n.name

    # ------------------------------------------------------------------- handlers
    def on_unknown(self, n: fx.Node) -> Any:
        what = (type(self.modules[n.target]).__name__ if n.op == "call_module"
                else getattr(n.target, "__name__", str(n.target)))
        raise _err(self.layer_name(n), f"{what} has no integer form in lowbit.to_integer "
                   "(supported: QConv2d, QLinear, BatchNorm1d/2d, ReLU, ReLU6, Hardtanh, "
                   "MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, Identity, Dropout, "
                   "residual add, slicing, zero padding)")

    def on_float_layer(self, n: fx.Node) -> Any:
        m = self.modules[n.target]
        raise _err(str(n.target), f"{type(m).__name__} is a float layer; the integer path "
                   "needs every Conv2d/Linear quantized (convert with first_last='same' or "
                   "'int8')")

    def on_qlayer(self, n: fx.Node) -> _Pending:
        layer = str(n.target)
        m = self.modules[layer]
        grid = _act_grid(layer, m)
        src, v = self.arg(n)
        if isinstance(v, _FloatInput):
            v = self.state[src] = self.quantize_input(v, grid)
        elif isinstance(v, _Pending):
            v = self.materialize(src, v, f"the input of {layer}")
        in_shape = self.shape(src)
        v = self.regrid(v, grid, layer, in_shape[1])
        q_w, s_w = _int_weight(layer, m)
        is_conv = isinstance(m, nn.Conv2d)
        if not is_conv and len(in_shape) != 2:
            raise _err(layer, f"linear layer on a {len(in_shape)}-D input; flatten it first")
        if is_conv:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                if isinstance(m.padding, str) and m.padding == "valid":
                    pad = (0, 0)
                else:
                    raise _err(layer, f"padding {m.padding!r}/{m.padding_mode!r}: only "
                                      "explicit zero padding is supported")
            else:
                pad = tuple(m.padding)
            attrs = {"stride": list(m.stride), "padding": list(pad),
                     "dilation": list(m.dilation), "groups": int(m.groups),
                     "input_zero_point": v.grid.zero_point, "input_scale": v.grid.scale}
        else:
            attrs = {"input_zero_point": v.grid.zero_point, "input_scale": v.grid.scale}
        # integers the int32 GEMM adds up: uint8 inputs enter as x - 128
        shift = 128 if v.grid.dtype == torch.uint8 else 0
        w64 = q_w.reshape(q_w.shape[0], -1).to(torch.int64)
        ext = torch.maximum((w64 * (v.lo - shift)).abs(), (w64 * (v.hi - shift)).abs())
        worst = int(ext.sum(1).max())  # bounds every partial sum, in any order
        if worst >= self.acc_limit:
            raise _err(layer, f"the accumulator can reach {worst} (weights {tuple(q_w.shape)}, "
                              f"inputs in [{v.lo}, {v.hi}]), beyond the int"
                              f"{int(math.log2(self.acc_limit)) + 1} accumulator: it could "
                              "overflow (split the layer or lower the bit widths)")
        bounds = accumulator_bounds(q_w, (v.lo, v.hi), v.grid.zero_point).astype(object)
        sx = _frac(v.grid.scale)
        unit = [sx * s for s in s_w]
        bias = m.bias.detach().double().cpu().tolist() if m.bias is not None else None
        offset = [_frac(x) for x in bias] if bias is not None else [Fraction(0)] * len(unit)
        d = _Deferred("conv2d" if is_conv else "linear", layer, q_w, attrs, v)
        return _Pending(unit, offset, bounds, d, layer)

    def on_bn(self, n: fx.Node) -> _Pending:
        from lowbit.integer.exact import batchnorm_affine

        layer = str(n.target)
        m = self.modules[layer]
        if m.running_mean is None or not m.track_running_stats:
            raise _err(layer, "BatchNorm without running statistics cannot be folded")
        src, v = self.arg(n)
        C = m.num_features
        gamma = m.weight.detach().double().cpu() if m.affine else torch.ones(C, dtype=torch.float64)
        beta = m.bias.detach().double().cpu() if m.affine else torch.zeros(C, dtype=torch.float64)
        a, b = batchnorm_affine(gamma, beta, m.running_mean.detach().double().cpu(),
                                m.running_var.detach().double().cpu(), m.eps)
        fa, fb = [_frac(x) for x in a], [_frac(x) for x in b]
        if not isinstance(v, _Pending):
            raise _err(layer, "BatchNorm on the input or on a tensor that also feeds a "
                              "quantized layer is not supported")
        if v.clamped:  # after ReLU: exact on a fine grid (positive units), then folded
            _, v = self.pending_exact(v)
        if v.channels != C:
            raise _err(layer, f"{C} features after a layer with {v.channels} channels")
        return _Pending([u * x for u, x in zip(v.unit, fa)],
                        [o * x + y for o, x, y in zip(v.offset, fa, fb)],
                        v.bounds, v.producer, v.layer)

    def _act_limits(self, n: fx.Node) -> tuple[Fraction | None, Fraction | None]:
        if n.op == "call_module":
            m = self.modules[n.target]
            if type(m) is nn.ReLU:
                return Fraction(0), None
            if type(m) is nn.ReLU6:
                return Fraction(0), Fraction(6)
            return _frac(m.min_val), _frac(m.max_val)
        t = n.target
        if t in (F.relu, torch.relu) or n.op == "call_method":
            return Fraction(0), None
        if t is F.relu6:
            return Fraction(0), Fraction(6)
        lo = n.kwargs.get("min_val", n.args[1] if len(n.args) > 1 else -1.0)
        hi = n.kwargs.get("max_val", n.args[2] if len(n.args) > 2 else 1.0)
        return _frac(lo), _frac(hi)

    def on_act(self, n: fx.Node) -> Any:
        src, v = self.arg(n)
        lo, hi = self._act_limits(n)
        if isinstance(v, _FloatInput):
            v = self.materialize(src, v, "activation on the input")
        if isinstance(v, _Pending):
            new_lo = lo if v.clamp_lo is None else (v.clamp_lo if lo is None else
                                                    max(lo, v.clamp_lo))
            new_hi = hi if v.clamp_hi is None else (v.clamp_hi if hi is None else
                                                    min(hi, v.clamp_hi))
            return _Pending(v.unit, v.offset, v.bounds, v.producer, v.layer, new_lo, new_hi)
        g = v.grid
        qlo = v.lo if lo is None else max(v.lo, g.zero_point + self.R(lo * _frac(g.inv_scale)))
        qhi = v.hi if hi is None else min(v.hi, g.zero_point + self.R(hi * _frac(g.inv_scale)))
        if (qlo, qhi) == (v.lo, v.hi):
            return v
        layer = self.layer_name(n)
        name = self.emit(Node("clamp", (v.name,), self.fresh(layer), layer,
                              {"lo": qlo, "hi": qhi}))
        return _Quant(name, g, qlo, qhi)

    def _quant_input(self, n: fx.Node, why: str) -> _Quant:
        src, v = self.arg(n)
        return self.materialize(src, v, why)

    def on_identity(self, n: fx.Node) -> Any:
        src, v = self.arg(n)
        return v

    def on_maxpool(self, n: fx.Node) -> Any:
        layer = self.layer_name(n)
        src, v = self.arg(n)
        fine = isinstance(v, _Pending) and not self.grids_ahead(src)
        if fine:  # no quantized consumer: pool the exact fine-grid values (positive units)
            _, v = self.pending_exact(v)
        else:
            v = self._quant_input(n, "max pooling")
        if n.op == "call_module":
            m = self.modules[n.target]
            k, s, p, d, ceil = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
            if getattr(m, "return_indices", False):
                raise _err(layer, "max pooling with return_indices")
        else:
            spec = {"kernel_size": None, "stride": None, "padding": 0, "dilation": 1,
                    "ceil_mode": False}
            names = list(spec)
            for i, val in enumerate(n.args[1:]):
                spec[names[i]] = val
            spec.update({k: val for k, val in n.kwargs.items() if k in spec})
            k, s, p, d, ceil = (spec["kernel_size"], spec["stride"], spec["padding"],
                                spec["dilation"], spec["ceil_mode"])
        pair = lambda x: [int(x), int(x)] if isinstance(x, int) else [int(i) for i in x]  # noqa
        attrs = {"kernel": pair(k), "stride": pair(s if s else k), "padding": pair(p),
                 "dilation": pair(d), "ceil_mode": bool(ceil)}
        if fine:
            name = self.emit(Node("max_pool2d", (v.producer,), self.fresh(layer), layer, attrs))
            return _Pending(v.unit, v.offset, v.bounds, name, layer)
        name = self.emit(Node("max_pool2d", (v.name,), self.fresh(layer), layer, attrs))
        return _Quant(name, v.grid, v.lo, v.hi)

    def on_flatten(self, n: fx.Node) -> _Quant:
        layer = self.layer_name(n)
        v = self._quant_input(n, "flatten")
        if n.op == "call_module":
            m = self.modules[n.target]
            start, end = m.start_dim, m.end_dim
        else:
            start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
            end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
        if int(start) == 0:
            raise _err(layer, "flattening the batch dimension is not supported")
        name = self.emit(Node("flatten", (v.name,), self.fresh(layer), layer,
                              {"start_dim": int(start), "end_dim": int(end)}))
        return _Quant(name, v.grid, v.lo, v.hi)

    def on_slice(self, n: fx.Node) -> _Quant:
        layer = self.layer_name(n)
        idx = n.args[1]
        if not isinstance(idx, tuple) or not all(isinstance(i, slice) for i in idx) or (
                idx and idx[0] != slice(None)):
            raise _err(layer, f"indexing {idx!r}: only slices that keep the batch are supported")
        v = self._quant_input(n, "slicing")
        sl = [[s.start, s.stop, s.step] for s in idx]
        name = self.emit(Node("slice", (v.name,), self.fresh(layer), layer, {"slices": sl}))
        return _Quant(name, v.grid, v.lo, v.hi)

    def on_pad(self, n: fx.Node) -> _Quant:
        layer = self.layer_name(n)
        pad = n.args[1] if len(n.args) > 1 else n.kwargs["pad"]
        mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
        value = n.args[3] if len(n.args) > 3 else n.kwargs.get("value", None)
        if mode != "constant" or value not in (None, 0, 0.0):
            raise _err(layer, "only padding with zeros is supported")
        v = self._quant_input(n, "padding")
        z = v.grid.zero_point
        name = self.emit(Node("pad", (v.name,), self.fresh(layer), layer,
                              {"pad": [int(p) for p in pad], "value": z}))
        return _Quant(name, v.grid, min(v.lo, z), max(v.hi, z))

    def _pool_window(self, n: fx.Node, shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
        layer = self.layer_name(n)
        H, W = shape[2], shape[3]
        if n.op == "call_module":
            m = self.modules[n.target]
            if isinstance(m, nn.AdaptiveAvgPool2d):
                out = m.output_size
            else:
                out = None
                k, s, p = m.kernel_size, m.stride, m.padding
                if p not in (0, (0, 0)) or m.ceil_mode or m.divisor_override is not None:
                    raise _err(layer, "average pooling with padding, ceil_mode or a divisor "
                                      "override is not supported")
        else:
            if n.target is F.adaptive_avg_pool2d:
                out = n.args[1] if len(n.args) > 1 else n.kwargs["output_size"]
            else:
                raise _err(layer, "F.avg_pool2d: use nn.AvgPool2d or adaptive pooling")
        if out is not None:
            oh, ow = (out, out) if isinstance(out, int) else out
            oh, ow = oh or H, ow or W
            if H % oh or W % ow:
                raise _err(layer, f"adaptive pooling {H}x{W} -> {oh}x{ow} with unequal windows")
            return [H // oh, W // ow], [H // oh, W // ow]
        pair = lambda x: [int(x), int(x)] if isinstance(x, int) else [int(i) for i in x]  # noqa
        return pair(k), pair(s if s else k)

    def on_avgpool(self, n: fx.Node) -> _Pending:
        layer = self.layer_name(n)
        src, v = self.arg(n)
        kernel, stride = self._pool_window(n, self.shape(src))
        count = kernel[0] * kernel[1]
        attrs = {"kernel": kernel, "stride": stride}
        if isinstance(v, _FloatInput):
            v = self.materialize(src, v, "average pooling of the input")
        if isinstance(v, _Quant):
            s, z = _frac(v.grid.scale), v.grid.zero_point
            C = self.shape(src)[1]
            name = self.emit(Node("sum_pool2d", (v.name,), self.fresh(layer), layer, attrs))
            bounds = np.array([(count * v.lo, count * v.hi)] * C, dtype=object)
            return _Pending([s / count] * C, [-s * z] * C, bounds, name, layer)
        # the pooled sum is requantized onto the consumer's grid: pick units so that its
        # unsaturated range spans about 2^22 integers (1/2^14 of a step per input value)
        grids = self.grids_ahead(n)
        target = None
        if len(grids) == 1:
            g = grids[0]
            target = _frac(g.scale) * (g.qmax - g.qmin) * count / 2**22
        name, p = self.pending_exact(v, target)
        out = self.emit(Node("sum_pool2d", (name,), self.fresh(layer), layer, attrs))
        bounds = np.array([(count * int(lo), count * int(hi)) for lo, hi in p.bounds.tolist()],
                          dtype=object)
        return _Pending([u / count for u in p.unit], list(p.offset), bounds, out, layer)

    def pending_identity(self, p: _Pending) -> tuple[str, _Pending]:
        """``p``'s integers as they are (producing a deferred layer's accumulator)."""
        if not isinstance(p.producer, _Deferred):
            return p.producer, p
        n = p.channels
        spec, out = self.constructed(p.layer, [Fraction(1)] * n, [Fraction(0)] * n, [1] * n,
                                     [0] * n, [0] * n, [0] * n, p.bounds)
        name = self.emit_pending(p, spec, ("identity",))
        return name, _Pending(p.unit, p.offset, out, name, p.layer)

    def on_add(self, n: fx.Node) -> _Pending:
        layer = self.layer_name(n)
        if len(n.args) != 2 or n.kwargs:
            raise _err(layer, "add with more than two tensors or keyword arguments")
        (sa, va), (sb, vb) = self.arg(n, 0), self.arg(n, 1)
        if isinstance(va, _Pending) and isinstance(vb, _Pending):
            raise _err(layer, "adds two convolution outputs (e.g. a projection shortcut); the "
                              "integer path adds a convolution output and a quantized tensor")
        if isinstance(va, _Pending):
            p, q, qsrc = va, vb, sb
        elif isinstance(vb, _Pending):
            p, q, qsrc = vb, va, sa
        else:
            raise _err(layer, "adds two quantized tensors; the integer path adds a convolution "
                              "output (before its activation) and a quantized tensor")
        if not isinstance(q, _Quant):
            q = self.materialize(qsrc, q, "residual input")
        if p.clamped:
            raise _err(layer, "the residual branch is activated before the add; the integer "
                              "path adds the branch before its activation")
        s, z = _frac(q.grid.scale), q.grid.zero_point
        # branch in units u' = |unit|/G with G a power of two so that one shortcut step is at
        # least 256 units (the shortcut's rounding into these units then costs < 1/512 step)
        M, units, a_sc = [], [], []
        for u in p.unit:
            if u == 0:
                M.append(0)
                up = s / 256
            else:
                g = 1
                while s * g / abs(u) < 256 and g < 2**20:
                    g *= 2
                M.append(g if u > 0 else -g)
                up = abs(u) / g
            units.append(up)
            a_sc.append(s / up)
        n_ch = len(M)
        spec_b, b_bounds = self.constructed(p.layer, [Fraction(m) for m in M],
                                            [Fraction(0)] * n_ch, M, [0] * n_ch, [0] * n_ch,
                                            [0] * n_ch, p.bounds)
        branch = self.emit_pending(p, spec_b, ("residual",))
        # shortcut into those units: R(a_c·(q - z)), certified over its integer range
        sc_bounds = []
        for a in a_sc:
            e1, e2 = self.R(a * (q.lo - z)), self.R(a * (q.hi - z))
            sc_bounds.append((min(e1, e2), max(e1, e2)))
        lo = min(b for b, _ in sc_bounds)
        hi = max(h for _, h in sc_bounds)
        spec_s = self.certified(layer, a_sc, [Fraction(0)] * len(a_sc),
                                [(q.lo, q.hi)] * len(a_sc), lo, hi, 0, None,
                                input_zero_point=z)
        sc = self.emit(Node("requant", (q.name,), self.fresh(layer + ".shortcut"),
                            layer + ".shortcut", {}, None, spec_s))
        bounds = np.array([(int(b0) + s0, int(b1) + s1) for (b0, b1), (s0, s1)
                           in zip(b_bounds.tolist(), sc_bounds)], dtype=object)
        lo_all, hi_all = _hull(bounds)
        dt = "int32" if -(2**31) <= lo_all and hi_all < 2**31 else "int64"
        if max(abs(lo_all), abs(hi_all)) >= INT64_LIMIT:
            raise _err(layer, "the residual sum would overflow int64")
        out = self.emit(Node("add", (branch, sc), self.fresh(layer), layer, {"dtype": dt}))
        return _Pending(units, list(p.offset), bounds, out, layer)

    def output(self, n: fx.Node) -> str:
        res = n.args[0]
        if not isinstance(res, fx.Node):
            raise IntegerConversionError("the model must return one tensor")
        v = self.state[res]
        if isinstance(v, _FloatInput):
            raise IntegerConversionError("the model returns its input unchanged")
        if isinstance(v, _Quant):
            attrs = {"kind": "grid", "scale": v.grid.scale, "zero_point": v.grid.zero_point}
            src = v.name
        else:
            if v.clamped:
                src, p = self.pending_exact(v)
            else:
                src, p = self.pending_identity(v)
            attrs = {"kind": "affine", "unit": [float(u) for u in p.unit],
                     "offset": [float(o) for o in p.offset]}
        return self.emit(Node("dequantize", (src,), "output", "output", attrs))


# ------------------------------------------------------------------------ public entry
def _batches(data: Any) -> Iterable[Tensor]:
    if isinstance(data, Tensor):
        yield data
        return
    for item in data:
        if isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, Tensor):
            raise TypeError(f"calibration batches must be tensors or (x, y) pairs, got "
                            f"{type(item).__name__}")
        yield item


@torch.no_grad()
def to_integer(model: nn.Module, calib_data: Any = None, *, example_input: Tensor | None = None,
               rounding: str = "half_even", accumulator_bits: int = 32,
               calib_batches: int | None = None) -> IntegerModel:
    """Convert a fake-quant lowbit model (QAT-trained or calibrated) into an integer-only one.

    Args:
        model: a model whose Conv2d/Linear layers are lowbit ``QConv2d``/``QLinear`` with
            integer weights (at most 8 bits, symmetric, per tensor or per output channel) and
            integer input activations (at most 8 bits, per tensor, stateful observer), plus
            BatchNorm, ReLU/ReLU6/Hardtanh, max/average pooling, flatten, residual adds.
        calib_data: optional calibration batches (a tensor, or an iterable of tensors or
            ``(x, y)`` pairs). When given, a copy of the model is calibrated on them first
            (``lowbit.nn.set_calibrating``); without it the model must already be calibrated.
        example_input: a batch fixing the input shape (needed for pooling windows); defaults
            to the first calibration batch.
        rounding: ``"half_even"`` (default, as the fake quantizer) or ``"half_up"``.
        accumulator_bits: width of the GEMM accumulator; a layer whose proven accumulator
            bound does not fit raises :class:`IntegerConversionError`.
        calib_batches: use at most this many calibration batches.

    Returns:
        An :class:`~lowbit.integer.executor.IntegerModel`; the model itself is not modified.
    """
    from lowbit.nn.modules import set_calibrating

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_rounding(rounding)
    if isinstance(accumulator_bits, bool) or not isinstance(accumulator_bits, int) or not (
            8 <= accumulator_bits <= 32):
        raise ValueError(f"accumulator_bits must be an int in [8, 32], got {accumulator_bits!r}")
    if example_input is not None and not isinstance(example_input, Tensor):
        raise TypeError("example_input must be a torch.Tensor")
    if not any(isinstance(m, _lowbit_leaf_types()) for m in model.modules()):
        raise IntegerConversionError(
            "the model has no quantized layers (QConv2d/QLinear); convert it first, e.g. "
            "lowbit.nn.convert(model, 'w8a8', first_last='same'), then calibrate or train it")
    model = copy.deepcopy(model).cpu().eval()
    if calib_data is not None:
        set_calibrating(model, True)
        seen = 0
        try:
            for x in _batches(calib_data):
                if example_input is None:
                    example_input = x
                model(x.float().cpu())
                seen += 1
                if calib_batches is not None and seen >= calib_batches:
                    break
        finally:
            set_calibrating(model, False)
        if seen == 0:
            raise ValueError("calib_data yielded no batches")
    if example_input is None:
        raise ValueError("to_integer needs the input shape: pass calib_data or example_input")
    example = example_input[:1].float().cpu()
    gm = _trace(model)
    conv = _Converter(gm, rounding, accumulator_bits)
    # check every quantized layer before running anything (clear errors first)
    for name, m in gm.named_modules():
        if isinstance(m, _lowbit_leaf_types()):
            _act_grid(name, m)
            _int_weight(name, m)
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(example)
    input_name, _ = conv.run()
    if not conv.nodes or conv.nodes[0].op != "quantize":
        raise IntegerConversionError("the model input does not reach a quantized layer")
    return IntegerModel(conv.nodes, input_name, "output", tuple(example.shape[1:]), rounding,
                        meta={"source": type(model).__name__})


# ------------------------------------------------------------------------- comparisons
@torch.no_grad()
def compare_models(int_model: IntegerModel, fake_quant: nn.Module | None, data: Any, *,
                   simulate: bool = True, limit: int | None = None) -> dict[str, Any]:
    """Accuracy of the integer model, its simulation and the fake-quant model on ``data``
    (an iterable of ``(x, y)``), and how often their outputs differ.

    Returns counts and rates: ``top1_integer``, ``top1_simulation``, ``top1_fake_quant``,
    ``sim_mismatch_elements`` (integer outputs differing from the simulation: must be 0),
    ``pred_differ_fake_quant`` (fraction of images whose prediction differs from the
    fake-quant model's) and ``max_abs_logit_diff`` (integer vs fake-quant logits).
    """
    fq = None
    if fake_quant is not None:
        fq = copy.deepcopy(fake_quant).cpu().eval()
    n = c_int = c_sim = c_fq = mism = differ = 0
    worst = 0.0
    for x, y in data:
        if limit is not None and n >= limit:
            break
        if limit is not None:
            x, y = x[: limit - n], y[: limit - n]
        q_out = int_model.integer_outputs(x)
        logits = int_model.dequantize_output(q_out)
        pred = logits.argmax(1)
        c_int += int((pred == y).sum())
        if simulate:
            s_out = int_model.simulate(x)
            mism += int((s_out != q_out.to(torch.int64)).sum())
            c_sim += int((int_model.dequantize_output(s_out).argmax(1) == y).sum())
        if fq is not None:
            f = fq(x.float())
            c_fq += int((f.argmax(1) == y).sum())
            differ += int((f.argmax(1) != pred).sum())
            worst = max(worst, float((f - logits).abs().max()))
        n += y.shape[0]
    out: dict[str, Any] = {"images": n, "top1_integer": 100.0 * c_int / max(n, 1)}
    if simulate:
        out["top1_simulation"] = 100.0 * c_sim / max(n, 1)
        out["sim_mismatch_elements"] = mism
    if fq is not None:
        out["top1_fake_quant"] = 100.0 * c_fq / max(n, 1)
        out["pred_differ_fake_quant"] = differ / max(n, 1)
        out["max_abs_logit_diff"] = worst
    return out


# --------------------------------------------------------------------------- checkpoints
def checkpoint_model(checkpoint: Any, overrides: Any = ()) -> tuple[nn.Module, Any]:
    """The (fake-quant or float) model stored in a lowbit checkpoint, in eval mode, and its
    data task (``overrides``: ``key=value`` strings applied to the stored config)."""
    from lowbit import config as config_mod
    from lowbit.train import engine
    from lowbit.train.checkpoint import load_checkpoint, load_model_state

    ckpt = load_checkpoint(checkpoint)
    cfg = config_mod.resolve(ckpt["config"], list(overrides))
    config_mod.check_names(cfg)
    engine.seed_everything(cfg["seed"])
    task = engine.build_task(cfg)
    if task.kind != "classify":
        raise IntegerConversionError("integer models are built for image classifiers; this "
                                     "checkpoint holds a language model")
    model = engine.build_model(cfg, task)
    load_model_state(model, ckpt, cfg["model"]["name"])
    return model.eval(), task


def export_checkpoint(checkpoint: Any, *, out: Any = None, onnx: Any = None,
                      style: str = "integer", overrides: Any = ()) -> dict[str, Any]:
    """Convert the model of a QAT checkpoint to an integer model and write it.

    ``out``: the ``.npz`` file for :mod:`~lowbit.integer.numpy_runner` (default: beside the
    checkpoint, ``<name>.integer.npz``); ``onnx``: also write an ONNX file in ``style``
    (:func:`~lowbit.integer.onnx_export.export_onnx`). Returns the paths and the per-layer
    bit accounting. Every check (conversion, the ONNX extra, the style) runs before the first
    file is written, and each file is written atomically: an error leaves no file behind.
    """
    from pathlib import Path

    from lowbit.train.checkpoint import find_checkpoint

    onnx_bytes = None
    if onnx is not None:
        from lowbit.integer.onnx_export import STYLES, _require

        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        _require("onnx")  # MissingExtraError now, before anything is written
    model, task = checkpoint_model(checkpoint, overrides)
    x, _ = next(iter(task.eval_loader))
    im = to_integer(model, example_input=x[:1])
    if onnx is not None:
        from lowbit.integer.onnx_export import onnx_bytes as _onnx_bytes

        onnx_bytes = _onnx_bytes(im, style=style)
    src = find_checkpoint(checkpoint)
    out = Path(out) if out is not None else src.with_name(src.stem + ".integer.npz")
    result: dict[str, Any] = {"npz": str(im.save(out)), "summary": im.summary(),
                              "summary_markdown": im.summary_markdown()}
    if onnx_bytes is not None:
        from lowbit.integer.executor import atomic_write_bytes

        result["onnx"] = str(atomic_write_bytes(onnx, onnx_bytes))
    return result


def evaluate_checkpoint(checkpoint: Any, overrides: Any = ()) -> dict[str, Any]:
    """Evaluate the integer model of a checkpoint on its evaluation split, beside the
    fake-quant model and the simulation (``lowbit eval CHECKPOINT integer=true``)."""
    model, task = checkpoint_model(checkpoint, overrides)
    x, _ = next(iter(task.eval_loader))
    im = to_integer(model, example_input=x[:1])
    r = compare_models(im, model, task.eval_loader)
    return {"checkpoint": str(checkpoint), "images": r["images"],
            "val_top1": r["top1_integer"], "val_top1_fake_quant": r["top1_fake_quant"],
            "val_top1_simulation": r["top1_simulation"],
            "simulation_mismatches": r["sim_mismatch_elements"],
            "predictions_differing_from_fake_quant": r["pred_differ_fake_quant"]}
