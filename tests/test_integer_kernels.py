"""The compiled int8 convolution (AVX-512 VNNI, requantization in the epilogue) against the
pure-torch path and the exact rational reference, bit for bit.

Every test of the compiled kernel skips where it cannot build or the CPU lacks VNNI; the
pure-torch path of :class:`Conv2dKernel` is tested everywhere.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from lowbit.integer import _ext
from lowbit.integer.exact import ExactAffine, exact_outputs
from lowbit.integer.ops import (
    Conv2dKernel,
    Requantizer,
    ResidualEpilogue,
    int_conv2d,
    make_requantizer,
)

RANGES = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


def _vnni() -> bool:
    return _ext.vnni() is not None


needs_vnni = pytest.mark.skipif(not _vnni(), reason="no AVX-512 VNNI kernel on this machine")


def _acc_exact(x: Tensor, w: Tensor, z: int, stride, padding, dilation) -> Tensor:
    """``sum w·(x - z)`` per output (int64 NCHW) through float64, exact at these magnitudes."""
    acc = F.conv2d(x.to(torch.float64) - z, w.to(torch.float64), None, stride, padding, dilation)
    return acc.to(torch.int64)



def _layer(rng: np.random.Generator, n, c, o, h, w_, k, xdt, z, outdt, zout):
    """Random int8 weights, inputs and a certified requantization with exact rational a, b."""
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    lo, hi = RANGES[xdt]
    x = torch.randint(lo, hi + 1, (n, c, h, w_), generator=g, dtype=torch.int16).to(xdt)
    w = torch.randint(-128, 128, (o, c, k, k), generator=g, dtype=torch.int16).to(torch.int8)
    # slopes around one output step per 2^8..2^14 accumulator units, half of them negative;
    # small denominators put exact ties in reach
    a = [Fraction(int(rng.integers(1, 200)) * int(rng.choice([-1, 1])),
                  2 ** int(rng.integers(12, 20))) for _ in range(o)]
    b = [Fraction(int(rng.integers(-300, 300)), int(rng.choice([1, 2, 3, 7]))) for _ in range(o)]
    if outdt == torch.int32:
        orange = (-(2**20), 2**20)
    else:
        orange = RANGES[outdt]
    rq, _ = make_requantizer(w, a, b, input_range=(lo, hi), input_zero_point=z,
                             output_range=orange, output_zero_point=zout, dtype=outdt)
    return x, w, rq, a, b, orange


@st.composite
def conv_cases(draw):
    return dict(
        n=draw(st.sampled_from([1, 2, 3])),
        c=draw(st.sampled_from([1, 3, 4, 5, 16, 17, 33])),
        o=draw(st.sampled_from([1, 7, 16, 20, 32, 33, 64])),
        h=draw(st.integers(1, 9)),
        w_=draw(st.integers(1, 9)),
        k=draw(st.sampled_from([1, 3])),
        stride=draw(st.sampled_from([1, 2])),
        padding=draw(st.sampled_from([0, 1, 2])),
        dilation=draw(st.sampled_from([1, 1, 2])),
        xdt=draw(st.sampled_from([torch.uint8, torch.int8])),
        zq=draw(st.integers(0, 255)),
        outdt=draw(st.sampled_from([torch.uint8, torch.int8, torch.int32])),
        zout=draw(st.integers(-3, 3)),
        channels_last=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _make(case, certified: bool = False):
    rng = np.random.default_rng(case["seed"])
    xdt = case["xdt"]
    z = case["zq"] + RANGES[xdt][0]
    span = case["dilation"] * (case["k"] - 1) + 1
    h = max(case["h"], span - 2 * case["padding"])
    w_ = max(case["w_"], span - 2 * case["padding"])
    if certified:
        x, w, rq, a, b, orange = _layer(rng, case["n"], case["c"], case["o"], h, w_, case["k"],
                                        xdt, z, case["outdt"], case["zout"])
    else:  # a raw rule scaled so that outputs spread over the range: fast to build
        g = torch.Generator().manual_seed(case["seed"])
        lo, hi = RANGES[xdt]
        x = torch.randint(lo, hi + 1, (case["n"], case["c"], h, w_), generator=g,
                          dtype=torch.int16).to(xdt)
        w = torch.randint(-128, 128, (case["o"], case["c"], case["k"], case["k"]), generator=g,
                          dtype=torch.int16).to(torch.int8)
        rq = _raw_requantizer(rng, case["o"], case["outdt"], acc_bits=24,
                              shifts=(12, 24), zero_point=case["zout"])
        a = b = orange = None
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, rq, z, a, b, orange


@needs_vnni
@settings(max_examples=60, deadline=None)
@given(conv_cases())
def test_vnni_conv_matches_torch_path(case):
    x, w, rq, z, *_ = _make(case)
    geo = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    kern = Conv2dKernel(w, rq, input_zero_point=z, input_dtype=x.dtype, **geo)
    assert kern.compiled
    got = kern(x)
    assert got.dtype == rq.dtype and got.shape[1] == w.shape[0]
    ref = int_conv2d(x, w, rq, input_zero_point=z, backend="torch", **geo)
    assert torch.equal(got, ref)


def _amx() -> bool:
    return _vnni() and _ext.vnni().amx_supported()


needs_amx = pytest.mark.skipif(not _amx(), reason="no AMX-INT8 (CPU or OS) on this machine")


@needs_amx
@settings(max_examples=60, deadline=None)
@given(conv_cases(), st.sampled_from([1, 3, 16, 20, 33, 64]), st.integers(1, 20))
def test_amx_conv_matches_torch_path(case, c, w_):
    """The AMX-INT8 tiles (spans of taps read 64 bytes at a time against zero-padded weight
    tiles; 1 to 16 pixels a tile) give the torch path's integers, every output."""
    case = dict(case, c=c, w_=w_)
    x, w, rq, z, *_ = _make(case)
    geo = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    kern = Conv2dKernel(w, rq, input_zero_point=z, input_dtype=x.dtype, amx=True, **geo)
    assert kern.compiled and kern.amx
    ref = int_conv2d(x, w, rq, input_zero_point=z, backend="torch", **geo)
    assert torch.equal(kern(x), ref)
    assert torch.equal(int_conv2d(x, w, rq, input_zero_point=z, backend="amx", **geo), ref)


