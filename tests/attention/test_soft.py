"""SOFT against the dense float64 Gaussian-kernel attention it approximates."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from mra_lra.attention.soft import newton_pinv
from tests.attention.dense import random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "soft.yaml"


def dense_gaussian(q, v, mask):
    """out_i = sum_j exp(-|q_i - q_j|^2 / (2 sqrt d)) v_j over real j; padded queries output 0."""
    q, v, mask = q.double(), v.double(), mask.double()
    dist2 = ((q[:, :, :, None, :] - q[:, :, None, :, :]) ** 2).sum(-1)
    weights = torch.exp(-dist2 / (2 * math.sqrt(q.shape[-1]))) * mask[:, None, None, :]
    return torch.einsum("bhij,bhjd->bhid", weights, v) * mask[:, None, :, None]


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    return random_qkv((B, H, n, D), seed, dtype, pad_from)


def test_config_builds_with_spec_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {"name": "soft", "num_landmarks": 64, "newton_iterations": 20}
    attn = build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)
    assert attn.num_landmarks == 64 and attn.newton_iterations == 20


def test_newton_pinv_inverts_a_gaussian_kernel_matrix():
    x = torch.randn(3, 20, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = torch.exp(-(torch.cdist(x, x) ** 2) / (2 * math.sqrt(8)))
    torch.testing.assert_close(newton_pinv(a, 20), torch.linalg.inv(a), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("n,pad_from", [(64, None), (100, 61), (37, 20)])
def test_landmarks_equal_n_is_dense_gaussian_attention(n, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    out = build("soft", num_landmarks=n, newton_iterations=20)(q, k, v, mask)
    torch.testing.assert_close(out, dense_gaussian(q, v, mask), atol=1e-8, rtol=1e-8)


def test_fewer_landmarks_approximate():
    # Smooth queries (a slow random walk) are well summarised by segment means.
    n = 128
    q, k, v, mask = random_inputs(n, pad_from=90)
    q = torch.cumsum(q, dim=2) / 8
    out = build("soft", num_landmarks=32, newton_iterations=20)(q, k, v, mask)
    ref = dense_gaussian(q, v, mask)
    assert (out - ref).norm() < 0.02 * ref.norm()


def test_keys_are_tied_to_queries():
    q, k, v, mask = random_inputs(40, pad_from=25)
    attn = build("soft", num_landmarks=8, newton_iterations=20)
    torch.testing.assert_close(attn(q, k, v, mask), attn(q, torch.randn_like(k), v, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_kept(dtype):
    q, k, v, mask = random_inputs(45, dtype=dtype, pad_from=30)
    attn = build("soft", num_landmarks=45, newton_iterations=20)
    out = attn(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), dense_gaussian(q, v, mask), atol=1e-4, rtol=1e-4)
    assert attn(q, k, v, None).shape == q.shape
