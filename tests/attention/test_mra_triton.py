"""The Triton kernels against the torch path and dense float64 references, in Triton's interpreter.

tests/conftest.py sets TRITON_INTERPRET=1, so the kernels run on CPU tensors; sizes stay small
(the interpreter pays milliseconds per tile step).
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton

from mra_lra.attention.mra import MRAOptions, launch, mra2_attention, selection, statistics
from mra_lra.attention.mra.launch import block_lists

B = 32  # MRA block size

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest entry of the reference b."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def inputs(batch, heads, n, d, dtype=torch.float32, pad=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, generator=gen).to(dtype) for _ in range(3))
    mask = torch.ones(batch, n)
    if pad:
        mask[-1, n - pad :] = 0  # the last sequence of the batch is padded
    cot = torch.randn(batch, heads, n, d, generator=gen).to(dtype)
    return q, k, v, mask, cot


def run(fn, q, k, v, mask, cot, **kwargs):
    """Output and (dq, dk, dv) for the cotangent `cot`."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, mask, **kwargs)
    return out, torch.autograd.grad(out, (q, k, v), cot.to(out.dtype))


def mra(backend):
    return lambda q, k, v, mask, **kw: mra2_attention(q, k, v, mask, backend=backend, **kw)


def triton_path(q, k, v, mask=None, **kw):
    return mra2_attention(q, k, v, mask, backend="triton", **kw)


def dense_reference(q, k, v, mask, allowed_blocks=None):
    """Softmax attention in float64 where query i sees key j if j is real and block
    (i // B, j // B) is allowed; padded queries output zero."""
    q, k, v = q.double(), k.double(), v.double()
    n, d = q.shape[-2:]
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    see = mask[:, None, None, :].bool()
    if allowed_blocks is not None:
        tok = torch.arange(n) // B
        see = see & allowed_blocks[tok[:, None], tok[None, :]]
    p = torch.softmax(s.masked_fill(~see, float("-inf")), dim=-1).nan_to_num(0.0)
    return (p @ v) * mask[:, None, :, None].double()


def assert_close(got, want, tol):
    out, grads = got
    ref_out, ref_grads = want
    assert rel_err(out, ref_out) < tol, "forward"
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert rel_err(g, r) < tol, f"d{name}"


@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize(
    "dtype, n, d, pad, num_blocks",
    [
        (torch.float32, 128, 16, 0, 6),
        (torch.float32, 100, 64, 30, 7),  # n not a multiple of 32, last block mostly padding
        (torch.float32, 77, 48, 10, 4),  # head dim not a power of two
        (torch.float16, 96, 32, 20, 5),
        (torch.bfloat16, 96, 32, 20, 5),
    ],
)
def test_matches_torch_path(mode, dtype, n, d, pad, num_blocks):
    q, k, v, mask, cot = inputs(2, 2, n, d, dtype, pad=pad)
    kw = dict(num_blocks=num_blocks, approx_mode=mode)
    got = run(mra("triton"), q, k, v, mask, cot, **kw)
    want = run(mra("torch"), q, k, v, mask, cot, **kw)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
    assert_close(got, want, TOLERANCE[dtype])


def test_more_block_rows_than_one_coarse_tile():
    """35 block rows: the coarse kernels walk two row tiles and two column steps (every other
    interpreter test fits in one)."""
    q, k, v, mask, cot = inputs(1, 1, 1100, 16, pad=70)
    kw = dict(num_blocks=35 * 3, approx_mode="full", initial_prior_first_n_blocks=1)
    assert_close(
        run(mra("triton"), q, k, v, mask, cot, **kw),
        run(mra("torch"), q, k, v, mask, cot, **kw),
        1e-5,
    )


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_forward_without_gradients_matches_torch_path(mode):
    """Eval and inference: no grad, so the transposed lists are not built."""
    q, k, v, mask, _ = inputs(1, 2, 100, 32, pad=30)
    kw = dict(num_blocks=7, approx_mode=mode)
    with torch.no_grad():
        got = mra("triton")(q, k, v, mask, **kw)
        want = mra("torch")(q, k, v, mask, **kw)
    assert rel_err(got, want) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize("rows", [2, 4])
