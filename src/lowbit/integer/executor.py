"""The integer model: a straight-line program of integer operations, and its float64 simulation.

An :class:`IntegerModel` (built by :func:`lowbit.integer.to_integer`) is a list of :class:`Node`
objects over named tensors. The first node quantizes the float input image, the last one
dequantizes the output; everything in between runs on integer tensors only (int8/uint8
activations and weights, int32 accumulators from ``torch._int_mm``, int64 for the fixed-point
requantization ``M·x + C``, shift, tie correction and clamp).

Operations (``Node.op``):

``quantize``      float input -> integers: ``clamp(round(x·inv_scale) + zero_point)`` in float32,
                  exactly the arithmetic of lowbit's fake quantizer
``conv2d``        im2col + ``torch._int_mm`` over ``x - z_in`` (padding holds ``z_in``), then a
                  per-output-channel requantization
``linear``        the same for a matrix product
``requant``       a per-channel requantization of an integer tensor (channels on dim 1)
``add``           integer sum of two tensors (residual connections, in accumulator units)
``max_pool2d``    on integers (max commutes with a non-decreasing quantizer)
``sum_pool2d``    window sums in int64 (average pooling; the division is in the next requant)
``flatten`` ``slice`` ``pad`` ``clamp``   layout and integer clamps (ReLU on a quantized tensor)
``dequantize``    integers -> float logits: ``scale·(q - z)`` or per channel ``unit·v + offset``

Every requantization carries its exact definition, ``out = clamp(R(a_c·(x - z_in) + b_c) + z_out,
lo, hi)`` with rational ``a_c, b_c`` (:class:`RequantSpec`), and the integer rule that reproduces
it (a :class:`~lowbit.integer.ops.Requantizer`), optionally after clamping each input channel to
the range outside which the output saturates (exact, and it keeps ``M·x + C`` inside int64 when
the proven input bound is wide). :meth:`IntegerModel.simulate` evaluates the same
program with float64 tensor operations (exact on these integer values) and the exact rational
rounding of :mod:`lowbit.integer.exact` in place of the fixed-point rule, im2col and
``_int_mm``: the tests require the two to agree bit for bit.
"""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit._io import atomic_write
from lowbit.integer.exact import ExactAffine, exact_outputs
from lowbit.integer.fixed_point import FixedPointAffine, signed_bits
from lowbit.integer.ops import (
    Conv2dKernel,
    OnednnConv2d,
    Requantizer,
    ResidualEpilogue,
    check_backend,
    int_conv2d,
    int_linear,
    onednn_available,
)

__all__ = [
    "Grid",
    "RequantSpec",
    "Node",
    "IntegerModel",
    "OPS",
    "FORMAT",
    "atomic_write_bytes",
]

OPS = ("quantize", "conv2d", "linear", "requant", "add", "max_pool2d", "sum_pool2d", "flatten",
       "slice", "pad", "clamp", "dequantize")
FORMAT = "lowbit-integer-model-v1"

_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64}
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """``"int8"``, ``"uint8"``, ``"int32"`` or ``"int64"``."""
    return _NAMES[dtype]


@dataclass(frozen=True)
class Grid:
    """A quantized activation: real value ``scale·(q - zero_point)``, ``q`` in ``[qmin, qmax]``.

    A real ``y`` is put on the grid as ``clamp(R(y·inv_scale) + zero_point)``, where
    ``inv_scale`` is the float32 reciprocal of ``scale`` that lowbit's fake quantizer multiplies
    by (both are float32 values, taken exactly).
    """

    scale: float
    inv_scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def dtype(self) -> torch.dtype:
        """Storage: int8 for ranges inside [-128, 127], else uint8."""
        return torch.int8 if self.qmin >= -128 and self.qmax <= 127 else torch.uint8

    def same_as(self, other: Grid) -> bool:
        return (self.scale, self.zero_point, self.qmin, self.qmax) == (
            other.scale, other.zero_point, other.qmin, other.qmax)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "inv_scale": self.inv_scale,
                "zero_point": self.zero_point, "qmin": self.qmin, "qmax": self.qmax}


@dataclass
class RequantSpec:
    """One per-channel requantization: the exact definition and its integer rule.

    Definition on integer inputs ``x`` (channels along dim 1)::

        out_c(x) = clamp(R(a_c·(x - input_zero_point) + b_c) + zero_point, lo, hi)

    with ``R`` the model's rounding rule. ``requantizer`` reproduces it with integers
    (certified by :func:`~lowbit.integer.fixed_point.fixed_point_affine` when
    ``fixed_point`` is set; otherwise ``a_c`` is an integer, the shift is 0 and ``R`` of
    ``b_c`` is exact by construction). ``input_bounds`` ``[C, 2]`` bound ``x`` per channel.
    ``input_clamp`` (``[C, 2]`` or None): the integer rule first clamps ``x`` per channel to
    these bounds; outside them the definition's output is already saturated.
    """

    a: tuple[Fraction, ...]
    b: tuple[Fraction, ...]
    input_zero_point: int
    zero_point: int
    lo: int
    hi: int
    rounding: str
    input_bounds: np.ndarray
    requantizer: Requantizer
    fixed_point: FixedPointAffine | None = None
    input_clamp: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return len(self.a)

    def exact(self, x: np.ndarray) -> np.ndarray:
        """The definition, exactly (rational arithmetic), on int64 ``x`` of shape ``[C, N]``."""
        aff = ExactAffine.from_affine(list(self.a), list(self.b), int(self.input_zero_point))
        return exact_outputs(aff, x, (self.lo, self.hi), rounding=self.rounding,
                             output_zero_point=int(self.zero_point))

    def integer_arrays(self) -> dict[str, np.ndarray]:
        """``M``, ``C``, ``k``, ``w`` (int64 per channel)."""
        r = self.requantizer
        return {"M": r.multiplier.numpy().copy(), "C": r.offset.numpy().copy(),
                "k": r.shift.numpy().copy(), "w": r.window.numpy().copy()}

    def accounting(self) -> dict[str, Any]:
        """Bits of ``M`` and ``C``, shifts, and the worst ``|M·x + C|`` over the input bounds."""
        arr = self.integer_arrays()
        M = [int(v) for v in arr["M"]]
        C = [int(v) for v in arr["C"]]
        worst = 0
        ranges = self.input_bounds if self.input_clamp is None else self.input_clamp
        for m, c, (lo, hi) in zip(M, C, ranges.tolist()):
            zi = self.input_zero_point
            worst = max(worst, abs(m * (int(lo) - zi) + c), abs(m * (int(hi) - zi) + c))
        k = arr["k"]
        return {
            "channels": self.channels,
            "input_range": (int(self.input_bounds[:, 0].min()), int(self.input_bounds[:, 1].max())),
            "output_range": (self.lo, self.hi),
            "shift_min": int(k.min()), "shift_max": int(k.max()),
            "M_bits": max(signed_bits(m) for m in M),
            "C_bits": max(signed_bits(c) for c in C),
            "max_abs_acc": worst,
            "acc_bits": signed_bits(worst),
            "tie_windows": int((arr["w"] != 0).sum()),
            "certified": self.fixed_point is not None,
            "input_clamped": self.input_clamp is not None,
        }

    def __call__(self, x: Tensor, backend: str = "auto") -> Tensor:
        """Apply the integer rule to ``x`` (channels on dim 1)."""
        if self.input_clamp is not None:
            shape = [1] * x.dim()
            shape[1] = -1
            lo = torch.from_numpy(self.input_clamp[:, 0].astype(np.int64)).view(shape)
            hi = torch.from_numpy(self.input_clamp[:, 1].astype(np.int64)).view(shape)
            x = torch.minimum(torch.maximum(x.to(torch.int64), lo), hi)
        return self.requantizer(x, dim=1, backend=backend)


