"""Fixed-point BatchNorm / affine maps: exhaustive sweeps against the exact rational reference,
the certificate of the minimal shift, ties, negative and zero scales, clamping."""

from __future__ import annotations

import math
import zlib
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.integer import (
    ExactAffine,
    batchnorm_affine,
    exact_outputs,
    fixed_point_affine,
    fixed_point_round,
    fold_scales,
    reference_outputs,
    round_fraction,
)

INT8 = np.arange(-128, 128)
INT4 = np.arange(-8, 8)
RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}


def random_channels(rng: np.random.Generator, n: int) -> tuple[list, list]:
    """A mix of channel kinds: random floats of any sign and size, exact ties (dyadic and
    non-dyadic), zero and tiny slopes, slopes that clamp nearly everything, folded BatchNorms."""
    a, b = [], []
    for i in range(n):
        kind = i % 8
        if kind in (0, 1):
            a.append(float(rng.choice([-1, 1]) * math.exp(rng.uniform(math.log(0.01),
                                                                      math.log(4)))))
            b.append(float(rng.normal(0, 20)))
        elif kind == 2:  # dyadic: many exact ties
            a.append(float(rng.integers(-16, 17)) / 2 ** int(rng.integers(0, 5)))
            b.append(float(rng.integers(-64, 65)) / 2 ** int(rng.integers(0, 4)))
        elif kind == 3:  # non-dyadic rationals with ties
            q = int(rng.integers(3, 12))
            a.append(Fraction(int(rng.integers(-2 * q, 2 * q + 1)), q))
            b.append(Fraction(int(rng.integers(-4 * q, 4 * q)), 2 * q))
        elif kind == 4:  # zero or tiny slope: (nearly) constant output
            a.append(0.0 if rng.random() < 0.5 else float(rng.normal(0, 1e-4)))
            b.append(float(rng.normal(0, 50)))
        elif kind == 5:  # huge slope: almost everything clamps
            a.append(float(rng.choice([-1, 1]) * rng.uniform(20, 500)))
            b.append(float(rng.normal(0, 100)))
        else:  # a BatchNorm folded with input/output scales
            g, be = rng.normal(0, 1), rng.normal(0, 1)
            mu, var = rng.normal(0, 1), rng.uniform(0.05, 3)
            ab, bb = batchnorm_affine([g], [be], [mu], [var])
            s_in = rng.uniform(0.005, 0.05)
            s_out = abs(ab[0]) * s_in * rng.uniform(0.5, 2) + 1e-3
            fa, fb = fold_scales(ab, bb, input_scale=s_in, output_scale=s_out)
            a.append(fa[0])
            b.append(fb[0])
    return a, b


def run_exhaustive(a, b, in_fmt, out_fmt, rounding, zin, zout, shared=False):
    fp = fixed_point_affine(a, b, in_fmt, out_fmt, rounding=rounding, input_zero_point=zin,
                            output_zero_point=zout, shared_shift=shared)
    lo, hi = RANGES[in_fmt]
    xs = np.arange(lo, hi + 1)
    exact = exact_outputs(ExactAffine.from_affine(a, b, zin), xs, out_fmt, rounding=rounding,
                          output_zero_point=zout)
    got = fp.apply(np.broadcast_to(xs, (len(a), xs.size)).copy(), axis=0)
    return fp, exact, got


# ----------------------------------------------------------------------------- exact reference

def test_round_fraction_rules():
    half = Fraction(1, 2)
    cases = {half: (0, 1), -half: (0, 0), 3 * half: (2, 2), -3 * half: (-2, -1),
             5 * half: (2, 3), Fraction(7, 3): (2, 2), Fraction(-7, 3): (-2, -2)}
    for t, (even, up) in cases.items():
        assert round_fraction(t, "half_even") == even
        assert round_fraction(t, "half_up") == up


def test_half_vs_even_differ_on_64_int8_inputs():
    even = reference_outputs([0.5], [0.0], INT8, "int8", rounding="half_even")[0]
    up = reference_outputs([0.5], [0.0], INT8, "int8", rounding="half_up")[0]
    assert sum(e != u for e, u in zip(even, up)) == 64


