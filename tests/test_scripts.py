"""The GPU scripts' plumbing, dry-run on CPU (`make test-slow`): every step runs and writes its
files; only the measurements are CPU ones."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def run_script(name, tmp_path, **env):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", f"scripts/{name}"],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "OUT": str(out), **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, out


def test_gpu_train_check_dry_run(tmp_path):
    proc, out = run_script(
        "gpu_train_check.sh", tmp_path, TRAINER="cpu", DEVICE="cpu", ATTNS="mra mra_s",
        STEPS="6", EFF_N="256", EFF_BATCH="2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "=== all steps passed" in (out / "gpu_train_check.log").read_text()
    for attn in ("mra", "mra_s"):
        assert json.loads((out / f"train_{attn}.json").read_text())["steps"] == 6
    as_trained, torch_path = (json.loads((out / f"eval_{p}.json").read_text()) for p in
                              ("triton", "torch"))  # fmt: skip
    assert as_trained["test_acc"] == pytest.approx(torch_path["test_acc"])
    assert "| mra_s |" in (out / "efficiency.md").read_text()


def test_gpu_check_dry_run_writes_targets(tmp_path):
    proc, out = run_script(
        "gpu_check.sh", tmp_path, DEVICE="cpu", BENCH_N="256", BATCH_N="256", PROFILE_N="256",
        BUDGET_S="120",
    )  # fmt: skip
    # On CPU the version check (no CUDA) and the CUDA-graph step fail by design; the summary is
    # still written.
    assert "targets" in (out / "gpu_check.log").read_text()
    assert (out / "targets.md").is_file()
    assert (out / "attention.csv").is_file()


def test_gpu_lra_dry_run(tmp_path):
    """The issue-22 device run at toy size: data, three trainings, their files and the report."""
    args = "data.gen_min_length=20 data.gen_max_length=200 data.max_length=256"
    proc, out = run_script(
        "gpu_lra.sh", tmp_path, TRAINER="cpu", DEVICE="cpu", STEPS="4", NUM_TRAIN="200",
        NUM_EVAL="32", GEN_WORKERS="2", ARGS=f"{args} trainer.val_check_interval=2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for attn in ("softmax", "mra", "mra_s"):
        assert json.loads((out / attn / "results.json").read_text())["steps"] == 4
        assert (out / attn / "metrics.csv").is_file()
    assert (out / "report.md").is_file()