@dataclass
class Node:
    """One operation: ``output = op(*inputs)`` with integer ``attrs`` and optional weight and
    requantization. ``name`` is the layer of the source model it comes from."""

    op: str
    inputs: tuple[str, ...]
    output: str
    name: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)
    weight: Tensor | None = None
    requant: RequantSpec | None = None


def _channels_first(x: Tensor) -> np.ndarray:
    """int64 ``[C, N]`` view of a tensor with channels on dim 1."""
    return x.movedim(1, 0).reshape(x.shape[1], -1).to(torch.int64).numpy()


def _from_channels_first(y: np.ndarray, shape: torch.Size) -> Tensor:
    moved = (shape[1], shape[0], *shape[2:])
    return torch.from_numpy(np.ascontiguousarray(y)).reshape(moved).movedim(0, 1).contiguous()


def quantize_float(x: Tensor, attrs: dict[str, Any]) -> Tensor:
    """``clamp(round(x·inv_scale) + zero_point)`` in float32, then the integer storage type."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"the model input must be a floating-point tensor, got "
                        f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
    inv = torch.tensor(attrs["inv_scale"], dtype=torch.float32)
    v = torch.round(x.float() * inv) + float(attrs["zero_point"])
    return v.clamp_(attrs["qmin"], attrs["qmax"]).to(_DTYPES[attrs["dtype"]])


def _slices(attrs: dict[str, Any]) -> tuple[slice, ...]:
    return tuple(slice(*s) for s in attrs["slices"])


def _sum_pool(x: Tensor, attrs: dict[str, Any]) -> Tensor:
    kh, kw = attrs["kernel"]
    sh, sw = attrs["stride"]
    if x.is_floating_point():
        return F.avg_pool2d(x, (kh, kw), (sh, sw), divisor_override=1)
    if (kh, kw) == tuple(x.shape[2:]):
        return x.sum((2, 3), keepdim=True, dtype=torch.int64)
    return x.unfold(2, kh, sh).unfold(3, kw, sw).sum((-1, -2), dtype=torch.int64)


class IntegerModel:
    """An integer-only model (see the module docstring); call it on float images for logits.

    Attributes: ``nodes`` (the program), ``input_name``/``output_name``, ``input_shape``
    (``(C, H, W)`` or ``(features,)`` the model was converted for), ``rounding``.
    """

    def __init__(self, nodes: list[Node], input_name: str, output_name: str,
                 input_shape: tuple[int, ...], rounding: str = "half_even",
                 meta: dict[str, Any] | None = None) -> None:
        if not nodes or nodes[0].op != "quantize" or nodes[-1].op != "dequantize":
            raise ValueError("an integer model starts with 'quantize' and ends with 'dequantize'")
        for n in nodes:
            if n.op not in OPS:
                raise ValueError(f"node {n.name!r}: unknown op {n.op!r}; valid: {OPS}")
        self.nodes = nodes
        self.input_name = input_name
        self.output_name = output_name
        self.input_shape = tuple(int(s) for s in input_shape)
        self.rounding = rounding
        self.meta = dict(meta or {})
        last: dict[str, int] = {}
        for i, n in enumerate(nodes):
            for v in n.inputs:
                last[v] = i
        self._free_after = {i: [v for v, j in last.items() if j == i] for i in range(len(nodes))}

    # ------------------------------------------------------------------ float boundary
    def quantize_input(self, x: Tensor) -> Tensor:
        """The only float operation on the way in: the image on the first layer's grid."""
        self._check_input(x)
        return quantize_float(x, self.nodes[0].attrs)

    def dequantize_output(self, y: Tensor) -> Tensor:
        """The only float operation on the way out: integer outputs to float32 logits."""
        a = self.nodes[-1].attrs
        if a["kind"] == "grid":
            return ((y.to(torch.float64) - a["zero_point"]) * a["scale"]).float()
        shape = [1] * y.dim()
        shape[1] = -1
        unit = torch.tensor(a["unit"], dtype=torch.float64).view(shape)
        offset = torch.tensor(a["offset"], dtype=torch.float64).view(shape)
        return (y.to(torch.float64) * unit + offset).float()

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape [N, {', '.join(map(str, self.input_shape))}] "
                             f"(the shape the model was converted for), got {tuple(x.shape)}")

    # ------------------------------------------------------------------ integer program
    @torch.no_grad()
    def run_integer(self, q: Tensor, *, backend: str = "auto",
                    return_values: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Run the integer program on the quantized input ``q``; integer ops only.

        Returns the integer output (``dequantize_output`` turns it into logits); with
        ``return_values`` also every intermediate tensor by name. ``backend``:

        ``"torch"``     pure torch (im2col + ``torch._int_mm``, int64 requantization)
        ``"compiled"``  lowbit's compiled channels-last kernels: NHWC im2col + ``_int_mm`` and
                        the fused requantization / residual epilogue (the other nodes as with
                        ``"auto"``); RuntimeError where they cannot be built
        ``"onednn"``    the same, with each convolution whose accumulators are certified below
                        2^24 in oneDNN's int8 convolution (exact int32 sums carried in float32,
                        see :class:`~lowbit.integer.ops.OnednnConv2d`); RuntimeError where
                        oneDNN cannot be used exactly
        ``"vnni"``      the same, with each convolution in lowbit's AVX-512 VNNI kernel, the
                        requantization (and the residual add) in its register epilogue
                        (:class:`~lowbit.integer.ops.Conv2dKernel`); RuntimeError where the
                        CPU or the compiler lacks it
        ``"amx"``       the same kernel with its products on AMX-INT8 tiles; RuntimeError
                        where the CPU or the OS does not allow AMX
        ``"auto"``      per layer and input shape, the fastest of the paths available there,
                        timed once on the first call with that shape (a few runs of each;
                        all give the same integers, which the timing run also checks)

        ``return_values`` runs node by node (``"onednn"`` and ``"compiled"`` then as ``"auto"``).
        """
        check_backend(backend)
        if q.is_floating_point():
            raise TypeError(f"q must be an integer tensor (see quantize_input), got {q.dtype}")
        if backend == "vnni" and (_fused_extension() is None or _ext_vnni() is None):
            raise RuntimeError("backend='vnni': lowbit's AVX-512 VNNI convolution is "
                               "unavailable here (needs a CPU with avx512_vnni and a C++ "
                               "compiler); use 'auto', 'onednn', 'compiled' or 'torch'")
        if backend == "amx" and (_fused_extension() is None or _ext_vnni() is None
                                 or not _ext_vnni().amx_supported()):
            raise RuntimeError("backend='amx': lowbit's AMX-INT8 convolution is unavailable "
                               "here (needs a CPU with amx_int8, an OS that grants the tile "
                               "state, and a C++ compiler); use 'auto', 'vnni', 'onednn', "
                               "'compiled' or 'torch'")
        if backend == "onednn" and not onednn_available():
            raise RuntimeError("backend='onednn': oneDNN's exact int8 convolution is "
                               "unavailable here (needs torch.ops.onednn and a CPU with VNNI or "
                               "AMX-INT8); use 'auto', 'compiled' or 'torch'")
        if backend in ("compiled", "onednn") and _fused_extension() is None:
            raise RuntimeError(f"backend={backend!r}: the compiled channels-last kernels are "
                               "unavailable (LOWBIT_NO_EXT set, or no compiler); use 'auto' or "
                               "'torch'")
        node_backend = "auto" if backend in ("compiled", "onednn", "vnni", "amx") else backend
        env: dict[str, Tensor] = {self.nodes[0].output: q}
        keep: dict[str, Tensor] = {}
        if return_values or backend == "torch" or _fused_extension() is None:
            steps, free = [(n, None) for n in self.nodes[1:-1]], None
        else:
            steps, free = self._fused_plan()
        for i, (n, fast) in enumerate(steps):
            if isinstance(fast, _ResidualGroup):
                env[n.output] = fast.run(env, backend)
            elif fast is not None:
                env[n.output] = fast.run(env[n.inputs[0]], backend)
            else:
                env[n.output] = self._run_node(n, [env[v] for v in n.inputs], node_backend)
            if return_values:
                keep[n.output] = env[n.output]
            for v in (self._free_after[i + 1] if free is None else free[i]):
                env.pop(v, None)
        out = env[self.nodes[-1].inputs[0]]
        return (out, keep) if return_values else out

    def value_dtypes(self) -> dict[str, torch.dtype]:
        """The integer type of every tensor of the program."""
        dt: dict[str, torch.dtype] = {self.nodes[0].output: _DTYPES[self.nodes[0].attrs["dtype"]]}
        for n in self.nodes[1:-1]:
            if n.requant is not None:
                dt[n.output] = n.requant.requantizer.dtype
            elif n.op == "add":
                dt[n.output] = _DTYPES[n.attrs["dtype"]]
            elif n.op == "sum_pool2d":
                dt[n.output] = torch.int64
            else:
                dt[n.output] = dt[n.inputs[0]]
        return dt

    def _fused_plan(self) -> tuple[list, list]:
        """Steps with each residual pattern (branch conv in accumulator units, shortcut
        requantization, add, requantization to 8 bits) replaced by one fused kernel call."""
        if getattr(self, "_plan_cache", None) is not None:
            return self._plan_cache
        dtypes = self.value_dtypes()
        ranges = self._code_ranges()
        groups = _find_residual_groups(self.nodes, dtypes, ranges)
        skip = {id(n) for g in groups for n in (g.conv.node, g.shortcut, g.add)}
        at_final: dict[int, Any] = {id(g.final): g for g in groups}
        steps = []
        for n in self.nodes[1:-1]:
            if id(n) in skip:
                continue
            g = at_final.get(id(n)) or _fast_conv(n, dtypes, ranges)
            steps.append((n, g))
        last: dict[str, int] = {}
        for i, (n, g) in enumerate(steps):
            for v in (g.inputs if isinstance(g, _ResidualGroup) else n.inputs):
                last[v] = i
        last[self.nodes[-1].inputs[0]] = len(steps)
        free = [[v for v, j in last.items() if j == i] for i in range(len(steps))]
        self._plan_cache = (steps, free)
        return self._plan_cache

    def _code_ranges(self) -> dict[str, tuple[int, int]]:
        """Proven ``(lo, hi)`` of the integer codes of the tensors whose producer fixes them:
        the input quantizer and every requantization (its output clamp)."""
        out: dict[str, tuple[int, int]] = {}
        for n in self.nodes[:-1]:
            if n.op == "quantize":
                out[n.output] = (int(n.attrs["qmin"]), int(n.attrs["qmax"]))
            elif n.requant is not None:
                r = n.requant.requantizer
                out[n.output] = (int(r.qmin), int(r.qmax))
        return out

    def onednn_layers(self) -> list[str]:
        """Names of the convolutions that the fused path runs in oneDNN (``backend="auto"`` or
        ``"onednn"``): oneDNN available and the accumulator bound certified below 2^24."""
        if _fused_extension() is None:
            return []
        steps, _ = self._fused_plan()
        convs = [g.conv if isinstance(g, _ResidualGroup) else g for _, g in steps]
        return [c.node.name for c in convs if isinstance(c, _FastConv) and c.onednn is not None]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_plan_cache", None)
        return state

    def _run_node(self, n: Node, x: list[Tensor], backend: str) -> Tensor:
        a = n.attrs
        op = n.op
        if op == "conv2d":
            return int_conv2d(x[0], n.weight, n.requant.requantizer,
                              input_zero_point=a["input_zero_point"], stride=tuple(a["stride"]),
                              padding=tuple(a["padding"]), dilation=tuple(a["dilation"]),
                              groups=a["groups"], backend=backend)
        if op == "linear":
            return int_linear(x[0], n.weight, n.requant.requantizer,
                              input_zero_point=a["input_zero_point"], backend=backend)
        if op == "requant":
            return n.requant(x[0], backend=backend)
        if op == "add":
            dt = _DTYPES[a["dtype"]]
            return torch.add(x[0].to(dt), x[1].to(dt))
        if op == "max_pool2d":
            return F.max_pool2d(x[0], tuple(a["kernel"]), tuple(a["stride"]),
                                tuple(a["padding"]), tuple(a["dilation"]), a["ceil_mode"])
        if op == "sum_pool2d":
            return _sum_pool(x[0], a)
        if op == "flatten":
            return torch.flatten(x[0], a["start_dim"], a["end_dim"])
        if op == "slice":
            y = x[0][_slices(a)]
            cl = y.dim() == 4 and x[0].is_contiguous(memory_format=torch.channels_last)
            return y.contiguous(memory_format=torch.channels_last if cl else
                                torch.contiguous_format)
        if op == "pad":
            y = F.pad(x[0], tuple(a["pad"]), value=a["value"])
            if y.dim() == 4 and x[0].is_contiguous(memory_format=torch.channels_last):
                y = y.contiguous(memory_format=torch.channels_last)
            return y
        if op == "clamp":
            return x[0].clamp(a["lo"], a["hi"])
        raise ValueError(f"node {n.name!r}: op {op!r} is not an integer operation")

    def integer_outputs(self, x: Tensor, *, backend: str = "auto") -> Tensor:
        """Quantize ``x`` and run the integer program: the model's integer outputs."""
        return self.run_integer(self.quantize_input(x), backend=backend)

    def __call__(self, x: Tensor, *, backend: str = "auto") -> Tensor:
        """Float32 logits of float images ``x``."""
        return self.dequantize_output(self.integer_outputs(x, backend=backend))

    forward = __call__

    # ------------------------------------------------------------------ simulation
    @torch.no_grad()
    def simulate(self, x: Tensor, *, return_values: bool = False
                 ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The same program in float64 with exact rational requantization (see module doc).

        Returns int64 outputs equal to :meth:`integer_outputs` when both are right.
        """
        env: dict[str, Tensor] = {self.nodes[0].output: self.quantize_input(x).to(torch.float64)}
        keep: dict[str, Tensor] = {}
        for i in range(1, len(self.nodes) - 1):
            n = self.nodes[i]
            xs = [env[v] for v in n.inputs]
            env[n.output] = self._simulate_node(n, xs)
            if return_values:
                keep[n.output] = env[n.output].to(torch.int64)
            for v in self._free_after[i]:
                env.pop(v, None)
        out = env[self.nodes[-1].inputs[0]].to(torch.int64)
        return (out, keep) if return_values else out

    def _simulate_node(self, n: Node, x: list[Tensor]) -> Tensor:
        a = n.attrs
        op = n.op
        if op in ("conv2d", "linear"):
            w = n.weight.to(torch.float64)
            xz = x[0] - float(a["input_zero_point"])  # real zeros; padding adds real zeros
            if op == "conv2d":
                acc = F.conv2d(xz, w, None, tuple(a["stride"]), tuple(a["padding"]),
                               tuple(a["dilation"]), a["groups"])
            else:
                acc = F.linear(xz, w)
            return self._simulate_requant(n.requant, acc)
        if op == "requant":
            return self._simulate_requant(n.requant, x[0])
        if op == "add":
            return x[0] + x[1]
        if op == "max_pool2d":
            return F.max_pool2d(x[0], tuple(a["kernel"]), tuple(a["stride"]),
                                tuple(a["padding"]), tuple(a["dilation"]), a["ceil_mode"])
        if op == "sum_pool2d":
            return _sum_pool(x[0], a)
        if op == "flatten":
            return torch.flatten(x[0], a["start_dim"], a["end_dim"])
        if op == "slice":
            return x[0][_slices(a)]
        if op == "pad":
            return F.pad(x[0], tuple(a["pad"]), value=float(a["value"]))
        if op == "clamp":
            return x[0].clamp(a["lo"], a["hi"])
        raise ValueError(f"node {n.name!r}: op {op!r} cannot be simulated")

    @staticmethod
    def _simulate_requant(spec: RequantSpec, v: Tensor) -> Tensor:
        if v.numel() and v.abs().max() >= 2**52:
            raise ValueError("simulation: accumulator beyond 2^52 is not exact in float64")
        y = spec.exact(_channels_first(v.to(torch.int64)))
        return _from_channels_first(y, v.shape).to(torch.float64)

    # ------------------------------------------------------------------ reports and files
    def summary(self) -> list[dict[str, Any]]:
        """Per requantization: layer, op, shifts, bits of ``M`` and ``C``, worst ``|M·x+C|``."""
        rows = []
        for n in self.nodes:
            if n.requant is not None:
                rows.append({"layer": n.name, "op": n.op, "output": n.output,
                             **n.requant.accounting()})
        return rows

    def summary_markdown(self) -> str:
        """:meth:`summary` as a markdown table."""
        lines = ["| layer | op | ch | input range | output range | k min..max | M bits | "
                 "C bits | worst abs(M·x+C) bits | tie windows | certified |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.summary():
            lines.append(
                f"| {r['layer']} | {r['op']} | {r['channels']} | [{r['input_range'][0]}, "
                f"{r['input_range'][1]}] | [{r['output_range'][0]}, {r['output_range'][1]}] | "
                f"{r['shift_min']}..{r['shift_max']} | {r['M_bits']} | {r['C_bits']} | "
                f"{r['acc_bits']} | {r['tie_windows']} | {'yes' if r['certified'] else 'exact'} |")
        return "\n".join(lines) + "\n"

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything the NumPy runner needs: a JSON graph and integer arrays (see ``save``)."""
        graph = {"format": FORMAT, "input": self.input_name, "output": self.output_name,
                 "input_shape": list(self.input_shape), "rounding": self.rounding,
                 "nodes": []}
        arrays: dict[str, np.ndarray] = {}
        for i, n in enumerate(self.nodes):
            entry: dict[str, Any] = {"op": n.op, "inputs": list(n.inputs), "output": n.output,
                                     "name": n.name, "attrs": n.attrs}
            if n.weight is not None:
                arrays[f"n{i}.weight"] = n.weight.numpy().copy()
            if n.requant is not None:
                r = n.requant.requantizer
                entry["requant"] = {"zero_point": int(r.zero_point), "lo": int(r.qmin),
                                    "hi": int(r.qmax), "dtype": dtype_name(r.dtype),
                                    "input_zero_point": int(n.requant.input_zero_point)}
                for k, v in n.requant.integer_arrays().items():
                    arrays[f"n{i}.{k}"] = v
                if n.requant.input_clamp is not None:
                    arrays[f"n{i}.clamp"] = n.requant.input_clamp.astype(np.int64)
            graph["nodes"].append(entry)
        arrays["graph"] = np.frombuffer(json.dumps(graph).encode(), dtype=np.uint8).copy()
        return arrays

    def save(self, path: str | os.PathLike) -> Path:
        """Write a self-contained ``.npz`` (graph, integer weights, ``M``, ``C``, ``k``, ``w``)
        for :mod:`lowbit.integer.numpy_runner`; atomic (no half-written file)."""
        buf = io.BytesIO()
        np.savez_compressed(buf, **self.to_arrays())
        return atomic_write_bytes(path, buf.getvalue())

    def __repr__(self) -> str:
        ops: dict[str, int] = {}
        for n in self.nodes:
            ops[n.op] = ops.get(n.op, 0) + 1
        body = ", ".join(f"{k}={v}" for k, v in ops.items())
        return f"IntegerModel(input_shape={self.input_shape}, {body})"


# ------------------------------------------------------------ channels-last compiled path
_FAST_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <vector>

// compiled for x86-64-v4 (AVX-512 with 64-bit multiplies) and AVX2 next to the baseline,
// chosen at load time; built without clones where the compiler does not know them
#ifndef LOWBIT_NO_CLONES
#define LOWBIT_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define LOWBIT_CLONES
#endif

// rows [b, e) of the NHWC im2col: column (i*KW + j)*C + c; uint8 values become x - 128
LOWBIT_CLONES
static void im2col_rows(const uint8_t* in, int8_t* out, int64_t b, int64_t e, int64_t H,
                        int64_t W, int64_t C, int64_t OH, int64_t OW, int64_t kh, int64_t kw,
                        int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                        int8_t padv, bool flip) {
  const int64_t K = kh * kw * C;
  const uint8_t fx = flip ? 0x80 : 0x00;
  for (int64_t t = b; t < e; ++t) {
    const int64_t n = t / OH, oh = t % OH;
    for (int64_t ow = 0; ow < OW; ++ow) {
      int8_t* dst = out + (t * OW + ow) * K;
      const int64_t w0 = ow * sw - pw;
      const bool inside = dw == 1 && w0 >= 0 && w0 + kw <= W;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t h = oh * sh - ph + i * dh;
        if (h < 0 || h >= H) {
          std::memset(dst, padv, kw * C);
          dst += kw * C;
          continue;
        }
        const uint8_t* row = in + ((n * H + h) * W) * C;
        if (inside) {  // kw neighbouring pixels: one contiguous run of kw*C bytes
          const uint8_t* src = row + w0 * C;
          for (int64_t c = 0; c < kw * C; ++c) dst[c] = static_cast<int8_t>(src[c] ^ fx);
          dst += kw * C;
          continue;
        }
        for (int64_t j = 0; j < kw; ++j, dst += C) {
          const int64_t w = w0 + j * dw;
          if (w < 0 || w >= W) { std::memset(dst, padv, C); continue; }
          const uint8_t* src = row + w * C;
          for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<int8_t>(src[c] ^ fx);
        }
      }
    }
  }
}

