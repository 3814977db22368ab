"""Range estimators and QuantSpec: hand computations, torch references, bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import get_format
from lowbit.quant import (
    SCALE_EPS,
    EMAObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    QuantSpec,
    make_observer,
    qparams_from_range,
)


def _torch_ao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torch.ao.quantization import observer
        except ImportError:  # removed from newer torch
            pytest.skip("torch.ao.quantization is not available")
    return observer


# --------------------------------------------------------------------------- qparams_from_range
def test_symmetric_signed_by_hand():
    scale, zp = qparams_from_range(torch.tensor(-2.0), torch.tensor(1.0), "int8")
    assert scale.item() == pytest.approx(2.0 / 127, rel=1e-7)
    assert zp.item() == 0 and zp.dtype == torch.int32
    scale, zp = qparams_from_range(torch.tensor(-0.5), torch.tensor(3.0), "int4")
    assert scale.item() == pytest.approx(3.0 / 7, rel=1e-7)


def test_affine_unsigned_by_hand():
    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), "uint8")
    assert scale.item() == pytest.approx(4.0 / 255, rel=1e-7)
    assert zp.item() == round(1.0 / (4.0 / 255))  # 64 (63.75 rounded)
    # a positive range is widened to include 0: zero point 0
    scale, zp = qparams_from_range(torch.tensor(0.5), torch.tensor(2.0), "uint8")
    assert scale.item() == pytest.approx(2.0 / 255, rel=1e-7) and zp.item() == 0
    # a negative range: zero point at qmax
    scale, zp = qparams_from_range(torch.tensor(-3.0), torch.tensor(-1.0), "uint4")
    assert scale.item() == pytest.approx(3.0 / 15, rel=1e-7) and zp.item() == 15


def test_affine_matches_torch_observer_bit_for_bit():
    obs_mod = _torch_ao()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = torch.randn(1000, generator=g) * torch.rand(1, generator=g) * 10 + torch.randn(
            1, generator=g)
        ref = obs_mod.MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
        ref(x)
        ref_scale, ref_zp = ref.calculate_qparams()
        ours = MinMaxObserver(fmt="uint8")
        ours.update(x)
        scale, zp = ours.compute_qparams()
        assert torch.equal(scale.reshape(1), ref_scale)
        assert torch.equal(zp.reshape(1), ref_zp)


def test_float_format_scale_maps_range_to_max():
    scale, zp = qparams_from_range(torch.tensor(-896.0), torch.tensor(10.0), "e4m3")
    assert scale.item() == 2.0 and zp.item() == 0
    scale, _ = qparams_from_range(torch.tensor(-1.0), torch.tensor(57344.0 * 4), "e5m2")
    assert scale.item() == 4.0


def test_scale_never_zero():
    for fmt in ("int8", "uint8", "e5m2", "int2"):
        scale, zp = qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), fmt)
        assert scale.item() == SCALE_EPS > 0
        assert math.isfinite(1.0 / scale.item())
        f = get_format(fmt)
        if hasattr(f, "qmin"):
            assert f.qmin <= zp.item() <= f.qmax


def test_symmetric_override():
    # affine with a signed format: zero point inside [-128, 127]
    scale, zp = qparams_from_range(torch.tensor(1.0), torch.tensor(3.0), "int8", symmetric=False)
    assert scale.item() == pytest.approx(3.0 / 255, rel=1e-7)
    assert zp.item() == -128
    # symmetric with an unsigned format: zero point 0, scale from max
    scale, zp = qparams_from_range(torch.tensor(0.0), torch.tensor(3.0), "uint8", symmetric=True)
    assert scale.item() == pytest.approx(3.0 / 255, rel=1e-7) and zp.item() == 0
    with pytest.raises(ValueError, match="integer format"):
        qparams_from_range(torch.tensor(0.0), torch.tensor(1.0), "e4m3", symmetric=False)


def test_binary_has_no_qparams():
    with pytest.raises(ValueError, match="chooses its own scale"):
        qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), "binary")


@settings(max_examples=60, deadline=None)
@given(
    lo=st.floats(-1e4, 1e4, allow_nan=False),
    width=st.floats(1e-3, 1e4, allow_nan=False),
    bits=st.integers(2, 16),
    signed=st.booleans(),
)
def test_range_ends_and_zero_are_representable(lo, width, bits, signed):
    fmt = get_format(f"{'' if signed else 'u'}int{bits}")
    mn, mx = torch.tensor(lo), torch.tensor(lo + width)
    scale, zp = qparams_from_range(mn, mx, fmt)
    lo, hi_val = mn.item(), mx.item()
    s, z = float(scale), int(zp)
    assert fmt.qmin <= z <= fmt.qmax
    # 0.0 quantizes to exactly 0 (the "true zero" the papers' code lacked)
    q0 = torch.fake_quantize_per_tensor_affine(torch.zeros(1), s, z, fmt.qmin, fmt.qmax)
    assert q0.item() == 0.0
    # the observed range (widened to 0, symmetric for signed) is covered up to half a step
    hi = max(abs(lo), abs(hi_val)) if signed else max(hi_val, 0.0)
    assert (fmt.qmax - z) * s >= hi * (1 - 1e-6) - 0.5 * s


# ------------------------------------------------------------------------------- observers
def test_minmax_per_tensor_and_channel():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, 5, 5, generator=g) * (i + 1) for i in range(3)]
    obs = MinMaxObserver()
    per_ch = MinMaxObserver(axis=1)
    for x in xs:
        obs.update(x)
        per_ch.update(x)
    allx = torch.cat(xs)
    assert obs.min_val.item() == allx.min().item() and obs.max_val.item() == allx.max().item()
    assert torch.equal(per_ch.min_val, allx.amin(dim=(0, 2, 3)))
    assert torch.equal(per_ch.max_val, allx.amax(dim=(0, 2, 3)))
    assert int(obs.num_batches) == 3


def test_ema_semantics_by_hand():
    g = torch.Generator().manual_seed(2)
    m = 0.25
    obs = EMAObserver(momentum=m)
    run_min = run_max = None
    for i in range(6):
        x = torch.randn(100, generator=g) * (i + 1)
        obs.update(x)
        if run_min is None:  # first batch initialises
            run_min, run_max = x.min().item(), x.max().item()
        else:
            run_min = (1 - m) * run_min + m * x.min().item()
            run_max = (1 - m) * run_max + m * x.max().item()
        assert obs.min_val.item() == pytest.approx(run_min, rel=1e-6, abs=1e-7)
        assert obs.max_val.item() == pytest.approx(run_max, rel=1e-6, abs=1e-7)


def test_ema_matches_torch_moving_average_bit_for_bit():
    obs_mod = _torch_ao()
    g = torch.Generator().manual_seed(3)
    ref = obs_mod.MovingAverageMinMaxObserver(averaging_constant=0.1, dtype=torch.quint8)
    ours = EMAObserver(momentum=0.1, fmt="uint8")
    for _ in range(10):
        x = torch.randn(257, generator=g) * 3 + 0.5
        ref(x)
        ours.update(x)
    assert torch.equal(ours.min_val, ref.min_val) and torch.equal(ours.max_val, ref.max_val)


def test_ema_per_channel_first_batch_initialises():
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    obs = EMAObserver(momentum=0.5, axis=0)
    obs.update(x)
    assert torch.equal(obs.min_val, torch.tensor([-2.0, 3.0]))
    obs.update(torch.zeros(2, 2))
    assert torch.equal(obs.min_val, torch.tensor([-1.0, 1.5]))
    assert torch.equal(obs.max_val, torch.tensor([0.5, 2.0]))


def test_percentile_matches_numpy():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1000, generator=g)
    obs = PercentileObserver(percentile=99.0)
    obs.update(x)
    a = x.numpy().astype(np.float64).ravel()
    assert obs.min_val.item() == pytest.approx(np.percentile(a, 1.0), rel=1e-5)
    assert obs.max_val.item() == pytest.approx(np.percentile(a, 99.0), rel=1e-5)
    per_ch = PercentileObserver(percentile=90.0, axis=0)
    per_ch.update(x)
    ref = np.percentile(x.numpy().astype(np.float64), 90.0, axis=1)
    np.testing.assert_allclose(per_ch.max_val.numpy(), ref, rtol=1e-5)
    # averaged over batches
    y = torch.randn(3, 1000, generator=g) * 2
    obs.update(y)
    b = y.numpy().astype(np.float64).ravel()
    expect = (np.percentile(a, 99.0) + np.percentile(b, 99.0)) / 2
    assert obs.max_val.item() == pytest.approx(expect, rel=1e-5)


def test_percentile_100_is_minmax():
    x = torch.randn(777)
    obs = PercentileObserver(percentile=100.0)
    obs.update(x)
    assert obs.min_val.item() == x.min().item() and obs.max_val.item() == x.max().item()


def _brute_force_mse_ratio(x: torch.Tensor, k: int) -> float:
    """Independent search with torch's own fake quantizer (int8 symmetric)."""
    amax = x.abs().max().item()
    best, best_r = None, None
    for i in range(1, k + 1):
        r = i / k
        scale = max(amax * r / 127, SCALE_EPS)
        q = torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)
        err = (q - x).double().pow(2).mean().item()
        if best is None or err < best - 1e-12 * best:
            best, best_r = err, r
    return best_r


