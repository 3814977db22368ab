"""BatchNorm variants that estimate the per-channel scale without a sum of squares.

Range BatchNorm (Banner et al., "Scalable methods for 8-bit training", NeurIPS 2018) and the
L1 / L-infinity BatchNorms of "Norm matters" (Hoffer et al., NeurIPS 2018). Each module is a
drop-in replacement for :class:`torch.nn.BatchNorm1d` / :class:`torch.nn.BatchNorm2d`: same
constructor arguments, same ``state_dict`` keys (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), same train/eval behaviour and the same PyTorch EMA
semantics for the running statistics.

Every variant computes, per channel over the ``n`` values of the batch (``N*H*W`` for 2d), an
estimate ``sigma_hat`` of the population standard deviation that is unbiased for Gaussian input
at every ``n``:

* range:  ``sigma_hat = range(x) / E[R_n]`` with ``E[R_n]`` the exact expected range of ``n``
  i.i.d. standard Gaussians (:func:`expected_gaussian_range`); optionally the range is averaged
  over chunks of the batch (each chunk divided by the expected range at its own size, so a
  shorter remainder chunk is handled exactly);
* l1:     ``sigma_hat = sqrt(pi/2) * sqrt(n/(n-1)) * mean|x - mean(x)|`` (exact: each centred
  value is Gaussian with variance ``sigma^2 (n-1)/n``);
* linf:   ``sigma_hat = mean(top-k |x - mean(x)|) / (e_k(n) * sqrt((n-1)/n))`` with ``e_k(n)``
  the exact expected mean of the ``k`` largest of ``n`` i.i.d. ``|N(0,1)|`` values
  (:func:`expected_topk_abs_gaussian`); the ``sqrt((n-1)/n)`` factor for the sample mean is a
  first-order correction (the centred values are slightly negatively correlated).

The two conventions of :class:`torch.nn.BatchNorm2d` are kept: in training the batch is
normalised by the estimate of the *biased* (in-batch) standard deviation,
``sigma_hat * sqrt((n-1)/n)``, and ``running_var`` tracks the estimate of the *unbiased*
variance, ``sigma_hat**2`` (for Range BN exactly ``(range / E[R_n])**2``). The running
statistics follow ``running = (1 - momentum) * running + momentum * batch`` (cumulative
average when ``momentum=None``), and eval mode is exactly ``F.batch_norm`` with the running
statistics, so ``from_batchnorm(bn).eval()`` reproduces ``bn.eval()`` bit for bit.

The backward pass is analytic (one fused function, like BN's): the gradient of the range
and top-k estimates is sparse (it reaches the argmax/argmin of each chunk, or the k largest
deviations; with ties, one of the tied elements), that of L1 a sign pattern. Double backward
is not supported. Statistics are those of the local batch (no cross-process synchronisation
as in ``SyncBatchNorm``).

Differences from the authors' code (see PAPERS.md): PyTorch momentum instead of the inverted
one, ``running_var`` holds a variance (not a scale, and starts at 1 rather than 0), chunking
does not require divisibility, and the constants are exact instead of asymptotic.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from lowbit.formats import Format, IntFormat, get_format
from lowbit.quant.functional import fake_quantize, quantize_grad

__all__ = [
    "BATCHNORM_VARIANTS",
    "L1BatchNorm1d",
    "L1BatchNorm2d",
    "LinfBatchNorm1d",
    "LinfBatchNorm2d",
    "RangeBatchNorm1d",
    "RangeBatchNorm2d",
    "expected_gaussian_range",
    "expected_topk_abs_gaussian",
    "replace_batchnorm",
]

RangeConstant = Literal["exact", "paper", "code"]
_RANGE_CONSTANTS = ("exact", "paper", "code")
# the authors' code: scale_fix = 0.5 * 0.35 * (1 + sqrt(pi * ln 4)) / sqrt(2 ln n)
_CODE_RANGE_FACTOR = 0.5 * 0.35 * (1.0 + math.sqrt(math.pi * math.log(4.0)))
_MAX_TOPK = 1024
_GL_ORDER = 16


# --------------------------------------------------------------------------------------------
# Gaussian order statistics (float64 quadrature, cached per n)
# --------------------------------------------------------------------------------------------


def _gauss_legendre(upper: float, panel: float) -> tuple[Tensor, Tensor]:
    """Nodes and weights of composite Gauss-Legendre quadrature on [0, upper]."""
    panels = max(1, math.ceil(upper / panel))
    width = upper / panels
    t, w = np.polynomial.legendre.leggauss(_GL_ORDER)
    left = np.arange(panels, dtype=np.float64)[:, None] * width
    nodes = left + (t[None, :] + 1.0) * (width / 2.0)
    weights = np.broadcast_to(w[None, :] * (width / 2.0), nodes.shape)
    return (
        torch.from_numpy(nodes.ravel().copy()),
        torch.from_numpy(np.ascontiguousarray(weights).ravel()),
    )


def _check_count(n: object, name: str = "n", minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return int(n)


@lru_cache(maxsize=4096)
def _expected_range(n: int) -> float:
    if n == 1:
        return 0.0
    # E[R_n] = int (1 - Phi(x)^n - (1 - Phi(x))^n) dx over R; the integrand is even.
    upper = math.sqrt(2.0 * math.log(n)) + 10.0
    x, w = _gauss_legendre(upper, 0.1)
    log_cdf = torch.special.log_ndtr(x)  # log Phi(x)
    log_sf = torch.special.log_ndtr(-x)  # log (1 - Phi(x))
    f = -torch.expm1(n * log_cdf) - torch.exp(n * log_sf)
    return float(2.0 * torch.dot(f, w))


def expected_gaussian_range(n: int) -> float:
    """Exact expected range ``E[max - min]`` of ``n`` i.i.d. standard Gaussian samples.

    Computed once per ``n`` (cached) in float64 as
    ``E[R_n] = int (1 - Phi(x)^n - (1 - Phi(x))^n) dx`` with composite 16-point Gauss-Legendre
    quadrature in log space, accurate to about 1e-12 for any ``n`` (e.g. ``E[R_2] = 2/sqrt(pi)``,
    ``E[R_10] = 3.0775``, ``E[R_100] = 5.0152``).
    """
    return _expected_range(_check_count(n))


@lru_cache(maxsize=4096)
def _expected_topk(n: int, k: int) -> float:
    # sum of the k largest of n |Z| = int_0^inf E[min(B(x), k)] dx with B(x) ~ Bin(n, p(x)),
    # p(x) = P(|Z| > x), because P(j-th largest > x) = P(B(x) >= j).
    upper = math.sqrt(2.0 * math.log(n + 1.0)) + 10.0
    x, w = _gauss_legendre(upper, min(0.05, 0.25 / math.sqrt(k)))
    log_p = math.log(2.0) + torch.special.log_ndtr(-x)  # log P(|Z| > x)
    log_q = torch.log(torch.special.erf(x / math.sqrt(2.0)))  # log P(|Z| <= x)
    j = torch.arange(k, dtype=torch.float64)
    # log binomial coefficients C(n, j), accumulated to avoid lgamma cancellation at large n
    steps = torch.log(n - j[:-1]) - torch.log(j[:-1] + 1.0)
    log_binom = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(steps, 0)])
    log_pmf = (
        log_binom[:, None]
        + j[:, None] * log_p[None, :]
        + (n - j[:, None]) * log_q[None, :]
    )
    pmf = torch.exp(log_pmf)  # P(B = j), j < k
    # E[min(B, k)] = k - sum_{j<k} (k - j) P(B = j)
    e_min = k - torch.sum((k - j[:, None]) * pmf, dim=0)
    return float(torch.dot(e_min, w)) / k


def expected_topk_abs_gaussian(n: int, k: int) -> float:
    """Exact expected mean of the ``k`` largest of ``n`` i.i.d. ``|N(0, 1)|`` values.

    ``k = n`` gives ``sqrt(2/pi)`` and ``k = 1`` the expected maximum absolute value. Computed
    once per ``(n, k)`` (cached) in float64 from
    ``sum_{j<=k} E[|Z|_(n-j+1)] = int_0^inf E[min(Bin(n, P(|Z|>x)), k)] dx``;
    ``k`` is limited to 1024 (the cost grows with ``k``).
    """
    n = _check_count(n)
    k = _check_count(k, "k")
    if k > n:
        raise ValueError(f"k must be <= n (got k={k}, n={n})")
    if k > _MAX_TOPK:
        raise ValueError(f"k must be <= {_MAX_TOPK}, got {k}")
    return _expected_topk(n, k)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


def _to_flat(c: Tensor) -> Tensor:
    """(C, n) copy of ``c`` with the values of each channel in sample order."""
    return c.movedim(1, 0).reshape(c.shape[1], -1)


def _flat_to_linear(j: Tensor, shape: torch.Size) -> Tensor:
    """Linear indices into a contiguous tensor of ``shape`` for flat indices ``j`` (C, ...)."""
    channels = shape[1]
    inner = math.prod(shape[2:])
    ch = torch.arange(channels, device=j.device).view((channels,) + (1,) * (j.dim() - 1))
    return (j // inner) * (channels * inner) + ch * inner + j % inner


class _BatchScaleNorm(torch.autograd.Function):
    """``y = (x - mean) / sqrt(sigma_hat^2 (n-1)/n + eps) * w + b`` with an analytic backward.

    ``sigma_hat`` comes from the module's estimator; its gradient (sparse for range and top-k,
    a sign pattern for L1) is added by the module. Also returns the batch mean and
    ``sigma_hat`` (not differentiable) for the running statistics.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, module):  # noqa: D102
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        n = x.numel() // x.shape[1]
        mean = work.mean(dim=_reduce_dims(x))
        c = work - _channel_view(mean, x.dim())
        if module.act_format is not None:  # symmetric per-channel integer grid
            c = fake_quantize(c, module.act_format, axis=1)
        sigma, saved = module._estimate_std(c)
        r = torch.rsqrt(sigma.square() * ((n - 1) / n) + module.eps)
        wr = r if weight is None else r * weight
        if bias is None:
            y = c * _channel_view(wr, x.dim())
        else:
            y = torch.addcmul(_channel_view(bias.to(c.dtype), x.dim()), c,
                              _channel_view(wr.to(c.dtype), x.dim()))
        ctx.save_for_backward(c, r, sigma, weight)
        ctx.module, ctx.saved, ctx.x_dtype = module, saved, x.dtype
        ctx.mark_non_differentiable(mean, sigma)
        return y.to(x.dtype), mean, sigma

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_mean, _grad_sigma):  # noqa: D102
        c, r, sigma, weight = ctx.saved_tensors
        g = grad.to(c.dtype)
        dims, nd = _reduce_dims(c), c.dim()
        n = c.numel() // c.shape[1]
        sum_g = g.sum(dim=dims)
        sum_gc = (g * c).sum(dim=dims)
        w = torch.ones_like(r) if weight is None else weight.to(r.dtype)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[1]:
            dweight = (sum_gc * r).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            dbias = sum_g.to(weight.dtype if weight is not None else g.dtype)
        if ctx.needs_input_grad[0]:
            wr = w * r
            # d/d sigma_hat of r = (sigma^2 (n-1)/n + eps)^(-1/2)
            dsigma = sum_gc * w * (-(r**3) * sigma * ((n - 1) / n))
            dx = torch.addcmul(_channel_view(-sum_g * wr / n, nd), g, _channel_view(wr, nd))
            dx = dx.contiguous()
            ctx.module._add_std_grad(dx, dsigma, c, ctx.saved)
            dx = dx.to(ctx.x_dtype)
        return dx, dweight, dbias, None


