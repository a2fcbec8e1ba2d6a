"""Entry point: `python src/run.py [overrides]`, `python src/run.py -m model.lrn=true,false`."""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from alexlab.job import EXIT_BAD_INPUT, BadInput, run_job

log = logging.getLogger("alexlab")

# Hydra's own (basic) launcher runs a sweep's jobs one after another in this process. A job that fails
# there is noted and the sweep goes on, as under the submitit launchers (one process per job); the
# failures are listed at the end.
sweep = {"jobs": 0, "failures": []}  # failures: (line, crashed)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    params = hydra_cfg.sweeper.get("params") or {}
    if hydra_cfg.mode == RunMode.RUN and params:  # e.g. sweeps=lrn without -m: Hydra runs one job and says nothing
        choices = hydra_cfg.runtime.choices
        here = {key: choices[key] if key in choices else OmegaConf.select(cfg, key) for key in params}
        log.warning("sweeps=%s is a sweep (%s) and runs as one only with -m; this is one run, at %s",
                    choices.get("sweeps"), "; ".join(f"{key}: {value}" for key, value in params.items()),
                    ", ".join(f"{key}={value}" for key, value in here.items()))
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)  # as typed: `x=${nope}` too
    in_this_process = (hydra_cfg.mode == RunMode.MULTIRUN
                       and str(hydra_cfg.launcher.get("_target_", "")).endswith(".BasicLauncher"))
    if not in_this_process:
        run_job(cfg, hydra_cfg.runtime.output_dir, overrides)
        return
    sweep["jobs"] += 1
    job = f"#{hydra_cfg.job.num} {' '.join(overrides)}"
    try:
        run_job(cfg, hydra_cfg.runtime.output_dir, overrides)
    except BadInput as err:
        sweep["failures"].append((f"{job}: {err.reason}", False))
    except Exception as err:  # noqa: BLE001 - a crash fails this job, not the sweep; its traceback goes to run.log
        log.exception("job %s failed", job)
        run_log = f"{hydra_cfg.runtime.output_dir}/{hydra_cfg.job.name}.log"
        sweep["failures"].append((f"{job}: {type(err).__name__}: {err} (traceback: {run_log})", True))


if __name__ == "__main__":
    try:
        main()
    finally:  # also when a later job was interrupted (exit 3 stands): the earlier failures are still listed
        if sweep["failures"]:
            stopped = " run before the sweep stopped" if sys.exc_info()[0] is not None else " of the sweep"
            print(f"error: {len(sweep['failures'])} of {sweep['jobs']} jobs{stopped} failed:", file=sys.stderr)
            for line, _ in sweep["failures"]:
                print(f"  {line}", file=sys.stderr)
    if sweep["failures"]:
        sys.exit(1 if any(crashed for _, crashed in sweep["failures"]) else EXIT_BAD_INPUT)
