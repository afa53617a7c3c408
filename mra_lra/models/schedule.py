"""Learning-rate schedules: the MRA recipe's one cycle (torch's OneCycleLR) and the original LRA
recipe's product of factors. Both take the warm-up as `warmup_fraction` of the run (so a run
shortened with trainer.max_steps keeps its shape) or as `warmup_steps`, which wins when set."""

from __future__ import annotations

import logging
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

from mra_lra.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_warmup(
    total_steps: int, warmup_steps: int | None = None, warmup_fraction: float | None = None
) -> int:
    """The warm-up in updates: `warmup_steps` when set, else `warmup_fraction` of `total_steps`
    rounded to the nearest update (at least one for a positive fraction)."""
    if warmup_steps is not None:
        if warmup_steps < 0:
            raise ConfigError(f"scheduler.warmup_steps must be >= 0, got {warmup_steps}")
        return warmup_steps
    if warmup_fraction is None:
        raise ConfigError(
            "the schedule has no warm-up: set scheduler.warmup_fraction (of trainer.max_steps) "
            "or scheduler.warmup_steps"
        )
    if not 0 <= warmup_fraction < 1:
        raise ConfigError(f"scheduler.warmup_fraction must be in [0, 1), got {warmup_fraction}")
    steps = round(warmup_fraction * total_steps)
    return max(steps, 1) if warmup_fraction > 0 else 0


class OneCycle(OneCycleLR):
    """OneCycleLR that refuses a checkpoint from a cycle of another length: the saved state
    (phases, total_steps) would silently replace the configured one, and a run resumed with a
    larger trainer.max_steps would then fail past the saved end."""

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("total_steps", self.total_steps)
        if saved != self.total_steps:
            raise ConfigError(
                f"the checkpoint's one-cycle schedule spans {saved} steps, this run's "
                f"{self.total_steps} (trainer.max_steps): a cycle cannot be stretched once "
                f"started; resume with trainer.max_steps={saved}, or start a new run"
            )
        super().load_state_dict(state_dict)


def one_cycle(
    optimizer: Optimizer,
    total_steps: int,
    anneal_strategy: str,
    cycle_momentum: bool,
    base_momentum: float,
    max_momentum: float,
    div_factor: float,
    final_div_factor: float,
    warmup_steps: int | None = None,
    warmup_fraction: float | None = None,
) -> OneCycle:
    """The MRA recipe's schedule: torch's OneCycleLR as the published LRA code calls it; with
    cycle_momentum, Adam's configured beta1 is overwritten. A warm-up as long as the run is
    clipped so that one update of decay remains."""
    if total_steps <= 0:
        raise ConfigError(
            f"scheduler.total_steps must be > 0, got {total_steps} (it follows trainer.max_steps: "
            "training is counted in steps)"
        )
    warmup = resolve_warmup(total_steps, warmup_steps, warmup_fraction)
    if warmup >= total_steps:
        log.warning(
            "the warm-up of %d steps is not shorter than the run (trainer.max_steps=%d): "
            "clipped to %d",
            warmup,
            total_steps,
            total_steps - 1,
        )
        warmup = total_steps - 1
    if anneal_strategy not in ("linear", "cos"):
        raise ConfigError(
            f"scheduler.anneal_strategy must be linear or cos, got {anneal_strategy!r}"
        )
    return OneCycle(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],
        total_steps=total_steps,
        # OneCycleLR ends its warm-up at update pct_start * total_steps - 1: W = 1 would divide
        # by zero there, and means the same as W = 0.
        pct_start=warmup / total_steps if warmup >= 2 else 0.0,
        anneal_strategy=anneal_strategy,
        cycle_momentum=cycle_momentum,
        base_momentum=base_momentum,
        max_momentum=max_momentum,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
    )


FACTORS = ("constant", "linear_warmup", "rsqrt_decay", "rsqrt_normalized_decay", "cosine_decay")


def factor_schedule(
    optimizer: Optimizer,
    factors: str,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_fraction: float | None = None,
    steps_per_cycle: int = 100000,
) -> LambdaLR:
    """The original LRA (JAX) schedule: the product of named factors, e.g.
    "constant * linear_warmup * rsqrt_decay", times optimizer.lr, at step s counted from 0.
    A warm-up longer than the run is kept, as the LRA code runs its Retrieval recipe (with
    rsqrt_decay, W also sets the peak rate: lr / sqrt(W)).
    """
    names = [f.strip() for f in factors.split("*")]
    unknown = [f for f in names if f not in FACTORS]
    if unknown or not names:
        raise ConfigError(
            f"scheduler.factors has unknown factor(s) {unknown} in {factors!r}; "
            f"use a '*'-separated product of {', '.join(FACTORS)}"
        )
    warmup_steps = resolve_warmup(total_steps, warmup_steps, warmup_fraction)
    if warmup_steps < 1 and any(f != "constant" for f in names):
        raise ConfigError(f"scheduler.warmup_steps must be >= 1, got {warmup_steps}")
    if steps_per_cycle < 1:
        raise ConfigError(f"scheduler.steps_per_cycle must be >= 1, got {steps_per_cycle}")

    def factor(step: int) -> float:
        ret = 1.0
        for name in names:
            if name == "linear_warmup":
                ret *= min(1.0, step / warmup_steps)
            elif name == "rsqrt_decay":
                ret /= math.sqrt(max(step, warmup_steps))
            elif name == "rsqrt_normalized_decay":
                ret *= math.sqrt(warmup_steps) / math.sqrt(max(step, warmup_steps))
            elif name == "cosine_decay":
                progress = max(0.0, (step - warmup_steps) / steps_per_cycle)
                ret *= max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))
        return ret

    return LambdaLR(optimizer, factor)