class _EstimatedScaleBatchNorm(_NormBase):
    """BatchNorm whose per-channel scale is an estimator ``sigma_hat`` of the population std."""

    _input_dims: tuple[int, ...] = ()
    _bn_type: type[_BatchNorm] = _BatchNorm
    variant: str = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        act_format: str | Format | None = None,
        grad_format: str | Format | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        _check_count(num_features, "num_features")
        self._init_low_precision(act_format, grad_format, generator)
        if not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"eps must be a float >= 0, got {eps!r}")
        if momentum is not None and not (0.0 <= float(momentum) <= 1.0):
            raise ValueError(f"momentum must be None or in [0, 1], got {momentum!r}")
        extra = {} if bias else {"bias": False}
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra
        )

    def _init_low_precision(
        self,
        act_format: str | Format | None,
        grad_format: str | Format | None,
        generator: torch.Generator | None,
    ) -> None:
        act = None if act_format is None else get_format(act_format)
        if act is not None and not (isinstance(act, IntFormat) and act.signed):
            raise ValueError(
                f"act_format must be a signed integer format ('int2'..'int16') or None, "
                f"got {act.name!r}"
            )
        grad = None if grad_format is None else get_format(grad_format)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
        # plain attributes, set before nn.Module.__init__ (they hold no tensors)
        object.__setattr__(self, "act_format", act)
        object.__setattr__(self, "grad_format", grad)
        object.__setattr__(self, "generator", generator)

    # Subclasses: the estimate of the population std per channel from the centred values ``c``
    # (input layout) and what its gradient needs; and that gradient, added into ``dx``.
    def _estimate_std(self, c: Tensor) -> tuple[Tensor, object]:
        raise NotImplementedError

    def _add_std_grad(self, dx: Tensor, dsigma: Tensor, c: Tensor, saved: object) -> None:
        """``dx += P (dsigma * d sigma_hat / d c)``, P the per-channel centring projection."""
        raise NotImplementedError

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._input_dims:
            dims = " or ".join(f"{d}D" for d in self._input_dims)
            raise ValueError(f"expected {dims} input, got {x.dim()}D input")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels in dim 1, got input of shape "
                f"{tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` per channel (dim 1) with batch statistics or running statistics."""
        self._check_input_dim(x)
        factor = 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = float(self.momentum)

        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias,
                False, 0.0, self.eps,
            )

        n = x.numel() // x.shape[1]
        if n < 2:
            raise ValueError(
                f"expected more than 1 value per channel when training, got input of shape "
                f"{tuple(x.shape)}"
            )
        y, mean, sigma = _BatchScaleNorm.apply(x, self.weight, self.bias, self)
        if self.training and self.track_running_stats:
            with torch.no_grad():  # running_var: the estimate of the unbiased variance
                rm, rv = self.running_mean, self.running_var
                rm.mul_(1.0 - factor).add_(mean.to(rm.dtype), alpha=factor)
                rv.mul_(1.0 - factor).add_(sigma.square().to(rv.dtype), alpha=factor)
        if self.grad_format is not None:
            y = quantize_grad(y, self.grad_format, rounding="stochastic", generator=self.generator)
        return y

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.act_format is not None:
            text += f", act_format={self.act_format.name}"
        if self.grad_format is not None:
            text += f", grad_format={self.grad_format.name}"
        return text

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **kwargs: object) -> _EstimatedScaleBatchNorm:
        """A copy of ``bn`` (configuration, affine parameters, running statistics, mode).

        ``bn`` is a ``torch.nn.BatchNorm{1,2}d`` of the matching dimension, a ``SyncBatchNorm``,
        or another variant from this module; ``kwargs`` are the variant's own options.
        """
        ok = isinstance(bn, (cls._bn_type, nn.SyncBatchNorm)) or (
            isinstance(bn, _EstimatedScaleBatchNorm) and bn._input_dims == cls._input_dims
        )
        if not ok:
            raise TypeError(
                f"{cls.__name__}.from_batchnorm expects a {cls._bn_type.__name__}, "
                f"SyncBatchNorm or a lowbit BatchNorm variant of the same dimension, "
                f"got {type(bn).__name__}"
            )
        ref = next((t for t in bn.state_dict().values() if t.is_floating_point()), None)
        new = cls(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
            bias=bn.bias is not None or not bn.affine,
            **kwargs,
        )
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        return new


