"""One Hydra job, start to finish: train, and leave a results.json that says how it ended.

Bad input (ConfigError) becomes one line on stderr and exit status 2; any other crash leaves
status=failed with the error and re-raises; a stop signal leaves status=interrupted (exit 3)
with a checkpoint that `resume=auto` continues from.
"""
from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alexlab.errors import ConfigError
from alexlab.tracking import Tracker
from alexlab.train import Interrupted, fit

log = logging.getLogger("alexlab")
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 3


def resolved_config(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # noqa: BLE001 - interpolation errors are user input errors
        raise ConfigError(f"config does not resolve: {err}") from err


def run_job(cfg: DictConfig, run_dir: str | Path, overrides: list[str]) -> dict:
    run_dir = Path(run_dir)
    tracker = None
    try:
        config = resolved_config(cfg)
        tracker = Tracker(run_dir, config, overrides, config["logger"], str(config.get("experiment")))
        state = fit(cfg, run_dir, tracker)
        record = tracker.finish("completed", state=state)
        final = record["final"] or {}
        log.info("completed: val top-1 error %.2f%%, top-5 %.2f%%, %.0f s; results in %s",
                 final.get("val_top1_err", float("nan")), final.get("val_top5_err", float("nan")),
                 record["wall_time_s"], tracker.results_path)
        return record
    except ConfigError as err:
        if tracker is not None:
            tracker.finish("failed", error=f"bad input: {err}")
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    except Interrupted as err:
        tracker.finish("interrupted", error=str(err))
        print(f"interrupted: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except BaseException as err:
        if tracker is not None:
            tracker.finish("failed", error="".join(traceback.format_exception_only(type(err), err)).strip())
        raise
