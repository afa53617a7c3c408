"""End to end: train.py's run on a tiny generated ListOps set."""

import csv
import json

import pytest
import torch

from mra_lra.attention import names
from mra_lra.models.module import LRALitModule
from mra_lra.train import run

REQUIRED = [
    "task", "attn", "test_acc", "test_acc_last", "val_acc_best", "best_step", "steps",
    "wall_seconds", "train_tokens_per_second", "peak_memory_mb", "params",
]  # fmt: skip


def read_metrics(run_dir):
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


@pytest.mark.parametrize("attn", ["mra", "softmax"])
def test_twenty_steps_write_results(compose_cfg, tmp_path, attn, conftest_tiny):
    run_dir = tmp_path / "run"
    cfg = compose_cfg([*conftest_tiny, f"attn={attn}"], run_dir=run_dir)
    results = run(cfg)
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in REQUIRED:
        assert on_disk[key] is not None, key
    assert on_disk["task"] == "listops" and on_disk["attn"] == attn
    assert on_disk["data_generated"]["num_train"] == 80  # no release under the tiny data_dir
    assert on_disk["steps"] == 20 and on_disk["best_step"] in (10, 20)
    assert 0.0 <= on_disk["test_acc"] <= 1.0
    assert on_disk["train_tokens_per_second"] > 0
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    keys = set().union(*(row.keys() for row in read_metrics(run_dir)))
    for key in ("train/loss", "train/acc", "train/lr", "val/acc", "val/acc_best", "test/acc"):
        assert key in keys, key


