"""The backbone's options: attention width apart from model width, sinusoidal positions, CLS."""

from __future__ import annotations

import math

import pytest
import torch

from mra_lra.models.encoder import LRAClassifier, LRAEncoder, sinusoids


def encoder(**kw) -> LRAEncoder:
    args = dict(
        vocab_size=10,
        max_length=24,
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_ffn=32,
        dropout=0.0,
        pooling="mean",
        attn={"name": "softmax", "dropout": 0.0},
    )
    args.update(kw)
    return LRAEncoder(**args).eval()


def test_qkv_dim_sets_the_attention_width():
    torch.manual_seed(0)
    net = encoder(qkv_dim=24, n_heads=4)
    attn = net.blocks[0].attn
    assert (attn.head_dim, attn.qkv.weight.shape, attn.out.weight.shape) == (6, (72, 16), (16, 24))
    ids = torch.randint(0, 10, (3, 24))
    assert net(ids, torch.ones(3, 24)).shape == (3, 16)
    # null keeps the width of the model
    assert encoder(qkv_dim=None).blocks[0].attn.qkv.weight.shape == (48, 16)
    with pytest.raises(ValueError, match="model.qkv_dim"):
        encoder(qkv_dim=20, n_heads=3)


def test_sinusoids_follow_the_formula_and_are_not_saved():
    table = sinusoids(50, 8)
    for pos, ch in [(0, 0), (1, 0), (1, 1), (7, 2), (7, 3), (49, 6), (49, 7)]:
        wavelength = 10000 ** ((ch - ch % 2) / 8)
        expected = (math.sin if ch % 2 == 0 else math.cos)(pos / wavelength)
        assert table[pos, ch].item() == pytest.approx(expected, abs=1e-5)
    net = encoder(positions="sinusoidal")
    assert not any("pos" in k for k in net.state_dict())
    assert torch.equal(net.pos_table, sinusoids(24, 16))
    learned = encoder(positions="learned")
    assert learned.state_dict()["pos.weight"].shape == (24, 16)
    with pytest.raises(ValueError, match="model.positions"):
        encoder(positions="rotary")


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_cls_token_pools_and_ignores_padding(positions):
    """A learned token is prepended: the pooled vector is its output, so it depends on the real
    tokens but not on padding (neither its content nor how much of it there is)."""
    torch.manual_seed(0)
    net = encoder(pooling="cls", positions=positions)
    with torch.no_grad():
        net.cls.normal_()
    ids = torch.randint(0, 10, (2, 20))
    mask = torch.ones(2, 20)
    out = net(ids, mask)
    padded = torch.cat([ids, torch.randint(0, 10, (2, 4))], dim=1)
    pmask = torch.cat([mask, torch.zeros(2, 4)], dim=1)
    torch.testing.assert_close(net(padded, pmask), out, rtol=1e-5, atol=1e-5)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 10
    assert (net(changed, mask) - out).abs().max() > 1e-4
    # the CLS output is not the first real token's output
    assert (encoder(pooling="mean")(ids[:, :1], mask[:, :1]) - out[:, :]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "attn",
    [
        {"name": "linformer", "projected_length": 8},  # sized by max_length (+1 for the CLS)
        {"name": "mra", "patch_shape": [4, 8], "block_per_row": 2, "backend": "torch"},
    ],
)
def test_cls_token_counts_in_the_attention_length(attn):
    """Attentions sized by max_length see max_length + 1 tokens; MRA's patch order on an image
    (8 x 8 here) is told that one leading token is not a pixel."""
    net = encoder(pooling="cls", attn=attn, max_length=64)
    assert net(torch.randint(0, 10, (2, 64)), torch.ones(2, 64)).shape == (2, 16)


def test_classifier_passes_the_options_through():
    net = LRAClassifier(
        vocab_size=10,
        num_classes=3,
        max_length=24,
        d_model=16,
        n_layers=1,
        n_heads=2,
        d_ffn=32,
        dropout=0.0,
        pooling="cls",
        attn={"name": "softmax"},
        two_tower=True,
        head_hidden=40,
        qkv_dim=32,
        positions="sinusoidal",
    )
    assert net.encoder.blocks[0].attn.qkv_dim == 32 and hasattr(net.encoder, "cls")
    batch = {
        "input_ids": torch.randint(0, 10, (2, 24)),
        "mask": torch.ones(2, 24),
        "input_ids_2": torch.randint(0, 10, (2, 24)),
        "mask_2": torch.ones(2, 24),
    }
    assert net(batch).shape == (2, 3)


