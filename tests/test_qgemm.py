"""Quantized backward GEMMs (lowbit.nn.qgemm): exactness, bifurcation, rounding statistics,
overflow visibility, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import get_format
from lowbit.formats.rounding import round_to_float_format
from lowbit.nn import QConv2d, QLinear
from lowbit.nn.qgemm import (
    QuantizedBackward,
    backward_spec,
    get_qgemm,
    list_qgemms,
    quantize_backward,
    quantized_conv2d,
    quantized_linear,
    record_gemm_inputs,
    register_qgemm,
)
from lowbit.quant.functional import choose_qparams, fake_quantize
from lowbit.quant.spec import QuantSpec
from lowbit.train.loss_scaler import EnhancedLossScaler

E5M2 = get_format("e5m2")


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum()))


def on_e5m2_grid(t: torch.Tensor) -> bool:
    """Every finite value equals its round trip through torch's float8_e5m2 cast."""
    f = t[torch.isfinite(t)]
    return bool(torch.equal(f.to(torch.float8_e5m2).float(), f))


def int_grid_codes(t: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """The integer codes of t on the grid scale * [-qmax, qmax]; asserts t is on it."""
    q = torch.round(t / scale)
    assert torch.equal(q * scale, t), "value off the integer grid"
    assert int(q.abs().max()) <= qmax
    return q


def replay(gen_state: torch.Tensor) -> torch.Generator:
    return torch.Generator().set_state(gen_state)


# ------------------------------------------------------------------ exact float behaviour
@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 6), cin_g=st.integers(1, 4), cout_g=st.integers(1, 4),
    groups=st.integers(1, 3), k=st.integers(1, 3), stride=st.integers(1, 2),
    padding=st.integers(0, 2), dilation=st.integers(1, 2), hw=st.integers(5, 9),
    bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_conv_unquantized_backward_is_torch_bit_for_bit(n, cin_g, cout_g, groups, k, stride,
                                                        padding, dilation, hw, bias, seed):
    g0 = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin_g * groups, hw, hw, generator=g0, requires_grad=True)
    w = torch.randn(cout_g * groups, cin_g, k, k, generator=g0, requires_grad=True)
    b = torch.randn(cout_g * groups, generator=g0, requires_grad=True) if bias else None
    args = (stride, padding, dilation, groups)
    y = quantized_conv2d(x, w, b, *args)
    ref = F.conv2d(x, w, b, *args)
    assert torch.equal(y, ref)
    gout = torch.randn(y.shape, generator=g0)
    ins = (x, w) + ((b,) if bias else ())
    got = torch.autograd.grad(y, ins, gout)
    want = torch.autograd.grad(ref, ins, gout)
    for a, c in zip(got, want, strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("shape", [(13, 7), (3, 5, 7), (7,)])
def test_linear_unquantized_backward_is_torch_bit_for_bit(shape):
    g0 = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g0, requires_grad=True)
    w = torch.randn(11, 7, generator=g0, requires_grad=True)
    b = torch.randn(11, generator=g0, requires_grad=True)
    y = quantized_linear(x, w, b)
    ref = F.linear(x, w, b)
    assert torch.equal(y, ref)
    gout = torch.randn(y.shape, generator=g0)
    for a, c in zip(torch.autograd.grad(y, (x, w, b), gout),
                    torch.autograd.grad(ref, (x, w, b), gout), strict=True):
        assert torch.equal(a, c)


