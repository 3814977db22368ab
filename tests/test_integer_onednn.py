"""oneDNN's int8 convolution as an exact accumulator in the fused channels-last executor path:
bit for bit equal to the ``_int_mm`` path, the pure-torch path and float64, used only where
the certified bound keeps every sum below 2^24. Skips where oneDNN cannot be used exactly (op
missing, CPU without VNNI/AMX) or the compiled kernels do not build."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _helpers import randomize_bn
from lowbit import models
from lowbit import nn as lnn
from lowbit.integer import executor, to_integer
from lowbit.integer.executor import Node, RequantSpec, _FastConv, _fused_extension
from lowbit.integer.ops import (
    ONEDNN_EXACT_LIMIT,
    OnednnConv2d,
    Requantizer,
    int_conv2d,
    make_requantizer,
    onednn_accumulator_bound,
    onednn_available,
)

pytestmark = [
    pytest.mark.skipif(not onednn_available(), reason="oneDNN cannot give exact int8 sums here"),
    pytest.mark.skipif(_fused_extension() is None, reason="compiled kernels unavailable"),
]

RANGES = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


def _node(w: torch.Tensor, z: int, lo: int, hi: int, stride: int, pad: int, dil: int,
          out_range=(0, 255), out_zp: int = 3, seed: int = 0) -> Node:
    rng = np.random.default_rng(seed)
    o = w.shape[0]
    a = [Fraction(float(v)) for v in rng.uniform(-3e-4, 3e-4, o)]
    b = [Fraction(float(v)) for v in rng.uniform(-20, 20, o)]
    rq, fp = make_requantizer(w, a, b, input_range=(lo, hi), input_zero_point=z,
                              output_range=out_range, output_zero_point=out_zp)
    spec = RequantSpec(tuple(a), tuple(b), 0, out_zp, *out_range, "half_even",
                       fp.input_ranges, rq, fp)
    attrs = {"stride": [stride, stride], "padding": [pad, pad], "dilation": [dil, dil],
             "groups": 1, "input_zero_point": z}
    return Node("conv2d", ("x",), "y", "c", attrs, w, spec)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("z", [0, 37, "odd-negative"])
@pytest.mark.parametrize("geometry", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (1, 2, 0, 1),
                                      (3, 1, 0, 1), (3, 1, 2, 2), (5, 2, 2, 1)])
@pytest.mark.parametrize("batch", [1, 7])
def test_onednn_layer_equals_int_mm_and_torch(dtype, z, geometry, batch):
    k, stride, pad, dil = geometry
    lo, hi = RANGES[dtype]
    z = -45 if z == "odd-negative" and dtype == torch.int8 else (199 if z == "odd-negative"
                                                                  else z)
    g = torch.Generator().manual_seed(k * 100 + stride * 10 + pad + batch + z)
    w = torch.randint(-127, 128, (24, 13, k, k), generator=g, dtype=torch.int16).to(torch.int8)
    x = torch.randint(lo, hi + 1, (batch, 13, 11, 9), generator=g,
                      dtype=torch.int16).to(dtype)
    # exact accumulators first
    conv = OnednnConv2d(w, input_zero_point=z, input_dtype=dtype, stride=stride, padding=pad,
                        dilation=dil)
    want = F.conv2d(x.double() - z, w.double(), None, stride, pad, dil)
    got = conv(x)
    assert got.dtype == torch.float32 and torch.equal(got.double(), want)
    # the executor's layer on both paths, against the pure-torch int_conv2d
    for out_range, zp in (((0, 255), 7), ((-128, 127), -2), ((-(2**20), 2**20), 0)):
        node = _node(w, z, lo, hi, stride, pad, dil, out_range, zp)
        fast = _FastConv(node, dtype)
        assert fast.onednn is not None
        ref = int_conv2d(x, w, node.requant.requantizer, input_zero_point=z, stride=stride,
                         padding=pad, dilation=dil, backend="torch")
        y1 = fast.run(x, "onednn")
        assert fast.last_path == "onednn"
        y2 = fast.run(x, "compiled")
        assert fast.last_path == "int_mm"
        assert y1.dtype == ref.dtype and torch.equal(y1, ref) and torch.equal(y2, ref)


def _identity_node(w: torch.Tensor, pad: int = 0) -> Node:
    """A conv2d node whose requantization returns the accumulator itself (int32)."""
    o = w.shape[0]
    one, zero = torch.ones(o, dtype=torch.int64), torch.zeros(o, dtype=torch.int64)
    lim = 2**31 - 1
    rq = Requantizer(one, zero, zero, zero, 0, -lim, lim, torch.int32, (-lim, lim))
    spec = RequantSpec((Fraction(1),) * o, (Fraction(0),) * o, 0, 0, -lim, lim, "half_even",
                       np.tile(np.array([[-lim, lim]]), (o, 1)), rq)
    attrs = {"stride": [1, 1], "padding": [pad, pad], "dilation": [1, 1], "groups": 1,
             "input_zero_point": 0}
    return Node("conv2d", ("x",), "y", "c", attrs, w, spec)


def test_bound_at_the_float32_limit():
    """All inputs 255, all weights 127: K = 518 sums to just below 2^24 (oneDNN, exact),
    K = 519 reaches it (never oneDNN)."""
    for c, expect in ((518, True), (519, False)):
        w = torch.full((4, c, 1, 1), 127, dtype=torch.int8)
        bound = onednn_accumulator_bound(w, (0, 255), 0, torch.uint8)
        assert (int(bound.max()) < ONEDNN_EXACT_LIMIT) == expect
        conv = OnednnConv2d.certified(w, input_zero_point=0, input_dtype=torch.uint8)
        assert (conv is not None) == expect
        node = _identity_node(w)
        fast = _FastConv(node, torch.uint8)
        assert (fast.onednn is not None) == expect
        x = torch.full((2, c, 3, 3), 255, dtype=torch.uint8)
        y = fast.run(x, "onednn")
        assert fast.last_path == ("onednn" if expect else "int_mm")
        assert torch.equal(fast.run(x, "auto"), y)  # "auto": the fastest path, same integers
        ref = int_conv2d(x, w, node.requant.requantizer, input_zero_point=0, backend="torch")
        assert torch.equal(y, ref)
        assert torch.equal(y.double(), F.conv2d(x.double(), w.double()))  # the sums
        if expect:
            assert torch.equal(conv(x).double(), F.conv2d(x.double(), w.double()))
        else:
            with pytest.raises(ValueError, match="2\\^24"):
                OnednnConv2d(w, input_zero_point=0, input_dtype=torch.uint8)


def test_huge_layer_keeps_int_mm():
    """K = 256·9 weights of 127 with inputs up to 255: ~2^26, the _int_mm path runs."""
    w = torch.full((8, 256, 3, 3), 127, dtype=torch.int8)
    node = _identity_node(w, pad=1)
    fast = _FastConv(node, torch.uint8)
    assert fast.onednn is None
    x = torch.randint(0, 256, (1, 256, 5, 5), dtype=torch.int16).to(torch.uint8)
    y = fast.run(x, "onednn")
    assert fast.last_path == "int_mm"
    ref = int_conv2d(x, w, node.requant.requantizer, input_zero_point=0, padding=1,
                     backend="torch")
    assert torch.equal(y, ref)
    assert torch.equal(y.double(), F.conv2d(x.double(), w.double(), padding=1))


def test_narrow_code_range_certifies_more():
    """The proven code range of a layer's input, not its storage type, sets the bound."""
    w = torch.full((2, 700, 1, 1), 127, dtype=torch.int8)  # 700·127·255 > 2^24 > 700·127·15
    assert OnednnConv2d.certified(w, input_zero_point=0, input_dtype=torch.uint8) is None
    conv = OnednnConv2d.certified(w, input_zero_point=0, input_dtype=torch.uint8,
                                  input_range=(0, 15))
    assert conv is not None
    x = torch.full((1, 700, 2, 2), 15, dtype=torch.uint8)
    assert torch.equal(conv(x).double(), F.conv2d(x.double(), w.double()))


