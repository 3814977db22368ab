"""Per-epoch metrics: accuracy helpers and the metrics.csv / metrics.json / curves.png writer."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["topk_correct", "write_metrics", "plot_curves"]


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at C)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(target.view(-1, 1))
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
