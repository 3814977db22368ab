"""Bias correction of quantized weights (Banner et al. 2019, eq. 12-13).

Quantization shifts each output channel's mean and changes its spread. Per output channel c
(the rows along ``axis``) with mean_c and deviation norm of the original w and of the
quantized w_q:

    xi_c   = ||w_c - mean(w_c)||_2 / ||w_q,c - mean(w_q,c)||_2          (variance correction)
    w'_c   = (w_q,c - mean(w_q,c)) * xi_c + mean(w_c)                   (mean correction)

so w' has exactly the mean and the deviation norm (hence the std) of w. This is the order of
the authors' code (``-vcw`` then ``-bcw``: scale about the quantized mean, then move the
mean). The result is an affine map of the quantized grid per channel (new scale xi_c * s_c,
new offset), so it still has at most 2^M distinct values per channel and folds into the
channel's scale and zero point.
"""

from __future__ import annotations

import torch
from torch import Tensor


def correction_params(
    w: Tensor, w_q: Tensor, *, axis: int = 0, variance: bool = True
) -> tuple[Tensor, Tensor]:
    """Per-channel (gain, offset), float64, shape [C], such that w' = w_q * gain + offset.

    gain = xi_c (1 without ``variance`` or for a constant quantized channel) and
    offset = mean(w_c) - gain * mean(w_q,c); see the module docstring.
    """
    if not isinstance(w, Tensor) or not isinstance(w_q, Tensor):
        raise TypeError("w and w_q must be torch.Tensors")
    if w.shape != w_q.shape:
        raise ValueError(f"w and w_q must have the same shape, got {tuple(w.shape)} and "
                         f"{tuple(w_q.shape)}")
    if w.dim() == 0:
        raise ValueError("w must have at least one dimension")
    if not -w.dim() <= axis < w.dim():
        raise ValueError(f"axis {axis} out of range for a {w.dim()}-D tensor")
    axis = axis % w.dim()
    rows_w = w.detach().double().movedim(axis, 0).reshape(w.shape[axis], -1)
    rows_q = w_q.detach().double().movedim(axis, 0).reshape(w.shape[axis], -1)
    mean_w = rows_w.mean(1)
    mean_q = rows_q.mean(1)
    gain = torch.ones_like(mean_w)
    if variance:
        norm_w = (rows_w - mean_w[:, None]).pow(2).sum(1).sqrt()
        norm_q = (rows_q - mean_q[:, None]).pow(2).sum(1).sqrt()
        ok = norm_q > 0
        gain = torch.where(ok, norm_w / torch.where(ok, norm_q, 1.0), gain)
    return gain, mean_w - gain * mean_q


def bias_correct(w: Tensor, w_q: Tensor, *, axis: int = 0, variance: bool = True) -> Tensor:
    """Correct ``w_q`` per channel along ``axis`` to the mean (and norm, if ``variance``) of ``w``.

    Channels whose quantized values are all equal get only the mean correction.
    """
    gain, offset = correction_params(w, w_q, axis=axis, variance=variance)
    axis = axis % w.dim()
    shape = [1] * w.dim()
    shape[axis] = -1
    out = w_q.detach().double() * gain.reshape(shape) + offset.reshape(shape)
    return out.to(w_q.dtype)
