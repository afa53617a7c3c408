"""Local attention against a float64 dense masked softmax over its block pattern."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import dense_softmax, random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "local.yaml"


def local_pattern(n, block_size, strided=False):
    """[n, n]: query i sees key j when both fall in the same group. Contiguous blocks, i // b; or,
    as the LRA code's reshape groups them, the residue i mod G for G = n // b + 1 groups."""
    i = torch.arange(n)
    group = i % (n // block_size + 1) if strided else i // block_size
    return group[:, None] == group[None, :]


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    return random_qkv((B, H, n, D), seed, dtype, pad_from)


def test_config_builds_with_lra_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {"name": "local", "block_size": 50, "strided": False}
    build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)
    with pytest.raises(ValueError, match="block_size"):
        build("local", block_size=0)


@pytest.mark.parametrize("n,pad_from", [(64, None), (50, 20)])
@pytest.mark.parametrize("block_size", ["n", "more"])
def test_block_covering_the_sequence_is_softmax(n, pad_from, block_size):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    attn = build("local", block_size=n if block_size == "n" else 3 * n)
    torch.testing.assert_close(attn(q, k, v, mask), dense_softmax(q, k, v, mask))


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize(
    "n,block_size,pad_from",
    [(128, 16, None), (100, 16, 61), (77, 10, 40), (64, 64, 50), (20, 7, 15), (96, 1, 30)],
)
def test_blocks_match_a_dense_mask(n, block_size, pad_from, strided):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    attn = build("local", block_size=block_size, strided=strided)
    ref = dense_softmax(q, k, v, mask, local_pattern(n, block_size, strided))
    torch.testing.assert_close(attn(q, k, v, mask), ref)


def test_strided_groups_are_the_lra_codes_reshape():
    """The LRA code: query [n_pad, ...] reshaped to [b, n_pad / b, ...], attention along the first
    axis, so the second axis indexes the groups; n_pad = n + b - n mod b."""
    n, b = 23, 5
    n_pad = n + b - n % b
    slots = torch.arange(n_pad).reshape(b, n_pad // b)  # [b, groups], row-major as jnp.reshape
    expected = torch.zeros(n, n, dtype=torch.bool)
    for g in range(n_pad // b):
        members = slots[:, g][slots[:, g] < n]
        expected[members[:, None], members[None, :]] = True
    assert torch.equal(local_pattern(n, b, strided=True), expected)
    q, k, v, mask = random_inputs(n, pad_from=17)
    out = build("local", block_size=b, strided=True)(q, k, v, mask)
    torch.testing.assert_close(out, dense_softmax(q, k, v, mask, expected))
