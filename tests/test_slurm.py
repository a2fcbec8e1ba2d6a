"""The cluster path against a real SLURM (tests/slurm/cluster.sh start): sweeps through the slurm
launcher presets, a requeue after SLURM's warning signal, a failing array task, 2-task DDP on CPU.

Jobs are tiny (scale=tiny, one thread each: the test machine has 2 cores) and go through the
`slurm_1gpu` preset with the site settings a CPU-only cluster needs given on the command line.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, requires_fashion, run_cli

pytestmark = [requires_fashion, pytest.mark.slurm, pytest.mark.slow]

# What a site without GPUs sets for the slurm_1gpu preset; 10 minutes keeps SLURM's warning signal
# (120 s before the limit) out of the way unless a test sends it.
SLURM = ["hydra/launcher=slurm_1gpu", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]
TINY = ["scale=tiny", "trainer.threads=1"]


@pytest.fixture(autouse=True)
def cancel_leftover_jobs(tmp_path, slurm_env):
    """A failed test must not leave its jobs running on the cluster: cancel this test's jobs (a
    finished job may still be leaving the queue for a few seconds: give it that time first)."""
    yield
    job_ids = sorted({p.name for p in tmp_path.glob("**/.submitit/*") if p.is_dir()})
    if job_ids:
        wait_until_idle(slurm_env, timeout=15, jobs=job_ids, fail=False)
        subprocess.run(["scancel", *job_ids], env=dict(os.environ, **slurm_env), capture_output=True)


def records(sweep: Path) -> dict:
    """results.json of every job below `sweep`, by job directory name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("**/results.json"))}


def job_logs(sweep: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(sweep.glob("**/.submitit/*/*_log.*")))


def wait_until_idle(env: dict, timeout: float = 60, jobs: list | None = None, fail: bool = True) -> None:
    """Wait until the queue has none of `jobs` (default: no jobs at all)."""
    deadline = time.time() + timeout
    select = ["-j", ",".join(jobs)] if jobs else []
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-o", "%i", *select], env=dict(os.environ, **env),
                             capture_output=True, text=True)
        if not out.stdout.strip():
            return
        time.sleep(0.5)
    if fail:
        raise AssertionError(f"jobs still queued after {timeout} s: {out.stdout}")


def test_two_job_sweep_through_a_slurm_preset(tmp_path, slurm_env):
    proc = run_cli("-m", "model.lrn=true,false", *TINY, "trainer.epochs=1", "logger=none", *SLURM,
                   "hydra.sweep.dir=sweep", cwd=tmp_path, env_extra=slurm_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = records(tmp_path / "sweep")
    assert len(found) == 2
    assert sorted(r["config"]["model"]["lrn"] for r in found.values()) == [False, True]
    assert all(r["status"] == "completed" and r["processes"] == 1 for r in found.values())
    # They ran as SLURM array tasks: submitit's per-task logs are named <array job>_<task>.
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*_[01]"))) == 2


# USR2: SLURM's warning before the time limit (what submitit's job._interrupt() sends too): submitit
# requeues. `scontrol requeue` (as preemption does) sends SIGTERM and SLURM requeues by itself.
STOPS = {"usr2": ["scancel", "--signal=USR2"], "requeue": ["scontrol", "requeue"]}


def stop_after_first_epoch(run_args: list, stop_command: list, tmp_path: Path, env: dict) -> None:
    """Launch a one-job sweep (`run.py -m run_args`, sweep dir under tmp_path/sweep), run
    `stop_command JOB_ID` once its first epoch is recorded, and wait for the sweep to succeed."""
    sweep = subprocess.Popen([sys.executable, str(ROOT / "src" / "run.py"), "-m", *run_args],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and sweep.poll() is None:
        running = records(tmp_path / "sweep")
        if running and len(next(iter(running.values()))["history"]) >= 1:
            break
        time.sleep(0.1)
    else:
        sweep.kill()
        pytest.fail(f"the job never finished its first epoch: {sweep.communicate()}")
    (job_id,) = [p.name for p in (tmp_path / "sweep").glob("**/.submitit/*") if p.is_dir()]  # one job: no array
    subprocess.run([*stop_command, job_id], env=env, check=True)
    _, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, err[-3000:]


@pytest.mark.parametrize("stop", STOPS)
def test_a_stopped_job_is_requeued_and_resumes_in_place(tmp_path, slurm_env, stop):
    args = [*TINY, "trainer.epochs=3", "seed=7", "trainer.log_every_steps=3"]
    whole = run_cli(*args, "logger=none", "hydra.run.dir=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    # ${now:...} in the sweep dir: the requeued job must land in the dir the first one resolved.
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HOME=str(tmp_path), **slurm_env)
    stop_after_first_epoch([*args, "logger=wandb", *SLURM, "hydra.sweep.dir=sweep/${now:%H-%M-%S-%f}"],
                           STOPS[stop], tmp_path, env)

    assert len(list((tmp_path / "sweep").iterdir())) == 1  # one sweep dir, not one per start
    found = records(tmp_path / "sweep")
    assert len(found) == 1  # one variant, one results.json
    resumed, reference = next(iter(found.values())), json.loads((tmp_path / "whole" / "results.json").read_text())
    logs = job_logs(tmp_path / "sweep")
    if stop == "usr2":
        assert "Caught signal SIGUSR2" in logs and "Requeued job" in logs, logs[-3000:]
    assert "interrupted: stopped by signal" in logs and "DUE TO JOB REQUEUE" in logs, logs[-3000:]
    assert resumed["status"] == "completed"
    assert any("resumed from" in note for note in resumed["notes"])
    for key in ("train_loss", "train_top1_err", "val_loss", "val_top1_err", "val_top5_err"):
        assert [h[key] for h in resumed["history"]] == [h[key] for h in reference["history"]], key
    assert resumed["steps"] == reference["steps"]
    # One W&B run: both starts wrote offline runs under the same id.
    run_dir = Path(resumed["run_dir"])
    wandb_id = resumed["wandb"]["id"]
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(f"-{wandb_id}") for name in offline), offline
    assert (run_dir / "wandb_id.txt").read_text().strip() == wandb_id


def test_a_requeued_two_task_ddp_job_stops_together_and_resumes(tmp_path, slurm_env):
    """Both ranks get SIGTERM from `scontrol requeue`; they stop after the same step (they agree every
    few steps), rank 0 writes the checkpoint, and the requeued 2-task job resumes and ends as an
    uninterrupted 2-process run does (torchrun, same gloo sums). Against a 1-process run only float
    summation order differs, but over 48 steps that grows to about 1% in the loss: too loose to test."""
    args = [*TINY, "trainer.epochs=3", "seed=5", "model.dropout=0", "logger=none"]
    env = dict(os.environ, HOME=str(tmp_path), **slurm_env)
    whole = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={29400 + os.getpid() % 500}", str(ROOT / "src" / "run.py"), *args,
                            "hydra.run.dir=whole"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env=dict(env, TMPDIR=str(tmp_path)))  # torchrun's temporary folders: the test's
    assert whole.returncode == 0, whole.stderr[-3000:]
    stop_after_first_epoch([*args, *SLURM, "hydra.launcher.tasks_per_node=2", "hydra.sweep.dir=sweep"],
                           STOPS["requeue"], tmp_path, env)
    (resumed,) = records(tmp_path / "sweep").values()
    reference = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert "DUE TO JOB REQUEUE" in job_logs(tmp_path / "sweep")
    assert resumed["status"] == "completed" and resumed["processes"] == 2
    assert any("resumed from" in note for note in resumed["notes"])
    assert resumed["images_seen"] == reference["images_seen"] and reference["processes"] == 2
    for key in ("train_loss", "train_top1_err", "val_loss", "val_top1_err"):
        # the interrupted epoch's sums were added across ranks at the checkpoint: float64 order only
        assert [h[key] for h in resumed["history"]] == pytest.approx([h[key] for h in reference["history"]],
                                                                     rel=1e-9), key


