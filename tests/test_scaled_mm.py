"""Real FP8 products (torch._scaled_mm) against the simulated FP8 path of lowbit.nn.qgemm.

The real gemms ("fp8-scaled-mm", "fp8-nearest-scaled-mm", "fp8-hybrid-scaled-mm") round
every GEMM input exactly as their simulated twins and only change how the products are
computed, so: the float8 storage must be lossless, every GEMM input must be the same value,
and outputs and gradients may differ only by the order of the FP32 accumulation.
The CPU tests run where this torch build's _scaled_mm runs on CPU (probed); the CUDA test
needs compute capability 8.9+.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.nn import QConv2d, QLinear, convert, record_gemm_inputs
from lowbit.nn.convert import get_scheme
from lowbit.nn.modules import list_gemms
from lowbit.nn.qgemm import (
    float8_dtype,
    float8_linear,
    float8_mm,
    get_qgemm,
    register_qgemm,
    scaled_mm_supported,
    to_float8,
)
from lowbit.quant import fake_quantize

E5M2, E4M3 = torch.float8_e5m2, torch.float8_e4m3fn
CPU_OK = all(scaled_mm_supported("cpu", a, b) for a in (E5M2, E4M3) for b in (E5M2, E4M3))
needs_cpu_kernel = pytest.mark.skipif(not CPU_OK, reason="torch._scaled_mm does not run on CPU "
                                      "in this torch build")
PAIRS = {"fp8": "fp8-scaled-mm", "fp8-rne": "fp8-nearest-scaled-mm",
         "fp8-hybrid": "fp8-hybrid-scaled-mm"}
U = 2.0**-24  # unit roundoff of float32


def accumulation_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |fl(a @ b) - fl'(a @ b)| for two FP32 summation orders:
    each is within k*u*(|a| @ |b|) of the exact product (k = inner size)."""
    k = a.shape[-1]
    return 2 * (k + 2) * U * (a.double().abs() @ b.double().abs()).float() + 1e-30


def test_float8_dtype_and_errors():
    assert float8_dtype("e5m2") is E5M2 and float8_dtype("e4m3") is E4M3
    with pytest.raises(ValueError, match="e4m3"):
        float8_dtype("e3m2")
    with pytest.raises(ValueError, match="scaling"):
        to_float8(torch.ones(3), "e5m2", scaling="max")
    with pytest.raises(ValueError, match="pad_to"):
        float8_mm(torch.ones(2, 2).to(E5M2), torch.ones(2, 2).to(E5M2), torch.ones(()),
                  torch.ones(()), pad_to=0)
    with pytest.raises(ValueError, match=r"\[m, k\]"):
        float8_mm(torch.ones(2, 3).to(E5M2), torch.ones(2, 2).to(E5M2), torch.ones(()),
                  torch.ones(()))
    assert {"fp8-scaled-mm", "fp8-nearest-scaled-mm", "fp8-hybrid-scaled-mm"} <= set(list_gemms())
    with pytest.raises(ValueError, match="kernel"):
        register_qgemm("x-scaled", get_qgemm("fp8"), kernel="cutlass")
    with pytest.raises(ValueError, match="FP32"):  # a FP32 error copy cannot be float8
        register_qgemm("x-scaled", get_qgemm("bifurcated-fp32"), kernel="scaled_mm")


def test_scaled_mm_support_rules():
    assert not scaled_mm_supported("meta")
    if not torch.cuda.is_available():
        assert not scaled_mm_supported("cuda")


