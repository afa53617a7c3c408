"""Research workflow: wandb offline logging, DDP on two CPU processes, Optuna and wandb sweeps."""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import hydra
import pytest
import torch
import wandb
from torch.utils.data import DataLoader

from mra_lra import train as train_module
from mra_lra.data.sampling import EpochShuffleSampler
from mra_lra.train import run

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Shorter than conftest's TINY run: enough steps for two validations and a test.
FEW_STEPS = ["trainer.max_steps=4", "trainer.val_check_interval=2", "scheduler.warmup_steps=1"]


# --- wandb ---------------------------------------------------------------------------------


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's transaction log (run-<id>.wandb).

    The file is a 7-byte header (':W&B', magic 0xBEE1, version 0) then LevelDB-style log blocks of
    32 KiB: each chunk has a header (CRC-32 of type+data, uint16 length, uint8 type: 1 full,
    2 first, 3 middle, 4 last); a block tail shorter than a header is zero padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"corrupt chunk at byte {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No account, no network: wandb's own files in tmp, no settings or netrc from this machine."""
    home = tmp_path / "home"
    home.mkdir()
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "wandb-data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # ./wandb/settings is read too
    return home


def test_wandb_offline_without_credentials(wandb_env):
    train_module._wandb_mode_default()
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
    train_module._wandb_mode_default()
    expected = "disabled" if credentials == "explicit_mode" else None
    assert os.environ.get("WANDB_MODE") == expected


def test_wandb_netrc_for_another_host_is_not_a_login(wandb_env, monkeypatch):
    # A key for the public server does not log in to a self-hosted one.
    (wandb_env / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    train_module._wandb_mode_default()
    assert os.environ["WANDB_MODE"] == "offline"


def test_wandb_logger_writes_an_offline_run(compose_cfg, tmp_path, conftest_tiny, wandb_env):
    run_dir = tmp_path / "run"
    overrides = [*conftest_tiny, *FEW_STEPS, "logger=wandb", "trainer.log_every_n_steps=1"]
    results = run(compose_cfg(overrides, run_dir=run_dir))
    assert os.environ["WANDB_MODE"] == "offline"
    # run.finish() returns before wandb's service has written the log; teardown waits for it
    # (as wandb's own exit hook does at the end of `python train.py`).
    wandb.teardown()

    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (log_file,) = offline.glob("run-*.wandb")
    records = wandb_records(log_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds, "the wandb run was not finished"

    (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert header.project == "mra-lra" and header.run_group == "listops"
    assert header.display_name == "listops_mra_s42"
    assert set(header.tags) == {"listops", "mra"}

    config = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config["task"]["name"] == "listops" and config["trainer"]["max_steps"] == 4
    assert config["optimizer"]["lr"] == pytest.approx(1e-3)

    history: dict[str, list] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                history.setdefault("/".join([item.key, *item.nested_key]).strip("/"), []).append(
                    json.loads(item.value_json)
                )
    for key in ("train/loss", "train/lr", "train/tokens_per_second", "train/peak_memory_mb"):
        assert len(history.get(key, [])) == 4, key  # one row per step (log_every_n_steps=1)
    # Validation at steps 2 and 4; the best of the two is val_acc_best.
    assert len(history["val/acc"]) == 2
    assert max(history["val/acc"]) == pytest.approx(results["val_acc_best"])
    assert history["final/test_acc"] == [pytest.approx(results["test_acc"])]
    assert history["final/peak_memory_mb"] == [pytest.approx(results["peak_memory_mb"])]
    # One warm-up step to lr 1e-3, then linear decay to 0 at step 4: 1e-3 * (4 - step) / 3.
    assert history["train/lr"] == pytest.approx([1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3])


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
    command += [f"hydra.run.dir={run_dir}"]
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
