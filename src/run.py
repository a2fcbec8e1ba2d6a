"""Entry point: `python src/run.py [overrides]`, `python src/run.py -m model.lrn=true,false`."""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from alexlab.job import run_job


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_job(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))


if __name__ == "__main__":
    main()
