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


def bias_correct(w: Tensor, w_q: Tensor, *, axis: int = 0, variance: bool = True) -> Tensor:
    """Correct ``w_q`` per channel along ``axis`` to the mean (and norm, if ``variance``) of ``w``.

    Channels whose quantized values are all equal get only the mean correction.
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
    dims = [d for d in range(w.dim()) if d != axis]
    w64, q64 = w.detach().double(), w_q.detach().double()
    if not dims:  # one value per channel: the mean correction restores w exactly
        return w.detach().clone().to(w_q.dtype)
    mean_w = w64.mean(dim=dims, keepdim=True)
    mean_q = q64.mean(dim=dims, keepdim=True)
    dev_q = q64 - mean_q
    if variance:
        norm_w = (w64 - mean_w).pow(2).sum(dim=dims, keepdim=True).sqrt()
        norm_q = dev_q.pow(2).sum(dim=dims, keepdim=True).sqrt()
        xi = torch.where(norm_q > 0, norm_w / torch.where(norm_q > 0, norm_q, 1.0), 1.0)
        dev_q = dev_q * xi
    return (dev_q + mean_w).to(w_q.dtype)