# ------------------------------------------------------------------- lossless storage
@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["e5m2", "e4m3"]), log2_scale=st.integers(-20, 20),
       rows=st.integers(1, 9), cols=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_to_float8_is_lossless_on_the_grid(fmt, log2_scale, rows, cols, seed):
    """Values fake-quantized unscaled, with a power-of-two scale, or with the amax scale of
    the "dynamic" observer come back bit for bit from their float8 storage."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 2.0**log2_scale
    fmax = 448.0 if fmt == "e4m3" else 57344.0
    # unscaled: the format's own grid (saturating), as the FP8 paper's weights/activations
    xq = fake_quantize(x, fmt)
    t8, s = to_float8(xq, fmt, scaling="none")
    assert t8.dtype == float8_dtype(fmt) and float(s) == 1.0
    assert torch.equal(t8.float(), xq)
    # power-of-two scaled (any power of two: the scale need not be the smallest one)
    s2 = torch.tensor(2.0**(log2_scale - 3))
    xq = fake_quantize(x, fmt, scale=s2)
    t8, s = to_float8(xq, fmt, scaling="pow2")
    assert torch.equal(t8.float() * s, xq)
    assert float(xq.abs().max() / s) <= fmax
    # amax-scaled (scale = max|x| / fmt.max, not a power of two)
    sa = (x.abs().max() / fmax).clamp_min(1e-30)
    xq = fake_quantize(x, fmt, scale=sa)
    t8, s = to_float8(xq, fmt, scaling="amax")
    q = xq / sa  # the grid values the quantizer chose
    assert torch.equal(t8.float(), fake_quantize(q, fmt))
    assert torch.allclose(t8.float() * s, xq, rtol=4 * U, atol=0)


def test_to_float8_keeps_overflow_visible():
    e = torch.tensor([1.0, float("inf"), -3.0])
    for scaling in ("none", "pow2", "amax"):
        t8, s = to_float8(e, "e5m2", scaling=scaling)
        assert torch.isinf(t8.float() * s).any()
    t8, _ = to_float8(torch.tensor([1e6, 2.0]), "e5m2")  # beyond 57344: inf, never saturated
    assert torch.isinf(t8.float()[0])


# ------------------------------------------------------------------------ the kernel
@needs_cpu_kernel
@pytest.mark.parametrize("fa,fb", [(E5M2, E5M2), (E4M3, E5M2), (E5M2, E4M3), (E4M3, E4M3)])
@pytest.mark.parametrize("pad_to", [None, 16])
def test_float8_mm_matches_the_float_product(fa, fb, pad_to):
    """Against an FP64 product of the dequantized operands: within the FP32 accumulation
    bound; zero padding to multiples of 16 (as on CUDA) changes nothing beyond it."""
    g = torch.Generator().manual_seed(0)
    a8 = (torch.randn(37, 70, generator=g) * 3).to(fa)
    b8 = (torch.randn(70, 23, generator=g) / 3).to(fb)
    sa, sb = torch.tensor(0.375), torch.tensor(2.0**-5)
    out = float8_mm(a8, b8, sa, sb, pad_to=pad_to)
    a, b = a8.double() * 0.375, b8.double() * 2.0**-5
    exact = a @ b
    assert out.dtype == torch.float32 and out.shape == (37, 23)
    assert ((out.double() - exact).abs() <= accumulation_bound(a, b).double()).all()


# --------------------------------------------------------------- the gemms vs simulated
def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 32), nn.GELU(),
                         nn.Linear(32, 10))


def step(model: nn.Module, x: torch.Tensor, loss_scale: float, seed: int):
    """One loss-scaled forward/backward: (output, input grad, param grads, gemm records)."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # the stochastic rounding draws from the global generator
    with record_gemm_inputs() as rec:
        y = model(x)
        (torch.nn.functional.cross_entropy(y.reshape(-1, 10), torch.arange(y.numel() // 10)
                                           % 10) * loss_scale).backward()
    return y.detach(), x.grad, [p.grad for p in model.parameters()], rec


@needs_cpu_kernel
@pytest.mark.parametrize("scheme", list(PAIRS))
def test_real_fp8_gemm_equals_the_simulated_one(scheme):
    """Same model, same seed: every GEMM input (forward, dgrad, wgrad) is the same value,
    the real path ran every product on _scaled_mm, and output, input gradient and weight
    gradients agree within the FP32 accumulation-order bound."""
    base = get_scheme(scheme)
    sim = convert(mlp(), base, first_last="same")
    real = convert(mlp(), dataclasses.replace(base, gemm=PAIRS[scheme]), first_last="same")
    x = torch.randn(4, 9, 24, generator=torch.Generator().manual_seed(1))
    ys, gxs, _, rs = step(sim, x, 2.0**10, seed=3)
    yr, gxr, _, rr = step(real, x, 2.0**10, seed=3)
    assert [r.stage for r in rs] == [r.stage for r in rr]
    assert [r.stage for r in rr].count("dgrad") == 3 and len(rr) == 3 * 4
    for a, b in zip(rs, rr, strict=True):
        if a.stage != "weight_grad":
            assert b.kernel == "scaled_mm" and a.kernel == "float"
            assert torch.equal(a.a, b.a) and torch.equal(a.b, b.b), a.stage
    # forward output: bounded by the last layer's product
    last = [r for r in rs if r.stage == "forward"][-1]
    bound = accumulation_bound(last.a.reshape(-1, last.a.shape[-1]), last.b.t())
    assert ((ys - yr).abs().reshape(bound.shape) <= bound).all()
    # input gradient: bounded by the first layer's dgrad product
    first = [r for r in rs if r.stage == "dgrad"][-1]
    bound = accumulation_bound(first.a.reshape(-1, first.a.shape[-1]), first.b)
    assert ((gxs - gxr).abs().reshape(bound.shape) <= bound).all()
    # weight gradients: FP32 products within the accumulation bound (hybrid), or those
    # products rounded to e5m2 with the same random draws (fp8, fp8-rne): the same grid
    # value, or a neighbour where the two products straddle a rounding boundary
    rounded = get_qgemm(base.gemm).wgrad is not None
    for ms, mr in zip(sim, real, strict=True):
        if not isinstance(ms, QLinear):
            continue
        wg = next(r for r in rs if r.stage == "wgrad" and r.tag is ms)
        a, b = ms.weight.grad, mr.weight.grad
        if not rounded:
            assert ((a - b).abs() <= accumulation_bound(wg.a.t(), wg.b)).all()
            continue
        assert torch.equal(fake_quantize(b, "e5m2"), b)
        ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(a.abs(), b.abs()))) - 2)
        assert ((a - b).abs() <= ulp).all()
        assert float((a != b).float().mean()) < 0.01
        assert torch.allclose(ms.bias.grad, mr.bias.grad, rtol=1e-5, atol=1e-5)