# ------------------------------------------------------------ bifurcation, bit for bit
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_bifurcation_int8_error_below_int16_copy_for_weight_gradient(op):
    g0 = torch.Generator().manual_seed(2)
    if op == "linear":
        x = torch.randn(64, 40, generator=g0, requires_grad=True)
        w = torch.randn(30, 40, generator=g0, requires_grad=True)

        def fwd(x_, w_):
            return F.linear(x_, w_)

        def qfwd(**kw):
            return quantized_linear(x, w, **kw)
    else:
        x = torch.randn(8, 6, 10, 10, generator=g0, requires_grad=True)
        w = torch.randn(12, 6, 3, 3, generator=g0, requires_grad=True)

        def fwd(x_, w_):
            return F.conv2d(x_, w_, None, 1, 1)

        def qfwd(**kw):
            return quantized_conv2d(x, w, None, 1, 1, **kw)

    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    y = qfwd(error="int8", backward=QuantizedBackward(wgrad_error="int16"), generator=gen)
    gout = torch.randn(y.shape, generator=g0) * 1e-3
    with record_gemm_inputs() as rec:
        gx, gw = torch.autograd.grad(y, (x, w), gout)
    stages = {r.stage: r for r in rec}
    assert [r.stage for r in rec] == ["dgrad", "wgrad", "weight_grad"]

    # the 8-bit error sent below: on the int8 grid of max|g|, at most 2^8 distinct values
    e8 = stages["dgrad"].a
    s8, _ = choose_qparams(gout, "int8")
    int_grid_codes(e8, s8, 127)
    assert e8.unique().numel() <= 2**8
    # the weight-gradient copy: on the int16 grid, far more levels than 8 bits allow
    e16 = stages["wgrad"].a.reshape(gout.shape)
    s16, _ = choose_qparams(gout, "int16")
    int_grid_codes(e16, s16, 32767)
    assert e16.unique().numel() > 2**8

    # bit for bit against replayed rounding (same generator, same order) and torch's autograd
    rg = replay(state)
    ref8 = fake_quantize(gout, "int8", rounding="stochastic", generator=rg)
    ref16 = fake_quantize(gout, "int16", rounding="stochastic", generator=rg)
    assert torch.equal(e8, ref8) and torch.equal(e16, ref16)
    xl = x.detach().requires_grad_()
    wl = w.detach().requires_grad_()
    assert torch.equal(gx, torch.autograd.grad(fwd(xl, w.detach()), xl, ref8)[0])
    assert torch.equal(gw, torch.autograd.grad(fwd(x.detach(), wl), wl, ref16)[0])
    assert not torch.equal(gw, torch.autograd.grad(fwd(x.detach(), wl), wl, ref8)[0])


def test_bifurcation_fp32_copy_gives_the_float_weight_gradient():
    g0 = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 7, 7, generator=g0, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, generator=g0, requires_grad=True)
    b = torch.randn(5, generator=g0, requires_grad=True)
    y = quantized_conv2d(x, w, b, 2, 1, error="int8", backward=QuantizedBackward(None))
    gout = torch.randn(y.shape, generator=g0)
    _, gw, gb = torch.autograd.grad(y, (x, w, b), gout)
    _, rw, rb = torch.autograd.grad(F.conv2d(x, w, b, 2, 1), (x, w, b), gout)
    assert torch.equal(gw, rw) and torch.equal(gb, rb)


def test_nearest_int8_error_matches_torch_fake_quantize():
    g0 = torch.Generator().manual_seed(5)
    x = torch.randn(16, 9, generator=g0, requires_grad=True)
    w = torch.randn(6, 9, generator=g0)
    y = quantized_linear(x, w, error=QuantSpec("int8", rounding="nearest"))
    gout = torch.randn(y.shape, generator=g0)
    with record_gemm_inputs() as rec:
        y.backward(gout)
    s, _ = choose_qparams(gout, "int8")
    want = torch.fake_quantize_per_tensor_affine(gout, float(s), 0, -128, 127)
    assert torch.equal(rec[0].a, want)
    assert [r.stage for r in rec] == ["dgrad"]  # frozen weight: no wgrad GEMM at all


def test_per_chunk_error_ranges():
    """granularity='channel' along the batch axis: one int8 range per sample."""
    g0 = torch.Generator().manual_seed(6)
    x = torch.randn(6, 20, generator=g0, requires_grad=True)
    w = torch.randn(50, 20, generator=g0)
    spec = QuantSpec("int8", granularity="channel", axis=0, rounding="stochastic")
    y = quantized_linear(x, w, error=spec)
    # samples with very different magnitudes: a per-tensor range would zero the small ones
    gout = torch.randn(y.shape, generator=g0) * torch.logspace(-4, 0, 6).unsqueeze(1)
    with record_gemm_inputs() as rec:
        y.backward(gout)
    e = rec[0].a
    for i in range(6):
        s = gout[i].abs().max() / 127
        codes = int_grid_codes(e[i], s, 127)
        assert codes.unique().numel() <= 2**8
        assert codes.abs().max() == 127  # each chunk uses its full range


@pytest.mark.parametrize("layout", [{}, {"granularity": "channel", "axis": 1},
                                    {"granularity": "group", "axis": -1, "group_size": 5}])
@pytest.mark.parametrize("fmt", ["int8", "int4", "int16"])
def test_integer_backward_rounding_is_fake_quantize(fmt, layout):
    g = torch.randn(6, 7, 11, generator=torch.Generator().manual_seed(20))
    spec = QuantSpec(fmt, rounding="stochastic", **layout)
    got = quantize_backward(g, backward_spec(spec), torch.Generator().manual_seed(21))
    want = fake_quantize(g, fmt, axis=layout.get("axis"), group_size=layout.get("group_size"),
                         rounding="stochastic", generator=torch.Generator().manual_seed(21))
    assert torch.equal(got, want)