@pytest.mark.parametrize("rounding", ["half_even", "half_up"])
def test_vectorised_exact_equals_fraction_reference(rounding):
    rng = np.random.default_rng(11)
    a, b = random_channels(rng, 160)
    for zin, zout, out in ((0, 0, "int8"), (3, -5, "int8"), (-7, 131, "uint8"), (1, -1, "int4")):
        ref = np.array(reference_outputs(a, b, INT8, out, rounding=rounding,
                                         input_zero_point=zin, output_zero_point=zout))
        vec = exact_outputs(ExactAffine.from_affine(a, b, zin), INT8, out, rounding=rounding,
                            output_zero_point=zout)
        np.testing.assert_array_equal(vec, ref)


def test_exact_reference_sees_float_subtleties():
    # 0.1 is not 1/10: t = 0.1*5 is just above 1/2 (rounds up), while Fraction(1, 10)*5 ties
    assert Fraction(0.1) * 5 > Fraction(1, 2)
    assert exact_outputs(ExactAffine.from_affine([0.1], [0.0]), [5], "int8")[0, 0] == 1
    assert exact_outputs(ExactAffine.from_affine([Fraction(1, 10)], [0]), [5], "int8")[0, 0] == 0


def test_fold_scales_is_exact():
    fa, fb = fold_scales([0.3], [0.7], input_scale=0.1, output_scale=0.3)
    assert fa[0] == Fraction(0.3) * Fraction(0.1) / Fraction(0.3)
    assert fb[0] == Fraction(0.7) / Fraction(0.3)


# ----------------------------------------------------------------------- exhaustive fixed point

@pytest.mark.parametrize("rounding", ["half_even", "half_up"])
def test_int8_exhaustive_thousands_of_channels(rounding):
    rng = np.random.default_rng(1 if rounding == "half_even" else 2)
    a, b = random_channels(rng, 2000)
    fp, exact, got = run_exhaustive(a, b, "int8", "int8", rounding, 0, 0)
    np.testing.assert_array_equal(got, exact)
    assert (fp.shift == fp.min_shift).all()


@pytest.mark.parametrize("in_fmt,out_fmt,zin,zout", [
    ("int8", "uint8", 0, 129), ("int8", "int4", 3, -3), ("uint8", "int8", 131, 7),
    ("int4", "int4", 0, 1), ("int4", "int8", -3, -11), ("uint4", "uint4", 9, 5),
    ("int4", "uint8", 0, 128),
])
@pytest.mark.parametrize("rounding", ["half_even", "half_up"])
def test_formats_and_odd_zero_points(in_fmt, out_fmt, zin, zout, rounding):
    rng = np.random.default_rng(zlib.crc32(repr((in_fmt, out_fmt, zin, zout, rounding)).encode()))
    a, b = random_channels(rng, 400)
    fp, exact, got = run_exhaustive(a, b, in_fmt, out_fmt, rounding, zin, zout)
    np.testing.assert_array_equal(got, exact)


def test_fixed_point_against_fraction_reference_directly():
    rng = np.random.default_rng(5)
    a, b = random_channels(rng, 200)
    fp = fixed_point_affine(a, b, "int8", "int8", input_zero_point=-3, output_zero_point=5)
    ref = np.array(reference_outputs(a, b, INT8, "int8", input_zero_point=-3,
                                     output_zero_point=5))
    got = fp.apply(np.broadcast_to(INT8, (200, 256)).copy(), axis=0)
    np.testing.assert_array_equal(got, ref)


def test_shared_shift_is_exact_and_costs_bits():
    rng = np.random.default_rng(7)
    a, b = random_channels(rng, 300)
    per, exact, got = run_exhaustive(a, b, "int8", "int8", "half_even", 0, 0)
    shared, _, got_s = run_exhaustive(a, b, "int8", "int8", "half_even", 0, 0, shared=True)
    np.testing.assert_array_equal(got, exact)
    np.testing.assert_array_equal(got_s, exact)
    assert len(set(shared.shift.tolist())) == 1
    assert shared.shift[0] == per.min_shift.max()
    assert (shared.acc_bits() >= per.acc_bits()).all()


