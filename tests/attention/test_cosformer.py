"""cosFormer against its O(n^2) form, written densely in float64."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "cosformer.yaml"


def dense_cosformer(q, k, v, mask):
    """w_ij = relu(q_i) . relu(k_j) cos(pi/2 (i - j) / n) over real keys, rows normalised;
    padded queries output 0."""
    q, k, v, mask = q.double(), k.double(), v.double(), mask.double()
    n = q.shape[2]
    pos = torch.arange(n, dtype=torch.float64)
    reweight = torch.cos(math.pi / 2 * (pos[:, None] - pos[None, :]) / n)
    weights = torch.einsum("bhid,bhjd->bhij", q.clamp(min=0), k.clamp(min=0)) * reweight
    weights = weights * mask[:, None, None, :]
    out = torch.einsum("bhij,bhjd->bhid", weights / weights.sum(-1, keepdim=True), v)
    return out * mask[:, None, :, None]


def test_config_builds():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {"name": "cosformer"}
    build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)


@pytest.mark.parametrize("n,pad_from", [(64, None), (100, 61), (37, 20)])
def test_equals_quadratic_form(n, pad_from):
    q, k, v, mask = random_qkv((B, H, n, D), pad_from=pad_from)
    out = build("cosformer")(q, k, v, mask)
    torch.testing.assert_close(out, dense_cosformer(q, k, v, mask), atol=1e-10, rtol=1e-10)


def test_nearby_keys_weigh_more():
    """Identical keys everywhere: the weights fall with distance, so a query at the start sees
    the values near the start more than the same values far away."""
    n = 64
    q = torch.ones(1, 1, n, D, dtype=torch.float64)
    v = torch.zeros(1, 1, n, D, dtype=torch.float64)
    v[..., : n // 2, 0] = 1.0  # first half of the keys carries 1, the second half 0
    out = build("cosformer")(q, q, v, None)[0, 0, :, 0]
    assert out[0] > 0.5 > out[-1]
    assert (out[1:] <= out[:-1]).all()