def test_mse_observer_matches_brute_force():
    pytest.importorskip("lowbit.quant.functional")
    g = torch.Generator().manual_seed(5)
    # heavy-tailed data: the MSE-optimal clip is well inside the max
    x = torch.distributions.Laplace(0.0, 1.0).sample((4000,))
    x = x[torch.randperm(x.numel(), generator=g)]
    k = 50
    obs = MSEObserver(num_candidates=k, fmt="int4")
    obs.update(x)
    r = obs.max_val.item() / x.max().item()
    assert r < 1.0
    # int8 against the brute-force search with torch's reference quantizer
    obs8 = MSEObserver(num_candidates=k, fmt="int8")
    obs8.update(x)
    amax = x.abs().max().item()
    clip = max(-obs8.min_val.item(), obs8.max_val.item())
    assert clip / amax == pytest.approx(_brute_force_mse_ratio(x, k), abs=1e-6)


def test_mse_observer_error_not_worse_than_minmax():
    pytest.importorskip("lowbit.quant.functional")
    from lowbit.quant import fake_quantize

    x = torch.distributions.StudentT(3.0).sample((3, 2000))
    mse = MSEObserver(num_candidates=40, axis=0, fmt="int4")
    mm = MinMaxObserver(axis=0, fmt="int4")
    mse.update(x)
    mm.update(x)
    errs = []
    for obs in (mse, mm):
        s, z = obs.compute_qparams()
        q = fake_quantize(x, "int4", scale=s, zero_point=z, axis=0)
        errs.append((q - x).pow(2).mean(dim=1))
    assert bool((errs[0] <= errs[1] + 1e-7).all())
    with pytest.raises(ValueError, match="searched its range"):
        mse.compute_qparams("int8")


