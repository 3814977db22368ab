"""Checkpoint-level post-training quantization: what ``lowbit ptq CHECKPOINT`` runs.

:func:`run_ptq` quantizes one float checkpoint at one precision and writes the quantized
checkpoint (``lowbit eval`` runs it) and a report; :func:`run_ptq_table` does it for several
precisions and writes the paper's ablation table (naive, +ACIQ, +bit allocation, +bias
correction, all methods) beside FP32. :func:`ptq_options` turns ``key=value`` command-line items
into their keyword arguments.

This is the one place in :mod:`lowbit.ptq` that reaches up to :mod:`lowbit.train` (checkpoint
loading, data and model building, evaluation), and it does so lazily inside the functions.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .clipping import CLIP_METHODS
from .model import PTQReport, quantize_model, restore_quantized

#: The ablation of the paper's table: naive, each method alone, all methods.
VARIANTS = {
    "naive": dict(clip="minmax", bit_alloc=False, bias_correction=False),
    "aciq": dict(clip="aciq", bit_alloc=False, bias_correction=False),
    "bit_alloc": dict(clip="minmax", bit_alloc=True, bias_correction=False),
    "bias_correction": dict(clip="minmax", bit_alloc=False, bias_correction=True),
    "all": dict(clip="aciq", bit_alloc=True, bias_correction=True),
}

#: Column titles of the ablation table, in order.
VARIANT_TITLES = {"naive": "naive", "aciq": "+ACIQ", "bit_alloc": "+bit allocation",
                  "bias_correction": "+bias correction", "all": "all methods"}

#: The ``lowbit ptq`` options (``key=value``) and what they mean; other keys are config
#: overrides (``data.root=...``).
OPTIONS = {
    "w_bits": "weight bits, 1..16 (mean bits under bit allocation); default 4",
    "a_bits": "activation bits, 1..16; default 4",
    "precisions": "several precisions at once, e.g. w8a8,w4a8,w8a4,w4a4 (writes a table; "
                  "replaces w_bits/a_bits)",
    "clip": f"activation clipping, one of {', '.join(CLIP_METHODS)} (hyphens work too); "
            "default aciq (per channel the better of the Laplace and Gaussian priors)",
    "w_clip": f"weight clipping, one of {', '.join(CLIP_METHODS)}; default minmax",
    "bit_alloc": "per-channel bit allocation, true|false; default true",
    "bias_correction": "true (mean and norm) | mean | false; default true",
    "first_last_bits": "bits of the first and last layer (int), or none to treat them like "
                       "the others; default 8",
    "num_samples": "calibration images; default 512",
    "per_channel_acts": "per-channel activation ranges, true|false; default true",
    "per_channel_weights": "per-output-channel weight ranges, true|false; default true",
    "percentile": "percentile of the 'percentile' clipping method; default 99.99",
    "variants": "also evaluate the ablation (naive, aciq, bit_alloc, bias_correction, all), "
                "true|false; default false",
    "calib_seed": "seed of the calibration image order; default 0",
    "out": "output folder; default <checkpoint folder>/ptq-w{W}a{A} (ptq-table for precisions)",
}

_BIAS_MODES = {True: True, False: False, "true": True, "false": False, "mean": "mean",
               "mean_var": "mean_var"}


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
            hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def _clip_method(name: str, value: Any) -> str:
    text = value.strip().lower().replace("-", "_") if isinstance(value, str) else value
    if text not in CLIP_METHODS:
        raise ValueError(f"{name} must be one of {', '.join(CLIP_METHODS)}, got {value!r}")
    return text


def parse_precisions(value: Any) -> list[tuple[int, int]]:
    """``"w8a8,w4a4"`` (or a list of such names or of (w, a) pairs) -> [(8, 8), (4, 4)]."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"precisions must look like w8a8,w4a4, got {value!r}")
    out = []
    for item in items:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            w, a = item
        else:
            m = re.fullmatch(r"\s*w(\d+)a(\d+)\s*", str(item).lower())
            if m is None:
                raise ValueError(f"precisions: {item!r} is not of the form w<bits>a<bits> "
                                 "(e.g. w4a4)")
            w, a = int(m.group(1)), int(m.group(2))
        out.append((_int("w_bits", w, 1, 16), _int("a_bits", a, 1, 16)))
    if len(set(out)) != len(out):
        raise ValueError(f"precisions lists a precision twice: {value!r}")
    return out


