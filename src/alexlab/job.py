"""One Hydra job, start to finish: train, and leave a results.json that says how it ended.

Bad input (ConfigError) becomes one line on stderr and exit status 2 (raised as BadInput, so a
sweep run in one process can go on to its next job); any other crash leaves status=failed with the
error and re-raises; a stop signal leaves status=interrupted (exit 3)
with a checkpoint that `resume=auto` continues from. Under submitit, the warning signal (USR2) then
also requeues the job (see `requeue_under_submitit`). With several processes (alexlab.distributed)
only rank 0 writes results.json and W&B. Before anything is written, the job takes the run
directory's lock (a second process there stops with exit 2) and checks that a checkpoint it would
resume from was written under the same experiment (alexlab.train.check_resume; else exit 2 too).
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from alexlab import distributed
from alexlab.errors import ConfigError, first_line
from alexlab.io import lock_directory
from alexlab.tracking import RESULTS_NAME, NullTracker, Tracker
from alexlab.train import CHECKPOINT_NAME, Interrupted, StopFlag, check_config, check_resume, fit

log = logging.getLogger("alexlab")
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 3
MAX_JOB_DIR_NAME = 200  # bytes: file systems take 255 in one name, and Hydra puts "<job number>_" before it


def job_dir_name(overrides: str) -> str:
    """A sweep job's folder name (conf/config.yaml's hydra.sweep.subdir): its overrides as Hydra joins
    them, cut short with a hash of the whole where they would pass a file name's length (a sweep with
    many overrides once died with "File name too long" before any job ran). Every job's full overrides
    are in its .hydra/overrides.yaml and results.json."""
    encoded = overrides.encode()
    if len(encoded) <= MAX_JOB_DIR_NAME:
        return overrides
    digest = hashlib.sha1(encoded).hexdigest()[:10]
    return encoded[:MAX_JOB_DIR_NAME - 12].decode(errors="ignore") + "..." + digest


class CheckOutputDir(Callback):
    """A Hydra callback (conf/config.yaml, hydra.callbacks): the run's or the sweep's folder must be one
    this user can write, else one `error:` line and exit 2 before anything starts (Hydra made it later,
    in a traceback: a read-only file system, a path through a file)."""

    def _check(self, config: DictConfig, key: str) -> None:
        try:
            folder = OmegaConf.select(config, key)
        except Exception:  # noqa: BLE001 - ${hydra:...} resolves only once the job runs: left to Hydra
            return
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            print(f"error: cannot write the output folder {folder}: {err.strerror or err} "
                  "(hydra.run.dir, or hydra.sweep.dir with -m)", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")


# Registered where run.py imports this module, and in each job process of the submitit launchers,
# which unpickle run.py's task function (and with it this module) before they name the job's folder.
OmegaConf.register_new_resolver("alexlab.job_dir_name", job_dir_name, replace=True)


class BadInput(SystemExit):
    """Exit status 2 that keeps its one-line reason, for a sweep whose jobs run in one process (run.py)."""

    def __init__(self, reason: str):
        super().__init__(EXIT_BAD_INPUT)
        self.reason = reason


def resolved_config(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # noqa: BLE001 - interpolation errors are user input errors
        where = getattr(err, "full_key", None)  # OmegaConf's message goes on with full_key and object_type lines
        raise ConfigError(f"config does not resolve: {first_line(err)}"
                          + (f" (at {where})" if where else "")) from err


def requeue_under_submitit(signum: int) -> None:
    """Hand a stopped run back to submitit, which requeues the job.

    Our StopFlag replaced submitit's USR2 handler while training (so the step in flight finishes and
    the checkpoint is written first) and restored it when fit returned. Calling that handler now does
    what submitit always does: rank 0 asks the launcher for its `checkpoint()` (the same Hydra job
    with the same arguments, so the same output directory), counts timeouts against
    max_num_timeout, runs `scontrol requeue` and exits. The requeued job resumes from checkpoint.pt
    and the Tracker reuses the W&B id kept in wandb_id.txt. SIGTERM (preemption, scancel, scontrol
    requeue) is left to SLURM: it requeues preempted jobs itself.
    """
    from submitit.core.job_environment import SignalHandler
    handler = signal.getsignal(signum)
    if getattr(handler, "__func__", None) is SignalHandler.checkpoint_and_try_requeue:
        handler(signum, None)


def run_job(cfg: DictConfig, run_dir: str | Path, overrides: list[str]) -> dict:
    run_dir = Path(run_dir)
    tracker, lock, config = None, None, None
    world = distributed.World()
    completed, may_write = False, False
    try:
        config = resolved_config(cfg)
        cuda = config["device"] != "cpu" and _cuda_available()
        world = distributed.init(cuda=cuda)
        # one process (one group of ranks) trains in a run directory at a time: a second launch of the same
        # command, say, would write the same checkpoint and results.json and W&B run in turns
        lock, holder = lock_directory(run_dir) if world.is_main else (None, 0)
        if world.max_int(int(holder != 0), torch_device(cuda, world)):  # every rank stops, not rank 0 alone
            raise ConfigError(f"another process{f' (pid {holder})' if holder > 0 else ''} is training in {run_dir}: "
                              "wait for it to end, or run in another directory")
        may_write = True
        # Before anything is written, the values, then the checkpoint to resume from: a rerun refused for
        # either (a typo, another experiment) leaves the directory's record as it was.
        check_config(cfg)
        resuming = check_resume(run_dir, config)
        earlier = run_dir / CHECKPOINT_NAME
        if resuming is None and world.is_main and earlier.is_file():  # resume=never: an earlier run's checkpoint
            earlier.unlink()  # goes now, so that a requeued job resumes from this run's alone
        # From here a stop signal is a stop (status interrupted, exit 3), also while the data loads.
        with StopFlag() as stop:
            tracker = make_tracker(run_dir, config, overrides, world, resuming is not None)
            state = fit(cfg, run_dir, tracker, world, resuming, stop)
            # under the flag too: a Ctrl-C while W&B closes the run (a second or so) once raised there,
            # and the completed run was recorded as failed
            record = tracker.finish("completed", state=state)
        completed = True
        if stop.signum and os.environ.get("SUBMITIT_EXECUTOR"):  # a job of its own: done, as its record says
            print(f"{signal.Signals(stop.signum).name} came after the last training step; this run completed",
                  file=sys.stderr, flush=True)  # (an exit 3 here made submitit count the completed job as failed)
        elif stop.signum:  # came during the last validation: the run is complete, but the sweep stops here
            print(f"interrupted: {signal.Signals(stop.signum).name} came after the last training step; this run "
                  "completed, and nothing more runs", file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED)
        if not world.is_main:
            return record
        final = record["final"] or {}
        log.info("completed: val top-1 error %.2f%%, top-5 %.2f%%, %.0f s; results in %s",
                 final.get("val_top1_err", float("nan")), final.get("val_top5_err", float("nan")),
                 record["wall_time_s"], tracker.results_path)
        return record
    except ConfigError as err:
        if tracker is None and may_write and not (run_dir / RESULTS_NAME).exists():
            tracker = make_tracker(run_dir, config, overrides, world, False)  # a new run's record says why it failed
        if tracker is not None and not (isinstance(tracker, Tracker) and tracker.keep_previous()):
            tracker.finish("failed", error=f"bad input: {err}")
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise BadInput(str(err)) from None
    except Interrupted as err:
        if not tracker.keep_finished():  # a finished run stays completed; any other is interrupted
            tracker.finish("interrupted", error=str(err), state=err.state)
        print(f"interrupted: {err}", file=sys.stderr, flush=True)
        requeue_under_submitit(err.signum)
        sys.exit(EXIT_INTERRUPTED)
    except BaseException as err:
        # a crash before a finished run run again trained (its data folder unreadable now, say) leaves it completed;
        # any other run records the crash (one left `running` by a kill, or interrupted, would hide it)
        if tracker is not None and not completed and not tracker.keep_finished():
            tracker.finish("failed", error="".join(traceback.format_exception_only(type(err), err)).strip())
        raise
    finally:
        world.close(completed)
        if lock is not None:
            os.close(lock)


def make_tracker(run_dir: Path, config: dict, overrides: list[str], world: distributed.World, continues: bool):
    if world.is_main:  # rank 0 writes results.json and W&B
        return Tracker(run_dir, config, overrides, config["logger"], str(config.get("experiment")),
                       processes=world.size, continues=continues)
    return NullTracker(run_dir)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def torch_device(cuda: bool, world: distributed.World):
    """This rank's device for collectives (NCCL's are on the GPU)."""
    import torch
    return torch.device("cuda", world.local_rank) if cuda and world.size > 1 else torch.device("cpu")
