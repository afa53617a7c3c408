"""flex_mra (MRA-2-s through FlexAttention) against mra_s's torch path and a dense softmax.

On CPU FlexAttention runs forward only (unfused); the gradient checks run on a CUDA device
(`gpu` mark, scripts/gpu_check.sh).
"""

import sys
from pathlib import Path

import pytest
import torch

from mra_lra.attention import build
from tests.attention.dense import dense_softmax, random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "flex_mra.yaml"


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None, device="cpu"):
    return random_qkv((B, H, n, D), seed, dtype, pad_from, device)


def pair(**options):
    """flex_mra and mra_s (torch path) with the same options."""
    return build("flex_mra", **options), build("mra_s", backend="torch", **options)


def test_config_builds_with_spec_settings():
    from omegaconf import OmegaConf  # not on GPU images; only this test needs it

    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {
        "name": "flex_mra",
        "block_per_row": 8,
        "initial_prior_first_n_blocks": "${task.mra_priors.sparse.first_n_blocks}",
        "initial_prior_diagonal_n_blocks": "${task.mra_priors.sparse.diagonal_n_blocks}",
        "block_size": 32,
        "mask_block_size": None,
        "patch_shape": "${oc.select:task.mra_patch_shape,null}",
    }
    cfg.update(initial_prior_first_n_blocks=1, initial_prior_diagonal_n_blocks=0, patch_shape=None)
    attn = build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)
    assert attn.num_blocks(512) == 16 * 8


@pytest.mark.parametrize(
    "n,pad_from,options",
    [
        (256, None, dict(block_per_row=2)),
        (200, 150, dict(block_per_row=2, initial_prior_diagonal_n_blocks=1)),
        # k_sel = nb with the first-row/column prior: most block rows get no block (output 0).
        (200, 150, dict(block_per_row=1, initial_prior_first_n_blocks=1)),
        (37, None, dict(block_per_row=1)),
    ],
)
def test_equals_mra_s(n, pad_from, options):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    flex, mra_s = pair(**options)
    with torch.no_grad():
        out = flex(q, k, v, mask)
    ref = mra_s(q, k, v, mask)
    # MRA-2-s divides by (sum + 1e-6) with sum >= 1: relative differences up to 1e-6.
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if options.get("initial_prior_first_n_blocks"):
        empty = (ref.abs().sum(-1) == 0) & (mask[:, None, :] > 0)
        assert empty.any() and (out[empty] == 0).all()


