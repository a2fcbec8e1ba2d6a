"""The command line as a user types it: runs, multiruns, resume after a signal, bad input, W&B offline."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import FASHION_DIR, ROOT, requires_fashion, run_cli

pytestmark = [requires_fashion, pytest.mark.slow]


def results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def test_tiny_run_leaves_a_complete_record(tmp_path):
    proc = run_cli("scale=tiny", "logger=none", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = results(tmp_path / "run")
    assert record["status"] == "completed" and record["error"] is None
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    for key in ("train_loss", "train_top1_err", "val_top1_err", "val_top5_err", "lr", "epoch_time_s", "images_per_s"):
        assert key in record["history"][-1]
    assert record["final"] == record["history"][-1]
    assert record["best"]["val_top1_err"] == min(h["val_top1_err"] for h in record["history"])
    assert record["config"]["model"]["name"] == "small" and record["overrides"] == ["scale=tiny", "logger=none"]
    assert record["images_seen"] == 2 * 1024
    assert record["versions"]["torch"] and record["device"] == "cpu" and record["wall_time_s"] > 0
    assert record["final"]["val_top1_err"] < 80  # it learned something (10 classes: chance is 90%)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    # for the report: the images it trained on, and the error of always guessing the commonest class of
    # its validation subset (the report's chance level where the subset's classes are unbalanced)
    from alexlab.data.datasets import load_in_memory
    from conftest import compose_cfg
    _, val, _ = load_in_memory(compose_cfg("scale=tiny").data)
    counts = np.bincount(val.labels.numpy(), minlength=10)
    assert record["train_images"] == 1024
    assert record["val_majority_err"] == pytest.approx(100 * (1 - counts.max() / 512))
    # The final net tested on 512 of its training images as validation is (eval mode: no dropout; the
    # centre crop), for the report's overfit_gap; recomputed here from the checkpoint's weights.
    assert "train_eval_top1_err" in record["final"] and "train_eval_top1_err" not in record["history"][0]
    from alexlab.data import build_data
    from alexlab.data.datasets import subset_positions
    from alexlab.model import build_model
    cfg = compose_cfg("scale=tiny")
    data = build_data(cfg.data, int(cfg.model.input_size), torch.device("cpu"), None)
    model = build_model(cfg.model, 10)
    model.load_state_dict(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"])
    model.eval()
    chosen = subset_positions(1024, 512)
    assert len(set(chosen.tolist())) == 512
    with torch.no_grad():
        logits = model(data.augmenter.eval(data.train.images[chosen]))
    wrong = (logits.argmax(1) != data.train.labels[chosen]).double().mean().item()
    assert record["final"]["train_eval_top1_err"] == pytest.approx(100 * wrong, abs=0.2)  # one image: float order
    # The final net's LRN factors, for the report's check that the LRN normalised (not a constant x0.59):
    # conv1's recomputed with PyTorch's own LRN over the validation images (all 512: fewer than 1024).
    final = record["final"]
    assert "lrn1_factor_p50" not in record["history"][0]
    assert final["lrn2_factor_p01"] < final["lrn2_factor_p50"] < final["lrn2_factor_p99"] <= 2 ** -0.75
    lrn1 = model.features.lrn1
    with torch.no_grad():
        a = torch.relu(model.features.conv1(data.augmenter.eval(data.val.images)))
        factor = nn.LocalResponseNorm(lrn1.size, lrn1.coefficient * lrn1.size, lrn1.beta, lrn1.k)(a)[a > 0] / a[a > 0]
    want = np.percentile(factor.double().numpy(), [1, 50, 99])
    got = [final[f"lrn1_factor_{p}"] for p in ("p01", "p50", "p99")]
    np.testing.assert_allclose(got, want, atol=0.01)  # the record's: a sample of 64 activations per image
    assert want[0] < 0.9 * want[2]  # a normalisation, not a near-constant (model.lrn_in_pixel_units)


@pytest.mark.parametrize("launcher", ["basic", "local"])
def test_a_sweep_with_many_overrides_names_its_job_folders_within_a_file_names_length(tmp_path, launcher):
    """Hydra names a job's folder by its overrides; past 255 bytes the sweep died with "File name too
    long" before any job ran. Under the local launcher the folder is named in the job's own process."""
    many = ["data.train_subset=256", "data.val_subset=128", "model.lrn_impl=reference", "model.pool_in_lrn=false",
            "model.grouped_conv=native", "model.conv1_impl=native", "trainer.channels_last=false", "trainer.threads=1",
            "eval.batch_size=100", "optim.momentum=0.9", "optim.weight_decay=0.0005", "data.pca_sigma=0.1",
            "data.pixel_scale=3.0", "optim.patience=2"]
    proc = run_cli("-m", "model.lrn=true,false", "scale=tiny", "trainer.epochs=1", "logger=none", *many,
                   f"hydra/launcher={launcher}", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name[0].isdigit())  # not .submitit
    assert [f.name[:2] for f in folders] == ["0_", "1_"] and all(len(f.name.encode()) <= 255 for f in folders)
    assert folders[0].name[2:50] == "data.pca_sigma=0.1,data.pixel_scale=3.0,data.tra"  # the start as Hydra writes it
    records = [json.loads((f / "results.json").read_text()) for f in folders]
    assert [r["status"] for r in records] == ["completed", "completed"]
    assert [r["config"]["model"]["lrn"] for r in records] == [True, False]


