"""lowbit.formats: format definitions, names, and rounding (checked against torch's own casts
and an independent brute-force rounding over each format's value grid)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import (
    BinaryFormat,
    FloatFormat,
    IntFormat,
    TernaryFormat,
    draw_seed,
    get_format,
    random_bits31,
    round_nearest_even,
    round_to_float_format,
    stochastic_round,
)

TORCH_FLOATS = {
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}


# ---------------------------------------------------------------- names and parameters
@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("narrow", [False, True])
def test_int_format_ranges(bits, signed, narrow):
    f = IntFormat(bits, signed, narrow)
    if signed:
        assert (f.qmin, f.qmax) == (-(2 ** (bits - 1)) + narrow, 2 ** (bits - 1) - 1)
    else:
        assert (f.qmin, f.qmax) == (0, 2**bits - 1 - narrow)
    assert f.bits == bits
    assert get_format(f.name) == f


@pytest.mark.parametrize(
    "name, bits",
    [("binary", 1), ("binary-scaled", 1), ("ternary", 2), ("ternary-unscaled", 2),
     ("e5m2", 8), ("e4m3", 8), ("e3m2", 6), ("fp16", 16), ("bf16", 16), ("fp32", 32),
     ("int8", 8), ("uint4", 4), ("int2", 2)],
)
def test_names_round_trip(name, bits):
    f = get_format(name)
    assert f.bits == bits
    assert get_format(f.name) == f
    assert get_format(f) is f


@pytest.mark.parametrize("name", list(TORCH_FLOATS))
def test_float_format_constants_match_torch(name):
    f = get_format(name)
    info = torch.finfo(TORCH_FLOATS[name])
    assert f.max == info.max
    assert f.min_normal == info.tiny
    assert f.min_subnormal == info.smallest_normal * info.eps  # 2^(emin - M)


def test_e5m2_matches_the_fp8_paper_and_e4m3_is_ocp_fn():
    e5m2, e4m3 = get_format("e5m2"), get_format("e4m3")
    assert (e5m2.bias, e5m2.max, e5m2.min_normal, e5m2.min_subnormal) == (
        15, 57344.0, 2.0**-14, 2.0**-16)
    assert e4m3.finite and not e5m2.finite
    assert (e4m3.bias, e4m3.max, e4m3.min_subnormal) == (7, 448.0, 2.0**-9)
    assert get_format("e4m3-ieee").max == 240.0  # generic IEEE-style e4m3 reserves the top exponent
    assert get_format("e3m2").max == 14.0


def test_binary_ternary_defaults():
    assert get_format("binary") == BinaryFormat() and not BinaryFormat().scaled
    assert get_format("ternary") == TernaryFormat(0.7, scaled=True)
    assert get_format("ternary@0.5").threshold == 0.5


@pytest.mark.parametrize(
    "bad, match",
    [("int1", "bits must be in 2..16"), ("uint17", "bits must be in 2..16"),
     ("e9m2", "exp_bits must be in 2..8"), ("e5m24", "man_bits must be in 0..23"),
     ("float8", "unknown format"), ("", "unknown format")],
)
def test_unknown_formats_list_valid_names(bad, match):
    with pytest.raises(ValueError, match=match) as err:
        get_format(bad)
    assert "int2..int16" in str(err.value) and "e5m2" in str(err.value)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="bits"):
        IntFormat(1)
    with pytest.raises(TypeError, match="bits"):
        IntFormat(8.0)
    with pytest.raises(ValueError, match="exp_bits"):
        FloatFormat(1, 3)
    with pytest.raises(ValueError, match="threshold"):
        TernaryFormat(float("nan"))
    with pytest.raises(TypeError, match="fmt"):
        get_format(8)


# ---------------------------------------------------------------- minifloat rounding
def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns except that any NaN equals any NaN."""
    a, b = a.float(), b.float()
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    return torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_all_fp8_codes_and_midpoints_match_torch(name):
    f, dt = get_format(name), TORCH_FLOATS[name]
    codes = torch.arange(256, dtype=torch.uint8).view(dt).float()
    vals = codes[torch.isfinite(codes)].unique()
    assert _bits_equal(round_to_float_format(vals, f), vals)  # grid points stay put
    mids = (vals[1:].double() + vals[:-1].double()) / 2  # ties: must go to the even code
    probes = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    probes = probes.float()
    probes = probes[probes.abs() <= f.max]
    assert _bits_equal(round_to_float_format(probes, f), probes.to(dt).float())


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "fp16", "bf16"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-30, 20))
def test_random_float32_match_torch_casts_inside_range(name, seed, log_scale):
    f, dt = get_format(name), TORCH_FLOATS[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, generator=g) * 2.0**log_scale
    x = x[x.abs() <= f.max]
    assert _bits_equal(round_to_float_format(x, f), x.to(dt).float())


def test_all_fp16_inputs_to_e5m2_match_torch():
    x = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = x[x.float().abs() <= 57344]
    assert _bits_equal(round_to_float_format(x, get_format("e5m2")), x.to(torch.float8_e5m2))


def test_saturation_nan_and_signed_zero():
    f = get_format("e5m2")
    x = torch.tensor([6.2e4, 1e9, float("inf"), -float("inf"), float("nan"), -0.0, -1e-30])
    y = round_to_float_format(x, f)
    assert y[:4].tolist() == [57344.0, 57344.0, 57344.0, -57344.0]
    assert math.isnan(y[4]) and y[5].item() == 0 and y[6].item() == 0
    assert math.copysign(1, y[5]) == -1 and math.copysign(1, y[6]) == -1
    y = round_to_float_format(x, f, saturate=False)
    assert y[:4].tolist() == [float("inf"), float("inf"), float("inf"), -float("inf")]


