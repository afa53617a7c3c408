"""The package as users install it: a wheel carries the configs and trains from any folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel `pip wheel .` builds, installed into a folder of its own (its dependencies are
    this environment's)."""
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out / "dist"), str(ROOT)],
        check=True,
    )
    (wheel,) = (out / "dist").glob("mra_lra-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(out / "site"), str(wheel)], check=True
    )
    return out / "site"


def _run_installed(site, args, cwd):
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "mra_lra.train", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_wheel_composes_its_configs_from_another_folder(installed, tmp_path):
    probe = subprocess.run(
        [sys.executable, "-c", "import mra_lra; print(mra_lra.__file__)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert probe.stdout.startswith(str(installed))  # the wheel's copy, not this checkout
    # A task, an attention and a recipe's layers (task, attn and pair files), all from the wheel.
    args = ["task=image", "attn=bigbird", "recipe=lra_jax", "--cfg", "job"]
    done = _run_installed(installed, args, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "name: image" in done.stdout and "family: lra_jax" in done.stdout


@pytest.mark.slow
def test_the_wheel_trains_from_another_folder(installed, tmp_path):
    args = ["experiment=demo", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    args += ["data.num_train=32", "data.num_val=8", "data.num_test=8", "hydra.run.dir=run"]
    args += [f"data.data_dir={tmp_path / 'data'}"]
    done = _run_installed(installed, args, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "results.json").is_file()
