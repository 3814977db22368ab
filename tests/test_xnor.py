"""XNOR-popcount kernels, bit packing and packed binary layers, proven against float products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.kernels.pack import (
    PackedBits,
    available_backends,
    pack_bits,
    pack_signs,
    popcount,
    unpack_bits,
    unpack_signs,
)
from lowbit.kernels.xnor import bitplane_matmul, xnor_matmul
from lowbit.nn.binary import (
    PackedBinaryConv2d,
    PackedBinaryLinear,
    binary_sign,
    pack_binary_model,
)

BACKENDS = available_backends()
COMPILED = [b for b in BACKENDS if b != "torch"]


def pm1(*shape: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random ±1 float32 tensor."""
    return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


def exact_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Independent reference: float64 matmul (exact for integer sums far below 2^53)."""
    return (a.double() @ b.double()).to(torch.int32)


# ------------------------------------------------------------------------------ packing


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 4), max_size=2), k=st.integers(1, 200), seed=st.integers(0, 99))
def test_pack_unpack_round_trip(lead: list[int], k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen)
    s = binary_sign(x)
    for backend in ("torch", "auto"):
        p = pack_signs(x, backend=backend)
        assert p.shape == tuple(x.shape)
        assert p.words.shape == (*lead, (k + 63) // 64)
        assert torch.equal(unpack_signs(p), s)
    bits = x < 0.3
    assert torch.equal(unpack_bits(pack_bits(bits)), bits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_bit_layout_and_special_values(backend: str) -> None:
    x = torch.ones(2, 130)
    x[0, 0] = -1.0  # word 0, bit 0
    x[0, 63] = -0.5  # word 0, bit 63 (the int64 sign bit)
    x[0, 64] = float("nan")  # NaN is not >= 0 -> -1
    x[1, 5] = -0.0  # -0.0 >= 0 -> +1, bit clear
    x[1, 129] = -3.0  # word 2, bit 1
    p = pack_signs(x, backend=backend)
    words = p.words.tolist()
    assert words[0] == [1 - 2**63, 1, 0]  # bits 0 and 63 of word 0; bit 0 of word 1
    assert words[1] == [0, 0, 2]
    ref = torch.where(x >= 0, 1.0, -1.0)
    assert torch.equal(unpack_signs(p), ref)


@pytest.mark.skipif(not COMPILED, reason="compiled XNOR extension not available")
def test_compiled_pack_matches_torch_pack() -> None:
    x = torch.randn(37, 1000)
    x[x.abs() < 0.05] = 0.0
    ref = pack_signs(x, backend="torch").words
    for backend in COMPILED:
        assert torch.equal(pack_signs(x, backend=backend).words, ref)


def test_popcount_matches_python() -> None:
    words = torch.randint(-(2**63), 2**63 - 1, (50,), dtype=torch.int64)
    expected = [bin(w & (2**64 - 1)).count("1") for w in words.tolist()]
    assert popcount(words).tolist() == expected


def test_packed_bits_validates() -> None:
    with pytest.raises(ValueError, match="needs 2"):
        PackedBits(torch.zeros(3, 1, dtype=torch.int64), 65)
    with pytest.raises(TypeError, match="int64"):
        PackedBits(torch.zeros(3, 1, dtype=torch.int32), 10)
    with pytest.raises(ValueError, match="backend must be one of"):
        pack_signs(torch.ones(3), backend="cuda")
    with pytest.raises(TypeError, match="bool"):
        pack_bits(torch.ones(3))


# ------------------------------------------------------------------------- xnor_matmul


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 70),
    k=st.integers(1, 700),
    n=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_xnor_matmul_equals_float_matmul(m: int, k: int, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a, b = pm1(m, k, gen=gen), pm1(k, n, gen=gen)
    ref = exact_matmul(a, b)
    for backend in BACKENDS:
        out = xnor_matmul(a, b, backend=backend)
        assert out.dtype == torch.int32
        assert torch.equal(out, ref), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "m,k,n",
    [(1, 1, 1), (1, 4096, 300), (67, 63, 5), (5, 64, 67), (9, 65, 9), (130, 16384 + 77, 259)],
)
def test_xnor_matmul_block_edges(backend: str, m: int, k: int, n: int) -> None:
    """Sizes that cross word, vector, micro-tile and cache-block boundaries of the kernel."""
    gen = torch.Generator().manual_seed(m * 7 + k + n)
    a, b = pm1(m, k, gen=gen), pm1(k, n, gen=gen)
    assert torch.equal(xnor_matmul(a, b, backend=backend), exact_matmul(a, b))


def test_xnor_matmul_packed_inputs_and_sign_rule() -> None:
    a = torch.randn(6, 100)
    b = torch.randn(100, 7)
    a[0, :10] = 0.0  # zero counts as +1
    ref = exact_matmul(binary_sign(a), binary_sign(b))
    assert torch.equal(xnor_matmul(a, b), ref)
    assert torch.equal(xnor_matmul(pack_signs(a), pack_signs(b.T)), ref)
    assert torch.equal(xnor_matmul(a, pack_signs(b.T)), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_scale_bias_epilogue(backend: str) -> None:
    """float(a @ b) * scale + bias, rounded exactly as the separate torch ops round it."""
    gen = torch.Generator().manual_seed(5)
    a, b = pm1(37, 300, gen=gen), pm1(300, 70, gen=gen)
    scale, bias = torch.rand(70, generator=gen) * 0.3, torch.randn(70, generator=gen)
    ref = exact_matmul(a, b).float() * scale + bias
    out = xnor_matmul(a, b, scale=scale, bias=bias, backend=backend)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert torch.equal(xnor_matmul(a, b, bias=bias, backend=backend),
                       exact_matmul(a, b).float() + bias)
    assert torch.equal(xnor_matmul(a, b, scale=1.0, backend=backend), exact_matmul(a, b).float())
    x = torch.randint(-128, 128, (9, 300), generator=gen)
    ref = exact_matmul(x, b).float() * scale + bias
    assert torch.equal(bitplane_matmul(x, b, scale=scale, bias=bias, backend=backend), ref)
    with pytest.raises(ValueError, match="scale must be a scalar or have shape"):
        xnor_matmul(a, b, scale=torch.ones(3), backend=backend)


@pytest.mark.skipif(not COMPILED, reason="compiled XNOR extension not available")
def test_compiled_backends_bit_exact_against_torch_fallback() -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = pm1(40, 1500, gen=gen), pm1(1500, 90, gen=gen)
    ref = xnor_matmul(a, b, backend="torch")
    for backend in COMPILED:
        assert torch.equal(xnor_matmul(a, b, backend=backend), ref)


def test_xnor_matmul_errors() -> None:
    with pytest.raises(ValueError, match="inner dimensions differ"):
        xnor_matmul(torch.ones(2, 3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="2-D"):
        xnor_matmul(torch.ones(2, 3, 4), torch.ones(4, 2))
    with pytest.raises(TypeError, match="Tensor or PackedBits"):
        xnor_matmul([[1.0]], torch.ones(1, 1))
    with pytest.raises(ValueError, match="backend must be one of"):
        xnor_matmul(torch.ones(2, 3), torch.ones(3, 2), backend="gpu")


# ---------------------------------------------------------------------- bit-plane product


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 300), n=st.integers(1, 17),
       signed=st.booleans(), bits=st.integers(1, 8), seed=st.integers(0, 999))
def test_bitplane_matmul_exact(m: int, k: int, n: int, signed: bool, bits: int,
                               seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    x = torch.randint(lo, hi, (m, k), generator=gen)
    w = pm1(k, n, gen=gen)
    ref = exact_matmul(x, w)
    for backend in BACKENDS:
        out = bitplane_matmul(x, w, bits=bits, signed=signed, backend=backend)
        assert out.dtype == torch.int32
        assert torch.equal(out, ref), backend


def test_bitplane_matmul_uint8_and_errors() -> None:
    x = torch.randint(0, 256, (4, 333), dtype=torch.int64).to(torch.uint8)
    w = pm1(333, 10)
    assert torch.equal(bitplane_matmul(x, w), exact_matmul(x, w))
    assert torch.equal(bitplane_matmul(x, pack_signs(w.T), backend="torch"), exact_matmul(x, w))
    with pytest.raises(ValueError, match="outside the unsigned 8-bit range"):
        bitplane_matmul(torch.full((1, 333), 256), w)
    with pytest.raises(TypeError, match="integer dtype"):
        bitplane_matmul(torch.ones(1, 333), w)
    with pytest.raises(ValueError, match="bits must be"):
        bitplane_matmul(x, w, bits=0)


# ---------------------------------------------------------------------- packed layers


class FakeQuantBinaryLinear(nn.Linear):
    """Local stand-in for a binary QAT linear at eval: sign(x) @ sign(W).T + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(binary_sign(x), binary_sign(self.weight), self.bias)


class FakeQuantBinaryConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(binary_sign(x), binary_sign(self.weight), self.bias, self.stride,
                        self.padding, self.dilation)


def test_packed_linear_logits_equal_fake_quant_mlp() -> None:
    torch.manual_seed(0)
    fq = nn.Sequential(
        FakeQuantBinaryLinear(100, 256, bias=False), nn.BatchNorm1d(256),
        FakeQuantBinaryLinear(256, 130, bias=False), nn.BatchNorm1d(130),
        FakeQuantBinaryLinear(130, 10, bias=False), nn.BatchNorm1d(10),
    )
    for m in fq:
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_(0, 3)
            m.running_var.uniform_(5, 50)
            m.weight.data.normal_()
            m.bias.data.normal_()
    fq.eval()
    packed = nn.Sequential(*[
        PackedBinaryLinear.from_linear(m) if isinstance(m, nn.Linear) else m for m in fq
    ]).eval()
    x = torch.randn(33, 100)
    x[:, :5] = 0.0
    with torch.no_grad():
        assert torch.equal(packed(x), fq(x))
    assert packed[0].packed_weight.nbytes() == 256 * 2 * 8  # 100 inputs -> 2 words per row


def test_packed_linear_bias_scale_and_batch_dims() -> None:
    torch.manual_seed(1)
    lin = FakeQuantBinaryLinear(77, 9)
    packed = PackedBinaryLinear.from_linear(lin, weight_scale=0.25)
    x = torch.randn(2, 3, 77)
    with torch.no_grad():
        ref = (binary_sign(x).double() @ binary_sign(lin.weight).double().T) * 0.25
        ref = (ref.float() + lin.bias).float()
    out = packed(x)
    assert out.shape == (2, 3, 9)
    assert torch.equal(out, ref)
    assert torch.equal(packed.unpacked_weight(), binary_sign(lin.weight.detach()))
    with pytest.raises(ValueError, match="expected last dim 77"):
        packed(torch.randn(3, 76))
    with pytest.raises(TypeError, match="nn.Linear"):
        PackedBinaryLinear.from_linear(nn.Conv2d(1, 1, 1))