torch::Tensor im2col_nhwc(torch::Tensor x, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                          int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t pad) {
  TORCH_CHECK((x.dtype() == torch::kInt8 || x.dtype() == torch::kUInt8) && x.dim() == 4 &&
              x.is_contiguous(), "x must be a contiguous NHWC int8/uint8 tensor");
  const bool flip = x.dtype() == torch::kUInt8;
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  auto cols = torch::empty({N * OH * OW, kh * kw * C}, x.options().dtype(torch::kInt8));
  const uint8_t* in = reinterpret_cast<const uint8_t*>(x.data_ptr());
  int8_t* out = cols.data_ptr<int8_t>();
  at::parallel_for(0, N * OH, 1, [&](int64_t b, int64_t e) {
    im2col_rows(in, out, b, e, H, W, C, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw,
                static_cast<int8_t>(pad), flip);
  });
  return cols;
}

// The epilogues work on blocks of up to 256 channels of one row, in three loops that the
// compiler vectorizes (one element type each): accumulators to int64 (int32, or float32
// holding integers below 2^24 in magnitude: exact oneDNN sums), the fixed-point rule in int64,
// and the narrowing store. The rule, per channel o with v = x·mul + off:
//   q = v >> k (floor); q -= [v mod 2^k < w and q odd]; clamp(q + zp, qmin, qmax)
// with v mod 2^k written v - (q << k) and the test as a sign bit (both exact).
constexpr int64_t kBlock = 256;

