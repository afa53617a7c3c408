"""Sparse Transformer (fixed pattern) against a float64 dense masked softmax over its mask."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import dense_softmax, random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "sparse_trans.yaml"


def fixed_pattern(n, block_size, c, causal=False, prefix=0):
    """[n, n] from the LRA code's rules: same block (Fixed1) or a summary column, j mod b == 0 or
    j mod b >= b - c (Fixed2), lower-triangular when causal; built on the tokens after `prefix`,
    and the prefix rows and columns all allowed (its use_cls_token)."""
    i = torch.arange(n - prefix)
    q_pos, k_pos = i[:, None], i[None, :]
    same_block = q_pos // block_size == k_pos // block_size
    r = k_pos % block_size
    summary = (r == 0) | (r >= block_size - c)
    pattern = same_block | summary
    if causal:
        pattern = pattern & (k_pos <= q_pos)
    full = torch.ones(n, n, dtype=torch.bool)
    full[prefix:, prefix:] = pattern
    return full


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    return random_qkv((B, H, n, D), seed, dtype, pad_from)


def test_config_builds_with_lra_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {"name": "sparse_trans", "block_size": 50, "summary_size": 10, "causal": False}
    context = {"head_dim": D, "num_heads": H, "max_length": 512, "prefix_tokens": 1}
    attn = build(cfg.pop("name"), context=context, **cfg)
    assert attn.prefix_tokens == 1
    with pytest.raises(ValueError, match="summary_size"):
        build("sparse_trans", block_size=8, summary_size=8)


@pytest.mark.parametrize("n,pad_from", [(64, None), (50, 20)])
@pytest.mark.parametrize("cover", ["one_block", "all_summary"])
@pytest.mark.parametrize("prefix", [0, 1])
def test_pattern_covering_the_sequence_is_softmax(n, pad_from, cover, prefix):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    options = {"block_size": n, "summary_size": 0} if cover == "one_block" else {"block_size": 8}
    if cover == "all_summary":
        options["summary_size"] = 7  # j mod 8 == 0 or >= 1: every key
    attn = build("sparse_trans", prefix_tokens=prefix, **options)
    torch.testing.assert_close(attn(q, k, v, mask), dense_softmax(q, k, v, mask))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "n,block_size,c,prefix,pad_from",
    [
        (128, 16, 4, 0, None),
        (100, 16, 4, 1, 61),
        (77, 10, 2, 0, 40),
        (77, 10, 0, 2, 70),
        (64, 64, 10, 0, 50),
        (20, 7, 3, 1, 15),
        (120, 12, 11, 0, 100),
    ],
)
def test_fixed_pattern_matches_a_dense_mask(n, block_size, c, prefix, pad_from, causal):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    attn = build(
        "sparse_trans", block_size=block_size, summary_size=c, causal=causal, prefix_tokens=prefix
    )
    ref = dense_softmax(q, k, v, mask, fixed_pattern(n, block_size, c, causal, prefix))
    torch.testing.assert_close(attn(q, k, v, mask), ref)


def test_lra_settings_on_a_listops_length():
    """b = 50, c = 10 with a CLS token, as LRA's ListOps runs it (2000 tokens + CLS), shortened."""
    n = 301
    q, k, v, mask = random_inputs(n, pad_from=250)
    for causal in (False, True):
        attn = build("sparse_trans", causal=causal, prefix_tokens=1)
        ref = dense_softmax(q, k, v, mask, fixed_pattern(n, 50, 10, causal, prefix=1))
        torch.testing.assert_close(attn(q, k, v, mask), ref)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_the_dense_reference(causal):
    """The two parts share one softmax, normalised by hand: q, k and v get the dense gradients."""
    n, pad_from = 90, 70
    inputs = random_inputs(n, pad_from=pad_from)
    grads = []
    for fn in (
        build("sparse_trans", block_size=16, summary_size=4, causal=causal, prefix_tokens=1),
        lambda q, k, v, mask: dense_softmax(
            q, k, v, mask, fixed_pattern(n, 16, 4, causal, prefix=1)
        ),
    ):
        q, k, v = (t.clone().requires_grad_() for t in inputs[:3])
        weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).double()
        (fn(q, k, v, inputs[3]) * weights).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref)