@pytest.mark.parametrize(
    "attn",
    [
        {"name": "softmax", "dropout": 0.1},
        {"name": "mra", "block_per_row": 1, "approx_mode": "full"},
        {"name": "reformer", "num_hashes": 2, "chunk_size": 32},
        {"name": "bigbird", "block_size": 32, "num_random_blocks": 1},
    ],
    ids=lambda a: a["name"],
)
def test_gradient_checkpointing_recomputes_the_same_function(attn):
    """With gradient_checkpointing each block's forward runs again in the backward, under the
    forward's RNG state: dropout, LSH rotations and random blocks repeat, so the loss and every
    gradient equal those of the plain model."""

    def make(checkpointing):
        torch.manual_seed(0)
        net = LRAClassifier(
            vocab_size=10, num_classes=3, max_length=128, d_model=16, n_layers=2, n_heads=2,
            d_ffn=32, dropout=0.1, pooling="mean", attn=attn,
            gradient_checkpointing=checkpointing,
        )  # fmt: skip
        return net.train()

    ids = torch.randint(1, 10, (2, 128))
    mask = torch.ones(2, 128)
    mask[1, 100:] = 0
    batch = {"input_ids": ids, "mask": mask}
    results = []
    for checkpointing in (False, True):
        net = make(checkpointing)
        calls = []
        for block in net.encoder.blocks:
            block.attn.attention.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(1)
        loss = net(batch).logsumexp(-1).sum()
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in net.named_parameters()}, len(calls)))
    (plain, plain_grads, plain_calls), (ckpt, ckpt_grads, ckpt_calls) = results
    assert (plain_calls, ckpt_calls) == (2, 4)  # recomputed once per block
    assert torch.equal(plain, ckpt)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # Evaluation and no-grad forwards are left alone.
    net = make(True).eval()
    with torch.no_grad():
        net(batch)
    with pytest.raises(ValueError, match="model.gradient_checkpointing must be true or false"):
        encoder(gradient_checkpointing="yes")


def test_mean_padded_pooling_divides_by_the_padded_length():
    """mean: the average of the final features over real tokens, however much padding follows;
    mean_padded: their sum over the padded length (the MRA code lineage's pooling)."""
    torch.manual_seed(0)
    mean = encoder(pooling="mean")
    padded_net = encoder(pooling="mean_padded")
    padded_net.load_state_dict(mean.state_dict())
    ids = torch.randint(1, 10, (2, 24))
    mask = torch.ones(2, 24)
    mask[1, 6:] = 0
    real = mean(ids, mask)
    torch.testing.assert_close(padded_net(ids, mask), real * mask.sum(1, keepdim=True) / 24)
    with pytest.raises(ValueError, match="model.pooling"):
        encoder(pooling="max")


def test_attention_float32_runs_attention_outside_autocast():
    """Under bf16 autocast the attention sees bf16 q, k, v by default, and float32 ones with
    autocast off when model.attention_float32 is set; the rest of the model stays in autocast."""
    seen = []

    def spy(module, args, output):
        seen.append((args[0].dtype, torch.is_autocast_enabled("cpu"), output.dtype))

    ids = torch.randint(1, 10, (2, 24))
    mask = torch.ones(2, 24)
    for flag in (False, True):
        torch.manual_seed(0)
        net = encoder(attention_float32=flag)
        net.blocks[0].attn.attention.register_forward_hook(spy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(ids, mask)
        assert torch.isfinite(out).all()
    assert seen[0] == (torch.bfloat16, True, torch.bfloat16)
    assert seen[1] == (torch.float32, False, torch.float32)
    with pytest.raises(ValueError, match="model.attention_float32"):
        encoder(attention_float32="yes")


def test_no_layers_is_an_error():
    with pytest.raises(ValueError, match="model.n_layers must be >= 1, got 0"):
        encoder(n_layers=0)
