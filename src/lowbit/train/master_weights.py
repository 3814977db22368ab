"""Low-precision master weights (Mellempudi et al., 2019).

The FP8 training paper keeps the master copy of the weights in 16 bits instead of 32. The update
is computed in FP32 by any torch optimizer and then written back onto the 16-bit grid with
**stochastic rounding**, so that an update smaller than half a 16-bit ulp of the weight survives
on average instead of being dropped (round-to-nearest would drop it every time).

:class:`MasterWeights` wraps an optimizer: after each ``step()`` every parameter it owns holds only
values representable in ``dtype`` (``"fp16"``, ``"bf16"``, or ``"fp32"`` for a no-op). The values
stay in float32 tensors (the simulation); :meth:`MasterWeights.packed` returns the real 16-bit copy,
equal bit for bit, for storage.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.quant.functional import fake_quantize

__all__ = ["MasterWeights", "round_to_master"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_ROUNDINGS = ("stochastic", "nearest")


def _check(dtype: str, rounding: str) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"master dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if rounding not in _ROUNDINGS:
        raise ValueError(f"master rounding must be one of {list(_ROUNDINGS)}, got {rounding!r}")


@torch.no_grad()
def round_to_master(
    x: torch.Tensor,
    dtype: str = "fp16",
    *,
    rounding: str = "stochastic",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``x`` rounded onto the ``dtype`` grid (same dtype as ``x``), saturating at its max."""
    _check(dtype, rounding)
    if dtype == "fp32":
        return x.clone()
    return fake_quantize(x, dtype, rounding=rounding, generator=generator)


class MasterWeights:
    """Wrap ``optimizer`` so that its parameters are kept on a 16-bit grid.

    Args:
        optimizer: any torch optimizer (its state, e.g. momentum, stays FP32).
        dtype: ``"fp16"`` (the paper), ``"bf16"`` or ``"fp32"`` (no rounding).
        rounding: ``"stochastic"`` (the paper) or ``"nearest"`` (an ablation).
        seed: seed of the generator that draws the rounding noise; saved in ``state_dict`` so a
            resumed run draws the same noise.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        dtype: str = "fp16",
        *,
        rounding: str = "stochastic",
        seed: int = 0,
    ) -> None:
        _check(dtype, rounding)
        self.optimizer = optimizer
        self.dtype = dtype
        self.rounding = rounding
        self.generator = torch.Generator().manual_seed(int(seed))
        self.round_params_()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def round_params_(self) -> None:
        """Round every parameter onto the master grid in place."""
        if self.dtype == "fp32":
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                gen = self.generator if p.device.type == "cpu" else None
                p.copy_(round_to_master(p, self.dtype, rounding=self.rounding, generator=gen))

    def step(self, closure=None):
        """Step the wrapped optimizer in FP32, then write the result back to the master grid."""
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.round_params_()
        return loss

    def packed(self) -> list[torch.Tensor]:
        """The master copy as real ``dtype`` tensors (bit-identical to the simulated values)."""
        target = _DTYPES[self.dtype]
        return [p.detach().to(target) for g in self.optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "dtype": self.dtype,
            "rounding": self.rounding,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("dtype") != self.dtype:
            raise ValueError(
                f"checkpoint master dtype {state.get('dtype')!r} does not match {self.dtype!r}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
