"""Pieces of the training loop that need no dataset."""
import pytest
import torch

from alexlab.data.augment import batch_generator
from alexlab.errors import ConfigError
from alexlab.train import check_config, dropout_seed
from conftest import compose_cfg


def test_dropout_masks_follow_the_position_and_differ_by_rank():
    """Seeded per (seed, epoch, step, rank): a resumed run redraws the masks an uninterrupted run
    drew, and data parallel ranks do not share them (they once did: every rank had one seed)."""
    def mask(seed, epoch, step, rank):
        torch.manual_seed(dropout_seed(seed, epoch, step, rank))
        return torch.nn.functional.dropout(torch.ones(1000), 0.5)

    reference = mask(0, 1, 2, 0)
    assert torch.equal(mask(0, 1, 2, 0), reference)
    for other in ((0, 1, 2, 1), (0, 1, 3, 0), (0, 2, 2, 0), (1, 1, 2, 0)):
        assert not torch.equal(mask(*other), reference), other


def test_large_seeds_draw_their_own_batches():
    """A date as the seed (20251128) overflowed torch's seed range at the first epoch, after the data had loaded."""
    def order(seed, epoch=1, step=2):
        return torch.randperm(1000, generator=batch_generator(seed, epoch, step))

    for seed in (20251128, 2**62, -2**63, 2**63 - 1):
        assert torch.equal(order(seed), order(seed))
        assert not torch.equal(order(seed), order(seed - 1)), seed
        assert not torch.equal(order(seed), order(seed, step=3)), seed
    assert torch.equal(order(0), torch.randperm(1000, generator=torch.Generator().manual_seed(1_000_003 + 2)))
    for seed in (2**63, -2**63 - 1):
        with pytest.raises(ConfigError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*63\)"):
            check_config(compose_cfg("scale=tiny", f"seed={seed}"))


@pytest.mark.parametrize("override,message", [
    ("model.input_size=abc", "model.input_size must be a positive integer, got 'abc'"),
    ("data.image_size=abc", "data.image_size must be a positive integer, got 'abc'"),
    ("data.channels=0", "data.channels must be a positive integer, got 0"),
    ("data.train_subset=-5", "data.train_subset must be a positive integer or null (all), got -5"),
    ("data.val_subset=0", "data.val_subset must be a positive integer or null (all), got 0"),
    ("data.stats_images=-1", "data.stats_images must be a positive integer or null (all), got -1"),
    ("model.in_channels=3", "model.in_channels=3, but data.channels=1: leave model.in_channels at ${data.channels}, "
                            "or set data.channels"),
    ("eval.batch_size=0", "eval.batch_size must be a positive integer, got 0"),
    ("eval.batch_size=abc", "eval.batch_size must be a positive integer, got 'abc'"),
    ("data.download=maybe", "data.download must be true or false, got 'maybe'"),
    ("logger.system_stats=maybe", "logger.system_stats must be true or false, got 'maybe'"),
    ("logger.tags=abc", "logger.tags must be a list such as [lrn,seed0], got 'abc'"),
    ("logger.project=", "logger.project must name a W&B project, got ''"),
    # data=synthetic's sizes: tracebacks from numpy or torch (no images to compute statistics from, a negative dimension)
    ("data=synthetic data.num_classes=abc", "data.num_classes must be an integer >= 2, got 'abc'"),
    ("data=synthetic data.train_size=0", "data.train_size must be a positive integer, got 0"),
    ("data=synthetic data.val_size=-1", "data.val_size must be a positive integer, got -1"),
    ("optim.momentum=-1", "optim.momentum must be a number in [0, 1), got -1"),
    ("optim.weight_decay=-1", "optim.weight_decay must be a number >= 0, got -1"),
    ("optim.lr=abc", "optim.lr must be a positive number, got 'abc'"),
    ("optim.lr=inf", "optim.lr must be a positive number, got inf"),  # trained on NaN and was marked completed
    ("optim.lr=1" + "0" * 400, "optim.lr must be a positive number, got 1" + "0" * 400),  # past a float: OverflowError
    ("data.pixel_scale=inf", "data.pixel_scale must be a positive number, got inf"),
    ("optim.factor=2", "optim.factor must be a number in (0, 1), got 2"),
    ("optim.step_epochs=0", "optim.step_epochs must be a positive integer, got 0"),
    ("optim.patience=-1", "optim.patience must be an integer >= 0, got -1"),
    ("data.pca_sigma=-0.1", "data.pca_sigma must be a number >= 0, got -0.1"),
    ("data.pixel_scale=abc", "data.pixel_scale must be a positive number, got 'abc'"),
    ("data.pixel_scale=-1", "data.pixel_scale must be a positive number, got -1"),
    ("trainer.log_every_steps=-1", "trainer.log_every_steps must be an integer >= 0, got -1"),
    ("trainer.threads=two", "trainer.threads must be an integer >= 0, got 'two'"),
])
def test_numbers_out_of_range_are_bad_input(override, message):
    """Each of these trained before (a subset of -5 took all but five images) or ended in a torch traceback."""
    with pytest.raises(ConfigError) as err:
        check_config(compose_cfg("scale=tiny", *override.split()))
    assert str(err.value) == message