def test_a_failing_array_task_fails_the_sweep_and_keeps_the_others(tmp_path, slurm_env):
    proc = run_cli("-m", "trainer.batch_size=64,0", *TINY, "trainer.epochs=1", "logger=none", *SLURM,
                   "hydra.sweep.dir=sweep", cwd=tmp_path, env_extra=slurm_env)
    wait_until_idle(slurm_env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a job of the sweep failed: trainer.batch_size"), proc.stderr[-3000:]
    found = records(tmp_path / "sweep")
    by_batch = {r["config"]["trainer"]["batch_size"]: r for r in found.values()}
    assert by_batch[64]["status"] == "completed"
    assert by_batch[0]["status"] == "failed" and "trainer.batch_size" in by_batch[0]["error"]
    report = subprocess.run([sys.executable, str(ROOT / "src" / "report.py"), "sweep"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    problems = (tmp_path / "sweep" / "report.md").read_text().split("## Problem runs")[1].split("##")[0]
    assert "failed" in problems and "batch_size=0" in problems, report.stderr[-2000:]
    assert "batch_size=64" not in problems


def test_two_task_ddp_matches_one_process(tmp_path, slurm_env):
    # 4 steps of a global batch of 256 (128 per task). Float summation order is the only difference:
    # about 5e-6 after 4 steps here (it grows with steps as ReLU/max-pool ties flip), while a wrong
    # shard or gradient scale moves weights by ~1e-2.
    args = [*TINY, "trainer.epochs=1", "trainer.batch_size=256", "model.dropout=0", "seed=3", "logger=none"]
    single = run_cli(*args, "hydra.run.dir=single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli("-m", *args, *SLURM, "hydra.launcher.tasks_per_node=2", "hydra.sweep.dir=sweep",
                  cwd=tmp_path, env_extra=slurm_env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (record,) = records(tmp_path / "sweep").values()
    reference = json.loads((tmp_path / "single" / "results.json").read_text())
    assert record["status"] == "completed" and record["processes"] == 2
    assert record["images_seen"] == reference["images_seen"] == 1024
    one = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)["model"]
    two = torch.load(Path(record["run_dir"]) / "checkpoint.pt", weights_only=True)["model"]
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=5e-5, msg=name)
    for key in ("train_loss", "val_loss"):
        assert record["final"][key] == pytest.approx(reference["final"][key], rel=1e-4), key
    for key in ("train_top1_err", "val_top1_err"):  # at most one image (of 1024 / 512) on the other side
        assert record["final"][key] == pytest.approx(reference["final"][key], abs=0.2), key


def test_a_partition_the_cluster_lacks_is_refused_in_one_line(tmp_path, slurm_env):
    proc = run_cli("-m", *TINY, "logger=none", *SLURM, "hydra.launcher.partition=no_such_partition",
                   "hydra.sweep.dir=sweep", cwd=tmp_path, env_extra=slurm_env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the sweep could not be submitted: sbatch") and "partition" in last.lower(), last
    assert "Traceback" not in proc.stderr
