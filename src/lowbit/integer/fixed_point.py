"""Fixed-point affine maps (BatchNorm, requantization) with a certified minimal shift.

The integer rule, per channel, with integers ``M``, ``C``, a shift ``k >= 0`` and a tie window
``w`` (``0`` or a power of two ``< 2^k``)::

    v = M·x + C
    q = v >> k                      # floor(v / 2^k)
    r = v & (2^k - 1)               # v mod 2^k, the low k bits
    m = q - [r < w and q is odd]    # tie correction
    y = clamp(m + z_out, qmin, qmax)

With ``w = 0`` this is the plain floor of an affine map (rounding is folded into ``C``). A floor
of an affine map cannot round exact ties half to even (``a = 0.5, b = 0``: the outputs of
successive odd inputs step by 0 and by 2), so a tie is recognised from the low bits (``r < w``)
and an odd result is moved down to the even neighbour.

Exactness for one channel. ``m`` lands in a target integer interval ``[lo_x, hi_x]``: the exact
rounded value ``n_x``, or, where the exact output clamps, everything that clamps the same way
(``(-inf, qmin - z_out]`` or ``[qmax - z_out, inf)``). The integers ``v`` mapped into
``[lo, hi]`` form the interval ``[lo·2^k + w·[lo odd], (hi+1)·2^k - 1 + w·[hi even]]``, so
``(M, C)`` is valid iff ``L_x <= M·x + C <= U_x`` for every input ``x``. For a fixed ``M`` the
valid ``C`` are ``[max_x (L_x - M·x), min_x (U_x - M·x)]``, non-empty iff
``L_x - M·x <= U_{x'} - M·x'`` for every pair. With ``w = ω·2^k`` and writing
``λ_x = lo_x + ω·[lo_x odd]``, ``υ_x = hi_x + 1 + ω·[hi_x even]`` this reads
``M/2^k > (λ_x - υ_{x'})/(x - x')`` for ``x > x'`` and ``M/2^k < (υ_{x'} - λ_x)/(x' - x)`` for
``x < x'`` (both sides are integers once multiplied out, so ``>=`` + 1 becomes ``>``). Hence for a
fixed ``ω`` the valid ``M`` at shift ``k`` are exactly the integers strictly inside
``(α_lo·2^k, α_hi·2^k)`` with ``α_lo = max`` and ``α_hi = min`` of those pair ratios, an interval
that does not depend on ``k``. The ratios are found exactly with Dinkelbach's iteration (each step
``O(N)`` with a prefix maximum); the two pairs that attain ``α_lo`` and ``α_hi`` are the witnesses.

Minimality. ``(M, C, k, w)`` valid implies ``(2M, 2C, k+1, 2w)`` valid (the same ``q`` and the
same tie test), so feasibility is monotone in ``k`` and the smallest feasible ``k`` is found by
scanning ``k = 0, 1, ...``; at each ``k`` every window ``w ∈ {0, 1, 2, 4, ..., 2^(k-1)}`` is
tried. The certificate that ``k* - 1`` is infeasible is, for every such window, the two witness
pairs: their two constraints alone already leave no integer ``M``. The minimum is over this
family; a window that is not a power of two occasionally allows one bit less (counted by brute
force in ``benchmarks/bench_integer.py``).

Only the two ends of each run of inputs with equal exact outputs carry constraints (the bounds
are constant along a run and ``M·x + C`` is linear), so a wide accumulator range costs
``O(number of distinct outputs)``, not ``O(range)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.integer.exact import (
    ExactAffine,
    check_rounding,
    exact_round,
    int_range,
    round_exact_int,
)

__all__ = [
    "FixedPointAffine",
    "fixed_point_affine",
    "fixed_point_round",
    "target_intervals",
    "signed_bits",
]

_INT64_SAFE = 2**59


def signed_bits(v: int) -> int:
    """Bits of a two's complement integer holding ``v`` (sign bit included)."""
    v = int(v)
    return (v if v >= 0 else ~v).bit_length() + 1


def fixed_point_round(v: np.ndarray, shift: Any, window: Any) -> np.ndarray:
    """``(v >> k) - [(v mod 2^k) < w and (v >> k) odd]`` elementwise (int64, broadcasting)."""
    v = np.asarray(v)
    k = np.asarray(shift, dtype=np.int64)
    w = np.asarray(window, dtype=np.int64)
    q = v >> k
    r = v & ((np.int64(1) << k) - 1)
    return q - ((r < w) & ((q & 1) == 1)).astype(q.dtype)


