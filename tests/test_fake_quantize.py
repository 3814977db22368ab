"""fake_quantize / quantize_grad: bit-exact against torch's references, STE gradients,
stochastic rounding statistics, per-channel/group layouts, bad input, and the fused kernel
against the plain-torch reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lowbit.formats import get_format
from lowbit.quant.functional import choose_qparams, fake_quantize, quantize_grad

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, with NaN == NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    ia = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a[~nan].view(ia), b[~nan].view(ia))


shapes = st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple)
int_formats = st.builds(
    lambda bits, signed: get_format(f"{'' if signed else 'u'}int{bits}"),
    st.integers(2, 16), st.booleans())


@st.composite
def int_case(draw, per_channel=False):
    fmt = draw(int_formats)
    shape = draw(shapes)
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    log_s = draw(st.floats(-12, 4))
    g = torch.Generator().manual_seed(seed)
    n_par = shape[0] if per_channel else 1
    scale = (torch.rand(n_par, generator=g) + 0.5) * 2.0**log_s
    zp = torch.randint(fmt.qmin, fmt.qmax + 1, (n_par,), generator=g, dtype=torch.int32)
    span = scale.max().item() * (fmt.qmax - fmt.qmin) * draw(st.floats(0.1, 2.0))
    span = min(span, torch.finfo(dtype).max / 4)  # finite inputs (torch's per-channel kernel
    # sends inf to quant_min through an undefined float->int64 cast; see test_int_nan_inf...)
    x = ((torch.rand(shape, generator=g) - 0.5) * 2 * span).to(dtype)
    return fmt, x, scale, zp


@settings(max_examples=150, deadline=None)
@given(int_case())
def test_int_per_tensor_matches_torch(case):
    fmt, x, scale, zp = case
    s, z = scale.item(), int(zp.item())
    ref = torch.fake_quantize_per_tensor_affine(x, s, z, fmt.qmin, fmt.qmax)
    assert same(fake_quantize(x, fmt, scale=s, zero_point=z), ref)
    # the tensor-qparams overload and tensor arguments agree too
    ref_t = torch.fake_quantize_per_tensor_affine(x, scale, zp, fmt.qmin, fmt.qmax)
    assert same(fake_quantize(x, fmt, scale=scale, zero_point=zp), ref_t)


@settings(max_examples=100, deadline=None)
@given(int_case(per_channel=True), st.data())
def test_int_per_channel_matches_torch(case, data):
    fmt, x, scale, zp = case
    axis = data.draw(st.integers(0, x.dim() - 1))
    x = x.movedim(0, axis).contiguous() if data.draw(st.booleans()) else x.movedim(0, axis)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, fmt.qmin, fmt.qmax)
    assert same(fake_quantize(x, fmt, scale=scale, zero_point=zp, axis=axis), ref)


@settings(max_examples=60, deadline=None)
@given(int_case(), st.integers(1, 5), st.data())
def test_int_per_group_matches_torch_on_each_group(case, k, data):
    fmt, x, _, _ = case
    axis = data.draw(st.integers(-x.dim(), x.dim() - 1))
    y = fake_quantize(x, fmt, axis=axis, group_size=k)
    scale, zp = choose_qparams(x, fmt, axis=axis, group_size=k)
    ax = axis % x.dim()
    n_groups = -(-x.shape[ax] // k)
    assert scale.shape == x.shape[:ax] + (n_groups,) + x.shape[ax + 1:]
    # reference: each group on its own, as a one-channel torch.fake_quantize_per_channel_affine
    xm, ym = x.movedim(ax, -1).reshape(-1, x.shape[ax]), y.movedim(ax, -1).reshape(-1, x.shape[ax])
    sm, zm = scale.movedim(ax, -1).reshape(-1, n_groups), zp.movedim(ax, -1).reshape(-1, n_groups)
    for row in range(xm.shape[0]):
        for gi in range(n_groups):
            sl = slice(gi * k, (gi + 1) * k)
            ref = torch.fake_quantize_per_channel_affine(
                xm[row, sl][None], sm[row, gi:gi + 1], zm[row, gi:gi + 1], 0, fmt.qmin, fmt.qmax)
            assert same(ym[row, sl], ref[0])


@settings(max_examples=80, deadline=None)
@given(int_case(), st.sampled_from([None, 0]))
def test_int_derived_scale(case, axis):
    fmt, x, _, _ = case
    y = fake_quantize(x, fmt, axis=axis)
    scale, zp = choose_qparams(x, fmt, axis=axis)
    xf = x.float().reshape(1 if axis is None else x.shape[0], -1)
    if fmt.signed:
        amax = xf.abs().amax(1).reshape(scale.shape)
        assert torch.equal(scale, (amax / fmt.qmax).clamp_min(torch.finfo(torch.float32).tiny))
        assert not zp.any()
    else:
        lo = xf.amin(1).clamp(max=0).reshape(scale.shape)
        hi = xf.amax(1).clamp(min=0).reshape(scale.shape)
        tiny = torch.finfo(torch.float32).tiny
        assert torch.equal(scale, ((hi - lo) / (fmt.qmax - fmt.qmin)).clamp_min(tiny))
        assert torch.equal(zp.float(), (-torch.round(lo / scale)).clamp(fmt.qmin, fmt.qmax))
    if axis is None:
        ref = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp), fmt.qmin, fmt.qmax)
    else:
        ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, fmt.qmin, fmt.qmax)
    assert same(y, ref)
    # the derived range covers the data: at most half a step of error (no clipping)
    err = (y.double() - x.double()).abs()
    step = scale.double() if axis is None else scale.double().view(-1, *[1] * (x.dim() - 1))
    tol = step / 2 + x.double().abs() * 2 ** -(8 if x.dtype == torch.bfloat16 else 11)
    assert (err <= tol + 1e-30).all()


def test_int_nan_inf_and_huge():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3.0])
    y = fake_quantize(x, "int8", scale=0.1, zero_point=3)
    assert math.isnan(y[0])
    ref = torch.fake_quantize_per_tensor_affine(x[1:], 0.1, 3, -128, 127)
    assert same(y[1:], ref)


# ---------------------------------------------------------------- float formats
@settings(max_examples=80, deadline=None)
@given(st.sampled_from(list(FP8)), shapes, st.sampled_from(DTYPES), st.integers(0, 2**31 - 1),
       st.floats(-20, 10))
def test_fp8_matches_torch_cast_inside_range(name, shape, dtype, seed, log_mag):
    f = get_format(name)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2**log_mag)
    x = x.clamp(-f.max, f.max).to(dtype)
    assume(x.abs().max() <= f.max)
    y = fake_quantize(x, name)
    ref = x.float().to(FP8[name]).to(dtype)  # via float32: exact for the narrow input dtypes
    if dtype == torch.float64:
        ref = fake_quantize(x.float(), name).double()
        assume(torch.equal(x, x.float().double()))
    assert same(y, ref)


@pytest.mark.parametrize("name, dt", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_formats_cast_with_saturation(name, dt):
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0)) * 100
    x[:4] = torch.tensor([1e6, -1e39, float("inf"), float("nan")])
    y = fake_quantize(x, name)
    fmax = torch.finfo(dt).max
    assert same(y[4:], x[4:].to(dt).float())
    big = fmax if name == "fp16" else torch.tensor(1e6).to(dt).item()  # bf16 holds ~1e6
    assert y[:3].tolist() == [big, -fmax, fmax] and math.isnan(y[3])


@pytest.mark.parametrize("name", list(FP8))
def test_fp8_saturates_and_keeps_nan(name):
    f = get_format(name)
    x = torch.tensor([f.max * 1.5, -f.max * 4, float("inf"), -float("inf"), float("nan"), -0.0])
    y = fake_quantize(x, name)
    assert y[:4].tolist() == [f.max, -f.max, f.max, -f.max]
    assert math.isnan(y[4]) and math.copysign(1.0, y[5]) == -1.0


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(list(FP8)), st.integers(0, 2**31 - 1), st.floats(-10, 10), st.booleans())
def test_fp8_scale_divides_then_multiplies(name, seed, log_s, per_channel):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 33, generator=g) * 50
    if per_channel:
        s = (torch.rand(4, generator=g) + 0.5) * 2**log_s
        y = fake_quantize(x, name, scale=s, axis=0)
        s = s.view(4, 1)
    else:
        s = torch.tensor((torch.rand(1, generator=g).item() + 0.5) * 2**log_s)
        y = fake_quantize(x, name, scale=s)
    ref = fake_quantize(x / s, name) * s
    assert same(y, ref)


# ---------------------------------------------------------------- binary / ternary
def test_binary_sign_and_hardtanh_ste():
    x = torch.tensor([-2.0, -1.0, -0.3, -0.0, 0.0, 0.4, 1.0, 1.5], requires_grad=True)
    y = fake_quantize(x, "binary")
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    y.backward(torch.arange(1.0, 9.0))
    assert x.grad.tolist() == [0, 2, 3, 4, 5, 6, 7, 0]


def test_binary_scaled_per_channel():
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    y = fake_quantize(x, "binary-scaled", axis=0)
    alpha = x.abs().mean(1, keepdim=True)
    assert torch.allclose(y, torch.where(x >= 0, 1.0, -1.0) * alpha)


def test_ternary_twn():
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    y = fake_quantize(x, "ternary", axis=0)
    for row, out in zip(x, y):
        delta = 0.7 * row.abs().mean()
        kept = row.abs() > delta
        alpha = row.abs()[kept].mean()
        want = torch.where(kept, torch.sign(row) * alpha, torch.zeros(()))
        assert torch.allclose(out, want)
    assert set(fake_quantize(x, "ternary-unscaled").unique().tolist()) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("fmt", ["binary-scaled", "ternary"])
def test_binary_ternary_groups_along_a_leading_axis(fmt):
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(2))
    y = fake_quantize(x, fmt, axis=0, group_size=3)
    for start in (0, 3, 6):  # groups of 3 rows per column; the last group has one row
        for col in range(3):
            seg = x[start:start + 3, col]
            want = fake_quantize(seg, fmt)
            assert torch.allclose(y[start:start + 3, col], want)


def test_ternary_explicit_scale_rounds_to_nearest():
    x = torch.tensor([-3.0, -0.6, -0.4, 0.25, 0.5, 0.75, 2.0])
    y = fake_quantize(x, "ternary", scale=0.5)
    assert y.tolist() == [-0.5, -0.5, -0.5, 0.0, 0.5, 0.5, 0.5]


# ---------------------------------------------------------------- gradients (STE)
@settings(max_examples=40, deadline=None)
@given(int_case())
def test_int_ste_is_torch_mask(case):
    fmt, x, scale, zp = case
    x = x.clone().requires_grad_()
    g = torch.randn(x.shape, dtype=x.dtype)
    fake_quantize(x, fmt, scale=scale, zero_point=zp).backward(g)
    x2 = x.detach().clone().requires_grad_()
    torch.fake_quantize_per_tensor_affine(x2, scale.item(), int(zp), fmt.qmin, fmt.qmax).backward(g)
    assert same(x.grad, x2.grad)


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e3m2"])
def test_float_ste_clips_outside_range(name):
    f = get_format(name)
    x = torch.tensor([0.1, -f.max, f.max, f.max * 1.01, -f.max * 3, float("inf")],
                     requires_grad=True)
    fake_quantize(x, name).backward(torch.ones(6))
    assert x.grad.tolist() == [1, 1, 1, 0, 0, 0]
    x.grad = None
    fake_quantize(x, name, scale=2.0).backward(torch.ones(6))
    assert x.grad.tolist() == [1, 1, 1, 1, 0, 0]


def test_stochastic_ste_mask_follows_clipping():
    # the gradient passes where the stochastically rounded code was not clipped
    x = torch.linspace(-200, 200, 4001, requires_grad=True)
    fake_quantize(x, "int8", scale=1.0, rounding="stochastic",
                  generator=torch.Generator().manual_seed(0)).backward(torch.ones_like(x))
    xd, grad = x.detach(), x.grad
    assert (grad[(xd >= -128) & (xd <= 127)] == 1).all()
    assert (grad[(xd >= 128) | (xd <= -129)] == 0).all()
    edge = grad[((xd > 127) & (xd < 128)) | ((xd > -129) & (xd < -128))]
    assert set(edge.tolist()) == {0.0, 1.0}


# ---------------------------------------------------------------- stochastic rounding
@pytest.mark.parametrize("fmt, kw", [("int8", {"scale": 0.1}), ("int4", {"scale": 0.25,
                                      "zero_point": 2}), ("e5m2", {}), ("e4m3", {"scale": 0.01})])
def test_stochastic_unbiased_neighbours_reproducible(fmt, kw):
    n = 200_000
    base = torch.tensor([0.537, -0.0123, 0.3 + 1e-4])
    x = base.repeat_interleave(n).view(3, n)
    y = fake_quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(7),
                      **kw)
    for v, row in zip(base.tolist(), y):
        vals = sorted(row.unique().tolist())
        near = fake_quantize(torch.tensor([v]), fmt, **kw).item()
        assert len(vals) <= 2 and near in vals
        if len(vals) == 2:
            lo, hi = vals
            assert lo <= v <= hi
            p = (v - lo) / (hi - lo)
            sd = (hi - lo) * math.sqrt(p * (1 - p) / n)
            assert abs(row.double().mean().item() - v) <= 5 * sd
    y2 = fake_quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(7),
                       **kw)
    assert torch.equal(y, y2)


def test_stochastic_binary_probability():
    n = 200_000
    x = torch.full((n,), 0.3)
    y = fake_quantize(x, "binary", rounding="stochastic", generator=torch.Generator().manual_seed(0))
    assert set(y.unique().tolist()) == {-1.0, 1.0}
    assert abs(y.mean().item() - 0.3) <= 5 * 2 * math.sqrt(0.65 * 0.35 / n)


# ---------------------------------------------------------------- quantize_grad
def test_quantize_grad_identity_forward_and_quantized_backward():
    x = torch.randn(64, 32, requires_grad=True)
    y = quantize_grad(x, "int8", generator=torch.Generator().manual_seed(3))
    assert torch.equal(y, x)
    g = torch.randn(64, 32)
    y.backward(g)
    ref = fake_quantize(g, "int8", rounding="stochastic", generator=torch.Generator().manual_seed(3))
    assert torch.equal(x.grad, ref)
    scale, _ = choose_qparams(g, "int8")
    assert torch.allclose(scale, g.abs().max() / 127)


def test_quantize_grad_per_axis_and_float_overflow_visible():
    x = torch.randn(8, 5, requires_grad=True)
    quantize_grad(x, "int4", axis=0, rounding="nearest").backward(torch.randn(8, 5))
    assert x.grad.shape == (8, 5)
    x.grad = None
    g = torch.tensor([1.0, 1e6, -1e6]).expand(8, 3).contiguous()
    x3 = torch.randn(8, 3, requires_grad=True)
    quantize_grad(x3, "e5m2").backward(g)
    assert torch.isinf(x3.grad[:, 1:]).all() and (x3.grad[:, 0] == 1).all()
    x3.grad = None
    quantize_grad(x3, "int8").backward(torch.full((8, 3), float("inf")))
    assert torch.isinf(x3.grad).all()  # passed through for the loss scaler


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"fmt": "int9x"}, ValueError, "valid formats"),
        ({"fmt": "int17"}, ValueError, "bits must be in 2..16"),
        ({"fmt": "int8", "axis": 2}, ValueError, "axis 2 does not exist"),
        ({"fmt": "int8", "axis": 1.0}, TypeError, "axis"),
        ({"fmt": "int8", "scale": torch.ones(3), "axis": 0}, ValueError, "scale has shape"),
        ({"fmt": "int8", "scale": torch.ones(4)}, ValueError, "scale has shape"),
        ({"fmt": "int8", "scale": 0.0}, ValueError, "scale must be finite"),
        ({"fmt": "int8", "scale": float("nan")}, ValueError, "scale must be finite"),
        ({"fmt": "int8", "scale": -1.0}, ValueError, "scale must be finite"),
        ({"fmt": "int8", "scale": "1"}, TypeError, "scale"),
        ({"fmt": "int8", "scale": 1.0, "zero_point": 200}, ValueError, "zero_point must lie"),
        ({"fmt": "int8", "scale": 1.0, "zero_point": 0.5}, ValueError, "integers"),
        ({"fmt": "int8", "zero_point": 1}, ValueError, "zero_point needs a scale"),
        ({"fmt": "e5m2", "scale": 1.0, "zero_point": 0}, ValueError, "zero_point only"),
        ({"fmt": "e5m2", "axis": 0}, ValueError, "explicit scale"),
        ({"fmt": "int8", "rounding": "up"}, ValueError, "rounding must be one of"),
        ({"fmt": "int8", "generator": 3}, TypeError, "generator"),
        ({"fmt": "int8", "group_size": 0}, ValueError, "group_size"),
    ],
)
def test_bad_input(kwargs, err, match):
    x = torch.randn(4, 6)
    with pytest.raises(err, match=match):
        fake_quantize(x, **kwargs)


@pytest.mark.parametrize("x", [torch.arange(4), torch.ones(3, dtype=torch.complex64),
                               torch.ones(2, dtype=torch.bool), [1.0, 2.0]])
def test_non_float_tensor_rejected(x):
    with pytest.raises(TypeError, match="x must be"):
        fake_quantize(x, "int8")


# ---------------------------------------------------------------- fused kernel == reference
def _kernel_available() -> bool:
    from lowbit.kernels import fake_quant

    return fake_quant.available()


needs_kernel = pytest.mark.skipif(not _kernel_available(), reason="fused kernel did not build")


def _run_both(monkeypatch, fn):
    """(reference result, kernel result) of fn(), which must build a fresh generator."""
    monkeypatch.setenv("LOWBIT_NO_EXT", "1")
    ref = fn()
    monkeypatch.setenv("LOWBIT_NO_EXT", "0")
    return ref, fn()


def _fq_with_grad(x, fmt, seed, **kw):
    x = x.clone().requires_grad_()
    y = fake_quantize(x, fmt, generator=torch.Generator().manual_seed(seed), **kw)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    y.backward(g)
    return y.detach(), x.grad


kernel_formats = st.sampled_from(
    ["int8", "uint8", "int4", "uint2", "int16", "int8-narrow", "e4m3", "e5m2", "e3m2", "e2m1",
     "e5m10", "fp16", "bf16", "fp32", "e4m3-ieee", "e6m5", "e8m2", "e7m0", "binary",
     "binary-scaled"])


@needs_kernel
@settings(max_examples=120, deadline=None)
@given(kernel_formats, st.sampled_from(["nearest", "stochastic"]),
       st.sampled_from(["tensor", "given", "channel", "group"]), shapes, st.integers(0, 2**20),
       st.floats(-8, 8), st.data())
def test_kernel_matches_reference(fmt, rounding, layout, shape, seed, log_mag, data):
    monkeypatch = pytest.MonkeyPatch()
    f = get_format(fmt)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2**log_mag
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 1e30])
    flat = x.view(-1)
    k = min(len(specials), flat.numel() // 3)
    flat[:k] = specials[:k]
    kw = {"rounding": rounding}
    is_float = fmt.startswith(("e", "fp", "bf"))
    if layout == "given" or (is_float and layout in ("channel", "group")):
        axis = data.draw(st.integers(0, x.dim() - 1)) if layout != "given" else None
        n = 1 if axis is None else x.shape[axis]
        kw.update(scale=(torch.rand(n, generator=g) + 0.1) * 2 ** data.draw(st.floats(-6, 6)),
                  axis=axis)
        if layout == "group":
            k_g = data.draw(st.sampled_from([1, x.shape[-1]]))
            shape_g = x.shape[:-1] + (x.shape[-1] // k_g,)
            kw.update(axis=-1, group_size=k_g, scale=(torch.rand(shape_g, generator=g) + 0.1))
        if fmt.startswith(("int", "uint")):
            kw["zero_point"] = data.draw(st.integers(f.qmin, f.qmax))
    elif layout == "channel":
        kw["axis"] = data.draw(st.integers(-x.dim(), x.dim() - 1))
    elif layout == "group":
        kw.update(axis=-1, group_size=data.draw(st.sampled_from([1, x.shape[-1]])))
    if is_float and "scale" not in kw:
        kw.pop("axis", None), kw.pop("group_size", None)
    (y_ref, g_ref), (y_k, g_k) = _run_both(
        monkeypatch, lambda: _fq_with_grad(x, fmt, seed, **kw))
    monkeypatch.undo()
    assert same(y_ref, y_k), (fmt, kw)
    assert same(g_ref, g_k), (fmt, kw)


@needs_kernel
@pytest.mark.parametrize("shape, axis", [((3, 5000), 0), ((5000, 3), 1), ((2, 3, 1700), 1),
                                         ((9001,), None), ((7,), None)])
@pytest.mark.parametrize("fmt", ["int8", "e5m2", "binary-scaled"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_kernel_block_and_channel_boundaries(monkeypatch, shape, axis, fmt, rounding):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 40
    kw = {"rounding": rounding}
    if axis is not None:
        kw.update(axis=axis)
        if fmt != "binary-scaled":
            kw.update(scale=torch.linspace(0.1, 2.0, shape[axis]))
    if fmt == "binary-scaled":
        x = x / 40
    (y_ref, g_ref), (y_k, g_k) = _run_both(monkeypatch, lambda: _fq_with_grad(x, fmt, 3, **kw))
    assert same(y_ref, y_k) and same(g_ref, g_k)


def test_packed_mask_torch_unpacking_matches_kernel():
    from lowbit.kernels.fake_quant import masked_grad

    bits = torch.randint(0, 256, (5,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want = torch.tensor([(int(b) >> j) & 1 for b in bits for j in range(8)], dtype=torch.float64)
    g = torch.randn(37, dtype=torch.float64)
    assert torch.equal(masked_grad(g, bits), g * want[:37])  # float64: the torch path
    if _kernel_available():
        g32 = g.float()
        assert torch.equal(masked_grad(g32, bits), g32 * want[:37].float())


@needs_kernel
def test_kernel_path_is_taken_and_can_be_disabled(monkeypatch):
    x = torch.randn(100, requires_grad=True)
    monkeypatch.setenv("LOWBIT_NO_EXT", "0")
    saved = fake_quantize(x, "int8").grad_fn.saved_tensors[0]
    assert saved.dtype == torch.uint8 and saved.numel() == 13  # bit-packed mask from the kernel
    monkeypatch.setenv("LOWBIT_NO_EXT", "1")
    assert fake_quantize(x, "int8").grad_fn.saved_tensors[0].dtype == torch.bool


# ---------------------------------------------------------------- odds and ends
def test_derived_range_ignores_non_finite_values():
    x = torch.tensor([float("nan"), float("inf"), -2.0, 1.0, 0.5])
    scale, zp = choose_qparams(x, "int8")
    assert scale.item() == pytest.approx(2.0 / 127) and zp.item() == 0
    y = fake_quantize(x, "int8")
    assert math.isnan(y[0]) and y[1].item() == pytest.approx(127 * scale.item())
    assert torch.equal(y[2:], fake_quantize(x[2:], "int8", scale=scale))


def test_empty_and_non_contiguous_inputs():
    assert fake_quantize(torch.empty(0, 3), "int8").shape == (0, 3)
    x = torch.randn(6, 8)
    assert torch.equal(fake_quantize(x.t(), "e4m3"), fake_quantize(x.t().contiguous(), "e4m3"))
    s = torch.rand(6) + 0.1
    assert torch.equal(fake_quantize(x.t(), "int8", scale=s, axis=1),
                       fake_quantize(x.t().contiguous(), "int8", scale=s, axis=1))


def test_stochastic_draws_advance_the_generator():
    g = torch.Generator().manual_seed(0)
    x = torch.full((1000,), 0.5)
    a = fake_quantize(x, "int8", scale=1.0, rounding="stochastic", generator=g)
    b = fake_quantize(x, "int8", scale=1.0, rounding="stochastic", generator=g)
    assert not torch.equal(a, b)  # a fresh draw each call
    torch.manual_seed(5)
    c = fake_quantize(x, "e5m2", scale=2.0**-12, rounding="stochastic")
    torch.manual_seed(5)
    assert torch.equal(c, fake_quantize(x, "e5m2", scale=2.0**-12, rounding="stochastic"))


def test_ternary_stochastic_unbiased_inside_range():
    n = 200_000
    x = torch.full((n,), 0.3)
    y = fake_quantize(x, "ternary", scale=1.0, rounding="stochastic",
                      generator=torch.Generator().manual_seed(2))
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert abs(y.mean().item() - 0.3) <= 5 * math.sqrt(0.3 * 0.7 / n)


@pytest.mark.parametrize(
    "x, kwargs, err, match",
    [
        (torch.arange(3), {"fmt": "int8"}, TypeError, "x must be"),
        (torch.randn(3), {"fmt": "e5m2", "axis": 0}, ValueError, "axis does not apply"),
        (torch.randn(3), {"fmt": "int8", "axis": 1}, ValueError, "axis 1 does not exist"),
        (torch.randn(3), {"fmt": "nope"}, ValueError, "valid formats"),
        (torch.randn(3), {"fmt": "int8", "rounding": "floor"}, ValueError, "rounding"),
    ],
)
def test_quantize_grad_bad_input(x, kwargs, err, match):
    with pytest.raises(err, match=match):
        quantize_grad(x, **kwargs)


def test_failed_build_falls_back_to_torch(monkeypatch):
    from lowbit.kernels import fake_quant

    monkeypatch.setattr(fake_quant, "_module", None)
    monkeypatch.setattr(fake_quant, "_failed", "RuntimeError: no compiler")
    monkeypatch.delenv("LOWBIT_NO_EXT", raising=False)
    assert not fake_quant.available()
    x = torch.randn(50, requires_grad=True)
    y = fake_quantize(x, "int8", scale=0.02)
    assert y.grad_fn.saved_tensors[0].dtype == torch.bool  # the plain-torch path
    assert same(y.detach(), torch.fake_quantize_per_tensor_affine(x.detach(), 0.02, 0, -128, 127))
