"""Requantization schemes of today's runtimes, each checked against its own exact definition,
and compared with the exact result (the certified fixed point never differs)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.integer import ExactAffine, exact_outputs, fixed_point_affine
from lowbit.integer.ops import (
    Requantizer,
    accumulator_bounds,
    int_conv2d,
    int_linear,
    make_requantizer,
    requant_coefficients,
)
from lowbit.integer.requant import (
    SCHEMES,
    disagreements,
    quantize_multiplier,
    requantize,
    rounded_fixed_point_min_shift,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)

INT8 = np.arange(-128, 128)
I32 = st.integers(-(2**31), 2**31 - 1)


def _floor_half_up(f: Fraction) -> int:
    return math.floor(f + Fraction(1, 2))


def _half_away(f: Fraction) -> int:
    n = math.floor(abs(f) + Fraction(1, 2))
    return n if f >= 0 else -n


# ----------------------------------------------------------------- gemmlowp building blocks

@settings(max_examples=300, deadline=None)
@given(a=I32, b=I32)
def test_srdhm_is_round_half_up_of_the_doubled_high_product(a, b):
    got = int(saturating_rounding_doubling_high_mul(np.array([a]), b)[0])
    if a == b == -(2**31):
        assert got == 2**31 - 1
    else:
        assert got == _floor_half_up(Fraction(a * b, 2**31))


@settings(max_examples=300, deadline=None)
@given(x=I32, e=st.integers(0, 31))
def test_rounding_divide_by_pot_is_half_away_from_zero(x, e):
    assert int(rounding_divide_by_pot(np.array([x]), e)[0]) == _half_away(Fraction(x, 2**e))


@settings(max_examples=200, deadline=None)
@given(m=st.floats(1e-9, 1e4) | st.floats(-1e4, -1e-9))
def test_quantize_multiplier(m):
    q, shift = quantize_multiplier(m)
    assert 2**30 <= abs(q) < 2**31
    approx = Fraction(q) * Fraction(2) ** (shift - 31)
    assert abs(approx - Fraction(m)) <= abs(Fraction(m)) * Fraction(1, 2**30)
    assert quantize_multiplier(0.0) == (0, 0)


def test_gemmlowp_double_rounding_bias():
    # x·0.5·2^-1 = n + 1/4 exactly: the first rounding makes 2n + 1/2 -> 2n + 1, the second
    # (2n + 1)/2 -> n + 1, where the exact result is n
    q, shift = quantize_multiplier(0.25)
    assert (q, shift) == (2**30, -1)
    x = np.array([4 * n + 1 for n in range(0, 40)])
    got = requantize("gemmlowp", [0.25], [0.0], x, (-(2**20), 2**20))[0]
    single = requantize("tflite_single_rounding", [0.25], [0.0], x, (-(2**20), 2**20))[0]
    exact = np.array([math.floor(Fraction(int(v), 4) + Fraction(1, 2)) for v in x])
    assert (got == exact + 1).all()
    np.testing.assert_array_equal(single, exact)


@settings(max_examples=60, deadline=None)
@given(m=st.floats(1e-5, 20.0), xs=st.lists(st.integers(-(2**20), 2**20), min_size=1,
                                             max_size=20))
def test_single_rounding_is_one_rounding(m, xs):
    q, shift = quantize_multiplier(m)
    got = requantize("tflite_single_rounding", [m], [0.0], xs, (-(2**40), 2**40))[0]
    want = [_floor_half_up(Fraction(x * q) * Fraction(2) ** (shift - 31)) for x in xs]
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------- float schemes

def test_float32_scheme_matches_torch_float32():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 0.5, 64), rng.normal(0, 20, 64)
    got = requantize("float32", a, b, INT8, "int8", input_zero_point=3, output_zero_point=-2)
    ta = torch.tensor(a, dtype=torch.float32)[:, None]
    tb = torch.tensor(b, dtype=torch.float32)[:, None]
    tx = torch.tensor(INT8 - 3, dtype=torch.float32)[None, :]
    want = torch.clamp(torch.round(ta * tx + tb) - 2, -128, 127).to(torch.int64).numpy()
    np.testing.assert_array_equal(got, want)


def test_divisor_scheme_definition():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 0.5, 8), rng.normal(0, 20, 8)
    got = requantize("divisor_2_24", a, b, INT8, (-(2**20), 2**20))
    for c in range(8):
        mul = round(Fraction(a[c]) * 2**24)
        add = round(Fraction(b[c]) * 2**24) + 2**23
        want = [math.floor(Fraction(mul * int(x) + add, 2**24)) for x in INT8]
        np.testing.assert_array_equal(got[c], want)


def test_rounded_fixed_point_is_exactly_rounded_shift():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 0.5, 8), rng.normal(0, 20, 8)
    for rounding in ("half_even", "half_up"):
        got = requantize("rounded_fixed_point", a, b, INT8, (-(2**20), 2**20), shift=5,
                         rounding=rounding)
        for c in range(8):
            M, C = round(Fraction(a[c]) * 32), round(Fraction(b[c]) * 32)
            if rounding == "half_even":
                want = [round(Fraction(M * int(x) + C, 32)) for x in INT8]
            else:
                want = [_floor_half_up(Fraction(M * int(x) + C, 32)) for x in INT8]
            np.testing.assert_array_equal(got[c], want)


# ---------------------------------------------------------------- comparison with exact

def test_rounding_to_nearest_never_beats_the_certified_shift():
    """Rounded (M, C) with an exact rounding shift is one member of the certified family, so
    the shift at which it first becomes exact is never below the certified minimum."""
    rng = np.random.default_rng(3)
    a = list(rng.choice([-1, 1], 300) * np.exp(rng.uniform(-4, 1, 300)))
    b = list(rng.normal(0, 20, 300))
    a += [0.5, 0.25, 0.75, 0.0]
    b += [0.0, 0.5, -0.125, 2.5]
    for rounding in ("half_even", "half_up"):
        fp = fixed_point_affine(a, b, "int8", "int8", rounding=rounding)
        naive = rounded_fixed_point_min_shift(a, b, INT8, "int8", rounding=rounding)
        assert (naive >= 0).all()
        assert (naive >= fp.min_shift).all()
        assert disagreements(a, b, "int8", "int8", rounding=rounding, shift=naive,
                             schemes=["rounded_fixed_point"])["rounded_fixed_point"] == 0


def test_disagreement_table_counts():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 0.4, 200), rng.normal(0, 20, 200)
    table = disagreements(a, b, "int8", "int8", shift=np.full(200, 6))
    assert set(table) == {"certified", *SCHEMES}
    assert table["certified"] == 0
    # recount one scheme by hand
    exact = exact_outputs(ExactAffine.from_affine(a, b), INT8, "int8")
    got = requantize("divisor_2_24", a, b, INT8, "int8")
    assert table["divisor_2_24"] == int((got != exact).sum())
    # rounding M and C at a shift of 6 is far too coarse for these channels
    assert table["rounded_fixed_point"] > 0


def test_accumulator_requantization_is_exact():
    rng = np.random.default_rng(5)
    lo, hi = -(2**13), 2**13
    a = rng.uniform(0.002, 0.05, 12) * rng.choice([-1, 1], 12)
    b = rng.normal(0, 40, 12)
    table = disagreements(a, b, (lo, hi), "uint8", output_zero_point=128,
                          schemes=["certified", "float64"])
    assert table["certified"] == 0


def test_bad_scheme():
    with pytest.raises(ValueError, match="scheme"):
        requantize("fbgemm", [1.0], [0.0], INT8, "int8")
    with pytest.raises(ValueError, match="shift"):
        requantize("rounded_fixed_point", [1.0], [0.0], INT8, "int8")


# ------------------------------------------------------------- integer GEMM and convolution

def available_backends() -> list[str]:
    """The kernel paths to compare: pure torch, and the compiled one where it builds."""
    from lowbit.integer import _ext

    return ["torch"] + (["compiled"] if _ext.extension() is not None else [])


def _layer(rng, o, k_in, x_range, zx, out_range, zout, with_bn=True):
    w = torch.tensor(rng.integers(-127, 128, (o,) + k_in), dtype=torch.int8)
    s_w = rng.uniform(0.002, 0.02, o)
    bias = rng.normal(0, 0.3, o)
    g = rng.normal(1, 0.5, o) if with_bn else None
    h = rng.normal(0, 0.5, o) if with_bn else None
    a, b = requant_coefficients(0.02, s_w, 0.05, bias=bias, bn_scale=g, bn_shift=h)
    rq, fp = make_requantizer(w, a, b, input_range=x_range, input_zero_point=zx,
                              output_range=out_range, output_zero_point=zout)
    return w, a, b, rq, fp


def _exact_from_acc(acc: np.ndarray, a, b, out_range, zout) -> np.ndarray:
    """Exact outputs for accumulators ``acc [rows, O]``: the rational reference per channel."""
    out = np.empty_like(acc)
    for c in range(acc.shape[1]):
        out[:, c] = exact_outputs(ExactAffine.from_affine([a[c]], [b[c]]), acc[:, c], out_range,
                                  output_zero_point=zout)[0]
    return out


@pytest.mark.parametrize("x_fmt,zx,out_fmt,zout", [
    ("uint8", 131, "uint8", 0), ("int8", -3, "int8", 5), ("int4", 1, "int4", -1),
])
def test_int_linear_bit_exact(x_fmt, zx, out_fmt, zout):
    rng = np.random.default_rng(6)
    lo, hi = {"uint8": (0, 255), "int8": (-128, 127), "int4": (-8, 7)}[x_fmt]
    w, a, b, rq, fp = _layer(rng, 24, (50,), x_fmt, zx, out_fmt, zout)
    x_np = rng.integers(lo, hi + 1, (64, 50))
    dt = torch.uint8 if x_fmt == "uint8" else torch.int8
    got = int_linear(torch.tensor(x_np, dtype=dt), w, rq, input_zero_point=zx, backend="torch")
    for backend in available_backends():
        np.testing.assert_array_equal(
            int_linear(torch.tensor(x_np, dtype=dt), w, rq, input_zero_point=zx,
                       backend=backend).numpy(), got.numpy())
    assert got.dtype == (torch.uint8 if out_fmt == "uint8" else torch.int8)
    acc = (x_np - zx) @ w.numpy().astype(np.int64).T
    want = _exact_from_acc(acc, a, b, out_fmt, zout)
    np.testing.assert_array_equal(got.numpy().astype(np.int64), want)
    # and through the plain Fraction definition on a few entries
    for r, c in [(0, 0), (5, 7), (63, 23)]:
        f = a[c] * int(acc[r, c]) + b[c]
        assert int(got[r, c]) == min(max(round(f) + zout, fp.output_range[0]),
                                     fp.output_range[1])


@pytest.mark.parametrize("stride,padding,dilation,groups", [
    (1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 2, 1), (2, 0, 1, 2),
])
def test_int_conv2d_bit_exact(stride, padding, dilation, groups):
    rng = np.random.default_rng(7)
    zx = 77
    cin, o = 6, 8
    w, a, b, rq, fp = _layer(rng, o, (cin // groups, 3, 3), "uint8", zx, "int8", -2)
    x_np = rng.integers(0, 256, (2, cin, 9, 11))
    got = int_conv2d(torch.tensor(x_np, dtype=torch.uint8), w, rq, input_zero_point=zx,
                     stride=stride, padding=padding, dilation=dilation, groups=groups,
                     backend="torch")
    for backend in available_backends():
        other = int_conv2d(torch.tensor(x_np, dtype=torch.uint8), w, rq, input_zero_point=zx,
                           stride=stride, padding=padding, dilation=dilation, groups=groups,
                           backend=backend)
        np.testing.assert_array_equal(other.numpy(), got.numpy())
    # independent accumulators: float64 convolution of (x - z) (exact for these sizes)
    acc = torch.nn.functional.conv2d(torch.tensor(x_np - zx, dtype=torch.float64),
                                     w.to(torch.float64), stride=stride, padding=padding,
                                     dilation=dilation, groups=groups)
    acc = acc.round().to(torch.int64).permute(0, 2, 3, 1).reshape(-1, o).numpy()
    want = _exact_from_acc(acc, a, b, "int8", -2)
    np.testing.assert_array_equal(got.permute(0, 2, 3, 1).reshape(-1, o).numpy(), want)


def test_requantizer_matches_numpy_rule():
    rng = np.random.default_rng(8)
    a, b = list(rng.normal(0, 0.01, 16)), list(rng.normal(0, 20, 16))
    fp = fixed_point_affine(a, b, (-30000, 30000), "uint8", output_zero_point=128)
    rq = Requantizer.from_fixed_point(fp)
    acc = rng.integers(-30000, 30001, (100, 16))
    for backend in available_backends():
        np.testing.assert_array_equal(
            rq(torch.tensor(acc, dtype=torch.int32), backend=backend).numpy(),
            fp.apply(acc, axis=1))


def test_requantizer_ties_and_windows():
    """Channels whose exact ties need the tie window, through the torch kernel."""
    a = [0.5, 0.25, -0.75, Fraction(1, 3), Fraction(2, 5), 0.0]
    b = [0.0, 0.5, 0.25, Fraction(1, 6), Fraction(1, 10), 2.5]
    lo, hi = -2000, 2000
    xs = np.arange(lo, hi + 1)
    for out in ((-(2**15), 2**15 - 1), "int8"):
        fp = fixed_point_affine(a, b, (lo, hi), out)
        assert (fp.tie_window.astype(int) > 0).sum() >= 4
        rq = Requantizer.from_fixed_point(fp)
        want = exact_outputs(ExactAffine.from_affine(a, b), xs, out)
        for backend in available_backends() if out == "int8" else ["torch"]:
            acc = torch.tensor(np.stack([xs] * len(a), 1), dtype=torch.int32)
            got = rq(acc, dim=1, backend=backend).numpy().T
            np.testing.assert_array_equal(got, want)
            got_t = rq(acc.t().contiguous(), dim=0, backend=backend).numpy()
            np.testing.assert_array_equal(got_t, want)
            off = torch.arange(len(a), dtype=torch.int64) * 7 - 20
            got_o = rq(acc + off.to(torch.int32), dim=1, backend=backend, acc_offset=off)
            np.testing.assert_array_equal(got_o.numpy().T, want)


def test_integer_kernels_run_no_float_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Dtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat = out if isinstance(out, (tuple, list)) else [out]
            ins = [t for t in args if isinstance(t, torch.Tensor)]
            self.seen += [(str(func), t.dtype) for t in [*flat, *ins]
                          if isinstance(t, torch.Tensor)]
            return out

    rng = np.random.default_rng(9)
    w, a, b, rq, _ = _layer(rng, 8, (4, 3, 3), "uint8", 10, "uint8", 3)
    x = torch.tensor(rng.integers(0, 256, (1, 4, 6, 6)), dtype=torch.uint8)
    wl, al, bl, rql, _ = _layer(rng, 5, (8 * 36,), "uint8", 3, "int8", 0)
    with Dtypes() as mode:
        y = int_conv2d(x, w, rq, input_zero_point=10, padding=1)
        int_linear(y.reshape(1, -1), wl, rql, input_zero_point=3)
    assert len(mode.seen) > 10
    floats = [(f, d) for f, d in mode.seen if d.is_floating_point or d.is_complex]
    assert not floats, floats[:5]


def test_kernel_bad_input():
    rng = np.random.default_rng(10)
    w, a, b, rq, _ = _layer(rng, 4, (6,), "int8", 0, "int8", 0)
    with pytest.raises(TypeError, match="int8 or uint8"):
        int_linear(torch.zeros(2, 6), w, rq, input_zero_point=0)
    with pytest.raises(TypeError, match="weight"):
        int_linear(torch.zeros(2, 6, dtype=torch.int8), w.to(torch.int32), rq,
                   input_zero_point=0)
    with pytest.raises(ValueError, match="zero_point"):
        accumulator_bounds(w, "int8", 200)
    with pytest.raises(TypeError, match="integer"):
        rq(torch.zeros(3, 4))
