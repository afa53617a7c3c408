"""Performer (FAVOR+) attention against a float64 dense masked softmax."""

import itertools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import check_padded_keys_cannot_overflow, dense_softmax, random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "performer.yaml"


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None, scale=1.0):
    q, k, v, mask = random_qkv((B, H, n, D), seed, dtype, pad_from)
    return q * scale, k * scale, v, mask


def test_config_builds_with_spec_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {"name": "performer", "num_features": 256}
    attn = build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)
    assert attn.features.shape == (256, D)
    assert "features" in attn.state_dict()  # the draw travels with the checkpoint
    with pytest.raises(ValueError, match="head_dim"):
        build("performer")


def test_features_are_orthogonal_within_a_block():
    torch.manual_seed(0)
    w = build("performer", head_dim=D, num_features=40).features.double()  # 2.5 blocks of D
    for block in (w[:D], w[D : 2 * D], w[2 * D :]):
        gram = block @ block.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-5, rtol=0)


def test_error_falls_as_features_grow():
    q, k, v, mask = random_inputs(128, pad_from=70, scale=0.5)
    ref = dense_softmax(q, k, v, mask)
    errors = []
    for m in (16, 64, 256, 1024):
        per_draw = []
        for seed in range(3):
            torch.manual_seed(seed)
            attn = build("performer", head_dim=D, num_features=m).double()
            per_draw.append((attn(q, k, v, mask) - ref).norm() / ref.norm())
        errors.append(sum(per_draw) / len(per_draw))
    # Monte Carlo error ~ 1 / sqrt(m): about halves per 4x features.
    for coarse, fine in itertools.pairwise(errors):
        assert fine < 0.75 * coarse, errors
    assert errors[-1] < 0.15, errors


def test_padded_keys_cannot_overflow_into_real_rows():
    torch.manual_seed(0)
    check_padded_keys_cannot_overflow(build("performer", head_dim=32, num_features=256), d=32)
