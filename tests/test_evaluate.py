"""eval.py: a run's checkpoint evaluated again from its own config.yaml."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
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
    # Another setting goes to a file of its own: the plain evaluation is kept.
    data_dir = OmegaConf.load(run_dir / "config.yaml").data.data_dir  # the same, given again
    evaluate(run_dir, ckpt="last", overrides=["attn.block_per_row=1", f"data.data_dir={data_dir}"])
    name = f"eval_last__attn.block_per_row=1__data.data_dir={data_dir.replace('/', '_')}.json"
    other = run_dir / name
    assert json.loads(other.read_text())["overrides"][0] == "attn.block_per_row=1"
    assert json.loads((run_dir / "eval_last.json").read_text())["overrides"] == []


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
    # Twenty steps leave the attention near uniform, so fewer blocks move the loss only in its
    # fifth digit (the paths agree to the seventh).
    assert every["test_loss"] == pytest.approx(as_softmax["test_loss"], rel=1e-6)
    assert one["test_loss"] != pytest.approx(every["test_loss"], rel=1e-6)
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
    # A precision given on the command line is kept (the accelerator still falls back).
    asked = evaluate(copy, overrides=["trainer.precision=bf16-mixed"])
    assert (asked["device"], asked["precision"]) == ("cpu", "bf16-mixed")


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "say which run: run_dir="),
        (["ckpt=best"], "say which run"),
        (["{run}", "model.d_modl=3"], "'model.d_modl' is not in"),
        (["{run}", "trainer=cpu"], "'trainer' is a config section"),
        (["{run}", "model.attn.block_per_row=2"], "write attn.block_per_row=2"),
        (["{run}", "attn=nope"], "attn=nope: no "),
        (["{run}", "split=train"], "split=train: choose from val, test"),
        (["{run}", "ckpt=nowhere.ckpt"], "checkpoint nowhere.ckpt not found"),
        (["{run}", "model.d_model=32"], "does not fit the model built from"),
        (["{run}", "oops"], "'oops' is not key=value"),
        (["{run}", "predictions=yes"], "write predictions=true or predictions=false"),
        (["run_dir={tmp}"], "config.yaml not found, and no run folder (config.yaml and"),
        (["run_dir={tmp}/nowhere"], "config.yaml not found, and no run folder (config.yaml and"),
        (["run_dir={path}/config.yaml"], "is a file; pass its run folder: run_dir={path}"),
        (["run_dir={path}/checkpoints/last.ckpt"], "pass its run folder: run_dir={path} ckpt=last"),
        (["{run}", "attn.block_per_row=${{x}}"], "'${{x}}' is not a value (Interpolation key"),
        (["{run}", "attn.block_per_row=["], "'[' is not a value"),
        (["{run}", "+task.name.x=1"], "task.name is a value ('listops'), not a config section"),
        (["{run}", "out={tmp}"], "out={tmp} is a folder; give a file name"),
    ],
)
def test_bad_arguments_name_the_problem(trained, tmp_path, capsys, args, message):
    run_dir, _ = trained
    args = [a.format(run=f"run_dir={run_dir}", tmp=tmp_path, path=run_dir) for a in args]
    message = message.format(tmp=tmp_path, path=run_dir)
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


@pytest.mark.parametrize(
    "override, message",
    [
        ("attn.block_per_row=0", "error: block_per_row must be >= 1, got 0\n"),
        ("attn.backend=bogus", "error: backend must be one of ('auto', 'torch', 'triton')"),
        ("data.batch_size=0", "error: data.batch_size must be an integer >= 1, got 0\n"),
        ("trainer.precision=17", "error: Precision 17 is invalid"),
    ],
)
def test_bad_option_values_are_one_message(
    trained, tmp_path, capsys, monkeypatch, override, message
):
    """As train.py prints them: the check's own message and a pointer to the traceback, which
    HYDRA_FULL_ERROR=1 shows."""
    from hydra.errors import InstantiationException

    run_dir, _ = trained
    args = [f"run_dir={run_dir}", override, f"out={tmp_path / 'eval.json'}"]
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "(HYDRA_FULL_ERROR=1 shows where it was raised)" in err
    assert not (tmp_path / "eval.json").exists()
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(InstantiationException):
        main(args)


def test_bad_option_value_on_the_command_line_has_no_traceback(trained, tmp_path):
    run_dir, _ = trained
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [sys.executable, "eval.py", f"run_dir={run_dir}", "attn.block_per_row=0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: block_per_row must be >= 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def _hydra_copy(run_dir, folder):
    """The run with its config.yaml also in .hydra/ as Hydra keeps it: unresolved."""
    shutil.copytree(run_dir, folder)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.paths.output_dir = "${hydra:runtime.output_dir}"
    cfg.trainer.default_root_dir = "${paths.output_dir}"
    (folder / ".hydra").mkdir()
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    return folder / ".hydra"


@pytest.mark.parametrize(
    "content, problem",
    [
        (
            b"model: [unclosed\n  d_model: :\n",
            "(not YAML: expected ',' or ']', but got ':' at line 2)",
        ),
        (b"PK\x03\x04\x80\x81\xfe\xff", "(not YAML: 'utf-8' codec can't decode"),
        (b"", "(it is empty)"),
        (b"- task\n- model\n", "(it holds a list, not the run's config sections)"),
        (b"seed: 1\nmodel: 3\n", "(no task, data, model, optimizer, trainer, attn sections)"),
        (None, "(it is not resolved: paths.output_dir is ${hydra:runtime.output_dir})"),
    ],
)
def test_a_config_yaml_train_py_did_not_write_is_named(trained, tmp_path, capsys, content, problem):
    run_dir, _ = trained
    folder = tmp_path / "run"
    if content is None:  # Hydra's copy, in the run's .hydra/
        folder = _hydra_copy(run_dir, folder)
        fix = f"that is Hydra's copy; the run's own is in the folder above: run_dir={folder.parent}"
    else:
        shutil.copytree(run_dir, folder)
        (folder / "config.yaml").write_bytes(content)
        fix = "run_dir must be a run folder written by train.py"
    assert main([f"run_dir={folder}"]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {folder / 'config.yaml'} is not a run config written by train.py {problem}" in err
    )
    assert fix in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("ckpt", ["best", "last"])
@pytest.mark.parametrize("folder", [True, False])
def test_a_run_without_checkpoints_suggests_nothing_that_fails(
    trained, tmp_path, capsys, ckpt, folder
):
    run_dir, _ = trained
    copy = tmp_path / "early"
    copy.mkdir()
    shutil.copy(run_dir / "config.yaml", copy)
    if folder:
        (copy / "checkpoints").mkdir()
    assert main([f"run_dir={copy}", f"ckpt={ckpt}"]) == 2
    err = capsys.readouterr().err
    assert f"error: {copy} holds no checkpoints" in err
    assert "Train it again with train.py" in err
    assert "ckpt=last" not in err and "ckpt=best" not in err


def test_missing_last_checkpoint_suggests_best(trained, tmp_path, capsys):
    run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "last.ckpt").unlink()
    assert main([f"run_dir={copy}", "ckpt=last"]) == 2
    err = capsys.readouterr().err
    assert "the run saved best.ckpt: try ckpt=best" in err and "ckpt=last" not in err


@pytest.mark.parametrize("kind", ["text", "cut_short", "no_state_dict", "folder", "relative"])
def test_a_ckpt_path_that_is_no_checkpoint_is_named(trained, tmp_path, capsys, monkeypatch, kind):
    run_dir, _ = trained
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "x.ckpt"
    if kind == "text":
        path = run_dir / "config.yaml"
        message = f"{path} is not a checkpoint train.py wrote (not a zip archive"
    elif kind == "cut_short":
        path.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes()[:20000])
        message = f"{path} is not a checkpoint train.py wrote (not a zip archive"
    elif kind == "no_state_dict":
        torch.save({"weights": torch.zeros(2)}, path)
        message = f"{path} is not a checkpoint train.py wrote (no state_dict"
    elif kind == "folder":
        path = run_dir
        best = run_dir / "checkpoints" / "best.ckpt"
        message = f"ckpt={run_dir} is a folder; pass a checkpoint file, e.g. ckpt={best} or"
    else:
        path = "checkpoints/last.ckpt"
        last = run_dir / "checkpoints" / "last.ckpt"
        message = f"(a path is taken from the current folder: ckpt={last})"
    assert main([f"run_dir={run_dir}", f"ckpt={path}"]) == 2
    err = capsys.readouterr().err
    assert message in err
    if kind in ("text", "cut_short", "no_state_dict"):
        assert err.rstrip().endswith("; pass ckpt=best or ckpt=last")


def test_out_in_a_new_folder_is_made(trained, tmp_path):
    run_dir, results = trained
    out = tmp_path / "new" / "eval.json"
    assert main([f"run_dir={run_dir}", f"out={out}"]) == 0
    assert json.loads(out.read_text())["test_acc"] == pytest.approx(results["test_acc"], abs=1e-6)


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


def test_predictions_and_accuracy_by_length(trained, tmp_path):
    run_dir, results = trained
    out = tmp_path / "pred.json"
    got = evaluate(run_dir, splits=["test"], out=out, predictions=True)
    path = tmp_path / "pred_test_predictions.csv"
    assert got["test_predictions"] == str(path)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(16))  # the tiny test split, in order
    correct = [int(r["prediction"] == r["label"]) for r in rows]
    assert [int(r["correct"]) for r in rows] == correct
    assert sum(correct) / len(rows) == pytest.approx(results["test_acc"], abs=1e-6)
    # Lengths are the data's own (the cached arrays), not something the model reports.
    from mra_lra.evaluate import load_run_config
    from mra_lra.train import build

    datamodule, _ = build(load_run_config(run_dir, []))
    datamodule.prepare_data()
    datamodule.setup("test")
    lengths = list(datamodule.datasets["test"].arrays["length"])
    assert [int(r["length"]) for r in rows] == lengths
    bins = got["test_acc_by_length"]
    assert sum(b["n"] for b in bins) == 16
    assert bins[0]["min_length"] == min(lengths) and bins[-1]["max_length"] == max(lengths)
    for b in bins:
        inside = [c for c, n in zip(correct, lengths, strict=True)
                  if b["min_length"] <= n <= b["max_length"]]  # fmt: skip
        assert b["n"] == len(inside) and b["acc"] == pytest.approx(sum(inside) / len(inside))


def test_accuracy_by_length_bins():
    import numpy as np

    from mra_lra.evaluate import accuracy_by_length

    lengths = np.array([10, 11, 19, 20, 40, 49])
    correct = np.array([1, 0, 1, 1, 0, 1])
    # Edges 10 to 50 in four: [10, 20), [20, 30), [30, 40), [40, 50); the empty one is left out.
    assert accuracy_by_length(lengths, correct) == [
        {"min_length": 10, "max_length": 19, "n": 3, "acc": pytest.approx(2 / 3)},
        {"min_length": 20, "max_length": 29, "n": 1, "acc": 1.0},
        {"min_length": 40, "max_length": 49, "n": 2, "acc": 0.5},
    ]
    same = accuracy_by_length(np.array([1024, 1024]), np.array([1, 0]))
    assert same == [{"min_length": 1024, "max_length": 1024, "n": 2, "acc": 0.5}]


def test_comma_lists_evaluate_every_combination(trained, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "budget.json"
    args = [
        f"run_dir={run_dir}",
        f"out={out}",
        "attn.block_per_row=1,4",
        "attn.approx_mode=full,sparse",
    ]
    assert main(args) == 0
    with (tmp_path / "budget_sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["attn.block_per_row"], r["attn.approx_mode"]) for r in rows] == [
        ("1", "full"),
        ("1", "sparse"),
        ("4", "full"),
        ("4", "sparse"),
    ]
    # Each row is the evaluation a single command gives, and has its own JSON.
    single = evaluate(run_dir, overrides=["attn.block_per_row=1"], out=tmp_path / "one.json")
    assert float(rows[0]["test_loss"]) == pytest.approx(single["test_loss"], rel=1e-6)
    # With every block chosen (block_per_row 4 at 4 blocks) both modes are exact softmax; with
    # one block per row they differ.
    softmax = evaluate(run_dir, overrides=["attn=softmax"], out=tmp_path / "softmax.json")
    losses = {(r["attn.block_per_row"], r["attn.approx_mode"]): float(r["test_loss"]) for r in rows}
    assert losses["4", "full"] == pytest.approx(softmax["test_loss"], rel=1e-4)
    assert losses["4", "sparse"] == pytest.approx(softmax["test_loss"], rel=1e-4)
    assert losses["1", "full"] != pytest.approx(losses["1", "sparse"], rel=1e-4)
    saved = json.loads(
        (tmp_path / "budget__attn.block_per_row=4__attn.approx_mode=full.json").read_text()
    )
    assert saved["overrides"] == ["attn.block_per_row=4", "attn.approx_mode=full"]


def test_a_list_value_is_not_a_sweep():
    from mra_lra.evaluate import expand_sweep

    assert expand_sweep(["attn.patch_shape=[4,8]", "a=1"]) == [["attn.patch_shape=[4,8]", "a=1"]]
    assert expand_sweep(["a=1,2", "b=x"]) == [["a=1", "b=x"], ["a=2", "b=x"]]


def test_a_folder_of_runs_is_evaluated_run_by_run(trained, tmp_path):
    """A multirun-like folder: every run below it, at every value of the list, in one table."""
    run_dir, results = trained
    for job in ("0", "1"):
        shutil.copytree(run_dir, tmp_path / "multi" / job)
    (tmp_path / "multi" / "multirun.yaml").write_text("seed: 1\n")  # Hydra's, not a run
    assert main([f"run_dir={tmp_path / 'multi'}", "attn.block_per_row=1,4"]) == 0
    with (tmp_path / "multi" / "eval_best_sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["attn.block_per_row"]) for r in rows] == [
        ("0", "1"), ("0", "4"), ("1", "1"), ("1", "4")
    ]  # fmt: skip
    # Copies of one run: the same accuracy as the run's own test, at its own budget (8 = every
    # block at 4 blocks, as 4 is).
    assert float(rows[1]["test_acc"]) == pytest.approx(results["test_acc"], abs=1e-6)
    assert (tmp_path / "multi" / "1" / "eval_best__attn.block_per_row=4.json").is_file()
    # The same sweep with another fixed setting writes files of its own, never over these.
    table = tmp_path / "multi" / "eval_best_sweep.csv"
    before = table.read_text()
    assert (
        main([f"run_dir={tmp_path / 'multi'}", "attn.block_per_row=1,4", "attn.backend=torch"]) == 0
    )
    assert table.read_text() == before
    assert (tmp_path / "multi" / "eval_best__attn.backend=torch_sweep.csv").is_file()
    name = "eval_best__attn.backend=torch__attn.block_per_row=4.json"
    assert json.loads((tmp_path / "multi" / "1" / name).read_text())["overrides"] == [
        "attn.block_per_row=4", "attn.backend=torch"
    ]  # fmt: skip


def test_a_folder_mixing_attentions_skips_runs_without_the_key(trained, tmp_path, capsys):
    """make reproduce puts softmax runs beside MRA's: attn.block_per_row applies to MRA's only."""
    run_dir, _ = trained
    shutil.copytree(run_dir, tmp_path / "multi" / "mra")
    shutil.copytree(run_dir, tmp_path / "multi" / "softmax")
    config = tmp_path / "multi" / "softmax" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["attn"] = {"name": "softmax", "dropout": 0.1}
    config.write_text(yaml.safe_dump(cfg))
    assert main([f"run_dir={tmp_path / 'multi'}", "attn.block_per_row=1,4"]) == 0
    with (tmp_path / "multi" / "eval_best_sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["attn.block_per_row"]) for r in rows] == [("mra", "1"), ("mra", "4")]
    out = capsys.readouterr().out
    assert f"skipped {tmp_path / 'multi' / 'softmax'}: 'attn.block_per_row' is not in" in out
    # Only runs without the key: an error naming why, no table.
    shutil.rmtree(tmp_path / "multi" / "mra")
    shutil.copytree(tmp_path / "multi" / "softmax", tmp_path / "multi" / "softmax2")
    (tmp_path / "multi" / "eval_best_sweep.csv").unlink()
    assert main([f"run_dir={tmp_path / 'multi'}", "attn.block_per_row=1,4"]) == 2
    assert "has every key the overrides set" in capsys.readouterr().err
    assert not (tmp_path / "multi" / "eval_best_sweep.csv").exists()


def test_load_run_gives_the_trained_model_for_a_notebook(trained):
    """load_run's model, fed the test split by hand, scores what train.py's own test gave."""
    from mra_lra.evaluate import load_run

    run_dir, results = trained
    run = load_run(run_dir)
    assert run.step == results["best_step"] and run.cfg.attn.name == "mra"
    run.datamodule.prepare_data()
    run.datamodule.setup("test")
    net = run.net.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in run.datamodule.test_dataloader():
            correct += int((net(batch).argmax(-1) == batch["label"]).sum())
            total += len(batch["label"])
    assert correct / total == pytest.approx(results["test_acc"], abs=1e-6)
