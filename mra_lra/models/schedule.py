"""Learning-rate schedules: the MRA recipe's one cycle (torch's OneCycleLR: linear warm-up, linear
decay, beta1 cycled against the rate) and the original LRA recipe's product of factors."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR


class OneCycle(OneCycleLR):
    """OneCycleLR that refuses a checkpoint from a cycle of another length: the saved state
    (phases, total_steps) would silently replace the configured one, and a run resumed with a
    larger trainer.max_steps would then fail past the saved end."""

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("total_steps", self.total_steps)
        if saved != self.total_steps:
            raise ValueError(
                f"the checkpoint's one-cycle schedule spans {saved} steps, this run's "
                f"{self.total_steps} (trainer.max_steps): a cycle cannot be stretched once "
                f"started; resume with trainer.max_steps={saved}, or start a new run"
            )
        super().load_state_dict(state_dict)


def one_cycle(
    optimizer: Optimizer,
    warmup_steps: int,
    total_steps: int,
    anneal_strategy: str,
    cycle_momentum: bool,
    base_momentum: float,
    max_momentum: float,
    div_factor: float,
    final_div_factor: float,
) -> OneCycle:
    """The MRA recipe's schedule: torch's OneCycleLR, as the published LRA code calls it (peak
    optimizer.lr after `warmup_steps` updates, `pct_start = warmup_steps / total_steps`).

    From lr / div_factor the rate rises to the peak at update warmup_steps - 1, then anneals to
    lr / (div_factor * final_div_factor) at the last update. With cycle_momentum, Adam's beta1
    moves the other way, from max_momentum down to base_momentum at the peak and back (the
    optimizer's configured beta1 is overwritten from the first step on).
    """
    if total_steps <= 0:
        raise ValueError(
            f"scheduler.total_steps must be > 0, got {total_steps} (it follows trainer.max_steps: "
            "training is counted in steps)"
        )
    if not (warmup_steps == 0 or 2 <= warmup_steps < total_steps):
        raise ValueError(
            f"scheduler.warmup_steps must be 0 or in [2, total_steps={total_steps}), got "
            f"{warmup_steps}: OneCycleLR's warm-up ends at update warmup_steps - 1 and its decay "
            "needs at least one more step"
        )
    if anneal_strategy not in ("linear", "cos"):
        raise ValueError(
            f"scheduler.anneal_strategy must be linear or cos, got {anneal_strategy!r}"
        )
    return OneCycle(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=warmup_steps / total_steps,
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