def test_packed_linear_first_layer_bitplanes() -> None:
    torch.manual_seed(2)
    w = torch.randn(20, 64)
    layer = PackedBinaryLinear.from_weight(w, input_bits=8)
    pixels = torch.randint(0, 256, (5, 64), dtype=torch.uint8)
    expected = (pixels.double() @ binary_sign(w).double().T).float()
    assert torch.equal(layer(pixels), expected)


def test_packed_layer_state_dict_round_trip() -> None:
    src = PackedBinaryLinear.from_weight(torch.randn(5, 70), torch.randn(5),
                                         weight_scale=torch.rand(5))
    dst = PackedBinaryLinear(70, 5)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(4, 70)
    assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize(
    "cin,cout,k,stride,padding,dilation,hw",
    [(3, 8, 3, 1, 1, 1, (9, 7)), (16, 5, 3, 2, 1, 1, (8, 8)), (4, 6, (3, 1), 1, (2, 0), 2,
                                                               (10, 6)), (70, 4, 1, 1, 0, 1, (3, 3))],
)
def test_packed_conv_equals_fake_quant_conv(cin, cout, k, stride, padding, dilation, hw) -> None:
    torch.manual_seed(cin + cout)
    fq = FakeQuantBinaryConv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                               bias=False)
    packed = PackedBinaryConv2d.from_conv(fq)
    x = torch.randn(2, cin, *hw)
    x[0, 0, 0, :] = 0.0
    with torch.no_grad():
        assert torch.equal(packed(x), fq(x))
    fq.bias = nn.Parameter(torch.randn(cout))
    packed = PackedBinaryConv2d.from_conv(fq)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), fq(x), rtol=0, atol=1e-4)


