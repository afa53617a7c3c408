"""The attention benchmark on CPU: the torch path, and the Triton kernels under the interpreter
with every tile option it compares on a GPU."""

from __future__ import annotations

import csv

import pytest
import torch

from mra_lra.bench import attention as bench

TINY = "--device cpu --d 16 --heads 1 --batch 1 --repeats 1 --warmup 0".split()


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_torch_path_rows_and_plot(tmp_path):
    bench.main([*TINY, "--attn", "mra,softmax", "--n", "64,128", "--out", str(tmp_path)])
    got = rows(tmp_path / "attention.csv")
    assert {(r["attn"], r["n"], r["pass"]) for r in got} == {
        (a, n, p) for a in ("mra", "softmax") for n in ("64", "128") for p in ("fwd", "fwd+bwd")
    }
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 for r in got)
    assert (tmp_path / "attention.png").stat().st_size > 0


def test_triton_tile_options_each_get_a_row(tmp_path):
    args = ["--attn", "mra_s", "--n", "96", "--backend", "triton", "--passes", "fwd+bwd"]
    args += ["--query-rows", "1,2", "--blocks-per-step", "1,4", "--out", str(tmp_path)]
    bench.main([*TINY, *args])
    got = rows(tmp_path / "attention.csv")
    assert sorted(r["impl"] for r in got) == [
        "triton(q32,k128)",
        "triton(q32,k32)",
        "triton(q64,k128)",
        "triton(q64,k32)",
    ]
    assert all(r["status"] == "ok" for r in got)


@pytest.mark.parametrize("option", ["--query-rows", "--blocks-per-step"])
def test_tile_options_are_checked(option, tmp_path):
    with pytest.raises(SystemExit):
        bench.parse_args([option, "3", "--out", str(tmp_path)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--attn", "mra,mrax"], "--attn: unknown mrax; choose from bigbird"),
        (["--batch", "0"], "--batch 0: must be at least 1"),
        (["--n", "0,256"], "--n 0,256: must be at least 1"),
        (["--n", ","], "--n : must be at least 1"),
        (["--dtype", "fp16"], "--dtype: unknown fp16"),
        (["--warmup", "-1"], "--warmup -1: must be at least 0"),
        (["--device", "tpu"], "--device: "),
        (["--plot-from", "missing.csv"], "--plot-from: no such file missing.csv"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing ran, no empty CSV


def test_plot_from_refuses_a_csv_of_another_tool(tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text("family,task,attn,n\nlra,text,mra,1024\n")
    with pytest.raises(SystemExit):
        bench.main(["--plot-from", str(other), "--out", str(tmp_path)])
    assert f"{other} lacks the column(s) impl, scope, device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_cuda_device_on_a_cpu_build_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda", "--out", str(tmp_path)])
    assert "sees no CUDA device; run on a GPU machine or pass --device cpu" in (
        capsys.readouterr().err
    )


def test_speedups_pair_rows_with_their_baseline():
    def row(attn, n, ms, impl="", status="ok", **kw):
        base = dict(attn=attn, impl=impl, scope="attention", dtype="bfloat16", batch=1, heads=8)
        return {**base, "n": n, "d": 64, "pass": "fwd+bwd", "ms": ms, "status": status, **kw}

    rows = [
        row("sdpa_flash", 4096, 0.8),
        row("mra", 4096, 0.2, impl="triton(q32,k32)"),
        row("mra", 4096, 0.4, impl="triton(q32,k64)"),
        row("mra", 16384, 1.0),  # no baseline at this length
        row("mra_s", 4096, 0.1, dtype="float32"),  # nor in this dtype
        row("mra_s", 4096, None, status="oom"),
    ]
    got = [(r["attn"], r["impl"], r["speedup"]) for r in bench.speedups(rows, "sdpa_flash")]
    assert got == [
        ("mra", "triton(q32,k32)", pytest.approx(4.0)),
        ("mra", "triton(q32,k64)", pytest.approx(2.0)),
    ]


def test_a_failure_repeated_at_two_lengths_skips_the_rest(tmp_path, monkeypatch):
    # A compile error repeats at every length; each try would cost a GPU run its budget.
    class Broken(torch.nn.Module):
        def forward(self, q, k, v, mask=None):
            raise RuntimeError("no kernel for this tile\nsecond line")

    monkeypatch.setattr(bench, "build_attention", lambda *a, **kw: (Broken(), "flex(m32)"))
    args = ["--attn", "softmax", "--n", "64,128,256,512", "--passes", "fwd"]
    bench.main([*TINY, *args, "--out", str(tmp_path)])
    got = [(r["n"], r["impl"], r["status"]) for r in rows(tmp_path / "attention.csv")]
    error = "error: RuntimeError: no kernel for this tile"
    skipped = "skipped (the same failure at n=64 and n=128)"
    assert got == [
        ("64", "flex(m32)", error),
        ("128", "flex(m32)", error),
        ("256", "flex(m32)", skipped),
        ("512", "flex(m32)", skipped),
    ]
