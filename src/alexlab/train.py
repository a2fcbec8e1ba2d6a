"""The one training loop: the paper's SGD recipe, evaluation, checkpoints, resume, stop on a signal.

    fit(cfg, run_dir, tracker, world, resuming=check_resume(run_dir, config)) -> training state

The checkpoint (`<run_dir>/checkpoint.pt`, written atomically every epoch and on SIGTERM/SIGUSR2)
holds the model, optimizer, scheduler, the position in the epoch, the history and the resolved config;
a run resumes from it only under the same experiment config (check_resume). Data order and
augmentation are seeded by (seed, epoch, step), and dropout by (seed, epoch, step, rank), so a
resumed run sees exactly the batches and masks the uninterrupted one would have, and each data
parallel rank draws its own masks.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from alexlab.data import build_data, majority_error
from alexlab.data.augment import batch_generator
from alexlab.data.datasets import check_data_sizes, subset_positions
from alexlab.distributed import World
from alexlab.errors import ConfigError, first_line, require_integer, require_number
from alexlab.experiment import NOT_THE_EXPERIMENT, differing_paths, flatten, without
from alexlab.io import atomic_torch_save
from alexlab.lrn import LocalResponseNorm, factor_percentiles
from alexlab.model import build_model, choose_layer_impls
from alexlab.tracking import RESULTS_NAME

CHECKPOINT_NAME = "checkpoint.pt"
STOP_CHECK_STEPS = 10  # data parallel: steps between two checks for a stop signal on any rank
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Interrupted(Exception):
    """Raised after a checkpoint was written because SIGTERM/SIGUSR2/SIGINT arrived; or, where the signal
    came while the run was setting up, before its first step (nothing new to save)."""

    def __init__(self, signum: int, before_training: bool = False, state: dict | None = None):
        done = ("before this process trained; resume=auto runs it again (from its checkpoint, where it has one)"
                if before_training
                else "checkpoint written, resume=auto continues")
        super().__init__(f"stopped by signal {signal.Signals(signum).name}; {done}")
        self.signum, self.state = signum, state  # state: where it stopped, for results.json


def stop_signals() -> list[signal.Signals]:
    """SIGTERM, SIGUSR2 (submitit's warning before a time limit), SIGINT, and the warning signal a site
    chose for submitit instead (SUBMITIT_PREEMPT_SIGNAL=USR1, say: without it that signal killed the run
    with no checkpoint and left its record `running`)."""
    signals = [signal.SIGTERM, signal.SIGUSR2, signal.SIGINT]
    chosen = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "").strip().upper()
    extra = getattr(signal, chosen if chosen.startswith("SIG") else f"SIG{chosen}", None) if chosen else None
    if isinstance(extra, signal.Signals) and extra not in signals:
        signals.append(extra)
    return signals


class StopFlag:
    """Remembers a termination signal (stop_signals) so the loop can stop between two steps."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for s in stop_signals():
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def check_config(cfg) -> None:
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if not -2**63 <= seed < 2**63:  # torch.manual_seed's range
        raise ConfigError(f"seed must be an integer in [-2**63, 2**63), got {seed}")
    for key in ("batch_size", "epochs"):
        require_integer(f"trainer.{key}", cfg.trainer[key], 1)
    require_integer("eval.batch_size", cfg.eval.get("batch_size"), 1)  # else found wrong after the first epoch
    for key in ("threads", "log_every_steps"):  # 0: torch's default, per epoch only
        require_integer(f"trainer.{key}", cfg.trainer.get(key) or 0, 0)
    require_integer("model.input_size", cfg.model.get("input_size"), 1)
    check_data_sizes(cfg.data)
    if cfg.model.get("in_channels") != cfg.data.channels:  # conv1 would fail at the first step
        raise ConfigError(f"model.in_channels={cfg.model.get('in_channels')}, but data.channels={cfg.data.channels}: "
                          "leave model.in_channels at ${data.channels}, or set data.channels")
    optim = cfg.optim
    require_number("optim.lr", optim.lr, "a positive number", lambda v: v > 0)
    require_number("optim.momentum", optim.momentum, "a number in [0, 1)", lambda v: 0 <= v < 1)
    require_number("optim.weight_decay", optim.weight_decay, "a number >= 0", lambda v: v >= 0)
    require_number("optim.factor", optim.factor, "a number in (0, 1)", lambda v: 0 < v < 1)
    require_integer("optim.patience", optim.patience, 0)
    require_integer("optim.max_reductions", optim.max_reductions, 0)
    require_integer("optim.step_epochs", optim.step_epochs, 1)
    require_number("data.pca_sigma", cfg.data.get("pca_sigma", 0.0), "a number >= 0", lambda v: v >= 0)
    require_number("data.pixel_scale", cfg.data.get("pixel_scale", 1.0), "a positive number", lambda v: v > 0)
    if cfg.optim.schedule not in ("plateau", "step"):
        raise ConfigError(f"optim.schedule must be plateau or step, got {cfg.optim.schedule!r}")
    if cfg.resume not in ("auto", "never"):
        raise ConfigError(f"resume must be auto or never, got {cfg.resume!r}")
    compile_ = cfg.trainer.compile
    if not isinstance(compile_, bool) and compile_ not in COMPILE_MODES:
        raise ConfigError(f"trainer.compile must be true, false or one of {COMPILE_MODES}, got {compile_!r}")
    # A switch given as a string ("maybe", "yes") would otherwise count as true.
    switches = {"trainer.amp": cfg.trainer.get("amp"), "trainer.channels_last": cfg.trainer.get("channels_last"),
                "eval.ten_crop": cfg.eval.get("ten_crop"), "data.crop_flip": cfg.data.get("crop_flip", False),
                "data.pca_lighting": cfg.data.get("pca_lighting", False), "data.download": cfg.data.get("download", False),
                "logger.system_stats": cfg.logger.get("system_stats", True)}
    for key, value in switches.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    tags = cfg.logger.get("tags") or []
    if not OmegaConf.is_list(tags) and not isinstance(tags, list):  # 'abc' became the tags a, b and c
        raise ConfigError(f"logger.tags must be a list such as [lrn,seed0], got {tags!r}")
    if cfg.logger.get("name") == "wandb" and not (isinstance(cfg.logger.get("project"), str) and cfg.logger.project):
        raise ConfigError(f"logger.project must name a W&B project, got {cfg.logger.get('project')!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.device)):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")


def pick_device(name: str, world: World = World()) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world.size > 1:  # one GPU per process
        name = f"cuda:{world.local_rank}"
    return torch.device(name)


def make_scheduler(optimizer, optim_cfg):
    if optim_cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, optim_cfg.step_epochs, optim_cfg.factor)
    # Section 5: divide by 10 when the validation error stops improving, three times in all.
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=optim_cfg.factor, patience=optim_cfg.patience,
        min_lr=optim_cfg.lr * optim_cfg.factor ** optim_cfg.max_reductions)