def test_multi_row_query_tiles_match_torch_path(mode, rows):
    """64- and 128-row query tiles over the union of their blocks, with a partial last tile."""
    q, k, v, mask, cot = inputs(1, 2, 200, 32, pad=40)
    kw = dict(num_blocks=12, approx_mode=mode, initial_prior_diagonal_n_blocks=1)
    got = run(mra("triton"), q, k, v, mask, cot, query_rows=rows, **kw)
    want = run(mra("torch"), q, k, v, mask, cot, **kw)
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize("rows, per_step", [(1, 2), (1, 4), (2, 4)])
def test_gathered_steps_match_torch_path(mode, rows, per_step):
    """Several chosen blocks per loop step; list lengths (1 to 4 here) that are not multiples of
    the group leave slots past the list's end."""
    q, k, v, mask, cot = inputs(1, 2, 200, 32, pad=40)
    kw = dict(num_blocks=13, approx_mode=mode, initial_prior_diagonal_n_blocks=1)
    per = dict(query_rows=rows, blocks_per_step=per_step)
    got = run(mra("triton"), q, k, v, mask, cot, **per, **kw)
    want = run(mra("torch"), q, k, v, mask, cot, **kw)
    assert_close(got, want, 1e-5)


def test_backward_gathers_fewer_where_tiles_pass_shared_memory():
    """The settings whose backward tiles passed Hopper's shared memory (compiled for sm_90) gather
    fewer blocks per step there; the rest keep attn.blocks_per_step."""
    dkdv = functools.partial(launch.backward_group, "dkdv")
    assert [dkdv(4, 4, 32, 128, 2), dkdv(4, 2, 32, 128, 4), dkdv(4, 4, 32, 64, 4)] == [2, 1, 2]
    assert [dkdv(1, 4, 32, 128, 4), dkdv(2, 4, 32, 128, 2), dkdv(4, 4, 32, 32, 4)] == [4, 4, 4]
    dq = functools.partial(launch.backward_group, "dq")
    assert [dq(4, 4, 32, 128, 4), dq(4, 4, 32, 128, 2), dq(4, 2, 32, 128, 4)] == [2, 4, 2]


def test_fewer_gathered_blocks_in_the_backward_match_torch_path():
    """fp32, d = 64, 128-row tiles gathering 4 blocks: the backward takes 2 per step."""
    q, k, v, mask, cot = inputs(1, 2, 200, 64, pad=40)
    kw = dict(num_blocks=13, approx_mode="full", initial_prior_diagonal_n_blocks=1)
    assert launch.backward_group("dkdv", 4, 4, 32, 64, q.element_size()) == 2
    got = run(mra("triton"), q, k, v, mask, cot, query_rows=4, blocks_per_step=4, **kw)
    want = run(mra("torch"), q, k, v, mask, cot, **kw)
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize("pad", [0, 45])
def test_every_block_chosen_is_softmax(mode, pad):
    q, k, v, mask, cot = inputs(2, 1, 96, 32, pad=pad)
    got = run(mra("triton"), q, k, v, mask, cot, num_blocks=9, approx_mode=mode)
    want = run(dense_reference, q.double(), k.double(), v.double(), mask, cot.double())
    assert rel_err(got[0], want[0]) < 1e-5
    for g, r in zip(got[1], want[1], strict=True):
        assert rel_err(g, r) < 1e-5


def test_block_constant_queries_and_keys_full_mode_is_exact():
    """exp of the average score equals the average of exp when q, k are constant per block.

    k_sel 6 > nb 4 and 3 < nb (every row max of P is 0: a budget below nb cuts among ties, which
    M = the chosen set survives). Forward only: the coarse gradient reaches q, k through their
    block means, which differs from the per-token gradient of softmax."""
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 2, 4, 16, generator=gen).repeat_interleave(B, dim=2) for _ in range(2))
    v = torch.randn(1, 2, 4 * B, 16, generator=gen)
    mask = torch.ones(1, 4 * B)
    for budget in (6, 3):
        out = mra2_attention(q, k, v, mask, num_blocks=budget, approx_mode="full", backend="triton")
        assert rel_err(out, dense_reference(q, k, v, mask)) < 1e-5, budget


