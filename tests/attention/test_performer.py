"""Performer (FAVOR+) attention against a float64 dense masked softmax."""

import itertools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import dense_softmax, random_qkv

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
    # Real keys of large norm, so every real feature exponent k'.w - |k'|^2 / 2 is very negative,
    # and padded keys of zero norm, whose exponents lie far above the real keys' max: exp
    # overflowed before the padded keys were zeroed, and inf * 0 = NaN spread to every real row.
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 1, 1, 8, 32
    q, v = (torch.randn(b, h, n, d, generator=g) for _ in range(2))
    k = 8 * torch.randn(b, h, n, d, generator=g)
    mask = torch.ones(b, n)
    mask[:, 6:] = 0
    k[:, :, 6:] = 0
    padded = ~mask.bool()[:, None, :, None]
    others = [torch.where(padded, s * torch.randn(k.shape, generator=g), k) for s in (0.1, 8.0)]
    torch.manual_seed(0)
    attn = build("performer", head_dim=d, num_features=256)
    k.requires_grad_(True)
    out = attn(q, k, v, mask)
    assert torch.isfinite(out).all()
    for other in others:  # padded keys of any content: the same output
        torch.testing.assert_close(attn(q, other, v, mask), out, rtol=0, atol=0)
    out.square().sum().backward()
    assert torch.isfinite(k.grad).all() and (k.grad[:, :, 6:] == 0).all()
