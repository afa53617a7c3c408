"""Longformer attention against a float64 dense masked softmax over its band-plus-global mask."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import dense_softmax, random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "longformer.yaml"


def longformer_pattern(n, window, num_global):
    i = torch.arange(n)
    band = (i[:, None] - i[None, :]).abs() <= window // 2
    is_global = i < num_global
    return band | is_global[:, None] | is_global[None, :]


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    return random_qkv((B, H, n, D), seed, dtype, pad_from)


def test_config_builds_with_spec_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {"name": "longformer", "window": 64, "num_global_tokens": 1}
    build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)
    with pytest.raises(ValueError, match="even"):
        build("longformer", window=33)


@pytest.mark.parametrize("n,pad_from", [(64, None), (50, 20)])
def test_window_covering_the_sequence_is_softmax(n, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    attn = build("longformer", window=2 * n, num_global_tokens=1)  # n each side
    torch.testing.assert_close(attn(q, k, v, mask), dense_softmax(q, k, v, mask))


@pytest.mark.parametrize(
    "n,window,num_global,pad_from",
    [(128, 16, 1, None), (100, 16, 1, 61), (77, 10, 3, 40), (64, 8, 0, 50), (20, 64, 1, 15)],
)
def test_band_and_global_tokens_match_a_dense_mask(n, window, num_global, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    attn = build("longformer", window=window, num_global_tokens=num_global)
    ref = dense_softmax(q, k, v, mask, longformer_pattern(n, window, num_global))
    torch.testing.assert_close(attn(q, k, v, mask), ref)