def test_multirun_over_lrn_leaves_two_results(tmp_path):
    # data.root as every ImageNet sweep gives it: its slashes once nested the job directories in folders
    proc = run_cli("-m", "model.lrn=true,false", "scale=tiny", "trainer.epochs=1", "logger=none",
                   f"data.root={FASHION_DIR}", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))]
    assert len(records) == 2 and len(list((tmp_path / "sweep").glob("*/"))) == 2
    assert {r["config"]["model"]["lrn"] for r in records} == {True, False}
    assert all(r["status"] == "completed" for r in records)
    for r in records:  # the variant names what the run changes, not the seed or the logger
        assert r["variant"].lower() == (f"data.root={FASHION_DIR},model.lrn={str(r['config']['model']['lrn']).lower()},"
                                        "scale=tiny,trainer.epochs=1").lower()


def by_job_number(sweep) -> dict:
    return {int(p.parent.name.split("_")[0]): json.loads(p.read_text()) for p in sweep.glob("*/results.json")}


def test_a_sweep_runs_every_job_when_one_has_bad_input_and_lists_it_at_the_end(tmp_path):
    proc = run_cli("-m", "model.towers=3,1", "scale=tiny", "trainer.epochs=1", "logger=none",
                   "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    records = by_job_number(tmp_path / "sweep")
    assert (records[0]["status"], records[1]["status"]) == ("failed", "completed")  # job 1 ran after job 0 failed
    assert proc.stderr.strip().splitlines()[-2:] == [
        "error: 1 of 2 jobs of the sweep failed:",
        "  #0 model.towers=3 scale=tiny trainer.epochs=1 logger=none: model.towers must be 1 or 2, got 3"]


def test_the_same_sweep_again_in_its_directory_trains_nothing_twice(tmp_path):
    args = ["-m", "model.lrn=true,false", "scale=tiny", "trainer.epochs=1", "logger=none", "hydra.sweep.dir=sweep"]
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    first = by_job_number(tmp_path / "sweep")
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = by_job_number(tmp_path / "sweep")
    for job in (0, 1):  # each finished job's record as it was: not even its clocks moved
        assert again[job]["status"] == "completed" and again[job] == first[job]
    assert (proc.stdout + proc.stderr).count("completed: val top-1 error") == 2  # each job said so


def test_a_job_that_crashes_fails_alone_with_its_traceback_in_its_log(tmp_path):
    # job 0's checkpoint cannot be written: a directory holds its name (not a config error, a crash)
    (tmp_path / "sweep" / "0" / "checkpoint.pt").mkdir(parents=True)
    proc = run_cli("-m", "model.lrn=true,false", "scale=tiny", "trainer.epochs=1", "logger=none",
                   "hydra.sweep.dir=sweep", "hydra.sweep.subdir=${hydra.job.num}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    records = {job: results(tmp_path / "sweep" / str(job)) for job in (0, 1)}
    assert records[0]["status"] == "failed" and records[0]["error"].startswith("IsADirectoryError")
    assert records[1]["status"] == "completed"
    assert proc.stderr.strip().splitlines()[-1].startswith("  #0 model.lrn=True ")  # as Hydra writes the value back
    assert "IsADirectoryError" in proc.stderr.strip().splitlines()[-1]
    assert proc.stderr.strip().endswith(f"(traceback: {tmp_path / 'sweep' / '0' / 'run.log'})")
    log = (tmp_path / "sweep" / "0" / "run.log").read_text()
    assert "Traceback" in log and "IsADirectoryError" in log


def test_a_damaged_checkpoint_is_refused_and_left_as_it_was(tmp_path):
    """A partial copy, or another tool's file, where a checkpoint would be resumed from: one line, exit 2,
    the file untouched; resume=never starts over."""
    import torch
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    for content, error in ((b"PK\x03\x04 cut short", "RuntimeError"), ({"model": {}}, "KeyError")):
        if isinstance(content, bytes):
            checkpoint.write_bytes(content)
        else:
            torch.save(content, checkpoint)
        before = checkpoint.read_bytes()
        proc = run_cli("scale=tiny", "trainer.epochs=1", "logger=none", "hydra.run.dir=run", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == (
            f"error: {checkpoint} is damaged or not a checkpoint of this tool ({error} on reading it): "
            "move it away, or resume=never to start over here")
        assert "Traceback" not in proc.stderr and checkpoint.read_bytes() == before
    fresh = run_cli("scale=tiny", "trainer.epochs=1", "logger=none", "resume=never", "hydra.run.dir=run", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert results(tmp_path / "run")["status"] == "completed"


def test_a_ten_patch_test_records_the_centre_patch_as_a_single_crop_run_measures_it(tmp_path):
    """The ten_crop claim reads its single-crop side from the ten-patch runs themselves. That holds if
    the test does not change the training (same seed: the same history) and if the centre patch among
    the ten is the single-crop test: a run with eval.ten_crop=false measures the same errors."""
    proc = run_cli("-m", "eval.ten_crop=true,false", "scale=tiny", "logger=none", "hydra.sweep.dir=sweep",
                   "hydra.sweep.subdir=${hydra.job.num}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ten, single = (results(tmp_path / "sweep" / str(job)) for job in (0, 1))
    assert ten["config"]["eval"]["ten_crop"] is True and single["config"]["eval"]["ten_crop"] is False
    assert [h["train_loss"] for h in ten["history"]] == [h["train_loss"] for h in single["history"]]
    one_image = 100 / 512  # points: scale=tiny tests on 512 images; rounding may flip a near tie
    for epoch_ten, epoch_single in zip(ten["history"], single["history"]):
        assert epoch_ten["val_centre_loss"] == pytest.approx(epoch_single["val_loss"], rel=1e-4)
        for k in ("top1", "top5"):
            assert abs(epoch_ten[f"val_centre_{k}_err"] - epoch_single[f"val_{k}_err"]) <= one_image
    assert ten["final"]["val_loss"] != pytest.approx(ten["final"]["val_centre_loss"], rel=1e-3)  # ten patches: another test
    assert "val_centre_top1_err" not in single["final"]


def test_a_sweep_without_multirun_says_it_runs_one_job(tmp_path):
    """Hydra runs one job of `sweeps=lrn` without -m and says nothing; the user meant six."""
    proc = run_cli("sweeps=lrn", "scale=tiny", "trainer.epochs=1", "logger=none", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # conf/sweeps/lrn.yaml: ablation paper,no_lrn and seeds 0,1,2; the defaults: ablation=paper, seed=0
    assert ("sweeps=lrn is a sweep (ablation: paper,no_lrn; seed: 0,1,2) and runs as one only with -m; "
            "this is one run, at ablation=paper, seed=0") in proc.stdout + proc.stderr
    assert results(tmp_path / "run")["status"] == "completed"


def test_resume_after_sigterm_ends_where_an_uninterrupted_run_ends(tmp_path):
    args = ["scale=tiny", "trainer.epochs=3", "seed=7", "trainer.log_every_steps=3"]
    whole = run_cli(*args, "logger=none", "hydra.run.dir=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr

    env = dict(__import__("os").environ, WANDB_MODE="offline", HOME=str(tmp_path))
    cut = subprocess.Popen([sys.executable, str(ROOT / "src" / "run.py"), *args, "hydra.run.dir=cut"],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and cut.poll() is None:
        time.sleep(0.05)
    cut.send_signal(signal.SIGTERM)  # somewhere in epoch 2
    _, err = cut.communicate(timeout=120)
    assert cut.returncode == 3, err
    stopped = results(tmp_path / "cut")
    assert stopped["status"] == "interrupted" and "SIGTERM" in stopped["error"]
    # the images and steps up to the step it stopped after, not those of its last whole epoch
    saved = torch.load(checkpoint, weights_only=False)["state"]
    assert stopped["images_seen"] == saved["images_seen"] and stopped["steps"] == saved["steps"]
    assert len(stopped["history"]) < 3
    if saved["step"]:  # stopped within an epoch: fewer epochs than it began would keep weights past its record
        fewer = run_cli("scale=tiny", f"trainer.epochs={saved['epoch']}", *args[2:], "hydra.run.dir=cut", cwd=tmp_path)
        assert fewer.returncode == 2 and (f"has trained {saved['epoch']} epochs and {saved['step']} steps of the next, "
                                          f"more than trainer.epochs={saved['epoch']}") in fewer.stderr, fewer.stderr

    again = run_cli(*args, "hydra.run.dir=cut", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    resumed, reference = results(tmp_path / "cut"), results(tmp_path / "whole")
    assert resumed["status"] == "completed"
    assert any("resumed from" in note for note in resumed["notes"])
    assert resumed["wandb"]["id"] == stopped["wandb"]["id"]  # one variant, one W&B run
    for key in ("train_loss", "train_top1_err", "val_loss", "val_top1_err", "val_top5_err"):
        assert [h[key] for h in resumed["history"]] == [h[key] for h in reference["history"]], key
    assert resumed["steps"] == reference["steps"]  # the step-level training error log too


def test_a_checkpoint_from_another_config_is_refused_and_its_run_left_as_it_was(tmp_path):
    """Same directory, another config: resuming would train the LRN net and record it as lrn=false. The
    run is refused before it writes anything, so the earlier run's files stay as they were."""
    first = run_cli("scale=tiny", "trainer.epochs=1", "hydra.run.dir=run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    checkpoint, record = tmp_path / "run" / "checkpoint.pt", results(tmp_path / "run")
    before = checkpoint.read_bytes(), (tmp_path / "run" / "results.json").read_text()
    other = run_cli("scale=tiny", "trainer.epochs=1", "model.lrn=false", "hydra.run.dir=run", cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        f"error: {checkpoint} was written by a run with another config (model.lrn: true -> false): run this one "
        "in another directory, repeat the same command to resume that one, or resume=never to start over here")
    assert "Traceback" not in other.stderr
    assert (checkpoint.read_bytes(), (tmp_path / "run" / "results.json").read_text()) == before
    # where it ran, how it logs, how many threads: not what it trains, so resuming goes on (with an
    # epoch more to train: a finished run run again keeps its record as it was)
    again = run_cli("scale=tiny", "trainer.epochs=2", "trainer.threads=1", "hydra.run.dir=run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    notes = results(tmp_path / "run")["notes"]
    assert any(n.endswith("with trainer.epochs: 1 -> 2; trainer.threads: 0 -> 1") for n in notes), notes
    # a checkpoint past trainer.epochs is refused too (the record would say 1 epoch and hold 2)
    longer = run_cli("scale=tiny", "trainer.epochs=2", "logger=none", "hydra.run.dir=two", cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr
    shorter = run_cli("scale=tiny", "trainer.epochs=1", "logger=none", "hydra.run.dir=two", cwd=tmp_path)
    assert shorter.returncode == 2 and "has trained 2 epochs, more than trainer.epochs=1" in shorter.stderr
    # resume=never starts over: a new W&B run and clock, not the old ones
    fresh = run_cli("scale=tiny", "trainer.epochs=1", "model.lrn=false", "resume=never", "hydra.run.dir=run",
                    cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    restarted = results(tmp_path / "run")
    assert restarted["config"]["model"]["lrn"] is False and [h["epoch"] for h in restarted["history"]] == [1]
    assert not any("resumed" in n for n in restarted["notes"])
    # its checkpoint deleted (to save disk, say), a completed run's record is still not replaced by
    # another config's without a word (it once was); the same config trains again
    checkpoint.unlink()
    finished = (tmp_path / "run" / "results.json").read_text()
    other = run_cli("scale=tiny", "trainer.epochs=1", "hydra.run.dir=run", "logger=none", cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'run' / 'results.json'} records a completed run with another config and no checkpoint "
        "(model.lrn: false -> true): run this one in another directory, or resume=never to start over here "
        "(replacing that record)")
    assert (tmp_path / "run" / "results.json").read_text() == finished
    same = run_cli("scale=tiny", "trainer.epochs=1", "model.lrn=false", "hydra.run.dir=run", "logger=none", cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert restarted["wandb"]["id"] != record["wandb"]["id"]
    assert restarted["started_at"] > record["started_at"]


def test_a_rerun_with_bad_input_leaves_the_finished_run_as_it_was(tmp_path):
    """The same command again in a finished run's directory, with a typo: a bad value (caught before
    anything is written) or a data folder that is not there (found while the data loads, after the
    rerun took the directory over to continue it). Either way the finished record stays."""
    first = run_cli("scale=tiny", "trainer.epochs=1", "hydra.run.dir=run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "run" / "results.json").read_text()
    for typo, message in (("trainer.epochs=-1", "trainer.epochs must be a positive integer, got -1"),
                          (f"data.root={tmp_path / 'nowhere'}", "nowhere")):
        again = run_cli("scale=tiny", "trainer.epochs=1", typo, "data.download=false", "hydra.run.dir=run", cwd=tmp_path)
        assert again.returncode == 2, again.stderr
        assert message in again.stderr.strip().splitlines()[-1] and "Traceback" not in again.stderr
        assert (tmp_path / "run" / "results.json").read_text() == before, typo
    # W&B that cannot start, where the rerun has an epoch more to train: the record stays too (it was
    # marked failed), and the same command again changes nothing (its clocks once grew at each rerun)
    again = run_cli("scale=tiny", "trainer.epochs=2", "hydra.run.dir=run", cwd=tmp_path,
                    env_extra={"WANDB_MODE": "onlin"})
    assert again.returncode == 2 and "W&B (onlin) could not start the run" in again.stderr.strip().splitlines()[-1]
    assert (tmp_path / "run" / "results.json").read_text() == before
    same = run_cli("scale=tiny", "trainer.epochs=1", "hydra.run.dir=run", cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert (tmp_path / "run" / "results.json").read_text() == before
    # in a new directory the same typo leaves a record that says why the run failed
    fresh = run_cli("scale=tiny", "trainer.epochs=-1", "hydra.run.dir=fresh", cwd=tmp_path)
    assert fresh.returncode == 2
    assert results(tmp_path / "fresh")["status"] == "failed"
    assert results(tmp_path / "fresh")["error"] == "bad input: trainer.epochs must be a positive integer, got -1"


@pytest.mark.parametrize("stop,submitit_signal", [(signal.SIGTERM, None), (signal.SIGUSR1, "USR1")])
def test_a_signal_while_the_run_sets_up_stops_it_as_interrupted(tmp_path, stop, submitit_signal):
    """SIGTERM after results.json is written but before the first step (the data loading, here slowed
    by a stats cache that must be computed over 60,000 images): status interrupted and exit 3, as
    during training, not a run left 'running' for good by the default handler's exit 143. So too the
    warning signal a site chose for submitit (SUBMITIT_PREEMPT_SIGNAL), which once killed the run."""
    args = ["scale=tiny", "data.train_subset=null", "data.stats_images=null", "hydra.run.dir=run", "logger=none"]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", HOME=str(tmp_path))
    if submitit_signal:
        env["SUBMITIT_PREEMPT_SIGNAL"] = submitit_signal
    proc = subprocess.Popen([sys.executable, str(ROOT / "src" / "run.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "run" / "results.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=300)
    record = results(tmp_path / "run")
    assert proc.returncode == 3, err
    assert record["status"] == "interrupted" and record["history"] == []
    assert record["error"] == (f"stopped by signal {stop.name}; before this process trained; resume=auto runs it "
                               "again (from its checkpoint, where it has one)")


def test_a_sweep_stopped_by_a_signal_still_lists_its_failed_jobs(tmp_path):
    """A sweep in one process: job 0 is bad input, job 1 is stopped by SIGTERM while it sets up. The
    command ends interrupted (exit 3), and still says which jobs failed: that list was once printed
    only after the last job returned, and an interrupted one never did."""
    args = ["-m", "scale=tiny", "model.towers=3,2", "data.train_subset=null", "data.stats_images=null",
            "hydra.sweep.dir=sweep", "logger=none"]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, str(ROOT / "src" / "run.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "sweep").glob("1_*/results.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    (second,) = (tmp_path / "sweep").glob("1_*/results.json")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert results(second.parent)["status"] == "interrupted"
    assert "error: 1 of 2 jobs run before the sweep stopped failed:\n  #0 scale=tiny model.towers=3 " in err, err[-2000:]


def test_resume_never_means_the_first_start_of_a_slurm_job_not_its_requeues(tmp_path):
    """A job launched with resume=never repeats that after a requeue (SLURM_RESTART_COUNT > 0, as SLURM
    sets it): it once started over at every preemption. It resumes from the checkpoint it wrote itself
    (the same SLURM_JOB_ID), never from an earlier run's. As the run starts over, the earlier run's
    checkpoint goes, so that a stop before this run wrote its own leaves nothing a requeue could take
    for it."""
    def resumed(record):
        return [n for n in record["notes"] if n.startswith("resumed from ")]
    first = run_cli("scale=tiny", "trainer.epochs=1", "logger=none", "hydra.run.dir=run", cwd=tmp_path,
                    env_extra={"SLURM_JOB_ID": "123"})
    assert first.returncode == 0, first.stderr
    # job 124, requeued, finds job 123's checkpoint: not its own, so it starts over as resume=never says
    other_job = run_cli("scale=tiny", "trainer.epochs=1", "logger=none", "resume=never", "hydra.run.dir=run",
                        cwd=tmp_path, env_extra={"SLURM_JOB_ID": "124", "SLURM_RESTART_COUNT": "1"})
    assert other_job.returncode == 0, other_job.stderr
    assert resumed(results(tmp_path / "run")) == []
    # requeued again: now the checkpoint is its own
    again = run_cli("scale=tiny", "trainer.epochs=2", "logger=none", "resume=never", "hydra.run.dir=run",
                    cwd=tmp_path, env_extra={"SLURM_JOB_ID": "124", "SLURM_RESTART_COUNT": "2"})
    assert again.returncode == 0, again.stderr
    record = results(tmp_path / "run")
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert len(resumed(record)) == 1 and "at epoch 1 step 0" in resumed(record)[0], record["notes"]
    # started over (no requeue), and stopped while it loads the data: the old checkpoint is gone
    args = ["scale=tiny", "data.train_subset=null", "data.stats_images=null", "hydra.run.dir=run", "logger=none",
            "resume=never"]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", HOME=str(tmp_path))
    for key in ("SLURM_RESTART_COUNT", "SLURM_JOB_ID"):
        env.pop(key, None)
    started = (tmp_path / "run" / "results.json").stat().st_mtime_ns
    proc = subprocess.Popen([sys.executable, str(ROOT / "src" / "run.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while (tmp_path / "run" / "results.json").stat().st_mtime_ns == started and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_signal_while_a_finished_run_run_again_sets_up_leaves_it_completed(tmp_path):
    """A finished run's directory run again (a sweep continued with hydra.sweep.dir=) and stopped
    while it sets up: it was marked interrupted, and the report left the finished run out."""
    first = run_cli("scale=tiny", "trainer.epochs=1", "hydra.run.dir=run", "logger=none", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "run" / "results.json").read_text()
    returncode, err = _stopped_while_it_sets_up(tmp_path, "1")
    assert returncode == 3, err
    assert (tmp_path / "run" / "results.json").read_text() == before
    # a record left `running` (a process killed by SIGKILL) is not kept: the stopped rerun says interrupted
    left = json.loads(before) | {"status": "running"}
    (tmp_path / "run" / "results.json").write_text(json.dumps(left))
    returncode, err = _stopped_while_it_sets_up(tmp_path, "2")
    assert returncode == 3, err
    assert results(tmp_path / "run")["status"] == "interrupted"


def _stopped_while_it_sets_up(tmp_path: Path, epochs: str) -> tuple[int, str]:
    """`scale=tiny` run again in tmp_path/run, SIGTERM while it loads the data: 0.3 s after it took the
    directory's lock (its pid in .run.lock), where it checks the config and the checkpoint in well
    under that, and loading the data takes a second or more."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, str(ROOT / "src" / "run.py"), "scale=tiny", f"trainer.epochs={epochs}",
                             "hydra.run.dir=run", "logger=none"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if (tmp_path / "run" / ".run.lock").read_text() == str(proc.pid):
                time.sleep(0.3)
                break
        except OSError:
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_a_run_whose_wandb_process_dies_completes_with_a_note(tmp_path):
    """W&B's service process (wandb-core) killed mid-run (SLURM's SIGTERM reaches every process of a
    job; once it died on this machine for no known reason): the next epoch's W&B log raised, the run
    failed, and its checkpoint was an epoch behind its record. Now the run goes on without W&B."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, str(ROOT / "src" / "run.py"), "scale=tiny", "trainer.epochs=4",
                             "hydra.run.dir=run"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    cores = [p for p in _descendants(proc.pid) if b"wandb-core" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert cores, "no wandb-core under the run"
    for pid in cores:
        os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    record = results(tmp_path / "run")
    assert record["status"] == "completed" and len(record["history"]) == 4
    assert any(note.startswith("W&B stopped at epoch") for note in record["notes"]), record["notes"]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["state"]["epoch"] == 4


def test_a_signal_during_the_last_validation_completes_the_run_and_stops_the_sweep(tmp_path):
    """One training step, then a validation of 10,000 images x 10 patches (about 25 s here): SIGTERM 8 s
    after the start lands in it. The run is complete (all its training done), so it says so; but the
    sweep stops there with exit 3, as for any stop signal, instead of running its next job."""
    args = ["-m", "seed=0,1", "scale=tiny", "data.train_subset=64", "data.val_subset=null", "eval.ten_crop=true",
            "trainer.epochs=1", "logger=none", "hydra.sweep.dir=sweep"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, str(ROOT / "src" / "run.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("sweep/0_*/results.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    first = next(tmp_path.glob("sweep/0_*"))
    time.sleep(8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert "came after the last training step; this run completed, and nothing more runs" in err
    assert results(first)["status"] == "completed"
    assert len(list((tmp_path / "sweep").glob("*/results.json"))) == 1  # seed 1 never started


def test_a_second_process_in_a_busy_run_directory_is_refused(tmp_path):
    """The same command launched twice into one directory would write one checkpoint, results.json and
    W&B run in turns; the second stops at once. The lock goes with its process, however that ends."""
    args = ["scale=tiny", "trainer.epochs=30", "logger=none", "hydra.run.dir=run"]
    env = dict(__import__("os").environ, HOME=str(tmp_path))
    first = subprocess.Popen([sys.executable, str(ROOT / "src" / "run.py"), *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "results.json").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = run_cli(*args, cwd=tmp_path)
    assert first.poll() is None, "the first run ended too soon to test this"
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: another process (pid {first.pid}) is training in {tmp_path / 'run'}: wait for it to end, "
        "or run in another directory"]
    assert results(tmp_path / "run")["status"] == "running"  # the first run's record, untouched
    first.send_signal(signal.SIGKILL)  # no handler, no clean-up: the kernel drops the lock
    first.communicate(timeout=60)
    again = run_cli(*args[:1], "trainer.epochs=1", *args[2:], "resume=never", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_a_run_resumed_with_more_epochs_trains_as_one_launched_with_them(tmp_path):
    """The lr schedules (plateau, step) and the seeded data order do not depend on the total number of
    epochs, so 1 epoch then 2 ends where 2 at once ends."""
    args = ["scale=tiny", "logger=none", "seed=3"]
    whole = run_cli(*args, "trainer.epochs=2", "hydra.run.dir=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    for epochs in (1, 2):
        step = run_cli(*args, f"trainer.epochs={epochs}", "hydra.run.dir=steps", cwd=tmp_path)
        assert step.returncode == 0, step.stderr
    resumed, reference = results(tmp_path / "steps"), results(tmp_path / "whole")
    assert resumed["notes"] == ["resumed from " + str(tmp_path / "steps" / "checkpoint.pt")
                                + " at epoch 1 step 0, with trainer.epochs: 1 -> 2"]
    for key in ("train_loss", "train_top1_err", "val_loss", "val_top1_err", "lr"):
        assert [h[key] for h in resumed["history"]] == [h[key] for h in reference["history"]], key


@pytest.mark.parametrize("override,message", [
    ("model.towers=3", "model.towers must be 1 or 2"),
    ("model.remove=[conv1]", "conv1 cannot be removed"),
    ("trainer.batch_size=0", "trainer.batch_size must be a positive integer"),
    ("seed=abc", "seed must be an integer"),
    ("trainer.compile=fast", "trainer.compile must be true, false or one of"),
    ("model.lrn_impl=bogus", "model.lrn_impl must be one of"),
    ("data.crop_flip=maybe", "data.crop_flip must be true or false"),
    ("eval.ten_crop=1", "eval.ten_crop must be true or false"),
    ("data.workers=-1", "data.workers must be an integer >= 0"),
    ("device=tpu", "device must be auto, cpu, cuda or cuda:N"),
    ("model.lrn_params.size=0", "model.lrn_params.size must be a positive integer"),
    ("model.lrn_params.k=0", "model.lrn_params.k must be a number > 0"),
    ("data.root=EMPTY", "no FashionMNIST data in"),
])
def test_bad_input_is_one_clear_line_and_never_completed(tmp_path, override, message):
    override = override.replace("EMPTY", str(tmp_path / "empty"))
    proc = run_cli("scale=tiny", "logger=none", "data.download=false", override, "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    record = results(tmp_path / "run")
    assert record["status"] == "failed" and message in record["error"]


@pytest.mark.parametrize("mode", ["run", "sweep"])
def test_an_output_folder_that_cannot_be_made_is_one_clear_line(tmp_path, mode):
    """Hydra made the folder itself, after its own start, and failed in a traceback."""
    (tmp_path / "a_file").write_text("")
    args = ["hydra.run.dir=a_file/run"] if mode == "run" else ["hydra.sweep.dir=a_file/sweep"]
    proc = run_cli(*(["-m"] if mode == "sweep" else []), "scale=tiny", "logger=none", *args, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: cannot write the output folder a_file/{mode}: Not a directory "
                                                "(hydra.run.dir, or hydra.sweep.dir with -m)"]


def test_an_interpolation_that_does_not_resolve_is_one_clear_line(tmp_path):
    """Hydra keeps the override as typed; reading it resolved (`${nope}`) crashed before the job began."""
    proc = run_cli("scale=tiny", "logger=none", "data.val_subset=${nope}", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: config does not resolve: Interpolation key 'nope' not found (at data.val_subset)"]
    assert not (tmp_path / "run" / "results.json").exists()  # no resolved config to record


def test_unknown_key_is_refused_by_hydra(tmp_path):
    proc = run_cli("scale=tiny", "model.lrm=false", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Key 'lrm' is not in struct" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_wandb_online_without_a_key_is_one_clear_line(tmp_path):
    proc = run_cli("scale=tiny", "trainer.epochs=1", "hydra.run.dir=run", cwd=tmp_path,
                   env_extra={"WANDB_MODE": "online", "WANDB_API_KEY": None})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: W&B (online) could not start the run: UsageError: "), proc.stderr
    assert results(tmp_path / "run")["status"] == "failed"


def test_a_finished_run_run_again_opens_no_second_wandb_run(tmp_path):
    """Continuing a sweep runs its finished jobs again; they end at once, and once each left a second,
    empty offline W&B run under the same id, which results.json then pointed to."""
    for _ in range(2):
        proc = run_cli("scale=tiny", "trainer.epochs=1", "hydra.run.dir=run", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        if _ == 0:
            first = results(tmp_path / "run")["wandb"]
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1
    assert results(tmp_path / "run")["wandb"] == first and results(tmp_path / "run")["status"] == "completed"


def test_wandb_offline_record_has_config_history_and_summary(tmp_path):
    proc = run_cli("scale=tiny", "experiment=lrn-check", "model.lrn=false", "hydra.run.dir=run", cwd=tmp_path,
                   env_extra={"WANDB_MODE": None, "WANDB_API_KEY": None})  # no key configured: must fall back to offline by itself
    assert proc.returncode == 0, proc.stderr
    record = results(tmp_path / "run")
    assert record["wandb"]["mode"] == "offline"
    (wandb_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    inspect = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(wandb_file)],
                             capture_output=True, text=True, timeout=60)
    assert inspect.returncode == 0, inspect.stderr
    rows = [json.loads(line) for line in inspect.stdout.splitlines() if line.strip()]
    (run,) = [r["run"] for r in rows if r.get("type") == "run"]
    assert run["run_id"] == record["wandb"]["id"]
    assert run["run_group"] == "lrn-check"
    assert run["job_type"] == "model.lrn=false,scale=tiny"
    assert run["config"]["update"]["model"]["lrn"] is False
    assert run["config"]["update"]["trainer"]["epochs"] == 2
    history = [r["history"]["item"] for r in rows if r.get("type") == "history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["val_top1_err"] == record["final"]["val_top1_err"]
    summary = {}
    for r in rows:
        if r.get("type") == "summary":
            summary.update(r["summary"]["update"])
    assert summary["final/val_top1_err"] == record["final"]["val_top1_err"]
    assert summary["status"] == "completed"
    # the report's cost of a run read back from W&B: a CPU run, its CPU time, one process
    assert (summary["device"], summary["processes"]) == ("cpu", 1)
    assert summary["cpu_time_s"] == record["cpu_time_s"] > 0 and summary["wall_time_s"] == record["wall_time_s"]


@requires_fashion
@pytest.mark.slow
def test_two_processes_leave_out_a_last_batch_too_small_to_share(tmp_path):
    """129 images in batches of 64 leave a last global batch of one image: one of two data parallel
    processes had nothing to crop and the run failed (IndexError) at the end of every epoch. The
    full ILSVRC-2012 at batch 128 on 16 GPUs leaves 15."""
    env = dict(os.environ, WANDB_MODE="offline", HOME=str(tmp_path), TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={29900 + os.getpid() % 90}", str(ROOT / "src" / "run.py"), "scale=tiny",
                           "trainer.threads=1", "logger=none", "trainer.epochs=1", "data.train_subset=129",
                           "data.val_subset=64", "hydra.run.dir=run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "completed" and record["processes"] == 2
    assert record["images_seen"] == 128 and record["history"][0]["steps"] == 2
    assert any("the last 1 image(s) of each epoch's order are left out" in note for note in record["notes"])


def test_a_checkpoint_that_cannot_be_written_is_named_with_the_cause(tmp_path):
    """A file size limit (RLIMIT_FSIZE: the kernel refuses writes past it, as a full disk does with
    ENOSPC) lets the small results.json through but not the checkpoint. torch.save's own error
    ("enforce fail at inline_container.cc ... unexpected pos") hid the cause in the record."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed instead of told
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
    env = dict(os.environ, WANDB_MODE="offline", HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "src" / "run.py"), "scale=tiny", "logger=none", "trainer.epochs=1",
                           "hydra.run.dir=run"], cwd=tmp_path, env=env, preexec_fn=limit_file_size,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    record = results(tmp_path / "run")
    assert record["status"] == "failed"
    assert record["error"] == f"OSError: [Errno 27] cannot write {tmp_path / 'run' / 'checkpoint.pt'}: File too large"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".hydra", ".run.lock", "results.json", "run.log"]


def test_the_atomic_writer_names_the_file_only_for_its_own_write_errors(tmp_path):
    """A write the kernel refuses (here past RLIMIT_FSIZE) is named with the file; an error of another
    kind raised while some unrelated OSError was being handled keeps its own name."""
    script = ("import resource, signal, sys\n"
              "from alexlab.io import atomic_write_bytes\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
              f"atomic_write_bytes(b'x' * 5000, {str(tmp_path / 'big.bin')!r})\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.stderr.strip().splitlines()[-1] == f"OSError: [Errno 27] cannot write {tmp_path / 'big.bin'}: File too large"
    assert list(tmp_path.iterdir()) == []
    from alexlab.io import atomic_torch_save
    try:
        open(tmp_path / "nowhere" / "x")
    except FileNotFoundError:
        with pytest.raises(Exception) as err:
            atomic_torch_save({"f": lambda: 0}, tmp_path / "ckpt.pt")  # a lambda cannot be pickled
    assert not isinstance(err.value, OSError), err.value
