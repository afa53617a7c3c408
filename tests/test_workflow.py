"""Research workflow: wandb offline logging, DDP on two CPU processes, Optuna and wandb sweeps."""

import json
import logging
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
import wandb
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from wandb_log import offline_run, wandb_records

from mra_lra import loggers
from mra_lra import train as train_module
from mra_lra.data.sampling import EpochShuffleSampler, ResumableDataLoader
from mra_lra.train import attn_search_space, run

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Shorter than conftest's TINY run: enough steps for two validations and a test.
FEW_STEPS = ["trainer.max_steps=4", "trainer.val_check_interval=2", "scheduler.warmup_steps=2"]


# --- wandb ---------------------------------------------------------------------------------


def test_wandb_offline_without_credentials(wandb_env):
    loggers.wandb_mode_default()
    assert os.environ["WANDB_MODE"] == "offline"


@pytest.mark.parametrize(
    "credentials",
    ["api_key_env", "netrc", "settings_api_key", "settings_mode", "explicit_mode"],
)
def test_wandb_mode_left_to_wandb_when_user_chose(wandb_env, monkeypatch, credentials):
    if credentials == "api_key_env":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    elif credentials == "netrc":
        # What `wandb login` appends to ~/.netrc.
        (wandb_env / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    elif credentials in ("settings_api_key", "settings_mode"):
        (wandb_env / "wandb-config").mkdir()
        key = "api_key = k" if credentials == "settings_api_key" else "mode = online"
        (wandb_env / "wandb-config" / "settings").write_text(f"[default]\n{key}\n")
    else:
        monkeypatch.setenv("WANDB_MODE", "disabled")
    loggers.wandb_mode_default()
    expected = "disabled" if credentials == "explicit_mode" else None
    assert os.environ.get("WANDB_MODE") == expected


def test_wandb_netrc_for_another_host_is_not_a_login(wandb_env, monkeypatch):
    # A key for the public server does not log in to a self-hosted one.
    (wandb_env / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    loggers.wandb_mode_default()
    assert os.environ["WANDB_MODE"] == "offline"


def test_misspelt_wandb_mode_is_one_message(
    compose_cfg, tmp_path, conftest_tiny, wandb_env, monkeypatch, capsys
):
    # wandb's own error is a pydantic "1 validation error for Settings" naming neither the
    # variable nor the fix, raised once the data and model are built and config.yaml written.
    monkeypatch.setenv("WANDB_MODE", "ofline")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run_dir = tmp_path / "run"
    cfg = compose_cfg([*conftest_tiny, *FEW_STEPS, "logger=wandb"], run_dir=run_dir)
    with pytest.raises(SystemExit) as stopped:
        train_module.main(cfg)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: WANDB_MODE='ofline' is not a wandb mode")
    assert "online, offline or disabled" in line and "unset it" in line
    assert "Traceback" not in err and "validation error" not in err
    assert not run_dir.exists()  # refused before anything was written


def test_wandb_logger_writes_an_offline_run(compose_cfg, tmp_path, conftest_tiny, wandb_env):
    run_dir = tmp_path / "run"
    overrides = [*conftest_tiny, *FEW_STEPS, "logger=wandb", "trainer.log_every_n_steps=1"]
    results = run(compose_cfg(overrides, run_dir=run_dir))
    assert os.environ["WANDB_MODE"] == "offline"
    # run.finish() returns before wandb's service has written the log; teardown waits for it
    # (as wandb's own exit hook does at the end of `python train.py`).
    wandb.teardown()

    found = offline_run(run_dir)
    assert "exit" in found["kinds"], "the wandb run was not finished"

    header = found["header"]
    assert header.project == "mra-lra" and header.run_group == "listops_mra"
    assert header.display_name == "listops_mra_s42"
    assert set(header.tags) == {"listops", "mra"}

    config = found["config"]
    assert config["task"]["name"] == "listops" and config["trainer"]["max_steps"] == 4
    assert config["optimizer"]["lr"] == pytest.approx(1e-3)

    history = found["history"]
    for key in ("train/loss", "train/lr", "train/tokens_per_second", "train/peak_memory_mb"):
        assert len(history.get(key, [])) == 4, key  # one row per step (log_every_n_steps=1)
    # Validation at steps 2 and 4; the best of the two is val_acc_best.
    assert len(history["val/acc"]) == 2
    assert max(history["val/acc"]) == pytest.approx(results["val_acc_best"])
    # results.json is the run's summary, not one-point charts.
    assert not any(key.startswith("final/") for key in history)
    for key in ("test_acc", "test_acc_last", "peak_memory_mb", "steps"):
        assert found["summary"][key] == pytest.approx(results[key]), key
    # OneCycleLR over 4 steps with 2 of warm-up: lr / 25, the peak 1e-3, then linear to
    # lr / 2.5e5 at the last step.
    last = 1e-3 / 2.5e5
    assert history["train/lr"] == pytest.approx([1e-3 / 25, 1e-3, (1e-3 + last) / 2, last])


def test_resumed_run_continues_its_wandb_run(compose_cfg, tmp_path, conftest_tiny, wandb_env):
    """The first start writes its wandb id to the run folder; a resume into that folder logs to
    the same id (offline: a second offline-run folder with that id) from the resumed step on."""
    run_dir = tmp_path / "run"
    base = [
        *conftest_tiny,
        "logger=wandb",
        "trainer.log_every_n_steps=1",
        # a schedule without an end, so that the resumed run can train on past the first's
        "scheduler=lra_factors",
        "scheduler.warmup_steps=1",
    ]
    run(
        compose_cfg([*base, "trainer.max_steps=4", "trainer.val_check_interval=2"], run_dir=run_dir)
    )
    wandb.teardown()
    run_id = (run_dir / loggers.WANDB_ID_FILE).read_text().strip()
    (first,) = (run_dir / "wandb").glob("offline-run-*")
    assert first.name.endswith(f"-{run_id}")

    last = run_dir / "checkpoints" / "last.ckpt"
    overrides = [*base, "trainer.max_steps=6", "trainer.val_check_interval=2", f"ckpt_path={last}"]
    run(compose_cfg(overrides, run_dir=run_dir))
    wandb.teardown()
    (second,) = set((run_dir / "wandb").glob("offline-run-*")) - {first}
    # offline-run-<time>-<id>, with "-1" appended when both started in the same second
    assert re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", second.name), second.name
    (log_file,) = second.glob("run-*.wandb")
    steps = [
        json.loads(item.value_json)
        for r in wandb_records(log_file)
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
        if "/".join([item.key, *item.nested_key]).strip("/") == "trainer/global_step"
    ]
    assert steps and min(steps) >= 4, steps  # only what the resumed run trained

    # A fresh start in another folder is a new wandb run.
    other = tmp_path / "other"
    run(compose_cfg([*base, "trainer.max_steps=2", "trainer.val_check_interval=2"], run_dir=other))
    wandb.teardown()
    assert (other / loggers.WANDB_ID_FILE).read_text().strip() != run_id


# --- DDP -----------------------------------------------------------------------------------


def test_lightning_shards_epoch_shuffle_per_rank():
    # What Lightning does to our train loader under DDP (use_distributed_sampler=True): wrap
    # the custom sampler so that rank r takes every world_size-th index of that epoch's order.
    from pytorch_lightning.trainer.connectors.data_connector import _get_distributed_sampler
    from pytorch_lightning.utilities.data import _is_dataloader_shuffled

    def shards(epoch: int) -> list[list[int]]:
        loader = DataLoader(range(10), sampler=EpochShuffleSampler(10, seed=7))
        out = []
        for rank in (0, 1):
            sampler = _get_distributed_sampler(
                loader,
                shuffle=_is_dataloader_shuffled(loader),
                overfit_batches=0,
                num_replicas=2,
                rank=rank,
            )
            sampler.set_epoch(epoch)
            out.append(list(sampler))
        return out

    for epoch in (0, 1):
        rank0, rank1 = shards(epoch)
        assert len(rank0) == len(rank1) == 5
        assert sorted(rank0 + rank1) == list(range(10))  # disjoint, together the whole set
    # A fresh process (a resumed run) at epoch 1 sees the same shards; epochs differ.
    assert shards(1) == shards(1) and shards(0) != shards(1)


@pytest.mark.parametrize("workers", [0, 1])
def test_resumable_loader_skips_the_batches_served_before_the_checkpoint(workers, caplog):
    # With workers, torch's iterator draws indices as soon as it exists: before Lightning's
    # set_epoch on resume, which gave the resumed epoch the order of epoch 0.
    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(
            range(10),
            batch_size=2,
            sampler=EpochShuffleSampler(10, seed=7),
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def epoch_batches(state: dict | None, epoch: int, world: tuple[int, int] | None = None):
        dl = loader()
        if world is not None:  # Lightning's re-instantiation under DDP (rank, replicas)
            from pytorch_lightning.trainer.connectors.data_connector import (
                _get_distributed_sampler,
            )
            from pytorch_lightning.utilities.data import _update_dataloader

            sampler = _get_distributed_sampler(
                dl, shuffle=True, overfit_batches=0, num_replicas=world[1], rank=world[0]
            )
            dl = _update_dataloader(dl, sampler)
            assert isinstance(dl, ResumableDataLoader)
        if state is not None:
            dl.load_state_dict(state)
        iterator = iter(dl)  # Lightning asks for the iterator before it sets the epoch
        dl.sampler.set_epoch(epoch)
        return [b.tolist() for b in iterator], dl

    full, dl = epoch_batches(None, 1)
    sampler = EpochShuffleSampler(10, seed=7)
    sampler.set_epoch(1)
    order = list(sampler)
    assert full == [order[i : i + 2] for i in range(0, 10, 2)]
    assert len(full) == 5 and dl.state_dict() == {"epoch": 1, "batches": 5}
    partial = loader()
    partial.sampler.set_epoch(1)
    iterator = iter(partial)
    assert [next(iterator).tolist() for _ in range(3)] == full[:3]
    state = partial.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    rest, resumed = epoch_batches(state, 1)
    assert rest == full[3:] and resumed.state_dict() == {"epoch": 1, "batches": 5}
    # Restored and not yet drawn from (a resumed run validating first): the restored place.
    waiting = loader()
    waiting.load_state_dict(state)
    assert waiting.state_dict() == state
    iter(waiting)
    assert waiting.state_dict() == state
    # A checkpoint from an earlier epoch (or one written after the epoch's last batch, which
    # Lightning resumes at the next epoch) skips nothing.
    with caplog.at_level(logging.WARNING, logger="mra_lra.data.sampling"):
        assert epoch_batches({"epoch": 0, "batches": 3}, 1)[0] == full
    # an epoch that max_steps cut short: Lightning goes on at the next one, which is said
    assert "epoch 0 ended after 3 of its 5 batches and Lightning resumes at epoch 1" in caplog.text
    assert epoch_batches({"epoch": 1, "batches": 5}, 1)[0] == full
    # Lightning's overfit_batches sampler has no epochs: nothing can be told apart, nothing skipped
    plain = ResumableDataLoader(range(10), batch_size=2, num_workers=workers)
    plain.load_state_dict({"epoch": 0, "batches": 2})
    assert [b.tolist() for b in plain] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    # Under DDP each rank skips its own served batches of the same (seed, epoch) order.
    for rank in (0, 1):
        shard, _ = epoch_batches(None, 1, (rank, 2))
        assert epoch_batches({"epoch": 1, "batches": 2}, 1, (rank, 2))[0] == shard[2:]


def _evaluate(cfg, checkpoint: Path, split: str = "test") -> float:
    """Accuracy of a checkpoint over a whole split in one process: a plain loop, no Lightning."""
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    net = hydra.utils.instantiate(cfg.model, _convert_="all")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k[:4] == "net."})
    net.eval()
    dataset = datamodule.datasets[split]
    batch = dataset.__getitems__(list(range(len(dataset))))
    with torch.no_grad():
        preds = net(batch).argmax(dim=-1)
    return (preds == batch["label"]).float().mean().item()


def test_ddp_two_cpu_processes(compose_cfg, tmp_path, conftest_tiny):
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    # 15 test examples on 2 ranks: a padding sampler would count one of them twice.
    overrides = [*conftest_tiny, *FEW_STEPS, "data.num_test=15", "data.num_val=15"]
    overrides += ["data.num_train=40", f"data.data_dir={data_dir}"]
    command = [sys.executable, str(ROOT / "train.py"), "trainer=ddp", "trainer.accelerator=cpu"]
    command += ["trainer.devices=2", "trainer.precision=32-true", *overrides]
    command += [f"hydra.run.dir={run_dir}", "logger=tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out  # rank 1 started and joined
    assert (run_dir / "train_ddp_process_1.log").is_file()  # in the same run folder
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 4
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    cfg = compose_cfg(overrides, run_dir=tmp_path / "reference", data_dir=data_dir)
    best = run_dir / "checkpoints" / "best.ckpt"
    expected = _evaluate(cfg, best)
    assert results["test_acc"] == pytest.approx(expected, abs=1e-6)
    assert results["test_acc"] * 15 == pytest.approx(round(results["test_acc"] * 15), abs=1e-4)
    # The dashboard's test tables hold both ranks' examples, once each.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    (table,) = events.Tensors("test/acc_by_length/text_summary")
    rows = table.tensor_proto.string_val[0].decode().splitlines()[2:]
    assert sum(int(row.strip("|").split("|")[1]) for row in rows) == 15
    assert "mra/blocks/layer_0" in events.Tags()["images"]


# --- sweeps --------------------------------------------------------------------------------


def test_optuna_sweep_three_trials(tmp_path, conftest_tiny):
    sweep_dir = tmp_path / "sweep"
    fixed = [o for o in conftest_tiny if not o.startswith(("trainer.", "scheduler.", "optimizer."))]
    fixed += ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", *FEW_STEPS]
    fixed += ["data.num_train=40", f"data.data_dir={tmp_path / 'data'}", "logger=none"]
    fixed += ["test=false"]  # the search reads val/acc_best only
    command = [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=listops_optuna"]
    command += ["hydra.sweeper.n_trials=3", *fixed, f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    fixed_keys = {o.split("=")[0] for o in fixed} | {"hparams_search"}
    trials = []
    for k in range(3):
        trial_dir = sweep_dir / str(k)
        results = json.loads((trial_dir / "results.json").read_text())
        config = yaml.safe_load((trial_dir / "config.yaml").read_text())
        searched = {}
        for override in yaml.safe_load((trial_dir / ".hydra" / "overrides.yaml").read_text()):
            key, value = override.split("=", 1)
            if key not in fixed_keys:
                searched[key] = yaml.safe_load(value)
        # The search space of hparams_search/optuna.yaml and listops_optuna.yaml, and each value
        # reached the trial's config.
        assert set(searched) == {
            "optimizer.lr",
            "optimizer.weight_decay",
            "model.dropout",
            "attn.block_per_row",
            "scheduler.warmup_fraction",
        }
        assert 1e-5 <= searched["optimizer.lr"] <= 3e-3
        assert searched["optimizer.weight_decay"] in (0.0, 0.01, 0.1)
        assert searched["model.dropout"] in (0.0, 0.1, 0.2, 0.3)
        assert searched["attn.block_per_row"] in (2, 4, 8, 16)
        for key, value in searched.items():
            section, name = key.split(".")
            assert config[section][name] == pytest.approx(value), key
        trials.append((results["val_acc_best"], searched))

    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    top = max(value for value, _ in trials)
    assert best["best_value"] == pytest.approx(top)
    assert any(best["best_params"] == params for value, params in trials if value == top)


def test_optuna_sweep_whose_every_trial_fails_is_one_message(tmp_path, monkeypatch, capsys):
    """Optuna's sweeper ends such a sweep with a traceback ending in "No trials are completed
    yet." and keeps no trial's traceback; train.py names the first trial's error and its log.
    `python train.py` in this process, with run replaced: trial 0 raises (a bug), trial 1 never
    validates (no value for the sweeper)."""

    def failing_run(cfg):
        if cfg.paths.output_dir.endswith("0"):
            raise RuntimeError("boom\nat some depth")
        return {"val_acc_best": None, "steps": 2}

    monkeypatch.setattr(train_module, "run", failing_run)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("MRA_LRA_TRACEBACKS", "0")
    sweep_dir = tmp_path / "sweep"
    argv = ["train.py", "-m", "hparams_search=listops_optuna", "hydra.sweeper.n_trials=2"]
    argv += ["logger=none", "trainer.val_check_interval=3", f"hydra.sweep.dir={sweep_dir}"]
    monkeypatch.setattr(sys, "argv", argv)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    GlobalHydra.instance().clear()
    try:
        with pytest.raises(SystemExit) as stopped:
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    finally:  # Hydra set up logging for its jobs (a file handler in each trial folder)
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.handlers[:], root.level = handlers, level
        GlobalHydra.instance().clear()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    first = sweep_dir / "0"
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: 2 job") and f"({first}) failed: RuntimeError: boom" in last
    assert str(first / "train.log") in last
    assert "No trials are completed" not in err and "Traceback" not in err, err
    log_text = (first / "train.log").read_text()
    assert "Traceback" in log_text and "RuntimeError: boom" in log_text
    log_text = (sweep_dir / "1" / "train.log").read_text()
    assert "val/acc_best is null" in log_text and "no validation ran" in log_text


def test_attn_search_space_only_where_the_attention_has_the_knob(compose_cfg):
    import optuna

    for attn, searched in (("mra", {"attn.block_per_row"}), ("softmax", set())):
        cfg = compose_cfg(["hparams_search=listops_optuna", f"attn={attn}"])
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        attn_search_space(cfg, trial)
        assert set(trial.params) == searched, attn
        assert trial.params.get("attn.block_per_row", 2) in (2, 4, 8, 16)


@pytest.mark.parametrize("task", ["listops", "text", "retrieval", "image", "pathfinder", "pathx"])
def test_every_task_optuna_config_composes(task):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", [f"hparams_search={task}_optuna"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.task.name == task and cfg.optimized_metric == "val/acc_best"
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "maximize" and sweeper.sampler.seed is not None
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert {"optimizer.lr", "scheduler.warmup_fraction", "model.dropout"} <= set(sweeper.params)
    assert "optimizer.weight_decay" in sweeper.params


def test_wandb_sweep_parameters_are_hydra_overrides():
    sweep = yaml.safe_load((ROOT / "sweeps" / "wandb_listops.yaml").read_text())
    assert (ROOT / sweep["program"]).is_file()
    assert sweep["method"] == "bayes"
    assert sweep["metric"] == {"name": "val/acc_best", "goal": "maximize"}
    assert sweep["command"] == ["${env}", "python", "${program}", "${args_no_hyphens}"]
    candidates = {
        name: [spec["value"]] if "value" in spec else spec.get("values", [spec.get("min")])
        for name, spec in sweep["parameters"].items()
    }
    for name, spec in sweep["parameters"].items():
        if "distribution" in spec:
            candidates[name] = [spec["min"], spec["max"]]
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for name, values in candidates.items():
            for value in values:
                # What the agent runs: every parameter at once, as `name=value`.
                chosen = {n: v[0] for n, v in candidates.items()} | {name: value}
                overrides = [f"{n}={v}" for n, v in chosen.items()]
                cfg = compose("train", overrides, return_hydra_config=True)
                if name in groups:
                    assert cfg.hydra.runtime.choices[name] == value, name
                else:
                    assert OmegaConf.select(cfg, name) == pytest.approx(value), name
    GlobalHydra.instance().clear()


# --- SLURM ---------------------------------------------------------------------------------


def test_slurm_launcher_takes_resources_from_trainer_and_environment(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='pip install ".[cluster]"')
    monkeypatch.setenv("MRA_SLURM_PARTITION", "gpu-long")
    monkeypatch.setenv("MRA_SLURM_MEM_GB", "200")
    monkeypatch.delenv("MRA_SLURM_ACCOUNT", raising=False)
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    # One task per GPU on each node, as DDP under SLURM expects.
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (2, 4, 4)
    assert launcher["partition"] == "gpu-long" and launcher["account"] is None
    assert launcher["mem_gb"] == 200 and launcher["timeout_min"] == 720
