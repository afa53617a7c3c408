"""eval.py: a run's checkpoint evaluated again from its own config.yaml."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.evaluate import evaluate, main
from mra_lra.train import run
from tests.conftest import ROOT, TINY, compose_train_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny MRA-2 ListOps run (20 steps, validated at 10 and 20) and its results."""
    from hydra.core.global_hydra import GlobalHydra

    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_train_cfg([*TINY, "attn=mra"], run_dir, tmp_path_factory.mktemp("data"))
    results = run(cfg)
    GlobalHydra.instance().clear()
    return run_dir, results


def test_best_checkpoint_gives_the_runs_own_accuracies(trained, tmp_path):
    run_dir, results = trained
    out = tmp_path / "eval.json"
    got = evaluate(run_dir, splits=["val", "test"], out=out)
    # train.py tested the best-validation checkpoint with the model it trained; evaluate rebuilt
    # the model from config.yaml alone.
    assert got["test_acc"] == pytest.approx(results["test_acc"], abs=1e-6)
    assert got["val_acc"] == pytest.approx(results["val_acc_best"], abs=1e-6)
    assert got["checkpoint_step"] == results["best_step"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(got))


def test_last_checkpoint_and_default_output(trained):
    run_dir, results = trained
    got = evaluate(run_dir, ckpt="last")
    assert got["test_acc"] == pytest.approx(results["test_acc_last"], abs=1e-6)
    assert got["checkpoint_step"] == results["steps"]
    assert json.loads((run_dir / "eval_last.json").read_text())["test_acc"] == got["test_acc"]


def test_overrides_reach_the_model(trained, tmp_path):
    """With every block chosen (128 tokens = 4 blocks; block_per_row 4 picks all 16), MRA-2 is
    exact softmax, so the checkpoint run with attn=softmax scores the same; with one block per
    row the loss differs."""
    run_dir, _ = trained
    every = evaluate(run_dir, overrides=["attn.block_per_row=4"], out=tmp_path / "a.json")
    as_softmax = evaluate(run_dir, overrides=["attn=softmax"], out=tmp_path / "b.json")
    one = evaluate(run_dir, overrides=["attn.block_per_row=1"], out=tmp_path / "c.json")
    added = evaluate(
        run_dir,
        overrides=["attn.block_per_row=1", "+trainer.benchmark=false"],
        out=tmp_path / "d.json",
    )
    assert every["test_loss"] == pytest.approx(as_softmax["test_loss"], rel=1e-4)
    assert one["test_loss"] != pytest.approx(every["test_loss"], rel=1e-4)
    assert added["test_loss"] == pytest.approx(one["test_loss"], rel=1e-6)
    assert every["overrides"] == ["attn.block_per_row=4"]
    assert as_softmax["attn"] == "softmax"


def test_gpu_run_falls_back_to_cpu(trained, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the fallback is for machines without a GPU")
    run_dir, results = trained
    copy = tmp_path / "gpu_run"
    shutil.copytree(run_dir, copy)
    cfg = OmegaConf.load(copy / "config.yaml")
    cfg.trainer.accelerator, cfg.trainer.precision, cfg.trainer.devices = "gpu", "bf16-mixed", 4
    OmegaConf.save(cfg, copy / "config.yaml")
    got = evaluate(copy)
    assert (got["device"], got["precision"]) == ("cpu", "32-true")
    assert got["test_acc"] == pytest.approx(results["test_acc"], abs=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "say which run: run_dir="),
        (["ckpt=best"], "say which run"),
        (["{run}", "model.d_modl=3"], "'model.d_modl' is not in"),
        (["{run}", "trainer=cpu"], "'trainer' is a config section"),
        (["{run}", "attn=nope"], "attn=nope: no "),
        (["{run}", "split=train"], "split=train: choose from val, test"),
        (["{run}", "ckpt=nowhere.ckpt"], "checkpoint nowhere.ckpt not found"),
        (["{run}", "model.d_model=32"], "does not fit the model built from"),
        (["{run}", "oops"], "'oops' is not key=value"),
        (["run_dir={tmp}"], "config.yaml not found: run_dir must be a run folder"),
    ],
)
def test_bad_arguments_name_the_problem(trained, tmp_path, capsys, args, message):
    run_dir, _ = trained
    args = [a.format(run=f"run_dir={run_dir}", tmp=tmp_path) for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_missing_best_checkpoint_suggests_last(trained, tmp_path, capsys):
    run_dir, _ = trained
    copy = tmp_path / "early"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "best.ckpt").unlink()
    assert main([f"run_dir={copy}"]) == 2
    assert "try ckpt=last" in capsys.readouterr().err


def test_eval_py_on_the_command_line(trained, tmp_path):
    run_dir, results = trained
    out = tmp_path / "cli.json"
    proc = subprocess.run(
        [sys.executable, "eval.py", f"run_dir={run_dir}", f"out={out}", "data.num_workers=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout
    assert json.loads(out.read_text())["test_acc"] == pytest.approx(results["test_acc"], abs=1e-6)
