"""Synthesizer against float64 dense references: softmax of its synthetic logits (plus the dot
product where on) over the real keys, each term written out independently."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import random_qkv

B, H, D, L = 2, 2, 16, 128
CONTEXT = {"head_dim": D, "num_heads": H, "max_length": L}
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "synthesizer.yaml"


def make(**options):
    return build("synthesizer", context=CONTEXT, **options).double()


def masked_softmax_attention(logits, v, mask):
    """softmax over the real keys of [B, H, n, n] logits, times v; padded queries output 0."""
    logits = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    out = torch.einsum("bhij,bhjd->bhid", torch.softmax(logits, dim=-1), v)
    return out * mask[:, None, :, None]


def dot_logits(q, k):
    return torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])


def dense_logits(attn, q):
    """Row i from token i alone: relu(concatenated heads of q_i @ W1), split by head, @ W2."""
    w1, w2 = attn.dense1.detach(), attn.dense2.detach()
    n = q.shape[2]
    logits = torch.zeros(q.shape[0], H, n, n, dtype=q.dtype)
    for bi in range(q.shape[0]):
        for i in range(n):
            hidden = torch.relu(torch.cat([q[bi, h, i] for h in range(H)]) @ w1)
            for h in range(H):
                logits[bi, h, i] = hidden[h * D : (h + 1) * D] @ w2[:, :n]
    return logits


def test_config_holds_the_lra_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {
        "name": "synthesizer",
        "mode": "random",
        "dot_product": True,
        "factorized_rank": 32,
    }
    attn = build(
        cfg.pop("name"), context={"head_dim": 64, "num_heads": 8, "max_length": 2001}, **cfg
    )
    assert attn.random.shape == (8, 2001, 2001)  # one learned n x n matrix per head
    assert attn.random.abs().max() <= math.sqrt(3 / (8 * 2001))  # flax xavier_uniform's bound
    assert attn.random1 is None and attn.dense1 is None
    with pytest.raises(ValueError, match="max_length"):
        build("synthesizer")
    for mode in ("mixed", "random+factorized_random", "dense+dense"):
        with pytest.raises(ValueError, match="mode"):
            make(mode=mode)


@pytest.mark.parametrize("n,pad_from", [(64, None), (100, 61), (37, 20)])
def test_random_with_dot_product(n, pad_from):
    """LRA's setting: softmax(q k^T / sqrt(d) + R[:n, :n]) over the real keys."""
    q, k, v, mask = random_qkv((B, H, n, D), pad_from=pad_from)
    attn = make()
    with torch.no_grad():
        attn.random.normal_()  # larger than its initialisation, so the term shows
    ref = masked_softmax_attention(dot_logits(q, k) + attn.random.detach()[:, :n, :n], v, mask)
    torch.testing.assert_close(attn(q, k, v, mask), ref, atol=1e-12, rtol=1e-12)


def test_random_alone_ignores_q_and_k():
    q, k, v, mask = random_qkv((B, H, 77, D), pad_from=40)
    attn = make(dot_product=False)
    ref = masked_softmax_attention(attn.random.detach()[:, :77, :77].expand(B, -1, -1, -1), v, mask)
    q2, k2 = (torch.randn_like(t) for t in (q, k))
    torch.testing.assert_close(attn(q, k, v, mask), ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(attn(q2, k2, v, mask), ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dot_product", [False, True])
def test_factorized_random(dot_product):
    n, r = 50, 8
    q, k, v, mask = random_qkv((B, H, n, D), pad_from=30)
    attn = make(mode="factorized_random", factorized_rank=r, dot_product=dot_product)
    assert attn.random1.shape == (H, L, r) and attn.random2.shape == (H, r, L)
    r1, r2 = attn.random1.detach()[:, :n], attn.random2.detach()[:, :, :n]
    logits = torch.einsum("hir,hrj->hij", r1, r2).expand(B, -1, -1, -1)
    if dot_product:
        logits = logits + dot_logits(q, k)
    ref = masked_softmax_attention(logits, v, mask)
    torch.testing.assert_close(attn(q, k, v, mask), ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", ["dense", "dense+random"])
def test_dense_from_q(mode):
    n = 40
    q, k, v, mask = random_qkv((B, H, n, D), pad_from=25)
    attn = make(mode=mode, dot_product=False)
    logits = dense_logits(attn, q)
    if mode == "dense+random":
        logits = logits + attn.random.detach()[:, :n, :n]
    ref = masked_softmax_attention(logits, v, mask)
    torch.testing.assert_close(attn(q, k, v, mask), ref, atol=1e-12, rtol=1e-12)


def test_learns_only_the_rows_and_columns_of_the_length_in_use():
    """q, k, v gradients: tests/attention/test_contract.py."""
    q, k, v, mask = random_qkv((B, H, 90, D), dtype=torch.float32, pad_from=70)
    attn = build("synthesizer", context=CONTEXT)
    attn(q, k, v, mask).square().sum().backward()
    grad = attn.random.grad
    assert grad[:, :90, :90].abs().sum() > 0
    assert (grad[:, 90:] == 0).all() and (grad[:, :, 90:] == 0).all()


def test_longer_than_max_length_fails():
    q, k, v, mask = random_qkv((B, H, L + 1, D))
    with pytest.raises(ValueError, match="max_length 128"):
        make()(q, k, v, mask)
