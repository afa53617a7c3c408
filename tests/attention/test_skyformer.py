"""Skyformer against the dense float64 Gaussian-kernel attention it approximates."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from mra_lra.attention.skyformer import draw_landmarks
from tests.attention.dense import random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "skyformer.yaml"


def dense_gaussian(q, k, v, mask):
    """out_i = sum_j exp(-|q_i - k_j|^2 / (2 sqrt d)) v_j over real j; padded queries output 0."""
    q, k, v, mask = q.double(), k.double(), v.double(), mask.double()
    dist2 = ((q[:, :, :, None, :] - k[:, :, None, :, :]) ** 2).sum(-1)
    weights = torch.exp(-dist2 / (2 * math.sqrt(q.shape[-1]))) * mask[:, None, None, :]
    return torch.einsum("bhij,bhjd->bhid", weights, v) * mask[:, None, :, None]


def test_config_builds_with_published_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {"name": "skyformer", "num_landmarks": 128, "pinv_iterations": 6, "ridge": 0.1}
    attn = build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)
    assert (attn.num_landmarks, attn.pinv_iterations, attn.ridge) == (128, 6, 0.1)


@pytest.mark.parametrize("options", [{"num_landmarks": 0}, {"pinv_iterations": 0}, {"ridge": -1}])
def test_bad_options_are_named(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        build("skyformer", **options)


@pytest.mark.parametrize("n,pad_from", [(64, None), (50, 31), (37, 20)])
def test_every_point_a_landmark_is_dense_gaussian_attention(n, pad_from):
    q, k, v, mask = random_qkv((B, H, n, D), pad_from=pad_from)
    attn = build("skyformer", num_landmarks=2 * n, pinv_iterations=30, ridge=0.0)
    torch.testing.assert_close(
        attn(q, k, v, mask), dense_gaussian(q, k, v, mask), atol=1e-8, rtol=1e-8
    )


def test_landmarks_are_real_queries_and_keys():
    n = 40
    keep = torch.ones(3, n, dtype=torch.bool)
    keep[1, 25:] = False
    keep[2, ::3] = False  # padding need not be at the end
    torch.manual_seed(0)
    index, filled = draw_landmarks(keep, 64)
    assert index.shape == (3, 64) and filled.all()
    assert (index[:, :32] < n).all() and (index[:, 32:] >= n).all()  # half queries, half keys
    assert keep.gather(1, index % n).all()
    assert len(set(index[0].tolist())) > 32  # spread, not one point repeated
    index, filled = draw_landmarks(torch.zeros(2, n, dtype=torch.bool), 8)
    assert not filled.any()


def test_error_falls_with_more_landmarks():
    """Sampled landmarks, the published ridge and iterations: more landmarks, smaller error
    (averaged over draws). Queries and keys are smooth, so a few points summarise them."""
    n = 128
    q, k, v, mask = random_qkv((B, H, n, D), pad_from=100)
    q, k = torch.cumsum(q, dim=2) / 8, torch.cumsum(k, dim=2) / 8
    ref = dense_gaussian(q, k, v, mask)
    errors = []
    for m in (8, 32, 128):
        attn = build("skyformer", num_landmarks=m)
        torch.manual_seed(0)
        errors.append(sum((attn(q, k, v, mask) - ref).norm() / ref.norm() for _ in range(5)) / 5)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.3
