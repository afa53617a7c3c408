"""Reformer LSH attention against float64 dense references over the shared-QK scores."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "reformer.yaml"


def shared_qk_round(q, v, mask, allowed):
    """One dense round: scores q_i . q_j / |q_j| over `allowed` [B, H, n, n] pairs and real keys;
    the diagonal only where a query has no other allowed real key. Returns out, logsumexp."""
    q, v, mask = q.double(), v.double(), mask.bool()
    keys = q / q.norm(dim=-1, keepdim=True)
    logits = torch.einsum("bhid,bhjd->bhij", q, keys)
    n = q.shape[2]
    eye = torch.eye(n, dtype=torch.bool)
    others = allowed & ~eye & mask[:, None, None, :]
    alone = ~others.any(dim=-1, keepdim=True)
    use = others | (eye & alone)
    logits = logits.masked_fill(~use, float("-inf"))
    out = torch.einsum("bhij,bhjd->bhid", torch.softmax(logits, dim=-1), v)
    return out, logits.logsumexp(dim=-1)


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    return random_qkv((B, H, n, D), seed, dtype, pad_from)


def test_config_builds_with_spec_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    # chunk_size 64: Hugging Face's ReformerConfig default, which the MRA authors' runs used.
    assert cfg == {"name": "reformer", "num_hashes": 2, "chunk_size": 64, "num_buckets": None}
    attn = build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)
    assert attn.buckets_for(1000) == 32  # 2 n / chunk_size, n rounded up to whole chunks
    # Where n is a power-of-two multiple of the chunk, the count is Hugging Face's too.
    assert [attn.buckets_for(n) for n in (1024, 2048, 4096)] == [32, 64, 128]
    assert build("reformer").chunk_size == cfg["chunk_size"]  # the class default agrees
    with pytest.raises(ValueError, match="even"):
        build("reformer", num_buckets=3)


@pytest.mark.parametrize("n,pad_from", [(64, None), (50, 20), (33, 32)])
def test_one_bucket_is_softmax_over_shared_qk(n, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    attn = build("reformer", num_hashes=2, chunk_size=64, num_buckets=1)
    ref, _ = shared_qk_round(q, v, mask, torch.ones(n, n, dtype=torch.bool))
    ref = ref * mask[:, None, :, None]
    torch.testing.assert_close(attn(q, k, v, mask), ref)


def test_self_is_attended_only_when_alone():
    q, k, v, mask = random_inputs(40, pad_from=1)  # batch 1: one real token
    attn = build("reformer", num_hashes=2, chunk_size=64, num_buckets=1)
    out = attn(q, k, v, mask)
    torch.testing.assert_close(out[1, :, 0], v[1, :, 0])
    assert (out[1, :, 1:] == 0).all()


def test_hashed_chunks_match_a_dense_reference():
    """Several buckets and chunks: rebuild the hashing from the same RNG draw, attend densely
    within sorted chunk c and chunk c - 1, and merge the rounds by their normalisers."""
    n, c, R, pad_from = 100, 16, 2, 70
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    attn = build("reformer", num_hashes=R, chunk_size=c)
    num_buckets = 2 * math.ceil(n / c)
    torch.manual_seed(3)
    out = attn(q, k, v, mask)
    torch.manual_seed(3)
    rotations = torch.randn(H, D, R, num_buckets // 2, dtype=torch.float64)

    n_pad = math.ceil(n / c) * c
    nc = n_pad // c
    outs, lses = [], []
    for r in range(R):
        rotated = torch.einsum("bhnd,hdk->bhnk", q, rotations[:, :, r])
        bucket = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)  # [B, H, n]
        bucket = bucket.masked_fill(mask[:, None, :] == 0, num_buckets)
        rank = (bucket * n_pad + torch.arange(n)).argsort(dim=-1).argsort(dim=-1)
        chunk = rank // c
        same = chunk[..., :, None] == chunk[..., None, :]
        before = (chunk[..., :, None] - 1) % nc == chunk[..., None, :]
        o, lse = shared_qk_round(q, v, mask, same | before)
        outs.append(o)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses), dim=0)[..., None]
    ref = (weights * torch.stack(outs)).sum(dim=0) * mask[:, None, :, None]
    torch.testing.assert_close(out, ref)