@needs_amx
@pytest.mark.parametrize("c", [1, 3, 4, 7])
def test_amx_with_few_input_channels(c):
    """A few channels: most of each 64-byte tile row is other pixels' bytes, against zero
    weights; the sums stay exact."""
    rng = np.random.default_rng(c)
    g = torch.Generator().manual_seed(c)
    w = torch.randint(-128, 128, (16, c, 3, 3), generator=g, dtype=torch.int16).to(torch.int8)
    x = torch.randint(-128, 128, (3, c, 16, 16), generator=g, dtype=torch.int16).to(torch.int8)
    rq = _raw_requantizer(rng, 16, torch.uint8, acc_bits=22)
    kern = Conv2dKernel(w, rq, input_zero_point=-3, input_dtype=torch.int8, padding=1,
                        amx=True)
    assert kern.compiled and kern.amx
    ref = int_conv2d(x, w, rq, input_zero_point=-3, padding=1, backend="torch")
    assert torch.equal(kern(x), ref)


@needs_vnni
def test_amx_unavailable_falls_back_to_the_vnni_loop(monkeypatch):
    """A build or a machine without AMX (``amx_supported()`` false): ``amx=True`` kernels run
    the VNNI loop, same integers."""
    real = _ext.vnni()

    class NoAmx:
        def __getattr__(self, name):
            return getattr(real, name)

        def amx_supported(self):
            return False

    monkeypatch.setitem(_ext._state, "vnni", NoAmx())
    rng = np.random.default_rng(5)
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-128, 128, (16, 16, 3, 3), generator=g, dtype=torch.int16).to(torch.int8)
    x = torch.randint(0, 256, (2, 16, 8, 8), generator=g, dtype=torch.int16).to(torch.uint8)
    rq = _raw_requantizer(rng, 16, torch.uint8, acc_bits=22)
    kern = Conv2dKernel(w, rq, input_zero_point=3, input_dtype=torch.uint8, padding=1,
                        amx=True)
    assert kern.compiled and not kern.amx
    ref = int_conv2d(x, w, rq, input_zero_point=3, padding=1, backend="torch")
    assert torch.equal(kern(x), ref)