__attribute__((always_inline)) static inline void rule_block(
    int64_t* __restrict__ t, int64_t n, const int64_t* __restrict__ mul,
    const int64_t* __restrict__ off, const int64_t* __restrict__ sh,
    const int64_t* __restrict__ win, int64_t zp, int64_t qmin, int64_t qmax) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = t[i] * mul[i] + off[i];
    const int64_t k = sh[i];
    int64_t q = v >> k;
    const int64_t low = v - static_cast<int64_t>(static_cast<uint64_t>(q) << k);  // in [0, 2^k)
    const int64_t w = win[i] < 0 ? 0 : win[i];  // a negative window never applies
    q -= ((low - w) >> 63) & q & 1;              // low < w: the sign of low - w (no overflow)
    q += zp;
    q = q < qmin ? qmin : q;
    q = q > qmax ? qmax : q;
    t[i] = q;
  }
}

template <typename ACC>
__attribute__((always_inline)) static inline void load_block(
    const ACC* __restrict__ a, const int64_t* __restrict__ zs, int64_t* __restrict__ t,
    int64_t n) {
  for (int64_t i = 0; i < n; ++i) t[i] = static_cast<int64_t>(a[i]) - zs[i];
}

template <typename OUT>
__attribute__((always_inline)) static inline void store_block(
    const int64_t* __restrict__ t, OUT* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<OUT>(t[i]);
}

