"""eval.py: a run's checkpoint evaluated again from its own config.yaml."""

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from mra_lra.evaluate import evaluate, load_run, main
from mra_lra.train import run
from tests.conftest import ROOT, TINY, compose_train_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny MRA-2 ListOps run (20 steps, validated at 10 and 20) and its results."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_train_cfg([*TINY, "attn=mra"], run_dir, tmp_path_factory.mktemp("data"))
    results = run(cfg)
    GlobalHydra.instance().clear()
    return run_dir, results


@pytest.fixture(autouse=True)
def _user_errors_as_one_line(monkeypatch):
    """As a user runs eval.py: without HYDRA_FULL_ERROR (which tests/conftest.py sets)."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("MRA_LRA_TRACEBACKS", raising=False)


def eval_py(monkeypatch, *args) -> int:
    """The exit status of `python eval.py <args>`, run in this process."""
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["eval.py", *map(str, args)])
    try:
        main()
    except SystemExit as stop:
        return stop.code
    finally:
        GlobalHydra.instance().clear()
    return 0


def read_table(path):
    with path.open() as f:
        return list(csv.DictReader(f))


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
    assert json.loads((run_dir / name).read_text())["overrides"][0] == "attn.block_per_row=1"
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
    # A precision given as an override is kept (the accelerator still falls back).
    asked = evaluate(copy, overrides=["trainer.precision=bf16-mixed"])
    assert (asked["device"], asked["precision"]) == ("cpu", "bf16-mixed")


@pytest.mark.parametrize(
    "args, code, named",
    [
        ([], 2, "run_dir="),
        (["{run}", "run.model.d_modl=3"], 2, "'model.d_modl'"),
        (["{run}", "run.trainer=cpu"], 2, "'trainer'"),
        (["{run}", "run.attn=nope"], 2, "attn/nope"),
        (["{run}", "run.attn.block_per_row=0"], 2, "block_per_row"),
        (["{run}", "run.data.batch_size=0"], 2, "batch_size"),
        (["{run}", "split=train"], 2, "split=train"),
        (["{run}", "ckpt=nowhere.ckpt"], 2, "nowhere.ckpt"),
        (["{run}", "run.model.d_model=32"], 2, "best.ckpt"),
        (["{run}", "predictions=yes"], 2, "predictions=yes"),
        (["{run}", "out={tmp}"], 2, "out={tmp}"),
        (["run_dir={tmp}/nowhere"], 2, "{tmp}/nowhere/config.yaml"),
        (["run_dir={path}/config.yaml"], 2, "run_dir={path}/config.yaml"),
        (["{run}", "oops"], 1, "oops"),  # Hydra's own: not an override
    ],
)
def test_bad_arguments_name_the_problem(trained, tmp_path, capsys, monkeypatch, args, code, named):
    run_dir, _ = trained
    args = [a.format(run=f"run_dir={run_dir}", tmp=tmp_path, path=run_dir) for a in args]
    assert eval_py(monkeypatch, *args) == code
    err = capsys.readouterr().err
    assert named.format(tmp=tmp_path, path=run_dir) in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.json"))


def test_full_error_shows_the_traceback(trained, monkeypatch):
    run_dir, _ = trained
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(Exception, match="block_per_row"):
        eval_py(monkeypatch, f"run_dir={run_dir}", "run.attn.block_per_row=0")


@pytest.mark.parametrize(
    "content", [b"model: [unclosed\n  d: :\n", b"\xff\xfe", b"", b"- a\n", None]
)
def test_a_config_yaml_train_py_did_not_write_is_named(
    trained, tmp_path, capsys, monkeypatch, content
):
    run_dir, _ = trained
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder)
    if content is None:  # Hydra's own copy, unresolved
        cfg = OmegaConf.load(run_dir / "config.yaml")
        cfg.paths.output_dir = "${hydra:runtime.output_dir}"
        OmegaConf.save(cfg, folder / "config.yaml")
    else:
        (folder / "config.yaml").write_bytes(content)
    assert eval_py(monkeypatch, f"run_dir={folder}") == 2
    err = capsys.readouterr().err
    assert str(folder / "config.yaml") in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("ckpt", ["best", "last"])
def test_missing_checkpoints_name_what_is_there(trained, tmp_path, capsys, monkeypatch, ckpt):
    run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / f"{ckpt}.ckpt").unlink()
    assert eval_py(monkeypatch, f"run_dir={copy}", f"ckpt={ckpt}") == 2
    other = "last.ckpt" if ckpt == "best" else "best.ckpt"
    assert other in capsys.readouterr().err
    # No checkpoint at all: the run folder is named.
    shutil.rmtree(copy / "checkpoints")
    assert eval_py(monkeypatch, f"run_dir={copy}", f"ckpt={ckpt}") == 2
    assert f"{copy} holds no checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["text", "cut_short", "other_zip", "no_state_dict", "folder"])
def test_a_ckpt_that_is_no_checkpoint_is_named(trained, tmp_path, capsys, monkeypatch, kind):
    run_dir, _ = trained
    path = tmp_path / "x.ckpt"
    if kind == "text":
        path = run_dir / "config.yaml"
    elif kind == "cut_short":
        path.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes()[:20000])
    elif kind == "other_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "not a checkpoint")
    elif kind == "no_state_dict":
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path = run_dir
    assert eval_py(monkeypatch, f"run_dir={run_dir}", f"ckpt={path}") == 2
    err = capsys.readouterr().err
    assert str(path) in err and len(err.strip().splitlines()) == 1


def test_out_in_a_new_folder_is_made(trained, tmp_path, monkeypatch):
    run_dir, results = trained
    out = tmp_path / "new" / "eval.json"
    assert eval_py(monkeypatch, f"run_dir={run_dir}", f"out={out}") == 0
    assert json.loads(out.read_text())["test_acc"] == pytest.approx(results["test_acc"], abs=1e-6)


def test_eval_py_on_the_command_line_writes_only_its_results(trained, tmp_path):
    run_dir, results = trained
    here = tmp_path / "here"
    here.mkdir()
    out = tmp_path / "cli.json"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [sys.executable, ROOT / "eval.py", f"run_dir={run_dir}", f"out={out}",
         "run.data.num_workers=0"],
        cwd=here, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["test_acc"] == pytest.approx(results["test_acc"], abs=1e-6)
    assert list(here.iterdir()) == []  # no outputs/, .hydra/ or log file


def test_predictions_and_accuracy_by_length(trained, tmp_path):
    run_dir, results = trained
    out = tmp_path / "pred.json"
    got = evaluate(run_dir, splits=["test"], out=out, predictions=True)
    path = tmp_path / "pred_test_predictions.csv"
    assert got["test_predictions"] == str(path)
    rows = read_table(path)
    assert [int(r["index"]) for r in rows] == list(range(16))  # the tiny test split, in order
    correct = [int(r["prediction"] == r["label"]) for r in rows]
    assert [int(r["correct"]) for r in rows] == correct
    assert sum(correct) / len(rows) == pytest.approx(results["test_acc"], abs=1e-6)
    # Lengths are the data's own (the cached arrays), not something the model reports.
    datamodule = load_run(run_dir).datamodule
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


def test_a_multirun_evaluates_every_combination(trained, tmp_path, monkeypatch):
    run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    args = [
        "-m",
        f"run_dir={copy}",
        "run.attn.block_per_row=1,4",
        "run.attn.approx_mode=full,sparse",
    ]
    assert eval_py(monkeypatch, *args) == 0
    (table,) = copy.glob("evals/*/table.csv")
    rows = read_table(table)
    assert [r["overrides"] for r in rows] == [
        "attn.block_per_row=1 attn.approx_mode=full",
        "attn.block_per_row=1 attn.approx_mode=sparse",
        "attn.block_per_row=4 attn.approx_mode=full",
        "attn.block_per_row=4 attn.approx_mode=sparse",
    ]
    # Each row is the evaluation a single command gives, and has its own JSON.
    single = evaluate(copy, overrides=["attn.block_per_row=1"], out=tmp_path / "one.json")
    assert float(rows[0]["test_loss"]) == pytest.approx(single["test_loss"], rel=1e-6)
    # With every block chosen (block_per_row 4 at 4 blocks) both modes are exact softmax; with
    # one block per row they differ.
    softmax = evaluate(copy, overrides=["attn=softmax"], out=tmp_path / "softmax.json")
    losses = [float(r["test_loss"]) for r in rows]
    assert losses[2:] == pytest.approx([softmax["test_loss"]] * 2, rel=1e-4)
    assert losses[0] != pytest.approx(losses[1], rel=1e-4)
    saved = json.loads(
        (copy / "eval_best__attn.block_per_row=4__attn.approx_mode=full.json").read_text()
    )
    assert saved["overrides"] == ["attn.block_per_row=4", "attn.approx_mode=full"]


def test_a_folder_of_runs_is_evaluated_run_by_run(trained, tmp_path, monkeypatch):
    """A multirun-like folder: every run below it, in one table; with -m, at every value."""
    run_dir, results = trained
    multi = tmp_path / "multi"
    for job in ("0", "1"):
        shutil.copytree(run_dir, multi / job)
    (multi / "multirun.yaml").write_text("seed: 1\n")  # Hydra's, not a run
    assert eval_py(monkeypatch, f"run_dir={multi}") == 0
    (table,) = multi.glob("evals/*/table.csv")
    rows = read_table(table)
    assert [r["run_dir"] for r in rows] == [str(multi / "0"), str(multi / "1")]
    assert float(rows[1]["test_acc"]) == pytest.approx(results["test_acc"], abs=1e-6)
    assert (multi / "1" / "eval_best.json").is_file()
    shutil.rmtree(table.parent)
    assert eval_py(monkeypatch, "-m", f"run_dir={multi}", "run.attn.block_per_row=1,4") == 0
    (table,) = multi.glob("evals/*/table.csv")
    assert len(read_table(table)) == 4
    assert (multi / "1" / "eval_best__attn.block_per_row=4.json").is_file()


def test_a_folder_mixing_attentions_skips_runs_without_the_key(
    trained, tmp_path, capsys, monkeypatch
):
    """make reproduce puts softmax runs beside MRA's: attn.block_per_row applies to MRA's only."""
    run_dir, _ = trained
    multi = tmp_path / "multi"
    shutil.copytree(run_dir, multi / "mra")
    shutil.copytree(run_dir, multi / "softmax")
    config = multi / "softmax" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["attn"] = cfg["model"]["attn"] = {"name": "softmax", "dropout": 0.1}
    config.write_text(yaml.safe_dump(cfg))
    assert eval_py(monkeypatch, f"run_dir={multi}", "run.attn.block_per_row=1") == 0
    assert f"skipped {multi / 'softmax'}" in capsys.readouterr().out
    assert (multi / "mra" / "eval_best__attn.block_per_row=1.json").is_file()
    # Only runs without the key: an error, no results.
    shutil.rmtree(multi / "mra")
    shutil.copytree(multi / "softmax", multi / "softmax2")
    assert eval_py(monkeypatch, f"run_dir={multi}", "run.attn.block_per_row=1") == 2
    assert "attn.block_per_row=1" in capsys.readouterr().err
    assert not list(multi.glob("*/eval_best__attn.block_per_row=1.json"))


def test_load_run_gives_the_trained_model_for_a_notebook(trained):
    """load_run's model, fed the test split by hand, scores what train.py's own test gave."""
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
