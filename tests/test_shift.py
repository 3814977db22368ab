"""Shift-based BatchNorm and shift-based AdaMax against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.nn.shift_bn import ShiftBatchNorm1d, ShiftBatchNorm2d, ap2
from lowbit.train.shift_adamax import ShiftAdaMax, glorot_lr_scale, glorot_param_groups


def is_power_of_two(x: torch.Tensor) -> bool:
    """Every nonzero |x| is exactly 2^k (mantissa 0.5 in frexp)."""
    mantissa, _ = torch.frexp(x[x != 0].abs())
    return bool((mantissa == 0.5).all())


def ap2_reference(x: torch.Tensor) -> torch.Tensor:
    """The Torch7 formula sign(x) * 2^round(log(|x|)/log(2)), evaluated in float64."""
    xd = x.double()
    return (torch.sign(xd) * torch.pow(2.0, torch.round(torch.log(xd.abs()) / math.log(2))))


# ------------------------------------------------------------------------------------ AP2


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32), min_size=1, max_size=50))
def test_ap2_matches_log_formula_and_is_power_of_two(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    out = ap2(x)
    assert is_power_of_two(out)
    assert torch.equal(out == 0, x == 0)
    assert torch.equal(torch.sign(out), torch.sign(x))
    nz = x != 0
    # log2 error at most 1/2 (round to nearest exponent); equals the log formula off ties
    err = (torch.log2(out[nz].double().abs()) - torch.log2(x[nz].double().abs())).abs()
    assert bool((err <= 0.5 + 1e-12).all())
    ref = ap2_reference(x)
    away_from_tie = (err - 0.5).abs() > 1e-6
    assert torch.equal(out[nz][away_from_tie].double(), ref[nz][away_from_tie])


def test_ap2_exact_points() -> None:
    x = torch.tensor([1.0, -1.0, 3.0, 2.9, 1.4142135, 1.4142137, 0.7, 0.0, 1e-40])
    expected = torch.tensor([1.0, -1.0, 4.0, 4.0, 1.0, 2.0, 0.5, 0.0, 2.0**-133])
    assert torch.equal(ap2(x), expected)
    with pytest.raises(TypeError, match="floating-point"):
        ap2(torch.tensor([3]))


# ----------------------------------------------------------------------------- shift BN


def shift_bn_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """Direct per-channel transcription of the Torch7 BatchNormalizationShiftPow2 forward."""
    out = torch.empty_like(x)
    for ch in range(x.shape[1]):
        v = x[:, ch].double()
        c = v - v.mean()
        var = (ap2_reference(c) * c).mean()
        s = ap2_reference(1.0 / torch.sqrt(var + eps))
        out[:, ch] = (c * s * ap2_reference(gamma[ch].double()) + beta[ch]).float()
    return out


@pytest.mark.parametrize("cls,shape", [(ShiftBatchNorm1d, (64, 5)), (ShiftBatchNorm1d, (8, 5, 7)),
                                       (ShiftBatchNorm2d, (4, 5, 6, 6))])
def test_shift_bn_forward_matches_reference(cls, shape) -> None:
    torch.manual_seed(0)
    bn = cls(5)
    bn.weight.data = torch.randn(5) * 2
    bn.bias.data = torch.randn(5)
    x = torch.randn(*shape) * 3 + 1
    y = bn(x)
    ref = shift_bn_reference(x, bn.weight.data, bn.bias.data, bn.eps)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_shift_bn_scale_is_power_of_two_train_and_eval() -> None:
    torch.manual_seed(1)
    bn = ShiftBatchNorm2d(6)
    bn.weight.data.uniform_(-3, 3)
    bn.bias.data.zero_()
    x = torch.randn(8, 6, 5, 5) * 4 + 2
    y = bn(x)
    c = x - x.mean(dim=(0, 2, 3), keepdim=True)
    ratio = y / c  # per channel, the applied scale AP2(inv_std) * AP2(gamma)
    for ch in range(6):
        r = ratio[:, ch][c[:, ch].abs() > 1e-3]
        torch.testing.assert_close(r, r[0].expand_as(r), rtol=1e-5, atol=0)
        assert is_power_of_two(r[:1])
    bn.eval()
    scale = bn.inference_scale()
    assert is_power_of_two(scale)
    y_eval = bn(x)
    torch.testing.assert_close(
        y_eval, (x - bn.running_mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1), rtol=0, atol=0
    )


def test_shift_bn_close_to_batchnorm() -> None:
    """The scale differs from exact BN's by the AP2 rounding of c in the variance (at most a
    factor 2^(1/4) on the std) and of the inverse std (2^(1/2)): within [2^-3/4, 2^3/4]."""
    torch.manual_seed(2)
    x = torch.randn(256, 32) * torch.rand(32) * 10 + torch.randn(32)
    sbn, bn = ShiftBatchNorm1d(32), nn.BatchNorm1d(32)
    with torch.no_grad():
        y_s, y = sbn(x), bn(x)
    ratio = (y_s / y)[y.abs() > 1e-3]
    assert float(ratio.min()) >= 2**-0.75 - 1e-6
    assert float(ratio.max()) <= 2**0.75 + 1e-6
    # statistically the output keeps unit scale on average (log-ratio centred near 0)
    assert abs(float(torch.log2(ratio).mean())) < 0.3


def test_shift_bn_backward_matches_torch7_formula() -> None:
    torch.manual_seed(3)
    x = (torch.randn(32, 4) * 2).requires_grad_()
    bn = ShiftBatchNorm1d(4)
    bn.weight.data = torch.tensor([0.3, -1.7, 2.2, 0.9])
    y = bn(x)
    g = torch.randn_like(y)
    y.backward(g)
    with torch.no_grad():
        c = x - x.mean(0)
        c2 = ap2(c)
        s = ap2(1 / torch.sqrt((c2 * c).mean(0) + bn.eps))
        w2 = ap2(bn.weight)
        dx = w2 * s * (g - g.mean(0) - c2 * s * s * (c2 * g).mean(0))
        dgamma = (ap2(c * s) * g).sum(0)
    torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(bn.weight.grad, dgamma)
    torch.testing.assert_close(bn.bias.grad, g.sum(0))


def test_shift_bn_gradient_close_to_batchnorm_gradient() -> None:
    torch.manual_seed(4)
    x1 = torch.randn(128, 16).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(128, 16)
    ShiftBatchNorm1d(16, affine=False)(x1).backward(g)
    nn.BatchNorm1d(16, affine=False)(x2).backward(g)
    cos = torch.nn.functional.cosine_similarity(x1.grad.flatten(), x2.grad.flatten(), dim=0)
    assert float(cos) > 0.9


def test_shift_bn_running_stats_pytorch_semantics() -> None:
    torch.manual_seed(5)
    bn = ShiftBatchNorm1d(3, momentum=0.25)
    batches = [torch.randn(10, 3) * 2 + 1 for _ in range(3)]
    mean_ref, var_ref = torch.zeros(3), torch.ones(3)
    for xb in batches:
        bn(xb)
        c = xb - xb.mean(0)
        var_b = (ap2(c) * c).mean(0) * 10 / 9
        mean_ref = 0.75 * mean_ref + 0.25 * xb.mean(0)
        var_ref = 0.75 * var_ref + 0.25 * var_b
    torch.testing.assert_close(bn.running_mean, mean_ref)
    torch.testing.assert_close(bn.running_var, var_ref)
    assert int(bn.num_batches_tracked) == 3
    cum = ShiftBatchNorm1d(3, momentum=None)
    for xb in batches:
        cum(xb)
    torch.testing.assert_close(cum.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))


def test_shift_bn_state_dict_compatible_with_batchnorm() -> None:
    bn = nn.BatchNorm2d(4)
    bn(torch.randn(6, 4, 3, 3))
    sbn = ShiftBatchNorm2d(4)
    sbn.load_state_dict(bn.state_dict())
    assert torch.equal(sbn.running_var, bn.running_var)


def test_shift_bn_errors() -> None:
    with pytest.raises(ValueError, match="4D input"):
        ShiftBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="more than 1 value"):
        ShiftBatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="momentum"):
        ShiftBatchNorm1d(3, momentum=2.0)
    with pytest.raises(ValueError, match="num_features"):
        ShiftBatchNorm1d(0)


# ---------------------------------------------------------------------------- ShiftAdaMax


def shift_adamax_reference(p0: list[float], grads: list[list[float]], lr: float, b1: float,
                           b2: float, eps: float, lr_scale: float, clip: float | None
                           ) -> list[float]:
    """Plain-Python AdaMax with AP2 on the step size and on the infinity norm."""

    def ap2f(z: float) -> float:
        return 0.0 if z == 0 else math.copysign(2.0 ** round(math.log2(abs(z))), z)

    p = list(p0)
    m = [0.0] * len(p)
    u = [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        step = ap2f(lr / (1 - b1**t))
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            u[i] = max(b2 * u[i], abs(gi))
            p[i] -= step * lr_scale * m[i] / (ap2f(u[i]) + eps)
            if clip is not None:
                p[i] = min(max(p[i], -clip), clip)
    return p


@pytest.mark.parametrize("lr_scale,clip", [(1.0, None), (4.0, 1.0)])
def test_shift_adamax_matches_reference(lr_scale: float, clip: float | None) -> None:
    gen = torch.Generator().manual_seed(6)
    p0 = (torch.rand(7, generator=gen, dtype=torch.float64) - 0.5) * 2
    grads = [torch.randn(7, generator=gen, dtype=torch.float64) for _ in range(5)]
    grads[2][0] = 0.0
    param = nn.Parameter(p0.clone())
    opt = ShiftAdaMax([param], lr_scale=lr_scale, clip=clip)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    ref = shift_adamax_reference(p0.tolist(), [g.tolist() for g in grads], 2**-6, 0.9, 0.999,
                                 2**-27, lr_scale, clip)
    torch.testing.assert_close(param.detach(), torch.tensor(ref, dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)


def test_shift_adamax_steps_are_powers_of_two_and_it_trains() -> None:
    torch.manual_seed(7)
    param = nn.Parameter(torch.randn(50))
    opt = ShiftAdaMax([param], lr=0.05)
    param.grad = torch.randn(50)
    before = param.detach().clone()
    opt.step()
    # first step: m = 0.1 g, u = |g|: update = AP2(lr/0.1) * 0.1 g / (AP2(|g|) + eps)
    g = param.grad
    expected = before - ap2(torch.tensor(0.5)) * 0.1 * g / (ap2(g.abs()) + 2**-27)
    torch.testing.assert_close(param.detach(), expected)
    # minimise a quadratic
    target = torch.randn(50)
    for _ in range(300):
        opt.zero_grad()
        loss = ((param - target) ** 2).sum()
        loss.backward()
        opt.step()
    assert float(((param.detach() - target) ** 2).sum()) < 0.01 * float(((before - target) ** 2).sum())


def test_glorot_lr_scale_and_groups() -> None:
    lin = nn.Linear(784, 4096)
    expected = 1 / math.sqrt(1.5 / (784 + 4096))
    assert glorot_lr_scale(lin) == pytest.approx(expected)
    assert glorot_lr_scale(lin, power_of_two=True) == 2.0 ** round(math.log2(expected))
    conv = nn.Conv2d(3, 8, 3)
    assert glorot_lr_scale(conv) == pytest.approx(1 / math.sqrt(1.5 / (27 + 72)))
    with pytest.raises(TypeError, match="rank >= 2"):
        glorot_lr_scale(nn.BatchNorm1d(3))
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    groups = glorot_param_groups(model, clip=1.0)
    assert len(groups) == 3
    assert groups[0]["params"][0] is model[0].weight and groups[0]["clip"] == 1.0
    assert len(groups[2]["params"]) == 4  # two biases + BN weight and bias
    opt = ShiftAdaMax(groups)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert float(model[0].weight.detach().abs().max()) <= 1.0


def test_shift_adamax_errors() -> None:
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="lr"):
        ShiftAdaMax(p, lr=0)
    with pytest.raises(ValueError, match="betas"):
        ShiftAdaMax(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="clip"):
        ShiftAdaMax(p, clip=-1.0)