// The per-channel constants are tiled to a period of L = a multiple of O (at least kBlock
// elements when O is smaller), so that a flat range of [R, O] rows is processed in blocks of
// up to kBlock elements whatever O is: block j of a period uses the constants from j on.
static int64_t period(int64_t O) { return O >= kBlock ? O : (kBlock / O) * O; }

static std::vector<int64_t> tiled(const int64_t* p, int64_t O, int64_t L, int64_t scale = 1) {
  std::vector<int64_t> t(L);
  for (int64_t i = 0; i < L; ++i) t[i] = p == nullptr ? (i % O) * scale : p[i % O];
  return t;
}

// requantization of a flat range of `total` accumulators (rows of O) minus zs per channel
#define LOWBIT_ROWS(NAME, OUT, ACC)                                                         \
  LOWBIT_CLONES static void NAME(                                                           \
      const ACC* __restrict__ acc, OUT* __restrict__ out, int64_t total, int64_t L,         \
      const int64_t* __restrict__ zs, const int64_t* __restrict__ mul,                      \
      const int64_t* __restrict__ off, const int64_t* __restrict__ sh,                      \
      const int64_t* __restrict__ win, int64_t zp, int64_t qmin, int64_t qmax) {            \
    alignas(64) int64_t t[kBlock];                                                          \
    for (int64_t s0 = 0; s0 < total; s0 += L) {                                             \
      for (int64_t j = 0; j < L && s0 + j < total; j += kBlock) {                           \
        const int64_t n = std::min(std::min(kBlock, L - j), total - s0 - j);                \
        load_block<ACC>(acc + s0 + j, zs + j, t, n);                                        \
        rule_block(t, n, mul + j, off + j, sh + j, win + j, zp, qmin, qmax);                \
        store_block<OUT>(t, out + s0 + j, n);                                               \
      }                                                                                     \
    }                                                                                       \
  }
LOWBIT_ROWS(rows_i8, int8_t, int32_t)
LOWBIT_ROWS(rows_u8, uint8_t, int32_t)
LOWBIT_ROWS(rows_i32, int32_t, int32_t)
LOWBIT_ROWS(rows_i8_f, int8_t, float)
LOWBIT_ROWS(rows_u8_f, uint8_t, float)
LOWBIT_ROWS(rows_i32_f, int32_t, float)

// residual: x = G·(acc - zs) + lut[o][s], clamped per channel, then the rule (lo: the
// tiled o·256 row offsets into the table)
#define LOWBIT_RES(NAME, OUT, IN, ACC)                                                        \
  LOWBIT_CLONES static void NAME(                                                             \
      const ACC* __restrict__ acc, const IN* __restrict__ sc, OUT* __restrict__ out,          \
      int64_t total, int64_t L, const int64_t* __restrict__ zs, const int64_t* __restrict__ g, \
      const int64_t* __restrict__ lut, const int64_t* __restrict__ lo,                        \
      const int64_t* __restrict__ clo, const int64_t* __restrict__ chi,                       \
      const int64_t* __restrict__ mul, const int64_t* __restrict__ off,                       \
      const int64_t* __restrict__ sh, const int64_t* __restrict__ win, int64_t zp,            \
      int64_t qmin, int64_t qmax) {                                                           \
    alignas(64) int64_t t[kBlock];                                                            \
    alignas(64) int64_t u[kBlock];                                                            \
    for (int64_t s0 = 0; s0 < total; s0 += L) {                                               \
      for (int64_t j = 0; j < L && s0 + j < total; j += kBlock) {                             \
        const int64_t n = std::min(std::min(kBlock, L - j), total - s0 - j);                  \
        const IN* __restrict__ s = sc + s0 + j;                                               \
        load_block<ACC>(acc + s0 + j, zs + j, t, n);                                          \
        for (int64_t i = 0; i < n; ++i) u[i] = lut[lo[j + i] + int64_t(s[i])];                \
        for (int64_t i = 0; i < n; ++i) {                                                     \
          const int64_t x = g[j + i] * t[i] + u[i];                                           \
          const int64_t a = clo[j + i], b = chi[j + i];                                       \
          t[i] = x < a ? a : (x > b ? b : x);                                                 \
        }                                                                                     \
        rule_block(t, n, mul + j, off + j, sh + j, win + j, zp, qmin, qmax);                  \
        store_block<OUT>(t, out + s0 + j, n);                                                 \
      }                                                                                       \
    }                                                                                         \
  }
LOWBIT_RES(res_i8_u8, int8_t, uint8_t, int32_t)
LOWBIT_RES(res_u8_u8, uint8_t, uint8_t, int32_t)
LOWBIT_RES(res_i32_u8, int32_t, uint8_t, int32_t)
LOWBIT_RES(res_i8_i8, int8_t, int8_t, int32_t)
LOWBIT_RES(res_u8_i8, uint8_t, int8_t, int32_t)
LOWBIT_RES(res_i32_i8, int32_t, int8_t, int32_t)
LOWBIT_RES(res_i8_u8_f, int8_t, uint8_t, float)
LOWBIT_RES(res_u8_u8_f, uint8_t, uint8_t, float)
LOWBIT_RES(res_i32_u8_f, int32_t, uint8_t, float)
LOWBIT_RES(res_i8_i8_f, int8_t, int8_t, float)
LOWBIT_RES(res_u8_i8_f, uint8_t, int8_t, float)
LOWBIT_RES(res_i32_i8_f, int32_t, int8_t, float)