def setup_model(model, device: torch.device, channels_last: bool, compile_mode: bool | str = False,
                world: World = World()):
    """The model as the trainer runs it (fit and src/bench.py both call this): cuDNN autotuning on
    CUDA, channels_last weights, DDP across ranks, torch.compile (true or a mode such as
    "reduce-overhead", which adds CUDA graphs). Returns the module to call; `model` keeps the weights."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # grouped and odd-sized convolutions: pick by measurement
    if channels_last:  # faster convolutions and pooling on both cuDNN and oneDNN (CPU)
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    step_model = model
    if world.size > 1:  # averages the gradients across ranks; rank 0's initial weights are broadcast
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_mode:
        step_model = torch.compile(step_model, mode=None if compile_mode is True else compile_mode)
    return step_model


class TrainStep:
    """One SGD step on one batch, the only copy of it (fit and src/bench.py run it): forward under
    bf16 autocast when asked, cross-entropy, backward, update. The loss and the misses are added up
    on the device and never read per step, so the host queues the next step while the GPU runs
    this one.

        sums:   loss x images, misses, images (the epoch so far)
        window: misses, images (since the last step log)

    On CUDA, choose_layers (fit calls it on noise before the first batch; else the first call does)
    picks, by timing, each tower layer's grouped-conv implementation
    (model.grouped_conv=auto), conv1's (model.conv1_impl=auto) and where the max-pool after each LRN
    runs (model.pool_in_lrn=auto; with model.lrn_impl=auto, the reference LRN is timed too, so a fused
    kernel that fails is left out): `layer_impls` holds the choice, `layer_ms` each candidate's forward
    + backward and each tower direction's ways in ms (see choose_layer_impls), before torch.compile
    traces.
    """

    def __init__(self, model, step_model, optimizer, device: torch.device, bf16: bool = False):
        self.model = model  # the plain module; step_model may wrap it (DDP, torch.compile)
        self.step_model, self.optimizer, self.bf16 = step_model, optimizer, bf16
        self.layer_impls: dict[str, str] | None = None
        self.layer_ms: dict[str, dict] = {}
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.window = torch.zeros(2, dtype=torch.float64, device=device)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def choose_layers(self, x: torch.Tensor) -> None:
        """Pick the auto layers' ways by timing on `x` (CUDA only, once). fit calls it on a batch of
        noise before the data pipeline starts: raced while the pipeline decodes on the same GPU, the
        way timed beside a decode looks slower than it is, and the choice stays for the whole run."""
        if self.layer_impls is None:
            self.layer_impls = choose_layer_impls(self.model, x, self.autocast, timings=self.layer_ms) \
                if x.is_cuda else {}

    def choose_layers_on_noise(self, batch: int, channels: int, size: int) -> None:
        """choose_layers on noise of a batch's shape, before the data pipeline starts (fit, the bench);
        its own generator leaves the seeded RNGs alone."""
        device = self.sums.device
        noise = torch.randn(batch, channels, size, size, device=device, generator=torch.Generator(device).manual_seed(0))
        self.choose_layers(_to_model(noise, self.model))

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, loss_weight: float = 1.0) -> None:
        self.choose_layers(x)  # a no-op where fit (or the bench) chose before the first batch
        with self.autocast():
            logits = self.step_model(x)
        loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        (loss if loss_weight == 1.0 else loss * loss_weight).backward()
        self.optimizer.step()
        with torch.no_grad():
            wrong = (logits.argmax(1) != labels).sum().double()
            images = torch.full_like(wrong, len(labels))  # a fill on the device, not a host->device copy
            self.sums += torch.stack([loss.detach().double() * images, wrong, images])
            self.window += torch.stack([wrong, images])


def dropout_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of the torch RNGs (CPU and CUDA: dropout) for one step on one rank."""
    return int.from_bytes(hashlib.blake2b(f"dropout/{seed}/{epoch}/{step}/{rank}".encode(), digest_size=8).digest(),
                          "little")