def _grid(f: FloatFormat) -> list[float]:
    """All non-negative finite values of f, by decoding every bit pattern (independent of the
    rounding code), sorted; mantissa codes give the tie-breaking parity."""
    vals = []
    for e in range(2**f.exp_bits):
        for m in range(2**f.man_bits):
            if e == 2**f.exp_bits - 1 and (not f.finite or m == 2**f.man_bits - 1):
                continue  # inf/NaN codes
            if e == 0:
                v = m * 2.0 ** (f.emin - f.man_bits)
            else:
                v = (1 + m / 2**f.man_bits) * 2.0 ** (e - f.bias)
            vals.append((v, m))
    return vals


def _brute_round(v: float, grid: list[tuple[float, int]], fmax: float) -> float:
    a = abs(v)
    best = min(grid, key=lambda g: (abs(g[0] - a), g[1] % 2))  # nearest, ties to even code
    return math.copysign(min(best[0], fmax), v)


@pytest.mark.parametrize("name", ["e3m2", "e2m1", "e4m3", "e4m3-ieee", "e5m0", "e2m3", "e3m4"])
def test_generic_minifloats_match_brute_force(name):
    f = get_format(name)
    grid = _grid(f)
    assert max(v for v, _ in grid) == f.max
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(300, generator=g) * f.max / 4,
                   torch.randn(200, generator=g) * f.min_normal,
                   torch.tensor([v for v, _ in grid]) * 1.0001])
    y = round_to_float_format(x.double(), f)
    want = torch.tensor([_brute_round(v, grid, f.max) for v in x.double().tolist()],
                        dtype=torch.float64)
    assert torch.equal(y, want)


def test_float64_input_is_rounded_once():
    # 1 + 2^-4 + 2^-30 lies above the e4m3 midpoint 1.0625: exact rounding gives 1.125, while
    # torch's cast first rounds to float32 (landing on the midpoint) and then to even (1.0).
    x = torch.tensor([1 + 2**-4 + 2**-30], dtype=torch.float64)
    assert round_to_float_format(x, get_format("e4m3")).item() == 1.125
    assert x.to(torch.float8_e4m3fn).double().item() == 1.0


# ---------------------------------------------------------------- integer / stochastic rounding
def _splitmix64_top31(seed: int, i: int) -> int:
    mask = 2**64 - 1
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 33


@pytest.mark.parametrize("seed", [0, 1, -1, 2**63 - 1, -(2**63), 123456789123456789])
def test_random_bits31_is_splitmix64(seed):
    r = random_bits31(seed, (3, 7))
    want = [_splitmix64_top31(seed % 2**64, i) for i in range(21)]
    assert r.reshape(-1).tolist() == want
    assert r.dtype == torch.int64


def test_random_bits31_uniform():
    r = random_bits31(draw_seed(torch.Generator().manual_seed(0)), (2**16,))
    assert int(r.min()) >= 0 and int(r.max()) < 2**31
    counts = torch.bincount(r >> 27, minlength=16).double()  # 16 equal bins
    chi2 = ((counts - 4096) ** 2 / 4096).sum().item()
    assert chi2 < 50  # chi-square, 15 dof: P(chi2 > 50) ~ 1e-5


def test_round_nearest_even_ties():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999])
    assert round_nearest_even(x).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 2.0]


def test_draw_seed_reproducible_and_checked():
    assert draw_seed(torch.Generator().manual_seed(5)) == draw_seed(torch.Generator().manual_seed(5))
    assert draw_seed(torch.Generator().manual_seed(5)) != draw_seed(torch.Generator().manual_seed(6))
    with pytest.raises(TypeError, match="generator"):
        draw_seed(5)


@pytest.mark.parametrize("value", [0.3, -2.75, 7.0, 1e-6, -0.5])
def test_stochastic_round_unbiased_and_neighbours_only(value):
    n = 200_000
    x = torch.full((n,), value, dtype=torch.float64)
    y = stochastic_round(x, torch.Generator().manual_seed(3))
    lo, hi = math.floor(value), math.ceil(value)
    assert set(y.unique().tolist()) <= {lo, hi}
    p = value - lo
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(y.mean().item() - value) <= 5 * sd + 1e-12  # 5 sigma of the binomial mean


def test_stochastic_round_reproducible():
    x = torch.randn(1000) * 10
    a = stochastic_round(x, torch.Generator().manual_seed(9))
    b = stochastic_round(x, torch.Generator().manual_seed(9))
    c = stochastic_round(x, torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ["e5m2", "e4m3", "e3m2", "fp16", "bf16"])
def test_stochastic_float_rounding_unbiased(name):
    f = get_format(name)
    n = 100_000
    g = torch.Generator().manual_seed(4)
    # one value in the normal range and one in the subnormal range, both off the grid
    for v in (1.3 * f.min_normal * 7.77, 0.37 * f.min_normal):
        x = torch.full((n,), v, dtype=torch.float64)
        y = round_to_float_format(x, f, "stochastic", generator=g)
        lo = round_to_float_format(torch.tensor([v]), f, "nearest").item()
        vals = sorted(y.unique().tolist())
        assert len(vals) == 2 and vals[0] <= v <= vals[1]
        assert lo in vals
        p = (v - vals[0]) / (vals[1] - vals[0])
        sd = (vals[1] - vals[0]) * math.sqrt(p * (1 - p) / n)
        assert abs(y.mean().item() - v) <= 5 * sd


def test_stochastic_float_rounding_keeps_grid_points():
    f = get_format("e5m2")
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e5m2).float()
    vals = codes[torch.isfinite(codes)]
    y = round_to_float_format(vals, f, "stochastic", generator=torch.Generator().manual_seed(0))
    assert _bits_equal(y, vals)