static torch::ScalarType out_type(int64_t kind) {  // 0 int8, 1 uint8, 2 int32
  return kind == 1 ? torch::kUInt8 : (kind == 2 ? torch::kInt32 : torch::kInt8);
}

static void check_acc(const torch::Tensor& acc) {
  TORCH_CHECK((acc.dtype() == torch::kInt32 || acc.dtype() == torch::kFloat) &&
              acc.dim() == 2 && acc.is_contiguous(),
              "acc must be a contiguous [R, O] int32 (or exact float32) tensor");
}

static void check_channels(std::initializer_list<const torch::Tensor*> ts, int64_t O) {
  for (const torch::Tensor* t : ts)
    TORCH_CHECK(t->dtype() == torch::kInt64 && t->is_contiguous() && t->numel() == O,
                "per-channel constants must be contiguous int64 [O]");
}

torch::Tensor requant_rows(torch::Tensor acc, torch::Tensor zs, torch::Tensor mul,
                           torch::Tensor off, torch::Tensor sh, torch::Tensor win, int64_t zp,
                           int64_t qmin, int64_t qmax, int64_t out_kind) {
  check_acc(acc);
  const int64_t R = acc.size(0), O = acc.size(1);
  check_channels({&zs, &mul, &off, &sh, &win}, O);
  auto out = torch::empty(acc.sizes(), acc.options().dtype(out_type(out_kind)));
  if (R == 0 || O == 0) return out;
  const bool fl = acc.dtype() == torch::kFloat;
  const int64_t L = period(O);
  const auto z = tiled(zs.data_ptr<int64_t>(), O, L), m = tiled(mul.data_ptr<int64_t>(), O, L),
             f = tiled(off.data_ptr<int64_t>(), O, L), k = tiled(sh.data_ptr<int64_t>(), O, L),
             w = tiled(win.data_ptr<int64_t>(), O, L);
  const int64_t grain = std::max<int64_t>(1, 16384 / O);
  at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) {
#define LOWBIT_CALL(FN, OUT, ACC)                                                             \
    FN(acc.data_ptr<ACC>() + b * O, out.data_ptr<OUT>() + b * O, (e - b) * O, L, z.data(),   \
       m.data(), f.data(), k.data(), w.data(), zp, qmin, qmax)
    if (fl) {
      if (out_kind == 1) LOWBIT_CALL(rows_u8_f, uint8_t, float);
      else if (out_kind == 2) LOWBIT_CALL(rows_i32_f, int32_t, float);
      else LOWBIT_CALL(rows_i8_f, int8_t, float);
    } else {
      if (out_kind == 1) LOWBIT_CALL(rows_u8, uint8_t, int32_t);
      else if (out_kind == 2) LOWBIT_CALL(rows_i32, int32_t, int32_t);
      else LOWBIT_CALL(rows_i8, int8_t, int32_t);
    }
#undef LOWBIT_CALL
  });
  return out;
}