@pytest.mark.parametrize("stop", [10, 15])
def test_resume_from_last_matches_uninterrupted(
    compose_cfg, tmp_path, conftest_tiny, monkeypatch, stop
):
    # 80 training examples in batches of 8: steps 10 and 20 end epochs 0 and 1. The first run
    # dies right after its validation at step `stop`; at 15 it dies mid-epoch, and the loader's
    # place must travel in last.ckpt (else the resumed run starts epoch 1's order again and
    # trains on its first 5 batches twice).
    overrides = [*conftest_tiny, "attn=mra", "trainer.val_check_interval=5"]
    straight = run(compose_cfg(overrides, run_dir=tmp_path / "a"))

    part = tmp_path / "b"
    train_batch_start = LRALitModule.on_train_batch_start

    def dies_at_stop(module, batch, batch_idx):
        if module.global_step == stop:
            raise RuntimeError("killed")
        train_batch_start(module, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(LRALitModule, "on_train_batch_start", dies_at_stop)
        with pytest.raises(RuntimeError, match="killed"):
            run(compose_cfg(overrides, run_dir=part))
    last = part / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == stop
    resumed = run(compose_cfg([*overrides, f"ckpt_path={last}"], run_dir=part))
    assert resumed["steps"] == straight["steps"] == 20
    for key in ("val_acc_best", "test_acc", "test_acc_last"):
        assert resumed[key] == pytest.approx(straight[key]), key

    def losses(run_dir):
        return {
            row["step"]: float(row["train/loss"])
            for row in read_metrics(run_dir)
            if row["train/loss"]
        }

    a, b = losses(tmp_path / "a"), losses(part)
    assert a and set(a) == set(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    w_a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    w_b = torch.load(part / "checkpoints" / "last.ckpt", weights_only=False)
    for name, tensor in w_a["state_dict"].items():
        torch.testing.assert_close(w_b["state_dict"][name], tensor, msg=name)
    if stop == 15:
        # Resumed once more at its end: nothing left to train or validate, and val_acc_best is
        # still the restored best (the running max survives a checkpoint, its update count not).
        again = run(compose_cfg([*overrides, f"ckpt_path={last}"], run_dir=part))
        assert again["steps"] == 20 and again["val_acc_best"] == straight["val_acc_best"]


def test_accumulation_counts_steps_and_draws_fresh_dropout(
    compose_cfg, tmp_path, conftest_tiny, monkeypatch
):
    # 2 batches of 4 per optimizer step; validation every 3 steps must land after steps 3 and
    # 6, i.e. after batches 6 and 12 (Lightning counts batches: 3 would split step 2).
    seeds, validated = [], []
    step, start = LRALitModule.training_step, LRALitModule.on_validation_start

    def record_seed(module, batch, batch_idx):
        seeds.append(torch.initial_seed())
        return step(module, batch, batch_idx)

    def record_validation(module):
        validated.append((module.global_step, module.trainer.fit_loop.total_batch_idx + 1))
        start(module)

    monkeypatch.setattr(LRALitModule, "training_step", record_seed)
    monkeypatch.setattr(LRALitModule, "on_validation_start", record_validation)
    overrides = [
        *conftest_tiny,
        "attn=softmax",
        "data.batch_size=4",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "scheduler.warmup_steps=2",
    ]
    results = run(compose_cfg(overrides))
    assert results["steps"] == 6
    assert validated == [(3, 6), (6, 12)]
    assert len(seeds) == 12 and len(set(seeds)) == 12  # every micro-batch its own dropout
    with pytest.raises(ValueError, match="accumulate_grad_batches=0"):
        run(compose_cfg([*overrides, "trainer.accumulate_grad_batches=0"]))
    # 80 examples in batches of 12: 7 batches per epoch, 3.5 steps. Lightning would start a new
    # window at each epoch and validation would drift inside one: refused, with the fix.
    odd = [*overrides, "data.batch_size=12"]
    with pytest.raises(ValueError, match="trainer.limit_train_batches=6 "):
        run(compose_cfg(odd))
    assert run(compose_cfg([*odd, "trainer.limit_train_batches=6"]))["steps"] == 6


def test_device_is_where_the_run_trained(compose_cfg, conftest_tiny, monkeypatch):
    # A CPU run on a machine that has a GPU must not report the GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    overrides = [*conftest_tiny, "attn=softmax", "trainer.max_steps=3", "test=false"]
    overrides += ["scheduler.warmup_steps=2", "trainer.val_check_interval=3"]
    results = run(compose_cfg(overrides))
    assert results["device"] != "Fake GPU" and results["peak_memory_kind"] != "cuda_max_allocated"


@pytest.mark.parametrize("attn", [a for a in names() if a != "flex_mra"])
def test_every_attention_trains_listops_at_512(compose_cfg, tmp_path, conftest_tiny, attn):
    # flex_mra has no FlexAttention backward on CPU; its own tests check the message.
    overrides = [*conftest_tiny, f"attn={attn}", "data.max_length=512", "trainer.max_steps=3"]
    overrides += ["trainer.val_check_interval=3", "scheduler.warmup_steps=2", "logger=none"]
    overrides += ["test=false"]
    results = run(compose_cfg(overrides, run_dir=tmp_path / "run"))
    assert results["steps"] == 3 and results["attn"] == attn
    assert results["val_acc_best"] is not None


def test_missing_data_is_one_message_and_no_traceback(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "task=image",
            f"data.data_dir={tmp_path}",
            "trainer=cpu",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error: no files for this task" in result.stderr
    assert "cifar-10-python.tar.gz" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    # A start that failed before training leaves only its log, holding the error.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["train.log"]
    assert "cifar-10-python.tar.gz" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("bad_value", "error: model.n_layers must be >= 1, got 0"),
        ("finished_run", "already holds a run (results.json); starting again there would"),
    ],
)
def test_bad_options_and_run_folders_are_one_message(tmp_path, case, expected):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", "task=listops", "trainer=cpu", "logger=none"]
    command += [f"data.data_dir={tmp_path}", f"hydra.run.dir={run_dir}"]
    if case == "bad_value":
        command.append("model.n_layers=0")
    else:
        run_dir.mkdir()
        (run_dir / "results.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if case == "finished_run":  # the refused start changed nothing in the folder
        assert [p.name for p in run_dir.iterdir()] == ["results.json"]
        assert (run_dir / "results.json").read_text() == "{}"


def test_triton_backend_trains_like_the_torch_path(compose_cfg, tmp_path, conftest_tiny):
    """attn.backend=triton through the whole training stack (padded ListOps batches, the
    Lightning module, AdamW), kernels under the interpreter: the same losses as the torch path."""
    overrides = [*conftest_tiny, "attn=mra", "trainer.max_steps=3", "data.max_length=96"]
    overrides += ["trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "model.n_layers=1"]
    overrides += ["scheduler.warmup_steps=2", "test=false", "trainer.num_sanity_val_steps=0"]
    overrides += ["trainer.limit_val_batches=1", "data.batch_size=4"]

    def losses(backend):
        run_dir = tmp_path / backend
        run(compose_cfg([*overrides, f"attn.backend={backend}"], run_dir=run_dir))
        return [float(r["train/loss"]) for r in read_metrics(run_dir) if r.get("train/loss")]

    torch_losses, triton_losses = losses("torch"), losses("triton")
    assert len(torch_losses) == 3
    assert triton_losses == pytest.approx(torch_losses, rel=1e-4)


def test_debug_configs_cut_the_run_short(compose_cfg, tmp_path, conftest_tiny):
    """debug=fdr runs one batch of each stage; debug=limit a short run through every stage;
    debug=overfit drives the training loss on one batch towards zero; debug=profiler writes its
    report. Each wins over the tiny settings it shares keys with (it goes last)."""
    fdr = run(compose_cfg([*conftest_tiny, "debug=fdr"], run_dir=tmp_path / "fdr"))
    assert fdr["steps"] == 1 and fdr["test_acc"] is None and fdr["test_acc_last"] is not None

    limit = run(compose_cfg([*conftest_tiny, "debug=limit"], run_dir=tmp_path / "limit"))
    assert limit["steps"] == 20 and limit["best_step"] in (10, 20)

    overfit_dir = tmp_path / "overfit"
    overfit = compose_cfg(
        [*conftest_tiny, "debug=overfit", "trainer.max_steps=80"], run_dir=overfit_dir
    )
    assert overfit.trainer.overfit_batches == 1 and overfit.trainer.detect_anomaly
    run(overfit)
    losses = [float(r["train/loss"]) for r in read_metrics(overfit_dir) if r.get("train/loss")]
    assert losses[-1] < 0.1 and losses[-1] < losses[0] / 5, losses

    run(compose_cfg([*conftest_tiny, "debug=profiler"], run_dir=tmp_path / "prof"))
    assert "run_training_batch" in (tmp_path / "prof" / "fit-profile.txt").read_text()


def test_resuming_into_another_folder_is_warned(tmp_path, caplog):
    from mra_lra.run_folder import warn_if_resumed_elsewhere

    checkpoint = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with caplog.at_level("WARNING", logger="mra_lra.run_folder"):
        warn_if_resumed_elsewhere(str(checkpoint), tmp_path / "a")
        assert not caplog.records
        warn_if_resumed_elsewhere(str(checkpoint), tmp_path / "b")
    assert "ckpt_path alone" in caplog.text


def test_a_run_folder_is_not_overwritten_and_ckpt_path_is_checked(tmp_path):
    """A fresh start in a finished run's folder is refused (naming the resume); a folder, a
    missing file, a file that is no zip and a zip that is no checkpoint are named as such."""
    import zipfile

    from mra_lra.run_folder import RunFolderError, check_run_folder

    run_dir = tmp_path / "run"
    check_run_folder(None, run_dir)  # a new folder: fine
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(RunFolderError, match="ckpt_path=.*last.ckpt"):
        check_run_folder(None, run_dir)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    archive = tmp_path / "archive.ckpt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "a zip, but not torch.save's")
    for path in (run_dir, tmp_path / "missing.ckpt", text, archive):
        with pytest.raises(RunFolderError, match=f"ckpt_path={path}"):
            check_run_folder(str(path), run_dir)
    checkpoint = tmp_path / "real.ckpt"
    torch.save({"global_step": 3}, checkpoint)
    check_run_folder(str(checkpoint), run_dir)


def test_a_run_folder_takes_one_process_at_a_time(tmp_path):
    """A second process cannot train into a folder in use; once the first is gone (also killed:
    the kernel drops its lock) the folder is free again, lock file and all."""
    import subprocess
    import sys

    from mra_lra.run_folder import RunFolderError, locked

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from pathlib import Path\nfrom mra_lra.run_folder import locked\n"
         f"with locked(Path({str(tmp_path)!r})):\n    print('in', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "in"
        with pytest.raises(RunFolderError, match=str(tmp_path)), locked(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with locked(tmp_path):  # a killed holder's stale lock file is taken over
        pass


def test_a_diverged_run_stops_with_no_results(compose_cfg, tmp_path, conftest_tiny):
    """optimizer.lr=1e30: the training loss is NaN within steps. The run stops there with
    DivergedError (one line, exit 2, from train.py), without results.json or a best checkpoint."""
    from mra_lra.callbacks import DivergedError

    overrides = [*conftest_tiny, "attn=softmax", "model.n_layers=1", "optimizer.lr=1e30"]
    overrides += ["scheduler.warmup_steps=0"]
    with pytest.raises(DivergedError, match="optimizer.lr"):
        run(compose_cfg(overrides, run_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()


def test_a_validation_with_a_non_finite_loss_is_never_best(monkeypatch):
    from types import SimpleNamespace

    from pytorch_lightning.callbacks import ModelCheckpoint

    from mra_lra.callbacks import BestCheckpoint

    saved = []
    monkeypatch.setattr(ModelCheckpoint, "on_validation_end", lambda self, t, m: saved.append(t))
    callback = BestCheckpoint(monitor="val/acc", mode="max")
    for loss in (float("nan"), float("inf"), 2.0):
        trainer = SimpleNamespace(callback_metrics={"val/loss": torch.tensor(loss)}, global_step=1)
        callback.on_validation_end(trainer, None)
    assert len(saved) == 1 and saved[0].callback_metrics["val/loss"] == 2.0


@pytest.mark.parametrize(
    "signame, code, said",
    [("SIGINT", 130, "Ctrl-C"), pytest.param("SIGTERM", 143, "SIGTERM", marks=pytest.mark.slow)],
)
def test_a_signal_stops_the_run_where_it_is_and_ckpt_path_alone_finishes_it(
    tmp_path, compose_cfg, signame, code, said
):
    """Ctrl-C or a preemption (SIGTERM) between two validations: the run exits 130 or 143, writes
    no results.json, and leaves last.ckpt holding the step it stopped at (not the last
    validation's, up to val_check_interval steps back), named in its one error line. Then
    `train.py ckpt_path=<it>` alone resumes the run in its folder with its own settings and ends
    with the results of a run never stopped."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", "task=listops", "trainer=cpu", "model.n_layers=1"]
    command += ["data.num_workers=0", "data.batch_size=8", "data.max_length=128"]
    command += ["data.num_train=40", "data.num_val=8", "data.num_test=8"]
    command += ["data.gen_min_length=10", "data.gen_max_length=120"]
    command += ["trainer.max_steps=40", "trainer.val_check_interval=20", "test=true"]
    command += ["trainer.enable_progress_bar=false", "scheduler.warmup_steps=0"]
    # metrics.csv rewritten at every step: the test sees how far training got
    command += ["logger=csv", "+logger.csv.flush_logs_every_n_steps=1"]
    command += ["trainer.log_every_n_steps=1"]
    command += [f"data.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    last = run_dir / "checkpoints" / "last.ckpt"

    def logged_steps(version):
        """(train steps logged, whether a validation was logged) so far; Lightning logs global
        step g as step g - 1."""
        try:
            with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
                rows = list(csv.DictReader(f))
        except (OSError, csv.Error):
            return [], False
        # (the file may be read while a row is being appended)
        logged = [row for row in rows if (row.get("step") or "").isdigit()]
        train = [int(row["step"]) + 1 for row in logged if row.get("train/loss")]
        return train, any(row.get("val/acc") for row in logged)

    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                train, validated = logged_steps(0)
                if validated and train and max(train) >= 22:  # two steps past validation 20
                    break
                time.sleep(0.02)
            assert process.poll() is None, (tmp_path / "err").read_text()[-2000:]
            process.send_signal(getattr(signal, signame))
            process.wait(timeout=60)
        finally:
            process.kill()
    stderr = (tmp_path / "err").read_text()
    assert process.returncode == code, stderr[-2000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    stopped = int(re.match(rf"error: {said} stopped the run at step (\d+) of", line).group(1))
    assert 22 <= stopped < 40, line
    assert (
        f"so {run_dir} has no results.json; resume with ckpt_path={last} (step {stopped})" in line
    )
    assert "Traceback" not in stderr
    assert not (run_dir / "results.json").exists()
    assert torch.load(last, weights_only=False)["global_step"] == stopped  # not 20

    # The resume: the checkpoint alone, from another folder.
    resumed = subprocess.run(
        [sys.executable, str(root / "train.py"), f"ckpt_path={last}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    train, validated = logged_steps(1)
    assert min(train) == stopped + 1 and max(train) == 40 and validated

    overrides = [arg for arg in command[2:] if not arg.startswith(("data.data_dir", "hydra."))]
    straight = run(
        compose_cfg(overrides, run_dir=tmp_path / "straight", data_dir=tmp_path / "data")
    )
    for key in ("steps", "best_step", "test_acc", "test_acc_last", "val_acc_best"):
        assert results[key] == pytest.approx(straight[key]), key


def test_sigterm_in_a_validation_reruns_it_on_resume(
    compose_cfg, tmp_path, conftest_tiny, monkeypatch
):
    """SIGTERM between two validation batches: last.ckpt holds that step, marked as stopped in
    its validation, and the resumed run runs that validation again (a plain checkpoint of the step
    would make Lightning skip it as done), reaching the losses, validations and weights of a run
    never stopped. The checkpoint that rerun validation writes holds the train loader's place,
    and a resume from it does not validate that step a third time."""
    import os
    import signal

    from mra_lra.train import RunTerminated

    overrides = [*conftest_tiny, "attn=softmax", "model.n_layers=1", "trainer.max_steps=10"]
    overrides += ["trainer.val_check_interval=5", "trainer.log_every_n_steps=1", "test=false"]
    validated = []  # the steps validations started at
    validation_start = LRALitModule.on_validation_start

    def record(module):
        if not module.trainer.sanity_checking:
            validated.append(module.global_step)
        validation_start(module)

    monkeypatch.setattr(LRALitModule, "on_validation_start", record)
    straight = run(compose_cfg(overrides, run_dir=tmp_path / "a"))
    assert validated == [5, 10]

    validated.clear()
    part = tmp_path / "b"
    last = part / "checkpoints" / "last.ckpt"
    validation_step, train_batch_start = (
        LRALitModule.validation_step,
        LRALitModule.on_train_batch_start,
    )

    def sigterm_in_first_validation(module, batch, batch_idx):  # 16 examples: 2 batches
        if validated == [5] and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return validation_step(module, batch, batch_idx)

    def dies_at_7(module, batch, batch_idx):
        if module.global_step == 7:
            raise RuntimeError("killed")
        train_batch_start(module, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(LRALitModule, "validation_step", sigterm_in_first_validation)
        with pytest.raises(RunTerminated) as stopped:
            run(compose_cfg(overrides, run_dir=part))
    assert "at step 5 of trainer.max_steps=10" in stopped.value.message
    assert f"resume with ckpt_path={last} (step 5)" in stopped.value.message
    assert torch.load(last, weights_only=False)["global_step"] == 5
    with monkeypatch.context() as patch:
        patch.setattr(LRALitModule, "on_train_batch_start", dies_at_7)
        with pytest.raises(RuntimeError, match="killed"):
            run(compose_cfg([*overrides, f"ckpt_path={last}"], run_dir=part))
    assert validated == [5, 5]  # stopped in it, then rerun
    rerun = torch.load(last, weights_only=False)
    assert rerun["global_step"] == 5
    assert rerun["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 5
    resumed = run(compose_cfg([*overrides, f"ckpt_path={last}"], run_dir=part))
    assert validated == [5, 5, 10]

    for key in ("steps", "best_step", "val_acc_best"):
        assert resumed[key] == pytest.approx(straight[key]), key

    def logged(run_dir, key):
        return {row["step"]: float(row[key]) for row in read_metrics(run_dir) if row.get(key)}

    for key in ("train/loss", "val/acc"):
        a, b = logged(tmp_path / "a", key), logged(part, key)
        assert a and b == pytest.approx(a), key
    w_a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    for name, tensor in w_a["state_dict"].items():
        torch.testing.assert_close(torch.load(last, weights_only=False)["state_dict"][name], tensor)


def test_sigterm_inside_an_accumulation_window_keeps_the_last_checkpoint(
    compose_cfg, tmp_path, conftest_tiny, monkeypatch
):
    """The gradients of a half-done accumulation window are in no checkpoint: a SIGTERM there
    leaves last.ckpt at the validation before, and the message says why those steps are lost."""
    import os
    import signal

    from mra_lra.train import RunTerminated

    overrides = [*conftest_tiny, "attn=softmax", "model.n_layers=1", "data.batch_size=4"]
    overrides += ["trainer.accumulate_grad_batches=2", "trainer.max_steps=6"]
    overrides += ["trainer.val_check_interval=3", "scheduler.warmup_steps=2", "test=false"]
    training_step = LRALitModule.training_step

    def sigterm_in_a_window(module, batch, batch_idx):
        if module.trainer.fit_loop.total_batch_idx == 8:  # the first half of step 5
            os.kill(os.getpid(), signal.SIGTERM)
        return training_step(module, batch, batch_idx)

    monkeypatch.setattr(LRALitModule, "training_step", sigterm_in_a_window)
    run_dir = tmp_path / "run"
    with pytest.raises(RunTerminated) as stopped:
        run(compose_cfg(overrides, run_dir=run_dir))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert "at step 4 of trainer.max_steps=6" in stopped.value.message
    expected = f"ckpt_path={last} (step 3; the step after it is trained again; it came inside"
    assert f"{expected} an accumulation window" in stopped.value.message
    assert torch.load(last, weights_only=False)["global_step"] == 3


def test_sigterm_after_a_loop_ended_stops_the_run(compose_cfg, tmp_path):
    """A SIGTERM in a loop's last step leaves Lightning's flag set with no SIGTERMException (the
    loop is done): the run must stop all the same, before testing or writing results.json."""
    from types import SimpleNamespace

    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from mra_lra.callbacks import InterruptCheckpoint
    from mra_lra.train import RunTerminated, _stop_on_signal

    cfg = compose_cfg(["trainer.max_steps=20"], run_dir=tmp_path)
    trainer = SimpleNamespace(received_sigterm=False, global_step=20)
    saver = InterruptCheckpoint(tmp_path / "checkpoints" / "last.ckpt")
    with _stop_on_signal(trainer, cfg, saver, fitting=False):
        pass  # no signal: nothing happens
    trainer.received_sigterm = True
    with pytest.raises(RunTerminated) as stopped, _stop_on_signal(trainer, cfg, saver, False):
        pass
    assert stopped.value.code == 143
    assert "at step 20 of trainer.max_steps=20" in stopped.value.message
    assert "no checkpoint holds it yet" in stopped.value.message
    with pytest.raises(RunTerminated), _stop_on_signal(trainer, cfg, saver, False):
        raise SIGTERMException


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.max_step=5", "did you mean trainer.max_steps or trainer.max_epochs?"),
        ("model.nlayers=2", "did you mean model.n_layers?"),
        ("experment=demo", "did you mean experiment?"),
        ("model.foo=1", "model has _target_, vocab_size"),
    ],
)
def test_misspelt_key_is_one_message_naming_the_closest(
    tmp_path, monkeypatch, capsys, override, expected
):
    """Hydra advises `+key=value` for a key the config lacks, which would add a key that nothing
    reads; `python train.py` names the closest keys instead, before anything runs."""
    import runpy
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("MRA_LRA_TRACEBACKS", "0")
    argv = ["train.py", "experiment=demo", override, f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(root / "train.py"), run_name="__main__")
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    key = override.split("=")[0]
    assert err.startswith(f"error: {key} is not a key of the config; {expected}"), err
    assert err.count("\n") == 1, err
    assert "prefix it with +" in err
    assert not (tmp_path / "run").exists()
