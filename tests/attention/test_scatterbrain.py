"""Scatterbrain against a dense float64 build of its sparse + low-rank matrix, and softmax."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import check_padded_keys_cannot_overflow, dense_softmax, random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "scatterbrain.yaml"


def dense_scatterbrain(q, k, v, mask, features, window):
    """A_ij = exp(q.k / sqrt d) where the chunks of i and j (chunk = window tokens) are at most
    one apart, else the FAVOR+ estimate phi(q_i).phi(k_j) with the module's features (no
    stabilisers: they cancel in the ratio)."""
    q, k, v, mask, w = q.double(), k.double(), v.double(), mask.double(), features.double()
    q, k = q / q.shape[-1] ** 0.25, k / k.shape[-1] ** 0.25

    def phi(x):
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    chunk = torch.arange(q.shape[2]) // window
    near = (chunk[:, None] - chunk[None, :]).abs() <= 1
    exact = torch.exp(torch.einsum("bhid,bhjd->bhij", q, k))
    low_rank = torch.einsum("bhim,bhjm->bhij", phi(q), phi(k))
    weights = torch.where(near, exact, low_rank) * mask[:, None, None, :]
    out = torch.einsum("bhij,bhjd->bhid", weights / weights.sum(-1, keepdim=True), v)
    return out * mask[:, None, :, None]


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    return random_qkv((B, H, n, D), seed, dtype, pad_from)


def make(window_size=16, num_features=64):
    torch.manual_seed(0)
    return build(
        "scatterbrain", head_dim=D, window_size=window_size, num_features=num_features
    ).double()


def test_config_builds_with_spec_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {"name": "scatterbrain", "window_size": 64, "num_features": 256}
    attn = build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)
    assert attn.window_size == 64 and attn.features.shape == (256, D)


def test_needs_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        build("scatterbrain", window_size=64, num_features=256)


@pytest.mark.parametrize("n,pad_from", [(64, None), (100, 61), (37, 20)])
def test_equals_dense_sparse_plus_low_rank(n, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    attn = make(window_size=16)
    ref = dense_scatterbrain(q, k, v, mask, attn.features, 16)
    torch.testing.assert_close(attn(q, k, v, mask), ref, atol=1e-9, rtol=1e-9)
    # Away from the window the low-rank estimate is used: not softmax.
    assert (ref - dense_softmax(q, k, v, mask)).abs().max() > 1e-3


@pytest.mark.parametrize("n,pad_from", [(64, None), (50, 31)])
def test_window_at_least_n_is_softmax(n, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    out = make(window_size=64)(q, k, v, mask)
    torch.testing.assert_close(out, dense_softmax(q, k, v, mask), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_kept(dtype):
    q, k, v, mask = random_inputs(45, dtype=dtype, pad_from=30)
    attn = make(window_size=16).to(dtype)
    out = attn(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype
    ref = dense_scatterbrain(q, k, v, mask, attn.features, 16)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    assert attn(q, k, v, None).shape == q.shape


def test_padded_keys_cannot_overflow_into_real_rows():
    torch.manual_seed(0)
    check_padded_keys_cannot_overflow(
        build("scatterbrain", head_dim=32, window_size=4, num_features=256), d=32
    )
