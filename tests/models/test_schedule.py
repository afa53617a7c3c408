"""The schedules step by step through a real optimizer: the MRA recipe's one cycle and the LRA
(JAX) factor schedule."""

from __future__ import annotations

import math

import pytest
import torch

from mra_lra.models.schedule import factor_schedule, one_cycle, resolve_warmup


def lrs(factors: str, steps: int, lr: float = 0.05, **kw) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = factor_schedule(opt, factors, steps, **kw)
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
    # The LRA code's Retrieval recipe: 8000 warm-up steps in a 5000-step run, kept as it is.
    seen = lrs("constant * linear_warmup * rsqrt_decay", 5, warmup_steps=8000)
    assert seen[4] == pytest.approx(0.05 * 4 / 8000 / math.sqrt(8000))


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
    sched = one_cycle(opt, steps, warmup_steps=warmup_steps, **{**ONE_CYCLE, **kw})
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


@pytest.mark.parametrize("warmup,total,match", [(5, 0, "total_steps"), (-1, 8, "warmup_steps")])
def test_one_cycle_rejects_bad_steps(warmup, total, match):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match=f"scheduler.{match}"):
        one_cycle(opt, total, warmup_steps=warmup, **ONE_CYCLE)


def test_one_cycle_warmup_of_one_step_starts_at_the_peak():
    # OneCycleLR without warm-up: update s is at (s + 1) / total of the decay from lr.
    lr, total, end = 1e-3, 8, 1e-3 / 25 / 1e4
    for warmup in (0, 1):
        seen = [rate for rate, _ in one_cycle_steps(total, warmup, lr)]
        assert seen == pytest.approx([lr + (s + 1) / total * (end - lr) for s in range(total)])


def test_warmup_longer_than_the_run_is_clipped_with_one_warning(caplog):
    with caplog.at_level("WARNING", logger="mra_lra.models.schedule"):
        seen = [rate for rate, _ in one_cycle_steps(10, 100, lr=1e-3)]
    (record,) = caplog.records
    assert "100" in record.getMessage() and "clipped to 9" in record.getMessage()
    assert max(seen) == seen[8]  # the peak at update 9 - 1, one update of decay after it


def test_demo_shortened_below_its_warmup_runs(compose_cfg, caplog):
    """make demo ARGS="trainer.max_steps=100": the demo's 100 warm-up steps are clipped."""
    from hydra.utils import instantiate

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    cfg = compose_cfg(["experiment=demo", "trainer.max_steps=100"])
    with caplog.at_level("WARNING", logger="mra_lra.models.schedule"):
        schedule = instantiate(cfg.scheduler)(optimizer=opt)
    assert len(caplog.records) == 1 and "clipped to 99" in caplog.records[0].getMessage()
    for _ in range(100):
        opt.step()
        schedule.step()


def test_warmup_fraction_of_the_run():
    assert resolve_warmup(5000, warmup_fraction=0.2) == 1000
    assert resolve_warmup(30000, warmup_fraction=0.02667) == 800  # 800.1 rounds to 800
    assert resolve_warmup(20, warmup_fraction=0.005) == 1  # a positive fraction: >= 1 update
    assert resolve_warmup(20, warmup_fraction=0.0) == 0
    assert resolve_warmup(20, warmup_steps=3, warmup_fraction=0.5) == 3  # steps win
    for fraction in (1.0, -0.1):
        with pytest.raises(ValueError, match="scheduler.warmup_fraction"):
            resolve_warmup(20, warmup_fraction=fraction)
    with pytest.raises(ValueError, match="scheduler.warmup_fraction"):
        resolve_warmup(20)
    # The factor schedule takes the fraction too: 0.25 of 16 = 4 steps, peak lr / sqrt(4).
    seen = lrs("constant * linear_warmup * rsqrt_decay", 16, warmup_fraction=0.25)
    assert max(seen) == seen[4] == pytest.approx(0.05 / 2)


# The MRA paper's warm-up and length per task (spec/lra.md), typed in, not read from the configs.
PAPER_WARMUP = {
    "listops": (1000, 5000),
    "text": (8000, 20000),
    "retrieval": (800, 30000),
    "image": (175, 35000),
    "pathfinder": (312, 62400),
    "pathx": (312, 62400),
}


@pytest.mark.parametrize("task", PAPER_WARMUP)
def test_task_recipes_keep_the_papers_warmup_and_run_short(compose_cfg, task, caplog):
    """At full length a recipe's fraction is the paper's warm-up in steps (so its schedule is
    unchanged); at 20 steps the same recipe builds and steps without a warning."""
    from hydra.utils import instantiate

    cfg = compose_cfg([f"task={task}"])
    sched = cfg.scheduler
    assert (
        resolve_warmup(sched.total_steps, sched.warmup_steps, sched.warmup_fraction)
        == (PAPER_WARMUP[task][0])
    )
    assert sched.total_steps == PAPER_WARMUP[task][1]
    short = compose_cfg([f"task={task}", "trainer.max_steps=20"]).scheduler
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with caplog.at_level("WARNING", logger="mra_lra.models.schedule"):
        schedule = instantiate(short)(optimizer=opt)
        for _ in range(20):
            opt.step()
            schedule.step()
    assert not caplog.records


@pytest.mark.parametrize("task", PAPER_WARMUP)
def test_every_sweep_runs_20_steps_at_every_warmup(compose_cfg, task):
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.utils import instantiate

    base = [f"hparams_search={task}_optuna", "experiment=demo", "trainer.max_steps=20"]
    cfg = compose_cfg(base)
    assert cfg.scheduler.warmup_steps is None  # the demo's steps would hide the search
    searched = HydraConfig.get().sweeper.params["scheduler.warmup_fraction"]
    space = OverridesParser.create().parse_overrides([f"scheduler.warmup_fraction={searched}"])[0]
    fractions = list(space.sweep_iterator())
    assert len(fractions) >= 3 and all(0 <= f < 1 for f in fractions)
    for fraction in fractions:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        schedule = instantiate(
            compose_cfg([*base, f"scheduler.warmup_fraction={fraction}"]).scheduler
        )(optimizer=opt)
        for _ in range(20):
            opt.step()
            schedule.step()


def test_one_cycle_refuses_a_checkpoint_of_another_length():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    state = one_cycle(opt, 10, warmup_steps=2, **ONE_CYCLE).state_dict()
    one_cycle(opt, 10, warmup_steps=2, **ONE_CYCLE).load_state_dict(state)  # same length: fine
    with pytest.raises(ValueError, match="trainer.max_steps=10"):
        one_cycle(opt, 20, warmup_steps=2, **ONE_CYCLE).load_state_dict(state)
