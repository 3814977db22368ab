"""Range / L1 / L-inf BatchNorm and bounded weight normalisation (issue 6, item 2)."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.nn.batchnorm import (
    BATCHNORM_VARIANTS,
    L1BatchNorm1d,
    L1BatchNorm2d,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
    RangeBatchNorm1d,
    RangeBatchNorm2d,
    expected_gaussian_range,
    expected_topk_abs_gaussian,
    replace_batchnorm,
)
from lowbit.nn.weight_norm import (
    BoundedWeightNorm,
    apply_bounded_weight_norm,
    remove_bounded_weight_norm,
)

scipy_integrate = pytest.importorskip("scipy.integrate")
scipy_stats = pytest.importorskip("scipy.stats")

# (class 1d, class 2d, kwargs, label) for every estimator under test
VARIANTS_1D = [
    (RangeBatchNorm1d, {}, "range"),
    (RangeBatchNorm1d, {"num_chunks": 16}, "range/16 chunks"),
    (L1BatchNorm1d, {}, "l1"),
    (LinfBatchNorm1d, {}, "linf k=10"),
]
ALL_2D = [
    (RangeBatchNorm2d, {}),
    (RangeBatchNorm2d, {"num_chunks": 5}),
    (L1BatchNorm2d, {}),
    (LinfBatchNorm2d, {"topk": 3}),
]


# ------------------------------------------------------------------------------------------
# Independent references (scipy quadrature of the textbook formulas)
# ------------------------------------------------------------------------------------------


@functools.cache
def scipy_expected_range(n: int) -> float:
    """E[R_n] = int (1 - Phi^n - (1 - Phi)^n) dx, by scipy.integrate.quad."""
    norm = scipy_stats.norm

    def f(x: float) -> float:
        return 1.0 - norm.cdf(x) ** n - norm.sf(x) ** n

    centre = norm.isf(1.0 / n) if n > 2 else 1.0
    pts = [0.0, centre * 0.5, centre, centre + 1.0, centre + 3.0]
    value, _ = scipy_integrate.quad(f, 0.0, 40.0, points=pts, limit=500, epsabs=1e-13)
    return 2.0 * value


def scipy_expected_topk(n: int, k: int) -> float:
    """Mean over the k largest of E[|Z|_(r)], each from its Beta order-statistic density."""
    half = scipy_stats.halfnorm
    total = 0.0
    for r in range(n - k + 1, n + 1):

        def f(x: float, r: int = r) -> float:
            return x * scipy_stats.beta.pdf(half.cdf(x), r, n - r + 1) * half.pdf(x)

        total += scipy_integrate.quad(f, 0.0, 40.0, limit=500, epsabs=1e-13)[0]
    return total / k


def sigma_hat(module_cls: type, x: torch.Tensor, **kw: object) -> torch.Tensor:
    """The module's per-channel estimate of the population std (running_var with momentum 1)."""
    m = module_cls(x.shape[1], momentum=1.0, **kw)
    m(x)
    return m.running_var.sqrt()


# ------------------------------------------------------------------------------------------
# Gaussian constants
# ------------------------------------------------------------------------------------------


def test_expected_range_known_values() -> None:
    assert expected_gaussian_range(1) == 0.0
    assert expected_gaussian_range(2) == pytest.approx(2 / math.sqrt(math.pi), abs=1e-13)
    assert expected_gaussian_range(3) == pytest.approx(3 / math.sqrt(math.pi), abs=1e-13)
    # Tippett's (1925) table, 4 decimals
    for n, value in [(4, 2.0588), (5, 2.3259), (10, 3.0775), (100, 5.0152)]:
        assert expected_gaussian_range(n) == pytest.approx(value, abs=5e-5)


@pytest.mark.parametrize("n", [2, 7, 50, 256, 1000, 10**5, 10**7])
def test_expected_range_matches_scipy_quad(n: int) -> None:
    assert expected_gaussian_range(n) == pytest.approx(scipy_expected_range(n), rel=1e-9)


def test_expected_range_increases_and_grows_like_sqrt_2_ln_n() -> None:
    ns = [2, 3, 10, 100, 10**3, 10**4, 10**6, 10**9]
    values = [expected_gaussian_range(n) for n in ns]
    assert all(a < b for a, b in zip(values, values[1:]))
    # E[R_n] / (2 sqrt(2 ln n)) -> 1 slowly from below
    ratios = [v / (2 * math.sqrt(2 * math.log(n))) for v, n in zip(values[2:], ns[2:])]
    assert all(a < b < 1.0 for a, b in zip(ratios, ratios[1:]))


