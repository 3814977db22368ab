"""Inference layers that run on packed ±1 weights with the XNOR-popcount kernel.

``PackedBinaryLinear`` and ``PackedBinaryConv2d`` compute exactly what a binary QAT layer
computes at evaluation time (``sign`` with ``+1`` at 0 applied to weights and inputs, zero
padding for convolutions) but store one bit per weight and never form a float matrix product:
``y = (sign(x) @ sign(W).T) * weight_scale + bias``. A first layer fed with integer (fixed-point)
inputs can use ``input_bits`` instead, computed with the QNN bit-plane product.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.kernels.pack import PackedBits, check_backend, pack_signs, unpack_signs
from lowbit.kernels.xnor import bitplane_matmul, xnor_matmul

__all__ = ["PackedBinaryConv2d", "PackedBinaryLinear", "binary_sign", "pack_binary_model"]


def binary_sign(x: Tensor) -> Tensor:
    """``+1`` where ``x >= 0``, ``-1`` elsewhere (the BNN sign; ``torch.sign`` maps 0 to 0)."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x >= 0, one, -one)


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_input_bits(input_bits: int | None) -> int | None:
    if input_bits is not None and (
        isinstance(input_bits, bool) or not isinstance(input_bits, int) or not 1 <= input_bits <= 16
    ):
        raise ValueError(f"input_bits must be None (binary inputs) or an int in 1..16, got "
                         f"{input_bits!r}")
    return input_bits


def _out_vector(value: Tensor | float | None, n: int, name: str) -> Tensor | None:
    """A float32 per-output vector (scalars broadcast) or None."""
    if value is None:
        return None
    v = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    if v.dim() == 0:
        v = v.expand(n).clone()
    if v.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {tuple(v.shape)}")
    return v


