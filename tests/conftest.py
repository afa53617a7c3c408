"""Test set-up. Triton kernels run under the interpreter unless a GPU run asks otherwise
(scripts/gpu_check.sh sets TRITON_INTERPRET=0); this must happen before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Small, fast settings for end-to-end runs: a tiny generated ListOps set and a few steps on CPU.
TINY = [
    "data.num_workers=0",
    "data.batch_size=8",
    "data.max_length=128",
    "data.num_train=80",
    "data.num_val=16",
    "data.num_test=16",
    "data.gen_min_length=10",
    "data.gen_max_length=120",
    "trainer.accelerator=cpu",
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "trainer.enable_progress_bar=false",
    "scheduler.warmup_steps=5",
    "optimizer.lr=1e-3",
]


def compose_train_cfg(overrides, run_dir, data_dir):
    """The train config for `overrides`, ready for mra_lra.train.run: Hydra's runtime fields
    (output dir) filled as `python train.py` would fill them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"data.data_dir={data_dir}", *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def compose_cfg(tmp_path_factory):
    """compose_cfg(overrides, run_dir=None, data_dir=None) -> a config ready for mra_lra.train.run
    (a fresh run folder and this test's data folder unless given)."""
    from hydra.core.global_hydra import GlobalHydra

    data_root = tmp_path_factory.mktemp("data")

    def _compose(overrides=(), run_dir=None, data_dir=None):
        run_dir = Path(run_dir or tmp_path_factory.mktemp("run"))
        return compose_train_cfg(overrides, run_dir, Path(data_dir or data_root))

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def conftest_tiny():
    return list(TINY)


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