def test_accumulator_range():
    rng = np.random.default_rng(3)
    lo, hi = -6000, 6000
    a = list(rng.uniform(-0.06, 0.06, 16)) + [0.0, 2.0**-6, -(2.0**-7)]
    b = list(rng.normal(0, 30, 16)) + [3.5, 0.5, -0.5]
    fp = fixed_point_affine(a, b, (lo, hi), "int8", output_zero_point=-1)
    xs = np.arange(lo, hi + 1)
    exact = exact_outputs(ExactAffine.from_affine(a, b), xs, "int8", output_zero_point=-1)
    got = fp.apply(np.broadcast_to(xs, (len(a), xs.size)).copy(), axis=0)
    np.testing.assert_array_equal(got, exact)


# ------------------------------------------------------------------------------- ties, corners

def test_half_even_ties_need_the_correction():
    fp = fixed_point_affine([0.5], [0.0], "int8", "int8")
    assert int(fp.min_shift[0]) == 1 and int(fp.tie_window[0]) == 1
    # no floor of an affine map (window 0) rounds these ties half to even, at any shift
    ref = reference_outputs([0.5], [0.0], INT8, "int8")[0]
    for k in range(6):
        assert not _brute_feasible(ref, INT8, k, [0], 0, -128, 127)
    up = fixed_point_affine([0.5], [0.0], "int8", "int8", rounding="half_up")
    assert int(up.min_shift[0]) == 1 and int(up.tie_window[0]) == 0


def test_non_dyadic_ties():
    # ties at x = 1, 4, 7, ... whose rounding directions alternate: slope 1/3 is forced at the
    # ties, so only a tie window wider than one code makes it representable
    fp, exact, got = run_exhaustive([Fraction(1, 3)], [Fraction(1, 6)], "int8", "int8",
                                    "half_even", 0, 0)
    np.testing.assert_array_equal(got, exact)
    assert int(fp.tie_window[0]) > 1


@pytest.mark.parametrize("a,b", [(0.0, 0.5), (0.0, 1.5), (0.0, -0.5), (0.0, 1e9), (0.0, -3.2)])
def test_zero_slope_is_constant(a, b):
    fp, exact, got = run_exhaustive([a], [b], "int8", "int8", "half_even", 0, 0)
    np.testing.assert_array_equal(got, exact)
    assert int(fp.min_shift[0]) == 0 and int(fp.multiplier[0]) == 0


def test_negative_slope_and_full_clamping():
    a = [-1.0, -0.37, -250.0, 300.0, -1e-9]
    b = [0.0, 10.25, 0.0, -1.0, 0.5]
    fp, exact, got = run_exhaustive(a, b, "int8", "uint8", "half_even", 0, 3)
    np.testing.assert_array_equal(got, exact)
    assert int(fp.multiplier[0]) < 0


# ------------------------------------------------------------------------- certified minimality

def _targets(y: int, zout: int, qmin: int, qmax: int):
    """The integers m with clamp(m + zout) == y, as (lo, hi) with None for infinity."""
    lo = None if y <= qmin else y - zout
    hi = None if y >= qmax else y - zout
    if y >= qmax:
        lo = qmax - zout
    if y <= qmin:
        hi = qmin - zout
    return lo, hi


def _v_bounds(lo, hi, k: int, w: int):
    L = None if lo is None else lo * 2**k + w * (lo % 2)
    U = None if hi is None else (hi + 1) * 2**k - 1 + w * (1 - hi % 2)
    return L, U


