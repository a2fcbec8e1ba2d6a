"""Where a run's record goes: `results.json` in the run directory (always) and Weights & Biases
(logger=wandb). The report reads results.json files only.

results.json is rewritten atomically at the start, after every epoch and at the end, so it always
says where the run stands: status running / completed / failed / interrupted.
"""
from __future__ import annotations

import json
import logging
import netrc
import os
import platform
import resource
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from alexlab.errors import ConfigError, first_line
from alexlab.io import atomic_write_bytes, atomic_write_json

RESULTS_NAME = "results.json"
WANDB_ID_NAME = "wandb_id.txt"
log = logging.getLogger("alexlab")


def library_versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "hydra-core", "omegaconf", "wandb", "numpy", "submitit"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict:
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty if commit else None}


def device_name(device: str) -> str:
    import torch  # here, so that the report can import this module without torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def wandb_mode() -> str:
    """WANDB_MODE wins; else online only when an API key is configured, so nothing waits on a login prompt."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended and been waited for: the
    DataLoader workers, which do most of the CPU work of a run that reads image files and end after
    each epoch. Children still running are not counted (data.decode=gpu_process's decoder
    processes live as long as the run's data)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class _Silent:
    def update(self, n=1):
        pass

    def close(self):
        pass


class Tracker:
    """Writes results.json and mirrors epochs to W&B. `variant` names what the run changes."""

    def __init__(self, run_dir, config: dict, overrides: list[str], logger_cfg: dict, experiment: str,
                 processes: int = 1, continues: bool = False):
        """continues: the run resumes from its directory's checkpoint, so it keeps the earlier process's
        clock, start time and W&B run; otherwise whatever an earlier run left there is started over."""
        self.run_dir = Path(run_dir)
        self.results_path = self.run_dir / RESULTS_NAME
        self.overrides = list(overrides)
        self.logger_cfg = dict(logger_cfg)
        self.wandb_run = None
        self.wandb_id = None
        self.t0 = time.perf_counter()
        self.cpu0 = cpu_seconds()
        self.continues, self.started, self.trains = continues, False, False
        previous = self._previous() if continues else {}
        self._kept = previous  # what the directory said before this process: put back by keep_previous
        self.record = {
            "status": "running",
            "error": None,
            "experiment": experiment,
            "variant": variant_name(overrides),
            "overrides": self.overrides,
            "config": config,
            # a continued run keeps what it had trained until start() reads it from the checkpoint: one
            # that stops or crashes before then once recorded the outcome with no history at all
            "history": list(previous.get("history") or []),
            "steps": list(previous.get("steps") or []),
            "final": previous.get("final"),
            "best": previous.get("best"),
            "notes": list(previous.get("notes") or []),  # a continued run keeps what was noted before
            "num_classes": None,
            "skipped_files": [],  # [{path, reason}]: unreadable files left out (data.on_bad_file=skip)
            "images_seen": previous.get("images_seen", 0),
            "wall_time_s": previous.get("wall_time_s", 0.0),
            "cpu_time_s": previous.get("cpu_time_s", 0.0),
            "device": config.get("device"),
            "device_name": None,
            "processes": processes,  # data parallel ranks (alexlab.distributed)
            "versions": library_versions(),
            "git": git_commit(),
            "host": platform.node(),
            "started_at": previous.get("started_at") or datetime.now(timezone.utc).isoformat(),
            "finished_at": None,
            "run_dir": str(self.run_dir),
            "wandb": previous.get("wandb"),  # a continued run that trains no more keeps its W&B run's
        }
        self._base_wall, self._base_cpu = self.record["wall_time_s"], self.record["cpu_time_s"]
        if not previous:  # a continued run's record stays as it was until it trains (start) or ends (finish):
            self._write()  # a finished run run again and killed meanwhile was left `running`, its history gone

    def _previous(self) -> dict:
        try:
            return json.loads(self.results_path.read_text())
        except (OSError, ValueError):
            return {}

    def _write(self) -> None:
        self.record["wall_time_s"] = self._base_wall + time.perf_counter() - self.t0
        self.record["cpu_time_s"] = self._base_cpu + cpu_seconds() - self.cpu0
        atomic_write_json(self.record, self.results_path)

    def note(self, text: str) -> None:
        log.info(text)
        self.record["notes"].append(text)

    def dataset(self, num_classes: int, skipped_files: list[dict], train_images: int | None = None,
                val_majority_err: float | None = None) -> None:
        self.record["num_classes"] = num_classes  # the report's chance level: 100 * (1 - 1/num_classes),
        self.record["val_majority_err"] = val_majority_err  # or, where lower, the error of always guessing one class
        self.record["train_images"] = train_images
        self.record["skipped_files"] = list(skipped_files)
        if skipped_files:
            self.note(f"{len(skipped_files)} unreadable file(s) left out (data.on_bad_file=skip); "
                      "listed in skipped_files")

    @property
    def previous_status(self) -> str | None:
        """The status of the record this process found, where it continues a run."""
        return self._kept.get("status") if self.continues else None

    def keep_previous(self) -> bool:
        """Where this process continues a run and stopped on bad input (data.root mistyped), a signal or
        a crash before it started training: put back the record it found, so that a completed or interrupted
        run is not marked failed (or a completed one interrupted) by a rerun that never trained. False
        where there is nothing to put back."""
        if not (self.continues and self._kept and not self.started):
            return False
        atomic_write_json(self._kept, self.results_path)
        return True

    def keep_finished(self) -> bool:
        """keep_previous, where the record this process found says completed: a finished run run again
        that stopped before it trained stays completed; any other record takes the new outcome."""
        return self.previous_status == "completed" and self.keep_previous()

    def start(self, resumed_history: list, device: str | None = None, trains: bool = True) -> None:
        """trains=False: a continued run with nothing left to train (a finished sweep job run again)
        opens no W&B run, which would be an empty second one under the same id."""
        if self.logger_cfg.get("name") == "wandb" and trains:
            self._start_wandb()  # bad input (W&B online without a key) before the record is changed: keep_previous
        self.started, self.trains = True, trains
        self.record["history"] = list(resumed_history)
        if trains:  # final and best are the finished run's (finish): a record killed mid-run shows none
            self.record["final"] = self.record["best"] = None
            self.record["images_seen"] = resumed_history[-1].get("images_seen", 0) if resumed_history else 0
        if device:
            self.record["device"], self.record["device_name"] = device, device_name(device)
        if trains or not self._kept:
            self._write()

    def _start_wandb(self) -> None:
        import wandb
        id_file = self.run_dir / WANDB_ID_NAME
        self.wandb_id = id_file.read_text().strip() if self.continues and id_file.is_file() else uuid.uuid4().hex[:12]
        atomic_write_bytes(self.wandb_id.encode(), id_file)
        mode = wandb_mode()
        tags = list(self.logger_cfg.get("tags") or [])
        try:
            self.wandb_run = wandb.init(
                project=self.logger_cfg.get("project"), entity=self.logger_cfg.get("entity"),
                group=self.record["experiment"], job_type=self.record["variant"],
                name=" ".join(self.overrides) or "default", config=self.record["config"], tags=tags,
                dir=str(self.run_dir), id=self.wandb_id, resume="allow", mode=mode,
                settings=wandb.Settings(x_disable_stats=not self.logger_cfg.get("system_stats", True)))
        except Exception as err:  # noqa: BLE001 - online without a key or a network: one line, not wandb's traceback
            raise ConfigError(f"W&B ({mode}) could not start the run: {type(err).__name__}: {first_line(err)}; "
                              "`wandb login`, WANDB_MODE=offline (the default without a key) or logger=none") from err
        self.wandb_run.summary["status"] = "running"  # not the "completed" of a finished run continued with more epochs
        self.record["wandb"] = {"id": self.wandb_id, "mode": mode, "dir": str(Path(self.wandb_run.dir).parent),
                                "url": getattr(self.wandb_run, "url", None)}

    def progress(self, total: int, initial: int, desc: str):
        if not sys.stderr.isatty():
            return _Silent()
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

    def log_epoch(self, metrics: dict, steps: list) -> None:
        self.record["history"].append(metrics)
        self.record["steps"] = list(steps)
        self.record["images_seen"] = metrics["images_seen"]
        log.info("epoch %d  train loss %.4f err %.2f%%  val err top1 %.2f%% top5 %.2f%%  lr %.2g  %.1fs  %.0f img/s",
                 metrics["epoch"], metrics["train_loss"], metrics["train_top1_err"], metrics["val_top1_err"],
                 metrics["val_top5_err"], metrics["lr"], metrics["epoch_time_s"], metrics["images_per_s"])
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(metrics, step=metrics["steps"])
            except Exception as err:  # noqa: BLE001 - W&B's service process died (SLURM's SIGTERM reaches it too)
                self.note(f"W&B stopped at epoch {metrics['epoch']} ({type(err).__name__}: {first_line(err)}); "
                          "results.json goes on")
                self.wandb_run = None
        self._write()

    def finish(self, status: str, error: str | None = None, state: dict | None = None) -> dict:
        if status == "completed" and not self.trains and self._kept.get("status") == "completed":
            atomic_write_json(self._kept, self.results_path)  # a finished run run again: its record as it was
            return self._kept
        self.record["status"] = status
        self.record["error"] = error
        history = self.record["history"]
        if state is not None:
            self.record["steps"] = list(state.get("steps", []))
            self.record["images_seen"] = state.get("images_seen", self.record["images_seen"])
        if history:
            self.record["final"] = history[-1]
            self.record["best"] = min(history, key=lambda m: m["val_top1_err"])
        self.record["finished_at"] = datetime.now(timezone.utc).isoformat()
        self._write()
        if self.wandb_run is not None:
            try:
                if history:
                    self.wandb_run.summary.update({f"final/{k}": v for k, v in history[-1].items()})
                    self.wandb_run.summary.update({f"best/{k}": v for k, v in self.record["best"].items()})
                # what the report's cost table needs from a run read back from W&B (report --wandb)
                self.wandb_run.summary.update({k: self.record[k] for k in ("device", "processes", "wall_time_s", "cpu_time_s")})
                self.wandb_run.summary["status"] = status
                self.wandb_run.finish(exit_code=0 if status == "completed" else 1)
            except Exception as err:  # noqa: BLE001 - e.g. SLURM's SIGTERM killed W&B's service process too
                log.warning("W&B could not finish the run (%s); results.json has the record", err)
            self.wandb_run = None
        return self.record


class NullTracker:
    """What ranks other than 0 report to: nothing (rank 0 writes results.json and W&B)."""

    def __init__(self, run_dir):
        self.results_path = Path(run_dir) / RESULTS_NAME

    def note(self, text: str) -> None:
        pass

    def dataset(self, num_classes: int, skipped_files: list[dict], train_images: int | None = None,
                val_majority_err: float | None = None) -> None:
        pass

    def keep_finished(self) -> bool:
        return False  # rank 0 keeps or writes the record

    def start(self, resumed_history: list, device: str | None = None, trains: bool = True) -> None:
        pass

    def progress(self, total: int, initial: int, desc: str):
        return _Silent()

    def log_epoch(self, metrics: dict, steps: list) -> None:
        pass

    def finish(self, status: str, error: str | None = None, state: dict | None = None) -> dict:
        return {"status": status, "error": error}


def variant_name(overrides: list[str]) -> str:
    """The overrides that define the variant (not the seed): the W&B job_type and the report's key."""
    ignored = ("seed=", "hydra.", "sweeps=", "logger", "resume=", "device=", "experiment=")
    kept = sorted(o for o in overrides if not o.lstrip("+~").startswith(ignored))
    return ",".join(kept) or "baseline"
