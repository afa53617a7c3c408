"""The LRA (JAX) factor schedule, step by step through a real optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from mra_lra.models.schedule import factor_schedule


def lrs(factors: str, steps: int, lr: float = 0.05, **kw) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = factor_schedule(opt, factors, **kw)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_linear_warmup_then_rsqrt_decay():
    seen = lrs("constant * linear_warmup * rsqrt_decay", 17, warmup_steps=4)
    assert seen[0] == 0.0  # step 0: the warm-up starts from zero, as in the LRA code
    assert seen[2] == pytest.approx(0.05 * (2 / 4) / math.sqrt(4))
    assert seen[4] == pytest.approx(0.05 / 2)  # the peak, lr / sqrt(warmup)
    assert seen[16] == pytest.approx(0.05 / 4)  # 1 / sqrt(16)
    assert max(seen) == seen[4]


def test_normalized_rsqrt_peaks_at_lr_and_cosine_cycles():
    seen = lrs("constant * linear_warmup * rsqrt_normalized_decay", 17, warmup_steps=4)
    assert seen[4] == pytest.approx(0.05) and seen[16] == pytest.approx(0.05 * 2 / 4)
    cos = lrs("constant * linear_warmup * cosine_decay", 14, warmup_steps=2, steps_per_cycle=8)
    assert cos[2] == pytest.approx(0.05)  # end of warm-up, start of the cycle
    assert cos[6] == pytest.approx(0.025)  # half way
    assert cos[9] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert cos[10] == pytest.approx(0.05)  # the next cycle restarts


def test_bad_factors_are_named():
    with pytest.raises(ValueError, match=r"unknown factor\(s\) \['rsqrt'\].*rsqrt_decay"):
        lrs("constant * rsqrt", 1, warmup_steps=4)
    with pytest.raises(ValueError, match="scheduler.warmup_steps"):
        lrs("linear_warmup", 1, warmup_steps=0)
