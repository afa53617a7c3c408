"""What a run prints: each warning once per run on every handler, no third-party adverts."""

import logging

from mra_lra.loggers import quiet_console


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_each_warning_once_per_run_on_every_handler():
    root = logging.getLogger()
    console, logfile = Collect(), Collect()
    root.addHandler(console)
    root.addHandler(logfile)
    try:
        log = logging.getLogger("mra_lra.data.somewhere")
        for _ in range(2):  # two runs in one process (a sweep)
            with quiet_console():
                for _ in range(3):  # set up for fit, validate and test
                    log.warning("no release under data/: generated set used")
                logging.getLogger("pytorch_lightning.utilities.rank_zero").warning("try litlogger")
        log.warning("no release under data/: generated set used")  # outside a run: as it is
    finally:
        root.removeHandler(console)
        root.removeHandler(logfile)
    for handler in (console, logfile):
        assert handler.messages.count("no release under data/: generated set used") == 3
        assert not any("litlogger" in m for m in handler.messages)


def test_demo_log_has_no_warning_twice(tmp_path):
    """`make demo`'s command, shortened and with wandb: each warning once, no library
    deprecations or wandb warnings, and the progress bar counts the run's steps (not an epoch's
    batches, no v_num)."""
    import collections
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable, str(root / "train.py"), "experiment=demo", f"data.data_dir={tmp_path}",
        "data.num_train=64", "data.num_val=16", "data.num_test=16", "trainer.max_steps=12",
        "trainer.val_check_interval=6", f"hydra.run.dir={tmp_path / 'run'}", "logger=[csv,wandb]",
    ]  # fmt: skip
    # Python's warnings shown, not hidden; wandb offline, its own files in tmp.
    env = {**os.environ, "PYTHONWARNINGS": "default", "WANDB_MODE": "offline"}
    env.update({f"WANDB_{k}_DIR": str(tmp_path / k.lower()) for k in ("CONFIG", "CACHE", "DATA")})
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (done.stdout + done.stderr).replace("\r", "\n").splitlines()
    warnings = [
        line.split(" - ", 1)[-1]
        for line in lines
        if "[WARNING]" in line or re.search(r"\w+Warning\b", line)  # logging's or Python's
    ]
    assert warnings, "the demo warns that its ListOps set is generated"
    twice = [w for w, n in collections.Counter(warnings).items() if n > 1]
    assert not twice, twice
    assert not [line for line in lines if "Deprecat" in line or "deprecated" in line]
    assert not [line for line in lines if line.startswith("wandb: WARNING")]
    bar = [line for line in lines if line.startswith("step:")]
    assert bar and "/12 [" in bar[-1] and "v_num" not in bar[-1], bar[-1:]


def test_a_long_cpu_run_says_so_once(monkeypatch, caplog):
    from types import SimpleNamespace

    import torch

    from mra_lra import callbacks

    module = SimpleNamespace(device=torch.device("cpu"))
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: 3.0 * trainer.global_step)

    def steps(max_steps: int) -> list[str]:
        caplog.clear()
        estimate = callbacks.CpuTimeEstimate("python train.py task=listops attn=mra trainer=gpu")
        trainer.max_steps = max_steps
        for step in range(1, 40):
            trainer.global_step = step
            estimate.on_train_batch_end(trainer, module, None, None, step)
        return [r.getMessage() for r in caplog.records]

    (line,) = steps(5000)  # 3 s per step: about 4 hours
    assert "4987 more steps at 3.00 s each take about 4.2 hours" in line and "trainer=gpu" in line
    assert steps(1000) == []  # 49 minutes: nothing to say


def test_torch_threads_setting(monkeypatch):
    import pytest

    from mra_lra import utils

    assert utils.torch_threads(None) is None and utils.torch_threads(3) == 3
    monkeypatch.setattr(utils.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(utils.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for busy, threads in ((0.1, 2), (1.2, 1), (2.0, 1), (3.5, 1)):
        monkeypatch.setattr(utils, "busy_cores", lambda busy=busy: busy)
        assert utils.torch_threads("auto") == threads, busy
    for bad in ("all", 0, True, 1.5):
        with pytest.raises(ValueError, match="torch_threads"):
            utils.torch_threads(bad)
