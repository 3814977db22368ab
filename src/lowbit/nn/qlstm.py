"""Quantized LSTM (QNN, Hubara et al.): k-bit weights, inputs, gates and hidden state.

:class:`QLSTM` subclasses ``nn.LSTM`` (same constructor, parameters, ``state_dict`` keys and
call signature) and quantizes, per layer and time step::

    x_q = act(x)                                  # layer input: the scheme's act spec
    z   = x_q @ wq(W_ih).T + b_ih + h_q @ wq(W_hh).T + b_hh     # (grad spec on dL/dz)
    i, f, o = gate(sigmoid(z_i)), gate(sigmoid(z_f)), gate(sigmoid(z_o))   # grid on [0, 1]
    g       = gate(tanh(z_g))                                               # grid on [-1, 1]
    c   = f * c + i * g                           # cell state kept in float
    h_q = gate(o * gate(tanh(c)))                 # hidden state on the grid on [-1, 1]

``wq`` is the weight spec (integers: per gate row, scale from max |w|), ``act`` the activation
spec (with its observer, as in :class:`lowbit.nn.QLinear`). Gate outputs and the hidden state
have known ranges, so they are quantized onto fixed grids in the activation's format: for an
integer format of ``k`` bits, ``[0, 1]`` gets the ``2^k`` levels ``j / (2^k - 1)`` (``uintk``)
and ``[-1, 1]`` the ``2^k - 1`` levels ``j / (2^(k-1) - 1)`` (``intk``, zero included);
binary/ternary formats round onto ``{-1, (0,) 1}`` (``{0, 1}`` for sigmoid gates); minifloats
round unscaled. Nothing on these grids is ever clipped, so their straight-through gradient is
the identity. With no specs the module computes what ``nn.LSTM`` computes: bit for bit the
same as ATen's own CPU loop (``torch.backends.mkldnn`` off), to float rounding otherwise.
Gradients flow through the quantizers by the straight-through estimator; binary/ternary LSTM
weights are not clipped by ``lowbit.nn.clip_latent_weights`` (meant for k-bit integers here).

``lowbit.nn.convert`` swaps ``nn.LSTM`` modules for ``QLSTM`` (:meth:`QLSTM.from_float`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.formats import get_format
from lowbit.nn.modules import GradQuantizer, Quantizer
from lowbit.quant.functional import fake_quantize
from lowbit.quant.spec import QuantSpec, _format_kind

__all__ = ["QLSTM"]

LSTMState = tuple[Tensor, Tensor]


def _spec_or_none(spec: Any) -> QuantSpec | None:
    return None if spec is None else QuantSpec.parse(spec)


class _BoundedGrid:
    """Fake quantization of values known to lie in ``[0, 1]`` (``unit=True``) or ``[-1, 1]``
    onto a fixed grid in the format of an activation spec (see the module docstring)."""

    def __init__(self, spec: QuantSpec, unit: bool) -> None:
        fmt = spec.format
        self.kind = _format_kind(fmt)
        self.unit = unit
        self.rounding = spec.rounding
        self.scale: float | None = None
        self.fmt = fmt
        if self.kind == "int":
            bits = fmt.bits
            if unit:
                self.fmt = get_format(f"uint{bits}")
                self.scale = 1.0 / (2**bits - 1)
            else:
                self.fmt = get_format(f"int{max(bits, 2)}")
                self.scale = 1.0 / (2 ** (max(bits, 2) - 1) - 1)
        elif self.kind in ("binary", "ternary"):
            self.scale = 1.0
        elif self.kind != "float":
            raise ValueError(f"QLSTM cannot quantize gates to format {fmt.name}")

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind == "int":
            return fake_quantize(x, self.fmt, scale=self.scale, zero_point=0,
                                 rounding=self.rounding)
        if self.kind == "float":
            return fake_quantize(x, self.fmt, rounding=self.rounding)
        if self.unit:  # {0, 1}: the +-1 (or -1, 0, 1) grid of 2x - 1, mapped back
            y = fake_quantize(2 * x - 1, self.fmt, scale=1.0, rounding=self.rounding)
            return (y + 1) / 2
        return fake_quantize(x, self.fmt, scale=self.scale, rounding=self.rounding)


class QLSTM(nn.LSTM):
    """``nn.LSTM`` with k-bit weights, layer inputs, gates and hidden state.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional: as for
            ``nn.LSTM`` (``proj_size`` is not supported).
        weight, act, grad: specs (anything :meth:`QuantSpec.parse` accepts) or ``None``.
            ``weight`` quantizes every ``weight_ih``/``weight_hh`` (per-channel specs: one
            scale per gate row); ``act`` quantizes each layer's input with its observer and
            sets the format of the gate and hidden-state grids; ``grad`` quantizes the
            gradient of the gate pre-activations ``z``.
        quantize_gates: ``False`` keeps gates, ``tanh(c)`` and the hidden state in float (only
            the matrix products' operands are quantized).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, *, weight: Any = None, act: Any = None,
                 grad: Any = None, quantize_gates: bool = True, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias=bias,
                         batch_first=batch_first, dropout=dropout,
                         bidirectional=bidirectional, device=device, dtype=dtype)
        if not isinstance(quantize_gates, bool):
            raise TypeError(f"quantize_gates must be a bool, got {type(quantize_gates).__name__}")
        wspec, aspec, gspec = _spec_or_none(weight), _spec_or_none(act), _spec_or_none(grad)
        self.quantize_gates = quantize_gates
        self.weight_quant = nn.ModuleDict()
        if wspec is not None:
            for name in self._weight_names():
                self.weight_quant[name] = Quantizer(wspec, axis=0, channels=4 * hidden_size)
        self.act_quant: nn.ModuleList | None = None
        self._unit_grid = self._signed_grid = None
        if aspec is not None:
            dirs = 2 if bidirectional else 1
            sizes = [input_size] + [hidden_size * dirs] * (num_layers - 1)
            self.act_quant = nn.ModuleList(
                Quantizer(aspec, axis=-1, channels=n) for n in sizes)
            if quantize_gates:
                self._unit_grid = _BoundedGrid(aspec, unit=True)
                self._signed_grid = _BoundedGrid(aspec, unit=False)
        self.grad_quant = None if gspec is None else GradQuantizer(gspec)
        if device is not None and torch.device(device).type != "meta":
            self.to(device)

    def _weight_names(self) -> list[str]:
        return [n for n in self._flat_weights_names if n.startswith("weight_")]

    def quantized_weight_bits(self, name: str) -> int | None:
        """Storage bits per value of parameter ``name`` under its quantizer (``None`` if the
        parameter is not quantized, e.g. biases)."""
        return int(self.weight_quant[name].fmt.bits) if name in self.weight_quant else None

    @classmethod
    def from_float(cls, mod: nn.LSTM, *, weight: Any = None, act: Any = None, grad: Any = None,
                   gemm: str = "default", quantize_gates: bool = True) -> QLSTM:
        """A QLSTM sharing ``mod``'s parameters (the same Parameter objects)."""
        if not isinstance(mod, nn.LSTM):
            raise TypeError(f"from_float expects an nn.LSTM, got {type(mod).__name__}")
        if mod.proj_size:
            raise ValueError("QLSTM does not support proj_size > 0")
        if gemm != "default":
            raise ValueError(f"QLSTM computes its products itself; gemm must be 'default', "
                             f"got {gemm!r}")
        q = cls(mod.input_size, mod.hidden_size, mod.num_layers, mod.bias, mod.batch_first,
                mod.dropout, mod.bidirectional, weight=weight, act=act, grad=grad,
                quantize_gates=quantize_gates, device="meta", dtype=mod.weight_ih_l0.dtype)
        for name in mod._flat_weights_names:
            setattr(q, name, getattr(mod, name))
        device = mod.weight_ih_l0.device
        for sub in (q.weight_quant, q.act_quant):
            if sub is not None:
                sub.to(device)
        q.train(mod.training)
        return q

    # ------------------------------------------------------------------------------ forward
    def _weight(self, name: str) -> Tensor:
        w = getattr(self, name)
        return self.weight_quant[name](w) if name in self.weight_quant else w

    def _unit(self, x: Tensor) -> Tensor:
        return x if self._unit_grid is None else self._unit_grid(x)

    def _signed(self, x: Tensor) -> Tensor:
        return x if self._signed_grid is None else self._signed_grid(x)

    def _direction(self, x: Tensor, layer: int, suffix: str, h: Tensor, c: Tensor,
                   reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Run one layer in one direction over ``x`` [T, B, in]; returns (out, h_T, c_T)."""
        tag = f"l{layer}{suffix}"
        b_ih = getattr(self, f"bias_ih_{tag}") if self.bias else None
        b_hh = getattr(self, f"bias_hh_{tag}") if self.bias else None
        xp = F.linear(x, self._weight(f"weight_ih_{tag}"), b_ih)  # all steps at once
        w_hh = self._weight(f"weight_hh_{tag}")
        h = self._signed(h)
        steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        outs: list[Tensor] = [h] * x.shape[0]
        for t in steps:
            z = xp[t] + F.linear(h, w_hh, b_hh)
            if self.grad_quant is not None:
                z = self.grad_quant(z)
            zi, zf, zg, zo = z.chunk(4, dim=-1)
            i = self._unit(torch.sigmoid(zi))
            f = self._unit(torch.sigmoid(zf))
            g = self._signed(torch.tanh(zg))
            o = self._unit(torch.sigmoid(zo))
            c = f * c + i * g
            h = self._signed(o * self._signed(torch.tanh(c)))
            outs[t] = h
        return torch.stack(outs), h, c

    def forward(self, input: Tensor,  # noqa: A002 - nn.LSTM's argument name
                hx: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError("QLSTM does not accept PackedSequence inputs; pad the batch")
        if input.dim() not in (2, 3):
            raise ValueError(f"QLSTM expects a 2-D (unbatched) or 3-D input, got "
                             f"{input.dim()}-D")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if self.batch_first and batched:
            x = x.transpose(0, 1)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"input has {x.shape[-1]} features, QLSTM expects "
                             f"{self.input_size}")
        dirs = 2 if self.bidirectional else 1
        shape = (self.num_layers * dirs, x.shape[1], self.hidden_size)
        if hx is None:
            h0 = c0 = x.new_zeros(shape)
        else:
            h0, c0 = hx
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            if tuple(h0.shape) != shape or tuple(c0.shape) != shape:
                raise ValueError(f"hx must hold two tensors of shape {shape}, got "
                                 f"{tuple(h0.shape)} and {tuple(c0.shape)}")
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        for layer in range(self.num_layers):
            if self.act_quant is not None:
                x = self.act_quant[layer](x)
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                out, h, c = self._direction(x, layer, "_reverse" if d else "", h0[k], c0[k],
                                            reverse=bool(d))
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outs[0] if dirs == 1 else torch.cat(outs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        hn, cn = torch.stack(h_n), torch.stack(c_n)
        if self.batch_first and batched:
            x = x.transpose(0, 1)
        if not batched:
            x, hn, cn = x.squeeze(1), hn.squeeze(1), cn.squeeze(1)
        return x, (hn, cn)

    # ----------------------------------------------------------------------------- reprs
    @property
    def weight_format(self) -> str:
        """Name of the weight format (``"fp32"`` when weights are not quantized)."""
        if not len(self.weight_quant):
            return "fp32"
        return next(iter(self.weight_quant.values())).fmt.name

    @property
    def act_format(self) -> str:
        """Name of the activation format (``"fp32"`` when activations are not quantized)."""
        return "fp32" if self.act_quant is None else self.act_quant[0].fmt.name

    def extra_repr(self) -> str:
        s = super().extra_repr()
        grad = "fp32" if self.grad_quant is None else self.grad_quant.fmt.name
        return (f"{s}, weight={self.weight_format}, act={self.act_format}, grad={grad}, "
                f"quantize_gates={self.quantize_gates}")
