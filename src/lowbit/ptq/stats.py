"""Per-tensor and per-channel statistics for clipping, exact or streamed over batches.

A tensor is viewed as rows: one row per channel (``axis`` given) or a single row (per tensor).
For every row we keep what the clipping methods need:

* exact streamed moments: count, mean, std (population), min, max, and for the positive part
  (half-range tensors) the fraction, mean (exponential scale b) and root-mean-square (half-normal
  sigma) of the values > 0;
* the Laplace scale b = mean |x - mean|. Streamed over batches it is, as in the paper's
  statistics manager, the average over batches of |x - batch mean| (each batch's own mean);
* a uniform random sample of up to ``max_samples`` values per row (reservoir sampling of whole
  columns, so every channel keeps the same positions), used by the percentile and MSE-search
  methods and by the reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _rows(x: Tensor, axis: int | None) -> Tensor:
    """View ``x`` as [rows, values]: one row per channel along ``axis``, or one row."""
    if axis is None:
        return x.reshape(1, -1)
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a {x.dim()}-D tensor")
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


@dataclass
class Stats:
    """Statistics of one tensor: every field has one entry per row (channel), shape [R]."""

    count: int
    mean: Tensor
    std: Tensor
    b: Tensor
    min: Tensor
    max: Tensor
    pos_frac: Tensor
    pos_b: Tensor
    pos_sigma: Tensor
    sample: Tensor  # [R, K] float32

    @property
    def rows(self) -> int:
        return int(self.mean.numel())

    @classmethod
    def from_tensor(cls, x: Tensor, axis: int | None = None) -> Stats:
        """Exact statistics of a whole tensor (per channel along ``axis`` or per tensor)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise ValueError("cannot take statistics of an empty tensor")
        r = _rows(x.detach(), axis)
        acc = RunningStats(axis=None, max_samples=r.shape[1])
        acc._update_rows(r)
        return acc._finish(per_tensor=False)


class RunningStats:
    """Streaming accumulator of :class:`Stats` for one tensor site (e.g. a layer input).

    ``update(x)`` adds a batch; ``per_channel()`` / ``per_tensor()`` return snapshots. The
    channel axis is ``axis`` (1 for NCHW conv inputs, -1 for linear inputs); ``axis=None``
    keeps only per-tensor statistics.
    """

    def __init__(self, axis: int | None = 1, max_samples: int = 4096, seed: int = 0) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.axis = axis
        self.max_samples = int(max_samples)
        self._gen = torch.Generator().manual_seed(seed)
        self.n = 0  # values per row seen so far
        self.batches = 0
        self.items = 0  # entries along dim 0 of the batches (inputs, for NCHW / NF tensors)
        self._sum = self._sumsq = self._absdev = None
        self._min = self._max = None
        self._npos = self._sumpos = self._sumsqpos = None
        self._t_absdev = torch.zeros((), dtype=torch.float64)
        self._reservoir: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """Add one batch of the tensor."""
        if x.numel() == 0:
            return
        self._update_rows(_rows(x.detach(), self.axis))
        self.items += int(x.shape[0]) if x.dim() > 0 else 1

    def _update_rows(self, r: Tensor) -> None:
        r64 = r.to(torch.float64)
        if self._sum is not None and r64.shape[0] != self._sum.shape[0]:
            raise ValueError(
                f"channel count changed between batches: {self._sum.shape[0]} -> {r64.shape[0]}"
            )
        pos = r64 > 0
        rp = torch.where(pos, r64, torch.zeros_like(r64))
        parts = {
            "_sum": r64.sum(1),
            "_sumsq": r64.pow(2).sum(1),
            "_absdev": (r64 - r64.mean(1, keepdim=True)).abs().sum(1),
            "_npos": pos.sum(1).to(torch.float64),
            "_sumpos": rp.sum(1),
            "_sumsqpos": rp.pow(2).sum(1),
        }
        if self._sum is None:
            for k, v in parts.items():
                setattr(self, k, v)
            self._min = r64.amin(1)
            self._max = r64.amax(1)
        else:
            for k, v in parts.items():
                getattr(self, k).add_(v)
            self._min = torch.minimum(self._min, r64.amin(1))
            self._max = torch.maximum(self._max, r64.amax(1))
        self._t_absdev += (r64 - r64.mean()).abs().sum()
        self._sample_columns(r.to(torch.float32).cpu())
        self.n += r64.shape[1]
        self.batches += 1

    def _sample_columns(self, r: Tensor) -> None:
        """Reservoir sampling (algorithm R) of columns, vectorised per batch."""
        k = self.max_samples
        m = r.shape[1]
        have = 0 if self._reservoir is None else self._reservoir.shape[1]
        take = min(m, k - have)
        if take > 0:
            head = r[:, :take].clone()
            self._reservoir = head if self._reservoir is None else torch.cat(
                [self._reservoir, head], 1)
        if take == m:
            return
        # columns take..m-1 have global indices n+take .. n+m-1; each replaces a uniform slot
        # in [0, index] when that slot is < k; a later column wins over an earlier one
        idx = torch.arange(self.n + take, self.n + m, dtype=torch.float64)
        slot = torch.floor(torch.rand(idx.shape, generator=self._gen, dtype=torch.float64)
                           * (idx + 1)).to(torch.int64)
        keep = slot < k
        if not keep.any():
            return
        cols = torch.arange(take, m)[keep]
        slot = slot[keep]
        owner = torch.full((k,), -1, dtype=torch.int64)
        owner.scatter_reduce_(0, slot, cols, reduce="amax")
        hit = owner >= 0
        self._reservoir[:, hit] = r[:, owner[hit]]

    def _finish(self, per_tensor: bool) -> Stats:
        if self._sum is None:
            raise ValueError("no data: call update() with at least one non-empty batch")
        if per_tensor:
            red = {
                k: getattr(self, k).sum(0, keepdim=True)
                for k in ("_sum", "_sumsq", "_npos", "_sumpos", "_sumsqpos")
            }
            n = self.n * self._sum.shape[0]
            absdev = self._t_absdev.reshape(1)
            vmin = self._min.amin(0, keepdim=True)
            vmax = self._max.amax(0, keepdim=True)
            sample = self._reservoir.reshape(1, -1)
        else:
            red = {k: getattr(self, k) for k in ("_sum", "_sumsq", "_npos", "_sumpos", "_sumsqpos")}
            n = self.n
            absdev = self._absdev
            vmin, vmax = self._min, self._max
            sample = self._reservoir
        mean = red["_sum"] / n
        var = torch.clamp(red["_sumsq"] / n - mean.pow(2), min=0.0)
        npos = red["_npos"]
        safe = torch.clamp(npos, min=1.0)
        return Stats(
            count=n,
            mean=mean,
            std=var.sqrt(),
            b=absdev / n,
            min=vmin.clone(),
            max=vmax.clone(),
            pos_frac=npos / n,
            pos_b=red["_sumpos"] / safe,
            pos_sigma=(red["_sumsqpos"] / safe).sqrt(),
            sample=sample.clone(),
        )

    def per_channel(self) -> Stats:
        """Statistics per channel along ``axis`` (one row when ``axis`` is None)."""
        return self._finish(per_tensor=False)

    def per_tensor(self) -> Stats:
        """Statistics of the whole tensor (a single row)."""
        return self._finish(per_tensor=True)
