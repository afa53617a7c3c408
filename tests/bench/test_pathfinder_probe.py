"""The Pathfinder learnability probe runs end to end on a tiny set and reports accuracy rows
(its real results are in docs/pathfinder_generator.md)."""

from __future__ import annotations

import pytest
import torch

from mra_lra.bench import pathfinder_probe


def test_probe_model_gives_two_logits_per_image():
    model = pathfinder_probe.probe_model(width=4).eval()
    assert model(torch.zeros(3, 1, 32, 32)).shape == (3, 2)


def test_probe_runs_and_reports_accuracy_rows(capsys):
    pathfinder_probe.main(
        [
            "--num-train",
            "24",
            "--num-test",
            "8",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--batch-size",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert "held-out acc" in out and "chance 0.5" in out
    rows = pathfinder_probe.run_probe("pathfinder32_easy", 16, 8, 2, 4, 1, seed=1)
    assert [r[0] for r in rows] == [1, 2] and all(0.0 <= r[2] <= 1.0 for r in rows)


def test_bad_sizes_are_usage_errors():
    with pytest.raises(SystemExit) as exit_info:
        pathfinder_probe.main(["--steps", "0"])
    assert exit_info.value.code == 2
