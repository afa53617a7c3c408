"""The MRA torch path against independent references (spec/mra.md, "Tests that pin it down")."""

import math

import pytest
import torch

from mra_lra.attention import build
from mra_lra.attention.mra import MRAOptions, mra2_attention, reference, selection
from tests.attention.dense import dense_softmax, random_qkv

B, H, D = 2, 2, 16


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    return random_qkv((B, H, n, D), seed, dtype, pad_from)


def chosen_selection(q, k, mask, num_blocks, b=32, first=0, diagonal=0):
    qp, kp, vp, mp = selection.pad_to_blocks(q, k, k, mask, b)
    options = MRAOptions(
        block_size=b, initial_prior_first_n_blocks=first, initial_prior_diagonal_n_blocks=diagonal
    )
    return selection.prepare(qp, kp, vp, mp, num_blocks, options)[0]


def dense_mra(q, k, v, mask, sel, mode, b=32):
    """MRA built densely from a fixed chosen set: fine scores in chosen blocks, the block-mean
    score on every real key of an unrefined block (full mode), softmax over all of it."""
    Bq, Hq, n, d = q.shape
    nb = math.ceil(n / b)
    pad = nb * b - n
    z = torch.nn.functional.pad
    m = z(mask.double(), (0, pad))
    q, k, v = (z(t.double(), (0, 0, 0, pad)) * m[:, None, :, None] for t in (q, k, v))
    counts = m.view(Bq, nb, b).sum(-1)
    qbar = q.view(Bq, Hq, nb, b, d).sum(3) / (counts[:, None, :, None] + 1e-6)
    kbar = k.view(Bq, Hq, nb, b, d).sum(3) / (counts[:, None, :, None] + 1e-6)
    fine = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d)
    coarse = torch.einsum("bhid,bhjd->bhij", qbar, kbar) / math.sqrt(d)
    coarse = coarse.repeat_interleave(b, 2).repeat_interleave(b, 3)
    chosen = torch.zeros(Bq, Hq, nb * nb, dtype=torch.bool)
    chosen.scatter_(-1, sel.block_idx, True)
    chosen = chosen.view(Bq, Hq, nb, nb).repeat_interleave(b, 2).repeat_interleave(b, 3)
    logits = torch.full_like(fine, float("-inf"))
    logits = torch.where(chosen, fine, logits)
    if mode == "full":  # every block not chosen is there at coarse resolution
        logits = torch.where(chosen, logits, coarse)
    logits = logits.masked_fill(m[:, None, None, :] == 0, float("-inf"))
    has_any = torch.isfinite(logits).any(-1, keepdim=True)
    probs = torch.softmax(torch.where(has_any, logits, torch.zeros_like(logits)), -1) * has_any
    out = torch.einsum("bhij,bhjd->bhid", probs, v) * m[:, None, :, None]
    return out[:, :, :n]


@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize("n,pad_from", [(128, None), (200, 150), (96, 17)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 2e-5)])
def test_all_blocks_equals_softmax(mode, n, pad_from, dtype, tol):
    q, k, v, mask = random_inputs(n, pad_from=pad_from, dtype=dtype)
    nb = math.ceil(n / 32)
    out = mra2_attention(q, k, v, mask, num_blocks=nb * nb, approx_mode=mode, backend="torch")
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), dense_softmax(q, k, v, mask), atol=tol, rtol=tol)


