"""bench.approximation: error against exact softmax on synthetic inputs and on a trained run's
captured q, k, v."""

import csv

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from mra_lra.bench.approximation import (
    GRADS,
    effective_matrix,
    exact_softmax,
    main,
    relative_error,
    run_options,
)
from tests.attention.dense import dense_softmax
from tests.conftest import TINY, compose_train_cfg

SMALL = "--n 128 --d 16 --heads 2 --batch 2 --seeds 0 --repeats 1".split()


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_exact_softmax_in_chunks_matches_the_dense_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 70)
    mask[1, 41:] = 0
    ref = dense_softmax(q, k, v, mask)
    torch.testing.assert_close(exact_softmax(q, k, v, mask, rows_per_chunk=16), ref)
    assert relative_error(ref * 1.1, ref, mask) == pytest.approx(0.1)
    noise = torch.zeros_like(ref)
    noise[1, :, 41:] = 5.0  # padded query rows do not count
    assert relative_error(ref + noise, ref, mask) == 0


def test_exact_settings_give_zero_error_and_fewer_blocks_do_not(tmp_path):
    """n = 128 is 4 blocks of 32: block_per_row 4 chooses all 16 blocks (MRA-2 is then softmax),
    and a Longformer window of 512 covers every key."""
    rows = main(
        [
            *SMALL,
            "--pad", "0.25", "--smooth", "8",
            "--attn", "softmax,mra,longformer",
            "--sweep", "mra.block_per_row=1,4",
            "--set", "longformer.window=512",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    error = {(r["attn"], r["setting"]): r["rel_error"] for r in rows}
    assert error[("softmax", "default")] < 1e-6
    assert error[("mra", "block_per_row=4")] < 1e-5
    assert error[("longformer", "default")] < 1e-5
    assert error[("mra", "block_per_row=1")] > 1e-3
    written = read(tmp_path / "approximation.csv")
    assert [(r["attn"], r["budget"]) for r in written] == [
        ("softmax", ""), ("mra", "1"), ("mra", "4"), ("longformer", "")
    ]  # fmt: skip
    assert all(float(r["ms"]) > 0 for r in written)
    text = (tmp_path / "approximation.md").read_text()
    assert "| mra | block_per_row=1 | " in text and "--sweep mra.block_per_row=1,4" in text
    assert (tmp_path / "approximation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_effective_matrix_of_softmax_is_the_probability_matrix():
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 2, 70, 16, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(2, 70, dtype=torch.float64)
    mask[0, 50:] = 0
    matrix = effective_matrix(build("softmax"), q, k, mask, seed=0)
    logits = (q[0, 0] @ k[0, 0].T / 4).masked_fill(mask[0] == 0, float("-inf"))
    probs = torch.softmax(logits, dim=-1) * mask[0, :, None]
    torch.testing.assert_close(matrix, probs)


@pytest.mark.parametrize(
    ("name", "options"),
    [("mra", {"block_per_row": 1, "backend": "torch"}), ("mra_s", {"block_per_row": 2}),
     ("longformer", {"window": 16}), ("performer", {"head_dim": 16, "num_features": 32})],
)  # fmt: skip
def test_effective_matrix_reproduces_the_output(name, options):
    """A v equals the method's own output on any v, padded keys get no weight, and the rows of
    the softmax-normalised methods sum to 1."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 100, 16, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(1, 100, dtype=torch.float64)
    mask[0, 81:] = 0
    attn = build(name, **options).double()
    matrix = effective_matrix(attn, q, k, mask, seed=3)
    torch.manual_seed(3)
    torch.testing.assert_close(matrix @ v[0, 0], attn(q, k, v, mask)[0, 0])
    assert (matrix[:, 81:] == 0).all() and (matrix[81:] == 0).all()
    if name != "performer":
        # (MRA's torch path keeps float32 row statistics, even for float64 inputs)
        ones = torch.ones(81, dtype=torch.float64)
        torch.testing.assert_close(matrix[:81].sum(dim=1), ones, atol=1e-6, rtol=0)


def test_triton_backend_gives_the_torch_paths_errors(tmp_path):
    """Under the interpreter on CPU: MRA's kernels and its torch path, same inputs, same error."""
    argv = [*SMALL, "--pad", "0.25", "--attn", "mra,mra_s", "--sweep", "mra.block_per_row=1,2"]
    by_backend = {
        backend: main([*argv, "--backend", backend, "--out", str(tmp_path / backend)])
        for backend in ("torch", "triton")
    }
    for torch_row, triton_row in zip(*by_backend.values(), strict=True):
        assert triton_row["setting"] == torch_row["setting"]
        assert triton_row["rel_error"] == pytest.approx(torch_row["rel_error"], rel=1e-4, abs=1e-6)


def test_gradient_errors(tmp_path):
    """--grad: exact where the forward is exact (softmax, MRA-2 with every block), not with one
    block per row; blank where no gradient reaches (Reformer's keys are its queries)."""
    rows = main(
        [*SMALL, "--pad", "0.25", "--attn", "softmax,mra,reformer", "--sweep",
         "mra.block_per_row=1,4", "--grad", "--out", str(tmp_path)]
    )  # fmt: skip
    grads = {(r["attn"], r["setting"]): [r[f"rel_error_{g}"] for g in GRADS] for r in rows}
    assert max(grads[("softmax", "default")]) < 1e-6
    assert max(grads[("mra", "block_per_row=4")]) < 1e-5
    assert min(grads[("mra", "block_per_row=1")]) > 1e-3
    dq, dk, dv = grads[("reformer", "default")]
    assert dk is None and dq > 0 and dv > 0
    written = {(r["attn"], r["setting"]): r for r in read(tmp_path / "approximation.csv")}
    assert written[("reformer", "default")]["rel_error_dk"] == ""
    text = (tmp_path / "approximation.md").read_text()
    assert "| attention | setting | dq | dk | dv |" in text
    assert "| reformer | default | " in text.split("dq | dk | dv")[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_cuda_device_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main([*SMALL, "--device", "cuda", "--attn", "mra"])
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--attn", "mra", "--sweep", "nystrom.num_landmarks=8"], "not in --attn"),
        (["--attn", "mra", "--sweep", "block_per_row=1,2"], "name.key=v1,v2"),
        (["--attn", "mra", "--set", "block_per_row=2"], "name.key=value"),
        (["--attn", "nope"], "--attn: unknown nope; choose from"),
        (["--attn", "mra", "--set", "mra.bogus=1"], "bogus"),
        (["--attn", "mra", "--repeats", "0"], "--repeats 0: must be at least 1"),
        (["--attn", "mra", "--seeds", ","], "at least one seed"),
        (["--attn", "mra", "--maps", "--maps-layer", "1"], "layers 0-0"),
    ],
)
def test_bad_options_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*SMALL, *argv, "--out", "/nonexistent/never"])
    assert message in str(exit_info.value.code) + capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny two-layer ListOps model trained 10 steps with MRA-2."""
    from hydra.core.global_hydra import GlobalHydra

    from mra_lra.train import run

    run_dir = tmp_path_factory.mktemp("run")
    overrides = [*TINY, "attn=mra", "trainer.max_steps=10", "logger=none"]
    run(compose_train_cfg(overrides, run_dir, tmp_path_factory.mktemp("data")))
    GlobalHydra.instance().clear()
    return run_dir


def test_captures_every_layer_of_a_trained_run(trained_run, tmp_path):
    rows = main(
        [
            "--run", str(trained_run), "--examples", "5", "--seeds", "0", "--repeats", "1",
            "--attn", "softmax,mra,yoso", "--sweep", "mra.block_per_row=1,4",
            "--out", str(tmp_path), "--maps", "--maps-layer", "1",
        ]
    )  # fmt: skip
    cfg = OmegaConf.load(trained_run / "config.yaml")
    assert {r["layer"] for r in rows} == set(range(cfg.model.n_layers))
    assert {(r["batch"], r["n"], r["heads"]) for r in rows} == {(5, 128, cfg.model.n_heads)}
    for r in rows:
        if r["attn"] != "yoso":
            exact = r["attn"] == "softmax" or r["setting"] == "block_per_row=4"
            assert (r["rel_error"] < 1e-5) == exact, r
    assert "| mra | block_per_row=1 | " in (tmp_path / "approximation.md").read_text()
    assert (tmp_path / "approximation_maps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_options_resolve_the_runs_task_priors(trained_run):
    cfg = OmegaConf.load(trained_run / "config.yaml")
    options = run_options("mra_s", cfg)
    priors = cfg.task.mra_priors.sparse
    assert options["initial_prior_first_n_blocks"] == priors.first_n_blocks
    assert options["initial_prior_diagonal_n_blocks"] == priors.diagonal_n_blocks
    assert options["approx_mode"] == "sparse"


def test_missing_checkpoint_is_a_clear_error(trained_run):
    with pytest.raises(SystemExit, match="ckpt=last|not found"):
        main(["--run", str(trained_run), "--ckpt", "missing", "--attn", "mra"])