def topk_errors(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of top-1 and top-5 misses (top-k capped at the number of classes), on the device."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == labels[:, None]
    return (~hit[:, 0]).sum(), (~hit.any(1)).sum()


CENTRE = 4  # the centre patch's place among augmenter.ten_crop's ten


def evaluate(model, data, batch_size: int, ten_crop: bool, autocast, world: World = World(),
             split: str = "val") -> dict:
    """val_loss, val_top1_err, val_top5_err; with ten_crop, of the softmax averaged over the ten patches,
    and also val_centre_*: the centre patch alone, which is the single-crop test of the same net, so the
    ten_crop claim needs no second training (alexlab.claims: its `recorded_as`).
    split="train_eval": the same test (eval mode, no augmentation) on a fixed subset of the training
    images as many as the validation split has (seed 0), as train_eval_*: the net's training error
    without dropout's noise or random crops, which the running training error carries."""
    model.eval()
    sums = torch.zeros(6 if ten_crop else 3, dtype=torch.float64, device=data.augmenter.stats.mean_image.device)
    source = data.val if split == "val" else data.train
    positions = torch.arange(len(data.val)) if split == "val" else subset_positions(len(data.train), len(data.val))
    order = world.shard(positions)  # each rank tests its part; the sums are added up
    with torch.no_grad(), autocast():
        for images, labels in source.batches(order, batch_size):
            images, labels = images.to(sums.device, non_blocking=True), labels.to(sums.device, non_blocking=True)
            if ten_crop:
                # a patch at a time: ten times the batch in one call ran up to 1.5x slower on a CPU, in 10x the memory
                logits = torch.stack([model(_to_model(patch, model)).float() for patch in data.augmenter.ten_crop(images)])
                probs = logits.softmax(2).mean(0)
                loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
                centre_loss = F.cross_entropy(logits[CENTRE], labels, reduction="sum")
                parts = (loss, *topk_errors(probs, labels), centre_loss, *topk_errors(logits[CENTRE], labels))
            else:
                scores = model(_to_model(data.augmenter.eval(images), model)).float()
                loss = F.cross_entropy(scores, labels, reduction="sum")
                parts = (loss, *topk_errors(scores, labels))
            sums += torch.stack([part.double() for part in parts])
    mean = (world.sum(sums) / len(positions)).tolist()
    names = ["loss", "top1_err", "top5_err"] + (["centre_loss", "centre_top1_err", "centre_top5_err"] if ten_crop else [])
    return {f"{split}_{name}": value if name.endswith("loss") else 100 * value for name, value in zip(names, mean)}


LRN_FACTOR_IMAGES, LRN_FACTOR_BATCH = 1024, 128  # small batches: the hook copies conv1's output in fp32


def lrn_factors(model, data, autocast, tracker) -> dict:
    """The final net's LRN factors (alexlab.lrn.factor_percentiles: a normalisation, or a near-constant
    scale?) on a fixed random LRN_FACTOR_IMAGES validation images, tested as validation is. On the plain
    module, not the compiled or DDP one the hooks could not see into; empty for a net without LRN. A
    diagnostic: where it fails (out of memory, say) the run goes on without it, and its record says so."""
    if not any(isinstance(m, LocalResponseNorm) for m in model.modules()):
        return {}
    model.eval()
    device = data.augmenter.stats.mean_image.device

    def forward():
        with torch.no_grad(), autocast():
            for images, _ in data.val.batches(subset_positions(len(data.val), LRN_FACTOR_IMAGES), LRN_FACTOR_BATCH):
                model(_to_model(data.augmenter.eval(images.to(device, non_blocking=True)), model))
    try:
        return factor_percentiles(model, forward)
    except Exception as err:  # noqa: BLE001 - any failure here must not cost the trained run
        tracker.note(f"the LRN factors were not measured: {first_line(err)}")
        return {}


def _to_model(x: torch.Tensor, model) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if getattr(model, "channels_last", False) else x


def fit(cfg, run_dir: Path, tracker, world: World = World(), resuming: list[str] | None = None,
        stop: StopFlag | None = None) -> dict:
    """Train `cfg` in `run_dir`, reporting to `tracker`; returns the training state (history, steps, ...).
    resuming: check_resume's answer: None starts afresh, a list continues from the checkpoint (with the
    config changes it lists). stop: a StopFlag the caller installed before it wrote anything (a signal
    during the set-up then stops the run before its first step); None: fit installs its own.

    With world.size > 1 this is one rank of data parallel training (see alexlab.distributed): each
    rank trains on its slice of every global batch and only rank 0 writes the checkpoint.
    """
    check_config(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)  # kept in the checkpoint
    run_dir = Path(run_dir)
    device = pick_device(cfg.device, world)
    torch.manual_seed(cfg.seed)
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    data = build_data(cfg.data, int(cfg.model.input_size), device, cfg.data.cache_dir)
    tracker.dataset(data.num_classes, data.skipped_files, len(data.train), majority_error(data.val))
    model = build_model(cfg.model, data.num_classes).to(device)
    step_model = setup_model(model, device, bool(cfg.trainer.channels_last), cfg.trainer.compile, world)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.optim)
    train_step = TrainStep(model, step_model, optimizer, device, bf16=device.type == "cuda" and cfg.trainer.amp)

    # sums, window: TrainStep's running totals, kept in the checkpoint.
    state = {"epoch": 0, "step": 0, "history": [], "steps": [], "images_seen": 0, "train_time_s": 0.0,
             "sums": torch.zeros(3, dtype=torch.float64), "window": torch.zeros(2, dtype=torch.float64)}
    ckpt_path = run_dir / CHECKPOINT_NAME
    if resuming is not None:
        state = load_checkpoint(ckpt_path, model, optimizer, scheduler)
        if not world.is_main:  # the checkpoint holds the sums over all ranks: count them once
            state["sums"].zero_()
            state["window"].zero_()
        tracker.note(f"resumed from {ckpt_path} at epoch {state['epoch']} step {state['step']}"
                     + (f", with {'; '.join(resuming)}" if resuming else ""))
    # A signal while the data loaded or the model was built: stopped before the record is taken over,
    # so that a finished run run again keeps its record (alexlab.tracking.Tracker.keep_previous).
    early = world.max_int(stop.signum or 0, device) if stop is not None else 0
    if early:
        raise Interrupted(early, before_training=True)
    tracker.start(state["history"], str(device), trains=state["epoch"] < int(cfg.trainer.epochs))

    batch_size = int(cfg.trainer.batch_size)
    steps_per_epoch = len(data.train) // batch_size
    leftover = len(data.train) % batch_size
    if leftover >= world.size:
        steps_per_epoch += 1
    elif leftover and resuming is None:  # a rank's part would be empty (ILSVRC-2012, batch 128, 16 ranks: 15 left)
        tracker.note(f"the last {leftover} image(s) of each epoch's order are left out: fewer than the "
                     f"{world.size} data parallel processes")
    log_every = int(cfg.trainer.log_every_steps or 0)
    train_step.window = state["window"].to(device)
    train_step.choose_layers_on_noise(len(range(batch_size)[world.part(batch_size)]), int(cfg.model.in_channels),
                                      int(cfg.model.input_size))
    first_epoch = state["epoch"]
    with contextlib.nullcontext(stop) if stop is not None else StopFlag() as stop:
        for epoch in range(state["epoch"], int(cfg.trainer.epochs)):
            model.train()
            train_step.sums = state["sums"].to(device)
            order = torch.randperm(len(data.train), generator=batch_generator(cfg.seed, epoch, -1))
            start_step = state["step"]
            tic = time.perf_counter()
            images_this_session = 0
            progress = tracker.progress(steps_per_epoch, start_step, f"epoch {epoch + 1}/{cfg.trainer.epochs}")
            # Each rank loads (and decodes) only its part of every global batch; the augmentation
            # draws are made for the whole global batch, so any number of ranks sees the same crops.
            global_batches = order[start_step * batch_size:steps_per_epoch * batch_size].split(batch_size)
            parts = [world.part(len(b)) for b in global_batches]
            local_batches = [b[part] for b, part in zip(global_batches, parts)]
            for step, (images, labels) in enumerate(data.train.batches_of(local_batches), start_step):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                part, global_count = parts[step - start_step], len(global_batches[step - start_step])
                x = data.augmenter.train(images, batch_generator(cfg.seed, epoch, step), part.start, global_count)
                torch.manual_seed(dropout_seed(cfg.seed, epoch, step, world.rank))
                # DDP averages over ranks: weight each slice so the result is the global batch's mean
                train_step(_to_model(x, model), labels, len(labels) * world.size / global_count)
                global_step = epoch * steps_per_epoch + step + 1
                if log_every and global_step % log_every == 0:
                    w = world.sum(train_step.window.clone()).tolist()
                    state["steps"].append({"step": global_step, "train_top1_err": 100 * w[0] / w[1]})
                    train_step.window.zero_()
                state["images_seen"] += global_count
                images_this_session += global_count
                progress.update(1)
                # Every rank stops after the same step, whichever of them got the signal. Asking the
                # others is a collective plus a host sync, so ranks ask every STOP_CHECK_STEPS steps.
                if world.size == 1:
                    signum = stop.signum
                elif (step + 1) % STOP_CHECK_STEPS == 0 or step + 1 == steps_per_epoch:
                    signum = world.max_int(stop.signum or 0, device)
                else:
                    signum = None
                if signum:
                    state.update(epoch=epoch, step=step + 1, sums=world.sum(train_step.sums.clone()).cpu(),
                                 window=world.sum(train_step.window.clone()).cpu(),
                                 train_time_s=state["train_time_s"] + time.perf_counter() - tic)
                    progress.close()
                    if world.is_main:
                        save_checkpoint(ckpt_path, model, optimizer, scheduler, state, config)
                    raise Interrupted(signum, state=state)
            progress.close()
            if epoch == first_epoch and train_step.layer_impls:
                tracker.note(f"layers timed before the first step, fastest kept: {train_step.layer_impls} "
                             f"(ms: {train_step.layer_ms})")
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_time = time.perf_counter() - tic
            loss_sum, wrong, seen = world.sum(train_step.sums).tolist()
            metrics = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1_err": 100 * wrong / seen,
                       "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": epoch_time,
                       "images_per_s": images_this_session / epoch_time,
                       "images_seen": state["images_seen"], "steps": (epoch + 1) * steps_per_epoch}
            metrics.update(evaluate(step_model, data, int(cfg.eval.batch_size), bool(cfg.eval.ten_crop),
                                    train_step.autocast, world))
            if epoch + 1 == int(cfg.trainer.epochs):  # the final net's LRN, and its overfitting (overfit_gap)
                metrics.update(lrn_factors(model, data, train_step.autocast, tracker))
                metrics.update(evaluate(step_model, data, int(cfg.eval.batch_size), False, train_step.autocast,
                                        world, split="train_eval"))
            if not all(math.isfinite(metrics[k]) for k in ("train_loss", "val_loss")):
                tracker.note(f"epoch {epoch + 1}: loss is not finite (diverged)")
            if cfg.optim.schedule == "plateau":
                scheduler.step(metrics["val_top1_err"])
            else:
                scheduler.step()
            state["history"].append(metrics)
            state.update(epoch=epoch + 1, step=0, sums=torch.zeros(3, dtype=torch.float64),
                         window=world.sum(train_step.window.clone()).cpu(), train_time_s=state["train_time_s"] + epoch_time)
            if world.is_main:  # first: whatever fails in the record or in W&B, the epoch is saved
                save_checkpoint(ckpt_path, model, optimizer, scheduler, state, config)
            tracker.log_epoch(metrics, state["steps"])
    return state


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict, config: dict) -> None:
    atomic_torch_save({
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": state,
        "config": config,  # the resolved config that trained it: resume checks it (check_resume)
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),  # a requeued job with resume=never resumes only its own
    }, path)


