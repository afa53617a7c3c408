"""Compose -> instantiate -> fit -> test at the best and last checkpoints -> results.json.

`run(cfg)` is what the Hydra entry point (train.py at the repository root) calls; tests call it
with configs composed through Hydra's compose API.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from mra_lra.models.module import LRALitModule

log = logging.getLogger(__name__)


def _wandb_mode_default() -> None:
    """wandb works without an account: offline unless the user logged in or chose a mode."""
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"


def protocol_card(cfg: DictConfig) -> str:
    """The settings that decide what a number means, printed at start-up and kept in results."""
    attn = OmegaConf.to_container(cfg.attn, resolve=True)
    lines = [
        f"task={cfg.task.name} attn={attn.pop('name')} seed={cfg.seed}",
        f"attention options: {attn}",
        f"data: dir={cfg.data.data_dir} max_length={cfg.data.max_length} "
        f"batch_size={cfg.data.batch_size}",
        f"model: d_model={cfg.model.d_model} layers={cfg.model.n_layers} heads={cfg.model.n_heads}"
        f" d_ffn={cfg.model.d_ffn} dropout={cfg.model.dropout} pooling={cfg.model.pooling}",
        f"optimiser: lr={cfg.optimizer.lr} warmup={cfg.scheduler.warmup_steps} "
        f"steps={cfg.trainer.max_steps} eval_every={cfg.trainer.val_check_interval} "
        f"precision={cfg.trainer.precision}",
    ]
    return "\n".join(lines)


def _peak_memory_mb() -> tuple[float, str]:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1024, "cpu_max_rss"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _checkpoint_paths(trainer: pl.Trainer, out_dir: Path) -> tuple[str, str]:
    """Best (monitored) checkpoint path, and last.ckpt holding the final state.

    last.ckpt is written after each validation; when training ended between validations it is
    rewritten here (a checkpoint saved at a validation step resumes mid-run exactly, so an
    up-to-date one is left as it is)."""
    best = ""
    for cb in trainer.checkpoint_callbacks:
        if cb.monitor is not None and cb.best_model_path:
            best = cb.best_model_path
    last = out_dir / "checkpoints" / "last.ckpt"
    if not last.is_file() or _checkpoint_step(last) != trainer.global_step:
        trainer.save_checkpoint(last)
    return best, str(last)


def _checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def run(cfg: DictConfig) -> dict:
    """Train and test one configuration; returns the results written to results.json."""
    start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("protocol card\n%s", protocol_card(cfg))
    pl.seed_everything(cfg.seed, workers=True)
    if "wandb" in cfg.logger:
        _wandb_mode_default()

    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    net = hydra.utils.instantiate(cfg.model, _convert_="all")
    module = LRALitModule(
        net=net,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        num_classes=cfg.task.num_classes,
    )
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values()]
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    steps = trainer.global_step
    fit_tokens_per_second = module.train_tokens / max(module.train_seconds, 1e-9)
    val_acc_best = (
        module.val_acc_best.compute().item() if module.val_acc_best.update_count else None
    )

    best_path, last_path = _checkpoint_paths(trainer, out_dir)
    best_step = None
    if best_path:
        best_step = _checkpoint_step(Path(best_path))
    test_acc = test_acc_last = None
    if cfg.test:
        test_acc_last = trainer.test(module, datamodule=datamodule, ckpt_path=last_path)[0][
            "test/acc"
        ]
        if best_path:
            test_acc = trainer.test(module, datamodule=datamodule, ckpt_path=best_path)[0][
                "test/acc"
            ]
        else:
            log.warning("no validation ran, so there is no best checkpoint; test_acc is null")

    majority = getattr(datamodule, "majority_baseline", None)
    peak_mb, peak_kind = _peak_memory_mb()
    attn_options = OmegaConf.to_container(cfg.attn, resolve=True)
    results = {
        "task": cfg.task.name,
        "attn": attn_options.pop("name"),
        "attn_options": attn_options,
        "seed": cfg.seed,
        "max_length": cfg.data.max_length,
        "test_acc": test_acc,
        "test_acc_last": test_acc_last,
        "val_acc_best": val_acc_best,
        "majority_class_test_acc": majority() if majority and datamodule.datasets else None,
        "best_step": best_step,
        "steps": steps,
        "wall_seconds": time.perf_counter() - start,
        "train_tokens_per_second": fit_tokens_per_second,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": peak_kind,
        "params": sum(p.numel() for p in net.parameters()),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "precision": str(cfg.trainer.precision),
    }
    _write_json(out_dir / "results.json", results)
    for logger in loggers:
        logger.log_metrics(
            {f"final/{k}": v for k, v in results.items() if isinstance(v, int | float)}, step=steps
        )
        logger.save()
    log.info("results: %s", json.dumps({k: results[k] for k in ("test_acc", "val_acc_best")}))
    print(
        f"{results['task']} / {results['attn']}: test accuracy {test_acc} at the best validation "
        f"step {best_step} ({test_acc_last} at the last step {steps}); majority-class baseline "
        f"{results['majority_class_test_acc']}; results in {out_dir / 'results.json'}",
        flush=True,
    )
    return results
