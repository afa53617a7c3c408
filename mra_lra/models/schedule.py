"""Learning-rate schedules: the MRA recipe's one cycle (linear warm-up, then linear decay to zero)
and the original LRA recipe's product of factors."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup_decay(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    if total_steps <= 0:
        raise ValueError(f"scheduler.total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"scheduler.warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)


FACTORS = ("constant", "linear_warmup", "rsqrt_decay", "rsqrt_normalized_decay", "cosine_decay")


def factor_schedule(
    optimizer: Optimizer,
    factors: str,
    warmup_steps: int,
    steps_per_cycle: int = 100000,
) -> LambdaLR:
    """The original LRA (JAX) schedule: the product of named factors, e.g.
    "constant * linear_warmup * rsqrt_decay", times optimizer.lr (the "constant"), at step s
    counted from 0 (so a linear warm-up starts at 0):

        linear_warmup            min(1, s / warmup_steps)
        rsqrt_decay              1 / sqrt(max(s, warmup_steps))       (peak: lr / sqrt(warmup))
        rsqrt_normalized_decay   sqrt(warmup_steps) / sqrt(max(s, warmup_steps))  (peak: lr)
        cosine_decay             max(0, (1 + cos(pi * (p mod 1))) / 2),
                                 p = max(0, (s - warmup_steps) / steps_per_cycle)
    """
    names = [f.strip() for f in factors.split("*")]
    unknown = [f for f in names if f not in FACTORS]
    if unknown or not names:
        raise ValueError(
            f"scheduler.factors has unknown factor(s) {unknown} in {factors!r}; "
            f"use a '*'-separated product of {', '.join(FACTORS)}"
        )
    if warmup_steps < 1 and any(f != "constant" for f in names):
        raise ValueError(f"scheduler.warmup_steps must be >= 1, got {warmup_steps}")
    if steps_per_cycle < 1:
        raise ValueError(f"scheduler.steps_per_cycle must be >= 1, got {steps_per_cycle}")

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
