"""Hydra's submitit launchers (conf/hydra/launcher/), with one change: a sweep that sbatch refuses,
or one of whose jobs fails, ends with one `error: ...` line instead of a traceback through Hydra and
submitit. Exit status 2 when nothing could be submitted (bad site settings, no SLURM controller),
1 when a job failed (the sweep's other jobs run on, each writing its own results.json).
(Hydra takes launchers only from the hydra_plugins namespace, hence this file's place.)
"""
import re
import subprocess
import sys
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
    def launch(self, job_overrides, initial_job_idx):
        try:
            return super().launch(job_overrides, initial_job_idx)
        except UncompletedJobError as err:
            sweep_dir = self.config.hydra.sweep.dir
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


class SlurmLauncher(_SaysWhy, submitit_launcher.SlurmLauncher):
    pass


class LocalLauncher(_SaysWhy, submitit_launcher.LocalLauncher):
    pass
