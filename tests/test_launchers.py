"""Launcher presets: they compose, and the local submitit launcher runs real jobs."""
import json

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF, requires_fashion, run_cli


@pytest.mark.parametrize("preset,tasks,gpus,nodes", [("slurm_1gpu", 1, 1, 1), ("slurm_8gpu", 8, 8, 1),
                                                       ("slurm_multinode", 8, 8, 2)])
def test_slurm_presets_compose_with_site_overrides(preset, tasks, gpus, nodes):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[f"hydra/launcher={preset}", "hydra.launcher.partition=gpu",
                                 "hydra.launcher.timeout_min=30"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (tasks, gpus, nodes)
    assert launcher.partition == "gpu" and launcher.timeout_min == 30 and launcher.max_num_timeout == 20


@requires_fashion
@pytest.mark.slow
def test_local_submitit_launcher_runs_two_jobs(tmp_path):
    proc = run_cli("-m", "hydra/launcher=local", "model.lrn=true,false", "scale=tiny", "trainer.epochs=1",
                   "logger=none", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))]
    assert sorted(r["config"]["model"]["lrn"] for r in records) == [False, True]
    assert all(r["status"] == "completed" for r in records)
