"""Launcher presets: they compose, and the local submitit launcher runs real jobs."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF, requires_fashion, run_cli


@pytest.mark.parametrize("preset,tasks,gpus,nodes", [("slurm_1gpu", 1, 1, 1), ("slurm_8gpu", 8, 8, 1),
                                                       ("slurm_multinode", 8, 8, 2)])
def test_slurm_presets_compose_with_site_overrides(preset, tasks, gpus, nodes):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[f"hydra/launcher={preset}", "hydra.launcher.partition=gpu",
                                 "hydra.launcher.timeout_min=30", "hydra.launcher.account=proj",
                                 "hydra.launcher.mem_gb=32", "hydra.launcher.cpus_per_task=4",
                                 "hydra.launcher.signal_delay_s=300", "hydra.launcher.max_num_timeout=3",
                                 "hydra.launcher.setup=[module load cuda]"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (tasks, gpus, nodes)
    assert (launcher.partition, launcher.account, launcher.timeout_min, launcher.mem_gb, launcher.cpus_per_task,
            launcher.signal_delay_s, launcher.max_num_timeout) == ("gpu", "proj", 30, 32, 4, 300, 3)
    assert list(launcher.setup) == ["module load cuda"]


@requires_fashion
@pytest.mark.slow
def test_local_submitit_launcher_runs_two_jobs(tmp_path):
    proc = run_cli("-m", "hydra/launcher=local", "model.lrn=true,false", "scale=tiny", "trainer.epochs=1",
                   "logger=none", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))]
    assert sorted(r["config"]["model"]["lrn"] for r in records) == [False, True]
    assert all(r["status"] == "completed" for r in records)


def test_process_layout_comes_from_torchrun_or_an_srun_step():
    from alexlab.distributed import World, world_from_env

    assert world_from_env({}) == (World(), {})
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert world_from_env(torchrun) == (World(3, 8, 1), {})
    step = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": "123", "SLURM_STEP_NODELIST": "node1", "MASTER_ADDR": "node1"}
    world, rendezvous = world_from_env(step)
    assert world == World(1, 2, 1)
    assert rendezvous == {"MASTER_ADDR": "node1", "MASTER_PORT": "20123", "RANK": "1", "WORLD_SIZE": "2",
                          "LOCAL_RANK": "1"}
    # The batch script itself (no srun step) is one process, whatever the allocation's task count.
    batch = {k: v for k, v in step.items() if k != "SLURM_STEP_ID"}
    assert world_from_env(batch) == (World(), {})


def test_a_sweep_sbatch_refuses_ends_in_one_line_and_exit_2(tmp_path):
    # No such partition on any cluster, and without one here sbatch finds no controller: refused either way.
    proc = run_cli("-m", "hydra/launcher=slurm_1gpu", "hydra.launcher.partition=no_such_partition", "scale=tiny",
                   "logger=none", "hydra.sweep.dir=sweep", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the sweep could not be submitted: sbatch") and "sweep/.submitit/" in last, last
    assert not list((tmp_path / "sweep").glob("**/results.json"))


@requires_fashion
@pytest.mark.slow
def test_a_failing_job_ends_the_sweep_in_one_line_and_the_others_finish(tmp_path):
    proc = run_cli("-m", "hydra/launcher=local", "model.towers=3,1", "scale=tiny", "trainer.epochs=1",
                   "logger=none", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a job of the sweep failed: model.towers must be 1 or 2, got 3"), last
    logs = last.split("(its logs: ")[1].split(")")[0]
    assert "model.towers must be 1 or 2" in "".join(p.read_text() for p in Path(logs).glob("*_log.err"))
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))]
    assert sorted((r["config"]["model"]["towers"], r["status"]) for r in records) == [(1, "completed"),
                                                                                      (3, "failed")]


@pytest.mark.parametrize("text,why", [
    # submitit's error texts as they came from jobs on the test cluster and under the local launcher
    ("Job 12_0 (task: 0) with path /s/.submitit/12_0/12_0_0_result.pkl\nhas not produced any output (state: FAILED)\n"
     "Error stream produced:\n----------------------------------------\nerror: trainer.batch_size must be a positive "
     "integer, got 0\nsrun: error: vm: task 0: Exited with exit code 2\n",
     "trainer.batch_size must be a positive integer, got 0"),
    ("Error stream produced:\n----\nsrun: error: vm: task 0: Exited with exit code 3\n",
     "interrupted (exit status 3: a stop signal, scancel say); the same command with hydra.sweep.dir= resumes it"),
    ("Error stream produced:\ninterrupted: stopped by signal SIGTERM; checkpoint written, resume=auto continues\n"
     "srun: error: vm: task 0: Exited with exit code 3\n",
     "interrupted: stopped by signal SIGTERM; checkpoint written, resume=auto continues"),
    ("Job 13_1 (task: 0) with path /s/13_1_0_result.pkl\nhas not produced any output (state: CANCELLED)\n"
     "No output/error stream produced ! Check: /s/13_1_0_log.out\n",
     "it left no output: cancelled before it started?"),
    ("Error stream produced:\n[2026-11-28 04:01:02][alexlab][INFO] - epoch 1  train loss 2.2345 err 80.00%\n",
     "it ended without an error line (killed? cancelled?); its last line: [2026-11-28 04:01:02][alexlab][INFO] - "
     "epoch 1  train loss 2.2345 err 80.00%"),
])
def test_a_failed_jobs_line_says_how_it_ended(text, why):
    """A cancelled, killed or stopped job once read as `srun: error: ... exit code 3` or its last log line."""
    from hydra_plugins.alexlab_launchers import _why
    assert _why(text) == why


@requires_fashion
@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to the command", "Ctrl-C"])
def test_a_stopped_local_sweep_stops_its_jobs_at_a_checkpoint_and_the_same_command_resumes_them(tmp_path, how):
    """SIGTERM to the sweep's command alone (`kill`, a container stopping) once ended it with exit
    143 and left both jobs training on, unwatched. Ctrl-C (SIGINT to the whole process group, as a
    terminal sends it) reached submitit's controller of each job, which printed a traceback and
    killed its job a second later: one job was left `running`. Now the jobs get SIGTERM from the
    command, checkpoint and stop, and the command says so in one line, exit status 3; run again,
    it finishes them."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    args = ["-m", "hydra/launcher=local", "model.lrn=true,false", "scale=tiny", "trainer.epochs=4", "logger=none",
            "hydra.sweep.dir=sweep"]
    env = dict(os.environ, WANDB_MODE="offline", HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    sweep = subprocess.Popen([sys.executable, str(ROOT / "src" / "run.py"), *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while len(list((tmp_path / "sweep").glob("*/checkpoint.pt"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    if how == "Ctrl-C":
        os.killpg(sweep.pid, signal.SIGINT)
    else:
        sweep.send_signal(signal.SIGTERM)
    _, err = sweep.communicate(timeout=240)
    assert sweep.returncode == 3, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    name = "SIGINT" if how == "Ctrl-C" else "SIGTERM"
    assert last.startswith(f"interrupted: the sweep got {name}") and "hydra.sweep.dir=sweep" in last, last
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))]
    assert [r["status"] for r in records] == ["interrupted", "interrupted"]
    assert all(len(r["history"]) < 4 for r in records)
    left = [p for p in Path("/proc").glob("[0-9]*") if _cmdline_has(p, str(tmp_path / "sweep"))]
    assert not left  # no job of the sweep runs on
    if how == "Ctrl-C":
        return  # the resume is the same as after SIGTERM

    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))]
    assert [(r["status"], len(r["history"])) for r in records] == [("completed", 4), ("completed", 4)]
    assert all(any("resumed from" in note for note in r["notes"]) for r in records)


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False