class _RangeMixin:
    num_chunks: int | None
    range_constant: str

    def _init_range(self, num_chunks: int | None, range_constant: str) -> None:
        if num_chunks is not None:
            _check_count(num_chunks, "num_chunks")
        if range_constant not in _RANGE_CONSTANTS:
            raise ValueError(
                f"range_constant must be one of {_RANGE_CONSTANTS}, got {range_constant!r}"
            )
        self.num_chunks = num_chunks
        self.range_constant = range_constant

    def _expected_range(self, m: int) -> float:
        """Expected range at chunk size m under the configured constant (range / it = sigma)."""
        if self.range_constant == "exact":
            return expected_gaussian_range(m)
        asymptotic = math.sqrt(2.0 * math.log(m))
        if self.range_constant == "paper":
            return asymptotic
        return asymptotic / _CODE_RANGE_FACTOR

    def _estimate_std(self, c: Tensor) -> tuple[Tensor, object]:
        flat = _to_flat(c)
        channels, n = flat.shape
        chunks = 1 if self.num_chunks is None else max(1, min(self.num_chunks, n // 2))
        size, rem = divmod(n, chunks)
        split = rem * (size + 1)  # the first `rem` chunks hold size + 1 values
        sigma = flat.new_zeros(channels)
        saved = []
        for start, stop, m in ((0, split, size + 1), (split, n, size)):
            if stop == start:
                continue
            part = flat[:, start:stop].reshape(channels, -1, m)
            hi, i_hi = part.max(dim=2)
            lo, i_lo = part.min(dim=2)
            coef = 1.0 / (self._expected_range(m) * chunks)
            sigma += (hi - lo).sum(dim=1) * coef
            base = start + m * torch.arange(part.shape[1], device=flat.device)
            saved.append((base + i_hi, base + i_lo, coef))
        return sigma, saved

    def _add_std_grad(self, dx: Tensor, dsigma: Tensor, c: Tensor, saved: object) -> None:
        # +coef at each chunk's argmax, -coef at its argmin: sums to 0, so P changes nothing
        flat_dx = dx.view(-1)
        for j_hi, j_lo, coef in saved:  # type: ignore[attr-defined]
            v = (dsigma * coef)[:, None].expand_as(j_hi)
            flat_dx.index_add_(0, _flat_to_linear(j_hi, c.shape).reshape(-1), v.reshape(-1))
            flat_dx.index_add_(0, _flat_to_linear(j_lo, c.shape).reshape(-1), -v.reshape(-1))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_chunks={self.num_chunks}, "  # type: ignore[misc]
            f"range_constant={self.range_constant!r}"
        )


class _L1Mixin:
    def _estimate_std(self, c: Tensor) -> tuple[Tensor, object]:
        n = c.numel() // c.shape[1]
        coef = math.sqrt(math.pi / 2.0 * n / (n - 1)) / n
        return c.abs().sum(dim=_reduce_dims(c)) * coef, coef

    def _add_std_grad(self, dx: Tensor, dsigma: Tensor, c: Tensor, saved: object) -> None:
        n = c.numel() // c.shape[1]
        k = dsigma * saved  # type: ignore[operator]
        sign = c.sign()
        dx.addcmul_(sign, _channel_view(k, c.dim()))
        dx.sub_(_channel_view(k * sign.sum(dim=_reduce_dims(c)) / n, c.dim()))


class _LinfMixin:
    topk: int

    def _init_topk(self, topk: int) -> None:
        _check_count(topk, "topk")
        if topk > _MAX_TOPK:
            raise ValueError(f"topk must be in [1, {_MAX_TOPK}], got {topk}")
        self.topk = topk

    def _estimate_std(self, c: Tensor) -> tuple[Tensor, object]:
        flat = _to_flat(c)
        n = flat.shape[1]
        k = min(self.topk, n)
        top, j = flat.abs().topk(k, dim=1, sorted=False)
        coef = 1.0 / (k * expected_topk_abs_gaussian(n, k) * math.sqrt((n - 1) / n))
        return top.sum(dim=1) * coef, (j, flat.gather(1, j).sign(), coef)

    def _add_std_grad(self, dx: Tensor, dsigma: Tensor, c: Tensor, saved: object) -> None:
        j, sign, coef = saved  # type: ignore[misc]
        n = c.numel() // c.shape[1]
        v = sign * (dsigma * coef)[:, None]
        dx.view(-1).index_add_(0, _flat_to_linear(j, c.shape).reshape(-1), v.reshape(-1))
        dx.sub_(_channel_view(v.sum(dim=1) / n, c.dim()))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, topk={self.topk}"  # type: ignore[misc]


_COMMON_ARGS = """
    Args (as :class:`torch.nn.BatchNorm2d`): num_features, eps, momentum (PyTorch EMA
    convention, ``None`` = cumulative average), affine, track_running_stats, device, dtype, bias.

    Low-precision mode (training / batch-statistics path; eval uses the float running
    statistics like BN, ready to be folded):
    act_format: a signed integer format such as ``"int8"``: the centred values ``x - mean`` are
        fake-quantized per channel (symmetric, scale ``max|x - mean| / qmax``, round to
        nearest, straight-through gradient) and the scale estimate and the output are computed
        from them, so each output channel holds at most ``2**bits - 1`` distinct values (an
        integer code times a per-channel factor).
    grad_format: e.g. ``"int8"``: the gradient arriving at the output is fake-quantized with
        stochastic rounding (per-tensor scale from its max, see ``lowbit.quant.quantize_grad``)
        before it flows through the normalisation.
    generator: ``torch.Generator`` for that stochastic rounding (``None``: the global RNG).
"""


class _RangeBatchNorm(_RangeMixin, _EstimatedScaleBatchNorm):
    variant = "range"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        num_chunks: int | None = None,
        range_constant: RangeConstant = "exact",
        act_format: str | Format | None = None,
        grad_format: str | Format | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self._init_range(num_chunks, range_constant)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
            act_format=act_format, grad_format=grad_format, generator=generator,
        )