@pytest.fixture(scope="module")
def resnet20_int():
    torch.manual_seed(3)
    model = models.create("resnet20").eval()
    g = torch.Generator().manual_seed(3)
    randomize_bn(model, g, gamma=(0.5, 1.5), beta=(-0.2, 0.2))
    fq = lnn.convert(model, "w8a8", first_last="same")
    return to_integer(fq, [torch.randn(16, 3, 32, 32, generator=g) for _ in range(2)])


def test_resnet20_onednn_bit_exact(resnet20_int):
    im = resnet20_int
    convs = [n.name for n in im.nodes if n.op == "conv2d"]
    assert im.onednn_layers() == convs  # every convolution of ResNet-20 is certified
    for bs in (1, 7):
        q = im.quantize_input(torch.randn(bs, 3, 32, 32))
        want = im.run_integer(q, backend="torch")
        for backend in ("auto", "vnni" if _vnni() else "auto", "amx" if _amx() else "auto",
                        "onednn", "compiled"):
            assert torch.equal(im.run_integer(q, backend=backend), want), (bs, backend)
        assert set(_layer_paths(im)) == {"int_mm"}  # the last run was "compiled"
        im.run_integer(q, backend="onednn")
        assert set(_layer_paths(im)) == {"onednn"}


def _layer_paths(im) -> list[str]:
    steps, _ = im._fused_plan()
    return [g.last_path for _, g in steps if g is not None and hasattr(g, "last_path")]