def check_options(**kw: Any) -> dict[str, Any]:
    """Validate and normalise :func:`run_ptq` keyword arguments (names as in :data:`OPTIONS`).

    Raises ValueError naming the argument and its valid values; returns a new dict.
    """
    unknown = sorted(set(kw) - set(OPTIONS) - {"out_dir", "overrides"})
    if unknown:
        raise ValueError(f"unknown ptq option {unknown[0]!r}; valid options: "
                         f"{', '.join(OPTIONS)}")
    out = dict(kw)
    for k in ("w_bits", "a_bits"):
        if k in out:
            out[k] = _int(k, out[k], 1, 16)
    for k in ("clip", "w_clip"):
        if k in out:
            out[k] = _clip_method(k, out[k])
    for k in ("bit_alloc", "per_channel_acts", "per_channel_weights", "variants"):
        if k in out:
            out[k] = _bool(k, out[k])
    if "bias_correction" in out:
        v = out["bias_correction"]
        key = v.lower() if isinstance(v, str) else v
        if not isinstance(key, (bool, str)) or key not in _BIAS_MODES:
            raise ValueError("bias_correction must be one of true, false, mean, mean_var, "
                             f"got {v!r}")
        out["bias_correction"] = _BIAS_MODES[key]
    if "first_last_bits" in out:
        v = out["first_last_bits"]
        if v is None or (isinstance(v, str) and v.lower() in ("none", "same", "")):
            out["first_last_bits"] = None
        else:
            out["first_last_bits"] = _int("first_last_bits (or none)", v, 1, 16)
    if "num_samples" in out:
        out["num_samples"] = _int("num_samples", out["num_samples"], 1)
    if "calib_seed" in out:
        out["calib_seed"] = _int("calib_seed", out["calib_seed"], 0)
    if "percentile" in out:
        p = out["percentile"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50.0 < p <= 100.0:
            raise ValueError(f"percentile must be a number in (50, 100], got {p!r}")
        out["percentile"] = float(p)
    if "precisions" in out:
        out["precisions"] = parse_precisions(out["precisions"])
    return out


def ptq_options(items: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``lowbit ptq`` ``key=value`` items into checked options and config overrides.

    Keys of :data:`OPTIONS` are options; dotted keys and other config keys (``data.root``,
    ``device``) are config overrides, left for the config to check. ``out`` becomes ``out_dir``.
    """
    from lowbit import config as config_mod

    options: dict[str, Any] = {}
    overrides: list[str] = []
    config_keys = set(config_mod.valid_keys())
    for item in items:
        key, value = config_mod.parse_override(item)
        if key in OPTIONS:
            options[key] = value
        elif "." in key or key in config_keys:
            overrides.append(item)
        else:
            raise ValueError(f"unknown ptq option {key!r}; valid options: {', '.join(OPTIONS)} "
                             "(or a config key such as data.root=...)")
    if "out" in options:
        options["out_dir"] = str(options.pop("out"))
    if "precisions" in options and ({"w_bits", "a_bits"} & set(options)):
        raise ValueError("give either precisions=... or w_bits/a_bits, not both")
    return check_options(**options), overrides


# ------------------------------------------------------------------------------ internals
@dataclass
class _Loaded:
    ckpt: dict
    cfg: dict
    task: Any
    model: nn.Module
    device: torch.device
    loss_fn: Any
    fp32: dict


def _load_float_model(checkpoint: str | os.PathLike,
                      overrides: Sequence[str] | Mapping[str, Any]) -> _Loaded:
    from lowbit import config as config_mod
    from lowbit.train import engine
    from lowbit.train.checkpoint import load_checkpoint, load_model_state

    if _is_recipe(checkpoint):
        # a recipe and the float weights to quantize (model.init), e.g. torchvision's ResNets
        cfg = config_mod.resolve(str(checkpoint), overrides)
        if not cfg["model"]["init"]:
            raise ValueError(f"{checkpoint!r} is a recipe: give the trained float weights to "
                             "quantize with model.init=WEIGHTS (a lowbit checkpoint or a "
                             "state-dict file)")
        if not Path(cfg["model"]["init"]).exists():  # before reading any data
            raise FileNotFoundError(f"model.init: {cfg['model']['init']!r} does not exist")
        if cfg.get("variants"):  # a multi-variant recipe: its float variant
            runs = [c for _, c in config_mod.split_variants(cfg)]
            cfg = next((c for c in runs if c["quant"]["scheme"] in ("", "fp32")), runs[0])
        ckpt = {"path": str(Path(cfg["model"]["init"]).resolve()), "config": cfg,
                "model_name": cfg["model"]["name"], "epoch": None}
    else:
        ckpt = load_checkpoint(checkpoint)
        if "ptq" in ckpt:
            raise ValueError(f"{ckpt['path']!r} is already a post-training quantized checkpoint")
        cfg = config_mod.resolve(ckpt["config"], overrides)
    config_mod.check_names(cfg)
    scheme = cfg["quant"]["scheme"]
    if scheme not in ("", "fp32"):
        raise ValueError(f"run_ptq needs a float checkpoint; {ckpt['path']!r} was trained with "
                         f"quant.scheme={scheme!r}")
    device = engine.resolve_device(cfg["device"])
    task = engine.build_task(cfg, device=device)
    if task.kind != "classify":
        raise ValueError("run_ptq supports image classification checkpoints")
    model = engine.build_model(cfg, task, init_weights="model" not in ckpt)
    if "model" in ckpt:
        load_model_state(model, ckpt, cfg["model"]["name"])
    model = model.to(device).eval()
    loss_fn = engine.build_loss(cfg["loss"]["name"], label_smoothing=0.0)
    fp32 = engine.evaluate_task(model, task, cfg, loss_fn, device)
    return _Loaded(ckpt, cfg, task, model, device, loss_fn, fp32)


def _is_recipe(checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint`` names a recipe (a shipped name or a .toml file), not a checkpoint."""
    text = str(checkpoint)
    if text.endswith(".toml"):
        return True
    if Path(text).exists() or "/" in text or os.sep in text or text.endswith((".pt", ".pth")):
        return False
    from lowbit import config as config_mod

    return text in {name for name, _ in config_mod.list_recipes()}


def _calibration_batches(task: Any, seed: int, batch_size: int = 128):
    """Un-augmented training images in a seeded random order (calibration reads the first)."""
    from lowbit.data import BatchLoader

    ds = task.train_loader.dataset
    return BatchLoader(ds, batch_size, shuffle=True, augment=None, seed=seed)


@torch.no_grad()
def _output_sqnr(ref: nn.Module, q: nn.Module, task: Any, device: torch.device,
                 limit: int = 1024) -> float:
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
    return float("inf") if noise == 0 else 10.0 * math.log10(signal / noise)


_QUANT_ARGS = ("clip", "w_clip", "bit_alloc", "bias_correction", "first_last_bits",
               "num_samples", "per_channel_acts", "per_channel_weights", "percentile")
_DEFAULTS: dict[str, Any] = dict(clip="aciq", w_clip="minmax", bit_alloc=True,
                                 bias_correction=True, first_last_bits=8, num_samples=512,
                                 per_channel_acts=True, per_channel_weights=True,
                                 percentile=99.99)


def _quantize_one(run: _Loaded, w_bits: int, a_bits: int, args: Mapping[str, Any],
                  calib_seed: int) -> tuple[nn.Module, PTQReport, dict[str, Any]]:
    from lowbit.train import engine

    t0 = time.perf_counter()
    q, rep = quantize_model(run.model, _calibration_batches(run.task, calib_seed),
                            w_bits=w_bits, a_bits=a_bits, **args)
    seconds = time.perf_counter() - t0
    m = engine.evaluate_task(q, run.task, run.cfg, run.loss_fn, run.device)
    return q, rep, {"top1": m["val_top1"], "loss": m["val_loss"],
                    "sqnr_db": _output_sqnr(run.model, q, run.task, run.device),
                    "seconds": seconds}


def _ptq_one(run: _Loaded, out: Path, w_bits: int, a_bits: int, args: Mapping[str, Any],
             variants: bool, calib_seed: int) -> dict[str, Any]:
    """Quantize at one precision, evaluate (and the ablation), write model.pt and reports."""
    from lowbit.train.checkpoint import FORMAT, atomic_save

    q, report, main = _quantize_one(run, w_bits, a_bits, args, calib_seed)
    fp32_top1 = run.fp32["val_top1"]
    report.metrics = {
        "fp32_top1": fp32_top1,
        "top1": main["top1"],
        "top1_drop": fp32_top1 - main["top1"],
        "output_sqnr_db": main["sqnr_db"],
        "quantize_seconds": main["seconds"],
    }
    if variants:
        table = {}
        for name, kw in VARIANTS.items():
            vargs = {**args, **kw}
            if vargs == dict(args):  # the main configuration: measured already
                table[name] = {k: main[k] for k in ("top1", "sqnr_db", "seconds")}
                continue
            _, _, vm = _quantize_one(run, w_bits, a_bits, vargs, calib_seed)
            table[name] = {k: vm[k] for k in ("top1", "sqnr_db", "seconds")}
        report.metrics["variants"] = table
    out.mkdir(parents=True, exist_ok=True)
    import lowbit

    ckpt = run.ckpt
    state = {
        "format": FORMAT,
        "lowbit_version": lowbit.__version__,
        "model_name": ckpt["model_name"],
        "config": run.cfg,
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
        **report.metrics,
        "report": report,
    }


def _split_args(opts: Mapping[str, Any]) -> tuple[dict[str, Any], bool, int]:
    args = {k: opts.get(k, _DEFAULTS[k]) for k in _QUANT_ARGS}
    return args, bool(opts.get("variants", False)), int(opts.get("calib_seed", 0))


# ------------------------------------------------------------------------------ public API
def run_ptq(
    checkpoint: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    w_bits: int = 4,
    a_bits: int = 4,
    **options: Any,
) -> dict[str, Any]:
    """Quantize a float lowbit checkpoint after training, evaluate it, write it and a report.

    ``options`` are those of :data:`OPTIONS` (``clip``, ``w_clip``, ``bit_alloc``,
    ``bias_correction``, ``first_last_bits``, ``num_samples``, ``per_channel_acts``,
    ``per_channel_weights``, ``percentile``, ``variants``, ``calib_seed``), checked before
    anything runs. Writes ``out_dir`` (default ``<checkpoint folder>/ptq-w{w}a{a}``) with
    ``model.pt`` (a lowbit checkpoint with a ``"ptq"`` structure record that ``lowbit eval``
    rebuilds), ``report.md`` and ``report.json``. With ``variants`` the paper's ablation
    (naive, ACIQ, bit allocation, bias correction, all) is evaluated too. Returns a dict with
    the paths, ``fp32_top1``, ``top1``, ``output_sqnr_db``, the timings and the
    :class:`PTQReport`.
    """
    if "precisions" in options:
        raise ValueError("run_ptq takes w_bits/a_bits; use run_ptq_table for precisions")
    opts = check_options(w_bits=w_bits, a_bits=a_bits, **options)
    args, variants, seed = _split_args(opts)
    run = _load_float_model(checkpoint, overrides)
    w, a = opts["w_bits"], opts["a_bits"]
    out = Path(out_dir) if out_dir is not None else (
        Path(run.ckpt["path"]).parent / f"ptq-w{w}a{a}")
    return _ptq_one(run, out, w, a, args, variants, seed)


def run_ptq_table(
    checkpoint: str | os.PathLike,
    precisions: Any = "w8a8,w4a8,w8a4,w4a4",
    *,
    out_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    **options: Any,
) -> dict[str, Any]:
    """The paper's ablation table: every precision x (naive, +ACIQ, +bit allocation, +bias
    correction, all methods), beside FP32 evaluated once.

    Writes ``out_dir/w{W}a{A}/`` (checkpoint and report per precision, as :func:`run_ptq`) and
    ``out_dir/table.md`` + ``table.json``; returns the table as a dict with ``"rows"``.
    """
    opts = check_options(precisions=precisions, **options)
    if opts.pop("variants", True) is False:
        raise ValueError("run_ptq_table always evaluates the variants (variants=true)")
    precs = opts.pop("precisions")
    args, _, seed = _split_args(opts)
    run = _load_float_model(checkpoint, overrides)
    root = Path(out_dir) if out_dir is not None else Path(run.ckpt["path"]).parent / "ptq-table"
    rows = []
    for w, a in precs:
        r = _ptq_one(run, root / f"w{w}a{a}", w, a, args, True, seed)
        rows.append({
            "precision": f"W{w}A{a}", "w_bits": w, "a_bits": a, "fp32_top1": r["fp32_top1"],
            **{name: v["top1"] for name, v in r["variants"].items()},
            "sqnr_db": {name: v["sqnr_db"] for name, v in r["variants"].items()},
            "checkpoint": r["checkpoint"], "top1": r["top1"],
        })
    result = {
        "source_checkpoint": run.ckpt["path"],
        "fp32_top1": run.fp32["val_top1"],
        "eval_images": len(run.task.eval_loader.dataset),
        "calibration_images": args["num_samples"],
        "options": {**args, "calib_seed": seed},
        "rows": rows,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.json").write_text(json.dumps(result, indent=2, default=str))
    (root / "table.md").write_text(table_markdown(result))
    return {**result, "table_md": str(root / "table.md"), "table_json": str(root / "table.json")}


def table_markdown(result: Mapping[str, Any]) -> str:
    """The ablation table of :func:`run_ptq_table` as markdown (top-1 %, and all − FP32)."""
    head = ["precision", "FP32", *VARIANT_TITLES.values(), "all − FP32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["precision"], f"{r['fp32_top1']:.2f}"]
        cells += [f"{r[k]:.2f}" for k in VARIANT_TITLES]
        cells.append(f"{r['all'] - r['fp32_top1']:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"Top-1 (%) on {result['eval_images']} evaluation images; "
            f"{result['calibration_images']} calibration images; source "
            f"`{result['source_checkpoint']}`.")
    return "\n".join([note, "", *lines]) + "\n"


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
    task = engine.build_task(cfg, device=device)
    model = engine.build_model(cfg, task)
    restore_quantized(model, ckpt["ptq"])
    load_model_state(model, ckpt, cfg["model"]["name"])
    return model.to(device).eval(), cfg, task


def evaluate_quantized(checkpoint: str | os.PathLike,
                       overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """Evaluate a :func:`run_ptq` checkpoint; the same as ``lowbit eval CHECKPOINT``."""
    from lowbit.train import engine
    from lowbit.train.checkpoint import load_checkpoint

    if "ptq" not in load_checkpoint(checkpoint):
        raise ValueError(f"{str(checkpoint)!r} is not a post-training quantized checkpoint")
    return engine.evaluate(checkpoint, overrides)


__all__ = ["OPTIONS", "VARIANTS", "check_options", "evaluate_quantized", "load_quantized",
           "parse_precisions", "ptq_options", "run_ptq", "run_ptq_table", "table_markdown"]
