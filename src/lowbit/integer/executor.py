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

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.integer.exact import ExactAffine, exact_outputs
from lowbit.integer.fixed_point import FixedPointAffine, signed_bits
from lowbit.integer.ops import Requantizer, int_conv2d, int_linear

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
        ``return_values`` also every intermediate tensor by name.
        """
        if q.is_floating_point():
            raise TypeError(f"q must be an integer tensor (see quantize_input), got {q.dtype}")
        env: dict[str, Tensor] = {self.nodes[0].output: q}
        keep: dict[str, Tensor] = {}
        for i in range(1, len(self.nodes) - 1):
            n = self.nodes[i]
            x = [env[v] for v in n.inputs]
            env[n.output] = self._run_node(n, x, backend)
            if return_values:
                keep[n.output] = env[n.output]
            for v in self._free_after[i]:
                env.pop(v, None)
        out = env[self.nodes[-1].inputs[0]]
        return (out, keep) if return_values else out

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
            return x[0][_slices(a)].contiguous()
        if op == "pad":
            return F.pad(x[0], tuple(a["pad"]), value=a["value"])
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and
    ``os.replace``: the file appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
