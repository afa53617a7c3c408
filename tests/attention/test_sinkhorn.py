"""Sparse Sinkhorn attention against float64 dense references: with a forced hard block
permutation it is two dense masked softmaxes (own block, picked block) added; with its learned
soft sorting, attention over the P-weighted mix of blocks."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import dense_softmax, random_qkv

B, H, D = 2, 2, 16
CONTEXT = {"head_dim": D, "num_heads": H, "max_length": 128}
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "sinkhorn.yaml"


def make(**options):
    return build("sinkhorn", context=CONTEXT, **options).double()


def test_config_holds_the_lra_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {
        "name": "sinkhorn",
        "block_size": 50,
        "sort_activation": "softmax",
        "sinkhorn_iterations": 1,
        "temperature": 1.0,
    }
    attn = build(
        cfg.pop("name"), context={"head_dim": 64, "num_heads": 8, "max_length": 2001}, **cfg
    )
    assert attn.sort_net.shape == (64, 41)  # one column per block of max_length, shared by heads
    with pytest.raises(ValueError, match="max_length"):
        build("sinkhorn")
    with pytest.raises(ValueError, match="sort_activation"):
        make(sort_activation="gumbel_sinkhorn")


@pytest.mark.parametrize("n,block,pad_from", [(64, 16, None), (100, 16, 61), (37, 8, 20)])
def test_forced_permutation_is_two_dense_softmaxes(monkeypatch, n, block, pad_from):
    """P forced to a hard permutation pi (one per head): each query attends to its own block and,
    separately, to the real keys of block pi(its block); the two outputs add."""
    q, k, v, mask = random_qkv((B, H, n, D), pad_from=pad_from)
    nb = math.ceil(n / block)
    g = torch.Generator().manual_seed(3)
    perms = torch.stack([torch.randperm(nb, generator=g) for _ in range(H)])  # [H, nb]
    forced = torch.zeros(B, H, nb, nb, dtype=torch.float64)
    for h in range(H):
        forced[:, h, torch.arange(nb), perms[h]] = 1.0
    attn = make(block_size=block)
    monkeypatch.setattr(attn, "permutation", lambda scores, real: forced)

    blk = torch.arange(n) // block
    own = blk[:, None] == blk[None, :]  # [n, n]
    picked = perms[:, blk][:, :, None] == blk[None, None, :]  # [H, n, n]
    ref = dense_softmax(q, k, v, mask, allowed=own) + dense_softmax(q, k, v, mask, allowed=picked)
    torch.testing.assert_close(attn(q, k, v, mask), ref, atol=1e-12, rtol=1e-12)


def reference_soft_sort(attn, q, k, v, mask):
    """The method's formulas, token by token in float64: P from the sums of each block's real
    keys through W (softmax over blocks holding a real token), the sorted block's slot s the
    P-weighted sum of slot s of every block, and a slot used only if a real token enters it."""
    q, k, v, mask = q.double(), k.double(), v.double(), mask.double()
    b = attn.block_size
    n = q.shape[2]
    nb = math.ceil(n / b)
    w = attn.sort_net.detach().double()
    out = torch.zeros_like(q)
    for bi in range(q.shape[0]):
        real = [mask[bi, i] > 0 for i in range(n)]
        blocks = [list(range(j * b, min((j + 1) * b, n))) for j in range(nb)]
        real_blocks = [j for j in range(nb) if any(real[i] for i in blocks[j])]
        for h in range(q.shape[1]):
            sums = torch.stack(
                [
                    sum((k[bi, h, i] for i in blocks[j] if real[i]), torch.zeros(D))
                    for j in range(nb)
                ]
            )
            for blk in real_blocks:
                scores = torch.stack([sums[blk] @ w[:, j] for j in real_blocks])
                p = dict(zip(real_blocks, torch.softmax(scores, dim=0), strict=True))
                slots = []  # (key, value) of each sorted slot that a real token enters
                for s in range(b):
                    entering = [j for j in real_blocks if j * b + s < n and real[j * b + s]]
                    if entering:
                        key = sum(p[j] * k[bi, h, j * b + s] for j in entering)
                        value = sum(p[j] * v[bi, h, j * b + s] for j in entering)
                        slots.append((key, value))
                sorted_k = torch.stack([kv[0] for kv in slots])
                sorted_v = torch.stack([kv[1] for kv in slots])
                own = [i for i in blocks[blk] if real[i]]
                for i in own:
                    qi = q[bi, h, i] / math.sqrt(D)
                    a = torch.softmax(torch.stack([qi @ k[bi, h, j] for j in own]), dim=0)
                    local = sum(a_j * v[bi, h, j] for a_j, j in zip(a, own, strict=True))
                    out[bi, h, i] = local + torch.softmax(sorted_k @ qi, dim=0) @ sorted_v
    return out


@pytest.mark.parametrize("n,block,pad_from", [(48, 16, None), (37, 8, 21)])
def test_learned_soft_sort_equals_its_formula(n, block, pad_from):
    q, k, v, mask = random_qkv((B, H, n, D), pad_from=pad_from)
    attn = make(block_size=block)
    torch.testing.assert_close(
        attn(q, k, v, mask), reference_soft_sort(attn, q, k, v, mask), atol=1e-12, rtol=1e-12
    )


def test_sinkhorn_normalises_rows_and_columns_over_real_blocks():
    nb = 6
    scores = torch.randn(2, H, nb, nb, generator=torch.Generator().manual_seed(0)).double() * 3
    real = torch.ones(2, nb, dtype=torch.bool)
    real[1, 4:] = False
    for iterations, tol in ((1, None), (200, 1e-9)):
        p = make(block_size=16, sort_activation="sinkhorn", sinkhorn_iterations=iterations)
        p = p.permutation(scores, real)
        assert (p[1, :, 4:] == 0).all() and (p[1, :, :, 4:] == 0).all()
        cols = p.sum(dim=-2)  # the last step of each iteration normalises the columns
        torch.testing.assert_close(cols[0], torch.ones(H, nb, dtype=torch.float64))
        torch.testing.assert_close(cols[1, :, :4], torch.ones(H, 4, dtype=torch.float64))
        if tol is not None:  # doubly stochastic at convergence
            rows = p.sum(dim=-1)
            torch.testing.assert_close(
                rows[0], torch.ones(H, nb, dtype=torch.float64), atol=tol, rtol=0
            )
            torch.testing.assert_close(
                rows[1, :, :4], torch.ones(H, 4, dtype=torch.float64), atol=tol, rtol=0
            )
    soft = make(block_size=16).permutation(scores, real)  # LRA's softmax: rows sum to 1
    torch.testing.assert_close(soft[0].sum(-1), torch.ones(H, nb, dtype=torch.float64))
    torch.testing.assert_close(soft[1, :, :4].sum(-1), torch.ones(H, 4, dtype=torch.float64))


def test_sorting_network_learns_only_the_columns_of_the_length_in_use():
    """Unlike LRA's einsum, which sums every block, the sort network gets a gradient (q, k, v
    gradients: tests/attention/test_contract.py)."""
    q, k, v, mask = random_qkv((B, H, 90, D), dtype=torch.float32, pad_from=70)
    attn = build("sinkhorn", context=CONTEXT, block_size=16)
    attn(q, k, v, mask).square().sum().backward()
    grad = attn.sort_net.grad
    assert grad[:, :6].abs().sum() > 0 and (grad[:, 6:] == 0).all()


def test_longer_than_max_length_fails():
    q, k, v, mask = random_qkv((B, H, 129, D))
    with pytest.raises(ValueError, match="max_length 128"):
        make(block_size=16)(q, k, v, mask)
