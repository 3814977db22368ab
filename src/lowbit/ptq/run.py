"""Checkpoint-level post-training quantization: what ``lowbit ptq CHECKPOINT`` runs.

This is the one place in :mod:`lowbit.ptq` that reaches up to :mod:`lowbit.train` (checkpoint
loading, data and model building, evaluation), and it does so lazily inside the functions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model import PTQReport, quantize_model, restore_quantized

#: The ablation of the paper's table: naive, each method alone, all methods.
VARIANTS = {
    "naive": dict(clip="minmax", bit_alloc=False, bias_correction=False),
    "aciq": dict(clip="aciq", bit_alloc=False, bias_correction=False),
    "bit_alloc": dict(clip="minmax", bit_alloc=True, bias_correction=False),
    "bias_correction": dict(clip="minmax", bit_alloc=False, bias_correction=True),
    "all": dict(clip="aciq", bit_alloc=True, bias_correction=True),
}


def _load_float_model(checkpoint: str | os.PathLike, overrides: Sequence[str] | Mapping):
    from lowbit import config as config_mod
    from lowbit.train import engine
    from lowbit.train.checkpoint import load_checkpoint, load_model_state

    ckpt = load_checkpoint(checkpoint)
    if "ptq" in ckpt:
        raise ValueError(f"{ckpt['path']!r} is already a post-training quantized checkpoint")
    cfg = config_mod.resolve(ckpt["config"], overrides)
    scheme = cfg["quant"]["scheme"]
    if scheme not in ("", "fp32"):
        raise ValueError(f"run_ptq needs a float checkpoint; {ckpt['path']!r} was trained with "
                         f"quant.scheme={scheme!r}")
    device = engine.resolve_device(cfg["device"])
    task = engine.build_task(cfg)
    if task.kind != "classify":
        raise ValueError("run_ptq supports image classification checkpoints")
    model = engine.build_model(cfg, task)
    load_model_state(model, ckpt, cfg["model"]["name"])
    return ckpt, cfg, task, model.to(device).eval(), device


def _calibration_batches(task, seed: int, batch_size: int = 128):
    """Un-augmented training images in a seeded random order (calibration reads the first)."""
    from lowbit.data import BatchLoader

    ds = task.train_loader.dataset
    return BatchLoader(ds, batch_size, shuffle=True, augment=None, seed=seed)


@torch.no_grad()
def _output_sqnr(ref: nn.Module, q: nn.Module, task, device, limit: int = 1024) -> float:
    signal = noise = 0.0
    seen = 0
    for x, _ in task.eval_loader:
        x = x.to(device)
        a, b = ref(x).double(), q(x).double()
        signal += float(a.pow(2).sum())
        noise += float((a - b).pow(2).sum())
        seen += x.shape[0]
        if seen >= limit:
            break
    return float("inf") if noise == 0 else 10.0 * float(torch.log10(torch.tensor(signal / noise)))


def run_ptq(
    checkpoint: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    w_bits: int = 4,
    a_bits: int = 4,
    clip: str = "aciq",
    w_clip: str = "minmax",
    bit_alloc: bool = True,
    bias_correction: bool | str = True,
    first_last_bits: int | None = 8,
    num_samples: int = 512,
    per_channel_acts: bool = True,
    variants: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Quantize a float lowbit checkpoint after training, evaluate it, write it and a report.

    Writes ``out_dir`` (default ``<checkpoint folder>/ptq-w{w}a{a}``) with ``model.pt`` (a
    lowbit checkpoint with a ``"ptq"`` structure record, see :func:`load_quantized`),
    ``report.md`` and ``report.json``. With ``variants`` the paper's ablation (naive,
    ACIQ, bit allocation, bias correction, all) is evaluated too. Returns a dict with the
    paths, ``fp32_top1``, ``top1``, ``output_sqnr_db``, the timings and the report.
    """
    ckpt, cfg, task, model, device = _load_float_model(checkpoint, overrides)
    from lowbit.train import engine
    from lowbit.train.checkpoint import FORMAT, atomic_save

    loss_fn = engine.build_loss(cfg["loss"]["name"], label_smoothing=0.0)
    fp32 = engine.evaluate_task(model, task, cfg, loss_fn, device)

    def one(**kw: Any) -> tuple[nn.Module, PTQReport, dict[str, float], float]:
        batches = _calibration_batches(task, seed)
        t0 = time.perf_counter()
        q, rep = quantize_model(model, batches, w_bits=w_bits, a_bits=a_bits,
                                first_last_bits=first_last_bits, num_samples=num_samples,
                                per_channel_acts=per_channel_acts, w_clip=w_clip, **kw)
        dt = time.perf_counter() - t0
        metrics = engine.evaluate_task(q, task, cfg, loss_fn, device)
        return q, rep, metrics, dt

    q, report, metrics, seconds = one(clip=clip, bit_alloc=bit_alloc,
                                      bias_correction=bias_correction)
    report.metrics = {
        "fp32_top1": fp32["val_top1"],
        "top1": metrics["val_top1"],
        "top1_drop": fp32["val_top1"] - metrics["val_top1"],
        "output_sqnr_db": _output_sqnr(model, q, task, device),
        "quantize_seconds": seconds,
    }
    if variants:
        table = {}
        for name, kw in VARIANTS.items():
            vq, _, vm, vdt = one(**kw)
            table[name] = {"top1": vm["val_top1"], "sqnr_db": _output_sqnr(model, vq, task, device),
                           "seconds": vdt}
        report.metrics["variants"] = table

    out = Path(out_dir) if out_dir is not None else (
        Path(ckpt["path"]).parent / f"ptq-w{w_bits}a{a_bits}")
    out.mkdir(parents=True, exist_ok=True)
    import lowbit

    state = {
        "format": FORMAT,
        "lowbit_version": lowbit.__version__,
        "model_name": ckpt["model_name"],
        "config": cfg,
        "epoch": ckpt.get("epoch"),
        "model": q.state_dict(),
        "ptq": report.meta,
        "ptq_report": report.to_dict(),
        "source_checkpoint": ckpt["path"],
    }
    model_path = atomic_save(state, out / "model.pt")
    (out / "report.md").write_text(report.to_markdown())
    (out / "report.json").write_text(report.to_json())
    return {
        "checkpoint": str(model_path),
        "report_md": str(out / "report.md"),
        "report_json": str(out / "report.json"),
        **{k: v for k, v in report.metrics.items()},
        "report": report,
    }