CERTIFIED = [  # n, c, o, h, w, k, stride, padding, dilation, xdt, z, outdt, zout
    (1, 3, 16, 8, 8, 3, 1, 1, 1, torch.uint8, 0, torch.uint8, 0),
    (2, 16, 32, 9, 7, 3, 2, 1, 1, torch.uint8, 3, torch.int8, -1),
    (3, 5, 7, 6, 6, 1, 1, 0, 1, torch.int8, -5, torch.int8, 2),
    (2, 17, 33, 5, 6, 3, 1, 2, 2, torch.int8, 11, torch.uint8, 1),
    (1, 8, 16, 4, 4, 3, 1, 1, 1, torch.uint8, 128, torch.int32, 0),
    (2, 4, 20, 7, 5, 3, 2, 0, 1, torch.int8, 0, torch.int32, 3),
]


@needs_vnni
@pytest.mark.parametrize("case", CERTIFIED)
def test_vnni_conv_matches_exact_rational_reference(case):
    """Certified requantizations: the compiled layer equals the exact rational rounding of the
    exact accumulators (independent of the fixed-point rule)."""
    n, c, o, h, w_, k, stride, padding, dilation, xdt, zq, outdt, zout = case
    rng = np.random.default_rng(len(CERTIFIED) + c * o)
    z = zq + (RANGES[xdt][0] if zq >= 128 else 0)
    x, w, rq, a, b, orange = _layer(rng, n, c, o, h, w_, k, xdt, z, outdt, zout)
    kern = Conv2dKernel(w, rq, input_zero_point=z, input_dtype=xdt, stride=stride,
                        padding=padding, dilation=dilation)
    assert kern.compiled
    got = kern(x)
    acc = _acc_exact(x, w, z, stride, padding, dilation)
    flat = acc.movedim(1, 0).reshape(o, -1).numpy()
    exact = exact_outputs(ExactAffine.from_affine(a, b), flat, orange, output_zero_point=zout)
    assert np.array_equal(got.movedim(1, 0).reshape(o, -1).numpy(), exact)
    assert len(np.unique(exact)) > 5  # outputs spread, not one clamped value


@settings(max_examples=25, deadline=None)
@given(conv_cases())
def test_torch_path_of_the_kernel_matches_int_conv2d(case):
    x, w, rq, z, *_ = _make(case)
    geo = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    kern = Conv2dKernel(w, rq, input_zero_point=z, input_dtype=x.dtype, backend="torch", **geo)
    assert not kern.compiled
    ref = int_conv2d(x, w, rq, input_zero_point=z, backend="torch", **geo)
    assert torch.equal(kern(x), ref)


def _raw_requantizer(rng: np.random.Generator, o: int, outdt: torch.dtype, acc_bits: int,
                     shifts: tuple[int, int] = (0, 63), zero_point: int | None = None
                     ) -> Requantizer:
    """A fixed-point rule with arbitrary (uncertified) integers: signed multipliers, offsets,
    shifts in ``shifts`` (default 0..62, multipliers up to 2^30, offsets up to 2^45) and tie
    windows anywhere below 2^k; the kernel must apply the same integer rule whatever it
    encodes. |M·x + C| stays below 2^62 for accumulators under 2^acc_bits."""
    shift = rng.integers(shifts[0], shifts[1], o)
    mbits = min(30, 61 - acc_bits) if shifts == (0, 63) else shifts[0] - 4
    mul = rng.integers(-(2**mbits), 2**mbits, o)
    off = rng.integers(-(2**45), 2**45, o) >> (0 if shifts == (0, 63) else 45 - shifts[1])
    win = np.array([int(rng.integers(0, 2 ** int(k) + 1)) if rng.random() < 0.5 else 0
                    for k in shift])
    zp = int(rng.integers(-5, 6)) if zero_point is None else zero_point
    qmin, qmax = (-128, 127) if outdt == torch.int8 else (
        (0, 255) if outdt == torch.uint8 else (-(2**31), 2**31 - 1))

    def t(v):
        return torch.tensor([int(i) for i in v], dtype=torch.int64)

    return Requantizer(t(mul), t(off), t(shift), t(win), zp, qmin, qmax, outdt,
                       (-(2**acc_bits), 2**acc_bits))


