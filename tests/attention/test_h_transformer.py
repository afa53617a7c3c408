"""H-Transformer-1D against a dense float64 build of the hierarchical attention matrix."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import dense_softmax, random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "h_transformer.yaml"


def dense_hierarchical(q, k, v, mask, b, top_level=True):
    """The n x n matrix written out: entry (i, j) with blocks I, J is the exact score where
    I xor J <= 1, else the score of the level-l means (l = highest bit of I xor J) over the real
    tokens of the 2^l-token units holding i and j. top_level=False: no weight where
    I xor J >= nb / 2 (the halves apart; with nb = 2 that is the finest sibling block)."""
    q, k, v, mask = q.double(), k.double(), v.double(), mask.double()
    n, d = q.shape[2], q.shape[3]
    n_pad = 2 ** math.ceil(math.log2(math.ceil(n / b))) * b
    q, k, v = (F.pad(t, (0, 0, 0, n_pad - n)) for t in (q, k, v))
    keep = F.pad(mask, (0, n_pad - n))
    blocks = torch.arange(n_pad) // b
    xor = blocks[:, None] ^ blocks[None, :]
    level = torch.where(xor >= 2, torch.log2(xor.double().clamp(min=1)).floor(), 0).long()

    def unit_mean(x, span):
        x = x * keep[:, None, :, None]
        sums = x.view(B, H, n_pad // span, span, d).sum(3)
        counts = keep.view(B, n_pad // span, span).sum(-1).clamp(min=1)[:, None, :, None]
        return (sums / counts).repeat_interleave(span, dim=2)

    logits = torch.zeros(B, H, n_pad, n_pad, dtype=torch.float64)
    for lvl in level.unique().tolist():
        qm, km = unit_mean(q, 2**lvl), unit_mean(k, 2**lvl)
        scores = torch.einsum("bhid,bhjd->bhij", qm, km) / math.sqrt(d)
        logits = torch.where(level == lvl, scores, logits)
    logits = logits.masked_fill(keep[:, None, None, :] == 0, float("-inf"))
    nb = n_pad // b
    if not top_level and nb > 1:
        logits = logits.masked_fill(xor >= nb // 2, float("-inf"))
    # nan_to_num: a padded query whose visible keys are all padded (only without the top level).
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhij,bhjd->bhid", probs, v)
    return (out * keep[:, None, :, None])[:, :, :n]


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    return random_qkv((B, H, n, D), seed, dtype, pad_from)


def test_config_builds_with_spec_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {"name": "h_transformer", "block_size": 16, "top_level": True}
    attn = build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)
    assert attn.block_size == 16 and attn.top_level
    assert build("h_transformer").top_level  # the class default agrees


@pytest.mark.parametrize("n,pad_from", [(256, None), (200, 77), (37, 20), (16, 9)])
def test_equals_dense_hierarchical_matrix(n, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    out = build("h_transformer", block_size=16)(q, k, v, mask)
    ref = dense_hierarchical(q, k, v, mask, 16)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("n,pad_from", [(128, None), (100, 77), (37, 20), (20, 18)])
def test_without_top_level_equals_dense_matrix_without_it(n, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    out = build("h_transformer", block_size=16, top_level=False)(q, k, v, mask)
    ref = dense_hierarchical(q, k, v, mask, 16, top_level=False)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("top_level", [True, False])
def test_top_level_joins_the_halves(top_level):
    # n = 128, block 16: 8 blocks. Without the top level (the MRA authors' copy) a query in the
    # first half gets nothing from the values of the second half.
    n = 128
    q, k, v, _ = random_inputs(n)
    v.requires_grad_(True)
    out = build("h_transformer", block_size=16, top_level=top_level)(q, k, v, None)
    (grad,) = torch.autograd.grad(out[:, :, : n // 2].sum(), v)
    reaches_second_half = grad[:, :, n // 2 :].abs().amax(dim=-1) > 0
    assert reaches_second_half.all() if top_level else not reaches_second_half.any()
    assert (grad[:, :, : n // 2] != 0).all()


@pytest.mark.parametrize("n,pad_from", [(50, None), (50, 31)])
@pytest.mark.parametrize("top_level", [True, False])
def test_block_at_least_n_is_softmax(n, pad_from, top_level):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    out = build("h_transformer", block_size=64, top_level=top_level)(q, k, v, mask)
    torch.testing.assert_close(out, dense_softmax(q, k, v, mask), atol=1e-10, rtol=1e-10)


def test_piecewise_constant_q_k_is_softmax():
    # n = 200, block 16 -> 16 blocks, coarsest level averages runs of 8 tokens: when q and k are
    # constant on those runs every coarse score is exact, and so is the whole attention.
    n = 200
    q, k, v, mask = random_inputs(n, pad_from=131)
    q, k = (t[:, :, ::8].repeat_interleave(8, dim=2)[:, :, :n] for t in (q, k))
    out = build("h_transformer", block_size=16)(q, k, v, mask)
    torch.testing.assert_close(out, dense_softmax(q, k, v, mask), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_kept(dtype):
    q, k, v, mask = random_inputs(45, dtype=dtype, pad_from=30)
    attn = build("h_transformer", block_size=16)
    out = attn(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype
    ref = dense_hierarchical(q, k, v, mask, 16)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert attn(q, k, v, None).shape == q.shape


@pytest.mark.parametrize("options", [{"block_size": 0}, {"top_level": "false"}])
def test_bad_options_are_named(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        build("h_transformer", **options)
