"""Enhanced loss scaling for FP8 training (Mellempudi et al., 2019).

FP8 (``e5m2``) has a narrow range: its smallest subnormal is 2^-16, so back-propagated errors
underflow unless the loss is scaled up. :class:`EnhancedLossScaler` does the usual dynamic
scaling (halve on overflow and skip the step, double after ``growth_interval`` clean steps) and
adds the paper's twist: a **minimum threshold** the scale never falls below, raised in steps as
training goes on, so that a rare spurious overflow cannot collapse the scale and push small errors
back under the format's range.

The paper's floor values and schedule were not published in what we could read; the default
schedule here (floor starts at ``min_scale`` and is multiplied by ``floor_growth`` every
``floor_interval`` steps up to ``max_floor``) is our choice and every number is an argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["EnhancedLossScaler"]


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return value


class EnhancedLossScaler:
    """Dynamic loss scaler with a rising minimum threshold.

    Use it like ``torch.amp.GradScaler``::

        scaler = EnhancedLossScaler()
        scaler.scale(loss).backward()
        stepped = scaler.step(optimizer)   # unscales, checks for inf/NaN, steps or skips
        scaler.update()

    Args:
        init_scale: starting scale.
        growth_factor / backoff_factor: multiply the scale by these after ``growth_interval``
            clean steps / on an overflowing step.
        growth_interval: number of consecutive clean steps before the scale grows.
        min_scale: the initial floor (threshold) below which the scale never falls.
        floor_growth / floor_interval / max_floor: every ``floor_interval`` optimizer steps
            (counted whether or not they were skipped) the floor is multiplied by
            ``floor_growth``, up to ``max_floor``. ``floor_interval=0`` keeps the floor fixed,
            which gives ordinary dynamic loss scaling.
        max_scale: the scale never grows above this.
        enabled: when False every method is a pass-through (FP32 training).
    """

    def __init__(
        self,
        init_scale: float = 2.0**12,
        *,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 500,
        min_scale: float = 1.0,
        floor_growth: float = 2.0,
        floor_interval: int = 2000,
        max_floor: float = 2.0**10,
        max_scale: float = 2.0**24,
        enabled: bool = True,
    ) -> None:
        self.init_scale = _check_positive("init_scale", init_scale)
        self.growth_factor = _check_positive("growth_factor", growth_factor)
        if self.growth_factor < 1:
            raise ValueError(f"growth_factor must be >= 1, got {growth_factor}")
        self.backoff_factor = _check_positive("backoff_factor", backoff_factor)
        if self.backoff_factor >= 1:
            raise ValueError(f"backoff_factor must be < 1, got {backoff_factor}")
        if int(growth_interval) < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.growth_interval = int(growth_interval)
        self.min_scale = _check_positive("min_scale", min_scale)
        self.floor_growth = _check_positive("floor_growth", floor_growth)
        if int(floor_interval) < 0:
            raise ValueError(f"floor_interval must be >= 0 (0 = fixed floor), got {floor_interval}")
        self.floor_interval = int(floor_interval)
        self.max_floor = _check_positive("max_floor", max_floor)
        self.max_scale = _check_positive("max_scale", max_scale)
        if not self.min_scale <= self.init_scale <= self.max_scale:
            raise ValueError(
                f"need min_scale <= init_scale <= max_scale, got {min_scale}, {init_scale}, "
                f"{max_scale}"
            )
        self.enabled = bool(enabled)
        self._scale = self.init_scale
        self._good_steps = 0
        self._steps = 0
        self._skipped = 0
        self._found_inf: bool | None = None
        self._unscaled: set[int] = set()

    # ---------------------------------------------------------------- state
    @property
    def loss_scale(self) -> float:
        """The current scale (1.0 when disabled)."""
        return self._scale if self.enabled else 1.0

    @property
    def floor(self) -> float:
        """The current minimum threshold."""
        if self.floor_interval == 0:
            return self.min_scale
        raises = self._steps // self.floor_interval
        return min(self.min_scale * self.floor_growth**raises, max(self.max_floor, self.min_scale))

    @property
    def skipped_steps(self) -> int:
        return self._skipped

    # ------------------------------------------------------------- training
    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """Multiply ``loss`` by the current scale."""
        if not self.enabled:
            return loss
        return loss * self._scale

    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Divide the gradients of ``optimizer``'s parameters by the scale in place.

        Returns True if any gradient is inf or NaN (checked before unscaling). Calling it twice
        for one step is an error, as with ``torch.amp.GradScaler``.
        """
        if not self.enabled:
            return False
        if id(optimizer) in self._unscaled:
            raise RuntimeError("unscale_() was already called on this optimizer since the last update()")
        grads = [p.grad for p in _params(optimizer) if p.grad is not None]
        found = False
        if grads:
            finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
            found = not bool(finite)
            inv = 1.0 / self._scale
            for g in grads:
                g.mul_(inv)
        self._found_inf = bool(self._found_inf) or found
        self._unscaled.add(id(optimizer))
        return found

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs) -> bool:
        """Unscale (if not yet done), then step unless a gradient overflowed.

        Returns True when the optimizer stepped, False when the step was skipped.
        """
        if not self.enabled:
            optimizer.step(*args, **kwargs)
            return True
        if id(optimizer) not in self._unscaled:
            self.unscale_(optimizer)
        if self._found_inf:
            return False
        optimizer.step(*args, **kwargs)
        return True

    def update(self) -> None:
        """Adjust the scale after a step: back off on overflow, grow after a clean run."""
        if not self.enabled:
            return
        if self._found_inf is None:
            raise RuntimeError("update() called without a preceding step()/unscale_()")
        self._steps += 1
        if self._found_inf:
            self._skipped += 1
            self._good_steps = 0
            self._scale = self._scale * self.backoff_factor
        else:
            self._good_steps += 1
            if self._good_steps >= self.growth_interval:
                self._good_steps = 0
                self._scale = min(self._scale * self.growth_factor, self.max_scale)
        self._scale = min(max(self._scale, self.floor), self.max_scale)
        self._found_inf = None
        self._unscaled.clear()

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "scale": self._scale,
            "good_steps": self._good_steps,
            "steps": self._steps,
            "skipped": self._skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"scale", "good_steps", "steps", "skipped"} - set(state)
        if missing:
            raise ValueError(f"loss scaler state is missing keys {sorted(missing)}")
        self._scale = float(state["scale"])
        self._good_steps = int(state["good_steps"])
        self._steps = int(state["steps"])
        self._skipped = int(state["skipped"])


def _params(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]