@needs_vnni
@pytest.mark.parametrize("outdt", [torch.int8, torch.uint8, torch.int32])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("wide", [False, True])
def test_epilogue_applies_the_integer_rule_exactly(outdt, seed, wide):
    """Raw rules (large and negative multipliers, shifts up to 62, tie windows, clamping) on
    real accumulators: compiled epilogue == the torch rule, every output. ``wide``: some
    multipliers beyond int32 (the kernel's 64 x 64-bit epilogue instead of its 32 x 32 one)."""
    rng = np.random.default_rng(seed)
    n, c, o, h = 2, 19, 37, 6
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, h), generator=g, dtype=torch.int16).to(torch.uint8)
    w = torch.randint(-128, 128, (o, c, 3, 3), generator=g, dtype=torch.int16).to(torch.int8)
    rq = _raw_requantizer(rng, o, outdt, acc_bits=22)
    if wide:  # |M| up to 2^36: |M·x + C| < 2^59 still
        rq = Requantizer(rq.multiplier * 64, rq.offset, rq.shift, rq.window, rq.zero_point,
                         rq.qmin, rq.qmax, rq.dtype, rq.acc_range)
        assert int(rq.multiplier.abs().max()) >= 2**31
    z = int(rng.integers(0, 256))
    kern = Conv2dKernel(w, rq, input_zero_point=z, input_dtype=torch.uint8, padding=1)
    assert kern.compiled
    got = kern(x)
    ref = int_conv2d(x, w, rq, input_zero_point=z, padding=1, backend="torch")
    assert torch.equal(got, ref)
    # the rule must have been exercised: ties corrected and both clamps hit somewhere
    acc = _acc_exact(x, w, z, 1, 1, 1).movedim(1, -1).reshape(-1, o)
    v = acc * rq.multiplier + rq.offset
    k = rq.shift
    q = v >> k
    tie = ((v & ((1 << k) - 1)) < rq.window) & (q % 2 == 1)
    assert bool(tie.any())
    y = got.movedim(1, -1).reshape(-1, o).to(torch.int64)
    if outdt != torch.int32:
        assert bool((y == rq.qmin).any()) and bool((y == rq.qmax).any())


def _residual(rng: np.random.Generator, o: int, sdt: torch.dtype, bits: int = 33
               ) -> ResidualEpilogue:
    gain = torch.tensor(rng.integers(-4, 5, o), dtype=torch.int64)
    lut = torch.tensor(rng.integers(-(2**31), 2**31, (o, 256)), dtype=torch.int64) >> (33 - bits)
    lo = torch.tensor(rng.integers(-(2**bits), 0, o), dtype=torch.int64)
    hi = torch.tensor(rng.integers(0, 2**bits, o), dtype=torch.int64)
    return ResidualEpilogue(gain, lut, lo, hi)