def test_expected_topk_special_cases() -> None:
    for n in (1, 2, 17, 300):
        assert expected_topk_abs_gaussian(n, n) == pytest.approx(math.sqrt(2 / math.pi), 1e-11)
    # k = 1: E[max |Z|] = int (1 - erf(x/sqrt 2)^n) dx
    for n in (1, 5, 256, 10**5):

        def f(x: float, n: int = n) -> float:
            return 1.0 - math.erf(x / math.sqrt(2.0)) ** n

        ref = scipy_integrate.quad(f, 0, 40, points=[1, 3, 5], limit=500, epsabs=1e-13)[0]
        assert expected_topk_abs_gaussian(n, 1) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize(("n", "k"), [(40, 7), (120, 10)])
def test_expected_topk_matches_order_statistics(n: int, k: int) -> None:
    assert expected_topk_abs_gaussian(n, k) == pytest.approx(scipy_expected_topk(n, k), rel=1e-8)


def test_expected_topk_matches_monte_carlo() -> None:
    n, k, trials = 4096, 10, 2000
    g = torch.Generator().manual_seed(0)
    z = torch.randn(trials, n, generator=g, dtype=torch.float64).abs()
    means = z.topk(k, dim=1).values.mean(dim=1)
    se = float(means.std()) / math.sqrt(trials)
    assert abs(float(means.mean()) - expected_topk_abs_gaussian(n, k)) < 4 * se


