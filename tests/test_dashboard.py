"""Dashboards (mra_lra/dashboard.py): what an offline wandb run and a TensorBoard run of the demo
hold, read back from their files; the block maps against the attention they picture."""

import io
import json
import math

import numpy as np
import pytest
import torch
import wandb
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from wandb_log import offline_run

from mra_lra.attention.mra import MRA2Sparse
from mra_lra.dashboard import block_map
from mra_lra.train import run

# `make demo` (experiment=demo: MRA-2 choosing 8 of 16 blocks per slice) on a smaller set.
DEMO = [
    "experiment=demo",
    "data.num_train=64",
    "data.num_val=16",
    "data.num_test=32",
    "data.batch_size=8",
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "trainer.log_every_n_steps=5",
    "trainer.enable_progress_bar=false",
]


def _tensorboard(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return events


def _text(events: EventAccumulator, tag: str) -> str:
    (event,) = events.Tensors(f"{tag}/text_summary")
    return event.tensor_proto.string_val[0].decode()


def _markdown_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]


def test_demo_dashboards_in_wandb_and_tensorboard(compose_cfg, tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    cfg = compose_cfg([*DEMO, "logger=[wandb,tensorboard]"], run_dir=run_dir)
    results = run(cfg)
    wandb.teardown()
    num_test, layers = cfg.data.num_test, cfg.model.n_layers

    # --- TensorBoard ---
    events = _tensorboard(run_dir)
    assert "name: listops" in _text(events, "config")
    results_text = dict(_markdown_rows(_text(events, "results")))
    assert results_text["test_acc"] == f"{results['test_acc']:.4f}"
    hparams = {
        value.tag
        for path in (run_dir / "tensorboard").glob("events.*")
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
        if value.metadata.plugin_data.plugin_name == "hparams"
    }
    assert "_hparams_/experiment" in hparams
    (summary,) = events.Scalars("results/test_acc")
    assert summary.value == pytest.approx(results["test_acc"])
    assert {"test/acc", "test/acc_last"} <= set(events.Tags()["scalars"])
    for i in range(layers):
        maps = events.Images(f"mra/blocks/layer_{i}")
        assert [m.step for m in maps] == [10, 20]
        image = np.asarray(Image.open(io.BytesIO(maps[-1].encoded_image_string)))
        assert image.shape == (256, 256, 3)  # 4 x 4 blocks of 64 pixels
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 1  # some blocks refined, some not
        (share,) = events.Scalars(f"mra/refined_share/layer_{i}")[-1:]
        assert 0 < share.value <= 1
        (error,) = events.Scalars(f"mra/error_vs_exact/layer_{i}")[-1:]
        assert 0 < error.value < 1  # 8 of 16 blocks exact, the rest approximated
    table = _markdown_rows(_text(events, "test/acc_by_length"))
    assert sum(int(n) for _, n, _ in table) == num_test
    assert {"test/acc_by_length_plot", "test/confusion"} <= set(events.Tags()["images"])

    # --- wandb (offline) ---
    found = offline_run(run_dir)
    assert found["config"]["task"]["name"] == "listops"
    assert found["config"]["attn"]["block_per_row"] == 2
    for key in ("test_acc", "test_acc_last", "val_acc_best", "steps", "train_tokens_per_second"):
        assert found["summary"][key] == pytest.approx(results[key]), key
    history = found["history"]
    assert len(history["mra/blocks/layer_0/filenames"]) == 2
    (image_file,) = history["mra/blocks/layer_0/filenames"][-1]
    assert Image.open(found["folder"] / "files" / image_file).size == (256, 256)
    (table_file,) = history["test/acc_by_length/path"]
    table = json.loads((found["folder"] / "files" / table_file).read_text())
    assert table["columns"] == ["lengths", "n", "acc"]
    assert sum(row[1] for row in table["data"]) == num_test
    assert history["test/acc_last"] == [pytest.approx(results["test_acc_last"])]
    saved = {a.name: sorted(c.path for c in a.manifest.contents) for a in found["artifacts"]}
    assert saved[f"run-{found['header'].run_id}"] == ["config.yaml", "results.json"]


def test_no_pictures_switch(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run(compose_cfg([*DEMO, "logger=tensorboard", "callbacks=no_pictures"], run_dir=run_dir))
    events = _tensorboard(run_dir)
    assert events.Tags()["images"] == []
    assert not [t for t in events.Tags()["scalars"] if t.startswith("mra/")]
    assert "test/acc" in events.Tags()["scalars"]  # the rest is still logged
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()


def test_block_map_marks_refined_blocks_and_padding():
    chosen = torch.zeros(2, 3, 3, dtype=torch.bool)
    chosen[:, 0, 0] = True  # both heads
    chosen[0, 1, 1] = True  # one head
    counts = torch.tensor([32, 32, 0])  # the last block is padding
    image = block_map(chosen, counts, pixels=3).astype(int)
    assert image.shape == (3, 3, 3)
    blue, half, white, pad = image[0, 0], image[1, 1], image[0, 1], image[2, 0]
    assert blue[2] > blue[0] and blue[0] < 60
    assert white.tolist() == [255, 255, 255]
    assert blue[0] < half[0] < white[0]
    assert pad[0] == 255 and pad[1] < 200  # red tint
    assert image[2, 2].tolist() == image[0, 2].tolist() == pad.tolist()


def test_chosen_blocks_are_the_blocks_mra2s_attends():
    """MRA-2-s is softmax over the chosen blocks only: rebuilt from chosen_blocks, it matches
    the module's output, padding included."""
    torch.manual_seed(0)
    B, H, n, d, bs = 2, 2, 128, 16, 32
    q, k, v = (torch.randn(B, H, n, d) for _ in range(3))
    mask = torch.ones(B, n)
    mask[1, 90:] = 0
    attention = MRA2Sparse(block_per_row=1, backend="torch", block_size=bs)
    out = attention(q, k, v, mask)
    chosen, counts = attention.chosen_blocks(q, k, v, mask)
    assert chosen.shape == (B, H, 4, 4) and chosen.sum(dim=(2, 3)).eq(4).all()
    assert counts.tolist() == [[32] * 4, [32, 32, 26, 0]]
    allowed = chosen.repeat_interleave(bs, 2).repeat_interleave(bs, 3) & (mask[:, None, None] > 0)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    rows = allowed.any(-1)  # query rows with some chosen key
    expected = torch.softmax(scores, -1).nan_to_num() @ v
    real = mask[:, None, :, None] > 0
    torch.testing.assert_close(
        (out * rows[..., None] * real), (expected * real), atol=1e-4, rtol=1e-4
    )