@pytest.mark.parametrize("sdt", [torch.uint8, torch.int8])
@pytest.mark.parametrize("o", [16, 21, 64])
@pytest.mark.parametrize("bits", [33, 24])
def test_residual_epilogue_matches_its_definition(sdt, o, bits):
    """x = clamp(gain·(acc - zs) + lut[o, s'], lo, hi), then the rule: compiled, the kernel's
    torch path and a direct int64 evaluation agree. Clamps beyond int32 (``bits`` 33) take
    the kernel's 64-bit epilogue, clamps within it (24; the tables shifted alike, so that
    clamping still bites) its 32 x 32-bit one."""
    rng = np.random.default_rng(o)
    g = torch.Generator().manual_seed(o)
    n, c, h = 3, 16, 5
    x = torch.randint(0, 256, (n, c, h, h), generator=g, dtype=torch.int16).to(torch.uint8)
    w = torch.randint(-128, 128, (o, c, 3, 3), generator=g, dtype=torch.int16).to(torch.int8)
    lo_s, hi_s = RANGES[sdt]
    sc = torch.randint(lo_s, hi_s + 1, (n, o, h, h), generator=g, dtype=torch.int16).to(sdt)
    rq = _raw_requantizer(rng, o, torch.uint8, acc_bits=36)
    res = _residual(rng, o, sdt, bits)
    z = 7
    acc = _acc_exact(x, w, z, 1, 1, 1).movedim(1, -1).reshape(-1, o)
    s = sc.movedim(1, -1).reshape(-1, o).to(torch.int64) - lo_s
    terms = torch.stack([res.lut[j][s[:, j]] for j in range(o)], 1)
    v = torch.minimum(torch.maximum(res.gain * acc + terms, res.clamp_lo), res.clamp_hi)
    want = rq(v, dim=-1, backend="torch").reshape(n, h, h, o).permute(0, 3, 1, 2)
    for backend, amx in [("torch", False), ("auto", False), ("auto", True)]:
        kern = Conv2dKernel(w, rq, input_zero_point=z, input_dtype=torch.uint8, padding=1,
                            residual=res, backend=backend, amx=amx)
        if backend == "auto" and not kern.compiled or amx and not kern.amx:
            continue
        assert torch.equal(kern(x, sc), want), (backend, amx)


@needs_vnni
@pytest.mark.parametrize("sdt", [torch.uint8, torch.int8])
@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_residual_shortcut_rule_in_lanes_equals_the_table(sdt, amx, seed):
    """A shortcut requantization small enough for int32 lanes (evaluated in the kernel) gives
    exactly the table's values (gathered): ties, both clamps and negative multipliers."""
    rng = np.random.default_rng(100 + seed)
    g = torch.Generator().manual_seed(seed)
    n, c, o, h = 2, 16, 37, 6
    x = torch.randint(0, 256, (n, c, h, h), generator=g, dtype=torch.int16).to(torch.uint8)
    w = torch.randint(-128, 128, (o, c, 3, 3), generator=g, dtype=torch.int16).to(torch.int8)
    lo_s, hi_s = RANGES[sdt]
    sc = torch.randint(lo_s, hi_s + 1, (n, o, h, h), generator=g, dtype=torch.int16).to(sdt)
    k = torch.tensor(rng.integers(0, 15, o), dtype=torch.int64)
    mul = torch.tensor(rng.integers(-(2**22), 2**22, o), dtype=torch.int64)
    off = torch.tensor(rng.integers(-(2**28), 2**28, o), dtype=torch.int64)
    win = torch.tensor([int(rng.integers(0, 2**int(v) + 1)) for v in k], dtype=torch.int64)
    short = Requantizer(mul, off, k, win, 3, -(2**20), 2**20 - 5, torch.int32, (lo_s, hi_s))
    byte = torch.arange(lo_s, hi_s + 1, dtype=torch.int64).view(-1, 1).expand(-1, o)
    lut = short(byte.contiguous(), backend="torch").to(torch.int64).t().contiguous()
    # (row s - lo_s of the table: s itself for uint8, s + 128 for int8, as the kernel indexes)
    gain = torch.tensor(rng.integers(-3, 4, o), dtype=torch.int64)
    lo = torch.full((o,), -(2**24), dtype=torch.int64)
    hi = torch.full((o,), 2**24, dtype=torch.int64)
    rq = _raw_requantizer(rng, o, torch.int8, acc_bits=26)
    table = ResidualEpilogue(gain, lut, lo, hi)
    lanes = ResidualEpilogue(gain, lut, lo, hi, shortcut=short)
    kt = Conv2dKernel(w, rq, input_zero_point=9, input_dtype=torch.uint8, padding=1,
                      residual=table, amx=amx)
    kl = Conv2dKernel(w, rq, input_zero_point=9, input_dtype=torch.uint8, padding=1,
                      residual=lanes, amx=amx)
    assert kl._srule.numel() > 0 and kt._srule.numel() == 0
    ref = Conv2dKernel(w, rq, input_zero_point=9, input_dtype=torch.uint8, padding=1,
                       residual=table, backend="torch")(x, sc)
    assert torch.equal(kt(x, sc), ref) and torch.equal(kl(x, sc), ref)
    # the tie correction of the shortcut's rule was exercised
    v = byte * mul + off
    assert bool((((v & ((1 << k) - 1)) < win) & ((v >> k) % 2 == 1)).any())