def check_certificate(fp, c: int, exact_row: dict[int, int]) -> None:
    """Independently check, from exact outputs only, that shift min_shift - 1 is infeasible."""
    k = int(fp.min_shift[c]) - 1
    if k < 0:
        return
    qmin, qmax = fp.output_range
    zout = fp.output_zero_point
    levels = [entry[0] for entry in fp.proof[c]]
    assert levels == [0] + list(range(1, k + 1)), levels  # every window allowed at shift k
    for s, (x1, x1p), (x2, x2p) in fp.proof[c]:
        w = 0 if s == 0 else 2 ** (k - s)
        assert x1 > x1p and x2 < x2p
        L1, _ = _v_bounds(*_targets(exact_row[x1], zout, qmin, qmax), k, w)
        _, U1 = _v_bounds(*_targets(exact_row[x1p], zout, qmin, qmax), k, w)
        L2, _ = _v_bounds(*_targets(exact_row[x2], zout, qmin, qmax), k, w)
        _, U2 = _v_bounds(*_targets(exact_row[x2p], zout, qmin, qmax), k, w)
        assert None not in (L1, U1, L2, U2)
        # M·x1 + C >= L1 and M·x1p + C <= U1  =>  M >= ceil((L1 - U1) / (x1 - x1p))
        m_lo = -((U1 - L1) // (x1 - x1p))
        # M·x2 + C >= L2 and M·x2p + C <= U2  =>  M <= floor((U2 - L2) / (x2p - x2))
        m_hi = (U2 - L2) // (x2p - x2)
        assert m_lo > m_hi, (c, s)


def test_certificates_of_minimal_shift_int8():
    rng = np.random.default_rng(21)
    a, b = random_channels(rng, 600)
    fp = fixed_point_affine(a, b, "int8", "int8", output_zero_point=1)
    ref = reference_outputs(a, b, INT8, "int8", output_zero_point=1)
    for c in range(len(a)):
        check_certificate(fp, c, dict(zip(INT8.tolist(), ref[c])))


def _brute_feasible(y, xs, k, windows, zout, qmin, qmax) -> bool:
    span = max(y) - min(y) + 2
    Ms = np.arange(-(span + 2) * 2**k - 2, (span + 2) * 2**k + 3, dtype=np.int64)
    for w in windows:
        L = np.full(len(xs), -(2**60), dtype=np.int64)
        U = np.full(len(xs), 2**60, dtype=np.int64)
        for i, yy in enumerate(y):
            lb, ub = _v_bounds(*_targets(yy, zout, qmin, qmax), k, w)
            if lb is not None:
                L[i] = lb
            if ub is not None:
                U[i] = ub
        Mx = Ms[:, None] * np.asarray(xs)[None, :]
        if ((L[None, :] - Mx).max(1) <= (U[None, :] - Mx).min(1)).any():
            return True
    return False


@pytest.mark.parametrize("rounding", ["half_even", "half_up"])
def test_minimal_shift_by_brute_force_int4(rounding):
    """Every (M, C) and every power-of-two window at k* - 1 fails; the found one at k* works."""
    rng = np.random.default_rng(8 if rounding == "half_even" else 9)
    a, b = random_channels(rng, 80)
    # plus channels whose output spans the int4 range, where k* is largest
    a += list(rng.choice([-1, 1], 80) * rng.uniform(0.05, 1.5, 80))
    b += list(rng.normal(0, 3, 80))
    zout = 1
    fp = fixed_point_affine(a, b, "int4", "int4", rounding=rounding, output_zero_point=zout)
    ref = reference_outputs(a, b, INT4, "int4", rounding=rounding, output_zero_point=zout)
    got = fp.apply(np.broadcast_to(INT4, (len(a), 16)).copy(), axis=0)
    np.testing.assert_array_equal(got, np.array(ref))
    positive = 0
    for c in range(len(a)):
        k = int(fp.min_shift[c])
        if k == 0:
            continue
        positive += 1
        windows = [0] + [2**j for j in range(k - 1)]
        assert not _brute_feasible(ref[c], INT4, k - 1, windows, zout, -8, 7), c
    assert positive > 80


# ------------------------------------------------------------------------- the integer rule

def test_fixed_point_round_definition():
    v = np.arange(-300, 300, dtype=np.int64)
    for k in range(0, 6):
        for w in [0] + [2**j for j in range(k)]:
            got = fixed_point_round(v, k, w)
            for vi, g in zip(v.tolist(), got.tolist()):
                q, r = vi // 2**k, vi % 2**k
                assert g == q - (1 if (r < w and q % 2 == 1) else 0)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(0, 12), j=st.integers(0, 12), v=st.integers(-(2**40), 2**40))
def test_doubling_preserves_the_rule(k, j, v):
    w = 0 if j >= k else 2**j
    assert fixed_point_round(np.int64(v), k, w) == fixed_point_round(np.int64(2 * v), k + 1,
                                                                     2 * w)


