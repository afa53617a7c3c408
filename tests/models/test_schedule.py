"""The schedules step by step through a real optimizer: the MRA recipe's one cycle and the LRA
(JAX) factor schedule."""

from __future__ import annotations

import math

import pytest
import torch

from mra_lra.models.schedule import factor_schedule, one_cycle


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


ONE_CYCLE = dict(
    anneal_strategy="linear",
    cycle_momentum=True,
    base_momentum=0.85,
    max_momentum=0.95,
    div_factor=25.0,
    final_div_factor=1e4,
)


def one_cycle_steps(steps: int, warmup_steps: int, lr: float = 1e-4, **kw):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr, betas=(0.9, 0.999))
    sched = one_cycle(opt, warmup_steps, steps, **{**ONE_CYCLE, **kw})
    seen = []
    for _ in range(steps):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        opt.step()
        sched.step()
    return seen


def test_one_cycle_is_the_published_recipe():
    """Written out from OneCycleLR's definition with the published code's arguments: from lr / 25
    up to lr at update warmup - 1, then down to lr / 25 / 1e4 at the last update; beta1 from 0.95
    down to 0.85 at the peak and back."""
    lr, warmup, total = 1e-4, 5, 21
    seen = one_cycle_steps(total, warmup, lr)
    lrs_, betas = [s[0] for s in seen], [s[1] for s in seen]
    start, end = lr / 25, lr / 25 / 1e4
    for step in range(warmup):
        pct = step / (warmup - 1)
        assert lrs_[step] == pytest.approx(start + pct * (lr - start), rel=1e-9)
        assert betas[step] == pytest.approx(0.95 - pct * 0.10, rel=1e-9)
    for step in range(warmup - 1, total):
        pct = (step - (warmup - 1)) / (total - 1 - (warmup - 1))
        assert lrs_[step] == pytest.approx(lr + pct * (end - lr), rel=1e-9)
        assert betas[step] == pytest.approx(0.85 + pct * 0.10, rel=1e-9)
    assert max(lrs_) == lrs_[warmup - 1]


def test_one_cycle_without_momentum_keeps_beta1():
    seen = one_cycle_steps(8, 2, cycle_momentum=False)
    assert {beta for _, beta in seen} == {0.9}


@pytest.mark.parametrize(
    "warmup,total,match",
    [
        (5, 0, "total_steps"),
        (8, 8, "warmup_steps"),
        (1, 8, "warmup_steps"),
        (-1, 8, "warmup_steps"),
    ],
)
def test_one_cycle_rejects_bad_steps(warmup, total, match):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match=f"scheduler.{match}"):
        one_cycle(opt, warmup, total, **ONE_CYCLE)


def test_one_cycle_refuses_a_checkpoint_of_another_length():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    state = one_cycle(opt, 2, 10, **ONE_CYCLE).state_dict()
    one_cycle(opt, 2, 10, **ONE_CYCLE).load_state_dict(state)  # same length: fine
    with pytest.raises(ValueError, match="trainer.max_steps=10"):
        one_cycle(opt, 2, 20, **ONE_CYCLE).load_state_dict(state)
