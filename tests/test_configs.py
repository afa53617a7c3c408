"""Every config group composes, and bad names fail with a message listing the valid ones."""

import hydra
import pytest
from hydra.errors import ConfigCompositionException

from mra_lra.attention import names

CONF = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf"


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("attn", options("attn"))
def test_every_attention_config_builds_the_model(compose_cfg, attn):
    cfg = compose_cfg([f"attn={attn}", "data.max_length=256"])
    assert cfg.attn.name in names(), f"conf/attn/{attn}.yaml names an unregistered attention"
    net = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert sum(p.numel() for p in net.parameters()) > 0


def test_mra_tile_settings_reach_the_attention(compose_cfg):
    overrides = ["attn=mra_s", "attn.query_rows=2", "attn.blocks_per_step=4"]
    net = hydra.utils.instantiate(compose_cfg([*overrides, "data.max_length=256"]).model)
    attentions = [m for m in net.modules() if m.__class__.__name__ == "MRA2Sparse"]
    tiles = {(m.options.query_rows, m.options.blocks_per_step) for m in attentions}
    assert attentions and tiles == {(2, 4)}


@pytest.mark.parametrize(
    "group", "task model optimizer scheduler trainer logger callbacks debug recipe".split()
)
def test_every_option_of_every_group_composes(compose_cfg, group):
    for option in options(group):
        cfg = compose_cfg([f"{group}={option}"])
        assert cfg.task.name and cfg.data.max_length > 0


def test_unknown_task_lists_valid_ones(compose_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["task=listopz"])
    assert "listops" in str(err.value.__cause__ or err.value)


def test_unknown_attention_lists_valid_ones(compose_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["attn=mra3"])
    assert "softmax" in str(err.value.__cause__ or err.value)


def test_unknown_recipe_lists_valid_ones(compose_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["recipe=lra_jx"])
    assert "lra_jax" in str(err.value.__cause__ or err.value)


def test_unknown_attention_option_lists_valid_ones(compose_cfg):
    cfg = compose_cfg(["attn=mra", "+attn.blocks_per_row=4"])
    with pytest.raises(Exception, match="valid options"):
        hydra.utils.instantiate(cfg.model, _convert_="all")


def test_experiment_option_for_another_attention_names_the_fix(compose_cfg):
    """experiment=demo sets attn.block_per_row; with attn=softmax the message says how to drop
    it, and dropping it works."""
    cfg = compose_cfg(["experiment=demo", "attn=softmax"])
    with pytest.raises(Exception, match=r"'~attn\.block_per_row'"):
        hydra.utils.instantiate(cfg.model, _convert_="all")
    cfg = compose_cfg(["experiment=demo", "attn=softmax", "~attn.block_per_row"])
    hydra.utils.instantiate(cfg.model, _convert_="all")


def test_protocol_card_names_every_data_setting(compose_cfg):
    from mra_lra.train import protocol_card

    cfg = compose_cfg(["data.max_length=1024", "data.num_train=123", "model.dropout=0.25"])
    card = protocol_card(cfg)
    assert "task=listops attn=mra seed=42" in card
    data_line = next(line for line in card.splitlines() if line.startswith("data: "))
    assert "max_length=1024" in data_line and "num_train=123" in data_line
    assert "_target_" not in data_line
    assert "dropout=0.25" in card
    assert "attention_float32=False" in card and "schedule=one_cycle" in card
