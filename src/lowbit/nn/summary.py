"""summary(): a per-layer table of formats, parameter counts and memory, for papers and logs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lowbit.nn.modules import _QuantizedOp
from lowbit.nn.qlstm import QLSTM

__all__ = ["summary"]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def summary(model: nn.Module, print_fn: Callable[[str], Any] | None = print) -> list[dict]:
    """Print and return, per module that owns parameters, its formats and memory.

    Each row is a dict with ``name``, ``type``, ``weight_format``, ``act_format``,
    ``params`` (count of the module's own parameters), ``weight_bits`` (storage bits per
    weight value), ``memory_bytes`` (weights at their format's bits, every other parameter
    at its dtype's width) and ``fp32_bytes`` (all parameters at 32 bits). For
    :class:`~lowbit.nn.qlstm.QLSTM` the weights are all ``weight_ih``/``weight_hh`` matrices
    and ``act_format`` is the format of its inputs, gates and hidden state. Quantization
    scales, buffers (e.g. BatchNorm running statistics) and activations are not counted.
    The printed table ends with totals and the compression ratio against FP32.
    ``print_fn=None`` prints nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rows: list[dict] = []
    for name, mod in model.named_modules():
        params = list(mod.named_parameters(recurse=False))
        if not params:
            continue
        quantized = isinstance(mod, (_QuantizedOp, QLSTM))
        weight_bits = None
        mem_bits = 0
        count = 0
        for pname, p in params:
            n = p.numel()
            count += n
            bits = _quantized_bits(mod, pname)
            if bits is not None:
                weight_bits = bits
                mem_bits += n * bits
            else:
                mem_bits += n * p.element_size() * 8
        if weight_bits is None:
            weights = [p for pname, p in params if pname.startswith("weight")]
            if weights:
                weight_bits = weights[0].element_size() * 8
        rows.append({
            "name": name or "(model)",
            "type": type(mod).__name__,
            "weight_format": mod.weight_format if quantized else "fp32",
            "act_format": mod.act_format if quantized else "fp32",
            "params": count,
            "weight_bits": weight_bits,
            "memory_bytes": mem_bits / 8,
            "fp32_bytes": count * 4,
        })
    if print_fn is not None:
        print_fn(_format_table(rows))
    return rows


def _quantized_bits(mod: nn.Module, pname: str) -> int | None:
    """Storage bits per value of ``mod``'s parameter ``pname`` if a quantizer stores it."""
    if isinstance(mod, _QuantizedOp):
        wq = mod.weight_quant
        return int(wq.fmt.bits) if pname == "weight" and wq is not None else None
    if isinstance(mod, QLSTM):
        return mod.quantized_weight_bits(pname)
    return None


def _format_table(rows: list[dict]) -> str:
    header = ("Layer", "Type", "Weights", "Acts", "Params", "Memory", "FP32", "Ratio")
    lines = []
    for r in rows:
        ratio = r["fp32_bytes"] / r["memory_bytes"] if r["memory_bytes"] else float("nan")
        lines.append((r["name"], r["type"], r["weight_format"], r["act_format"],
                      f"{r['params']:,}", _human_bytes(r["memory_bytes"]),
                      _human_bytes(r["fp32_bytes"]), f"{ratio:.2f}x"))
    total_params = sum(r["params"] for r in rows)
    total_mem = sum(r["memory_bytes"] for r in rows)
    total_fp32 = sum(r["fp32_bytes"] for r in rows)
    total_ratio = total_fp32 / total_mem if total_mem else float("nan")
    total = ("Total", "", "", "", f"{total_params:,}", _human_bytes(total_mem),
             _human_bytes(total_fp32), f"{total_ratio:.2f}x")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, total)]
    right = {4, 5, 6, 7}

    def fmt(cells: tuple) -> str:
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    out = [fmt(header), sep, *(fmt(line) for line in lines), sep, fmt(total)]
    out.append(f"Compression vs FP32: {total_ratio:.2f}x "
               f"({_human_bytes(total_fp32)} -> {_human_bytes(total_mem)})")
    return "\n".join(out)
