"""bench.efficiency: the LRA efficiency table for whole models, on tiny sizes on CPU."""

import csv

import pytest
import torch

from mra_lra.bench import efficiency
from mra_lra.bench.efficiency import compose_model_cfg, main, model_steps, random_batch, table

TINY = ["--n", "64,128", "--batch", "2", "--repeats", "1", "--warmup", "1", "--task", "listops"]


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_rows_and_table_for_each_attention_and_length(tmp_path):
    main([*TINY, "--attn", "softmax,mra", "--out", str(tmp_path)])
    rows = read(tmp_path / "efficiency.csv")
    assert [(r["attn"], r["n"], r["pass"]) for r in rows] == [
        (a, n, p) for a in ("softmax", "mra") for n in ("64", "128") for p in ("train", "infer")
    ]
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 for r in rows), rows
    for r in rows:
        assert float(r["steps_per_s"]) == pytest.approx(1e3 / float(r["ms"]), rel=1e-3)
    assert {r["impl"] for r in rows if r["attn"] == "mra"} == {"torch"}
    text = (tmp_path / "efficiency.md").read_text()
    assert "| steps / s (train) | n=64 | n=128 |" in text
    assert "| softmax | " in text and "(1.00x)" in text
    assert "bench.efficiency --n 64,128" in text
    assert (tmp_path / "efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_is_the_recipes_and_a_train_step_updates_it():
    cfg = compose_model_cfg("lra_jax", "listops", "mra", 256, ["model.n_layers=1"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.max_length) == (512, 1, 256)
    cfg = compose_model_cfg(None, "retrieval", "softmax", 128, [])
    batch = random_batch(cfg, 2, 128, torch.device("cpu"))
    assert set(batch) == {"label", "input_ids", "mask", "input_ids_2", "mask_2"}
    assert int(batch["input_ids"].min()) >= 1  # no padding token
    model, steps, precision = model_steps(cfg, batch, torch.device("cpu"))
    assert precision == "32-true"  # bf16-mixed only on CUDA
    assert model.two_tower
    before = [p.detach().clone() for p in model.parameters()]
    steps["infer"]()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    steps["train"]()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_out_of_memory_skips_longer_lengths(tmp_path, monkeypatch):
    real = efficiency.measure

    def measure(step, device, args):
        if efficiency.random_batch.last_n == 128:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(step, device, args)

    real_batch = efficiency.random_batch

    def random_batch_spy(cfg, batch, n, device):
        random_batch_spy.last_n = n
        return real_batch(cfg, batch, n, device)

    monkeypatch.setattr(efficiency, "random_batch", random_batch_spy)
    monkeypatch.setattr(efficiency, "measure", measure)
    main([*TINY, "--n", "64,128,192", "--attn", "mra", "--passes", "train", "--out", str(tmp_path)])
    status = {r["n"]: r["status"] for r in read(tmp_path / "efficiency.csv")}
    assert status == {"64": "ok", "128": "oom", "192": "oom"}
    assert "| mra | " in (tmp_path / "efficiency.md").read_text()


def test_table_ratios_are_to_softmax_at_the_same_length():
    def row(attn, n, sps, mib, status="ok"):
        return {"attn": attn, "n": n, "pass": "train", "steps_per_s": sps, "peak_mib": mib,
                "status": status}  # fmt: skip

    text = table(
        [row("softmax", 1024, 2.0, 400.0), row("softmax", 2048, 0.5, 1600.0),
         row("mra", 1024, 3.0, 100.0), row("mra", 2048, 2.0, 200.0), row("x", 1024, 0, 0, "oom")],
        "train",
    )  # fmt: skip
    assert "| mra | 3 (1.50x) | 2 (4.00x) |" in text
    assert "| mra | 100 (0.25x) | 200 (0.12x) |" in text
    assert "| x | oom | " in text


def test_unknown_task_lists_the_tasks(capsys):
    with pytest.raises(SystemExit):
        main(["--task", "txt"])
    assert "--task: unknown txt; choose from image, listops, pathfinder" in capsys.readouterr().err


def test_unknown_attention_lists_the_attentions(capsys):
    with pytest.raises(SystemExit):
        main(["--attn", "mra3", "--task", "text"])
    err = capsys.readouterr().err
    assert "--attn: unknown mra3" in err and "softmax" in err