class RangeBatchNorm1d(_RangeBatchNorm):
    __doc__ = (
        """Range BatchNorm over (N, C) or (N, C, L) input: ``sigma_hat = range / E[R_n]``.
    """
        + _COMMON_ARGS
        + """
    num_chunks: ``None`` uses the range of all ``n`` values per channel; an int splits them
        (in sample order) into that many nearly equal chunks (at least 2 values each, sizes
        differing by at most one) and averages ``range_c / E[R_{n_c}]`` over chunks (the
        authors used 16).
    range_constant: ``"exact"`` (default, ``E[R_m]``), ``"paper"`` (``sqrt(2 ln m)``, the
        paper's C(n), normalises Gaussian data to a std of about 0.55-0.6) or ``"code"``
        (``sqrt(2 ln m) / 0.5402``, the authors' code).
    """
    )
    _input_dims = (2, 3)
    _bn_type = nn.BatchNorm1d


class RangeBatchNorm2d(_RangeBatchNorm):
    __doc__ = RangeBatchNorm1d.__doc__.replace("(N, C) or (N, C, L)", "(N, C, H, W)")
    _input_dims = (4,)
    _bn_type = nn.BatchNorm2d


class L1BatchNorm1d(_L1Mixin, _EstimatedScaleBatchNorm):
    __doc__ = (
        """L1 BatchNorm over (N, C) or (N, C, L) input:
    ``sigma_hat = sqrt(pi/2) * sqrt(n/(n-1)) * mean|x - mean(x)|``.
    """
        + _COMMON_ARGS
    )
    variant = "l1"
    _input_dims = (2, 3)
    _bn_type = nn.BatchNorm1d