def test_frozen_reset_and_uninitialised():
    obs = MinMaxObserver(fmt="int8")
    with pytest.raises(RuntimeError, match="seen no data"):
        obs.compute_qparams()
    obs.update(torch.tensor([1.0, -1.0]))
    obs.frozen = True
    obs.update(torch.tensor([5.0]))
    assert obs.max_val.item() == 1.0
    obs.frozen = False
    obs.reset()
    assert not obs.initialized
    obs.update(torch.tensor([5.0]))
    assert obs.min_val.item() == 5.0


def test_state_dict_round_trip_lazy_per_channel():
    obs = EMAObserver(axis=1)
    obs.update(torch.randn(8, 6))
    obs.update(torch.randn(8, 6))
    fresh = EMAObserver(axis=1)
    fresh.load_state_dict(obs.state_dict())
    assert fresh.initialized and int(fresh.num_batches) == 2
    assert torch.equal(fresh.min_val, obs.min_val)
    s1, z1 = obs.compute_qparams("uint8")
    s2, z2 = fresh.compute_qparams("uint8")
    assert torch.equal(s1, s2) and torch.equal(z1, z2)


def test_bad_input():
    with pytest.raises(TypeError, match="floating-point"):
        MinMaxObserver().update(torch.arange(4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        MinMaxObserver().update([1.0, 2.0])
    with pytest.raises(ValueError, match="axis=3 does not exist"):
        MinMaxObserver(axis=3).update(torch.randn(2, 2))
    with pytest.raises(ValueError, match="momentum"):
        EMAObserver(momentum=0.0)
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=30)
    with pytest.raises(ValueError, match="num_candidates"):
        MSEObserver(num_candidates=0)
    obs = MinMaxObserver(axis=0)
    obs.update(torch.randn(3, 4))
    with pytest.raises(ValueError, match="channels"):
        obs.update(torch.randn(5, 4))
    with pytest.raises(ValueError, match="'minmax', 'ema'"):
        make_observer("emma")
    with pytest.raises(ValueError, match="did you mean 'ema'"):
        make_observer("emma")


# ------------------------------------------------------------------------------- QuantSpec
def test_spec_parse_forms():
    s = QuantSpec.parse("int8")
    assert s.fmt == "int8" and s.granularity == "tensor" and s.observer == "dynamic"
    assert QuantSpec.parse("e5m2").format.name == "e5m2"
    assert QuantSpec.parse("e5m2").observer == "none"  # the format as it is
    assert QuantSpec.parse("binary").observer == "none"
    assert QuantSpec.parse(None) is None
    d = QuantSpec.parse({"fmt": "uint4", "observer": "ema", "observer_kwargs": {"momentum": 0.2}})
    assert d.observer_kwargs == {"momentum": 0.2}
    assert QuantSpec.parse(s, rounding="stochastic").rounding == "stochastic"
    assert QuantSpec.parse(get_format("int4")).format == get_format("int4")
    assert QuantSpec("int8", granularity="channel", axis=0).describe() == "int8/channel"


def test_spec_validation_names_choices():
    with pytest.raises(ValueError, match="unknown format"):
        QuantSpec("int99x")
    with pytest.raises(ValueError, match="'tensor', 'channel', 'group'"):
        QuantSpec("int8", granularity="chanel")
    with pytest.raises(ValueError, match="did you mean 'channel'"):
        QuantSpec("int8", granularity="chanel")
    with pytest.raises(ValueError, match="'nearest', 'stochastic'"):
        QuantSpec("int8", rounding="up")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec("int8", granularity="group", axis=0)
    with pytest.raises(ValueError, match="needs granularity='group'"):
        QuantSpec("int8", group_size=4)
    with pytest.raises(ValueError, match="granularity='tensor'"):
        QuantSpec("int8", axis=1)
    with pytest.raises(ValueError, match="needs a scale"):
        QuantSpec("int8", observer="none")
    with pytest.raises(ValueError, match="chooses its own scale"):
        QuantSpec("binary", observer="ema")
    with pytest.raises(ValueError, match="'momentum'"):
        QuantSpec("uint8", observer="ema", observer_kwargs={"mometum": 0.1})
    with pytest.raises(ValueError, match="takes no arguments"):
        QuantSpec("uint8", observer="dynamic", observer_kwargs={"momentum": 0.1})
    with pytest.raises(ValueError, match="QuantSpec field"):
        QuantSpec.parse({"fmt": "int8", "bits": 8})
    with pytest.raises(TypeError, match="spec must be"):
        QuantSpec.parse(8)
    with pytest.raises(ValueError, match="affine"):
        QuantSpec("e4m3", symmetric=False)