@settings(max_examples=40, deadline=None)
@given(a=st.floats(-64, 64, allow_nan=False), b=st.floats(-300, 300, allow_nan=False),
       zin=st.integers(-10, 10), zout=st.integers(-10, 10),
       rounding=st.sampled_from(["half_even", "half_up"]),
       out=st.sampled_from(["int8", "uint8", "int4"]))
def test_property_exact_for_any_float_channel(a, b, zin, zout, rounding, out):
    fp, exact, got = run_exhaustive([a], [b], "int8", out, rounding, zin, zout)
    np.testing.assert_array_equal(got, exact)


# -------------------------------------------------------------------------------- bad input

def test_bad_arguments():
    with pytest.raises(ValueError, match="rounding"):
        fixed_point_affine([1.0], [0.0], "int8", "int8", rounding="nearest")
    with pytest.raises(TypeError, match="input_range"):
        fixed_point_affine([1.0], [0.0], 8, "int8")
    with pytest.raises(ValueError, match="input_range"):
        fixed_point_affine([1.0], [0.0], (5, 1), "int8")
    with pytest.raises(TypeError, match="output_zero_point"):
        fixed_point_affine([1.0], [0.0], "int8", "int8", output_zero_point=0.5)
    with pytest.raises(ValueError, match="finite"):
        fixed_point_affine([float("nan")], [0.0], "int8", "int8")
    with pytest.raises(ValueError, match="channel"):
        fixed_point_affine([1.0, 2.0, 3.0], [0.0, 1.0], "int8", "int8")
    fp = fixed_point_affine([1.0], [0.0], "int8", "int8")
    with pytest.raises(ValueError, match="input range"):
        fp.apply(np.array([[200]]))
    with pytest.raises(TypeError, match="integer"):
        fp.apply(np.array([[0.5]]))


def test_wide_accumulator_range_exhaustive_per_channel():
    """A 21-bit accumulator bound: exact on every one of its 2^21 + 1 inputs."""
    lo, hi = -(2**20), 2**20
    a = [3.1e-4, -7.7e-5, 2.0**-12]
    b = [12.3, -40.0, 0.5]
    fp = fixed_point_affine(a, b, (lo, hi), "int8", output_zero_point=3)
    xs = np.arange(lo, hi + 1)
    for c in range(len(a)):
        exact = exact_outputs(ExactAffine.from_affine([a[c]], [b[c]]), xs, "int8",
                              output_zero_point=3)[0]
        M, C, k, w = (int(v[c]) for v in (fp.multiplier, fp.offset, fp.shift, fp.tie_window))
        got = np.clip(fixed_point_round(M * xs + C, k, w) + 3, -128, 127)
        np.testing.assert_array_equal(got, exact)


def test_run_ends_by_formula_equal_run_ends_by_enumeration():
    from lowbit.integer.fixed_point import _reduced_inputs

    rng = np.random.default_rng(31)
    a, b = random_channels(rng, 40)
    a += [x / 200 for x in a[:40]]
    b += b[:40]
    aff = ExactAffine.from_affine(a, b)
    for c in range(len(a)):
        for rounding, zout, out in (("half_even", 0, (-128, 127)), ("half_up", 3, (0, 255))):
            by_formula = _reduced_inputs(aff, c, (-30000, 30000), out, zout, rounding,
                                         enumerate_limit=0)
            by_scan = _reduced_inputs(aff, c, (-30000, 30000), out, zout, rounding,
                                      enumerate_limit=1 << 30)
            np.testing.assert_array_equal(by_formula, by_scan)


def test_huge_accumulator_range_is_cheap():
    lo, hi = -(2**40), 2**40
    a, b = [3e-11, -1e-9], [0.25, 7.0]
    with pytest.raises(ValueError, match="max_shift"):
        fixed_point_affine(a, b, (lo, hi), "int8", max_shift=40)
    fp = fixed_point_affine(a, b, (lo, hi), "int8", max_shift=150)
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.integers(lo, hi, 20000), [lo, hi, 0, -1, 1]])
    exact = exact_outputs(ExactAffine.from_affine(a, b), xs, "int8")
    np.testing.assert_array_equal(fp.apply(np.stack([xs, xs]), axis=0), exact)
    assert (fp.acc_bits() > 64).all()  # beyond int64: apply() switched to Python integers