torch::Tensor residual_requant(torch::Tensor acc, torch::Tensor zs, torch::Tensor g,
                               torch::Tensor sc, torch::Tensor lut, torch::Tensor clo,
                               torch::Tensor chi, torch::Tensor mul, torch::Tensor off,
                               torch::Tensor sh, torch::Tensor win, int64_t zp, int64_t qmin,
                               int64_t qmax, int64_t out_kind) {
  check_acc(acc);
  TORCH_CHECK((sc.dtype() == torch::kUInt8 || sc.dtype() == torch::kInt8) &&
              sc.is_contiguous() && sc.sizes() == acc.sizes(),
              "the shortcut must be a contiguous 8-bit tensor shaped like acc");
  const int64_t R = acc.size(0), O = acc.size(1);
  TORCH_CHECK(lut.dtype() == torch::kInt64 && lut.is_contiguous() && lut.dim() == 2 &&
              lut.size(0) == O && lut.size(1) == 256, "lut must be contiguous int64 [O, 256]");
  check_channels({&zs, &g, &clo, &chi, &mul, &off, &sh, &win}, O);
  auto out = torch::empty(acc.sizes(), acc.options().dtype(out_type(out_kind)));
  if (R == 0 || O == 0) return out;
  const bool su = sc.dtype() == torch::kUInt8, fl = acc.dtype() == torch::kFloat;
  const int64_t L = period(O);
  const auto z = tiled(zs.data_ptr<int64_t>(), O, L), gg = tiled(g.data_ptr<int64_t>(), O, L),
             lo = tiled(nullptr, O, L, 256), cl = tiled(clo.data_ptr<int64_t>(), O, L),
             ch = tiled(chi.data_ptr<int64_t>(), O, L), m = tiled(mul.data_ptr<int64_t>(), O, L),
             f = tiled(off.data_ptr<int64_t>(), O, L), k = tiled(sh.data_ptr<int64_t>(), O, L),
             w = tiled(win.data_ptr<int64_t>(), O, L);
  const int64_t* lt = lut.data_ptr<int64_t>() + (su ? 0 : 128);  // int8 s indexes s + 128
  const int64_t grain = std::max<int64_t>(1, 16384 / O);
  at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) {
#define LOWBIT_CALL(FN, OUT, IN, ACC)                                                      \
    FN(acc.data_ptr<ACC>() + b * O, sc.data_ptr<IN>() + b * O, out.data_ptr<OUT>() + b * O, \
       (e - b) * O, L, z.data(), gg.data(), lt, lo.data(), cl.data(), ch.data(), m.data(),  \
       f.data(), k.data(), w.data(), zp, qmin, qmax)
#define LOWBIT_OUTS(SUFFIX, IN, ACC)                                                       \
    if (out_kind == 1) LOWBIT_CALL(res_u8_##SUFFIX, uint8_t, IN, ACC);                    \
    else if (out_kind == 2) LOWBIT_CALL(res_i32_##SUFFIX, int32_t, IN, ACC);              \
    else LOWBIT_CALL(res_i8_##SUFFIX, int8_t, IN, ACC);
    if (su && fl) { LOWBIT_OUTS(u8_f, uint8_t, float) }
    else if (su) { LOWBIT_OUTS(u8, uint8_t, int32_t) }
    else if (fl) { LOWBIT_OUTS(i8_f, int8_t, float) }
    else { LOWBIT_OUTS(i8, int8_t, int32_t) }
#undef LOWBIT_OUTS
#undef LOWBIT_CALL
  });
  return out;
}
"""

_FAST_DECL = r"""
torch::Tensor im2col_nhwc(torch::Tensor x, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                          int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t pad);
torch::Tensor requant_rows(torch::Tensor acc, torch::Tensor zs, torch::Tensor mul,
                           torch::Tensor off, torch::Tensor sh, torch::Tensor win, int64_t zp,
                           int64_t qmin, int64_t qmax, int64_t out_kind);
torch::Tensor residual_requant(torch::Tensor acc, torch::Tensor zs, torch::Tensor g,
                               torch::Tensor sc, torch::Tensor lut, torch::Tensor clo,
                               torch::Tensor chi, torch::Tensor mul, torch::Tensor off,
                               torch::Tensor sh, torch::Tensor win, int64_t zp, int64_t qmin,
                               int64_t qmax, int64_t out_kind);
"""

_fast_state: dict[str, Any] = {}


def _fused_extension() -> Any:
    """The compiled channels-last kernels (built on first use), or None: disabled with
    ``LOWBIT_NO_EXT=1``, no compiler, or the base integer kernels unavailable."""
    from lowbit.integer import _ext

    if _ext.disabled() or _ext.extension() is None:
        return None
    if "mod" not in _fast_state:
        from torch.utils.cpp_extension import load_inline

        err: Exception | None = None
        _fast_state["mod"] = None
        for name, flags in (("lowbit_integer_nhwc_v5", []),
                            ("lowbit_integer_nhwc_v5_plain", ["-DLOWBIT_NO_CLONES"])):
            try:
                _fast_state["mod"] = load_inline(
                    name=name, cpp_sources=[_FAST_DECL + _FAST_SOURCE],
                    functions=["im2col_nhwc", "requant_rows", "residual_requant"],
                    extra_cflags=["-O3", "-fopenmp", "-std=c++17", *flags],
                    extra_ldflags=["-fopenmp"], verbose=False)
                break
            except Exception as exc:  # no compiler, unknown target: try plainer, then none
                err = exc
        if _fast_state["mod"] is None:
            import warnings

            warnings.warn(f"lowbit.integer: channels-last kernels unavailable ({err}); running "
                          "node by node", RuntimeWarning, stacklevel=2)
    return _fast_state["mod"]


class _FastConv:
    """A conv2d node on channels-last integers: ``[rows, O]`` accumulators (already NHWC) from
    oneDNN's int8 convolution where it is certified exact (:attr:`onednn`), else from NHWC
    im2col + ``_int_mm``; requantization along the last dim. Same integers as
    :func:`~lowbit.integer.ops.int_conv2d`. ``last_path`` tells which ran last
    (``"onednn"`` or ``"int_mm"``)."""

    def __init__(self, n: Node, in_dtype: torch.dtype,
                 code_range: tuple[int, int] | None = None) -> None:
        self.node = n
        w = n.weight
        self.wt = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).t().contiguous()  # [K, O]
        a = n.attrs
        self.z8 = a["input_zero_point"] - (128 if in_dtype == torch.uint8 else 0)
        self.zs = self.z8 * w.reshape(w.shape[0], -1).to(torch.int64).sum(1)
        self.onednn = OnednnConv2d.certified(
            w, input_zero_point=a["input_zero_point"], input_dtype=in_dtype,
            input_range=code_range, stride=tuple(a["stride"]), padding=tuple(a["padding"]),
            dilation=tuple(a["dilation"]))
        self.no_offset = torch.zeros(w.shape[0], dtype=torch.int64)  # oneDNN subtracts z
        self.vnni_dtype = in_dtype
        self.code_range = code_range or ((0, 255) if in_dtype == torch.uint8 else (-128, 127))
        self.last_path: str | None = None
        self.chosen: dict[tuple, str] = {}  # "auto": the fastest path per input shape

    # built on first use: the convolution of a fused residual block never runs these alone
    @functools.cached_property
    def vnni(self) -> Conv2dKernel | None:
        return _vnni_kernel(self.node, self.vnni_dtype, self.node.requant.requantizer)

    @functools.cached_property
    def amx(self) -> Conv2dKernel | None:
        return _vnni_kernel(self.node, self.vnni_dtype, self.node.requant.requantizer, amx=True)

    def accumulate(self, x: Tensor, backend: str = "auto"
                   ) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
        """``(acc, zs, (n, oh, ow))``: ``acc - zs`` is the exact accumulator, ``[rows, O]``
        int32 (``_int_mm``) or float32 holding integers below 2^24 (oneDNN)."""
        if self.onednn is not None and backend in ("auto", "onednn"):
            y = self.onednn(x)  # [N, O, OH, OW], channels-last memory
            n, o, oh, ow = y.shape
            self.last_path = "onednn"
            return y.permute(0, 2, 3, 1).reshape(-1, o), self.no_offset, (n, oh, ow)
        self.last_path = "int_mm"
        a = self.node.attrs
        kh, kw = self.node.weight.shape[2:]
        xh = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        cols = _fused_extension().im2col_nhwc(xh, kh, kw, *a["stride"], *a["padding"],
                                              *a["dilation"], self.z8)
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return torch._int_mm(cols, self.wt), self.zs, (n, oh, ow)

    def run(self, x: Tensor, backend: str) -> Tensor:
        path = _choose_path(self, (x,), backend)
        self.last_path = path
        if path in ("vnni", "amx"):
            return getattr(self, path)(x)
        return self._run_accumulated(x, "onednn" if path == "onednn" else "compiled")

    def _run_accumulated(self, x: Tensor, backend: str) -> Tensor:
        acc, zs, (n, oh, ow) = self.accumulate(x, backend)
        r = self.node.requant.requantizer
        if r.dtype in _OUT_KINDS:
            y = _fused_extension().requant_rows(acc, zs, r.multiplier, r.offset, r.shift,
                                                r.window, r.zero_point, r.qmin, r.qmax,
                                                _OUT_KINDS[r.dtype])
        else:  # float32 accumulators hold integers below 2^24: int32 exactly
            y = r(acc.to(torch.int32), dim=-1, backend="torch", acc_offset=zs)
        return y.view(n, oh, ow, -1).permute(0, 3, 1, 2)  # NCHW view of NHWC memory


@dataclass
class _ResidualGroup:
    """``final(add(conv(x) [exact gain G], shortcut(s)))`` as one kernel; same integers.

    The shortcut's requantization runs as a table over its 256 byte values (the same integer
    rule, evaluated once); ``final`` writes int8/uint8 (the next layer's grid) or int32 (the
    fine grid before pooling).
    """

    conv: _FastConv
    shortcut: Node
    add: Node
    final: Node
    gain: Tensor
    lut: Tensor
    clamp: tuple[Tensor, Tensor]

    @property
    def inputs(self) -> list[str]:
        return [self.conv.node.inputs[0], self.shortcut.inputs[0]]

    vnni: Conv2dKernel | None = None
    amx: Conv2dKernel | None = None
    chosen: dict[tuple, str] = field(default_factory=dict)
    last_path: str | None = None

    def __post_init__(self) -> None:
        c = self.conv
        self.onednn = c.onednn
        res = ResidualEpilogue(self.gain, self.lut, *self._reachable_clamp(),
                               shortcut=self.shortcut.requant.requantizer)
        self.vnni = _vnni_kernel(c.node, c.vnni_dtype, self.final.requant.requantizer, res)
        self.amx = _vnni_kernel(c.node, c.vnni_dtype, self.final.requant.requantizer, res,
                                amx=True)

    def _reachable_clamp(self) -> tuple[Tensor, Tensor]:
        """The residual clamp tightened to the values ``gain·acc + lut[s]`` can take (the
        accumulator bounded over the input's proven code range): the same function on every
        reachable input, and bounds that fit in int32 let the kernels take their 32-bit
        epilogue. Channels whose upper clamp lies below that range keep theirs."""
        c = self.conv
        lo, hi = c.code_range
        z = c.node.attrs["input_zero_point"]
        w = c.node.weight.reshape(c.node.weight.shape[0], -1).to(torch.int64)
        acc_min = torch.minimum(w * (lo - z), w * (hi - z)).sum(1)
        acc_max = torch.maximum(w * (lo - z), w * (hi - z)).sum(1)
        g = self.gain
        reach_lo = torch.minimum(g * acc_min, g * acc_max) + self.lut.min(1).values
        reach_hi = torch.maximum(g * acc_min, g * acc_max) + self.lut.max(1).values
        clo, chi = self.clamp
        keep = chi < reach_lo  # a constant output: leave such a channel's clamp alone
        return (torch.where(keep, clo, torch.maximum(clo, reach_lo)),
                torch.where(keep, chi, torch.minimum(chi, reach_hi)))

    def run(self, env: dict[str, Tensor], backend: str) -> Tensor:
        x, s = env[self.conv.node.inputs[0]], env[self.shortcut.inputs[0]]
        path = _choose_path(self, (x, s), backend)
        self.last_path = self.conv.last_path = path
        if path in ("vnni", "amx"):
            return getattr(self, path)(x, s)
        return self._run_accumulated(x, s, "onednn" if path == "onednn" else "compiled")

    def _run_accumulated(self, x: Tensor, s: Tensor, backend: str) -> Tensor:
        acc, zs, (n, oh, ow) = self.conv.accumulate(x, backend)
        sc = s.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        r = self.final.requant.requantizer
        y = _fused_extension().residual_requant(
            acc, zs, self.gain, sc.reshape(acc.shape), self.lut, self.clamp[0],
            self.clamp[1], r.multiplier, r.offset, r.shift, r.window, r.zero_point, r.qmin,
            r.qmax, _OUT_KINDS[r.dtype])
        return y.view(n, oh, ow, -1).permute(0, 3, 1, 2)


_OUT_KINDS = {torch.int8: 0, torch.uint8: 1, torch.int32: 2}


def _ext_vnni() -> Any:
    from lowbit.integer import _ext

    return _ext.vnni()


def _vnni_kernel(n: Node, in_dtype: torch.dtype, requantizer: Requantizer,
                 residual: ResidualEpilogue | None = None, amx: bool = False
                 ) -> Conv2dKernel | None:
    """The layer in lowbit's VNNI kernel (requantization in its epilogue; with ``amx`` its
    AMX-INT8 variant), or None where that kernel is unavailable or the layer is outside its
    limits."""
    if _ext_vnni() is None:
        return None
    a = n.attrs
    k = Conv2dKernel(n.weight, requantizer, input_zero_point=a["input_zero_point"],
                     input_dtype=in_dtype, stride=tuple(a["stride"]),
                     padding=tuple(a["padding"]), dilation=tuple(a["dilation"]),
                     residual=residual, amx=amx)
    return k if k.compiled and (k.amx or not amx) else None


def _paths(layer: Any) -> list[str]:
    """The paths a fused layer can take here, preferred first."""
    return [p for p, ok in (("amx", layer.amx is not None), ("vnni", layer.vnni is not None),
                            ("onednn", layer.onednn is not None), ("int_mm", True)) if ok]


_TUNE_RUNS = 5


def _choose_path(layer: Any, args: tuple[Tensor, ...], backend: str) -> str:
    """The path of ``layer`` (a :class:`_FastConv` or :class:`_ResidualGroup`) for ``backend``:
    forced by ``"amx"``/``"vnni"``/``"onednn"`` where the layer has it (``"amx"`` falls back to
    ``"vnni"``, the others to ``_int_mm``), ``_int_mm`` for ``"compiled"``; for ``"auto"`` the
    fastest, timed once per input shape and thread count (the best of a few runs each), every
    path's output checked equal on the way."""
    avail = _paths(layer)
    if backend == "amx" and "amx" not in avail:
        backend = "vnni"
    if backend in ("amx", "vnni", "onednn"):
        return backend if backend in avail else "int_mm"
    if backend != "auto" or len(avail) == 1:
        return "int_mm" if backend != "auto" else avail[0]
    key = (*(tuple(a.shape) for a in args), *(a.dtype for a in args), torch.get_num_threads())
    path = layer.chosen.get(key)
    if path is None:
        import time

        runs = {p: ((lambda p=p: getattr(layer, p)(*args)) if p in ("vnni", "amx") else
                    (lambda p=p: layer._run_accumulated(
                        *args, "onednn" if p == "onednn" else "compiled")))
                for p in avail}
        name = layer.node.name if hasattr(layer, "node") else layer.final.name
        first = None
        for p, run in runs.items():  # warm-up (oneDNN packs its weights for this shape)
            y = run()
            if first is None:
                first = y
            elif not torch.equal(y, first):
                raise RuntimeError(f"lowbit.integer: paths {avail[0]!r} and {p!r} disagree on "
                                   f"layer {name}; please report this")
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(_TUNE_RUNS):  # rounds over the paths: a burst of load hits them alike
            for p, run in runs.items():
                t0 = time.perf_counter()
                run()
                best[p] = min(best[p], time.perf_counter() - t0)
        path = layer.chosen[key] = min(best, key=best.get)
    return path


