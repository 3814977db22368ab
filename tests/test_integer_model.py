"""Integer-only models (lowbit.to_integer): bit-exact against their float64 simulation, close to
the fake-quant model they come from, integer operations only, a NumPy runner reproducing them,
and a clear error for everything they cannot express."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from _helpers import randomize_bn
from lowbit import models
from lowbit import nn as lnn
from lowbit.integer import IntegerConversionError, compare_models, to_integer
from lowbit.integer.convert import _power_of_two_map, _saturation_ranges
from lowbit.integer.exact import ExactAffine, exact_outputs, round_fraction

RUNNER = Path(__file__).resolve().parents[1] / "src" / "lowbit" / "integer" / "numpy_runner.py"


# ----------------------------------------------------------------------------- fixtures
def _randomize_bn(model: nn.Module, seed: int) -> None:
    randomize_bn(model, torch.Generator().manual_seed(seed))  # negative gammas too


@pytest.fixture(scope="module")
def digits():
    from lowbit.data import BatchLoader, get_dataset

    train = BatchLoader(get_dataset("digits", split="train"), 128, shuffle=True, seed=0)
    test = BatchLoader(get_dataset("digits", split="test"), 360, shuffle=False)
    return train, test


@pytest.fixture(scope="module")
def trained_cnn(digits):
    """small_cnn trained briefly on digits in FP32, then W8A8 with calibration."""
    train, test = digits
    torch.manual_seed(0)
    model = models.create("small_cnn", width=8)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for epoch in range(2):
        train.set_epoch(epoch)
        for x, y in train:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    fq = lnn.convert(model, "w8a8", first_last="same")
    lnn.set_calibrating(fq, True)
    with torch.no_grad():
        for i, (x, _) in enumerate(train):
            if i >= 6:
                break
            fq(x)
    lnn.set_calibrating(fq, False)
    fq.eval()
    im = to_integer(fq, example_input=next(iter(test))[0][:2])
    return model, fq, im


@pytest.fixture(scope="module")
def resnet20():
    """ResNet-20 at CIFAR shapes: random weights, randomized BN (negative gammas), W8A8,
    calibrated on random images."""
    torch.manual_seed(1)
    model = models.create("resnet20")
    _randomize_bn(model, 1)
    model.eval()
    fq = lnn.convert(model, "w8a8", first_last="same")
    calib = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    im = to_integer(fq, calib)
    lnn.set_calibrating(fq, True)
    with torch.no_grad():
        for x in calib:
            fq(x)
    lnn.set_calibrating(fq, False)
    fq.eval()
    return fq, im


def _act_codes(fq: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The integer codes each quantized layer of the fake-quant model feeds itself."""
    codes, handles = {}, []
    for name, mod in lnn.quantized_modules(fq):
        def hook(m, inp, out, name=name):
            codes[name] = (torch.round(out.double() / m.scale.double()) + m.zero_point).long()
        handles.append(mod.act_quant.register_forward_hook(hook))
    with torch.no_grad():
        fq(x)
    for h in handles:
        h.remove()
    return codes


def _int_codes(im, x: torch.Tensor) -> dict[str, torch.Tensor]:
    q = im.quantize_input(x)
    _, vals = im.run_integer(q, return_values=True)
    vals[im.nodes[0].output] = q
    return {n.name: vals[n.inputs[0]].long() for n in im.nodes if n.op in ("conv2d", "linear")}


# -------------------------------------------------------------- bit exactness: trained model
def test_trained_cnn_bit_exact_and_accurate(trained_cnn, digits):
    float_model, fq, im = trained_cnn
    _, test = digits
    r = compare_models(im, fq, test)
    assert r["images"] == 360
    assert r["sim_mismatch_elements"] == 0  # integer model == exact simulation, every logit
    assert r["top1_simulation"] == r["top1_integer"]
    # the integer model is the fake-quant model up to float32 rounding: same predictions
    # almost everywhere and the same accuracy within a point
    assert r["pred_differ_fake_quant"] <= 0.01
    assert abs(r["top1_integer"] - r["top1_fake_quant"]) <= 1.0
    x, y = next(iter(test))
    with torch.no_grad():
        fp32 = (float_model(x).argmax(1) == y).float().mean().item() * 100
    assert fp32 > 70.0  # it did learn
    assert r["top1_integer"] >= fp32 - 3.0