# ----------------------------------------------------------- FP8: representability, SQNR
def test_fp8_every_gemm_input_is_e5m2():
    torch.manual_seed(7)
    conv = QConv2d(4, 8, 3, padding=1, weight="e5m2", act="e5m2", grad="e5m2", gemm="fp8")
    lin = QLinear(8 * 36, 10, weight="e5m2", act="e5m2", grad="e5m2", gemm="fp8")
    x = torch.randn(5, 4, 6, 6, requires_grad=True)
    with record_gemm_inputs() as rec:
        y = lin(torch.relu(conv(x)).flatten(1))
        (y.square().sum() * 64).backward()
    stages = [(r.tag is conv, r.stage) for r in rec]
    assert len(rec) == 8 and stages.count((True, "dgrad")) == 1
    for r in rec:
        for t in (r.a, r.b):
            if t is not None:
                assert on_e5m2_grid(t), (r.stage, type(r.tag).__name__)
    assert on_e5m2_grid(conv.weight.grad) and on_e5m2_grid(lin.weight.grad)


def test_fp8_hybrid_backward_is_pow2_scaled_e5m2():
    torch.manual_seed(8)
    spec = QuantSpec("e5m2", observer="dynamic", rounding="stochastic")
    q = QLinear(16, 8, weight=QuantSpec("e4m3", observer="dynamic"),
                act=QuantSpec("e4m3", observer="dynamic"), grad=spec, gemm="qbackward")
    x = (torch.randn(32, 16) * 1e-3).requires_grad_()
    gout = torch.randn(32, 8) * 1e6  # far above e5m2's max: the scale brings it in range
    with record_gemm_inputs() as rec:
        q(x).backward(gout)
    fwd, dgrad, wgrad = rec[0], rec[1], rec[2]
    # e4m3 forward: on the grid of the scale the module's quantizer chose (idempotent)
    for t, src, quant in ((fwd.a, x, q.act_quant), (fwd.b, q.weight, q.weight_quant)):
        sc, _ = quant.dynamic_qparams(src)
        assert torch.equal(fake_quantize(t, "e4m3", scale=sc), t)
        assert not torch.equal(t, src.detach())
    e = dgrad.a
    assert torch.equal(wgrad.a, e)  # no bifurcation in this gemm
    amax = gout.abs().max()
    scale = 2.0 ** math.ceil(math.log2(float(amax) / E5M2.max))
    assert E5M2.max / 2 < amax / scale <= E5M2.max
    assert on_e5m2_grid(e / scale) and torch.isfinite(e).all()
    assert sqnr_db(gout, e) > 18


def _conv_case(seed: int, gscale: float):
    g0 = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 16, 8, 8, generator=g0).requires_grad_()
    w = (torch.randn(32, 16, 3, 3, generator=g0) * 0.1).requires_grad_()
    gout = torch.randn(32, 32, 8, 8, generator=g0) * gscale
    return x, w, gout


def test_gradients_close_to_float_sqnr():
    """SQNR of the quantized gradients against the float computation (same forward inputs).

    Measured (seeded): int8 error -> dx about 37 dB (theory for stochastic rounding of a
    Gaussian with max/sigma = a: 10 log10(6 * 127^2 / a^2), about 37 dB at a = 4.3); the int16
    copy -> dW about 85 dB; e5m2 stochastic -> dx about 22 dB, dW (also e5m2) about 20 dB.
    """
    x, w, gout = _conv_case(9, 1.0)
    rx, rw = torch.autograd.grad(F.conv2d(x, w, None, 1, 1), (x, w), gout)
    gen = torch.Generator().manual_seed(10)
    y = quantized_conv2d(x, w, None, 1, 1, error="int8",
                         backward=QuantizedBackward("int16"), generator=gen)
    gx, gw = torch.autograd.grad(y, (x, w), gout)
    a = float(gout.abs().max() / gout.std())
    theory = 10 * math.log10(6 * 127**2 / a**2)
    assert abs(sqnr_db(rx, gx) - theory) < 1.5
    assert sqnr_db(rw, gw) > 75
    y = quantized_conv2d(x, w, None, 1, 1, error="e5m2",
                         backward=QuantizedBackward(wgrad="e5m2"), generator=gen)
    gx, gw = torch.autograd.grad(y, (x, w), gout)
    assert sqnr_db(rx, gx) > 18 and sqnr_db(rw, gw) > 16


