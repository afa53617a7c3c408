"""BigBird block-sparse attention against a float64 dense masked softmax over its block pattern."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import dense_softmax, random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "bigbird.yaml"


def expected_blocks(nb, window, num_global, random_blocks_of_row):
    """[nb, nb] block mask from BigBird's rules, given the random blocks each sparse row drew."""
    glob = set(range(math.ceil(num_global / 2))) | set(range(nb - num_global // 2, nb))
    glob = {g for g in glob if 0 <= g < nb}
    allowed = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        if i in glob:
            allowed[i] = True
            continue
        for j in range(nb):
            allowed[i, j] = abs(i - j) <= window // 2 or j in glob
        for j in random_blocks_of_row.get(i, ()):
            allowed[i, j] = True
    return allowed


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    return random_qkv((B, H, n, D), seed, dtype, pad_from)


def test_config_builds_with_spec_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {
        "name": "bigbird",
        "block_size": 32,
        "num_window_blocks": 3,
        "num_global_blocks": 2,
        "num_random_blocks": 2,
    }
    build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)
    with pytest.raises(ValueError, match="odd"):
        build("bigbird", num_window_blocks=2)


@pytest.mark.parametrize("n,pad_from", [(256, None), (200, 130), (50, 20)])
def test_all_blocks_is_softmax(n, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    nb = math.ceil(n / 32)
    attn = build("bigbird", block_size=32, num_random_blocks=nb)  # random takes all the rest
    torch.testing.assert_close(attn(q, k, v, mask), dense_softmax(q, k, v, mask))


@pytest.mark.parametrize(
    "n,block,window,num_global,num_random,pad_from",
    [
        (256, 16, 3, 2, 2, None),
        (200, 16, 3, 2, 2, 77),
        (250, 16, 5, 1, 3, 200),
        (96, 8, 3, 0, 1, 90),
    ],
)
def test_sparse_pattern_matches_a_dense_mask(n, block, window, num_global, num_random, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    torch.manual_seed(0)
    attn = build(
        "bigbird",
        block_size=block,
        num_window_blocks=window,
        num_global_blocks=num_global,
        num_random_blocks=num_random,
    )
    nb = math.ceil(n / block)
    rows, key_blocks, valid = attn.block_pattern(nb, H)
    allowed = []
    for h in range(H):
        drawn = {int(r): key_blocks[h, i, -num_random:].tolist() for i, r in enumerate(rows)}
        # The random slots name distinct blocks outside the window and the global blocks.
        for i, r in enumerate(rows):
            picked = key_blocks[h, i, -num_random:][valid[h, i, -num_random:]].tolist()
            assert len(set(picked)) == len(picked) == num_random
            window_and_global = expected_blocks(nb, window, num_global, {})[r]
            assert not window_and_global[picked].any()
        blocks = expected_blocks(nb, window, num_global, drawn)
        allowed.append(blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n])
    ref = dense_softmax(q, k, v, mask, torch.stack(allowed))
    torch.testing.assert_close(attn(q, k, v, mask), ref)


def test_pattern_is_fixed_per_length_and_saved():
    torch.manual_seed(0)
    attn = build("bigbird", block_size=8)
    rows, key_blocks, _ = attn.block_pattern(12, H)
    assert not torch.equal(key_blocks[0, :, -2:], key_blocks[1, :, -2:])  # heads draw apart
    other = build("bigbird", block_size=8)  # a second layer: its own seed
    assert other.seed != attn.seed
    other.load_state_dict(attn.state_dict())
    torch.testing.assert_close(other.block_pattern(12, H)[1], key_blocks)
    q, k, v, mask = random_inputs(96, pad_from=70)
    torch.testing.assert_close(other(q, k, v, mask), attn(q, k, v, mask))