def test_the_presets_pass_the_config_check():
    for overrides in [(), ("scale=tiny",), ("scale=proxy",), ("scale=imagenet",), ("model=alexnet_tv", "data=imagenet"),
                      ("data=synthetic",), ("optim.schedule=step",), ("sweeps=relu",), ("sweeps=all",)]:
        check_config(compose_cfg(*overrides))


def test_a_runs_cpu_time_counts_the_work_of_its_child_processes(tmp_path):
    """The results' cpu_time_s counts the child processes that have ended (DataLoader workers, where
    most of the CPU work of reading image files happens); it once counted the training process alone. A child that spins for 1 s of CPU time while this process waits."""
    import json
    import subprocess
    import sys
    import time
    from alexlab.tracking import Tracker
    tracker = Tracker(tmp_path, {"device": "cpu"}, [], {"mode": "disabled"}, "check")
    own = time.process_time()
    subprocess.run([sys.executable, "-c", "import time\nend = time.process_time() + 1.0\n"
                    "while time.process_time() < end: pass"], check=True)
    own = time.process_time() - own
    tracker.note("spun")
    tracker.finish("completed")
    recorded = json.loads((tmp_path / "results.json").read_text())["cpu_time_s"]
    assert own < 0.5 and recorded >= 1.0


def test_a_finished_run_run_again_leaves_its_record_as_it_was_until_it_trains(tmp_path):
    """A finished run's directory run again (a sweep continued with hydra.sweep.dir=) once rewrote its
    record at once (status running, no history) and kept it so until it ended: killed meanwhile (SIGKILL,
    out of memory), a finished run was left `running`, and a report read meanwhile left it out."""
    import json
    from alexlab.tracking import Tracker
    epoch = {"epoch": 1, "train_loss": 1.0, "train_top1_err": 30.0, "val_top1_err": 25.0, "val_top5_err": 5.0,
             "lr": 0.1, "epoch_time_s": 1.0, "images_per_s": 10.0, "images_seen": 10, "steps": 1}
    first = Tracker(tmp_path, {"device": "cpu"}, [], {"name": "none"}, "check")
    first.start([])
    first.log_epoch(epoch, [])
    first.finish("completed")
    finished = (tmp_path / "results.json").read_bytes()
    again = Tracker(tmp_path, {"device": "cpu"}, [], {"name": "none"}, "check", continues=True)
    assert (tmp_path / "results.json").read_bytes() == finished
    again.start([epoch], "cpu", trains=False)  # nothing left to train
    assert (tmp_path / "results.json").read_bytes() == finished
    again.finish("completed")
    assert (tmp_path / "results.json").read_bytes() == finished
    more = Tracker(tmp_path, {"device": "cpu"}, [], {"name": "none"}, "check", continues=True)
    assert (tmp_path / "results.json").read_bytes() == finished
    more.start([epoch], "cpu", trains=True)  # continued with more epochs: running from here, its history kept
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "running" and record["history"] == [epoch]
    assert record["final"] is None and record["best"] is None  # the finished run's, until this one finishes