def test_packed_conv_rejects_groups() -> None:
    with pytest.raises(ValueError, match="groups=1"):
        PackedBinaryConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))


# ------------------------------------------------------- against lowbit.nn's QAT layers


def _lowbit_qat():
    lnn = pytest.importorskip("lowbit.nn")
    if not hasattr(lnn, "QLinear"):
        pytest.skip("lowbit.nn.QLinear not available")
    return lnn


def test_packed_model_equals_qlinear_binary_model() -> None:
    lnn = _lowbit_qat()
    torch.manual_seed(8)
    model = nn.Sequential(
        lnn.QLinear(100, 256, bias=False, weight="binary", act="binary"), nn.BatchNorm1d(256),
        nn.Identity(), lnn.QLinear(256, 10, bias=False, weight="binary", act="binary"),
    )
    model[1].running_mean.normal_(0, 3)
    model[1].running_var.uniform_(5, 50)
    model.eval()
    packed = pack_binary_model(model)
    assert isinstance(packed[0], PackedBinaryLinear) and isinstance(packed[3], PackedBinaryLinear)
    assert isinstance(model[0], lnn.QLinear)  # not in place by default
    x = torch.randn(17, 100)
    x[:, :3] = 0.0
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


def test_packed_conv_equals_qconv_binary() -> None:
    lnn = _lowbit_qat()
    torch.manual_seed(9)
    qconv = lnn.QConv2d(6, 5, 3, padding=1, bias=False, weight="binary", act="binary").eval()
    packed = PackedBinaryConv2d.from_conv(qconv)
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        assert torch.equal(packed(x), qconv(x))


def test_packed_from_scaled_binary_qlinear() -> None:
    lnn = _lowbit_qat()
    torch.manual_seed(10)
    q = lnn.QLinear(70, 12, weight="binary-scaled", act="binary").eval()
    packed = PackedBinaryLinear.from_linear(q)
    assert packed.weight_scale is not None
    x = torch.randn(5, 70)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), q(x), rtol=1e-6, atol=1e-6)


def test_pack_binary_model_leaves_non_binary_layers() -> None:
    lnn = _lowbit_qat()
    torch.manual_seed(11)
    q8 = lnn.QLinear(20, 30, weight="int8", act="int8")
    qa = lnn.QLinear(30, 10, weight="binary", act=None)
    model = nn.Sequential(q8, nn.BatchNorm1d(30), qa).eval()
    packed = pack_binary_model(model)
    assert type(packed[0]) is type(q8) and type(packed[2]) is type(qa)
    with pytest.raises(ValueError, match="does not binarize its input"):
        PackedBinaryLinear.from_linear(qa)
    with pytest.raises(ValueError, match="only binary weights"):
        PackedBinaryLinear.from_linear(lnn.QLinear(20, 30, weight="int8", act="binary"))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("m,k,n", [(2, 0, 3), (0, 5, 3), (2, 5, 0)])
def test_empty_operands(backend, m, k, n):
    from lowbit.kernels import xnor_matmul as top_level  # the package exports it

    a, b = torch.ones(m, k), -torch.ones(k, n)
    out = top_level(a, b, backend=backend)
    assert out.shape == (m, n) and out.dtype == torch.int32
    assert torch.equal(out, (a @ b).to(torch.int32))