class L1BatchNorm2d(_L1Mixin, _EstimatedScaleBatchNorm):
    __doc__ = L1BatchNorm1d.__doc__.replace("(N, C) or (N, C, L)", "(N, C, H, W)")
    variant = "l1"
    _input_dims = (4,)
    _bn_type = nn.BatchNorm2d


class _LinfBatchNorm(_LinfMixin, _EstimatedScaleBatchNorm):
    variant = "linf"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        topk: int = 10,
        act_format: str | Format | None = None,
        grad_format: str | Format | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self._init_topk(topk)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
            act_format=act_format, grad_format=grad_format, generator=generator,
        )


class LinfBatchNorm1d(_LinfBatchNorm):
    __doc__ = (
        """L-infinity (top-k) BatchNorm over (N, C) or (N, C, L) input:
    ``sigma_hat = mean(top-k |x - mean(x)|) / (e_k(n) sqrt((n-1)/n))``.
    """
        + _COMMON_ARGS
        + """
    topk: ``k``, the number of largest absolute deviations averaged (default 10 as in the
        authors' code; ``min(k, n)`` is used when the batch is smaller; at most 1024). ``k = 1``
        is the plain L-infinity norm (noisiest); a larger ``k`` lowers the variance of the
        estimate while staying an extreme-value statistic that needs no squares.
    """
    )
    _input_dims = (2, 3)
    _bn_type = nn.BatchNorm1d