def target_intervals(rounded: np.ndarray, output_range: tuple[int, int], output_zero_point: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Targets for ``m`` (before ``+ z_out``) such that ``clamp(m + z_out)`` is exact.

    Returns ``lo, hi`` (int64) and masks ``lo_inf, hi_inf`` meaning ``-inf`` / ``+inf``.
    """
    qmin, qmax = output_range
    y = rounded + output_zero_point
    low = y <= qmin  # exact output is qmin: any m with m + z_out <= qmin is fine
    high = y >= qmax
    lo = np.where(high, qmax - output_zero_point, rounded)
    hi = np.where(low, qmin - output_zero_point, rounded)
    lo = np.where(low, 0, lo)
    hi = np.where(high, 0, hi)
    return lo.astype(np.int64), hi.astype(np.int64), low, high


def _bounds(lo: np.ndarray, hi: np.ndarray, lo_inf: np.ndarray, hi_inf: np.ndarray, s: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """``λ·2^s`` and ``υ·2^s`` for the window ``ω = 2^-s`` (``s = 0`` means ``ω = 0``)."""
    e = 1 if s > 0 else 0
    mag = int(max(np.abs(lo).max(initial=0), np.abs(hi).max(initial=0))) + 2
    if mag << s >= _INT64_SAFE:
        lo, hi = lo.astype(object), hi.astype(object)
    lam = lo * (1 << s) + e * (lo & 1)
    ups = (hi + 1) * (1 << s) + e * (1 - (hi & 1))
    lam = np.where(lo_inf, 0, lam)
    ups = np.where(hi_inf, 0, ups)
    return lam, ups


def _max_pair_ratio(lam: np.ndarray, ups: np.ndarray, lam_ok: np.ndarray, ups_ok: np.ndarray,
                    pos: np.ndarray, warm: tuple[np.ndarray, np.ndarray] | None = None):
    """Per row, ``max over i > j (lam_ok[i], ups_ok[j]) of (lam[i] - ups[j]) / (pos[i] - pos[j])``.

    ``pos`` increases strictly along each row where entries take part. Dinkelbach's iteration,
    exact in integers. Returns ``(P, Q, has, wi, wj)``: the maximum is ``P/Q`` (``Q > 0``),
    attained at indices ``(wi, wj)``; ``has`` is False for rows without any pair.
    """
    R, N = lam.shape
    pos = pos - pos[:, :1]
    last_lam = np.where(lam_ok.any(1), N - 1 - np.argmax(lam_ok[:, ::-1], axis=1), -1)
    first_ups = np.where(ups_ok.any(1), np.argmax(ups_ok, axis=1), N)
    has = last_lam > first_ups
    wi, wj = last_lam.copy(), first_ups.copy()
    if warm is not None:
        wi = np.where(has, warm[0], wi)
        wj = np.where(has, warm[1], wj)
    wi = np.where(has, wi, 0)
    wj = np.where(has, wj, 0)
    rows_all = np.arange(R)
    idx = np.arange(N)
    mag = int(max(np.abs(lam).max(initial=0), np.abs(ups).max(initial=0))) + 1
    span = int(np.abs(pos).max(initial=0)) + 1
    bound = 3 * span * mag + 1
    obj = lam.dtype == object or ups.dtype == object or 8 * bound >= 2**63
    if obj:
        lam, ups, pos = lam.astype(object), ups.astype(object), pos.astype(object)
    sentinel = -4 * bound
    P = lam[rows_all, wi] - ups[rows_all, wj]
    Q = np.where(has, pos[rows_all, wi] - pos[rows_all, wj], 1)
    P = P.astype(object) if obj else P.astype(np.int64)
    Q = Q.astype(object) if obj else Q.astype(np.int64)
    active = has.copy()
    for _ in range(100_000):
        rows = np.nonzero(active)[0]
        if rows.size == 0:
            break
        Pr, Qr, xr = P[rows][:, None], Q[rows][:, None], pos[rows]
        G = np.where(lam_ok[rows], Qr * lam[rows] - Pr * xr, sentinel)
        H = np.where(ups_ok[rows], Pr * xr - Qr * ups[rows], sentinel)
        prefix = np.maximum.accumulate(H, axis=1)
        F = G[:, 1:] + prefix[:, :-1]  # i >= 1 paired with its best j < i
        best = np.argmax(F, axis=1) + 1
        improve = F[np.arange(rows.size), best - 1] > 0
        active[rows[~improve]] = False
        if improve.any():
            r_imp, b_imp = rows[improve], best[improve]
            Hm = np.where(idx[None, :] < b_imp[:, None], H[improve], sentinel)
            j_imp = np.argmax(Hm, axis=1)
            wi[r_imp], wj[r_imp] = b_imp, j_imp
            P[r_imp] = lam[r_imp, b_imp] - ups[r_imp, j_imp]
            Q[r_imp] = pos[r_imp, b_imp] - pos[r_imp, j_imp]
    else:  # pragma: no cover - Dinkelbach terminates (strictly increasing over finite pairs)
        raise RuntimeError("pair-ratio search did not converge")
    return P, Q, has, wi, wj


@dataclass
class _Interval:
    """The valid slopes ``α`` for one window level: ``(P1/(Q1·2^s), -P2/(Q2·2^s))``."""

    s: int
    P1: np.ndarray
    Q1: np.ndarray
    has1: np.ndarray
    P2: np.ndarray
    Q2: np.ndarray
    has2: np.ndarray
    w1: tuple[np.ndarray, np.ndarray]  # (x_lam, x_ups) indices, x_lam > x_ups
    w2: tuple[np.ndarray, np.ndarray]  # (x_lam, x_ups) indices, x_lam < x_ups

    def m_range(self, r: int, k: int) -> tuple[float | int, float | int]:
        """Valid integer ``M`` at shift ``k`` (``k >= s``) for row ``r``: ``[m_lo, m_hi]``."""
        t = k - self.s
        m_lo: float | int = -math.inf
        m_hi: float | int = math.inf
        if self.has1[r]:
            m_lo = (int(self.P1[r]) << t) // int(self.Q1[r]) + 1
        if self.has2[r]:
            m_hi = -((int(self.P2[r]) << t) // int(self.Q2[r])) - 1
        return m_lo, m_hi

    def feasible(self, rows: np.ndarray, k: int) -> np.ndarray:
        """Whether some integer ``M`` is valid at shift ``k`` (``k >= s``), for each row."""
        t = k - self.s
        P1, Q1, P2, Q2 = self.P1[rows], self.Q1[rows], self.P2[rows], self.Q2[rows]
        big = max(int(np.abs(P1).max(initial=0)), int(np.abs(P2).max(initial=0))) << t
        if big >= 2**62 or P1.dtype == object or P2.dtype == object:
            P1, P2 = P1.astype(object), P2.astype(object)
            Q1, Q2 = Q1.astype(object), Q2.astype(object)
        else:
            P1, P2 = P1.astype(np.int64), P2.astype(np.int64)
        m_lo = (P1 * (1 << t)) // Q1 + 1
        m_hi = -((P2 * (1 << t)) // Q2) - 1
        return ~self.has1[rows] | ~self.has2[rows] | (m_lo <= m_hi)


def _scatter(iv: _Interval, rows: np.ndarray, R: int) -> _Interval:
    """Place an interval computed for ``rows`` into arrays of ``R`` rows (others: no bound)."""
    def put(v, fill, dtype=None):
        out = np.full(R, fill, dtype=dtype or v.dtype)
        out[rows] = v
        return out
    return _Interval(iv.s, put(iv.P1, 0), put(iv.Q1, 1), put(iv.has1, False), put(iv.P2, 0),
                     put(iv.Q2, 1), put(iv.has2, False),
                     (put(iv.w1[0], 0), put(iv.w1[1], 0)), (put(iv.w2[0], 0), put(iv.w2[1], 0)))


def _take(iv: _Interval, rows: np.ndarray) -> _Interval:
    return _Interval(iv.s, iv.P1[rows], iv.Q1[rows], iv.has1[rows], iv.P2[rows], iv.Q2[rows],
                     iv.has2[rows], (iv.w1[0][rows], iv.w1[1][rows]),
                     (iv.w2[0][rows], iv.w2[1][rows]))


def _interval(lo, hi, lo_inf, hi_inf, pos, s: int, warm: _Interval | None = None) -> _Interval:
    lam, ups = _bounds(lo, hi, lo_inf, hi_inf, s)
    lam_ok, ups_ok = ~lo_inf, ~hi_inf
    N = lam.shape[1]
    wl = warm.w1 if warm is not None else None
    P1, Q1, h1, i1, j1 = _max_pair_ratio(lam, ups, lam_ok, ups_ok, pos, wl)
    wu = (N - 1 - warm.w2[0], N - 1 - warm.w2[1]) if warm is not None else None
    P2, Q2, h2, i2, j2 = _max_pair_ratio(lam[:, ::-1], ups[:, ::-1], lam_ok[:, ::-1],
                                         ups_ok[:, ::-1], -pos[:, ::-1], wu)
    return _Interval(s, P1, Q1, h1, P2, Q2, h2, (i1, j1), (N - 1 - i2, N - 1 - j2))


@dataclass(frozen=True)
class FixedPointAffine:
    """Per-channel integer parameters of the fixed-point affine map, and their bit accounting.

    ``multiplier`` (M), ``offset`` (C), ``shift`` (k) and ``tie_window`` (w) are Python-int object
    arrays (they may exceed int64 for extreme inputs); ``min_shift`` is the certified smallest
    ``k`` per channel and ``proof[c]`` lists, for every window level tried at ``min_shift - 1``,
    ``(s, (x, x'), (x2, x2'))``: the input pairs whose constraints leave no integer ``M``
    (window ``w = 0`` for ``s = 0``, else ``w = 2^(k-s)``).
    """

    multiplier: np.ndarray
    offset: np.ndarray
    shift: np.ndarray
    tie_window: np.ndarray
    min_shift: np.ndarray
    input_ranges: np.ndarray
    output_range: tuple[int, int]
    output_zero_point: int
    rounding: str
    affine: ExactAffine
    proof: list = field(repr=False)

    @property
    def channels(self) -> int:
        return len(self.multiplier)

    @property
    def input_range(self) -> tuple[int, int]:
        """The union of the per-channel input ranges."""
        return int(self.input_ranges[:, 0].min()), int(self.input_ranges[:, 1].max())

    def acc_extremes(self) -> tuple[list[int], list[int]]:
        """Smallest and largest ``M·x + C`` over each channel's input range."""
        mins, maxs = [], []
        for M, C, (lo, hi) in zip(self.multiplier.tolist(), self.offset.tolist(),
                                  self.input_ranges.tolist()):
            e1, e2 = M * lo + C, M * hi + C
            mins.append(min(e1, e2))
            maxs.append(max(e1, e2))
        return mins, maxs

    @property
    def max_abs_acc(self) -> np.ndarray:
        """Worst ``|M·x + C|`` over the input range, per channel (Python ints)."""
        mins, maxs = self.acc_extremes()
        return np.array([max(abs(a), abs(b)) for a, b in zip(mins, maxs)], dtype=object)

    def acc_bits(self) -> np.ndarray:
        """Signed bits needed for ``M·x + C`` over the whole input range, per channel."""
        mins, maxs = self.acc_extremes()
        return np.array([max(signed_bits(a), signed_bits(b)) for a, b in zip(mins, maxs)])

    @property
    def fits_int32(self) -> np.ndarray:
        """Whether ``M·x + C`` stays in int32 for every input, per channel."""
        return self.acc_bits() <= 32

    def multiplier_bits(self) -> np.ndarray:
        return np.array([signed_bits(m) for m in self.multiplier.tolist()])

    def offset_bits(self) -> np.ndarray:
        return np.array([signed_bits(c) for c in self.offset.tolist()])

    def apply(self, x: Any, axis: int = 0) -> np.ndarray:
        """Run the integer rule on integer inputs; channels along ``axis``. Returns int64."""
        x = np.asarray(x)
        if x.dtype.kind not in "iu":
            raise TypeError(f"x must be an integer array, got dtype {x.dtype}")
        axis = axis % max(x.ndim, 1)
        if x.shape[axis] != self.channels:
            raise ValueError(f"x has {x.shape[axis]} channels on axis {axis}, "
                             f"expected {self.channels}")
        shape = [1] * x.ndim
        shape[axis] = self.channels
        if x.size and ((x < self.input_ranges[:, 0].reshape(shape)).any()
                       or (x > self.input_ranges[:, 1].reshape(shape)).any()):
            raise ValueError("x must lie in the input range of its channel "
                             f"(overall [{self.input_range[0]}, {self.input_range[1]}])")
        if max(self.acc_bits()) <= 63:
            M = self.multiplier.astype(np.int64).reshape(shape)
            C = self.offset.astype(np.int64).reshape(shape)
            v = M * x.astype(np.int64) + C
        else:
            v = (self.multiplier.reshape(shape) * x.astype(object)
                 + self.offset.reshape(shape))
        k = self.shift.reshape(shape)
        w = self.tie_window.reshape(shape)
        if v.dtype == object:
            q = v >> k
            r = v & ((1 << k) - 1)
            m = q - ((r < w) & ((q & 1) == 1)).astype(np.int64)
        else:
            m = fixed_point_round(v, k.astype(np.int64), w.astype(np.int64))
        qmin, qmax = self.output_range
        return np.clip(m + self.output_zero_point, qmin, qmax).astype(np.int64)


def _choose(lo_r, hi_r, lo_inf_r, hi_inf_r, pos_r, k: int, w: int, m_lo, m_hi, A: int, D: int,
            in_range: tuple[int, int]) -> tuple[int, int]:
    """Pick ``M`` nearest ``a·2^k`` inside ``[m_lo, m_hi]`` and a ``C`` in its valid interval."""
    M = (2 * A * (1 << k) + D) // (2 * D)
    M = int(min(max(M, m_lo), m_hi))
    lo_o, hi_o = lo_r.astype(object), hi_r.astype(object)
    L = lo_o * (1 << k) + w * (lo_o & 1)
    U = (hi_o + 1) * (1 << k) - 1 + w * (1 - (hi_o & 1))
    Mx = pos_r.astype(object) * M
    c_lo = max((L - Mx)[~lo_inf_r], default=None)
    c_hi = min((U - Mx)[~hi_inf_r], default=None)
    if c_lo is not None and c_hi is not None:
        if c_lo > c_hi:  # pragma: no cover - excluded by the interval construction
            raise AssertionError("empty offset interval for a certified multiplier")
        return M, (c_lo + c_hi) // 2
    centre = -(M * (in_range[0] + in_range[1])) // 2
    if c_lo is not None:
        return M, max(c_lo, centre)
    if c_hi is not None:
        return M, min(c_hi, centre)
    return M, 0


def _run_starts(A: int, B: int, D: int, f1: int, f2: int, rounding: str) -> list[int]:
    """Inputs in ``(f1, f2)`` where ``R(t(x))`` differs from ``R(t(x-1))``, found per output
    value (``O(outputs)``, not ``O(inputs)``): the crossing of a half-integer, then checked."""
    def n(x: int) -> int:
        return round_exact_int(A, B, D, x, rounding)

    starts = []
    n1, n2 = n(f1), n(f2 - 1)
    if A > 0:  # first x with n(x) >= m
        for m in range(n1 + 1, n2 + 1):
            x = -((2 * B - (2 * m - 1) * D) // (2 * A))  # ceil(((2m-1)D - 2B) / 2A)
            x = min(max(x, f1 + 1), f2 - 1)
            while n(x) < m:
                x += 1
            while x - 1 > f1 and n(x - 1) >= m:
                x -= 1
            starts.append(x)
    elif A < 0:  # first x with n(x) <= m
        for m in range(n1 - 1, n2 - 1, -1):
            x = -((2 * B - (2 * m + 1) * D) // (2 * A))  # ceil(((2m+1)D - 2B) / 2A)
            x = min(max(x, f1 + 1), f2 - 1)
            while n(x) > m:
                x += 1
            while x - 1 > f1 and n(x - 1) <= m:
                x -= 1
            starts.append(x)
    return starts


def _reduced_inputs(affine: ExactAffine, c: int, in_range: tuple[int, int],
                    out_range: tuple[int, int], zout: int, rounding: str,
                    enumerate_limit: int = 1 << 16) -> np.ndarray:
    """The inputs whose constraints matter: the two ends of every run of equal exact outputs.

    Inside a run the bounds on ``M·x + C`` are the same constants, and a linear function obeys a
    constant bound on an interval iff it does at both ends. The exact output is monotone in
    ``x``, so the inputs that clamp low (high) form one such run.
    """
    A, B, D = affine.num_a[c], affine.num_b[c], affine.den[c]
    qmin, qmax = out_range
    lo, hi = in_range

    def level(x: int) -> int:  # 0 clamps low, 1 inside, 2 clamps high; non-decreasing in x
        y = round_exact_int(A, B, D, x, rounding) + zout
        v = 0 if y <= qmin else (2 if y >= qmax else 1)
        return v if A >= 0 else 2 - v

    def first_at_least(v: int) -> int:
        a, b = lo, hi + 1
        while a < b:
            m = (a + b) // 2
            if level(m) >= v:
                b = m
            else:
                a = m + 1
        return a

    f1, f2 = first_at_least(1), first_at_least(2)
    pts = []
    if f1 > lo:
        pts += [lo, f1 - 1]
    if f2 - f1 > enumerate_limit:  # inside: the ends of each run of equal outputs
        starts = np.asarray(_run_starts(A, B, D, f1, f2, rounding), dtype=np.int64)
        pts += [starts - 1, starts, f1]
    else:
        one = ExactAffine((A,), (B,), (D,))
        if f2 > f1:
            xs = np.arange(f1, f2, dtype=np.int64)
            n = exact_round(one, xs, rounding)[0]
            step = np.nonzero(np.diff(n))[0]
            pts += [xs[step], xs[step + 1], f1]
    if f2 > f1:
        pts.append(f2 - 1)
    if f2 <= hi:
        pts += [f2, hi]
    parts = [np.atleast_1d(np.asarray(p, dtype=np.int64)) for p in pts]
    return np.unique(np.concatenate(parts))


def _input_ranges(spec: Any, channels: int) -> np.ndarray:
    """``[channels, 2]`` int64 bounds from one shared range or one ``(lo, hi)`` per channel."""
    per_channel = (isinstance(spec, np.ndarray) and spec.ndim == 2) or (
        isinstance(spec, (list, tuple)) and len(spec) > 0
        and all(isinstance(r, (list, tuple, np.ndarray)) for r in spec))
    if not per_channel:
        lo, hi = int_range(spec, "input_range")
        return np.tile(np.array([[lo, hi]], dtype=np.int64), (channels, 1))
    pairs = [int_range(tuple(int(v) for v in r), "input_range") for r in spec]
    if len(pairs) != channels:
        raise ValueError(f"input_range has {len(pairs)} per-channel ranges, expected {channels}")
    return np.array(pairs, dtype=np.int64)


def fixed_point_affine(a: Any, b: Any, input_range: Any, output_range: Any, *,
                       rounding: str = "half_even", input_zero_point: int = 0,
                       output_zero_point: int = 0, shared_shift: bool = False,
                       max_shift: int = 62) -> FixedPointAffine:
    """Integer ``(M, C, k, w)`` per channel reproducing ``clamp(R(a(x-z_in)+b) + z_out)`` exactly.

    ``a``, ``b``: per-channel coefficients in output-scale units (floats are taken exactly; see
    :func:`lowbit.integer.exact.fold_scales`); ``input_range``/``output_range``: a format name
    (``"int8"``, ``"uint8"``, ``"int4"``), a format, or an integer pair ``(lo, hi)`` such as an
    accumulator's proven bound; ``input_range`` may also be one pair per channel. The shift is
    the certified minimum per channel, or the layer's largest one with ``shared_shift=True``.
    Cost: ``O(k)`` passes over the unclamped inputs.
    """
    check_rounding(rounding)
    for name, z in (("input_zero_point", input_zero_point),
                    ("output_zero_point", output_zero_point)):
        if isinstance(z, bool) or not isinstance(z, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {z!r}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or not 0 <= max_shift <= 200:
        raise ValueError(f"max_shift must be an int in [0, 200], got {max_shift!r}")
    if not isinstance(shared_shift, bool):
        raise TypeError(f"shared_shift must be a bool, got {shared_shift!r}")
    out_range = int_range(output_range, "output_range")
    affine = ExactAffine.from_affine(a, b, int(input_zero_point))
    C = affine.channels
    ranges = _input_ranges(input_range, C)
    if np.abs(ranges).max() >= 2**52:
        raise ValueError("input_range must lie within ±2**52")
    if max(abs(out_range[0]), abs(out_range[1]), abs(int(output_zero_point))) >= 2**48:
        raise ValueError("output_range and output_zero_point must lie within ±2**48")
    zout = int(output_zero_point)
    reduced = [_reduced_inputs(affine, c, tuple(ranges[c].tolist()), out_range, zout, rounding)
               for c in range(C)]
    k_star = np.full(C, -1, dtype=np.int64)
    s_star = np.zeros(C, dtype=np.int64)
    proof: list = [None] * C
    # chunks of channels with similar numbers of inputs, about 2^21 entries each
    order = np.argsort([r.size for r in reduced], kind="stable")
    chunks, cur, cur_n = [], [], 0
    for c in order.tolist():
        n_c = reduced[c].size
        if cur and max(cur_n, n_c) * (len(cur) + 1) > 2**21:
            chunks.append(cur)
            cur, cur_n = [], 0
        cur.append(c)
        cur_n = max(cur_n, n_c)
    if cur:
        chunks.append(cur)
    saved = []
    for chunk in chunks:
        rows = np.asarray(chunk, dtype=np.int64)
        width = max(reduced[c].size for c in chunk)
        pos = np.empty((rows.size, width), dtype=np.int64)
        pad = np.zeros((rows.size, width), dtype=bool)
        for r, c in enumerate(chunk):
            p = reduced[c]
            pos[r, :p.size] = p
            pos[r, p.size:] = p[-1] + 1 + np.arange(width - p.size)
            pad[r, p.size:] = True
        sub = ExactAffine(tuple(affine.num_a[c] for c in chunk),
                          tuple(affine.num_b[c] for c in chunk),
                          tuple(affine.den[c] for c in chunk))
        n = exact_round(sub, pos, rounding)
        lo, hi, lo_inf, hi_inf = target_intervals(n, out_range, zout)
        tg = (lo, hi, lo_inf | pad, hi_inf | pad, pos)
        levels: dict[int, _Interval] = {0: _interval(*tg, 0)}
        unresolved = np.ones(rows.size, dtype=bool)
        for k in range(max_shift + 1):
            if k >= 1:
                act = np.nonzero(unresolved)[0]
                iv = _interval(*(t[act] for t in tg), k, warm=_take(levels[k - 1], act))
                levels[k] = _scatter(iv, act, rows.size)
            for s in [0] + list(range(k, 0, -1)):  # prefer w = 0, then w = 1, 2, 4, ...
                act = np.nonzero(unresolved)[0]
                if act.size == 0:
                    break
                hit = act[levels[s].feasible(act, k)]
                k_star[rows[hit]], s_star[rows[hit]] = k, s
                unresolved[hit] = False
            if not unresolved.any():
                break
        if unresolved.any():
            bad = int(rows[np.nonzero(unresolved)[0][0]])
            raise ValueError(f"channel {bad}: no fixed-point form with shift <= {max_shift}; "
                             "raise max_shift")
        for r, c in enumerate(chunk):
            entries = []
            for s in [0] + list(range(1, int(k_star[c]))) if k_star[c] >= 1 else []:
                iv = levels[s]
                entries.append((s, (int(pos[r, iv.w1[0][r]]), int(pos[r, iv.w1[1][r]])),
                                (int(pos[r, iv.w2[0][r]]), int(pos[r, iv.w2[1][r]]))))
            proof[c] = entries
        saved.append((chunk, levels, tg))
    K = int(k_star.max()) if shared_shift else None
    Ms = np.empty(C, dtype=object)
    Cs = np.empty(C, dtype=object)
    ks = np.empty(C, dtype=object)
    ws = np.empty(C, dtype=object)
    for chunk, levels, (lo, hi, lo_inf, hi_inf, pos) in saved:
        for r, c in enumerate(chunk):
            s = int(s_star[c])
            k = K if K is not None else int(k_star[c])
            w = 0 if s == 0 else 1 << (k - s)
            m_lo, m_hi = levels[s].m_range(r, k)
            Ms[c], Cs[c] = _choose(lo[r], hi[r], lo_inf[r], hi_inf[r], pos[r], k, w, m_lo, m_hi,
                                   affine.num_a[c], affine.den[c], tuple(ranges[c].tolist()))
            ks[c], ws[c] = k, w
    return FixedPointAffine(Ms, Cs, ks, ws, k_star, ranges, out_range, zout, rounding,
                            affine, proof)
