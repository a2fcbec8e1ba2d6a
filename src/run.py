"""Entry point: `python src/run.py [overrides]`, `python src/run.py -m model.lrn=true,false`."""
import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from alexlab.job import run_job


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.sweeper.get("params") or {}
    if hydra_cfg.mode == RunMode.RUN and sweep:  # e.g. sweeps=lrn without -m: Hydra runs one job and says nothing
        choices = hydra_cfg.runtime.choices
        here = {key: choices[key] if key in choices else OmegaConf.select(cfg, key) for key in sweep}
        logging.getLogger("alexlab").warning(
            "sweeps=%s is a sweep (%s) and runs as one only with -m; this is one run, at %s",
            choices.get("sweeps"), "; ".join(f"{key}: {value}" for key, value in sweep.items()),
            ", ".join(f"{key}={value}" for key, value in here.items()))
    run_job(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))


if __name__ == "__main__":
    main()
