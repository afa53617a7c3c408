"""Linear attention against its O(n^2) form, written densely in float64."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "linear.yaml"


def dense_linear(q, k, v, mask):
    """A_ij = phi(q_i) . phi(k_j) over real keys, rows normalised; padded queries output 0."""
    q, k, v, mask = q.double(), k.double(), v.double(), mask.double()
    phi_q = torch.where(q > 0, q + 1, torch.exp(q))
    phi_k = torch.where(k > 0, k + 1, torch.exp(k))
    weights = torch.einsum("bhid,bhjd->bhij", phi_q, phi_k) * mask[:, None, None, :]
    out = torch.einsum("bhij,bhjd->bhid", weights / weights.sum(-1, keepdim=True), v)
    return out * mask[:, None, :, None]


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    return random_qkv((B, H, n, D), seed, dtype, pad_from)


def test_config_builds():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {"name": "linear"}
    build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)


@pytest.mark.parametrize("n,pad_from", [(64, None), (100, 61), (37, 20)])
def test_equals_quadratic_form(n, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    out = build("linear")(q, k, v, mask)
    torch.testing.assert_close(out, dense_linear(q, k, v, mask), atol=1e-6, rtol=1e-6)