# What a resumed run may change: where and how it runs and logs, and how many epochs it trains in all
# (the lr schedules, plateau and step, and the seeded data order do not depend on the total, so a run
# resumed with more epochs trains as one launched with them would have).
RESUMABLE_CHANGES = (*NOT_THE_EXPERIMENT, "trainer.epochs")


def requeued() -> bool:
    """A SLURM job run again after preemption or a requeue (submitit's on its time limit): it repeats
    its command, resume=never included, which meant the run's first start, not each of its restarts.
    It resumes then from a checkpoint that this job (SLURM_JOB_ID) wrote, and from no other."""
    return bool(os.environ.get("SLURM_JOB_ID")) and os.environ.get("SLURM_RESTART_COUNT", "0").strip() not in ("", "0")


def check_resume(run_dir: Path, config: dict) -> list[str] | None:
    """Whether the run at `config` continues from run_dir's checkpoint: None if it starts afresh (no
    checkpoint, or resume=never, except in a requeued SLURM job for a checkpoint it wrote: requeued), else the
    config paths it changes that RESUMABLE_CHANGES allows, as
    "path: old -> new". Raises ConfigError if the checkpoint was written under another experiment config
    (another model, data, recipe or seed: resuming would train one config and label it another) or is
    already past trainer.epochs, or if there is no checkpoint but a completed run of another experiment
    config left its results.json there (its checkpoint deleted to save disk, say: the record would be
    replaced without a word). Called before anything in run_dir is written, so a refused run leaves
    the earlier run's files as they were."""
    path = Path(run_dir) / CHECKPOINT_NAME
    never = config.get("resume") != "auto"
    if never and not requeued():
        return None
    if not path.is_file():
        if never:
            return None
        try:
            finished = json.loads((Path(run_dir) / RESULTS_NAME).read_text())
        except (OSError, ValueError):
            return None
        if isinstance(finished, dict) and finished.get("status") == "completed" and isinstance(finished.get("config"), dict):
            refuse_another_config(finished["config"], config, f"{Path(run_dir) / RESULTS_NAME} records a completed run "
                                  "with another config and no checkpoint", "run this one in another directory, or "
                                  "resume=never to start over here (replacing that record)")
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: reads only what is used
        saved, epoch, step = ckpt.get("config"), int(ckpt["state"]["epoch"]), int(ckpt["state"].get("step", 0))
    except Exception as err:  # noqa: BLE001 - torch.load's errors vary with the damage, and say little
        if never:  # resume=never in a requeued job: not its own checkpoint, whoever wrote it
            return None
        raise ConfigError(f"{path} is damaged or not a checkpoint of this tool ({type(err).__name__} on reading it): "
                          "move it away, or resume=never to start over here") from err
    if never and ckpt.get("slurm_job_id") != os.environ.get("SLURM_JOB_ID"):
        return None  # resume=never in a requeued job: an earlier run's checkpoint (alexlab.job removes it)
    if saved is None:  # written before checkpoints kept their config: results.json beside it has it
        try:
            saved = json.loads((path.parent / RESULTS_NAME).read_text())["config"]
        except (OSError, ValueError, KeyError):
            saved = config  # nothing to check against
    resumable = refuse_another_config(saved, config, f"{path} was written by a run with another config",
                                      "run this one in another directory, repeat the same command to resume that "
                                      "one, or resume=never to start over here")
    epochs = config["trainer"]["epochs"]
    if isinstance(epochs, int) and (epoch > epochs or epoch == epochs and step):  # a bad value: check_config's
        trained = f"{epoch} epochs" + (f" and {step} steps of the next" if step else "")
        raise ConfigError(f"{path} has trained {trained}, more than trainer.epochs={config['trainer']['epochs']}: "
                          "run in another directory, or resume=never to start over here")
    return resumable


def refuse_another_config(saved: dict, config: dict, what: str, advice: str) -> list[str]:
    """ConfigError ("{what} (path: old -> new; ...): {advice}") where `config` differs from `saved` in more than
    RESUMABLE_CHANGES; else the resumable changes, as "path: old -> new"."""
    old, new = flatten(saved), flatten(config)
    differing = differing_paths([old, new])
    # what differs once the resumable paths are taken out, as the report takes them out
    not_resumable = set(differing_paths([flatten(without(c, RESUMABLE_CHANGES)) for c in (saved, config)]))

    def change(p: str) -> str:
        return f"{p}: {json.dumps(old.get(p), default=str)} -> {json.dumps(new.get(p), default=str)}"
    refused = [change(p) for p in differing if p in not_resumable]
    if refused:
        shown = "; ".join(refused[:4]) + (f"; +{len(refused) - 4} more" if len(refused) > 4 else "")
        raise ConfigError(f"{what} ({shown}): {advice}")
    return [change(p) for p in differing if p not in not_resumable]


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt["state"]


def print_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