@pytest.mark.parametrize("prefix_tokens", [0, 1])
def test_patch_order_equals_mra_s_on_an_image(prefix_tokens):
    """Image tasks: flex_mra takes mra_s's 4 x 8 patch order (a 32 x 32 image, with and without
    a leading CLS token), so both choose the same blocks; row-major order gives another output."""
    n = 32 * 32 + prefix_tokens
    q, k, v, mask = random_inputs(n, seed=3, pad_from=n - 5)
    options = dict(block_per_row=2, prefix_tokens=prefix_tokens)
    flex, mra_s = pair(patch_shape=[4, 8], **options)
    row_major = build("flex_mra", **options)
    with torch.no_grad():
        out, expected, other = flex(q, k, v, mask), mra_s(q, k, v, mask), row_major(q, k, v, mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert (out - other).abs().max() > 1e-2


def test_all_blocks_chosen_is_softmax():
    q, k, v, mask = random_inputs(100, pad_from=70)
    with torch.no_grad():
        out = build("flex_mra", block_per_row=4)(q, k, v, mask)
    torch.testing.assert_close(out, dense_softmax(q, k, v, mask), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_kept(dtype):
    q, k, v, mask = random_inputs(45, dtype=dtype, pad_from=30)
    attn = build("flex_mra", block_per_row=1)
    with torch.no_grad():
        out = attn(q, k, v, mask)
        assert attn(q, k, v, None).shape == q.shape
    assert out.shape == q.shape and out.dtype == dtype


def test_padding_is_ignored_and_padded_queries_are_zero():
    n, pad_from = 90, 41
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    attn = build("flex_mra", block_per_row=2)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[1, :, pad_from:] = 100 * torch.randn_like(t[1, :, pad_from:])
    with torch.no_grad():
        out, out2 = attn(q, k, v, mask), attn(q2, k2, v2, mask)
    torch.testing.assert_close(out2[1, :, :pad_from], out[1, :, :pad_from], atol=1e-12, rtol=0)
    assert (out2[1, :, pad_from:] == 0).all()


def test_cpu_backward_is_refused_with_a_pointer_to_mra_s():
    q, k, v, mask = random_inputs(64)
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="attn=mra_s"):
        build("flex_mra")(q, k, v, mask)


def test_missing_flex_attention_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)
    q, k, v, mask = random_inputs(64)
    with pytest.raises(RuntimeError, match="flex_attention.*attn=mra_s"):
        build("flex_mra")(q, k, v, mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n,pad_from", [(512, None), (300, 211)])
def test_gpu_forward_and_gradients_equal_mra_s(n, pad_from):
    q, k, v, mask = random_inputs(n, dtype=torch.float32, pad_from=pad_from, device="cuda")
    cot = torch.randn_like(q)
    flex, mra_s = pair(block_per_row=2, initial_prior_first_n_blocks=1)
    results = []
    for attn in (flex, mra_s):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attn(*leaves, mask)
        (out * cot).sum().backward()
        results.append((out, *(t.grad for t in leaves)))
    for got, want in zip(*results, strict=True):
        assert torch.isfinite(got).all() and got.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (results[0][1][1, :, pad_from or n :] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_precision_close_to_mra_s(dtype):
    q, k, v, mask = random_inputs(256, dtype=torch.float32, pad_from=200, device="cuda")
    flex, mra_s = pair(block_per_row=2)
    with torch.no_grad():
        out = flex(q.to(dtype), k.to(dtype), v.to(dtype), mask)
        ref = mra_s(q, k, v, mask)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() < (2e-2 if dtype == torch.bfloat16 else 5e-3)


def test_coarsen_block_table_by_hand():
    from mra_lra.attention.flex_mra import coarsen_block_table

    # 4 x 4 blocks in 2 x 2 groups: group (0, 0) fully chosen, (0, 1) one block, (1, *) none.
    table = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    table[0, 0, :2, :2] = True
    table[0, 0, 1, 3] = True
    any_chosen, all_chosen = coarsen_block_table(table, 2)
    assert any_chosen[0, 0].tolist() == [[True, True], [False, False]]
    assert all_chosen[0, 0].tolist() == [[True, False], [False, False]]
    # A per-key-block row [B, 1, 1, nb] keeps its size-1 dimensions.
    keys = torch.tensor([True, True, True, False]).view(1, 1, 1, 4)
    _, all_keys = coarsen_block_table(keys, 2)
    assert all_keys.shape == (1, 1, 1, 2) and all_keys.flatten().tolist() == [True, False]


def test_coarser_mask_blocks_compute_the_same_function():
    q, k, v, mask = random_inputs(512, pad_from=450)
    flex, mra_s = pair(block_per_row=2, initial_prior_first_n_blocks=1)
    coarse = build("flex_mra", block_per_row=2, initial_prior_first_n_blocks=1, mask_block_size=128)
    with torch.no_grad():
        torch.testing.assert_close(
            coarse(q, k, v, mask), mra_s(q, k, v, mask), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(coarse(q, k, v, mask), flex(q, k, v, mask), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("mask_block_size", "n"), [(48, 512), (128, 480)])
def test_bad_mask_block_size_is_a_clear_error(mask_block_size, n):
    q, k, v, mask = random_inputs(n)
    with pytest.raises(ValueError, match="mask_block_size"):
        with torch.no_grad():
            build("flex_mra", mask_block_size=mask_block_size)(q, k, v, mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "mask_block_size",
    [
        pytest.param(
            None,
            marks=pytest.mark.xfail(
                reason="pytorch#176025: no backward kernel for 32-token mask blocks in half "
                "precision before PR #184797",
                strict=False,
            ),
        ),
        128,
    ],
)
def test_gpu_bfloat16_gradients_close_to_mra_s(mask_block_size):
    q, k, v, mask = random_inputs(512, dtype=torch.float32, pad_from=450, device="cuda")
    cot = torch.randn_like(q)
    options = dict(block_per_row=2, initial_prior_first_n_blocks=1)
    flex = build("flex_mra", mask_block_size=mask_block_size, **options)
    mra_s = build("mra_s", backend="torch", **options)
    results = []
    for attn, dtype in ((flex, torch.bfloat16), (mra_s, torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = attn(*leaves, mask)
        (out.float() * cot).sum().backward()
        results.append((out.float(), *(t.grad.float() for t in leaves)))
    for got, want in zip(*results, strict=True):
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() < 5e-2 * want.abs().max().clamp(min=1.0)