def test_input_quantization_is_the_fake_quantizers(trained_cnn, digits):
    _, fq, im = trained_cnn
    x = next(iter(digits[1]))[0]
    first = next(m for _, m in lnn.quantized_modules(fq))
    with torch.no_grad():
        ref = first.act_quant(x)
    g = im.nodes[0].attrs
    q = im.quantize_input(x)
    assert q.dtype == torch.uint8
    assert torch.equal(((q.float() - g["zero_point"]) * g["scale"]), ref)


def test_layer_codes_match_fake_quant(trained_cnn, digits):
    """Every quantized activation of the integer model equals the fake-quant model's codes,
    except where float32 rounding of the fake-quant model moves a value across a boundary:
    then by one step, rarely."""
    _, fq, im = trained_cnn
    x = next(iter(digits[1]))[0]
    ref, got = _act_codes(fq, x), _int_codes(im, x)
    assert set(ref) == set(got)
    for name in ref:
        diff = (ref[name] - got[name]).abs()
        assert int(diff.max()) <= 1, name
        assert float((diff > 0).double().mean()) < 1e-3, name
    first = next(iter(ref))
    assert torch.equal(ref[first], got[first])


def test_resnet20_bit_exact(resnet20):
    fq, im = resnet20
    assert [n.op for n in im.nodes].count("add") == 9
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    q_out = im.integer_outputs(x)
    assert q_out.dtype == torch.int32
    s_out = im.simulate(x)
    assert torch.equal(q_out.long(), s_out)
    # every intermediate tensor too, and the compiled and torch kernels agree
    _, vals = im.run_integer(im.quantize_input(x), return_values=True, backend="torch")
    _, sims = im.simulate(x, return_values=True)
    for k in sims:
        assert torch.equal(vals[k].long(), sims[k]), k
    with torch.no_grad():
        f = fq(x)
    assert float((f - im(x)).abs().max()) < 0.05 * float(f.abs().max())


def test_resnet20_residual_semantics(resnet20):
    """The integer model adds the *quantized* block input (the only integers there are); the
    fake-quant model adds the float one. With the fake-quant shortcut quantized the same way
    (a hook), the codes before and after the first residual adds agree with the integer
    model's up to float32 rounding. Further down, the rare one-step flips of the float32 model
    spread (every flip moves many outputs of the next layer), so only the head is compared."""
    from lowbit.models.resnet_cifar import BasicBlock

    fq, im = resnet20
    fq = copy.deepcopy(fq)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    got = _int_codes(im, x)
    plain = _act_codes(fq, x)
    for b in fq.modules():
        if isinstance(b, BasicBlock):
            b.shortcut.register_forward_pre_hook(
                lambda mod, inp, b=b: (b.conv1.act_quant(inp[0]),))
    hooked = _act_codes(fq, x)
    head = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    assert torch.equal(plain["conv1"], got["conv1"])  # the quantized image
    for name in head[1:3]:  # before any add: equal up to float32 rounding
        d = (plain[name] - got[name]).abs()
        assert int(d.max()) <= 1 and float((d > 0).double().mean()) < 1e-3, name
    for name in head[3:]:
        d_hooked = (hooked[name] - got[name]).abs()
        d_plain = (plain[name] - got[name]).abs()
        assert int(d_hooked.max()) <= 1
        assert float((d_hooked > 0).double().mean()) < 2e-3, name
        # the float shortcut of the fake-quant model itself differs much more often
        assert float((d_plain > 0).double().mean()) > 5 * float((d_hooked > 0).double().mean())


