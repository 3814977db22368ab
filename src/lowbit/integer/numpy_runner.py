"""A NumPy-only runner for integer models saved with ``IntegerModel.save`` (no torch needed).

The ``.npz`` file holds a JSON graph (``graph``) and, per node ``i``, ``n{i}.weight`` (int8),
and for requantizations ``n{i}.M``, ``n{i}.C``, ``n{i}.k``, ``n{i}.w`` (int64 per channel) and
optionally ``n{i}.clamp`` (``[C, 2]`` input clamp). Every operation is integer arithmetic in
int64 (convolutions by im2col and an integer matrix product); the input is quantized as
``clamp(rint(x·inv_scale) + z)`` in float32 and the output dequantized in float64, exactly as the
torch executor does, so the outputs agree bit for bit.

Usage::

    from lowbit.integer.numpy_runner import load
    model = load("model.npz")
    logits = model(images)                # float32 NCHW images -> float32 logits
    ints = model.integer_outputs(images)  # the integer outputs
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

__all__ = ["NumpyIntegerModel", "load", "FORMAT"]

FORMAT = "lowbit-integer-model-v1"


def _requant(x: np.ndarray, p: dict[str, Any], offset: np.ndarray | None = None) -> np.ndarray:
    """``clamp(((x - offset)·M + C) >> k) - tie + z)`` per channel along axis 1 (int64)."""
    shape = [1] * x.ndim
    shape[1] = -1
    v = x.astype(np.int64)
    if p["clamp"] is not None:
        v = np.clip(v, p["clamp"][:, 0].reshape(shape), p["clamp"][:, 1].reshape(shape))
    if offset is not None:
        v = v - offset.reshape(shape)
    v = v * p["M"].reshape(shape) + p["C"].reshape(shape)
    k = p["k"].reshape(shape)
    q = v >> k
    r = v & ((np.int64(1) << k) - 1)
    m = q - ((r < p["w"].reshape(shape)) & ((q & 1) == 1)).astype(np.int64)
    return np.clip(m + p["zero_point"], p["lo"], p["hi"]).astype(p["dtype"])


def _conv2d(x: np.ndarray, w: np.ndarray, a: dict[str, Any]) -> np.ndarray:
    """``sum w·(x - z)`` over each window (int64), padding with ``z``; NCHW."""
    (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
    groups = a["groups"]
    z = a["input_zero_point"]
    xz = x.astype(np.int64) - z
    if ph or pw:
        xz = np.pad(xz, ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # real zeros
    n, c, H, W = xz.shape
    o, cg, kh, kw = w.shape
    oh = (H - dh * (kh - 1) - 1) // sh + 1
    ow = (W - dw * (kw - 1) - 1) // sw + 1
    win = np.lib.stride_tricks.sliding_window_view(xz, ((kh - 1) * dh + 1, (kw - 1) * dw + 1),
                                                   axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :oh, :ow]  # [n, c, oh, ow, kh, kw]
    og = o // groups
    outs = []
    for g in range(groups):
        cols = win[:, g * cg:(g + 1) * cg].transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, -1)
        wg = w[g * og:(g + 1) * og].reshape(og, -1).astype(np.int64)
        outs.append(cols @ wg.T)
    acc = outs[0] if groups == 1 else np.concatenate(outs, axis=1)
    return acc.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)


def _pool_windows(x: np.ndarray, kernel, stride, dilation=(1, 1)) -> np.ndarray:
    kh, kw = kernel
    dh, dw = dilation
    win = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1),
                                                   axis=(2, 3))
    return win[:, :, ::stride[0], ::stride[1], ::dh, ::dw]


def _max_pool2d(x: np.ndarray, a: dict[str, Any]) -> np.ndarray:
    (ph, pw) = a["padding"]
    if a["ceil_mode"]:
        raise ValueError("max pooling with ceil_mode is not supported by the NumPy runner")
    low = np.iinfo(x.dtype).min
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=low) if (ph or pw) else x
    return _pool_windows(xp, a["kernel"], a["stride"], a["dilation"]).max(axis=(-1, -2))


def _sum_pool2d(x: np.ndarray, a: dict[str, Any]) -> np.ndarray:
    return _pool_windows(x.astype(np.int64), a["kernel"], a["stride"]).sum(axis=(-1, -2))


class NumpyIntegerModel:
    """An integer model loaded from ``.npz``; see the module docstring."""

    def __init__(self, graph: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if graph.get("format") != FORMAT:
            raise ValueError(f"not a lowbit integer model (format {graph.get('format')!r}, "
                             f"expected {FORMAT!r})")
        self.graph = graph
        self.input_shape = tuple(graph["input_shape"])
        self.nodes = []
        for i, n in enumerate(graph["nodes"]):
            node = dict(n)
            node["weight"] = arrays.get(f"n{i}.weight")
            if "requant" in n:
                p = dict(n["requant"])
                for key in ("M", "C", "k", "w"):
                    p[key] = arrays[f"n{i}.{key}"].astype(np.int64)
                p["clamp"] = arrays.get(f"n{i}.clamp")
                p["dtype"] = np.dtype(p["dtype"])
                node["requant"] = p
            self.nodes.append(node)
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for v in n["inputs"]:
                last[v] = i
        self._free = {i: [v for v, j in last.items() if j == i] for i in range(len(self.nodes))}

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """``clamp(rint(x·inv_scale) + z)`` in float32 (round half to even)."""
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"x must be a floating-point array, got {x.dtype}")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape [N, {', '.join(map(str, self.input_shape))}], "
                             f"got {x.shape}")
        a = self.nodes[0]["attrs"]
        v = np.rint(x.astype(np.float32) * np.float32(a["inv_scale"])) + np.float32(
            a["zero_point"])
        return np.clip(v, a["qmin"], a["qmax"]).astype(np.dtype(a["dtype"]))

    def run_integer(self, q: np.ndarray) -> np.ndarray:
        """The integer program on quantized inputs; returns the integer outputs."""
        env = {self.nodes[0]["output"]: np.asarray(q)}
        for i in range(1, len(self.nodes) - 1):
            n = self.nodes[i]
            env[n["output"]] = self._run(n, [env[v] for v in n["inputs"]])
            for v in self._free[i]:
                env.pop(v, None)
        return env[self.nodes[-1]["inputs"][0]]

    def _run(self, n: dict[str, Any], x: list[np.ndarray]) -> np.ndarray:
        op, a = n["op"], n["attrs"]
        if op == "conv2d":
            return _requant(_conv2d(x[0], n["weight"], a), n["requant"])
        if op == "linear":
            acc = (x[0].astype(np.int64) - a["input_zero_point"]) @ n["weight"].astype(np.int64).T
            return _requant(acc, n["requant"])
        if op == "requant":
            return _requant(x[0], n["requant"])
        if op == "add":
            return x[0].astype(a["dtype"]) + x[1].astype(a["dtype"])
        if op == "max_pool2d":
            return _max_pool2d(x[0], a)
        if op == "sum_pool2d":
            return _sum_pool2d(x[0], a)
        if op == "flatten":
            s = x[0].shape
            end = a["end_dim"] % len(s)
            return x[0].reshape(*s[:a["start_dim"]], -1, *s[end + 1:])
        if op == "slice":
            return x[0][tuple(slice(*t) for t in a["slices"])]
        if op == "pad":
            p = a["pad"]
            width = [(0, 0)] * x[0].ndim
            for d in range(len(p) // 2):
                width[x[0].ndim - 1 - d] = (p[2 * d], p[2 * d + 1])
            return np.pad(x[0], width, constant_values=a["value"])
        if op == "clamp":
            return np.clip(x[0], a["lo"], a["hi"])
        raise ValueError(f"unknown op {op!r} in node {n.get('name')!r}")

    def dequantize_output(self, y: np.ndarray) -> np.ndarray:
        """Float32 logits: ``scale·(q - z)`` or ``unit·v + offset`` per channel (float64)."""
        a = self.nodes[-1]["attrs"]
        y = np.asarray(y).astype(np.float64)
        if a["kind"] == "grid":
            return ((y - a["zero_point"]) * a["scale"]).astype(np.float32)
        shape = [1] * y.ndim
        shape[1] = -1
        unit = np.asarray(a["unit"], dtype=np.float64).reshape(shape)
        offset = np.asarray(a["offset"], dtype=np.float64).reshape(shape)
        return (y * unit + offset).astype(np.float32)

    def integer_outputs(self, x: np.ndarray) -> np.ndarray:
        """Quantize float images and run the integer program."""
        return self.run_integer(self.quantize_input(x))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Float32 logits of float32 images."""
        return self.dequantize_output(self.integer_outputs(x))


def load(path: str | os.PathLike) -> NumpyIntegerModel:
    """Read an integer model written by ``IntegerModel.save``."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if "graph" not in arrays:
        raise ValueError(f"{os.fspath(path)!r} is not a lowbit integer model (no graph)")
    graph = json.loads(arrays.pop("graph").tobytes().decode())
    return NumpyIntegerModel(graph, arrays)
