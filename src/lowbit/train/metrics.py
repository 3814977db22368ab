"""Per-epoch metrics: accuracy helpers and the metrics.csv / metrics.json / curves.png writer."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit._io import atomic_write

__all__ = ["topk_correct", "write_metrics", "plot_curves"]


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at C)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(target.view(-1, 1))
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def write_metrics(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> None:
    """Write ``metrics.csv`` and ``metrics.json`` (one row per epoch) into ``out_dir``."""
    out = Path(out_dir)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in keys})
    _atomic_write_text(out / "metrics.csv", buf.getvalue())
    _atomic_write_text(out / "metrics.json", json.dumps(list(rows), indent=1) + "\n")


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["epoch"])
            ys.append(v)
    return xs, ys


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Plot loss, accuracy or perplexity, learning rate (and loss scale) per epoch to a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state is touched

    panels = [("loss", ["train_loss", "val_loss"])]
    if any("val_ppl" in r for r in rows):
        panels.append(("perplexity", ["train_ppl", "val_ppl"]))
    else:
        panels.append(("accuracy (%)", ["train_top1", "val_top1", "val_top5"]))
    panels.append(("learning rate", ["lr"]))
    if any("loss_scale" in r for r in rows):
        panels.append(("loss scale", ["loss_scale"]))
    fig = Figure(figsize=(4.0 * len(panels), 3.2))
    for i, (label, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for k in keys:
            xs, ys = _series(rows, k)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=k)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if label in ("learning rate", "loss scale", "perplexity"):
            ys_all = [y for k in keys for y in _series(rows, k)[1]]
            if ys_all and min(ys_all) > 0:
                ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    # fixed margins: tight_layout costs more than the rest of the plot together
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.88 if title else 0.95,
                        wspace=0.35)
    with atomic_write(Path(path)) as f:
        fig.savefig(f, dpi=100, format="png")


# ------------------------------------------------------------------- comparing runs
@dataclass
class RunRecord:
    """A finished (or running) run as read back from its folder."""

    label: str
    folder: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any]

    @property
    def is_lm(self) -> bool:
        return any("val_ppl" in r for r in self.rows)


def read_run(folder: str | os.PathLike, label: str = "") -> RunRecord:
    """Read ``metrics.json`` (and the config stored in ``last.pt``) of one run folder."""
    folder = Path(folder)
    mj = folder / "metrics.json"
    if not mj.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a run folder: it holds no metrics.json")
    rows = json.loads(mj.read_text(encoding="utf-8"))
    config: dict[str, Any] = {}
    ckpt = folder / "last.pt"
    if ckpt.is_file():
        try:
            config = dict(torch.load(ckpt, map_location="cpu", weights_only=False).get(
                "config", {}))
        except Exception:  # a run still writing its checkpoint: the metrics are enough
            config = {}
    return RunRecord(label or folder.name, folder, rows, config)


def find_runs(paths: Sequence[str | os.PathLike]) -> list[RunRecord]:
    """Run folders named in ``paths``; a folder without metrics.json stands for its variant
    sub-folders (``lowbit train`` of a multi-variant recipe writes one per variant)."""
    runs: list[RunRecord] = []
    for p in map(Path, paths):
        if (p / "metrics.json").is_file():
            runs.append(read_run(p))
            continue
        subs = sorted(d for d in p.glob("*") if (d / "metrics.json").is_file()) \
            if p.is_dir() else []
        if not subs:
            raise FileNotFoundError(f"{str(p)!r} holds no metrics.json, nor do its sub-folders")
        runs += [read_run(d) for d in subs]
    return runs


def _describe(cfg: Mapping[str, Any]) -> str:
    q = cfg.get("quant", {})
    parts = [str(q.get("scheme", "?"))]
    if q.get("norm", "bn") != "bn":
        bits = q.get("norm_bits") or 0
        parts.append(f"{q['norm']} BN" + (f" int{bits}" if bits else ""))
    o = cfg.get("optim", {})
    if o.get("master_dtype", "fp32") != "fp32":
        parts.append(f"{o['master_dtype']} master ({o.get('master_rounding', '')})")
    sc = cfg.get("scaler", {}).get("name", "none")
    if sc != "none":
        parts.append(f"{sc} loss scaling")
    return ", ".join(parts)


def compare_table(runs: Sequence[RunRecord], baseline: int = 0) -> str:
    """A markdown table of the runs side by side: final and best metric, the difference to
    ``runs[baseline]``, epochs and time."""
    if not runs:
        raise ValueError("compare_table needs at least one run")
    lm = runs[0].is_lm
    key, better = ("val_ppl", min) if lm else ("val_top1", max)
    unit = "test ppl" if lm else "top-1 %"

    def final(r: RunRecord) -> float:
        vals = [row[key] for row in r.rows if key in row]
        return vals[-1] if vals else float("nan")

    base = final(runs[baseline])
    head = ["run", "what", "epochs", f"final {unit}", f"best {unit}",
            "vs " + runs[baseline].label, "time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        vals = [row[key] for row in r.rows if key in row]
        f = final(r)
        diff = (f"{(f / base - 1) * 100:+.1f} %" if lm else f"{f - base:+.2f}") \
            if r is not runs[baseline] else "–"
        total = sum(row.get("time_s", 0.0) for row in r.rows)
        lines.append("| " + " | ".join([
            r.label, _describe(r.config) if r.config else "", str(len(r.rows)),
            f"{f:.2f}", f"{better(vals):.2f}" if vals else "–", diff,
            f"{total / 60:.0f} min"]) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(runs: Sequence[RunRecord], path: str | os.PathLike, title: str = "") -> None:
    """Overlay the runs' curves in one PNG: training loss, the evaluation metric (top-1 or
    perplexity) and, where any run has one, the loss scale."""
    from matplotlib.figure import Figure

    lm = any(r.is_lm for r in runs)
    panels = [("train loss", "train_loss"),
              ("test perplexity" if lm else "test top-1 (%)", "val_ppl" if lm else "val_top1")]
    if any("loss_scale" in row for r in runs for row in r.rows):
        panels.append(("loss scale", "loss_scale"))
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    for i, (label, key) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for r in runs:
            xs, ys = _series(r.rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=r.label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if key in ("loss_scale", "val_ppl"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.88 if title else 0.95,
                        wspace=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        fig.savefig(f, dpi=100, format="png")
