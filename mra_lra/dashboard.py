"""What wandb and TensorBoard show of a run, besides Lightning's scalars (README, "Dashboards").

Always: the resolved config (wandb config; TensorBoard hparams and a `config` text), and
results.json as the run's summary (wandb `run.summary` plus an artifact holding config.yaml and
results.json; TensorBoard's HParams table and a `results` text).

`Pictures` (conf/callbacks/default.yaml; `callbacks=no_pictures` turns it off):
- at each validation of an MRA run (mra, mra_s, flex_mra), one image per layer of the blocks MRA
  refined for a fixed validation example (the longest of the first batch), with the padding
  marked, and per layer the share of real block pairs refined and the distance of that layer's
  output from exact attention;
- after each test, accuracy against input length (table and plot, the bins of `eval.py
  predictions=true`) and the confusion matrix; keys end in `_last` for the last checkpoint's test.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger
from torchmetrics import CatMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from mra_lra.attention.mra import MRAAttention
from mra_lra.attention.softmax import exact_softmax, relative_error

# Above this many tokens the exact attention of one example (n x n per head) is not computed.
EXACT_MAX_LENGTH = 4096
WHITE, BLUE, RED = np.array([1.0, 1.0, 1.0]), np.array([0.08, 0.25, 0.65]), np.array([1, 0.62, 0.6])


def accuracy_by_length(lengths: np.ndarray, correct: np.ndarray, bins: int = 4) -> list[dict]:
    """Accuracy in `bins` equal-width length ranges from the shortest to the longest input (one
    range when all have the same length); empty ranges are left out."""
    low, high = int(lengths.min()), int(lengths.max())
    edges = np.unique(np.linspace(low, high + 1, bins + 1).astype(np.int64))
    rows = []
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        inside = (lengths >= start) & (lengths < stop)
        if inside.any():
            rows.append(
                {"min_length": int(start), "max_length": int(stop) - 1, "n": int(inside.sum()),
                 "acc": float(correct[inside].mean())}
            )  # fmt: skip
    return rows


def _markdown(rows: list[dict]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines += ["| " + " | ".join(cell(row[k]) for k in head) + " |" for row in rows]
    return "\n".join(lines)


def log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    """TensorBoard's `config` text (wandb holds the config from log_hyperparams)."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("config", "    " + text.replace("\n", "\n    "), 0)


def log_results(loggers: list[Logger], cfg: DictConfig, results: dict, out_dir: Path) -> None:
    """results.json as the run's summary, with config.yaml and results.json kept beside it."""
    numbers = {k: v for k, v in results.items() if isinstance(v, int | float)}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            run = logger.experiment
            run.summary.update(results)
            files = wandb.Artifact(f"run-{run.id}", type="run", description=str(out_dir))
            for name in ("config.yaml", "results.json"):
                if (out_dir / name).is_file():
                    files.add_file(str(out_dir / name))
            run.log_artifact(files)
        elif isinstance(logger, TensorBoardLogger):
            resolved = OmegaConf.to_container(cfg, resolve=True)
            logger.log_hyperparams(resolved, {f"results/{k}": v for k, v in numbers.items()}, 0)
            rows = [{"key": k, "value": v} for k, v in results.items()]
            logger.experiment.add_text("results", _markdown(rows), results["steps"])
        logger.save()


def block_map(chosen: torch.Tensor, counts: torch.Tensor, pixels: int = 256) -> np.ndarray:
    """An RGB image [S, S, 3] (uint8) of one example's refined blocks: row I, column J is query
    block I against key block J, blue by the share of heads that refined it; red tints blocks
    that hold only padding. chosen: bool [H, nb, nb], counts: real tokens per block [nb]."""
    share = chosen.float().mean(0).cpu().numpy()[..., None]
    pad = (counts.cpu() == 0).numpy()
    base = np.where((pad[:, None] | pad[None, :])[..., None], RED, WHITE)
    image = (base * (1 - share) + BLUE * share) * 255
    scale = max(1, pixels // share.shape[0])
    return image.round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1)


class _LayerProbe:
    """Forward hooks on the MRA layers that keep, for the longest example of one batch (the
    first of the longest), each layer's refined blocks and its relative distance from exact
    attention on real tokens."""

    def __init__(self, model: torch.nn.Module) -> None:
        layers = [m for m in model.modules() if isinstance(m, MRAAttention)]
        self.found: dict[int, tuple] = {}
        self.handles = [
            layer.register_forward_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]

    def _hook(self, index: int):
        def hook(layer: MRAAttention, args, kwargs, output) -> None:
            if index in self.found:  # retrieval's second document
                return
            q, k, v, *rest = args
            mask = rest[0] if rest else kwargs.get("mask")
            i = 0 if mask is None else int(mask.sum(-1).argmax())  # the longest (the first)
            q, k, v, out = (t[i : i + 1] for t in (q, k, v, output))
            mask = None if mask is None else mask[i : i + 1]
            chosen, counts = layer.chosen_blocks(q, k, v, mask)
            error = None
            if q.shape[2] <= EXACT_MAX_LENGTH:
                error = relative_error(out, exact_softmax(q, k, v, mask), mask)
            self.found[index] = (chosen[0], counts[0], error)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _log_image(logger: Logger, key: str, image: np.ndarray, step: int, caption: str) -> None:
    if isinstance(logger, WandbLogger):
        logger.log_image(key, [image], step=step, caption=[caption])
    else:
        logger.experiment.add_image(key, image, step, dataformats="HWC")