def load_quantized(checkpoint: str | os.PathLike,
                   overrides: Sequence[str] | Mapping[str, Any] = ()):
    """(model, cfg, task) for a checkpoint written by :func:`run_ptq`, ready to evaluate."""
    from lowbit import config as config_mod
    from lowbit.train import engine
    from lowbit.train.checkpoint import load_checkpoint, load_model_state

    ckpt = load_checkpoint(checkpoint)
    if "ptq" not in ckpt:
        raise ValueError(f"{ckpt['path']!r} is not a post-training quantized checkpoint")
    cfg = config_mod.resolve(ckpt["config"], overrides)
    device = engine.resolve_device(cfg["device"])
    task = engine.build_task(cfg)
    model = engine.build_model(cfg, task)
    restore_quantized(model, ckpt["ptq"])
    load_model_state(model, ckpt, cfg["model"]["name"])
    return model.to(device).eval(), cfg, task


def evaluate_quantized(checkpoint: str | os.PathLike,
                       overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """Evaluate a :func:`run_ptq` checkpoint exactly as ``lowbit eval`` evaluates others."""
    from lowbit.train import engine

    model, cfg, task = load_quantized(checkpoint, overrides)
    device = next(model.parameters()).device
    loss_fn = engine.build_loss(cfg["loss"]["name"], label_smoothing=0.0)
    return engine.evaluate_task(model, task, cfg, loss_fn, device)


__all__ = ["VARIANTS", "run_ptq", "load_quantized", "evaluate_quantized"]
