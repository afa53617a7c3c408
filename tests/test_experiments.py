"""Every task x attention under each recipe holds its paper's values and still runs (two steps).

`task=X attn=Y` is the MRA paper's recipe (the task configs carry it); `recipe=lra_jax` the
original LRA code's (conf/recipe/). The values are typed in from the MRA paper's PyTorch LRA table
(spec/lra.md), its MRA constants (spec/mra.md) and the LRA code (docs/lra_jax.md), not read from
our configs, so a config that drifts fails here.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from mra_lra.models.schedule import resolve_warmup
from mra_lra.train import run
from mra_lra.utils import CONF_DIR

TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
ATTNS = sorted(p.stem for p in (CONF_DIR / "attn").glob("*.yaml"))
PAIRS = list(itertools.product(TASKS, ATTNS))
RECIPES = [None, "lra_jax"]  # None: the task's own, the MRA paper's


@functools.cache
def composed(task: str, attn: str, recipe: str | None = None):
    """`python train.py task=<task> attn=<attn> trainer=gpu [recipe=<recipe>]`'s config, composed
    once per session and shared by the tests below (read-only)."""
    overrides = [f"task={task}", f"attn={attn}", "trainer=gpu"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides + ([f"recipe={recipe}"] if recipe else []))


# task: (padded length, batch, lr, warm-up, steps, eval every)
PAPER = {
    "listops": (2048, 32, 1e-4, 1000, 5000, 50),
    "text": (4096, 32, 1e-4, 8000, 20000, 500),
    "retrieval": (4096, 32, 1e-4, 800, 30000, 300),
    "image": (1024, 256, 1e-4, 175, 35000, 175),
    "pathfinder": (1024, 256, 1e-4, 312, 62400, 312),
}
# task: ((F, D) for MRA-2, (F, D) for MRA-2-s): initial_prior_first_n_blocks / _diagonal_n_blocks.
PRIORS = {
    "listops": ((1, 0), (1, 0)),
    "text": ((1, 1), (1, 1)),
    "retrieval": ((1, 1), (1, 1)),
    "image": ((1, 0), (0, 1)),
    "pathfinder": ((1, 0), (1, 1)),
    "pathx": ((1, 0), (1, 1)),  # no Path-X row in the paper: Pathfinder's
}
PATCHED = {"image", "pathfinder", "pathx"}


@pytest.mark.parametrize("task,attn", PAIRS)
def test_task_and_attention_hold_the_paper_recipe(task, attn):
    cfg = composed(task, attn)
    assert (cfg.task.name, cfg.attn.name) == (task, attn)
    assert OmegaConf.select(cfg, "recipe.family") is None  # results.json's "recipe": null
    model = cfg.model
    assert (model.d_model, model.n_layers, model.n_heads, model.d_ffn) == (64, 2, 2, 128)
    assert (model.dropout, model.pooling, model.head_hidden) == (0.1, "mean", 128)
    assert model.two_tower == (task == "retrieval")
    opt = cfg.optimizer
    assert (list(opt.betas), opt.eps, opt.weight_decay) == ([0.9, 0.999], 1e-6, 0.0)
    # The published code's torch.optim.lr_scheduler.OneCycleLR with its default settings.
    sched = cfg.scheduler
    assert (
        sched._target_.endswith("schedule.one_cycle") and sched.total_steps == cfg.trainer.max_steps
    )
    assert (sched.anneal_strategy, sched.cycle_momentum) == ("linear", True)
    assert (sched.base_momentum, sched.max_momentum) == (0.85, 0.95)
    assert (sched.div_factor, sched.final_div_factor) == (25, 1e4)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    if task in PAPER:
        recipe = (
            cfg.data.max_length,
            cfg.data.batch_size,
            opt.lr,
            resolve_warmup(sched.total_steps, sched.warmup_steps, sched.warmup_fraction),
            cfg.trainer.max_steps,
            cfg.trainer.val_check_interval,
        )
        assert recipe == PAPER[task]
    if attn in ("mra", "mra_s", "flex_mra"):
        full, sparse = PRIORS[task]
        priors = (cfg.attn.initial_prior_first_n_blocks, cfg.attn.initial_prior_diagonal_n_blocks)
        assert priors == (full if attn == "mra" else sparse)
        assert cfg.attn.block_per_row == 8 and cfg.attn.block_size == 32
    if attn in ("mra", "mra_s"):
        expected = [4, 8] if task in PATCHED else None
        assert (list(cfg.attn.patch_shape) if cfg.attn.patch_shape else None) == expected


# The original LRA (JAX) recipes, typed in from google-research/long-range-arena's configs and
# train.py files (docs/lra_jax.md), again not read from our configs.
# task: (batch, lr, steps, warm-up, schedule factors, cosine cycle, weight decay, eval every)
JAX_RECIPE = {
    "listops": (32, 0.05, 5000, 1000, "rsqrt_decay", None, 0.1, 20),
    "text": (32, 0.05, 20000, 8000, "rsqrt_decay", None, 0.1, 100),
    "retrieval": (32, 0.05, 5000, 8000, "rsqrt_decay", None, 0.1, 100),
    "image": (256, 5e-4, 35000, 175, "cosine_decay", 35000, 0.0, 175),
    "pathfinder": (512, 1e-3, 62400, 312, "cosine_decay", 62400, 0.0, 312),
    "pathx": (64, 1e-3, 500000, 2500, "cosine_decay", 500000, 0.0, 2500),
}
# task: (emb_dim, layers, heads, qkv_dim, mlp_dim, dropout, attention dropout, length, pooling,
#        positions)
JAX_MODEL = {
    "listops": (512, 6, 8, 512, 2048, 0.1, 0.1, 2000, "cls", "sinusoidal"),
    "text": (256, 4, 4, 256, 1024, 0.1, 0.1, 1000, "cls", "sinusoidal"),
    "retrieval": (128, 4, 4, 128, 512, 0.1, 0.1, 4000, "cls", "sinusoidal"),
    "image": (32, 1, 1, 32, 64, 0.3, 0.2, 1024, "cls", "learned"),
    "pathfinder": (128, 1, 4, 64, 128, 0.2, 0.1, 1024, "mean", "sinusoidal"),
    "pathx": (32, 1, 2, 16, 32, 0.1, 0.1, 16384, "mean", "learned"),
}
# Per-model settings: what the LRA code's per-model configs (lra_benchmarks/<task>/configs/
# <model>_base.py), and the model code where a train.py leaves a key to it, change from the
# transformer's recipe above, in keys that the task's train.py uses (docs/lra_jax.md, "Per-model
# settings"). (task, attn) -> changed fields: sizes (emb_dim, layers, heads, qkv_dim, mlp_dim; the
# head's hidden width is mlp_dim), dropout, pooling, weight_decay, and attn options. Attentions
# missing here train the transformer's model with conf/attn/'s settings.
_CIFAR_WIDE = {"sizes": (128, 1, 8, 64, 128)}  # cifar10/{performer,linear_transformer,...}_base.py
JAX_PER_MODEL = {
    # listops/configs/performer_base.py: model_kwargs, FAVOR+ softmax kernel with nb_features=2
    ("listops", "performer"): {"attn": {"num_features": 2}},
    # ListOps passes no classifier_pool and SinkhornTransformerEncoder's default is MEAN; Text
    # passes CLS, which that encoder (MEAN only) rejects.
    ("listops", "sinkhorn"): {"pooling": "mean"},
    ("text", "sinkhorn"): {"pooling": "mean"},
    ("image", "performer"): _CIFAR_WIDE,
    ("image", "linear"): _CIFAR_WIDE,
    ("image", "linformer"): _CIFAR_WIDE,
    ("image", "sparse_trans"): _CIFAR_WIDE,
    ("image", "synthesizer"): _CIFAR_WIDE,
    ("image", "local"): {
        "sizes": (128, 1, 2, 64, 128),
        "pooling": "mean",
        "attn": {"block_size": 64},
    },
    ("image", "longformer"): {"sizes": (128, 4, 4, 64, 128), "pooling": "mean"},
    ("image", "reformer"): {"sizes": (64, 4, 8, 32, 64)},
    # cifar10/bigbird_base.py writes `num_head = 4` (a key BigBirdEncoder lacks): read as 4 heads
    ("image", "bigbird"): {"sizes": (128, 1, 4, 64, 128), "attn": {"block_size": 64}},
    ("image", "sinkhorn"): {
        "dropout": 0.1,
        "weight_decay": 0.7,
        "pooling": "mean",  # SinkhornTransformerEncoder pools by MEAN only
        "attn": {"block_size": 64},
    },
    ("pathfinder", "bigbird"): {
        "sizes": (64, 4, 2, 32, 64),
        "dropout": 0.2,
        "attn": {"block_size": 64},
    },
    ("pathfinder", "linear"): {"sizes": (128, 1, 2, 64, 128), "dropout": 0.2},
    ("pathfinder", "linformer"): {"sizes": (32, 1, 2, 16, 32), "dropout": 0.2},
    ("pathfinder", "local"): {
        "sizes": (64, 2, 4, 32, 64),
        "dropout": 0.1,
        "attn": {"block_size": 64},
    },
    ("pathfinder", "longformer"): {"sizes": (32, 2, 2, 16, 32), "dropout": 0.1},
    # Not pathfinder32/performer_base.py's (32, 4, 8, 16, 32): the LRA authors' config for the
    # paper's score, google-research/long-range-arena issue #37.
    ("pathfinder", "performer"): {"sizes": (128, 1, 8, 64, 128), "dropout": 0.2},
    ("pathfinder", "reformer"): {"sizes": (64, 2, 8, 32, 64), "dropout": 0.2},
    ("pathfinder", "sinkhorn"): {
        "sizes": (32, 2, 4, 16, 64),
        "dropout": 0.2,
        "attn": {"block_size": 64},
    },
    ("pathfinder", "sparse_trans"): {"sizes": (32, 1, 8, 16, 32), "dropout": 0.2},
    ("pathfinder", "synthesizer"): {"sizes": (64, 2, 4, 32, 64), "dropout": 0.2},
}


# Attention defaults of the LRA model code (lra_benchmarks/models/<model>/), which hold on every
# task since no train.py passes these arguments and no per-model config sets them (except the
# block sizes in JAX_PER_MODEL, applied after these); docs/lra_jax.md, "Attention defaults of the
# LRA code". attn -> attn options.
JAX_ATTN_DEFAULTS = {
    # linformer_attention.py: LinformerAttention(low_rank_features=16)
    "linformer": {"projected_length": 16},
    # bigbird.py _DEFAULT_BLOCK_SIZE = 64; bigbird_attention.py num_rand_blocks=3
    "bigbird": {"block_size": 64, "num_random_blocks": 3},
    # longformer.py: sliding_window_size=512 (255 keys before, 256 after), global_mask=None
    "longformer": {"window": 512, "num_global_tokens": 0},
    # reformer_attention.py: n_hashes=1, n_buckets=10 (chunk sizes per task below)
    "reformer": {"num_hashes": 1, "num_buckets": 10},
    # local_attention.py reshapes [n] to [block_size, blocks]: strided groups
    "local": {"strided": True},
    # sparse_attention.py ANDs every pattern with a lower-triangular mask
    "sparse_trans": {"causal": True},
}
# What those defaults come to at a task's length. (task, attn) -> attn options.
# - Reformer: n_hashes * n_buckets = 10 chunks of n_pad / 10 tokens, n_pad = (n // 10 + 1) * 10
#   (ReformerAttention pads chunk_len=10 - n % 10 tokens), n the tokens the attention sees.
# - BigBird: BigBirdAttention pads block_size - n % block_size tokens, a whole block of padding
#   when 64 divides n (Pathfinder 1024, Path-X 16384, mean pooling, no CLS token): its last
#   global block holds no real token, so the first block is the only global one.
JAX_ATTN_AT_LENGTH = {
    **{
        (task, "reformer"): {"chunk_size": chunk}
        for task, chunk in {
            "listops": 201,
            "text": 101,
            "retrieval": 401,
            "image": 103,
            "pathfinder": 103,
            "pathx": 1639,
        }.items()
    },
    ("pathfinder", "bigbird"): {"num_global_blocks": 1},
    ("pathx", "bigbird"): {"num_global_blocks": 1},
}


def test_lra_jax_per_model_settings_name_real_tasks_and_attentions():
    assert set(JAX_PER_MODEL) <= set(PAIRS) and set(JAX_ATTN_AT_LENGTH) <= set(PAIRS)
    assert set(JAX_ATTN_DEFAULTS) <= set(ATTNS)
    keys = {"sizes", "dropout", "pooling", "weight_decay", "attn"}
    assert all(set(change) <= keys for change in JAX_PER_MODEL.values())


def test_recipe_files_name_real_tasks_and_attentions():
    """A recipe's per-task, per-attention and per-pair files are pulled in by name (optional
    defaults entries), so a missing, misspelt or renamed one would silently apply to nothing."""
    for family in (p for p in (CONF_DIR / "recipe").iterdir() if p.is_dir()):
        assert {p.stem for p in family.glob("*.yaml")} == set(TASKS), family
        assert {p.stem for p in family.glob("attn/*.yaml")} <= set(ATTNS), family
        pairs = {f"{task}_{attn}" for task, attn in PAIRS}
        assert {p.stem for p in family.glob("pair/*.yaml")} <= pairs, family
        assert {p.name for p in family.iterdir() if p.is_dir()} <= {"attn", "pair"}, family


def test_lra_jax_per_model_length_settings_follow_the_lra_padding():
    """The typed-in values at each task's length are what LRA's padding gives: the Reformer's 10
    chunks of n_pad / 10 tokens, and one global BigBird block where 64 divides n. n is the number
    of tokens the attention sees (one more with a CLS token)."""
    for task, (*_, length, pooling, _) in JAX_MODEL.items():
        for attn in ("reformer", "bigbird"):
            cls = JAX_PER_MODEL.get((task, attn), {}).get("pooling", pooling) == "cls"
            n = length + cls
            if attn == "reformer":
                chunk = JAX_ATTN_AT_LENGTH[(task, attn)]["chunk_size"]
                n_pad = (n // 10 + 1) * 10
                assert chunk * 10 == n_pad and -(-n // chunk) == 10, task
            else:
                whole_padding_block = n % 64 == 0
                assert whole_padding_block == ((task, attn) in JAX_ATTN_AT_LENGTH), task


@pytest.mark.parametrize("task,attn", PAIRS)
def test_lra_jax_recipe_holds_the_lra_code_values(task, attn):
    cfg = composed(task, attn, "lra_jax")
    assert (cfg.task.name, cfg.attn.name, cfg.recipe.family) == (task, attn, "lra_jax")
    batch, lr, steps, warmup, decay, cycle, wd, every = JAX_RECIPE[task]
    opt, sched, trainer, model = cfg.optimizer, cfg.scheduler, cfg.trainer, cfg.model
    assert (cfg.data.batch_size, opt.lr, trainer.max_steps, sched.warmup_steps) == (
        batch,
        lr,
        steps,
        warmup,
    )
    assert sched._target_.endswith("factor_schedule")
    assert sched.factors == f"constant * linear_warmup * {decay}"
    if cycle is not None:
        assert sched.steps_per_cycle == cycle
    per_model = JAX_PER_MODEL.get((task, attn), {})
    wd = per_model.get("weight_decay", wd)
    assert (list(opt.betas), opt.eps, opt.weight_decay) == ([0.9, 0.98], 1e-9, wd)
    assert trainer.val_check_interval == every
    assert trainer.gradient_clip_val == (1.0 if task == "pathx" else None)
    emb, layers, heads, qkv, mlp, drop, attn_drop, length, pooling, positions = JAX_MODEL[task]
    emb, layers, heads, qkv, mlp = per_model.get("sizes", (emb, layers, heads, qkv, mlp))
    if attn == "reformer":  # LRA's ReformerAttention takes its input's width, not qkv_dim
        qkv = emb
    drop = per_model.get("dropout", drop)
    pooling = per_model.get("pooling", pooling)
    assert (model.d_model, model.n_layers, model.n_heads, model.qkv_dim, model.d_ffn) == (
        emb,
        layers,
        heads,
        qkv,
        mlp,
    )
    assert (model.head_hidden, model.dropout, model.pooling, model.positions) == (
        mlp,
        drop,
        pooling,
        positions,
    )
    assert cfg.data.max_length == length
    if task in ("text", "retrieval"):
        assert cfg.data.text_length == length
    if task in PATCHED:  # pixels are tokens 0..255, black ones padding, as in the LRA code
        assert model.input_encoding == "tokens" and cfg.data.pixel_zero_is_pad
    # The attention's settings: conf/attn/'s, changed only where the LRA code changes them: its
    # model code's defaults, what they come to at the task's length, then the per-model config.
    expected_attn = OmegaConf.to_container(composed(task, attn).attn, resolve=True)
    expected_attn.update(JAX_ATTN_DEFAULTS.get(attn, {}))
    expected_attn.update(JAX_ATTN_AT_LENGTH.get((task, attn), {}))
    expected_attn.update(per_model.get("attn", {}))
    if attn == "softmax":
        expected_attn["dropout"] = attn_drop
    assert OmegaConf.to_container(cfg.attn, resolve=True) == expected_attn
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"


def tiny_listops(data_dir: Path) -> list[str]:
    return [
        "data.num_train=16",
        "data.num_val=4",
        "data.num_test=4",
        "data.gen_min_length=10",
        "data.gen_max_length=60",
        "data.max_length=64",
    ]


def tiny_text(data_dir: Path) -> list[str]:
    from tests.data.test_text import write_aclimdb

    if not (data_dir / "aclImdb").exists():
        write_aclimdb(data_dir)
    return ["data.max_length=64", "data.text_length=60"]


def tiny_retrieval(data_dir: Path) -> list[str]:
    from tests.data.test_retrieval import write_tsv_data

    if not (data_dir / "lra_release").exists():
        write_tsv_data(data_dir / "lra_release" / "lra_release" / "tsv_data")
    return ["data.max_length=64", "data.text_length=60"]


def tiny_image(data_dir: Path) -> list[str]:
    from tests.data.test_image import write_archive

    if not (data_dir / "cifar-10-python.tar.gz").exists():
        write_archive(data_dir / "cifar-10-python.tar.gz")
    return []


def tiny_pathfinder(data_dir: Path) -> list[str]:
    # Generated: a dozen 32 x 32 images (Path-X too: 128 x 128 at 16k tokens is too slow for
    # fifteen CPU runs, and its length is covered by tests/data/test_pathfinder.py).
    sizes = ["data.num_train=8", "data.num_val=2", "data.num_test=2", "data.gen_workers=1"]
    return [*sizes, "data.resolution=32", "data.max_length=1024"]


# task -> a function writing small data under a folder (once per session) and returning the
# overrides that point a run at it.
TINY_DATA = {
    "listops": tiny_listops,
    "text": tiny_text,
    "retrieval": tiny_retrieval,
    "image": tiny_image,
    "pathfinder": tiny_pathfinder,
    "pathx": tiny_pathfinder,
}


@pytest.fixture(scope="session")
def tiny_data_dirs(tmp_path_factory):
    return {task: tmp_path_factory.mktemp(f"data_{task}") for task in TINY_DATA}


def _two_step_case(recipe: str | None, task: str, attn: str):
    """In `make test`: every pair under lra_jax (each may carry the LRA code's settings for its
    model and task), and under the MRA paper's recipe every attention on ListOps and every task
    with softmax, mra and mra_s; the other pairs (an attention's conf/attn on one more task, both
    already composed by the recipe test above and run under lra_jax) under `make test-slow`."""
    quick = recipe == "lra_jax" or task == "listops" or attn in ("softmax", "mra", "mra_s")
    return pytest.param(
        recipe,
        task,
        attn,
        id=f"{recipe or 'paper'}/{task}_{attn}",
        marks=() if quick else pytest.mark.slow,
    )


@pytest.mark.parametrize(
    "recipe,task,attn", [_two_step_case(r, t, a) for r in RECIPES for t, a in PAIRS]
)
def test_recipe_runs_two_steps(compose_cfg, tiny_data_dirs, recipe, task, attn, tmp_path):
    if attn == "flex_mra" and not torch.cuda.is_available():
        pytest.skip("FlexAttention has no backward on CPU (tests/attention/test_flex_mra.py)")
    data_dir = tiny_data_dirs[task]
    overrides = [
        f"task={task}",
        f"attn={attn}",
        *([f"recipe={recipe}"] if recipe else []),
        *TINY_DATA[task](data_dir),
        "data.batch_size=2",
        "data.num_workers=0",
        "trainer=cpu",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "model.n_layers=1",  # the recipe's depth is held above; one layer runs the same plumbing
        # one_cycle needs 0 or >= 2 (and < 2 steps), lra_jax's factor_schedule >= 1
        f"scheduler.warmup_steps={1 if recipe == 'lra_jax' else 0}",
        "logger=none",
        "test=false",
    ]
    results = run(compose_cfg(overrides, run_dir=tmp_path / "run", data_dir=data_dir))
    assert results["steps"] == 2 and results["val_acc_best"] is not None
    assert results["recipe"] == recipe


def _steps_through(cfg, steps: int) -> None:
    """Build the config's schedule as training does and step it `steps` times."""
    import hydra

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = hydra.utils.instantiate(cfg.scheduler)(optimizer=optimizer)
    for _ in range(steps):
        optimizer.step()
        schedule.step()


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("task", TASKS)
def test_every_recipe_takes_a_short_run(recipe, task):
    """`trainer.max_steps=20` on a recipe: its warm-up scales with the run or is clipped."""
    GlobalHydra.instance().clear()
    overrides = [f"task={task}", "trainer.max_steps=20", *([f"recipe={recipe}"] if recipe else [])]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        _steps_through(compose("train", overrides=overrides), 20)


SWEEPS = sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*_optuna.yaml"))


@pytest.mark.parametrize("sweep", [*SWEEPS, "wandb_listops"])
def test_every_sweep_warmup_takes_a_short_run(sweep):
    """Each warm-up a sweep may draw (fractions of the run) works with `trainer.max_steps=20`."""
    import yaml

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        if sweep == "wandb_listops":
            wandb_file = Path(__file__).resolve().parents[1] / "sweeps" / f"{sweep}.yaml"
            space = yaml.safe_load(wandb_file.read_text())["parameters"]
            base = ["task=listops", "trainer.max_steps=20"]
            values = space["scheduler.warmup_fraction"]["values"]
        else:
            base = [f"hparams_search={sweep}", "trainer.max_steps=20"]
            space = compose("train", overrides=base, return_hydra_config=True).hydra.sweeper
            choices = space.params["scheduler.warmup_fraction"]
            assert choices.startswith("choice(")
            values = [v.strip() for v in choices[len("choice(") : -1].split(",")]
        for value in values:
            cfg = compose("train", overrides=[*base, f"scheduler.warmup_fraction={value}"])
            _steps_through(cfg, 20)