def test_sparse_rows_without_chosen_blocks_output_zero():
    """F = 1 with one block: only (0, 0) is chosen, every other query row outputs exactly 0."""
    q, k, v, mask, cot = inputs(1, 2, 128, 16)
    kw = dict(num_blocks=1, approx_mode="sparse", initial_prior_first_n_blocks=1)
    out, grads = run(mra("triton"), q, k, v, mask, cot, **kw)
    assert torch.equal(out[:, :, B:], torch.zeros_like(out[:, :, B:]))
    allowed = torch.zeros(4, 4, dtype=torch.bool)
    allowed[0, 0] = True
    ref_out, ref_grads = run(dense_reference, q, k, v, mask, cot, allowed_blocks=allowed)
    assert rel_err(out, ref_out) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize(
    "first, diagonal, num_blocks, allowed",
    [
        (0, 1, 4, torch.eye(4, dtype=torch.bool)),  # D = 1, k_sel = nb: the diagonal
        (1, 0, 7, (torch.arange(4)[:, None] == 0) | (torch.arange(4)[None, :] == 0)),  # row/col 0
    ],
)
def test_priors_choose_their_blocks(first, diagonal, num_blocks, allowed):
    q, k, v, mask, cot = inputs(2, 2, 120, 16, pad=6)  # padding stays inside the last block
    kw = dict(
        num_blocks=num_blocks,
        approx_mode="sparse",
        initial_prior_first_n_blocks=first,
        initial_prior_diagonal_n_blocks=diagonal,
    )
    got = run(mra("triton"), q, k, v, mask, cot, **kw)
    want = run(dense_reference, q, k, v, mask, cot, allowed_blocks=allowed)
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_autocast_keeps_statistics_in_float32(mode):
    """Under bfloat16 autocast (mixed-precision training) the result equals the torch path on
    the same bfloat16 inputs outside autocast."""
    q, k, v, mask, cot = inputs(1, 2, 96, 32, torch.bfloat16, pad=20)
    kw = dict(num_blocks=5, approx_mode=mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(mra("triton"), q, k, v, mask, cot, **kw)
    want = run(mra("torch"), q, k, v, mask, cot, **kw)
    assert_close(got, want, TOLERANCE[torch.bfloat16])


def test_backward_is_deterministic():
    q, k, v, mask, cot = inputs(1, 2, 96, 16, pad=10)
    first = run(mra("triton"), q, k, v, mask, cot, num_blocks=6, approx_mode="full")[1]
    second = run(mra("triton"), q, k, v, mask, cot, num_blocks=6, approx_mode="full")[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(
    "n, pad, first, diagonal, dtype",
    [
        (96, 0, 0, 0, torch.float32),  # no padding: the penalty is skipped
        (200, 40, 1, 1, torch.float32),
        (1100, 70, 1, 0, torch.float32),  # 35 block rows: a full and a partial coarse tile
        (160, 20, 0, 3, torch.bfloat16),
    ],
)
def test_fused_selection_equals_torch_selection(n, pad, first, diagonal, dtype):
    """The statistics kernels (every MRA path's on a GPU) against selection.prepare."""
    q, k, v, mask, _ = inputs(2, 2, n, 32, dtype, pad=pad)
    qp, kp, vp, mp = selection.pad_to_blocks(q, k, v, None if pad == 0 else mask, B)
    nb = qp.shape[2] // B
    options = MRAOptions(
        block_size=B, initial_prior_first_n_blocks=first, initial_prior_diagonal_n_blocks=diagonal
    )
    args = (qp, kp, vp, mp, 3 * nb, options, pad > 0)
    got_sel, *got = statistics(*args, kernels=True)
    want_sel, *want = statistics(*args, kernels=False)
    assert torch.equal(got_sel.block_idx, want_sel.block_idx)
    assert torch.equal(got_sel.excluded, want_sel.excluded)
    assert torch.equal(got_sel.counts, want_sel.counts)
    for name in ("coarse", "row_max"):
        torch.testing.assert_close(getattr(got_sel, name), getattr(want_sel, name))
    for a, b in zip(got, want, strict=True):  # qbar, kbar, vbar
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)


def test_block_lists():
    # One slice, nb = 3, chosen blocks (I, J): (0, 1), (0, 2), (1, 1), (2, 0).
    idx = torch.tensor([[[0 * 3 + 1, 0 * 3 + 2, 1 * 3 + 1, 2 * 3 + 0]]])
    lists = block_lists(idx, 3)
    # One row per tile: the sorted flat indices are the forward list; a stable sort by key
    # block gives the transposed one (J = entry mod 3, I = entry div 3).
    assert lists.indexed and (lists.ptr_stride, lists.list_stride) == (4, 4)
    assert lists.tile_ptr.tolist() == [[0, 2, 3, 4]]
    assert (lists.tile_cols % 3).tolist() == [[1, 2, 1, 0]]
    assert lists.key_ptr.tolist() == [[0, 1, 3, 4]]
    assert (lists.key_tiles // 3).tolist() == [[2, 0, 1, 0]]
    # Two block rows per tile: tile 0 = rows {0, 1}, tile 1 = row {2}.
    lists = block_lists(idx, 3, rows=2)
    # Entries past the last pointer are unused (room for k_sel entries per slice).
    assert lists.tile_ptr.tolist() == [0, 2, 3]
    assert lists.tile_cols[:3].tolist() == [1, 2, 0]
    assert lists.tile_bits[:3].tolist() == [0b11, 0b01, 0b01]
    assert lists.key_ptr.tolist() == [0, 1, 2, 3]
    assert lists.key_tiles[:3].tolist() == [1, 0, 0]
    assert lists.key_bits[:3].tolist() == [0b01, 0b11, 0b01]
    # Without gradients the transposed lists are left out; the forward ones are the same.
    forward_only = block_lists(idx, 3, rows=2, transposed=False)
    assert forward_only.key_ptr is None and forward_only.key_tiles is None
    assert forward_only.tile_ptr.tolist() == [0, 2, 3]


def global_csr(ptr, entries, lists, key):
    """A row-path list (per-slice pointers, flat-index entries) as the general builder lays it
    out: one CSR over all slices, block / tile numbers."""
    G, k = entries.shape
    starts = ptr[:, :-1].long() + lists.list_stride * torch.arange(G)[:, None]
    flat_ptr = torch.cat([starts.flatten(), torch.tensor([G * k])])
    nb = ptr.shape[1] - 1
    values = entries % nb if key == "cols" else entries // nb
    return flat_ptr.tolist(), values.flatten().tolist()


@pytest.mark.parametrize("nb, k_sel", [(1, 1), (5, 7), (9, 30), (16, 256)])
def test_row_lists_equal_the_general_construction(nb, k_sel):
    """One row per tile takes a shortcut (searchsorted over the sorted indices, a stable sort
    for the transposed lists, no dedupe); it must give the general builder's lists, including
    block rows and columns left empty."""
    gen = torch.Generator().manual_seed(nb)
    idx = torch.stack([torch.randperm(nb * nb, generator=gen)[:k_sel] for _ in range(6)])
    idx = idx.sort(dim=-1).values.view(2, 3, k_sel)
    fast = launch._row_lists(idx, nb, transposed=True)
    assert fast.indexed and fast.tile_ptr.dtype == fast.key_ptr.dtype == torch.int32
    flat = idx.reshape(6, k_sel)
    I, J = flat // nb, flat % nb
    ones = torch.ones_like(I)
    tile_ptr, tile_cols, _ = launch._compress(I, J, ones, nb, nb)
    key_ptr, key_tiles, _ = launch._compress(J, I, ones, nb, nb)
    assert global_csr(fast.tile_ptr, fast.tile_cols, fast, "cols") == (
        tile_ptr.tolist(),
        tile_cols.tolist(),
    )
    assert global_csr(fast.key_ptr, fast.key_tiles, fast, "tiles") == (
        key_ptr.tolist(),
        key_tiles.tolist(),
    )


@pytest.mark.parametrize("rows, group, warps", [(1, 1, [2, 4]), (1, 4, [4, 8]), (4, 2, [8])])
def test_autotune_keeps_warps_that_fit_the_tile(rows, group, warps):
    """MRA_TRITON_AUTOTUNE (GPU only) tries num_warps between the tile's 32-row units and 4x."""
    configs = [triton.Config({}, num_warps=w) for w in (2, 4, 8)]
    kept = launch._prune_configs(configs, {"ROWS": rows}, GROUP=group)
    assert [c.num_warps for c in kept] == warps


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(launch, "INTERPRET", False)
    q = torch.zeros(1, 1, 32, 16)
    with pytest.raises(RuntimeError, match="backend='torch'"):
        triton_path(q, q, q, num_blocks=1)


@pytest.mark.parametrize(
    "triton_version, numpy_version, fails",
    [
        ("3.6.0", "2.4.6", True),
        ("3.2.0", "2.4.0", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.0", "2.4.6", False),
        ("3.9.0", "2.4.6", False),
        ("3.10.0", "3.0.0", False),
        ("unknown", "2.4.6", False),
    ],
)
def test_interpreter_version_check(monkeypatch, triton_version, numpy_version, fails):
    """Triton <= 3.6's interpreter breaks on numpy >= 2.4 (seen: 3.6.0 with 2.4.6); say so."""
    problem = launch.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == fails
    if fails:
        assert "triton>=3.7" in problem and "numpy<2.4" in problem
        monkeypatch.setattr(launch, "interpreter_problem", lambda *_: problem)
        q = torch.zeros(1, 1, 32, 16)
        with pytest.raises(RuntimeError, match="numpy<2.4"):
            triton_path(q, q, q, num_blocks=1)


def test_rejects_unsupported_inputs():
    q = torch.zeros(1, 1, 32, 16)
    with pytest.raises(ValueError, match="block_size"):
        triton_path(q, q, q, num_blocks=1, block_size=24)
    wide = torch.zeros(1, 1, 256, 128)  # 4 x 64 query rows of fp32 at d = 128: 128 KiB tiles
    with pytest.raises(ValueError, match="more shared memory.*lower attn.query_rows"):
        triton_path(wide, wide, wide, num_blocks=1, block_size=64, query_rows=4)
    with pytest.raises(ValueError, match="head dims"):
        big = torch.zeros(1, 1, 32, 192)
        triton_path(big, big, big, num_blocks=1)
    with pytest.raises(TypeError, match="float32"):
        triton_path(q.double(), q.double(), q.double(), num_blocks=1)
    with pytest.raises(ValueError, match=r"attn\.query_rows must be one of \(1, 2, 4\), got 3"):
        triton_path(q, q, q, num_blocks=1, query_rows=3)
    with pytest.raises(ValueError, match=r"attn\.blocks_per_step must be one of"):
        triton_path(q, q, q, num_blocks=1, blocks_per_step=8)


# The interpreter runs the Python of a kernel, not Triton's compiler: this compiles the kernels
# for Hopper (sm_90) with Triton's bundled ptxas, no GPU needed, so that code only the compiler
# rejects (non-constexpr shapes, mismatched loop-carried types) fails here and not on the GPU.
COMPILE_FOR_HOPPER = """
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from mra_lra.attention.mra import kernels as K, launch

DTYPE_PTR = {"float32": "*fp32", "bfloat16": "*bf16"}
IO = {
    "_mra_fwd_kernel": ("Q K V Out", "Lse Mask RowMax Ol Nl", "TilePtr TileCols TileBits"),
    "_mra_bwd_dq_kernel": (
        "Q K V DO DQ", "Lse Delta Mask Counts DQbar", "TilePtr TileCols TileBits"
    ),
    "_mra_bwd_dkdv_kernel": (
        "Q K V DO DK DV", "Lse Delta Mask Counts DKbar DVbar", "KeyPtr KeyTiles KeyBits"
    ),
}


def compile_kernel(job):
    name, types, const, options = job
    fn = getattr(K, name)
    signature = {a: "constexpr" if a in const else types.get(a, "i32") for a in fn.arg_names}
    try:
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=const)
    except TypeError as error:  # another Triton's ahead-of-time API
        return f"SKIP {error}"
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert kernel.metadata.shared <= 227 * 1024, (name, const)
    return None


# (dtype, query_rows, padded head dim, blocks_per_step, kernels): the last two are the largest
# tiles, whose backward gathers fewer blocks (launch.backward_group) so as to fit in shared memory.
ALL = tuple(IO)
BACKWARD = ("_mra_bwd_dq_kernel", "_mra_bwd_dkdv_kernel")
CASES = [("bfloat16", 1, 64, 1, ALL), ("bfloat16", 1, 128, 4, ALL), ("float32", 2, 128, 2, ALL),
         ("bfloat16", 4, 32, 1, ALL), ("float32", 1, 64, 4, ALL),
         ("bfloat16", 4, 128, 4, BACKWARD), ("float32", 4, 128, 4, BACKWARD)]
jobs = []
for dtype, rows, d_pad, per_step, names in CASES:
    size = 4 if dtype == "float32" else 2
    for name in names:
        native, fp32, int32 = IO[name]
        group = per_step
        if name in BACKWARD:
            kernel = "dq" if name == "_mra_bwd_dq_kernel" else "dkdv"
            group = launch.backward_group(kernel, rows, per_step, 32, d_pad, size)
        indexed = rows == 1  # one row per tile: lists of flat int64 block indices
        const = dict(BLOCK=32, ROWS=rows, BLOCK_M=32 * rows, GROUP=group, D_PAD=d_pad,
                     UPCAST=False, PRECISION="ieee" if dtype == "float32" else "tf32",
                     FULL=rows != 2, INDEXED=indexed)
        entries = "*i64" if indexed else "*i32"
        lists = int32.split()
        types = {**dict.fromkeys(native.split(), DTYPE_PTR[dtype]),
                 **dict.fromkeys(fp32.split(), "*fp32"), lists[0]: "*i32" if indexed else "*i64",
                 **dict.fromkeys(lists[1:], entries), "sm_scale": "fp32"}
        options = launch._launch_settings(32 * rows * group, d_pad, size)
        jobs.append((name, types, const, options))
    if names != ALL:
        continue
    for full in (True, False):
        types = {"Out": DTYPE_PTR[dtype], "DO": DTYPE_PTR[dtype],
                 **dict.fromkeys("Mask Lse RowMax Delta U W".split(), "*fp32")}
        jobs.append(("_bwd_pre_kernel", types, dict(FULL=full, BLOCK=32, D_PAD=d_pad),
                     dict(num_warps=2)))
    stats = {**dict.fromkeys("Q K V".split(), DTYPE_PTR[dtype]),
             **dict.fromkeys("Mask Qbar Kbar Vbar Counts".split(), "*fp32")}
    jobs.append(("_block_stats_kernel", stats, dict(WITH_V=rows == 1, BLOCK=32, D_PAD=d_pad),
                 dict(num_warps=2)))
    logits = {**dict.fromkeys("Qbar Kbar Counts S P RowMax".split(), "*fp32"), "sm_scale": "fp32"}
    const = dict(PADDED=per_step != 2, PRIORS=rows != 4, BLOCK_I=launch.COARSE_TILE,
                 BLOCK_J=launch.COARSE_TILE, D_PAD=d_pad)
    jobs.append(("_coarse_logits_kernel", logits, const, dict(num_warps=4)))
    for store in (True, False):
        types = {**dict.fromkeys("S RowMax Counts Vbar A Ol Nl".split(), "*fp32"),
                 "Excluded": "*u8"}
        const = dict(STORE_A=store, BLOCK_I=launch.COARSE_TILE, BLOCK_J=launch.COARSE_TILE,
                     D_PAD=d_pad)
        jobs.append(("_coarse_fwd_kernel", types, const, dict(num_warps=4)))

if __name__ == "__main__":
    # Compiles are independent: one process per core (the test waits on this one meanwhile).
    fork = multiprocessing.get_context("fork")  # the jobs' function lives in this -c script
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=fork) as pool:
        for outcome in pool.map(compile_kernel, jobs):
            if outcome:
                raise SystemExit(outcome)
    print(f"compiled {len(jobs)} kernels")
"""


def test_kernels_compile_for_hopper():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(COMPILE_FOR_HOPPER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if "SKIP" in run.stderr:
        pytest.skip(f"triton {triton.__version__}: {run.stderr.strip()[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