def test_residual_lut_beyond_int32_uses_the_torch_path():
    o, c = 16, 8
    w = torch.ones(o, c, 1, 1, dtype=torch.int8)
    rq = _raw_requantizer(np.random.default_rng(0), o, torch.int8, acc_bits=20)
    res = _residual(np.random.default_rng(1), o, torch.uint8)
    res.lut[0, 0] = 2**40
    kern = Conv2dKernel(w, rq, input_zero_point=0, input_dtype=torch.uint8, residual=res)
    assert not kern.compiled
    x = torch.zeros(1, c, 2, 2, dtype=torch.uint8)
    sc = torch.zeros(1, o, 2, 2, dtype=torch.uint8)
    assert kern(x, sc).shape == (1, o, 2, 2)


def test_env_switch_and_bad_arguments(monkeypatch):
    w = torch.zeros(4, 3, 3, 3, dtype=torch.int8)
    rq = _raw_requantizer(np.random.default_rng(0), 4, torch.int8, acc_bits=20)
    monkeypatch.setenv("LOWBIT_NO_EXT", "1")
    assert not Conv2dKernel(w, rq, input_zero_point=0, input_dtype=torch.uint8).compiled
    monkeypatch.delenv("LOWBIT_NO_EXT")
    with pytest.raises(TypeError, match="input_dtype"):
        Conv2dKernel(w, rq, input_zero_point=0, input_dtype=torch.int32)
    with pytest.raises(ValueError, match="input_zero_point"):
        Conv2dKernel(w, rq, input_zero_point=300, input_dtype=torch.uint8)
    with pytest.raises(ValueError, match="backend"):
        Conv2dKernel(w, rq, input_zero_point=0, input_dtype=torch.uint8, backend="cuda")
    k = Conv2dKernel(w, rq, input_zero_point=0, input_dtype=torch.uint8)
    with pytest.raises(ValueError, match="x must be"):
        k(torch.zeros(1, 3, 4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="shortcut"):
        k(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1, 4, 2, 2, dtype=torch.uint8))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_single_input_feature(backend):
    """K = 1 (one input channel, 1x1; a one-feature linear layer): torch's CPU ``_int_mm``
    misreads a [1, N] operand with strides (1, 1), which the integer path must avoid."""
    from lowbit.integer.ops import int_linear

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (3, 1, 4, 5), generator=g, dtype=torch.int16).to(torch.uint8)
    w = torch.randint(-128, 128, (7, 1, 1, 1), generator=g, dtype=torch.int16).to(torch.int8)
    one = torch.ones(7, dtype=torch.int64)
    rq = Requantizer(one, torch.zeros(7, dtype=torch.int64), torch.zeros(7, dtype=torch.int64),
                     torch.zeros(7, dtype=torch.int64), 0, -(2**31), 2**31 - 1, torch.int32,
                     (-(2**15), 2**15))
    want = _acc_exact(x, w, 5, 1, 0, 1).to(torch.int32)
    for _ in range(3):
        assert torch.equal(int_conv2d(x, w, rq, input_zero_point=5, backend=backend), want)
        got = int_linear(x.permute(0, 2, 3, 1), w.reshape(7, 1), rq, input_zero_point=5,
                         backend=backend)
        assert torch.equal(got, want.permute(0, 2, 3, 1))