# ---------------------------------------------------------- stochastic rounding statistics
def _bracket(g: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid neighbours lo <= g <= hi that stochastic rounding chooses between."""
    f = get_format(fmt)
    if f.name.startswith("int"):
        s, _ = choose_qparams(g, f)
        t = g / s
        return torch.floor(t) * s, torch.ceil(t) * s
    never = torch.full(g.shape, 2**31 - 1, dtype=torch.int64)
    always = torch.zeros(g.shape, dtype=torch.int64)
    lo = round_to_float_format(g.abs(), f, "stochastic", rand31=never)
    hi = round_to_float_format(g.abs(), f, "stochastic", rand31=always)
    sign = torch.sign(g)
    return torch.minimum(lo * sign, hi * sign), torch.maximum(lo * sign, hi * sign)


@pytest.mark.parametrize("fmt", ["int8", "e5m2", "int4"])
def test_backward_rounding_is_unbiased_with_the_right_variance(fmt):
    g = torch.randn(1 << 16, generator=torch.Generator().manual_seed(11))
    q = quantize_backward(g, backward_spec(fmt), torch.Generator().manual_seed(12))
    lo, hi = _bracket(g, fmt)
    assert bool(((q == lo) | (q == hi)).all())
    var = (hi - g) * (g - lo)  # Bernoulli variance of each rounding
    z = float((q - g).sum() / var.sum().sqrt())
    assert abs(z) < 5, z  # unbiased: the total error is a sum of zero-mean terms
    ratio = float((q - g).pow(2).sum() / var.sum())
    assert abs(ratio - 1) < 0.05, ratio  # and its power is the Bernoulli variance


def test_mean_of_many_stochastic_backwards_approaches_the_float_gradient():
    g0 = torch.Generator().manual_seed(13)
    x = torch.randn(16, 12, generator=g0, requires_grad=True)
    w = torch.randn(10, 12, generator=g0)
    gout = torch.randn(16, 10, generator=g0)
    ref = gout @ w
    gen = torch.Generator().manual_seed(14)
    k = 400
    draws = torch.stack([
        torch.autograd.grad(quantized_linear(x, w, error="int4", generator=gen), x, gout)[0]
        for _ in range(k)
    ])
    se = draws.std(0) / math.sqrt(k)
    z = (draws.mean(0) - ref) / se
    assert float(z.abs().max()) < 5.5  # 192 entries, each ~N(0, 1) if unbiased
    assert float((draws[0] - ref).abs().max()) > 10 * float(se.max())  # one draw is noisy


def test_on_grid_values_round_to_themselves():
    g = torch.randn(4096, generator=torch.Generator().manual_seed(15)) * 100
    spec = backward_spec("e5m2")
    once = quantize_backward(g, spec, torch.Generator().manual_seed(16))
    twice = quantize_backward(once, spec, torch.Generator().manual_seed(17))
    assert torch.equal(once, twice)


def test_stochastic_rounding_reproducible_from_the_seed():
    def grads(seed: int, generator_seed: int | None):
        torch.manual_seed(seed)
        gen = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
        conv = QConv2d(3, 4, 3, weight="int8", act="uint8", grad=backward_spec("int8"),
                       gemm="bifurcated")
        conv.grad_quant.generator = gen
        x = torch.randn(2, 3, 6, 6, requires_grad=True)
        conv(x).square().sum().backward()
        return x.grad, conv.weight.grad

    # the global seed fixes init, data and rounding
    a, b = grads(0, None), grads(0, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the module's own generator fixes the rounding: same seed same bits, another seed not
    c, d, e = grads(0, 5), grads(0, 5), grads(0, 6)
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])
    assert not torch.equal(c[0], e[0]) and not torch.equal(c[1], e[1])


# ----------------------------------------------------------------------- overflow
def test_fp8_error_overflow_becomes_inf_and_the_loss_scaler_skips():
    torch.manual_seed(18)
    q = QLinear(8, 4, weight="e5m2", act="e5m2", grad="e5m2", gemm="fp8")
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    scaler = EnhancedLossScaler(init_scale=2.0**20, min_scale=1.0, floor_interval=0)
    before = q.weight.detach().clone()
    x = torch.randn(6, 8, requires_grad=True)
    loss = q(x).square().sum() * 100
    with record_gemm_inputs() as rec:
        scaler.scale(loss).backward()
    e = rec[0].a
    assert torch.isinf(e).any()  # not saturated at 57344
    assert not torch.isfinite(q.weight.grad).all()
    assert scaler.step(opt) is False
    scaler.update()
    assert torch.equal(q.weight.detach(), before)
    assert scaler.loss_scale == 2.0**19


def test_fp8_weight_gradient_overflow_alone_is_visible():
    """Errors in range, but their sum over the batch exceeds e5m2's max: dW becomes inf."""
    x = torch.full((4096, 2), 16.0, requires_grad=True)
    w = torch.ones(1, 2)
    w.requires_grad_(True)
    y = quantized_linear(x, w, error="e5m2", backward=QuantizedBackward(wgrad="e5m2"))
    gout = torch.full(y.shape, 1.0)
    with record_gemm_inputs() as rec:
        y.backward(gout)
    assert torch.isfinite(rec[0].a).all()  # the error itself is fine
    assert torch.isinf(w.grad).all()  # 65536 > 57344


@pytest.mark.parametrize("err", ["int8", QuantSpec("e5m2", observer="dynamic")])
def test_non_finite_errors_pass_through_unrounded(err):
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(2, 4, requires_grad=True)
    y = quantized_linear(x, w, error=err, backward=QuantizedBackward("int16"))
    gout = torch.randn(3, 2)
    gout[1, 0] = float("inf")
    with record_gemm_inputs() as rec:
        y.backward(gout)
    assert torch.equal(rec[0].a, gout) and torch.equal(rec[1].a, gout)
    assert not torch.isfinite(w.grad).all()


# ---------------------------------------------------------------- modules and registry
@pytest.mark.parametrize("kw", [dict(padding="same"), dict(padding=1, padding_mode="reflect"),
                                dict(padding="valid", stride=2), dict(padding=(1, 2))])
def test_conv_padding_variants_match_the_default_gemm(kw):
    torch.manual_seed(19)
    a = QConv2d(3, 4, 3, **kw)
    b = QConv2d(3, 4, 3, gemm="qbackward", **kw)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 7, 7)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-4)
    torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a.bias.grad, b.bias.grad, rtol=1e-5, atol=1e-4)


