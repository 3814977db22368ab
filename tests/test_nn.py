"""Quantizer, GradQuantizer, QLinear and QConv2d against torch's own reference quantizers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.nn import (
    GradQuantizer,
    QConv2d,
    QLinear,
    Quantizer,
    clip_latent_weights,
    freeze_observers,
    list_gemms,
    register_gemm,
    set_calibrating,
)
from lowbit.nn.modules import _GEMMS
from lowbit.quant import QuantSpec


def _ref_per_channel_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8 with torch's reference fake quantizer."""
    amax = w.detach().abs().flatten(1).amax(1)
    scale = (amax / 127).clamp_min(torch.finfo(torch.float32).tiny)
    zp = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -128, 127)


def _ref_ema_uint8(xs: list[torch.Tensor], momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero point after EMA over ``xs`` (hand written), affine uint8."""
    lo, hi = xs[0].min(), xs[0].max()
    for x in xs[1:]:
        lo = lo + (x.min() - lo) * momentum
        hi = hi + (x.max() - hi) * momentum
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo) / 255
    zp = (0 - torch.round(lo / scale)).clamp(0, 255).to(torch.int32)
    return scale, zp


# ------------------------------------------------------------------------------- Quantizer
def test_dynamic_weight_quantizer_matches_torch_per_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 3, 3, generator=g)
    q = Quantizer(QuantSpec("int8", granularity="channel", observer="dynamic"), axis=0)
    assert torch.equal(q(w), _ref_per_channel_int8(w))
    s, z = q.dynamic_qparams(w)
    assert torch.equal(torch.fake_quantize_per_channel_affine(w, s, z, 0, -128, 127), q(w))


def test_ema_quantizer_train_eval_and_buffers():
    g = torch.Generator().manual_seed(1)
    q = Quantizer(QuantSpec("uint8", observer="ema", observer_kwargs={"momentum": 0.2}))
    xs = [torch.randn(64, 10, generator=g) * (i + 1) + 0.3 for i in range(4)]
    for i, x in enumerate(xs):
        out = q(x)
        scale, zp = _ref_ema_uint8(xs[: i + 1], 0.2)
        assert torch.allclose(q.scale, scale, rtol=1e-6) and torch.equal(q.zero_point, zp)
        ref = torch.fake_quantize_per_tensor_affine(x, q.scale, q.zero_point, 0, 255)
        assert torch.equal(out, ref)
    q.eval()
    before = q.observer.max_val.clone()
    x = torch.randn(64, 10, generator=g) * 50
    out = q(x)
    assert torch.equal(q.observer.max_val, before)  # eval: no update
    assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, q.scale, q.zero_point, 0,
                                                                  255))


def test_batch_train_range_identity_gradient_and_ema_for_eval():
    g = torch.Generator().manual_seed(5)
    q = Quantizer(QuantSpec("uint8", observer="ema", train_range="batch"))
    xs = [torch.randn(32, 7, generator=g) * (i + 1) for i in range(3)]
    for x in xs:
        x = x.clone().requires_grad_(True)
        out = q(x)
        lo, hi = x.detach().min().clamp(max=0), x.detach().max().clamp(min=0)
        scale = (hi - lo) / 255
        zp = int((0 - torch.round(lo / scale)).clamp(0, 255))
        ref = torch.fake_quantize_per_tensor_affine(x.detach(), scale, zp, 0, 255)
        assert torch.equal(out, ref)
        gout = torch.randn_like(out)
        out.backward(gout)
        assert torch.equal(x.grad, gout)  # nothing clipped: identity STE
    scale, zp = _ref_ema_uint8(xs, 0.1)
    assert torch.allclose(q.scale, scale, rtol=1e-6) and torch.equal(q.zero_point, zp)
    q.eval()
    x = torch.randn(32, 7, generator=g) * 10
    assert torch.equal(q(x), torch.fake_quantize_per_tensor_affine(x, q.scale, q.zero_point,
                                                                   0, 255))


def test_running_train_range_clips_with_zero_gradient():
    q = Quantizer(QuantSpec("int8", observer="minmax"))
    q(torch.tensor([-1.0, 1.0]))
    x = torch.tensor([-3.0, 0.5, 3.0], requires_grad=True)
    q.observer.frozen = True
    out = q(x)
    ref = torch.fake_quantize_per_tensor_affine(x.detach(), q.scale, q.zero_point, -128, 127)
    assert torch.equal(out.detach(), ref) and out[0].item() == pytest.approx(-128 / 127)
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 0.0]))


def test_quantizer_uninitialised_eval_is_an_error():
    q = Quantizer(QuantSpec("uint8", observer="ema")).eval()
    with pytest.raises(RuntimeError, match="calibrate"):
        q(torch.randn(3))


def test_calibrating_observes_and_passes_through():
    model = nn.Sequential(QLinear(5, 4, act=QuantSpec("uint8", observer="minmax"))).eval()
    assert set_calibrating(model) == 1
    x = torch.randn(16, 5)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, F.linear(x, model[0].weight, model[0].bias))
    aq = model[0].act_quant
    assert aq.observer.max_val.item() == x.max().item()
    set_calibrating(model, False)
    assert freeze_observers(model) == 1
    model.train()
    model(torch.randn(16, 5) * 100)
    assert aq.observer.max_val.item() == x.max().item()  # frozen
    s, z = aq.observer.compute_qparams()
    assert torch.equal(aq.scale, s) and torch.equal(aq.zero_point, z)


def test_per_channel_activation_quantizer_state_dict():
    spec = QuantSpec("uint8", granularity="channel", observer="minmax")
    q = Quantizer(spec, axis=1)  # channels unknown: sized by the first batch
    x = torch.randn(4, 3, 5, 5)
    q(x)
    fresh = Quantizer(spec, axis=1)
    fresh.load_state_dict(q.state_dict())
    fresh.eval()
    q.eval()
    assert torch.equal(fresh(x), q(x))
    s = q.scale.reshape(1, -1, 1, 1)
    z = q.zero_point.reshape(1, -1, 1, 1).float()
    ref = (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s
    assert torch.allclose(q(x), ref, atol=1e-6)


def test_float_dynamic_and_none():
    x = torch.randn(100) * 1000
    q_none = Quantizer(QuantSpec("e5m2", observer="none"))
    assert torch.equal(q_none(x), x.to(torch.float8_e5m2).float())
    q_dyn = Quantizer(QuantSpec("e4m3", observer="dynamic"))
    scale = x.abs().max() / 448
    assert torch.equal(q_dyn(x), (x / scale).to(torch.float8_e4m3fn).float() * scale)


def test_disabled_spec_is_identity():
    q = Quantizer(QuantSpec("int4", enabled=False))
    x = torch.randn(10)
    assert q(x) is x


def test_grad_quantizer():
    x = torch.randn(50, requires_grad=True)
    gq = GradQuantizer(QuantSpec("int4", rounding="nearest"))
    y = gq(x)
    assert torch.equal(y, x)
    g = torch.randn(50)
    y.backward(g)
    scale = g.abs().max() / 7
    assert torch.equal(x.grad, torch.fake_quantize_per_tensor_affine(g, scale, 0, -8, 7))
    with pytest.raises(ValueError, match="from the gradient itself"):
        GradQuantizer(QuantSpec("int8", observer="ema"))


# ------------------------------------------------------------------------------- QLinear / QConv2d
def test_qlinear_forward_backward_match_reference():
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(6, 5)
    q = QLinear.from_float(lin, weight=QuantSpec("int8", granularity="channel"),
                           act=QuantSpec("uint8", observer="ema"))
    assert isinstance(q, nn.Linear) and q.weight is lin.weight and q.bias is lin.bias
    x = torch.randn(7, 6, generator=g, requires_grad=True)
    out = q(x)
    xq = torch.fake_quantize_per_tensor_affine(x.detach(), q.act_quant.scale,
                                               q.act_quant.zero_point, 0, 255)
    wq = _ref_per_channel_int8(lin.weight)
    assert torch.equal(out, F.linear(xq, wq, lin.bias))
    gout = torch.randn_like(out)
    out.backward(gout)
    # STE: weight gradient is the gradient w.r.t. the quantized weight (nothing clipped)
    assert torch.allclose(lin.weight.grad, gout.t() @ xq, atol=1e-5)
    # activation range includes every value of the batch after the first EMA step
    assert torch.allclose(x.grad, gout @ wq, atol=1e-5)


def test_qconv2d_forward_matches_reference_and_repr():
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    q = QConv2d.from_float(conv, weight=QuantSpec("int8", granularity="channel"),
                           act=QuantSpec("uint8", observer="ema"), grad="e5m2")
    x = torch.randn(2, 3, 8, 8, generator=g)
    out = q(x)
    xq = torch.fake_quantize_per_tensor_affine(x, q.act_quant.scale, q.act_quant.zero_point,
                                               0, 255)
    assert torch.equal(out, F.conv2d(xq, _ref_per_channel_int8(conv.weight), None, 1, 1))
    r = repr(q)
    assert "weight=int8/channel" in r and "act=uint8/ema" in r and "grad=e5m2" in r
    assert q.weight_format == "int8" and q.act_format == "uint8"


def test_grad_quant_reaches_the_layer_below():
    q = QLinear(8, 8, bias=False, grad=QuantSpec("int4", rounding="nearest"))
    with torch.no_grad():
        q.weight.copy_(torch.eye(8))
    x = torch.randn(32, 8, requires_grad=True)
    q(x).backward(torch.randn(32, 8))
    assert x.grad.unique().numel() <= 16  # int4: at most 16 distinct values


def test_binary_weights_hardtanh_ste_and_latent_clip():
    q = QLinear(4, 3, bias=False, weight="binary")
    with torch.no_grad():
        q.weight.copy_(torch.tensor([[0.5, -0.2, 2.0, -1.5]] * 3))
    x = torch.ones(1, 4)
    out = q(x)
    assert torch.equal(out, torch.full((1, 3), 1.0 - 1.0 + 1.0 - 1.0))
    out.sum().backward()
    # hardtanh STE: no gradient where |w| > 1
    assert torch.equal(q.weight.grad[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    other = QLinear(4, 3, weight=QuantSpec("int8", granularity="channel"))
    with torch.no_grad():
        other.weight.fill_(3.0)
    model = nn.Sequential(q, other)
    assert clip_latent_weights(model) == 1
    assert q.weight.abs().max().item() == 1.0 and other.weight.max().item() == 3.0
    with pytest.raises(ValueError, match="bound"):
        clip_latent_weights(model, bound=0)


def test_unquantized_qlinear_equals_linear():
    lin = nn.Linear(5, 3)
    q = QLinear.from_float(lin)
    x = torch.randn(4, 5)
    assert torch.equal(q(x), lin(x))
    with pytest.raises(TypeError, match="nn.Linear"):
        QLinear.from_float(nn.Conv2d(1, 1, 1))


def test_gemm_registry():
    calls = []

    @register_gemm("test-recording")
    def recording(module, x, w):
        calls.append((x.shape, w.shape))
        return module.op(x, w, module.bias)

    try:
        assert "test-recording" in list_gemms()
        q = QLinear(3, 2, weight="int8", gemm="test-recording")
        q(torch.randn(5, 3))
        assert calls == [((5, 3), (2, 3))]
        with pytest.raises(ValueError, match="already registered"):
            register_gemm("test-recording", recording)
    finally:
        _GEMMS.pop("test-recording")
    with pytest.raises(ValueError, match="did you mean 'default'"):
        QLinear(3, 2, gemm="defualt")


def test_module_state_dict_round_trip():
    torch.manual_seed(4)
    q = QConv2d(3, 4, 3, weight=QuantSpec("int4", granularity="channel"),
                act=QuantSpec("uint4", granularity="channel", observer="ema"))
    for _ in range(3):
        q(torch.randn(2, 3, 6, 6))
    fresh = QConv2d(3, 4, 3, weight=QuantSpec("int4", granularity="channel"),
                    act=QuantSpec("uint4", granularity="channel", observer="ema"))
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(fresh.eval()(x), q.eval()(x))


@settings(max_examples=40, deadline=None)
@given(
    out_ch=st.integers(1, 6),
    rest=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    bits=st.integers(2, 8),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_dynamic_weights_and_batch_activations(out_ch, rest, bits, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_ch, *rest, generator=g) * scale
    wq = Quantizer(QuantSpec(f"int{bits}", granularity="channel"), axis=0)
    qmax = 2 ** (bits - 1) - 1
    s = (w.abs().reshape(out_ch, -1).amax(1) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    ref = torch.fake_quantize_per_channel_affine(w, s, torch.zeros(out_ch, dtype=torch.int32),
                                                 0, -qmax - 1, qmax)
    assert torch.equal(wq(w), ref)
    x = torch.randn(out_ch, *rest, generator=g) * scale + scale * 0.3
    aq = Quantizer(QuantSpec(f"uint{bits}", observer="ema", train_range="batch"))
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    sa = ((hi - lo) / (2**bits - 1)).clamp_min(torch.finfo(torch.float32).tiny)
    za = int((0 - torch.round(lo / sa)).clamp(0, 2**bits - 1))
    assert torch.equal(aq(x), torch.fake_quantize_per_tensor_affine(x, sa, za, 0, 2**bits - 1))


def test_converted_model_deepcopies_and_pickles(tmp_path):
    from lowbit.nn import convert

    model = convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(2 * 4 * 4, 3)), "w4a4", first_last="same")
    x = torch.randn(2, 1, 6, 6)
    model(x)
    model.eval()
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), model(x))
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(loaded(x), model(x))


def test_bad_input_is_reported_at_the_boundary():
    with pytest.raises(TypeError, match="floating-point"):
        Quantizer(QuantSpec("uint8", observer="ema"))(torch.arange(6))
    with pytest.raises(TypeError, match="floating-point"):
        Quantizer(QuantSpec("int8", granularity="channel"), axis=0)(torch.ones(2, 2,
                                                                              dtype=torch.int32))
    with pytest.raises(ValueError, match="needs an axis"):
        Quantizer(QuantSpec("int8", granularity="channel"))
    with pytest.raises(ValueError, match="axis=2 does not exist"):
        Quantizer(QuantSpec("int8", granularity="channel", axis=2))(torch.randn(3, 3))
    with pytest.raises(TypeError, match="needs a spec"):
        Quantizer(None)
    with pytest.raises(ValueError, match="bits must be in 2..16"):
        QLinear(3, 2, weight="int99")
    with pytest.raises(ValueError, match="unknown format"):
        QConv2d(3, 2, 1, act="float8")
    with pytest.raises(ValueError, match="'tensor' or 'channel'"):
        GradQuantizer(QuantSpec("int8", granularity="group", group_size=4, axis=0))
    with pytest.raises(ValueError, match="granularity='channel' for gradients needs"):
        GradQuantizer(QuantSpec("int8", granularity="channel"))
