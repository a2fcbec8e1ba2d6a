"""Hydra's submitit launchers (conf/hydra/launcher/), with one change: a sweep that sbatch refuses,
or one of whose jobs fails, ends with one `error: ...` line instead of a traceback through Hydra and
submitit. Exit status 2 when nothing could be submitted (bad site settings, no SLURM controller),
1 when a job failed (the sweep's other jobs run on, each writing its own results.json).
The local launcher also hands a SIGTERM sent to the sweep's command to its jobs (LocalLauncher).
(Hydra takes launchers only from the hydra_plugins namespace, hence this file's place.)
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from submitit.core.utils import UncompletedJobError


def _why(text: str, job: bool = True) -> str:
    """The job's own `error: ...` or `interrupted: ...` line if it wrote one (srun adds lines after it);
    else what its end says: stopped by a signal (exit status 3), never started, or ended without a word.
    job=False (sbatch's own error): its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip(" -\n")]
    ours = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    stopped = [line for line in lines if line.startswith("interrupted: ")]
    if ours or stopped or not job:
        return (ours or stopped or lines or ["(no message)"])[-1]
    if re.search(r"[Ee]xit(ed with exit)? code 3\b", text):
        return "interrupted (exit status 3: a stop signal, scancel say); the same command with hydra.sweep.dir= resumes it"
    if "No output/error stream produced" in text:
        return "it left no output: cancelled before it started?"
    if lines:
        return f"it ended without an error line (killed? cancelled?); its last line: {lines[-1]}"
    return "(no message)"


class _SaysWhy:
    stopped_by: str | None = None  # the signal the launcher handed to its jobs (LocalLauncher)

    def launch(self, job_overrides, initial_job_idx):
        try:
            returns = super().launch(job_overrides, initial_job_idx)
        except UncompletedJobError as err:
            sweep_dir = self.config.hydra.sweep.dir
            if self.stopped_by:
                self._stopped()
            if isinstance(err.__cause__, subprocess.CalledProcessError):  # sbatch itself failed
                print(f"error: the sweep could not be submitted: {_why(str(err), job=False)} "
                      f"(sbatch's script: {sweep_dir}/.submitit/)", file=sys.stderr)
                raise SystemExit(2) from None
            # "Job 123_0 (task: 0) with path DIR/123_0_result.pkl ... error stream": its logs are in DIR.
            logs = re.search(r"with path (\S+)", str(err))
            logs = f"{Path(logs.group(1)).parent}/" if logs else f"{sweep_dir}/.submitit/"
            print(f"error: a job of the sweep failed: {_why(str(err))} (its logs: {logs}); the other jobs run on, "
                  f"`python src/report.py {sweep_dir}` shows how each ended", file=sys.stderr)
            raise SystemExit(1) from None
        if self.stopped_by:  # every job completed (the signal came during their last validations): no next batch
            self._stopped()
        return returns

    def _wait_for_stopped_jobs(self) -> None:
        pass

    def _stopped(self):
        """After a stop signal: once every job has ended, one line and exit status 3."""
        self._wait_for_stopped_jobs()
        print(f"interrupted: the sweep got {self.stopped_by} and handed it to its jobs, which stopped at a checkpoint; "
              f"the same command with hydra.sweep.dir={self.config.hydra.sweep.dir} resumes them", file=sys.stderr)
        raise SystemExit(3) from None


class SlurmLauncher(_SaysWhy, submitit_launcher.SlurmLauncher):
    pass


def _local_job_controllers() -> list[int]:
    """The process ids of the submitit controllers this process started, one per local job (each
    hands a SIGTERM on to its job's tasks): its children (from /proc/*/stat, which every Linux kernel
    has) that run submitit.local._local."""
    me, controllers = os.getpid(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == me and b"submitit.local._local" in (proc / "cmdline").read_bytes():
                controllers.append(int(proc.name))
        except (OSError, IndexError, ValueError):  # ended meanwhile
            pass
    return controllers


class LocalLauncher(_SaysWhy, submitit_launcher.LocalLauncher):
    """The jobs run as this process's children. A SIGTERM to this process alone (`kill`, a container
    stopping) used to end it and leave the jobs running on, unwatched: it is handed to the jobs now
    (as SIGTERM), which checkpoint and stop (`interrupted`), and the sweep ends with exit status 3
    once they have; the same for Ctrl-C (SIGINT). It is handed on again every few seconds while they
    run, for a job still starting up, which has not yet installed the handler that checkpoints
    (alexlab.train.StopFlag).
    SIGINT is blocked in this thread while the jobs start, and the blocked mask is inherited: a
    terminal's Ctrl-C, which goes to every process of the foreground group, reaches this process
    alone (through a thread that does not block it), not submitit's controller of each job, which
    otherwise printed a KeyboardInterrupt traceback and killed its job a second later (SIGKILL), and
    not the jobs, which get the SIGTERM handed on instead."""

    RESEND_S = 5.0

    def launch(self, job_overrides, initial_job_idx):
        ended = threading.Event()

        def hand_on():
            while not ended.is_set():
                for pid in _local_job_controllers():
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except OSError:
                        pass
                ended.wait(self.RESEND_S)

        def stop(signum, frame):
            if not self.stopped_by:
                self.stopped_by = signal.Signals(signum).name
                # os.write, not print: the main thread may be inside a print to stderr
                os.write(2, f"{self.stopped_by}: handing it to the sweep's jobs and waiting for them to stop\n".encode())
                threading.Thread(target=hand_on, daemon=True, name="hand-on-sigterm").start()

        self.stopped_by = None
        previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        # the thread a process-wide SIGINT is delivered to: made before the block, so it does not block it
        threading.Thread(target=ended.wait, daemon=True, name="takes-sigint").start()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            ended.set()
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _wait_for_stopped_jobs(self) -> None:
        # Hydra's launcher stops at the first job that did not complete; the others (one still
        # starting up, say) are waited for here, while they are told again every RESEND_S.
        while _local_job_controllers():
            time.sleep(0.5)
