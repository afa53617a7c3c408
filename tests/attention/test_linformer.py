"""Linformer attention against a float64 dense masked softmax."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import dense_softmax, random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "linformer.yaml"


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    return random_qkv((B, H, n, D), seed, dtype, pad_from)


def test_config_builds_with_spec_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {"name": "linformer", "projected_length": 256}
    attn = build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)
    assert attn.projection.shape == (256, 512)  # one projection for every head
    with pytest.raises(ValueError, match="max_length"):
        build("linformer")


@pytest.mark.parametrize("n,pad_from", [(64, None), (64, 40), (45, 3)])
def test_identity_projection_is_softmax(n, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    attn = build("linformer", max_length=n, projected_length=n).double()
    with torch.no_grad():
        attn.projection.copy_(torch.eye(n))
    torch.testing.assert_close(attn(q, k, v, mask), dense_softmax(q, k, v, mask))


def test_projection_is_a_mix_of_keys_and_values():
    """Any E: softmax attention over the k projected keys E k and values E v (no padding)."""
    n, r = 48, 20
    q, k, v, mask = random_inputs(n)
    attn = build("linformer", max_length=64, projected_length=r).double()
    e = attn.projection.detach()[:, :n]  # shorter than max_length: the first n columns
    k_proj, v_proj = (torch.einsum("rn,bhnd->bhrd", e, t) for t in (k, v))
    logits = torch.einsum("bhid,bhrd->bhir", q, k_proj) / math.sqrt(D)
    ref = torch.einsum("bhir,bhrd->bhid", torch.softmax(logits, dim=-1), v_proj)
    torch.testing.assert_close(attn(q, k, v, mask), ref)


def test_longer_than_max_length_fails():
    q, k, v, mask = random_inputs(65)
    with pytest.raises(ValueError, match="max_length 64"):
        build("linformer", max_length=64, projected_length=8)(q, k, v, mask)


def test_projection_learns_only_the_columns_of_the_length_in_use():
    """q, k, v gradients: tests/attention/test_contract.py."""
    q, k, v, mask = random_inputs(90, pad_from=70, dtype=torch.float32)
    attn = build("linformer", max_length=128, projected_length=16)
    attn(q, k, v, mask).square().sum().backward()
    grad = attn.projection.grad
    assert grad[:, :90].abs().sum() > 0 and (grad[:, 90:] == 0).all()
