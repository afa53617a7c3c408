"""Compiled Triton kernels against the torch path on a CUDA device, in every dtype.

Run by scripts/gpu_check.sh (`TRITON_INTERPRET=0 python3 -m pytest -m gpu`); skipped without CUDA.
Both paths choose the same blocks (on CUDA both take the selection statistics from the same
fused kernels, `mra.statistics`), so they compute the same function; the torch path computes in
float32 whatever the input dtype.
"""

from __future__ import annotations

import pytest
import torch

from mra_lra.attention.mra import MRAOptions, launch, mra2_attention, selection, statistics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(launch.INTERPRET, reason="TRITON_INTERPRET=1; run with TRITON_INTERPRET=0"),
]

# Largest |error| over the largest |reference entry|. Half precision: the kernels round P and dS
# to the input dtype before their second matmul (as FlashAttention does); the torch path does not.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
BLOCK_PER_ROW = 8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def inputs(batch, heads, n, d, dtype, pad, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, cot = (
        torch.randn(batch, heads, n, d, device="cuda", generator=gen).to(dtype) for _ in range(4)
    )
    mask = torch.ones(batch, n, device="cuda")
    if pad:
        mask[-1, n - pad :] = 0
    return q, k, v, mask, cot


def run(q, k, v, mask, cot, backend, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = mra2_attention(q, k, v, mask, backend=backend, **kwargs)
    return out, torch.autograd.grad(out, (q, k, v), cot)


def check_against_torch(q, k, v, mask, cot, tol, **kwargs):
    out, grads = run(q, k, v, mask, cot, "triton", **kwargs)
    ref_out, ref_grads = run(q, k, v, mask, cot, "torch", **kwargs)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    errors = {"out": rel_err(out, ref_out)}
    errors.update({f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads, strict=True)})
    print(
        f"{q.dtype} {list(q.shape)} {kwargs}: "
        + ", ".join(f"{k} {e:.1e}" for k, e in errors.items())
    )
    assert max(errors.values()) < tol, errors


@pytest.mark.parametrize(
    "dtype, n, d, mode, pad",
    [
        (torch.float32, 1024, 64, "full", 100),
        (torch.float32, 4000, 32, "sparse", 300),
        (torch.float32, 16384, 128, "full", 0),
        (torch.float16, 4096, 64, "full", 500),
        (torch.float16, 1024, 128, "sparse", 0),
        (torch.float16, 16384, 32, "sparse", 1000),
        (torch.bfloat16, 4000, 128, "full", 77),
        (torch.bfloat16, 16384, 64, "full", 2000),
        (torch.bfloat16, 1024, 32, "sparse", 0),
    ],
)
def test_matches_torch_path(dtype, n, d, mode, pad):
    q, k, v, mask, cot = inputs(2, 2, n, d, dtype, pad)
    nb = -(-n // 32)
    check_against_torch(
        q, k, v, mask, cot, TOLERANCE[dtype], num_blocks=nb * BLOCK_PER_ROW, approx_mode=mode
    )


@pytest.mark.parametrize("rows", [2, 4])
@pytest.mark.parametrize("dtype, mode", [(torch.float32, "sparse"), (torch.bfloat16, "full")])
def test_multi_row_query_tiles(rows, dtype, mode):
    q, k, v, mask, cot = inputs(2, 2, 4000, 64, dtype, pad=300)
    kw = dict(num_blocks=125 * BLOCK_PER_ROW, approx_mode=mode, query_rows=rows)
    check_against_torch(q, k, v, mask, cot, TOLERANCE[dtype], **kw)


@pytest.mark.parametrize(
    "rows, per_step, dtype, mode",
    [
        (1, 2, torch.float32, "full"),
        (1, 4, torch.bfloat16, "sparse"),
        (1, 4, torch.bfloat16, "full"),
        (2, 2, torch.float16, "full"),
    ],
)
def test_gathered_steps(rows, per_step, dtype, mode):
    """Several chosen blocks per kernel loop step (attn.blocks_per_step)."""
    q, k, v, mask, cot = inputs(2, 2, 4000, 64, dtype, pad=300)
    kw = dict(num_blocks=125 * BLOCK_PER_ROW, approx_mode=mode)
    kw.update(query_rows=rows, blocks_per_step=per_step)
    check_against_torch(q, k, v, mask, cot, TOLERANCE[dtype], **kw)


def test_largest_tiles_at_head_dim_128():
    """128-row tiles gathering 4 blocks at d = 128 in bf16, whose backward would pass Hopper's
    shared memory: it gathers fewer (launch.backward_group) and computes the same gradients.
    (The sm_90 compile test on CPU checks every such case's shared memory; fp32 is left to it
    and to the interpreter, to keep this check's compile time down.)"""
    q, k, v, mask, cot = inputs(1, 2, 1024, 128, torch.bfloat16, pad=100)
    kw = dict(num_blocks=32 * BLOCK_PER_ROW, approx_mode="full", query_rows=4, blocks_per_step=4)
    check_against_torch(q, k, v, mask, cot, TOLERANCE[torch.bfloat16], **kw)


def test_more_slices_than_a_grid_axis_holds():
    """B * H = 65,600 slices (CUDA caps a grid's second axis at 65,535): the flat grids run."""
    q, k, v, mask, cot = inputs(8200, 8, 64, 16, torch.bfloat16, pad=10)
    check_against_torch(q, k, v, mask, cot, TOLERANCE[torch.bfloat16], num_blocks=3)


def test_eager_call_after_capturing_a_new_shape_in_a_cuda_graph():
    """A shape first seen inside a CUDA-graph capture, then run eagerly before any replay: the
    eager call must not take cached block-row bounds that the capture left unfilled."""
    kw = dict(num_blocks=16 * 3, approx_mode="sparse", backend="triton")
    warm = inputs(1, 2, 1024, 64, torch.float32, pad=0)[:3]
    mra2_attention(*warm, None, **kw)  # compiles the kernels and warms the libraries up
    q, k, v = inputs(1, 2, 512, 64, torch.float32, pad=0)[:3]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mra2_attention(q, k, v, None, **kw)
    eager = mra2_attention(q, k, v, None, **kw)
    reference = mra2_attention(q, k, v, None, **{**kw, "backend": "torch"})
    assert rel_err(eager, reference) < TOLERANCE[torch.float32]
    graph.replay()
    assert rel_err(captured, reference) < TOLERANCE[torch.float32]


def test_priors():
    q, k, v, mask, cot = inputs(1, 4, 2048, 64, torch.bfloat16, pad=40)
    kw = dict(num_blocks=64 * 4, initial_prior_first_n_blocks=1, initial_prior_diagonal_n_blocks=1)
    check_against_torch(q, k, v, mask, cot, TOLERANCE[torch.bfloat16], approx_mode="full", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_selection_against_torch_selection(dtype):
    """The statistics kernels against selection.prepare's torch ops on the GPU: the same values
    up to float32 rounding, and (with 16k tokens, 262,144 candidate blocks per slice) the same
    chosen blocks except where two candidates are within rounding of the threshold."""
    q, k, v, mask, _ = inputs(2, 2, 16384, 64, dtype, pad=700)
    qp, kp, vp, mp = selection.pad_to_blocks(q, k, v, mask, 32)
    options = MRAOptions(initial_prior_first_n_blocks=1, initial_prior_diagonal_n_blocks=1)
    args = (qp, kp, vp, mp, 512 * BLOCK_PER_ROW, options, True)
    got, *got_stats = statistics(*args, kernels=True)
    want, *want_stats = statistics(*args, kernels=False)
    for a, b in zip(got_stats, want_stats, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.coarse, want.coarse, rtol=1e-5, atol=1e-4)
    differ = (got.excluded != want.excluded).sum().item()
    print(f"{dtype}: {differ} of {got.excluded.numel()} block decisions differ")
    assert differ <= 8


def test_backward_is_deterministic():
    q, k, v, mask, cot = inputs(1, 2, 4096, 64, torch.bfloat16, pad=0)
    kw = dict(num_blocks=128 * BLOCK_PER_ROW, approx_mode="full")
    first = run(q, k, v, mask, cot, "triton", **kw)[1]
    second = run(q, k, v, mask, cot, "triton", **kw)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_65536_tokens():
    """One 64k-token slice pair, forward and backward, against the torch path."""
    torch.cuda.reset_peak_memory_stats()
    q, k, v, mask, cot = inputs(1, 2, 65536, 64, torch.bfloat16, pad=1000)
    out, grads = run(q, k, v, mask, cot, "triton", num_blocks=2048 * BLOCK_PER_ROW)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"65536 tokens, B=1, H=2, d=64, bf16: peak {peak:.2f} GiB")
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    del out, grads
    check_against_torch(
        q, k, v, mask, cot, TOLERANCE[torch.bfloat16], num_blocks=2048 * BLOCK_PER_ROW
    )