def test_executor_runs_integer_ops_only(resnet20, trained_cnn, digits):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Dtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat = out if isinstance(out, (tuple, list)) else [out]
            ins = [t for t in [*args, *(kwargs or {}).values()] if isinstance(t, torch.Tensor)]
            self.seen += [(str(func), t.dtype) for t in [*flat, *ins]
                          if isinstance(t, torch.Tensor)]
            return out

    from lowbit.integer.executor import _fused_extension

    # oneDNN's convolution returns its exact int32 sums in float32 (certified below 2^24):
    # the only floats of "auto", in that op and the views of its output (once the program is
    # prepared: oneDNN's one-time probe and weight packing run before the mode)
    onednn_views = {"onednn.qconv2d_pointwise.default", "aten.permute.default",
                    "aten.view.default"}
    backends = ["auto", "torch"] + (["compiled"] if _fused_extension() is not None else [])
    for im, x in ((resnet20[1], torch.randn(2, 3, 32, 32)),
                  (trained_cnn[2], next(iter(digits[1]))[0][:4])):
        q = im.quantize_input(x)
        for backend in backends:
            im.run_integer(q, backend=backend)
            with Dtypes() as mode:
                out = im.run_integer(q, backend=backend)
            assert not out.is_floating_point()
            ops = {f for f, _ in mode.seen}
            assert len(mode.seen) > 50
            floats = [(f, d) for f, d in mode.seen if d.is_floating_point or d.is_complex]
            if backend == "auto":
                floats = [(f, d) for f, d in floats
                          if f not in onednn_views or d != torch.float32]
            assert not floats, floats[:5]
        assert any("max_pool2d" in f for f in ops) or any(n.op == "add" for n in im.nodes)


# ------------------------------------------------------------------ other models and options
def _calibrated(model: nn.Module, scheme: str, x: torch.Tensor, **kw) -> tuple:
    fq = lnn.convert(model, scheme, first_last="same", **kw)
    im = to_integer(fq, [x])
    return fq, im


