"""Per-channel bit allocation under a fixed bit budget (Banner et al. 2019, eq. 10-11).

Derivation. Channel i is quantized over a range of width 2*alpha_i with L_i = 2^M_i levels;
its rounding noise is alpha_i^2 / (3 L_i^2) per element. The paper fixes the total number of
levels, sum_i L_i = L, and minimises the summed noise. The Lagrangian

    sum_i alpha_i^2 / (3 L_i^2) + lambda (sum_i L_i - L)

is stationary when 2 alpha_i^2 / (3 L_i^3) = lambda, i.e. L_i is proportional to
alpha_i^(2/3):

    L_i = alpha_i^(2/3) / sum_j alpha_j^(2/3) * L,     M_i = log2 L_i.

With L = C * 2^Mbar (the levels of a uniform Mbar-bit allocation over C channels), the
concavity of log2 gives sum_i M_i <= C * Mbar: the closed form never overspends a budget of
C * Mbar bits. Note that if the constraint is taken on the sum of bits (what storage costs)
rather than on the sum of levels, the same Lagrangian with sum_i log2 L_i fixed gives L_i
proportional to alpha_i instead; the integer fix-up below moves toward that optimum only as
far as the budget requires.

Integer bits. M_i is rounded to the nearest integer (the paper's code rounds; its `ceil`
option is not used) and clamped to [min_bits, max_bits]; then, while the total exceeds the
budget, one bit is taken from the channel whose MSE grows least, and while it falls short one
bit is given to the channel whose MSE drops most (greedy by marginal MSE). The per-channel MSE
model is alpha_i^2 * g(M) with g(M) = 4^-M / 3 (rounding noise of a range [-alpha, alpha]) or,
with ``distribution`` given and ``scales`` the prior's b or sigma, the ACIQ MSE at the optimal
clip for M bits (clipping plus rounding noise).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .aciq import DISTRIBUTIONS, aciq_clip, aciq_mse


def _unit_mse(bits: int, distribution: str | None, half_range: bool) -> float:
    if distribution is None:
        return 4.0 ** (-bits) / 3.0
    alpha = aciq_clip(bits, distribution, half_range=half_range)
    return aciq_mse(alpha, bits, distribution, half_range=half_range)


def allocation_levels(scales: Tensor, avg_bits: float) -> Tensor:
    """The paper's closed form: real-valued levels L_i = alpha_i^(2/3) / sum alpha^(2/3) * L.

    L = C * 2^avg_bits. Minimises sum_i alpha_i^2 / (3 L_i^2) subject to sum_i L_i = L.
    """
    s = torch.as_tensor(scales, dtype=torch.float64)
    if s.dim() != 1 or s.numel() == 0 or (s < 0).any() or not float(s.sum()) > 0:
        raise ValueError("scales must be a non-empty 1-D tensor, >= 0, not all zero")
    p = s.pow(2.0 / 3.0)
    return p / p.sum() * (s.numel() * 2.0 ** float(avg_bits))


def allocate_bits(
    scales: Tensor,
    avg_bits: float,
    *,
    min_bits: int = 1,
    max_bits: int = 8,
    distribution: str | None = None,
    half_range: bool = False,
) -> Tensor:
    """Integer bits per channel, levels proportional to scale^(2/3), total = budget.

    ``scales`` holds one non-negative value per channel (clip value alpha_i, or the prior's
    b/sigma when ``distribution`` is "laplace"/"gaussian"). The budget is
    ``floor(avg_bits * C + 1e-9)`` bits in total; the result (int64, shape [C]) sums to it
    exactly and lies in [min_bits, max_bits].
    """
    s = torch.as_tensor(scales, dtype=torch.float64).detach().cpu()
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError(f"scales must be a non-empty 1-D tensor, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("scales must be finite and >= 0")
    if distribution is not None and distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be None or one of {DISTRIBUTIONS}, "
                         f"got {distribution!r}")
    if not (isinstance(min_bits, int) and isinstance(max_bits, int) and 1 <= min_bits <= max_bits):
        raise ValueError(f"need integers 1 <= min_bits <= max_bits, got {min_bits}, {max_bits}")
    if not min_bits <= float(avg_bits) <= max_bits:
        raise ValueError(f"avg_bits must lie in [min_bits, max_bits] = [{min_bits}, {max_bits}], "
                         f"got {avg_bits}")
    c = s.numel()
    budget = int(math.floor(float(avg_bits) * c + 1e-9))
    if float(s.sum()) > 0:
        cont = torch.log2(allocation_levels(s, avg_bits))  # -inf for zero scales: clamped
    else:
        cont = torch.full_like(s, float(avg_bits))
    bits = torch.clamp(torch.round(cont), min_bits, max_bits).to(torch.int64)

    g = torch.tensor([_unit_mse(m, distribution, half_range) for m in range(max_bits + 2)],
                     dtype=torch.float64)
    w = s.pow(2)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    current = int(bits.sum())
    while current > budget:  # take a bit where the MSE grows least
        cost = w * (g[torch.clamp(bits - 1, min=0)] - g[bits])
        cost = torch.where(bits > min_bits, cost, inf)
        bits[int(torch.argmin(cost))] -= 1
        current -= 1
    while current < budget:  # give a bit where the MSE drops most
        gain = w * (g[bits] - g[bits + 1])
        gain = torch.where(bits < max_bits, gain, -inf)
        bits[int(torch.argmax(gain))] += 1
        current += 1
    return bits