def _binary_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The weight whose signs are packed and its per-output scale (``None`` for 1).

    A plain layer packs ``sign(weight)``. A QAT layer with a ``weight_quant`` quantizer (e.g.
    :class:`lowbit.nn.QLinear`) must produce ``scale * sign(W)`` with one scale per output.
    """
    weight = module.weight.detach()
    wq = getattr(module, "weight_quant", None)
    if wq is None:
        return weight, None
    was_training = wq.training
    try:
        wq.eval()
        with torch.no_grad():
            rows = wq(weight).reshape(weight.shape[0], -1)
    finally:
        wq.train(was_training)
    scale = rows.abs().amax(1)
    if bool((scale == 0).any()) or not torch.equal(rows, scale[:, None] * binary_sign(rows)):
        raise ValueError(
            f"{type(module).__name__}: its weight quantizer ({getattr(wq, 'fmt', wq)}) does not "
            "give scale * sign(W) per output; only binary weights can be packed"
        )
    return rows, (None if bool((scale == 1).all()) else scale)


def _check_binary_input(module: nn.Module, probe_shape: tuple[int, ...],
                        input_bits: int | None) -> None:
    """Raise unless the QAT layer's input quantizer is the plain sign (or absent with
    ``input_bits``); layers without an ``act_quant`` attribute are taken as they are."""
    if not hasattr(module, "act_quant"):
        return
    aq = module.act_quant
    name = type(module).__name__
    if input_bits is not None:
        if aq is not None:
            raise ValueError(f"{name} quantizes its input ({getattr(aq, 'fmt', aq)}); "
                             "input_bits is for layers fed integer inputs directly")
        return
    if aq is None:
        raise ValueError(f"{name} does not binarize its input (no act quantizer); pass "
                         "input_bits=<bits> for integer (fixed-point) inputs")
    probe = torch.randn(probe_shape, generator=torch.Generator().manual_seed(0))
    probe.view(-1)[::5] = 0.0
    probe = probe.to(module.weight.device)
    was_training = aq.training
    try:
        aq.eval()
        with torch.no_grad():
            out = aq(probe)
    except Exception as err:
        raise ValueError(f"{name}: could not evaluate its act quantizer ({err})") from err
    finally:
        aq.train(was_training)
    if not torch.equal(out, binary_sign(probe)):
        raise ValueError(f"{name}: its act quantizer ({getattr(aq, 'fmt', aq)}) is not the "
                         "unscaled sign; only binary (+1/-1) activations can be packed")


class _PackedBinaryBase(nn.Module):
    """Shared buffers: packed weight rows, optional per-output scale and bias."""

    weight_words: Tensor
    weight_scale: Tensor | None
    bias: Tensor | None

    def _init_buffers(self, rows: int, k: int, bias: bool, backend: str) -> None:
        self.backend = check_backend(backend)
        self._k = k
        self.register_buffer("weight_words", torch.zeros(rows, math.ceil(k / 64),
                                                         dtype=torch.int64))
        self.register_buffer("weight_scale", None)
        self.register_buffer("bias", torch.zeros(rows) if bias else None)

    def _set_weight(self, weight: Tensor, weight_scale: Tensor | float | None,
                    bias: Tensor | None) -> None:
        rows = self.weight_words.shape[0]
        w = weight.detach().reshape(rows, -1)
        if w.shape[1] != self._k:
            raise ValueError(f"weight has {w.shape[1]} inputs per output, expected {self._k}")
        self.weight_words.copy_(pack_signs(w.float()).words)
        self.weight_scale = _out_vector(weight_scale, rows, "weight_scale")
        if bias is None:
            self.bias = None
        else:
            self.bias = _out_vector(bias, rows, "bias")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "weight_scale"  # an optional buffer: make room when the source has one
        if key in state_dict and self.weight_scale is None:
            self.weight_scale = torch.empty(self.weight_words.shape[0],
                                            device=self.weight_words.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def packed_weight(self) -> PackedBits:
        """The packed sign rows of the weight (one row per output)."""
        return PackedBits(self.weight_words, self._k)



class PackedBinaryLinear(_PackedBinaryBase):
    """Linear layer on packed sign weights: ``y = (sign(x) @ sign(W).T) * weight_scale + bias``.

    With ``input_bits=b`` the input must be an integer tensor of ``b``-bit values (e.g. uint8
    pixels) and ``x @ sign(W).T`` is computed exactly by bit planes (the QNN first layer).
    Weights are stored as int64 words (``in_features / 64`` per output): 32x less than float32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        input_bits: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.in_features = _check_int(in_features, "in_features", 1)
        self.out_features = _check_int(out_features, "out_features", 1)
        self.input_bits = _check_input_bits(input_bits)
        self._init_buffers(out_features, in_features, bias, backend)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        weight_scale: Tensor | float | None = None,
        input_bits: int | None = None,
        backend: str = "auto",
    ) -> PackedBinaryLinear:
        """Pack a trained layer: ``sign(linear.weight)`` for a plain ``nn.Linear``; for a QAT
        layer with ``weight_quant``/``act_quant`` (:class:`lowbit.nn.QLinear` with binary
        specs) its quantized weight ``scale * sign(W)`` (the scale becomes ``weight_scale``),
        after checking that it binarizes its input. ``linear.bias`` is kept in float32."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check_binary_input(linear, (8, linear.in_features), input_bits)
        weight, scale = _binary_weight(linear)
        if weight_scale is None:
            weight_scale = scale
        elif scale is not None:
            raise ValueError("weight_scale given for a layer whose quantizer already scales")
        return cls.from_weight(weight, linear.bias, weight_scale=weight_scale,
                               input_bits=input_bits, backend=backend)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        weight_scale: Tensor | float | None = None,
        input_bits: int | None = None,
        backend: str = "auto",
    ) -> PackedBinaryLinear:
        """Pack ``sign(weight)`` of an ``[out_features, in_features]`` weight."""
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D [out_features, in_features] tensor")
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, input_bits=input_bits,
                    backend=backend)
        layer._set_weight(weight, weight_scale, bias)
        return layer

    def unpacked_weight(self) -> Tensor:
        """The ``±1`` float32 weight ``[out_features, in_features]``."""
        return unpack_signs(self.packed_weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        # the kernel's epilogue gives float32 float(dot) * scale + bias (scale 1 is exact)
        scale = self.weight_scale if self.weight_scale is not None else 1.0
        if self.input_bits is None:
            y = xnor_matmul(pack_signs(rows, backend=self.backend), self.packed_weight,
                            scale=scale, bias=self.bias, backend=self.backend)
            out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        else:
            y = bitplane_matmul(rows, self.packed_weight, bits=self.input_bits, scale=scale,
                                bias=self.bias, backend=self.backend)
            out_dtype = torch.float32
        return y.to(out_dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, input_bits={self.input_bits}")


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t  # type: ignore[return-value]


class PackedBinaryConv2d(_PackedBinaryBase):
    """2-D convolution on packed sign weights and sign inputs (im2col + XNOR-popcount).

    Matches ``conv2d(sign(x), sign(W), bias, stride, padding, dilation)`` with zero padding: the
    padded taps are computed as ``+1`` and their contribution is subtracted exactly.
    ``groups`` must be 1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.in_channels = _check_int(in_channels, "in_channels", 1)
        self.out_channels = _check_int(out_channels, "out_channels", 1)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        if min(self.kernel_size + self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError("kernel_size, stride, dilation must be >= 1 and padding >= 0")
        k = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_buffers(out_channels, k, bias, backend)
        self._pad_cache: dict[tuple[int, int], Tensor] = {}

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        weight_scale: Tensor | float | None = None,
        backend: str = "auto",
    ) -> PackedBinaryConv2d:
        """Pack ``sign(conv.weight)`` of an ``nn.Conv2d`` with ``groups=1`` and zero padding
        (for a QAT layer, its quantized binary weight, as in
        :meth:`PackedBinaryLinear.from_linear`)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"only groups=1 is supported, got groups={conv.groups}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only numeric zero padding is supported (padding_mode='zeros')")
        _check_binary_input(conv, (2, conv.in_channels, 3, 3), None)
        weight, scale = _binary_weight(conv)
        if weight_scale is None:
            weight_scale = scale
        elif scale is not None:
            raise ValueError("weight_scale given for a layer whose quantizer already scales")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.bias is not None, backend=backend)
        layer._set_weight(weight, weight_scale, conv.bias)
        return layer

    def unpacked_weight(self) -> Tensor:
        """The ``±1`` float32 weight ``[out, in, kh, kw]``."""
        return unpack_signs(self.packed_weight).reshape(
            self.out_channels, self.in_channels, *self.kernel_size
        )

    def _padding_correction(self, h: int, w: int) -> Tensor:
        """Int32 ``[out, L]``: the sum of the weights over taps that fall on zero padding."""
        key = (h, w, self.weight_words._version, str(self.weight_words.device))
        if key not in self._pad_cache:
            self._pad_cache.clear()
            ph, pw = self.padding
            inside = torch.zeros(1, 1, h + 2 * ph, w + 2 * pw, dtype=torch.float64)
            inside[..., ph : ph + h, pw : pw + w] = 1.0
            taps = self.unpacked_weight().double().sum(1, keepdim=True)
            corr = F.conv2d(1.0 - inside, taps, stride=self.stride, dilation=self.dilation)
            corr = corr.reshape(self.out_channels, -1).round().to(torch.int32)
            self._pad_cache[key] = corr.to(self.weight_words.device)
        return self._pad_cache[key]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [N, {self.in_channels}, H, W], got "
                             f"{tuple(x.shape)}")
        n, _, h, w = x.shape
        ph, pw = self.padding
        s = binary_sign(x.float())
        if ph or pw:
            s = F.pad(s, (pw, pw, ph, ph), value=1.0)  # +1 = clear bit, corrected below
        cols = F.unfold(s, self.kernel_size, dilation=self.dilation, stride=self.stride)
        length = cols.shape[-1]
        rows = cols.transpose(1, 2).reshape(n * length, -1)  # [N*L, C*kh*kw], weight order
        acc = xnor_matmul(pack_signs(rows, backend=self.backend), self.packed_weight,
                          backend=self.backend)  # [N*L, out]
        acc = acc.view(n, length, self.out_channels).transpose(1, 2)
        if ph or pw:
            acc = acc - self._padding_correction(h, w)
        y = acc.to(torch.float32)
        if self.weight_scale is not None:
            y = y * self.weight_scale.view(-1, 1)
        if self.bias is not None:
            y = y + self.bias.view(-1, 1)
        oh = (h + 2 * ph - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * pw - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        return y.reshape(n, self.out_channels, oh, ow).to(out_dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}")


def pack_binary_model(model: nn.Module, *, inplace: bool = False,
                      backend: str = "auto") -> nn.Module:
    """Replace every layer whose weights and inputs are binarized (QAT layers with binary
    ``weight_quant`` and ``act_quant``, e.g. from ``lowbit.convert(model, "w1a1")``) by its
    packed equivalent; other layers (first/last layers kept at higher precision, BN, ...) are
    left alone. Returns the model (a deep copy unless ``inplace``), in eval mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_backend(backend)
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if getattr(child, "act_quant", None) is None or getattr(
                    child, "weight_quant", None) is None:
                continue
            try:
                if isinstance(child, nn.Linear):
                    packed: nn.Module = PackedBinaryLinear.from_linear(child, backend=backend)
                elif isinstance(child, nn.Conv2d):
                    packed = PackedBinaryConv2d.from_conv(child, backend=backend)
                else:
                    continue
            except ValueError:
                continue  # not a binary-weight, binary-input layer
            setattr(parent, name, packed.to(child.weight.device))
    return model.eval()
