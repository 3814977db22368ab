"""ONNX export of integer models, checked in ONNX Runtime (optional extra ``export``).

:func:`export_onnx` translates an :class:`~lowbit.integer.executor.IntegerModel` node by node
into an ONNX graph (opset 19) with one float input ``input`` (NCHW images) and one float output
``logits``. Two styles:

``"integer"``
    integer operators only between the input quantization and the output dequantization:
    ``ConvInteger``/``MatMulInteger`` for the accumulators and the certified fixed-point rule
    in int64 (``Mul``, ``Add``, ``BitwiseAnd``, exact ``Div`` by ``2^k``, the tie correction,
    ``Clip``). ONNX Runtime reproduces lowbit's integer outputs bit for bit.
``"qoperator"``
    what runtimes do today: a convolution requantized onto an 8-bit grid is one
    ``QLinearConv`` (BatchNorm folded into per-channel weight scales, the bias an int32 in
    accumulator units, requantization by a float32 scale); other requantizations multiply by a
    float32 scale and round. Within one quantization step of lowbit's outputs at each layer.

Integer maps that are exact by construction (residual branches in accumulator units, the
power-of-two rounding before pooling) are integer operators in both styles. The input is
quantized as ``clamp(round(x·inv_scale) + z)`` in float32 (``Mul``, ``Round``), identical to
lowbit's, and logits are ``unit·v + offset`` in float64 as in lowbit.

The file is written atomically: it appears complete or not at all.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.integer.executor import IntegerModel, Node, RequantSpec, atomic_write_bytes

__all__ = ["export_onnx", "onnx_bytes", "onnx_session", "MissingExtraError", "STYLES", "OPSET"]

STYLES = ("integer", "qoperator")
OPSET = 19
_INT64_MAX = 2**63 - 1


class MissingExtraError(ImportError, ValueError):
    """An optional dependency (the ``export`` extra: onnx, onnxruntime) is not installed."""


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"ONNX export needs the optional extra 'export' ({module} is not installed): "
            "pip install 'lowbit[export]'  (installs onnx and onnxruntime)", name=module) from exc


_ONNX_TYPES = {"int8": "INT8", "uint8": "UINT8", "int32": "INT32", "int64": "INT64"}


class _Builder:
    def __init__(self, onnx: Any) -> None:
        self.onnx = onnx
        self.helper = onnx.helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0
        self.dtypes: dict[str, str] = {}

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint.replace('.', '_')}_{self.count}"

    def const(self, value: Any, dtype: Any, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, n_out: int = 1, **attrs: Any
           ) -> Any:
        outs = [self.name(hint) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def cast(self, x: str, to: str, hint: str = "cast") -> str:
        return self.op("Cast", [x], hint, to=getattr(self.onnx.TensorProto, to.upper()))


def _channel_shape(rank: int, c: int) -> list[int]:
    shape = [1] * rank
    shape[1] = c
    return shape


def _exact_requant(b: _Builder, x: str, spec: RequantSpec, rank: int, hint: str) -> str:
    """The integer rule of ``spec`` in int64 operators (bit-exact)."""
    arr = spec.integer_arrays()
    C = spec.channels
    shp = _channel_shape(rank, C)
    v = b.cast(x, "int64", hint + "_i64")
    if spec.input_clamp is not None:
        lo = b.const(spec.input_clamp[:, 0].reshape(shp), np.int64, hint + "_L")
        hi = b.const(spec.input_clamp[:, 1].reshape(shp), np.int64, hint + "_U")
        v = b.op("Min", [b.op("Max", [v, lo], hint + "_max"), hi], hint + "_min")
    v = b.op("Mul", [v, b.const(arr["M"].reshape(shp), np.int64, hint + "_M")], hint + "_mul")
    v = b.op("Add", [v, b.const(arr["C"].reshape(shp), np.int64, hint + "_C")], hint + "_add")
    if arr["k"].any():
        mask = b.const(((np.int64(1) << arr["k"]) - 1).reshape(shp), np.int64, hint + "_mask")
        r = b.op("BitwiseAnd", [v, mask], hint + "_low")
        pow2 = b.const((np.int64(1) << arr["k"]).reshape(shp), np.int64, hint + "_pow2")
        q = b.op("Div", [b.op("Sub", [v, r], hint + "_sub"), pow2], hint + "_shift")
        if arr["w"].any():
            w = b.const(arr["w"].reshape(shp), np.int64, hint + "_w")
            odd = b.op("Equal", [b.op("BitwiseAnd", [q, b.const(1, np.int64)], hint + "_par"),
                                 b.const(1, np.int64)], hint + "_odd")
            tie = b.op("And", [b.op("Less", [r, w], hint + "_lt"), odd], hint + "_tie")
            q = b.op("Sub", [q, b.cast(tie, "int64", hint + "_tie64")], hint + "_even")
        v = q
    v = b.op("Add", [v, b.const(spec.zero_point, np.int64)], hint + "_zp")
    v = b.op("Clip", [v, b.const(spec.lo, np.int64), b.const(spec.hi, np.int64)],
             hint + "_clip")
    return b.cast(v, _ONNX_TYPES[_dtype(spec)], hint + "_out")


def _dtype(spec: RequantSpec) -> str:
    from lowbit.integer.executor import dtype_name

    return dtype_name(spec.requantizer.dtype)


def _float_requant(b: _Builder, x: str, spec: RequantSpec, rank: int, hint: str) -> str:
    """``clamp(round(float32(a)·(x - z_in) + float32(b)) + z)``: a runtime's float requant."""
    C = spec.channels
    shp = _channel_shape(rank, C)
    v = b.cast(x, "float", hint + "_f32")
    if spec.input_clamp is not None:
        lo = b.const(spec.input_clamp[:, 0].reshape(shp), np.float32, hint + "_L")
        hi = b.const(spec.input_clamp[:, 1].reshape(shp), np.float32, hint + "_U")
        v = b.op("Min", [b.op("Max", [v, lo], hint + "_max"), hi], hint + "_min")
    if spec.input_zero_point:
        v = b.op("Sub", [v, b.const(float(spec.input_zero_point), np.float32)], hint + "_zin")
    a = np.array([float(f) for f in spec.a], dtype=np.float32).reshape(shp)
    bb = np.array([float(f) for f in spec.b], dtype=np.float32).reshape(shp)
    v = b.op("Mul", [v, b.const(a, np.float32, hint + "_a")], hint + "_mul")
    v = b.op("Add", [v, b.const(bb, np.float32, hint + "_b")], hint + "_add")
    v = b.op("Round", [v], hint + "_round")
    v = b.op("Add", [v, b.const(float(spec.zero_point), np.float32)], hint + "_zp")
    v = b.op("Clip", [v, b.const(float(spec.lo), np.float32), b.const(float(spec.hi),
                                                                           np.float32)],
             hint + "_clip")
    return b.cast(v, _ONNX_TYPES[_dtype(spec)], hint + "_out")


