"""Per-tensor and per-channel statistics for clipping, exact or streamed over batches.

A tensor is viewed as rows: one row per channel (``axis`` given) or a single row (per tensor).
For every row we keep what the clipping methods need:

* exact streamed moments (float32 per batch, float64 across batches): count, mean, std
  (population), min, max, and for the positive part
  (half-range tensors) the fraction, mean (exponential scale b) and root-mean-square (half-normal
  sigma) of the values > 0;
* the Laplace scale b = mean |x - mean|. Streamed over batches it is, as in the paper's
  statistics manager, the average over batches of |x - batch mean| (each batch's own mean).
  The per-tensor b of a per-channel accumulator is estimated from the sample below, about
  the exact overall mean;
* a uniform random sample of up to ``max_samples`` values per row (a reservoir of whole
  columns, so every channel keeps the same positions), used by the percentile, MSE-search and
  ACIQ-choice methods and by the reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


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
        if axis is not None and not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis} out of range for a {x.dim()}-D tensor")
        rows = 1 if axis is None else x.shape[axis]
        acc = RunningStats(axis=axis, max_samples=x.numel() // rows)
        acc._update(x.detach(), axis)
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
        self._np_gen = np.random.default_rng(seed)
        self.n = 0  # values per row seen so far
        self.batches = 0
        self.items = 0  # entries along dim 0 of the batches (inputs, for NCHW / NF tensors)
        self._sum = self._sumsq = self._absdev = None
        self._min = self._max = None
        self._npos = self._sumpos = self._sumsqpos = None
        self._reservoir: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """Add one batch of the tensor."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            return
        self._update(x.detach(), self.axis)
        self.items += int(x.shape[0]) if x.dim() > 0 else 1

    def _update(self, x: Tensor, axis: int | None) -> None:
        """Accumulate one batch; reductions run over every dim but ``axis`` in place (no
        transposed copy), in float32 with float64 accumulators kept on the CPU."""
        if axis is None:
            x = x.reshape(1, -1)
            axis = 0
        elif not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis} out of range for a {x.dim()}-D tensor")
        axis = axis % x.dim()
        x = x.float()
        dims = tuple(d for d in range(x.dim()) if d != axis)
        rows = x.shape[axis]
        cols = x.numel() // rows
        if self._sum is not None and rows != self._sum.shape[0]:
            raise ValueError(
                f"channel count changed between batches: {self._sum.shape[0]} -> {rows}"
            )
        f64 = torch.float64
        keep = [1] * x.dim()
        keep[axis] = rows
        var32, mean32 = torch.var_mean(x, dims, correction=0)
        mean = mean32.to(f64)
        s = mean * cols
        sumsq = (var32.to(f64) + mean * mean) * cols
        mn = x.amin(dims).to(f64)
        mx = x.amax(dims).to(f64)
        mean, s, sumsq, mn, mx = (t.cpu() for t in (mean, s, sumsq, mn, mx))
        npos = (x > 0).sum(dims).to(f64).cpu()
        if bool((mn >= 0).all()):  # non-negative (post-ReLU): the positive part is x itself
            sumpos, sumsqpos = s, sumsq
        else:
            pos = x.clamp(min=0.0)
            sumpos = pos.sum(dims, dtype=f64).cpu()
            sumsqpos = pos.mul_(pos).sum(dims, dtype=f64).cpu()
        parts = {
            "_sum": s,
            "_sumsq": sumsq,
            "_absdev": (x - mean32.reshape(keep)).abs_().sum(dims, dtype=f64).cpu(),
            "_npos": npos,
            "_sumpos": sumpos,
            "_sumsqpos": sumsqpos,
        }
        if self._sum is None:
            for k, v in parts.items():
                setattr(self, k, v.clone())
            self._min, self._max = mn, mx
        else:
            for k, v in parts.items():
                getattr(self, k).add_(v)
            self._min = torch.minimum(self._min, mn)
            self._max = torch.maximum(self._max, mx)
        self._sample_columns(x, axis, cols)
        self.n += cols
        self.batches += 1

    def _columns(self, x: Tensor, axis: int, idx: Tensor) -> Tensor:
        """Columns ``idx`` (flat indices over the other dims, in order) as [rows, len(idx)]."""
        lead = x.shape[:axis]
        x3 = x.reshape(int(torch.tensor(lead).prod()) if lead else 1, x.shape[axis], -1)
        # integer div/mod rather than torch.unravel_index, whose first call imports ~2 s of
        # symbolic-shape machinery
        idx = idx.to(x.device)
        i, j = torch.div(idx, x3.shape[2], rounding_mode="floor"), torch.remainder(idx, x3.shape[2])
        return x3[i, :, j].t().to(torch.float32).cpu()

    def _sample_columns(self, x: Tensor, axis: int, m: int) -> None:
        """Keep a uniform random sample (without replacement) of the columns seen so far.

        Once the sample holds ``k`` columns, a batch of ``m`` new columns after ``n`` old ones
        contributes j ~ Hypergeometric(n + m, m, k) uniformly chosen columns, which replace j
        uniformly chosen slots: a uniform k-subset of the old columns thinned uniformly plus
        a uniform subset of the new ones is a uniform k-subset of all of them. O(k) work per
        batch, independent of the batch size.
        """
        k = self.max_samples
        have = 0 if self._reservoir is None else self._reservoir.shape[1]
        take = min(m, k - have)
        if take > 0:
            head = self._columns(x, axis, torch.arange(take))
            self._reservoir = head if self._reservoir is None else torch.cat(
                [self._reservoir, head], 1)
        rest = m - take
        if rest == 0:
            return
        old = self.n + take
        j = int(self._np_gen.hypergeometric(rest, old, k))
        if j == 0:
            return
        slots = torch.randperm(k, generator=self._gen)[:j]
        cols = take + torch.randperm(rest, generator=self._gen)[:j]
        self._reservoir[:, slots] = self._columns(x, axis, cols)

    def _finish(self, per_tensor: bool) -> Stats:
        if self._sum is None:
            raise ValueError("no data: call update() with at least one non-empty batch")
        if per_tensor:
            red = {
                k: getattr(self, k).sum(0, keepdim=True)
                for k in ("_sum", "_sumsq", "_npos", "_sumpos", "_sumsqpos")
            }
            n = self.n * self._sum.shape[0]
            sample = self._reservoir.reshape(1, -1)
            mean_t = red["_sum"] / n
            # the tensor's b about its overall mean, from the uniform sample (each row's exact
            # streamed b is about that row's own mean, so it cannot be combined exactly)
            absdev = (sample.double() - mean_t).abs().mean(1) * n
            vmin = self._min.amin(0, keepdim=True)
            vmax = self._max.amax(0, keepdim=True)
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