def test_constant_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="n must be >= 1"):
        expected_gaussian_range(0)
    with pytest.raises(TypeError, match="n must be an int"):
        expected_gaussian_range(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be <= n"):
        expected_topk_abs_gaussian(5, 6)
    with pytest.raises(ValueError, match="k must be <= 1024"):
        expected_topk_abs_gaussian(5000, 1025)


# ------------------------------------------------------------------------------------------
# Statistics: unit variance, zero mean, unbiased scale
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "kw", "label"), VARIANTS_1D, ids=[v[2] for v in VARIANTS_1D])
@pytest.mark.parametrize("n", [256, 4096, 65536, 10**6])
def test_unit_variance_zero_mean_on_gaussian_input(cls: type, kw: dict, label: str, n: int) -> None:
    """Per channel (one independent trial each) over a batch of n Gaussian values.

    The issue's bound: mean 0 and std 1 within 3 %, averaged over the trials; the number of
    trials keeps the standard error of that average at or below 1 % (measured, asserted). The
    scale estimate itself is unbiased for sigma: its mean is within 4 standard errors.
    """
    # 24 trials suffice at 10**6 (the range's coefficient of variation is 3.5 % there)
    trials = 24 if n >= 10**6 else max(48, 2**21 // n)
    group = max(1, 2**22 // n)  # channels per call, to bound memory at large n
    g = torch.Generator().manual_seed(n)
    sigma, mu = 2.5, -1.5
    ys, scales = [], []
    for start in range(0, trials, group):
        width = min(group, trials - start)
        m = cls(width, momentum=1.0, **kw)
        with torch.no_grad():
            ys.append(m(torch.randn(n, width, generator=g) * sigma + mu))
        scales.append(m.running_var.sqrt())
    y = torch.cat(ys, dim=1)
    out_std = y.std(dim=0, unbiased=False)
    se_std = float(out_std.std()) / math.sqrt(trials)
    assert se_std < 0.01
    assert abs(float(out_std.mean()) - 1.0) < 0.03
    assert float(y.mean(dim=0).abs().max()) < 1e-5
    ratio = torch.cat(scales) / sigma
    se = float(ratio.std()) / math.sqrt(trials)
    assert abs(float(ratio.mean()) - 1.0) < 4 * se


@pytest.mark.parametrize("n", [256, 4096, 65536])
def test_paper_and_code_constants_are_biased(n: int) -> None:
    """The two published constants do not normalise Gaussian data to unit variance."""
    trials = max(16, 2**20 // n)
    x = torch.randn(n, trials, generator=torch.Generator().manual_seed(1))
    paper = sigma_hat(RangeBatchNorm1d, x, range_constant="paper").mean()
    code = sigma_hat(RangeBatchNorm1d, x, range_constant="code", num_chunks=16).mean()
    exact = sigma_hat(RangeBatchNorm1d, x)
    assert 1.6 < float(paper) < 1.9  # output std 0.53-0.63
    assert float(code) < 0.98  # output std > 1.02
    se = float(exact.std()) / math.sqrt(trials)
    assert abs(float(exact.mean()) - 1.0) < 4 * se


@pytest.mark.parametrize(("n", "chunks"), [(33, 16), (250, 16), (1000, 7)])
def test_chunked_range_is_unbiased_with_a_remainder(n: int, chunks: int) -> None:
    """Chunk sizes differ by one when n % chunks != 0; each uses its own E[R_m].

    With 33 values in 16 chunks (one chunk of 3), treating the 3-chunk as a 2-chunk would bias
    sigma_hat by about 3 %, i.e. tens of standard errors here.
    """
    trials = 2**19 // n
    x = torch.randn(n, trials, generator=torch.Generator().manual_seed(n)) * 0.7
    ratio = sigma_hat(RangeBatchNorm1d, x, num_chunks=chunks) / 0.7
    se = float(ratio.std()) / math.sqrt(trials)
    assert se < 0.003
    assert abs(float(ratio.mean()) - 1.0) < 4 * se


def test_chunked_range_matches_an_independent_reference() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 7, 2, generator=g, dtype=torch.float64)  # n = 70 per channel
    for chunks in (1, 3, 16, 40):  # 40 > n // 2: falls back to 35 chunks of 2
        got = sigma_hat(RangeBatchNorm2d, x.float(), num_chunks=chunks).double()
        flat = x.transpose(0, 1).reshape(3, -1).numpy()
        eff = min(chunks, 70 // 2)
        ref = []
        for row in flat:
            parts = np.array_split(row, eff)
            ref.append(np.mean([np.ptp(p) / scipy_expected_range(len(p)) for p in parts]))
        torch.testing.assert_close(got, torch.tensor(ref), rtol=2e-6, atol=0)


@pytest.mark.parametrize(
    ("cls", "kw", "bound"),
    [
        (RangeBatchNorm2d, {}, 0.06),
        (RangeBatchNorm2d, {"num_chunks": 16}, 0.025),
        (L1BatchNorm2d, {}, 0.003),
        (LinfBatchNorm2d, {}, 0.035),
    ],
)
def test_outputs_match_batchnorm_closely(cls: type, kw: dict, bound: float) -> None:
    """On Gaussian input a variant is BN times a per-channel factor s/sigma_hat close to 1.

    The relative RMS difference to BN is the spread of that factor, i.e. the coefficient of
    variation of the scale estimator at n = 65536 (measured 0.043 range, 0.017 range over 16
    chunks, 0.0011 L1, 0.025 top-10); the bounds are about 1.4x that, > 4 standard errors of
    an RMS over 64 channels.
    """
    x = torch.randn(64, 64, 32, 32, generator=torch.Generator().manual_seed(2)) * 3 + 1
    with torch.no_grad():
        ref = nn.BatchNorm2d(64)(x)
        y = cls(64, **kw)(x)
    factor = y.std(dim=(0, 2, 3), keepdim=True) / ref.std(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(y, ref * factor, rtol=1e-4, atol=1e-4)
    assert float((y - ref).norm() / ref.norm()) < bound


# ------------------------------------------------------------------------------------------
# Forward against the formula, train/eval and running statistics
# ------------------------------------------------------------------------------------------


def reference_forward(x: np.ndarray, sigma: np.ndarray, w: np.ndarray, b: np.ndarray,
                      eps: float) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    n = x.size // x.shape[1]
    mean = x.mean(axis=tuple(d for d in range(x.ndim) if d != 1)).reshape(shape)
    var_b = (sigma**2 * (n - 1) / n).reshape(shape)
    return (x - mean) / np.sqrt(var_b + eps) * w.reshape(shape) + b.reshape(shape)


def numpy_sigma(kind: str, x: np.ndarray, k: int = 10) -> np.ndarray:
    flat = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    n = flat.shape[1]
    dev = np.abs(flat - flat.mean(axis=1, keepdims=True))
    if kind == "range":
        return np.ptp(flat, axis=1) / scipy_expected_range(n)
    if kind == "l1":
        return dev.mean(axis=1) * math.sqrt(math.pi / 2 * n / (n - 1))
    top = -np.sort(-dev, axis=1)[:, : min(k, n)].mean(axis=1)
    return top / (scipy_expected_topk(n, min(k, n)) * math.sqrt((n - 1) / n))


@pytest.mark.parametrize("kind", ["range", "l1", "linf"])
def test_training_forward_matches_numpy_reference(kind: str) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 4, 5, 3, generator=g, dtype=torch.float64) * 2 + 0.5
    m = BATCHNORM_VARIANTS[kind][1](4, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.uniform_(-1, 1, generator=g)
    y = m(x).detach().numpy()
    sig = numpy_sigma(kind, x.numpy())
    ref = reference_forward(x.numpy(), sig, m.weight.detach().numpy(), m.bias.detach().numpy(),
                            1e-3)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.running_var.numpy(), 0.9 + 0.1 * sig**2, rtol=1e-12)


@pytest.mark.parametrize(("cls", "kw"), ALL_2D)
@pytest.mark.parametrize("momentum", [0.1, None, 0.0])
def test_running_stats_follow_pytorch_ema(cls: type, kw: dict, momentum: float | None) -> None:
    g = torch.Generator().manual_seed(5)
    bn = nn.BatchNorm2d(3, momentum=momentum)
    m = cls(3, momentum=momentum, **kw)
    expected_var = torch.ones(3)
    for step in range(1, 4):
        x = torch.randn(8, 3, 4, 4, generator=g) * step + step
        bn(x)
        sig = sigma_hat(cls, x, **kw)  # this batch's estimate, from a fresh module
        m(x)
        f = 1.0 / step if momentum is None else momentum
        expected_var = (1 - f) * expected_var + f * sig**2
        assert int(m.num_batches_tracked) == int(bn.num_batches_tracked) == step
    torch.testing.assert_close(m.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var, expected_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("cls", "kw"), ALL_2D)
def test_eval_uses_running_stats_exactly_like_batchnorm(cls: type, kw: dict) -> None:
    g = torch.Generator().manual_seed(6)
    m = cls(3, **kw)
    for _ in range(3):
        m(torch.randn(4, 3, 5, 5, generator=g) * 2 + 1)
    with torch.no_grad():
        m.weight.uniform_(0.5, 2.0, generator=g)
        m.bias.normal_(generator=g)
    bn = nn.BatchNorm2d(3)
    bn.load_state_dict(m.state_dict())
    m.eval()
    bn.eval()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 3, 5, 5, generator=g)
    assert torch.equal(m(x), bn(x))
    for key, value in m.state_dict().items():  # eval does not touch the running statistics
        assert torch.equal(value, before[key]), key
    # a single sample is fine in eval mode (running statistics), as for BN
    assert m(x[:1, :, :1, :1]).shape == (1, 3, 1, 1)


def test_train_mode_uses_batch_stats_and_no_tracking_uses_batch_stats_in_eval() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 4, 3, 3, generator=g) * 5 + 2
    m = RangeBatchNorm2d(4, track_running_stats=False)
    assert m.running_mean is None and m.running_var is None and m.num_batches_tracked is None
    y_train = m(x)
    m.eval()
    torch.testing.assert_close(m(x), y_train, rtol=0, atol=0)
    # with tracking, the first training output is normalised by the batch, not by running stats
    t = RangeBatchNorm2d(4)
    out = t(x).detach()
    assert float(out.std(dim=(0, 2, 3), unbiased=False).sub(1).abs().max()) < 0.5
    assert float(out.mean(dim=(0, 2, 3)).abs().max()) < 1e-5


def test_half_precision_input_keeps_dtype() -> None:
    x = torch.randn(32, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    for cls, kw in ALL_2D:
        m = cls(4, **kw)
        y16 = m(x.bfloat16())
        assert y16.dtype == torch.bfloat16
        y32 = cls(4, **kw)(x.bfloat16().float())
        torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------
# Gradients, invariances, small-n edge cases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kw", "shape"),
    [
        (RangeBatchNorm1d, {}, (7, 3)),
        (RangeBatchNorm1d, {"num_chunks": 3}, (5, 2, 3)),
        (RangeBatchNorm2d, {"num_chunks": 4}, (3, 2, 3, 3)),
        (L1BatchNorm1d, {}, (6, 3)),
        (L1BatchNorm2d, {}, (3, 2, 2, 3)),
        (LinfBatchNorm1d, {"topk": 3}, (8, 2)),
        (LinfBatchNorm2d, {"topk": 4}, (2, 2, 3, 3)),
    ],
)
def test_gradcheck_float64(cls: type, kw: dict, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(9)
    m = cls(shape[1], eps=1e-3, dtype=torch.float64, track_running_stats=False, **kw)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(generator=g)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    w, b = m.weight, m.bias
    assert torch.autograd.gradcheck(
        lambda ww, bb: torch.func.functional_call(m, {"weight": ww, "bias": bb}, (x.detach(),)),
        (w.detach().requires_grad_(), b.detach().requires_grad_()),
    )


def naive_forward(x: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float, *, num_chunks: int | None = None, topk: int = 10,
                  act_format: str | None = None) -> torch.Tensor:
    """The estimators written plainly, differentiated by autograd (reference for backward)."""
    from lowbit.quant.functional import fake_quantize

    dims = (0, *range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    n = x.numel() // x.shape[1]
    c = x - x.mean(dim=dims, keepdim=True)
    if act_format is not None:
        c = fake_quantize(c, act_format, axis=1)
    flat = c.movedim(1, 0).reshape(x.shape[1], -1)
    if kind == "range":
        chunks = 1 if num_chunks is None else min(num_chunks, n // 2)
        parts = torch.tensor_split(flat, chunks, dim=1)
        sigma = torch.stack(
            [(p.amax(1) - p.amin(1)) / expected_gaussian_range(p.shape[1]) for p in parts]
        ).mean(0)
    elif kind == "l1":
        sigma = flat.abs().mean(1) * math.sqrt(math.pi / 2 * n / (n - 1))
    else:
        k = min(topk, n)
        top = flat.abs().topk(k, dim=1).values.mean(1)
        sigma = top / (expected_topk_abs_gaussian(n, k) * math.sqrt((n - 1) / n))
    inv = torch.rsqrt(sigma**2 * (n - 1) / n + eps)
    return c * inv.view(shape) * weight.view(shape) + bias.view(shape)


@pytest.mark.parametrize(
    ("kind", "kw", "shape"),
    [
        ("range", {}, (9, 4, 3, 5)),
        ("range", {"num_chunks": 7}, (9, 4, 3, 5)),
        ("range", {"num_chunks": 4}, (11, 3)),
        ("range", {"act_format": "int8"}, (9, 4, 3, 5)),
        ("l1", {}, (9, 4, 3, 5)),
        ("l1", {"act_format": "int4"}, (10, 3, 6)),
        ("linf", {"topk": 5}, (9, 4, 3, 5)),
        ("linf", {"topk": 10, "act_format": "int8"}, (16, 2, 4)),
    ],
)
def test_analytic_backward_matches_autograd_of_the_plain_formula(
    kind: str, kw: dict, shape: tuple[int, ...]
) -> None:
    """The fused backward equals autograd through the plain formula (STE in int mode)."""
    g = torch.Generator().manual_seed(18)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1
    upstream = torch.randn(*shape, generator=g, dtype=torch.float64)
    cls = BATCHNORM_VARIANTS[kind][0 if len(shape) < 4 else 1]
    m = cls(shape[1], eps=1e-3, dtype=torch.float64, **kw)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(generator=g)
    xa = x.clone().requires_grad_()
    y = m(xa)
    y.backward(upstream)
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ref = naive_forward(xb, kind, w, b, 1e-3, **kw)
    ref.backward(upstream)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.bias.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_channels_last_and_no_affine_backward() -> None:
    g = torch.Generator().manual_seed(19)
    x = torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64)
    upstream = torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64)
    for kind in BATCHNORM_VARIANTS:
        m = BATCHNORM_VARIANTS[kind][1](3, affine=False, dtype=torch.float64, topk=4) if (
            kind == "linf") else BATCHNORM_VARIANTS[kind][1](3, affine=False, dtype=torch.float64)
        xa = x.clone().requires_grad_()
        m(xa).backward(upstream)
        xc = x.clone().to(memory_format=torch.channels_last).requires_grad_()
        m(xc).backward(upstream.to(memory_format=torch.channels_last))
        torch.testing.assert_close(xc.grad, xa.grad, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(sorted(BATCHNORM_VARIANTS)),
    shape=st.tuples(st.integers(2, 6), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-100, 100),
    seed=st.integers(0, 2**16),
)
def test_output_invariant_to_per_tensor_affine_input(
    kind: str, shape: tuple[int, ...], scale: float, shift: float, seed: int
) -> None:
    """y(a x + b) = y(x) for a > 0 (eps = 0) and every output channel has zero mean."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    m = BATCHNORM_VARIANTS[kind][1](shape[1], eps=0.0, dtype=torch.float64, topk=3) if (
        kind == "linf"
    ) else BATCHNORM_VARIANTS[kind][1](shape[1], eps=0.0, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        torch.testing.assert_close(m(x * scale + shift), y, rtol=1e-7, atol=1e-7)
    assert float(y.mean(dim=(0, 2, 3)).abs().max()) < 1e-9


def test_linf_with_k_at_least_n_equals_l1() -> None:
    """With k >= n the top-k mean is the mean absolute deviation and e_n(n) = sqrt(2/pi)."""
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    y_inf = LinfBatchNorm1d(3, topk=10, dtype=torch.float64)(x)
    y_l1 = L1BatchNorm1d(3, dtype=torch.float64)(x)
    torch.testing.assert_close(y_inf, y_l1, rtol=1e-12, atol=1e-12)


def test_bad_inputs_and_arguments_raise() -> None:
    m = RangeBatchNorm2d(3)
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(4, 3))
    with pytest.raises(ValueError, match="expected 3 channels"):
        m(torch.randn(4, 2, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        L1BatchNorm1d(3)(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"range_constant must be one of \('exact', 'paper'"):
        RangeBatchNorm2d(3, range_constant="asymptotic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_chunks must be >= 1"):
        RangeBatchNorm2d(3, num_chunks=0)
    with pytest.raises(ValueError, match=r"topk must be in \[1, 1024\]"):
        LinfBatchNorm2d(3, topk=2000)
    with pytest.raises(ValueError, match="momentum must be None or in"):
        L1BatchNorm2d(3, momentum=1.5)
    with pytest.raises(ValueError, match=r"norm must be one of \['l1', 'linf', 'range'\]"):
        replace_batchnorm(nn.Sequential(), "l2")


# ------------------------------------------------------------------------------------------
# Low-precision mode (issue 6: "Range BN itself runs in 8 bits")
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BATCHNORM_VARIANTS))
@pytest.mark.parametrize(("fmt", "levels"), [("int8", 255), ("int4", 15)])
def test_act_format_puts_each_output_channel_on_an_integer_grid(
    kind: str, fmt: str, levels: int
) -> None:
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(15)) * 4 + 2
    m = BATCHNORM_VARIANTS[kind][1](3, act_format=fmt)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        y = m(x)
    for c in range(3):
        values = y[:, c].unique()
        assert levels // 2 < values.numel() <= levels
        codes = (values - m.bias[c]) / (values - m.bias[c]).abs().max() * (levels // 2)
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", sorted(BATCHNORM_VARIANTS))
@pytest.mark.parametrize("n", [256, 4096, 65536])
def test_act_format_int8_keeps_unit_variance(kind: str, n: int) -> None:
    """Same batches with and without int8: the scale estimates agree within 0.2 % on average
    (the quantized extremes move by at most half a step, about 0.4 % of max|x - mean|, in
    either direction; measured mean shift <= 0.05 %) and the output std stays within 3 %."""
    trials = max(48, 2**21 // n)
    x = torch.randn(n, trials, generator=torch.Generator().manual_seed(16)) * 2.5
    cls = BATCHNORM_VARIANTS[kind][0]
    ref = sigma_hat(cls, x)
    m = cls(trials, momentum=1.0, act_format="int8")
    with torch.no_grad():
        y = m(x)
    assert abs(float((m.running_var.sqrt() / ref).mean()) - 1.0) < 0.002
    assert abs(float(y.std(dim=0, unbiased=False).mean()) - 1.0) < 0.03


def test_grad_format_rounds_the_incoming_gradient_bit_exactly() -> None:
    from lowbit.quant.functional import fake_quantize

    g = torch.Generator().manual_seed(17)
    x = torch.randn(16, 3, 4, 4, generator=g)
    upstream = torch.randn(16, 3, 4, 4, generator=g)
    quantized = RangeBatchNorm2d(3, act_format="int8", grad_format="int8",
                                 generator=torch.Generator().manual_seed(5))
    plain = RangeBatchNorm2d(3, act_format="int8")
    xq = x.clone().requires_grad_()
    quantized(xq).backward(upstream)
    rounded = fake_quantize(upstream, "int8", rounding="stochastic",
                            generator=torch.Generator().manual_seed(5))
    assert rounded.unique().numel() <= 255
    assert not torch.equal(rounded, upstream)
    xf = x.clone().requires_grad_()
    plain(xf).backward(rounded)
    assert torch.equal(xq.grad, xf.grad)
    assert torch.equal(quantized.weight.grad, plain.weight.grad)
    assert torch.equal(quantized.bias.grad, plain.bias.grad)


def test_low_precision_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="act_format must be a signed integer format"):
        RangeBatchNorm2d(3, act_format="e4m3")
    with pytest.raises(ValueError, match="act_format must be a signed integer format"):
        L1BatchNorm2d(3, act_format="uint8")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        LinfBatchNorm2d(3, grad_format="int8", generator=0)  # type: ignore[arg-type]
    m = RangeBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3), act_format="int8")
    assert m.act_format.name == "int8" and "act_format=int8" in repr(m)


# ------------------------------------------------------------------------------------------
# Drop-in replacement: state_dict, from_batchnorm, replace_batchnorm
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "kw"), ALL_2D)
def test_state_dict_compatible_with_batchnorm2d(cls: type, kw: dict) -> None:
    bn = nn.BatchNorm2d(5)
    bn(torch.randn(4, 5, 3, 3))
    m = cls(5, **kw)
    assert list(m.state_dict()) == list(bn.state_dict())
    m.load_state_dict(bn.state_dict())  # strict
    for key, value in bn.state_dict().items():
        assert torch.equal(m.state_dict()[key], value)
    m(torch.randn(4, 5, 3, 3))
    nn.BatchNorm2d(5).load_state_dict(m.state_dict())
    no_affine = cls(5, affine=False, track_running_stats=False, **kw)
    assert list(no_affine.state_dict()) == list(
        nn.BatchNorm2d(5, affine=False, track_running_stats=False).state_dict()
    )


@pytest.mark.parametrize("kind", sorted(BATCHNORM_VARIANTS))
def test_from_batchnorm_copies_everything(kind: str) -> None:
    g = torch.Generator().manual_seed(11)
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.3)
    for _ in range(2):
        bn(torch.randn(8, 4, 3, 3, generator=g))
    with torch.no_grad():
        bn.weight.normal_(generator=g)
        bn.bias.normal_(generator=g)
    bn.eval()
    cls = BATCHNORM_VARIANTS[kind][1]
    m = cls.from_batchnorm(bn)
    assert (m.eps, m.momentum, m.affine, m.training) == (1e-3, 0.3, True, False)
    x = torch.randn(3, 4, 3, 3, generator=g)
    assert torch.equal(m(x), bn(x))
    assert m.weight is not bn.weight  # a copy, not shared
    bn1 = nn.BatchNorm1d(6, affine=False, dtype=torch.float64)
    m1 = BATCHNORM_VARIANTS[kind][0].from_batchnorm(bn1)
    assert m1.weight is None and m1.num_features == 6
    assert m1.running_mean.dtype == torch.float64
    with pytest.raises(TypeError, match="expects a BatchNorm2d"):
        cls.from_batchnorm(nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match="got Linear"):
        cls.from_batchnorm(nn.Linear(2, 2))
    chunked = RangeBatchNorm2d.from_batchnorm(m, num_chunks=4)  # variant -> variant
    assert chunked.num_chunks == 4 and torch.equal(chunked(x), m(x))


def test_replace_batchnorm_swaps_1d_and_2d_and_keeps_eval_outputs() -> None:
    torch.manual_seed(12)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8),
        nn.Sequential(nn.Linear(8, 2), nn.BatchNorm1d(2)),
    )
    x = torch.randn(16, 1, 8, 8)
    model(x)
    model.eval()
    ref = model(x)
    for kind, (cls1d, cls2d) in BATCHNORM_VARIANTS.items():
        new = replace_batchnorm(model, kind)
        assert type(new[1]) is cls2d and type(new[5]) is cls1d and type(new[6][1]) is cls1d
        assert type(model[1]) is nn.BatchNorm2d  # a copy by default
        assert not new.training
        assert torch.equal(new(x), ref)
    again = replace_batchnorm(replace_batchnorm(model, "range"), "linf", topk=5)
    assert type(again[1]) is LinfBatchNorm2d and again[1].topk == 5
    inplace = replace_batchnorm(model, "l1", inplace=True)
    assert inplace is model and type(model[1]) is L1BatchNorm2d


# ------------------------------------------------------------------------------------------
# Bounded weight normalisation
# ------------------------------------------------------------------------------------------


def test_bounded_weight_norm_keeps_norms_fixed_while_training(one_thread: None) -> None:
    torch.manual_seed(13)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    w0 = [model[0].weight.detach().clone(), model[3].weight.detach().clone()]
    apply_bounded_weight_norm(model)
    torch.testing.assert_close(model[0].weight, w0[0])  # unchanged when applied
    torch.testing.assert_close(model[3].weight, w0[1])
    names = {n for n, _ in model.named_parameters()}
    assert not any("rho" in n for n in names)  # rho is not learned
    assert "0.parametrizations.weight.0.rho" in model.state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    x, y = torch.randn(32, 2, 6, 6), torch.randint(0, 3, (32,))
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for module, ref in ((model[0], w0[0]), (model[3], w0[1])):
        dims = tuple(range(1, ref.dim()))
        torch.testing.assert_close(
            torch.linalg.vector_norm(module.weight, dim=dims),
            torch.linalg.vector_norm(ref, dim=dims),
            rtol=1e-5,
            atol=0,
        )
        assert float((module.weight.detach() - ref).abs().max()) > 1e-2  # direction learned


def test_bounded_weight_norm_options_and_state() -> None:
    torch.manual_seed(14)
    lin = nn.Linear(5, 4)
    norms = lin.weight.detach().norm(dim=1)
    apply_bounded_weight_norm(lin, per_channel=False)
    torch.testing.assert_close(lin.weight.norm(dim=1), norms.mean().expand(4))
    apply_bounded_weight_norm(lin)  # idempotent
    assert len(lin.parametrizations.weight) == 1
    # state_dict round trip into a fresh parametrized module
    other = apply_bounded_weight_norm(nn.Linear(5, 4))
    other.load_state_dict(lin.state_dict())
    assert torch.equal(other.weight, lin.weight)
    # ConvTranspose: output channels are dim 1
    ct = nn.ConvTranspose2d(3, 5, 2)
    ref = torch.linalg.vector_norm(ct.weight.detach(), dim=(0, 2, 3))
    apply_bounded_weight_norm(ct, types=(nn.ConvTranspose2d,))
    assert ct.parametrizations.weight[0].dim == 1
    with torch.no_grad():
        ct.parametrizations.weight.original.mul_(3.0)
    torch.testing.assert_close(torch.linalg.vector_norm(ct.weight, dim=(0, 2, 3)), ref)
    # removal bakes the weight into a plain parameter
    baked = lin.weight.detach().clone()
    remove_bounded_weight_norm(lin)
    assert isinstance(lin.weight, nn.Parameter) and torch.equal(lin.weight, baked)


def test_bounded_weight_norm_zero_channel_and_gradcheck() -> None:
    w = torch.randn(3, 4, dtype=torch.float64)
    w[1] = 0
    p = BoundedWeightNorm(w)
    out = p(w)
    assert torch.equal(out[1], torch.zeros(4, dtype=torch.float64))
    assert torch.isfinite(out).all()
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(p, (v,))
    with pytest.raises(ValueError, match="dim must be in"):
        BoundedWeightNorm(w, dim=2)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        apply_bounded_weight_norm(w)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Model level: a tiny CNN on sklearn digits trains with every variant
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[te], y[te]


def train_digits(data: tuple, norm: str | None, bwn: bool = False, **kw: object) -> float:
    xtr, ytr, xte, yte = data
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(512, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10),
    )
    if norm is not None:
        model = replace_batchnorm(model, norm, **kw)
    if bwn:
        apply_bounded_weight_norm(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        model.train()
        order = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(order) - 63, 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(xte).argmax(1) == yte).float().mean())


@pytest.fixture
def one_thread():
    """Small convolutions run faster (and far more predictably on a shared CPU) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_digits_cnn_converges_with_every_variant(digits: tuple, one_thread: None) -> None:
    """5 epochs of SGD; every variant (eval mode, running stats) within 2 points of BN."""
    base = train_digits(digits, None)
    assert base > 0.95
    runs = {
        "range": train_digits(digits, "range"),
        "range/16 chunks": train_digits(digits, "range", num_chunks=16),
        "l1": train_digits(digits, "l1"),
        "linf": train_digits(digits, "linf"),
        "bn + bounded wn": train_digits(digits, None, bwn=True),
        "range + bounded wn": train_digits(digits, "range", bwn=True),
        "range int8 act+grad": train_digits(
            digits, "range", act_format="int8", grad_format="int8",
            generator=torch.Generator().manual_seed(0),
        ),
    }
    for name, acc in runs.items():
        assert acc > base - 0.02, (name, acc, base)