def _requant(b: _Builder, x: str, spec: RequantSpec, rank: int, hint: str, style: str) -> str:
    if style == "qoperator" and spec.fixed_point is not None:
        return _float_requant(b, x, spec, rank, hint)
    return _exact_requant(b, x, spec, rank, hint)


def _qlinear_conv(b: _Builder, n: Node, x: str, hint: str) -> str | None:
    """One QLinearConv for a convolution requantized onto an 8-bit grid, or None.

    lowbit's requantization is ``y = a_c·acc + b_c`` in output steps. QLinearConv computes
    ``round((acc' + bias_c)·x_scale·w_scale_c / y_scale) + y_zero_point``; with the weights of
    channels with ``a_c < 0`` negated (``acc' = sign·acc``), ``w_scale_c = |a_c|·y_scale/x_scale``
    (BatchNorm folded in) and ``bias_c = round(b_c/|a_c|)`` in accumulator units.
    """
    spec = n.requant
    at = n.attrs
    if (spec.fixed_point is None or "output_scale" not in at
            or spec.requantizer.dtype not in (torch.int8, torch.uint8)):
        return None
    w = n.weight.numpy().astype(np.int16)
    if int(w.min()) <= -128:
        return None
    x_scale, y_scale = np.float32(at["input_scale"]), np.float32(at["output_scale"])
    mag = [abs(f) for f in spec.a]
    signs = np.array([-1 if f < 0 else 1 for f in spec.a], dtype=np.int16)
    wq = (w * signs.reshape(-1, 1, 1, 1)).astype(np.int8)
    dead = np.array([m == 0 for m in mag])
    wq[dead] = 0
    ratio = Fraction(float(y_scale)) / Fraction(float(x_scale))
    w_scale = np.array([float(m * ratio) if m else 1.0 for m in mag], dtype=np.float32)
    if not np.all(np.isfinite(w_scale)) or not np.all(w_scale > 0):
        return None
    unit = [Fraction(float(x_scale)) * Fraction(float(s)) / Fraction(float(y_scale))
            for s in w_scale]  # output steps per accumulator unit, as the runtime holds it
    bias = np.array([round(float(bb / u)) if not d else 0
                     for bb, u, d in zip(spec.b, unit, dead)], dtype=np.int64)
    if np.abs(bias).max(initial=0) >= 2**31:
        return None
    if dead.any() and any(bb != 0 for bb, d in zip(spec.b, dead) if d):
        return None  # a constant non-zero channel: leave it to the integer path
    dt = np.uint8 if spec.requantizer.dtype == torch.uint8 else np.int8
    x_dt = np.uint8 if b.dtypes[x] == "uint8" else np.int8
    y = b.op("QLinearConv", [
        x, b.const(x_scale, np.float32), b.const(at["input_zero_point"], x_dt),
        b.const(wq, np.int8, hint + "_w"), b.const(w_scale, np.float32, hint + "_ws"),
        b.const(np.zeros(len(mag), np.int8), np.int8),
        b.const(y_scale, np.float32), b.const(spec.zero_point, dt),
        b.const(bias.astype(np.int32), np.int32, hint + "_bias")], hint,
        strides=list(at["stride"]), pads=[*at["padding"], *at["padding"]],
        dilations=list(at["dilation"]), group=int(at["groups"]),
        kernel_shape=list(n.weight.shape[2:]))
    info = np.iinfo(dt)
    if (spec.lo, spec.hi) != (int(info.min), int(info.max)):
        y = b.op("Clip", [y, b.const(spec.lo, dt), b.const(spec.hi, dt)], hint + "_clip")
    return y