def _fast_conv(n: Node, dtypes: dict[str, torch.dtype],
               ranges: dict[str, tuple[int, int]] | None = None) -> _FastConv | None:
    if n.op != "conv2d" or n.attrs["groups"] != 1 or dtypes[n.inputs[0]] not in (
            torch.int8, torch.uint8):
        return None
    return _FastConv(n, dtypes[n.inputs[0]], (ranges or {}).get(n.inputs[0]))


def _find_residual_groups(nodes: list[Node], dtypes: dict[str, torch.dtype],
                          ranges: dict[str, tuple[int, int]] | None = None
                          ) -> list[_ResidualGroup]:
    uses: dict[str, int] = {}
    for n in nodes:
        for v in n.inputs:
            uses[v] = uses.get(v, 0) + 1
    producer = {n.output: n for n in nodes}
    eight = (torch.int8, torch.uint8)
    groups = []
    for fin in nodes:
        rq = fin.requant
        if fin.op != "requant" or rq.requantizer.dtype not in _OUT_KINDS:
            continue
        add = producer.get(fin.inputs[0])
        if add is None or add.op != "add" or uses[add.output] != 1:
            continue
        pair = [producer.get(v) for v in add.inputs]
        if any(p is None or uses[p.output] != 1 for p in pair):
            continue
        convs = [p for p in pair if p.op == "conv2d"]
        shorts = [p for p in pair if p.op == "requant"]
        if len(convs) != 1 or len(shorts) != 1:
            continue
        conv, short = convs[0], shorts[0]
        crq, srq = conv.requant, short.requant
        arr = crq.integer_arrays()
        fast = _fast_conv(conv, dtypes, ranges)
        if (fast is None or crq.fixed_point is not None or crq.input_clamp is not None
                or arr["k"].any() or arr["C"].any() or arr["w"].any()
                or srq.input_clamp is not None or dtypes[short.inputs[0]] not in eight):
            continue
        # the shortcut's requantization for every byte value: a table (same integer rule)
        if dtypes[short.inputs[0]] == torch.uint8:
            byte = torch.arange(256, dtype=torch.int64)
        else:
            byte = torch.arange(-128, 128, dtype=torch.int64)
        C = srq.channels
        lut = srq(byte.view(256, 1).expand(256, C).contiguous(), backend="torch")
        lut = lut.to(torch.int64).t().contiguous()
        lo64, hi64 = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
        clamp = (torch.full((C,), lo64, dtype=torch.int64),
                 torch.full((C,), hi64, dtype=torch.int64))
        if rq.input_clamp is not None:
            clamp = (torch.from_numpy(rq.input_clamp[:, 0].astype(np.int64)),
                     torch.from_numpy(rq.input_clamp[:, 1].astype(np.int64)))
        groups.append(_ResidualGroup(fast, short, add, fin, crq.requantizer.multiplier, lut,
                                     clamp))
    return groups


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and
    ``os.replace``: the file appears complete or not at all."""
    path = Path(path)
    with atomic_write(path) as f:
        f.write(data)
    return path