class LinfBatchNorm2d(_LinfBatchNorm):
    __doc__ = LinfBatchNorm1d.__doc__.replace("(N, C) or (N, C, L)", "(N, C, H, W)")
    _input_dims = (4,)
    _bn_type = nn.BatchNorm2d


BATCHNORM_VARIANTS: dict[str, tuple[type[_EstimatedScaleBatchNorm], ...]] = {
    "range": (RangeBatchNorm1d, RangeBatchNorm2d),
    "l1": (L1BatchNorm1d, L1BatchNorm2d),
    "linf": (LinfBatchNorm1d, LinfBatchNorm2d),
}
"""Variant name -> (1d class, 2d class)."""


def replace_batchnorm(
    model: nn.Module, norm: str, *, inplace: bool = False, **kwargs: object
) -> nn.Module:
    """Swap every ``BatchNorm1d``/``BatchNorm2d`` in ``model`` for the variant ``norm``.

    ``norm`` is ``"range"``, ``"l1"`` or ``"linf"``; ``kwargs`` go to the variant (e.g.
    ``num_chunks=16``, ``topk=10``). Parameters, running statistics and train/eval mode are
    kept. Returns the edited model (a deep copy unless ``inplace``). Other modules, including
    ``BatchNorm3d``, are left unchanged.
    """
    if norm not in BATCHNORM_VARIANTS:
        raise ValueError(f"norm must be one of {sorted(BATCHNORM_VARIANTS)}, got {norm!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    cls1d, cls2d = BATCHNORM_VARIANTS[norm]
    targets = {nn.BatchNorm1d: cls1d, nn.BatchNorm2d: cls2d}
    for cls in (cls1d, cls2d):
        targets.update(
            {other: cls for pair in BATCHNORM_VARIANTS.values() for other in pair
             if other._input_dims == cls._input_dims}
        )
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            target = targets.get(type(child))
            if target is not None:
                setattr(parent, name, target.from_batchnorm(child, **kwargs))
    if isinstance(model, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return targets[type(model)].from_batchnorm(model, **kwargs)
    return model