def _build(model: IntegerModel, style: str, onnx: Any, intermediates: bool = False) -> Any:
    b = _Builder(onnx)
    TP = onnx.TensorProto
    names: dict[str, str] = {}
    ranks: dict[str, int] = {}
    q = model.nodes[0]
    a = q.attrs
    rank = 1 + len(model.input_shape)
    v = b.op("Mul", ["input", b.const(np.float32(a["inv_scale"]), np.float32)], "q_mul")
    v = b.op("Round", [v], "q_round")
    v = b.op("Add", [v, b.const(np.float32(a["zero_point"]), np.float32)], "q_zp")
    v = b.op("Clip", [v, b.const(np.float32(a["qmin"]), np.float32),
                      b.const(np.float32(a["qmax"]), np.float32)], "q_clip")
    v = b.cast(v, _ONNX_TYPES[a["dtype"]], "q_in")
    names[q.output], ranks[q.output] = v, rank
    b.dtypes[v] = a["dtype"]
    for n in model.nodes[1:-1]:
        x = [names[i] for i in n.inputs]
        r = ranks[n.inputs[0]]
        hint = n.name or n.op
        out_rank = r
        if n.op == "conv2d":
            y = None
            if style == "qoperator":
                y = _qlinear_conv(b, n, x[0], hint)
            if y is None:
                at = n.attrs
                xz = b.const(at["input_zero_point"],
                             np.uint8 if b.dtypes[x[0]] == "uint8" else np.int8)
                acc = b.op("ConvInteger", [x[0], b.const(n.weight.numpy(), np.int8, hint + "_w"),
                                           xz], hint + "_acc",
                           strides=list(at["stride"]), pads=[*at["padding"], *at["padding"]],
                           dilations=list(at["dilation"]), group=int(at["groups"]),
                           kernel_shape=list(n.weight.shape[2:]))
                y = _requant(b, acc, n.requant, 4, hint, style)
        elif n.op == "linear":
            xz = b.const(n.attrs["input_zero_point"],
                         np.uint8 if b.dtypes[x[0]] == "uint8" else np.int8)
            acc = b.op("MatMulInteger", [x[0], b.const(n.weight.numpy().T.copy(), np.int8,
                                                       hint + "_w"), xz], hint + "_acc")
            y = _requant(b, acc, n.requant, 2, hint, style)
        elif n.op == "requant":
            y = _requant(b, x[0], n.requant, r, hint, style)
        elif n.op == "add":
            dt = n.attrs["dtype"]
            y = b.op("Add", [b.cast(x[0], dt), b.cast(x[1], dt)], hint)
        elif n.op == "max_pool2d":
            at = n.attrs
            if at["ceil_mode"]:
                raise ValueError(f"node {n.name!r}: max pooling with ceil_mode is not exported")
            src = x[0]
            small = b.dtypes[src] in ("int8", "uint8")
            if not small:  # ONNX MaxPool takes 8-bit integers or floats: exact in double
                src = b.cast(src, "double", hint + "_f64")
            y = b.op("MaxPool", [src], hint, kernel_shape=list(at["kernel"]),
                     strides=list(at["stride"]), pads=[*at["padding"], *at["padding"]],
                     dilations=list(at["dilation"]))
            if not small:
                y = b.cast(y, b.dtypes[x[0]], hint + "_int")
        elif n.op == "sum_pool2d":
            y = _sum_pool(b, n, x[0], hint)
        elif n.op == "flatten":
            if n.attrs["end_dim"] not in (-1, r - 1):
                raise ValueError(f"node {n.name!r}: flatten up to dim {n.attrs['end_dim']} is "
                                 "not exported")
            y = b.op("Flatten", [x[0]], hint, axis=int(n.attrs["start_dim"]))
            out_rank = n.attrs["start_dim"] + 1
        elif n.op == "slice":
            starts, ends, axes, steps = [], [], [], []
            for d, (s0, s1, st) in enumerate(n.attrs["slices"]):
                if (s0, s1, st) == (None, None, None):
                    continue
                st = 1 if st is None else st
                if st <= 0:
                    raise ValueError(f"node {n.name!r}: slices need positive steps")
                starts.append(0 if s0 is None else s0)
                ends.append(_INT64_MAX if s1 is None else s1)
                axes.append(d)
                steps.append(st)
            y = b.op("Slice", [x[0], b.const(starts, np.int64), b.const(ends, np.int64),
                               b.const(axes, np.int64), b.const(steps, np.int64)], hint)
        elif n.op == "pad":
            p = n.attrs["pad"]
            begins, endings = [0] * r, [0] * r
            for d in range(len(p) // 2):
                begins[r - 1 - d], endings[r - 1 - d] = p[2 * d], p[2 * d + 1]
            dt = b.dtypes[x[0]]
            y = b.op("Pad", [x[0], b.const(begins + endings, np.int64),
                             b.const(n.attrs["value"], np.dtype(dt))], hint, mode="constant")
        elif n.op == "clamp":
            dt = np.dtype(b.dtypes[x[0]])
            y = b.op("Clip", [x[0], b.const(n.attrs["lo"], dt), b.const(n.attrs["hi"], dt)],
                     hint)
        else:  # pragma: no cover - IntegerModel validates its ops
            raise ValueError(f"node {n.name!r}: op {n.op!r} has no ONNX form")
        names[n.output], ranks[n.output] = y, out_rank
        b.dtypes[y] = _out_dtype(n, b, x)
    last = model.nodes[-1]
    src = names[last.inputs[0]]
    at = last.attrs
    v = b.cast(src, "double", "dq_f64")
    if at["kind"] == "grid":
        v = b.op("Sub", [v, b.const(float(at["zero_point"]), np.float64)], "dq_zp")
        v = b.op("Mul", [v, b.const(float(at["scale"]), np.float64)], "dq_scale")
    else:
        shp = _channel_shape(ranks[last.inputs[0]], len(at["unit"]))
        v = b.op("Mul", [v, b.const(np.array(at["unit"]).reshape(shp), np.float64, "unit")],
                 "dq_unit")
        v = b.op("Add", [v, b.const(np.array(at["offset"]).reshape(shp), np.float64,
                                    "offset")], "dq_offset")
    b.nodes.append(b.helper.make_node("Cast", [v], ["logits"], to=TP.FLOAT))
    inp = b.helper.make_tensor_value_info("input", TP.FLOAT, ["N", *model.input_shape])
    out_rank = ranks[last.inputs[0]]
    out = b.helper.make_tensor_value_info("logits", TP.FLOAT,
                                          ["N", *(f"d{i}" for i in range(1, out_rank))])
    outputs = [out]
    if intermediates:
        for n in model.nodes[1:-1]:
            name = names[n.output]
            elem = getattr(TP, _ONNX_TYPES[b.dtypes[name]])
            b.nodes.append(b.helper.make_node("Identity", [name], [n.output]))
            outputs.append(b.helper.make_tensor_value_info(
                n.output, elem, ["N", *(f"{n.output}_d{i}" for i in range(1, ranks[n.output]))]))
    graph = b.helper.make_graph(b.nodes, "lowbit_integer_model", [inp], outputs, b.inits)
    m = b.helper.make_model(graph, opset_imports=[b.helper.make_opsetid("", OPSET)],
                            producer_name="lowbit", doc_string=f"lowbit integer model, {style}")
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def _sum_pool(b: _Builder, n: Node, x: str, hint: str) -> str:
    kh, kw = n.attrs["kernel"]
    sh, sw = n.attrs["stride"]
    v = b.cast(x, "int64", hint + "_i64")
    if (kh, kw) != (sh, sw):
        raise ValueError(f"node {n.name!r}: overlapping average-pool windows are not exported")
    shape = b.op("Shape", [v], hint + "_shape")
    nc = b.op("Slice", [shape, b.const([0], np.int64), b.const([2], np.int64)], hint + "_nc")
    hw = b.op("Slice", [shape, b.const([2], np.int64), b.const([4], np.int64)], hint + "_hw")
    blocks = b.op("Div", [hw, b.const([kh, kw], np.int64)], hint + "_blocks")
    oh = b.op("Slice", [blocks, b.const([0], np.int64), b.const([1], np.int64)], hint + "_oh")
    ow = b.op("Slice", [blocks, b.const([1], np.int64), b.const([2], np.int64)], hint + "_ow")
    new = b.op("Concat", [nc, oh, b.const([kh], np.int64), ow, b.const([kw], np.int64)],
               hint + "_newshape", axis=0)
    v = b.op("Reshape", [v, new], hint + "_blocked")
    return b.op("ReduceSum", [v, b.const([3, 5], np.int64)], hint, keepdims=0)


def _out_dtype(n: Node, b: _Builder, x: list[str]) -> str:
    from lowbit.integer.executor import dtype_name

    if n.requant is not None:
        return dtype_name(n.requant.requantizer.dtype)
    if n.op == "add":
        return n.attrs["dtype"]
    if n.op == "sum_pool2d":
        return "int64"
    return b.dtypes[x[0]]


def export_onnx(model: IntegerModel, path: str | os.PathLike, *, style: str = "integer",
                intermediates: bool = False) -> Path:
    """Write ``model`` as an ONNX file (see the module docstring for the two styles).

    ``intermediates=True`` adds every integer tensor of the program as a graph output under
    its name in ``model.nodes`` (for checking layer by layer). Raises
    :class:`MissingExtraError` when onnx is not installed; the file is written atomically.
    Returns the path.
    """
    return atomic_write_bytes(path, onnx_bytes(model, style=style, intermediates=intermediates))


def onnx_bytes(model: IntegerModel, *, style: str = "integer",
               intermediates: bool = False) -> bytes:
    """The serialized ONNX model :func:`export_onnx` writes (nothing is written here)."""
    if not isinstance(model, IntegerModel):
        raise TypeError(f"model must be an IntegerModel (lowbit.integer.to_integer), got "
                        f"{type(model).__name__}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    onnx = _require("onnx")
    return _build(model, style, onnx, intermediates).SerializeToString()


def onnx_session(path: str | os.PathLike | bytes, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for an exported file (``MissingExtraError`` without it)."""
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    src = path if isinstance(path, bytes) else os.fspath(path)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