def test_registry_and_validation():
    assert {"qbackward", "bifurcated", "bifurcated-fp32", "fp8"} <= set(list_qgemms())
    assert get_qgemm("bifurcated").wgrad_error.format_name == "int16"
    assert get_qgemm("fp8").wgrad.format_name == "e5m2"
    assert get_qgemm("fp8").wgrad.rounding == "stochastic"
    assert get_qgemm("fp8-nearest").wgrad.rounding == "nearest"
    with pytest.raises(ValueError, match="choose one of"):
        get_qgemm("fp9")
    with pytest.raises(ValueError, match="already registered"):
        register_qgemm("fp8", wgrad="e4m3")
    with pytest.raises(ValueError, match="cannot round a gradient"):
        backward_spec("binary")
    with pytest.raises(ValueError, match="gradients are signed"):
        backward_spec("uint8")
    with pytest.raises(ValueError, match="observer must be"):
        QuantizedBackward(wgrad=QuantSpec("int8", observer="ema"))
    with pytest.raises(ValueError, match="explicit axis"):
        backward_spec(QuantSpec("int8", granularity="channel"))
    with pytest.raises(ValueError, match="'tensor' or 'channel'"):
        backward_spec(QuantSpec("e5m2", granularity="group", axis=0, group_size=4,
                                observer="dynamic"))
    with pytest.raises(TypeError, match="wgrad_error must be"):
        QuantizedBackward(wgrad_error=3)
    with pytest.raises(ValueError, match="'fmt' key"):
        backward_spec({"rounding": "nearest"})
    assert backward_spec({"fmt": "int8"}).rounding == "stochastic"
    with pytest.raises(TypeError, match="stride"):
        quantized_conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1), stride=1.5)
    with pytest.raises(ValueError, match="cannot round a gradient"):
        quantized_linear(torch.randn(2, 2), torch.randn(2, 2), error="ternary")


def test_custom_registration_reaches_modules():
    name = "test-qgemm-fp16-copy"
    register_qgemm(name, wgrad_error="fp16", wgrad="bf16", overwrite=True)
    q = QLinear(6, 3, grad="int8", gemm=name)
    x = torch.randn(5, 6, requires_grad=True)
    with record_gemm_inputs() as rec:
        q(x).sum().backward()
    copy = rec[1].a
    assert torch.equal(copy.half().float(), copy)
    assert torch.equal(q.weight.grad.bfloat16().float(), q.weight.grad)


def test_nested_recorders_each_see_their_block():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(2, 4)
    with record_gemm_inputs() as outer:
        with record_gemm_inputs() as inner:
            pass
        with record_gemm_inputs() as inner2:
            quantized_linear(x, w).sum().backward()
    assert inner == [] and [r.stage for r in inner2] == ["forward", "dgrad"]
    assert [r.stage for r in outer] == ["forward", "dgrad"]
    quantized_linear(x, w).sum().backward()
    assert len(outer) == 2  # closed recorders stop collecting