def test_a_crash_before_a_continued_run_trains_is_recorded_unless_it_had_completed(tmp_path, monkeypatch):
    """A rerun that crashes while it sets up keeps a completed record (the result stands), but a record
    left `running` by a kill, or interrupted, records the crash: kept, it hid it."""
    import json
    from alexlab import job, train
    cfg = compose_cfg("scale=tiny", "data=synthetic", "logger=none", "trainer.epochs=1",
                      "data.train_size=64", "data.val_size=32")
    job.run_job(cfg, tmp_path, [])
    results = tmp_path / "results.json"
    finished = results.read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("the data broke")
    monkeypatch.setattr(train, "build_data", broken)
    more = compose_cfg("scale=tiny", "data=synthetic", "logger=none", "trainer.epochs=2",
                       "data.train_size=64", "data.val_size=32")
    with pytest.raises(RuntimeError):
        job.run_job(more, tmp_path, [])
    assert results.read_text() == finished
    results.write_text(json.dumps(json.loads(finished) | {"status": "running"}))  # as a kill leaves it
    with pytest.raises(RuntimeError):
        job.run_job(more, tmp_path, [])
    record = json.loads(results.read_text())
    assert record["status"] == "failed" and record["error"] == "RuntimeError: the data broke"
    # with what it had trained: the record once lost its history, final and images seen here
    trained = json.loads(finished)
    assert [record[k] for k in ("history", "final", "best", "images_seen")] == \
        [trained[k] for k in ("history", "final", "best", "images_seen")] and len(record["history"]) == 1



def test_lrn_factors_that_fail_midway_leave_a_note_and_the_net_as_it_was(tmp_path):
    """The LRN factors are a diagnostic of the final net: where they fail (here a validation source that
    runs out of memory on its second batch, as a GPU can) the run gets a note in its record instead of
    a crash, and the LRN layers lose the hooks that recorded them (else every later forward pass would
    pay for them)."""
    import contextlib
    import json
    from alexlab.data import build_data
    from alexlab.lrn import LocalResponseNorm
    from alexlab.model import build_model
    from alexlab.tracking import Tracker
    from alexlab.train import lrn_factors
    from conftest import compose_cfg, model_cfg

    cfg = compose_cfg("data=synthetic", "model=small")
    data = build_data(cfg.data, 27, torch.device("cpu"))
    whole_val = data.val

    class RunsOutOfMemory(type(whole_val)):
        def batches_of(self, index_batches):
            batches = super().batches_of(index_batches)
            yield next(batches)
            raise torch.OutOfMemoryError("out of memory on the second batch")

    model = build_model(model_cfg("small", channels=int(cfg.data.channels)), data.num_classes)
    lrns = [m for m in model.modules() if isinstance(m, LocalResponseNorm)]
    tracker = Tracker(tmp_path, {"device": "cpu"}, [], {"name": "none"}, "check")
    data.val = RunsOutOfMemory(whole_val.images, whole_val.labels)
    assert lrn_factors(model, data, contextlib.nullcontext, tracker) == {}
    assert lrns and not any(m._forward_pre_hooks for m in lrns)
    tracker.finish("completed")
    notes = json.loads((tmp_path / "results.json").read_text())["notes"]
    assert notes == ["the LRN factors were not measured: out of memory on the second batch"]
    data.val = whole_val  # the same call on the real source measures them
    assert sorted(lrn_factors(model, data, contextlib.nullcontext, tracker)) == [
        f"lrn{n}_factor_{p}" for n in (1, 2) for p in ("p01", "p50", "p99")]
