"""Train one LRA task with one attention: `python train.py task=listops attn=mra`.

Any config value can be overridden on the command line (see README, "The command line").
Returns the optimised metric so that Hydra sweepers (Optuna) can use it.
"""

import hydra
from omegaconf import DictConfig

from mra_lra.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = run(cfg)
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    value = results.get(metric.replace("/", "_"))
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