def _vnni() -> bool:
    from lowbit.integer import _ext

    return _ext.vnni() is not None


@pytest.mark.skipif(not _vnni(), reason="no AVX-512 VNNI kernel on this machine")
def test_resnet20_vnni_and_autotuned_paths(resnet20_int):
    """backend="vnni" runs every convolution (residual adds included) in lowbit's VNNI kernel;
    "auto" times the available paths once per layer and input shape and keeps the fastest."""
    im = resnet20_int
    q = im.quantize_input(torch.randn(5, 3, 32, 32))
    want = im.run_integer(q, backend="torch")
    assert torch.equal(im.run_integer(q, backend="vnni"), want)
    assert _layer_paths(im) == ["vnni"] * 19  # 10 convolutions + 9 fused residual blocks
    steps, _ = im._fused_plan()
    layers = [g for _, g in steps if g is not None and hasattr(g, "chosen")]
    for g in layers:  # the module's model: forget the choices of earlier tests
        g.chosen.clear()
    assert torch.equal(im.run_integer(q, backend="auto"), want)
    assert all(len(g.chosen) == 1 for g in layers)  # one input shape each
    chosen = [next(iter(g.chosen.values())) for g in layers]
    assert set(chosen) <= {"amx", "vnni", "onednn", "int_mm"}
    assert _layer_paths(im) == chosen
    assert torch.equal(im.run_integer(q, backend="auto"), want)  # cached choice


def _amx() -> bool:
    from lowbit.integer import _ext

    return _vnni() and _ext.vnni().amx_supported()


@pytest.mark.skipif(not _amx(), reason="no AMX-INT8 on this machine")
def test_resnet20_amx(resnet20_int):
    """backend="amx": every convolution on AMX tiles, same integers."""
    im = resnet20_int
    q = im.quantize_input(torch.randn(3, 3, 32, 32))
    assert torch.equal(im.run_integer(q, backend="amx"), im.run_integer(q, backend="torch"))
    assert _layer_paths(im) == ["amx"] * 19


def test_autotuning_checks_the_paths_agree(resnet20_int, monkeypatch):
    im = resnet20_int
    steps, _ = im._fused_plan()
    layer = next(g for _, g in steps if g is not None and hasattr(g, "chosen"))
    if len(executor._paths(layer)) < 2:
        pytest.skip("a single path on this machine: nothing to compare")
    monkeypatch.setattr(layer, "chosen", {})
    real = layer._run_accumulated
    # the _int_mm path (always a candidate, never the first of two) now returns wrong integers
    monkeypatch.setattr(layer, "_run_accumulated",
                        lambda *a: real(*a) + (1 if a[-1] == "compiled" else 0))
    q = im.quantize_input(torch.randn(2, 3, 32, 32))
    with pytest.raises(RuntimeError, match="disagree"):
        im.run_integer(q, backend="auto")


def test_vnni_backend_unavailable_is_a_clear_error(resnet20_int, monkeypatch):
    monkeypatch.setattr(executor, "_ext_vnni", lambda: None)
    q = resnet20_int.quantize_input(torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="backend='vnni'.*'auto', 'onednn'"):
        resnet20_int.run_integer(q, backend="vnni")


def test_backend_names_checked(resnet20_int):
    q = resnet20_int.quantize_input(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="'auto', 'torch', 'compiled', 'onednn', 'vnni'"):
        resnet20_int.run_integer(q, backend="mkldnn")