class _Zoo(nn.Module):
    """ReLU6, grouped convolution, a padded max pool, a BatchNorm after ReLU and pooling (not
    foldable into the convolution before it), Hardtanh, BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.b1 = nn.BatchNorm2d(8)
        self.a1 = nn.ReLU6()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.p1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 6, 3, stride=2, bias=False)
        self.a3 = nn.Hardtanh(-0.5, 1.5)
        self.fc1 = nn.Linear(6 * 2 * 2, 12)
        self.b3 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = self.a1(self.b1(self.c1(x)))
        x = self.b2(self.p1(torch.relu(self.c2(x))))
        x = torch.flatten(self.a3(self.c3(x)), 1)
        return self.fc2(torch.relu(self.b3(self.fc1(x))))


@pytest.mark.parametrize("rounding", ["half_even", "half_up"])
def test_activations_pooling_batchnorm_groups_bit_exact(rounding):
    torch.manual_seed(3)
    model = _Zoo()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.weight.data.uniform_(-1.0, 2.0)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.data.normal_(0, 0.3)
            m.running_var.data.uniform_(0.3, 2.0)
    model.eval()
    x = torch.randn(16, 3, 10, 10)
    fq = lnn.convert(model, "w8a8", first_last="same")
    im = to_integer(fq, [x], rounding=rounding)
    ops = [n.op for n in im.nodes]
    assert ops.count("max_pool2d") == 1 and ops.count("requant") == 1  # BN after the pool
    y = torch.randn(16, 3, 10, 10)
    _, vals = im.run_integer(im.quantize_input(y), return_values=True)
    _, sims = im.simulate(y, return_values=True)
    for k in sims:
        assert torch.equal(vals[k].long(), sims[k]), k
    assert torch.equal(im.integer_outputs(y).long(), im.simulate(y))
    lnn.set_calibrating(fq, True)
    with torch.no_grad():
        fq(x)
    lnn.set_calibrating(fq, False)
    with torch.no_grad():
        f = fq.eval()(y)
    assert float((f - im(y)).abs().max()) < 0.05 * float(f.abs().max())


def test_four_bit_model_bit_exact(digits):
    torch.manual_seed(4)
    model = models.create("small_cnn", width=8)
    _randomize_bn(model, 4)
    model.eval()
    x = next(iter(digits[1]))[0]
    fq = lnn.convert(model, "w4a4")  # first/last layers 8-bit, the middle one 4-bit
    im = to_integer(fq, [x[:64]])
    grids = [n.requant.hi for n in im.nodes if n.op == "conv2d" and n.requant.fixed_point]
    assert 15 in grids  # a 4-bit activation grid
    assert torch.equal(im.integer_outputs(x).long(), im.simulate(x))


def test_qat_model_needs_no_calibration_data(digits):
    """A QAT-trained model carries its ranges; to_integer only needs the input shape."""
    torch.manual_seed(5)
    train, test = digits
    fq = lnn.convert(models.create("small_cnn", width=8), "w8a8", first_last="same")
    opt = torch.optim.SGD(fq.parameters(), 0.05)
    for i, (x, y) in enumerate(train):
        if i >= 4:
            break
        loss = nn.functional.cross_entropy(fq(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fq.eval()
    im = to_integer(fq, example_input=x[:1])
    r = compare_models(im, fq, test)
    assert r["sim_mismatch_elements"] == 0
    assert r["pred_differ_fake_quant"] <= 0.02


# ------------------------------------------------------------------------------ bad input
def test_error_float_layer_named():
    model = models.create("small_cnn", width=4).eval()
    fq = lnn.convert(model, "w4a4", first_last="fp32")
    with pytest.raises(IntegerConversionError, match=r"layer '0'.*float layer"):
        to_integer(fq, [torch.randn(4, 1, 8, 8)])


def test_error_uncalibrated_named():
    fq = lnn.convert(models.create("small_cnn", width=4), "w8a8", first_last="same").eval()
    with pytest.raises(IntegerConversionError, match=r"layer '0'.*never calibrated"):
        to_integer(fq, example_input=torch.randn(2, 1, 8, 8))


def test_error_ptq_range_quantizers_named():
    """A lowbit.ptq model (RangeQuantizer) is one clear error naming the first layer."""
    from lowbit.ptq import quantize_model

    model = models.create("small_cnn", width=4).eval()
    calib = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    q, _ = quantize_model(model, calib, w_bits=8, a_bits=8, clip="minmax", bit_alloc=False,
                          bias_correction=False, num_samples=16, per_channel_acts=False)
    with pytest.raises(IntegerConversionError,
                       match=r"layer '0'.*RangeQuantizer.*lowbit\.ptq.*lowbit\.nn\.convert"):
        to_integer(q, example_input=calib[0])


def test_error_dynamic_activation_ranges():
    from lowbit.quant import QuantSpec

    scheme = lnn.QuantScheme("int8", QuantSpec("uint8", observer="dynamic"), first_last="same")
    fq = lnn.convert(models.create("small_cnn", width=4), scheme).eval()
    with pytest.raises(IntegerConversionError, match="fixed scales"):
        to_integer(fq, [torch.randn(2, 1, 8, 8)])


def test_error_unsupported_layer_named():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(36, 3)).eval()
    fq = lnn.convert(model, "w8a8", first_last="same")
    with pytest.raises(IntegerConversionError, match=r"layer '1'.*GELU"):
        to_integer(fq, [torch.randn(4, 1, 5, 5)])


def test_error_projection_shortcut():
    model = models.create("resnet20", shortcut="B").eval()
    fq = lnn.convert(model, "w8a8", first_last="same")
    with pytest.raises(IntegerConversionError, match="two convolution outputs"):
        to_integer(fq, [torch.randn(2, 3, 32, 32)])


def test_error_no_quantized_layers_and_bad_arguments():
    with pytest.raises(IntegerConversionError, match="no quantized layers"):
        to_integer(models.create("small_cnn", width=4), [torch.randn(2, 1, 8, 8)])
    with pytest.raises(TypeError, match="nn.Module"):
        to_integer("model")
    fq = lnn.convert(models.create("small_cnn", width=4), "w8a8", first_last="same")
    with pytest.raises(ValueError, match="rounding"):
        to_integer(fq, [torch.randn(2, 1, 8, 8)], rounding="nearest")
    with pytest.raises(ValueError, match="accumulator_bits"):
        to_integer(fq, [torch.randn(2, 1, 8, 8)], accumulator_bits=64)
    with pytest.raises(ValueError, match="input shape"):
        to_integer(fq)


def test_error_accumulator_overflow():
    # the int32 GEMM sums 140000 products of up to 127·128 (uint8 enters as x - 128)
    model = nn.Sequential(nn.Linear(140000, 2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(0.01)
    fq = lnn.convert(model, "w8a8", first_last="same")
    x = torch.rand(2, 140000)
    with pytest.raises(IntegerConversionError, match=r"layer '0'.*accumulator.*int32"):
        to_integer(fq, [x])
    small = nn.Sequential(nn.Linear(300, 2)).eval()
    fq = lnn.convert(small, "w8a8", first_last="same")
    to_integer(fq, [torch.rand(2, 300)])  # fits in 32 bits
    with pytest.raises(IntegerConversionError, match=r"accumulator.*int16"):
        to_integer(fq, [torch.rand(2, 300)], accumulator_bits=16)


def test_model_input_checks(trained_cnn):
    im = trained_cnn[2]
    with pytest.raises(ValueError, match="shape"):
        im(torch.randn(2, 1, 9, 9))
    with pytest.raises(TypeError, match="integer"):
        im.run_integer(torch.randn(2, 1, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        im.quantize_input(torch.zeros(2, 1, 8, 8, dtype=torch.int32))


# ------------------------------------------------------------ the constructions, exhaustively
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(u_num=st.integers(-(10**6), 10**6).filter(lambda v: v != 0),
       u_den=st.integers(1, 10**6), off_num=st.integers(-(10**9), 10**9),
       off_den=st.sampled_from([1, 2, 3, 4, 7, 1024, 10**6 + 3]), j=st.integers(-3, 12),
       rounding=st.sampled_from(["half_even", "half_up"]))
def test_power_of_two_map_is_exact(u_num, u_den, off_num, off_den, j, rounding):
    u, off = Fraction(u_num, u_den), Fraction(off_num, off_den)
    a, b, M, C, k, w, up = _power_of_two_map(u, off, j, Fraction(1), rounding)
    assert up > 0 and a == u / up and b == off / up
    # the reference below clamps to +-2^40: keep to maps whose outputs stay inside that range
    assume(abs(a) * 3000 + abs(b) < 2**39)
    xs = np.arange(-3000, 3000, dtype=np.int64)
    v = M * xs + C
    q = v >> k
    r = v & ((1 << k) - 1)
    got = q - ((r < w) & ((q & 1) == 1))
    want = exact_outputs(ExactAffine.from_affine([a], [b]), xs, (-(2**40), 2**40),
                         rounding=rounding)[0]
    assert np.array_equal(got, want)


def test_power_of_two_map_ties():
    # off/|u| integer and an even window: exact ties at every other input
    for rounding in ("half_even", "half_up"):
        a, b, M, C, k, w, _ = _power_of_two_map(Fraction(1), Fraction(5), 1, Fraction(1),
                                                rounding)
        assert (w == 1) == (rounding == "half_even")
        xs = np.arange(-50, 50)
        got = ((M * xs + C) >> k) - ((((M * xs + C) & 1) < w) & (((M * xs + C) >> k) & 1))
        want = [round_fraction(a * int(x) + b, rounding) for x in xs]
        assert got.tolist() == want


@settings(max_examples=60, deadline=None)
@given(a=st.fractions(Fraction(-3, 1), Fraction(3, 1)), b=st.fractions(-50, 50),
       lo=st.integers(-400, 0), width=st.integers(0, 800), z=st.integers(-5, 5),
       out=st.sampled_from([(0, 255), (-128, 127), (0, 15), (3, 9)]))
def test_saturation_ranges_change_nothing(a, b, lo, width, z, out):
    hi = lo + width
    [(L, U)] = _saturation_ranges([a], [b], [(lo, hi)], out[0], out[1], 1, z, "half_even")
    assert lo <= L <= U <= hi
    xs = np.arange(lo, hi + 1, dtype=np.int64)
    aff = ExactAffine.from_affine([a], [b], z)
    full = exact_outputs(aff, xs, out, output_zero_point=1)
    clamped = exact_outputs(aff, np.clip(xs, L, U), out, output_zero_point=1)
    assert np.array_equal(full, clamped)


def test_wide_input_range_uses_input_clamp():
    """A requantization whose certified rule would need more than 63 bits over the proven
    input range is certified over its unsaturated range and clamps its input first."""
    from lowbit.integer.convert import _Converter

    conv = _Converter.__new__(_Converter)
    conv.rounding = "half_even"
    rng = np.random.default_rng(6)
    a = [Fraction(float(v)) for v in rng.uniform(1e-6, 3e-6, 4)]
    b = [Fraction(float(v)) for v in rng.uniform(-3, 3, 4)]
    bounds = [(0, 2**40)] * 4
    spec = conv.certified("wide", a, b, bounds, 0, 255, 0, torch.uint8)
    assert spec.input_clamp is not None
    assert spec.accounting()["acc_bits"] <= 63
    x = np.concatenate([rng.integers(0, 2**40, 4000), rng.integers(0, 2**28, 4000),
                        [0, 2**40]])
    xs = np.broadcast_to(x, (4, x.size)).copy()
    want = spec.exact(xs)
    got = spec(torch.from_numpy(xs.T.copy())).numpy().T
    assert np.array_equal(got, want)


# ---------------------------------------------------------------------------- NumPy runner
def test_numpy_runner_reproduces_integer_model(resnet20, trained_cnn, digits, tmp_path):
    from lowbit.integer import numpy_runner

    for im, x in ((resnet20[1], torch.randn(3, 3, 32, 32)),
                  (trained_cnn[2], next(iter(digits[1]))[0][:50])):
        path = im.save(tmp_path / "m.npz")
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        nm = numpy_runner.load(path)
        got = nm.integer_outputs(x.numpy())
        want = im.integer_outputs(x)
        assert got.dtype == np.int32
        assert np.array_equal(got, want.numpy())
        assert np.array_equal(nm(x.numpy()), im(x).numpy())


def test_numpy_runner_needs_no_torch(trained_cnn, digits, tmp_path):
    im = trained_cnn[2]
    x = next(iter(digits[1]))[0][:20]
    im.save(tmp_path / "m.npz")
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys, importlib.util, numpy as np\n"
        "sys.modules['torch'] = None  # any import of torch fails\n"
        f"spec = importlib.util.spec_from_file_location('runner', {str(RUNNER)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"m = mod.load({str(tmp_path / 'm.npz')!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, m.integer_outputs(np.load("
        f"{str(tmp_path / 'x.npy')!r})))\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    assert np.array_equal(np.load(tmp_path / "y.npy"), im.integer_outputs(x).numpy())


def test_save_is_atomic_and_self_contained(trained_cnn, tmp_path):
    im = trained_cnn[2]
    target = tmp_path / "model.npz"
    target.write_bytes(b"old")
    from lowbit.integer.executor import atomic_write_bytes

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # not bytes: fails mid-write
    assert target.read_bytes() == b"old"  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]
    im.save(target)
    with np.load(target) as f:
        graph = json.loads(f["graph"].tobytes().decode())
        assert graph["format"] == "lowbit-integer-model-v1"
        assert all(k.startswith("n") or k == "graph" for k in f.files)
    spec = importlib.util.find_spec("lowbit.integer.numpy_runner")
    assert spec is not None


def test_summary_bit_accounting(resnet20):
    im = resnet20[1]
    rows = im.summary()
    assert len(rows) >= 19
    for r in rows:
        assert r["acc_bits"] <= 63
        assert r["max_abs_acc"] < 2**63
        if r["certified"]:
            assert r["shift_max"] >= r["shift_min"] >= 0
    assert "| conv1 |" in im.summary_markdown()
    assert math.isfinite(sum(r["M_bits"] for r in rows))
    assert copy.deepcopy(im).summary() == rows


# ------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def qat_checkpoint(tmp_path_factory):
    from lowbit.cli import main

    out = tmp_path_factory.mktemp("digits_w8a8")
    assert main(["train", "digits", "variant=w8a8", "epochs=1", "progress=false",
                 "data.limit=300", "--out", str(out)]) == 0
    return out / "w8a8"


def test_export_checkpoint_and_cli(qat_checkpoint, tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.integer import evaluate_checkpoint, numpy_runner

    r = evaluate_checkpoint(qat_checkpoint)
    assert r["images"] == 360 and r["simulation_mismatches"] == 0
    assert r["predictions_differing_from_fake_quant"] <= 0.01
    args = ["export", str(qat_checkpoint), "--out", str(tmp_path / "m.npz")]
    if importlib.util.find_spec("onnx") is not None:
        args += ["--onnx", str(tmp_path / "m.onnx")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| 0 | conv2d |" in text and "wrote" in text
    nm = numpy_runner.load(tmp_path / "m.npz")
    from lowbit.data import get_dataset

    x = (get_dataset("digits", split="test").images[:40].float() / 255.0 - 0.30543) / 0.37596
    assert nm(x.numpy()).shape == (40, 10)
    assert main(["eval", str(qat_checkpoint), "integer=true"]) == 0
    text = capsys.readouterr().out
    assert "simulation_mismatches" in text and "val_top1_fake_quant" in text


def test_export_without_the_extra_writes_nothing(qat_checkpoint, tmp_path, monkeypatch, capsys):
    """Asking for ONNX without the optional extra fails before the .npz is written too."""
    from lowbit.cli import main
    from lowbit.integer import export_checkpoint
    from lowbit.integer.onnx_export import MissingExtraError

    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(ValueError, match="style"):
        export_checkpoint(qat_checkpoint, out=out / "m.npz", onnx=out / "m.onnx", style="qdq")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now fails
    with pytest.raises(MissingExtraError, match=r"extra 'export'.*pip install"):
        export_checkpoint(qat_checkpoint, out=out / "m.npz", onnx=out / "m.onnx")
    capsys.readouterr()
    assert main(["export", str(qat_checkpoint), "--out", str(out / "m.npz"),
                 "--onnx", str(out / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "extra 'export'" in err[0]
    assert not list(out.iterdir())
    assert not list(Path(qat_checkpoint).glob("*.npz"))


def test_cli_export_of_a_float_checkpoint_is_one_clear_error(tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "run"
    assert main(["train", "digits", "variant=fp32", "epochs=1", "progress=false",
                 "data.limit=100", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", str(out / "fp32")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no quantized layers" in err[0]
    assert not list((out / "fp32").glob("*.npz"))


# ------------------------------------------------------------------ compiled channels-last path
def test_compiled_fast_path_matches_torch_kernels(resnet20):
    from lowbit.integer.executor import _fused_extension, _ResidualGroup

    if _fused_extension() is None:
        pytest.skip("the compiled kernels could not be built here")
    im = resnet20[1]
    steps, _ = im._fused_plan()
    assert sum(isinstance(g, _ResidualGroup) for _, g in steps) == 9  # every residual block
    assert all(g is not None for n, g in steps if n.op == "conv2d")
    for bs in (1, 5):
        q = im.quantize_input(torch.randn(bs, 3, 32, 32))
        assert torch.equal(im.run_integer(q, backend="auto"), im.run_integer(q, backend="torch"))


@pytest.mark.parametrize("in_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("geometry", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (3, 1, 2, 2),
                                      (5, 2, 0, 1)])
def test_channels_last_conv_kernel(in_dtype, geometry):
    from lowbit.integer.executor import Node, RequantSpec, _FastConv, _fused_extension
    from lowbit.integer.ops import int_conv2d, make_requantizer

    if _fused_extension() is None:
        pytest.skip("the compiled kernels could not be built here")
    k, stride, pad, dil = geometry
    rng = np.random.default_rng(sum(geometry))
    lo, hi = (0, 255) if in_dtype == "uint8" else (-128, 127)
    z = int(rng.integers(lo, hi + 1))
    w = torch.tensor(rng.integers(-127, 128, (6, 3, k, k)), dtype=torch.int8)
    a = [Fraction(float(v)) for v in rng.uniform(-3e-4, 3e-4, 6)]
    b = [Fraction(float(v)) for v in rng.uniform(-20, 20, 6)]
    for out_range, zp in (((0, 255), 7), ((-128, 127), 0), ((-(2**20), 2**20), 0)):
        rq, fp = make_requantizer(w, a, b, input_range=(lo, hi), input_zero_point=z,
                                  output_range=out_range, output_zero_point=zp)
        spec = RequantSpec(tuple(a), tuple(b), 0, zp, *out_range, "half_even",
                           fp.input_ranges, rq, fp)
        attrs = {"stride": [stride, stride], "padding": [pad, pad], "dilation": [dil, dil],
                 "groups": 1, "input_zero_point": z}
        node = Node("conv2d", ("x",), "y", "c", attrs, w, spec)
        x = torch.tensor(rng.integers(lo, hi + 1, (2, 3, 11, 9)),
                         dtype=getattr(torch, in_dtype))
        fast = _FastConv(node, x.dtype).run(x, "auto")
        ref = int_conv2d(x, w, rq, input_zero_point=z, stride=stride, padding=pad,
                         dilation=dil, backend="torch")
        assert fast.dtype == ref.dtype and torch.equal(fast, ref)