class Pictures(pl.Callback):
    """Block maps at validation and length/confusion tables at test (module docstring), for the
    run's wandb and TensorBoard loggers; nothing is computed when the run has neither."""

    def __init__(self, block_maps: bool = True, test_tables: bool = True) -> None:
        self.block_maps, self.test_tables = block_maps, test_tables
        self.probe: _LayerProbe | None = None

    @staticmethod
    def _loggers(trainer: pl.Trainer) -> list[Logger]:
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger | TensorBoardLogger)]

    # --- block maps ------------------------------------------------------------------------
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        wanted = self.block_maps and batch_idx == 0 and dataloader_idx == 0
        if wanted and trainer.is_global_zero and not trainer.sanity_checking:
            if self._loggers(trainer):
                self.probe = _LayerProbe(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        if self.probe is not None:
            self.probe.remove()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is None:
            return
        found, self.probe, step = self.probe.found, None, trainer.global_step
        scalars = {}
        for i, (chosen, counts, error) in sorted(found.items()):
            real = counts > 0
            pairs = real[:, None] & real[None, :]
            scalars[f"mra/refined_share/layer_{i}"] = (chosen & pairs).sum().item() / (
                chosen.shape[0] * max(int(pairs.sum()), 1)
            )
            if error is not None:
                scalars[f"mra/error_vs_exact/layer_{i}"] = error
            caption = (
                f"layer {i}, step {step}: query blocks (rows) x key blocks (columns) of the "
                "longest example of the first validation batch; blue: share of heads refining "
                "the block, red: padding"
            )
            for logger in self._loggers(trainer):
                image = block_map(chosen, counts)
                _log_image(logger, f"mra/blocks/layer_{i}", image, step, caption)
        for logger in self._loggers(trainer):
            logger.log_metrics(scalars, step)

    # --- test tables -------------------------------------------------------------------------
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        num_classes = pl_module.hparams.num_classes
        self.rows = CatMetric().to(pl_module.device)
        self.confusion = MulticlassConfusionMatrix(num_classes).to(pl_module.device)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args) -> None:
        if self.test_tables and self._loggers(trainer):
            preds, labels = outputs["prediction"], batch["label"]
            lengths = batch["mask"].sum(dim=-1).to(preds.dtype)
            self.rows.update(torch.stack([lengths, preds, labels], dim=-1))
            self.confusion.update(preds, labels)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.test_tables and self._loggers(trainer)) or not self.rows.update_count:
            return
        rows, matrix = self.rows.compute().cpu().numpy(), self.confusion.compute()  # all ranks'
        if not trainer.is_global_zero:
            return
        # matplotlib's np.asarray of a tensor: numpy 2's deprecation, not ours to act on
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            figure = self.confusion.plot(matrix)[0]
        suffix, step = pl_module.test_suffix, trainer.global_step
        bins = accuracy_by_length(rows[:, 0], rows[:, 1] == rows[:, 2])
        table = [
            {"lengths": f"{b['min_length']}-{b['max_length']}", "n": b["n"], "acc": b["acc"]}
            for b in bins
        ]
        plot = _length_plot(table, f"test accuracy by input length (step {step})")
        for logger in self._loggers(trainer):
            key = f"test/acc_by_length{suffix}"
            if isinstance(logger, WandbLogger):
                import wandb

                data = [list(row.values()) for row in table]
                logger.log_table(key, columns=list(table[0]), data=data)
                images = {f"{key}_plot": plot, f"test/confusion{suffix}": figure}
                logger.experiment.log({k: wandb.Image(v) for k, v in images.items()})
            else:
                logger.experiment.add_text(key, _markdown(table), step)
                logger.experiment.add_figure(f"{key}_plot", plot, step, close=False)
                logger.experiment.add_figure(f"test/confusion{suffix}", figure, step, close=False)
        import matplotlib.pyplot as plt

        plt.close(plot)
        plt.close(figure)


def _length_plot(table: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.2), layout="constrained")
    axes.bar([r["lengths"] for r in table], [r["acc"] for r in table], color="#2a5caa")
    for i, row in enumerate(table):
        axes.annotate(f"n={row['n']}", (i, row["acc"]), ha="center", va="bottom", fontsize=8)
    axes.set(xlabel="input length (tokens)", ylabel="accuracy", ylim=(0, 1.05), title=title)
    return figure