def test_block_constant_inputs_are_exact_in_full_mode():
    n, b = 256, 32
    nb = n // b
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, nb, 1, D, generator=g, dtype=torch.float64).expand(-1, -1, -1, b, -1)
    k = torch.randn(B, H, nb, 1, D, generator=g, dtype=torch.float64).expand(-1, -1, -1, b, -1)
    q, k = q.reshape(B, H, n, D), k.reshape(B, H, n, D)
    v = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    mask = torch.ones(B, n, dtype=torch.float64)
    # Any budget (spec). Below nb every row's maximum ties at P = 0: the published rule,
    # M = {P >= smallest chosen}, would put the tied rows' unchosen maxima in M and drop them from
    # both parts; ours keeps M = the chosen set.
    for budget in (1, 3, nb - 1, nb, 2 * nb + 3, 3 * nb):
        out = mra2_attention(q, k, v, mask, num_blocks=budget, approx_mode="full")
        torch.testing.assert_close(out, dense_softmax(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_prior_first_block_row_and_column():
    n = 256
    nb = n // 32
    q, k, _, mask = random_inputs(n, seed=3)
    sel = chosen_selection(q, k, mask, 2 * nb - 1, first=1)
    expected = {0 * nb + j for j in range(nb)} | {i * nb + 0 for i in range(nb)}
    for bi in range(B):
        for h in range(H):
            assert set(sel.block_idx[bi, h].tolist()) == expected


def test_prior_diagonal():
    n = 256
    nb = n // 32
    q, k, _, mask = random_inputs(n, seed=4)
    sel = chosen_selection(q, k, mask, nb, diagonal=1)
    expected = {i * nb + i for i in range(nb)}
    for bi in range(B):
        for h in range(H):
            assert set(sel.block_idx[bi, h].tolist()) == expected


def test_selection_is_one_global_top_k_not_per_row():
    # Block row 0 has zero queries, so its coarse row is flat: all of P[0, :] is 0, the top value
    # of every row. Other rows are sharply peaked. A global budget of 2 nb - 1 takes all of row 0
    # and only the maximum of every other row; k per row would give each row two.
    n, nb = 256, 8
    q, k, v, mask = random_inputs(n, seed=5)
    q[:, :, :32] = 0.0
    q[:, :, 32:] *= 20.0
    sel = chosen_selection(q, k, mask, 2 * nb - 1)
    rows = (sel.block_idx // nb).view(-1, 2 * nb - 1)
    counts = torch.stack([torch.bincount(r, minlength=nb) for r in rows])
    assert (counts[:, 0] == nb).all()
    assert (counts[:, 1:] == 1).all()


def test_sparse_rows_without_blocks_output_zero():
    n, nb = 256, 8
    q, k, v, mask = random_inputs(n, seed=6)
    sel = chosen_selection(q, k, mask, 3)
    out = mra2_attention(q, k, v, mask, num_blocks=3, approx_mode="sparse")
    rows_with_blocks = torch.zeros(B, H, nb, dtype=torch.bool)
    rows_with_blocks.scatter_(-1, sel.block_idx // nb, True)
    empty = ~rows_with_blocks.repeat_interleave(32, dim=-1)
    assert empty.any()
    assert (out[empty] == 0).all()
    assert (out[~empty].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize("n,pad_from,budget", [(256, None, 16), (200, 130, 10), (160, 97, 25)])
def test_forward_and_gradients_match_dense_reference(mode, n, pad_from, budget):
    q, k, v, mask = random_inputs(n, seed=7, pad_from=pad_from)
    sel = chosen_selection(q, k, mask, budget)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = mra2_attention(*inputs, mask, num_blocks=budget, approx_mode=mode)
    ref = dense_mra(*ref_inputs, mask, sel, mode)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    for got, want, name in zip(inputs, ref_inputs, "qkv", strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prior_boost_rounding_drops_no_block(backend):
    # The prior boost (5e3) is added to P in float32, which rounds P to steps of about 5e-4: here
    # an unchosen block of slice (0, 1) rounds onto the smallest chosen value. Under the published
    # rule, M = {P >= smallest chosen}, it fell out of both parts (output error 0.09 on 32 rows).
    n = 200
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).double() for _ in range(3))
    mask = torch.ones(B, n, dtype=torch.float64)
    mask[1, 120:] = 0
    sel = chosen_selection(q, k, mask, 15, first=1, diagonal=1)
    chosen = torch.zeros_like(sel.excluded).flatten(-2).scatter_(-1, sel.block_idx, True)
    assert torch.equal(sel.excluded, chosen.view_as(sel.excluded))
    dtype = torch.float64 if backend == "torch" else torch.float32
    out = mra2_attention(
        *(t.to(dtype) for t in (q, k, v)), mask, num_blocks=15, approx_mode="full",
        initial_prior_first_n_blocks=1, initial_prior_diagonal_n_blocks=1, backend=backend,
    )  # fmt: skip
    ref = dense_mra(q, k, v, mask, sel, "full")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_padding_does_not_leak(backend):
    n = 96
    q, k, v, mask = random_inputs(n, seed=9, pad_from=70)
    want = mra2_attention(q.float(), k.float(), v.float(), mask, num_blocks=6, backend=backend)
    for t, bad in zip((q, k, v), (float("inf"), float("nan"), float("-inf")), strict=True):
        t[1, :, 70:] = bad
    got = mra2_attention(q.float(), k.float(), v.float(), mask, num_blocks=6, backend=backend)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_second_derivatives_are_refused_not_silently_wrong(backend):
    q, k, v, mask = (t.float() for t in random_inputs(64, seed=10))
    q.requires_grad_(True)
    out = mra2_attention(q, k, v, mask, num_blocks=2, backend=backend)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


def test_padding_semantics():
    n = 200
    q, k, v, mask = random_inputs(n, seed=8, pad_from=120)
    out = mra2_attention(q, k, v, mask, num_blocks=12)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[1, :, 120:] = torch.randn_like(t[1, :, 120:]) * 10
    out2 = mra2_attention(q2, k2, v2, mask, num_blocks=12)
    torch.testing.assert_close(out, out2)
    assert (out[1, :, 120:] == 0).all()


def test_module_budget_and_bad_options():
    attn = build("mra", block_per_row=8)
    assert attn.num_blocks(2048) == 64 * 8
    assert attn.num_blocks(100) == 16  # 4 block rows: all 16 blocks
    assert build("mra_s").options.approx_mode == "sparse"
    with pytest.raises(ValueError, match="approx_mode"):
        build("mra", approx_mode="dense")
    with pytest.raises(ValueError, match="valid options"):
        build("mra", blocks_per_row=8)
    with pytest.raises(ValueError, match="valid names"):
        build("mra3")
    with pytest.raises(ValueError, match=r"attn\.query_rows must be one of \(1, 2, 4\)"):
        build("mra", query_rows=3)
    with pytest.raises(ValueError, match=r"attn\.blocks_per_step must be one of"):
        build("mra_s", blocks_per_step=0)


def fixed_selection_op(mask, sel, mode, b=32):
    """q, k, v -> MRA output with the chosen set, M and r held fixed but the coarse logits and
    block means recomputed from the (perturbed) inputs: the function gradcheck differentiates."""

    def op(q, k, v):
        n = q.shape[2]
        qp, kp, vp, mp = selection.pad_to_blocks(q, k, v, mask, b)
        qbar = selection.block_means(qp, sel.counts, b)
        kbar = selection.block_means(kp, sel.counts, b)
        S, _ = selection.coarse_logits(qbar, kbar, sel.counts)
        fixed = selection.Selection(sel.counts, S, sel.row_max, sel.block_idx, sel.excluded)
        vbar = selection.block_means(vp, sel.counts, b) if mode == "full" else None
        out = reference.mra2_torch(qp, kp, vp, mp, fixed, qbar, kbar, vbar)
        return out[:, :, :n]

    return op


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_gradcheck_float64_with_padding_and_an_empty_row(mode):
    # n = 66: three block rows, the last one of two tokens; batch 1 is padded from token 60, so
    # its last block is all padding. A budget of 2 blocks per slice leaves a block row without a
    # chosen block.
    n, budget = 66, 2
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 1, n, 2, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, n, dtype=torch.float64)
    mask[1, 60:] = 0
    sel = chosen_selection(q, k, mask, budget)
    rows_with_blocks = torch.zeros(2, 1, 3, dtype=torch.bool).scatter_(-1, sel.block_idx // 3, True)
    assert not rows_with_blocks.all()
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(fixed_selection_op(mask, sel, mode), inputs)


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_many_small_chunks_match_dense_reference(mode, monkeypatch):
    # Chunks of at most 3 blocks: most block rows span several chunks' worth of blocks, so this
    # runs the one-row-over-budget chunks and the chunk boundaries that the default size (one
    # chunk at these lengths) never reaches.
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 3 * 32 * 32)
    n, pad_from, budget = 224, 150, 20
    q, k, v, mask = random_inputs(n, seed=12, pad_from=pad_from)
    sel = chosen_selection(q, k, mask, budget)
    plan = reference._Plan(sel.block_idx, n // 32, 32, D)
    assert len(plan.chunks) > 4 and plan.max_chunk > 3
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = mra2_attention(*inputs, mask, num_blocks=budget, approx_mode=mode, backend="torch")
    ref = dense_mra(*ref_inputs, mask, sel, mode)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    for got, want, name in zip(inputs, ref_inputs, "qkv", strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_chunks_are_whole_block_rows():
    # Block rows of 2, 1, 3, 1, 3 and 2 chosen blocks (two slices of nb = 3 flattened), and an
    # empty last row.
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 5])
    # Greedy, whole rows, at most 3 blocks: rows 0-1, row 2, row 3 (row 4 would make 4), 4, 5.
    assert reference.chunk_bounds(rows, 7, 3) == [(0, 3), (3, 6), (6, 7), (7, 10), (10, 12)]
    # A row of more blocks than the budget gets a chunk of its own.
    assert reference.chunk_bounds(rows, 7, 2)[:3] == [(0, 2), (2, 3), (3, 6)]
    assert reference.chunk_bounds(torch.tensor([1, 1, 1]), 2, 2) == [(0, 3)]
    assert reference.chunk_bounds(rows, 7, 100) == [(0, 12)]


def test_no_mask_equals_an_all_ones_mask():
    # Without a mask and padding, pad_to_blocks hands q, k, v through uncopied.
    q, k, v, mask = random_inputs(96, seed=13)
    grads = []
    for m in (None, mask):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = mra2_attention(*inputs, m, num_blocks=4, approx_mode="full", backend="torch")
        out.square().sum().backward()
        grads.append([out.detach(), *(t.grad for t in inputs)])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_autocast_does_not_change_the_torch_path():
    # CPU training may run under bfloat16 autocast: the torch path keeps its float32 math (the
    # same chosen blocks, the same output and gradients) instead of failing or rounding.
    q, k, v, mask = random_inputs(200, seed=14, dtype=torch.float32, pad_from=150)
    results = []
    for enabled in (False, True):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = mra2_attention(*inputs, mask, num_blocks=12, backend="torch")
        out.square().sum().backward()
        results.append([out.detach(), *(t.grad for t in inputs)])
    assert results[1][0].dtype == torch.float32
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_backward_is_deterministic():
    # Long enough for the chunk ops to run on several threads, with padding.
    g = torch.Generator().manual_seed(15)
    q, k, v, grad = (torch.randn(2, 2, 2048, 32, generator=g) for _ in range(4))
    mask = torch.ones(2, 2048)
    mask[1, 1500:] = 0
    runs = []
    for _ in range(2):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = mra2_attention(*inputs, mask, num_blocks=64 * 8, backend="torch")
        runs.append(torch.autograd.grad(out, inputs, grad))
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_per_shape_cache_is_bypassed_while_a_cuda_graph_is_captured(monkeypatch):
    """Tensors made during a capture hold values only after a replay: never cache them."""
    made = []
    get = selection.cached_per_shape(lambda n, device: made.append(n) or object())
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    first, second = get(4, cuda), get(4, cuda)
    assert first is not second and made == [4, 4]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert get(4, cuda) is get(4, cuda) and get(4, cpu) is get(4, cpu)
    assert made == [4, 4, 4, 4]