@needs_cpu_kernel
def test_real_fp8_overflow_reaches_the_loss_scaler():
    model = convert(mlp(), dataclasses.replace(get_scheme("fp8"), gemm="fp8-scaled-mm"),
                    first_last="same")
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(0))
    _, _, grads, rec = step(model, x, 2.0**40, seed=0)
    assert any(torch.isinf(r.a).any() for r in rec if r.stage == "dgrad")
    assert not all(torch.isfinite(g).all() for g in grads)


@needs_cpu_kernel
def test_real_fp8_linear_functional_and_checks():
    x = fake_quantize(torch.randn(6, 16), "e5m2").requires_grad_()
    w = fake_quantize(torch.randn(8, 16) / 4, "e5m2").requires_grad_()
    b = torch.randn(8, requires_grad=True)
    y = float8_linear(x, w, b, x_spec="e5m2", weight_spec="e5m2", error="e5m2")
    assert torch.allclose(y, torch.nn.functional.linear(x, w, b), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert torch.equal(b.grad, torch.full((8,), 6.0))
    with pytest.raises(ValueError, match="FP32"):
        float8_linear(x, w, b, x_spec=None, weight_spec="e5m2", error="e5m2")
    with pytest.raises(ValueError, match="int8"):
        float8_linear(x, w, b, x_spec="int8", weight_spec="e5m2", error="e5m2")
    with pytest.raises(ValueError, match="error"):
        float8_linear(x, w, b, x_spec="e5m2", weight_spec="e5m2", error=None)


def test_convolutions_keep_the_simulated_product():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    q = convert(net, dataclasses.replace(get_scheme("fp8"), gemm="fp8-scaled-mm"),
                first_last="same")
    assert all(isinstance(m, QConv2d) for m in q if isinstance(m, nn.Conv2d))
    with record_gemm_inputs() as rec:
        q(torch.randn(2, 3, 8, 8)).sum().backward()
    assert rec and all(r.kernel == "float" for r in rec)


@pytest.mark.skipif(not (torch.cuda.is_available()
                         and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)")
def test_real_fp8_hybrid_on_cuda_matches_simulated():
    """e4m3 forward x e4m3 weights, e5m2 errors x e4m3: the pairs cuBLASLt runs."""
    dev = torch.device("cuda")
    base = get_scheme("fp8-hybrid")
    sim = convert(mlp(), base, first_last="same").to(dev)
    real = convert(mlp(), dataclasses.replace(base, gemm="fp8-hybrid-scaled-mm"),
                   first_last="same").to(dev)
    x = torch.randn(4, 9, 24, device=dev)
    ys, gxs, gps, rs = step(sim, x, 2.0**10, seed=3)
    yr, gxr, gpr, rr = step(real, x, 2.0**10, seed=3)
    assert all(r.kernel == "scaled_mm" for r in rr if r.stage != "weight_grad")
    assert torch.allclose(ys, yr, rtol=1e-4, atol=1e-5)
    assert torch.allclose(gxs, gxr, rtol=1e-4, atol=1e-6)
    for a, b in zip(gps, gpr, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_qlinear_gemm_name_round_trips():
    q = QLinear(4, 3, weight="e5m2", act="e5m2", grad="e5m2", gemm="fp8-scaled-mm")
    assert "gemm=fp8-scaled-mm" in repr(q)
