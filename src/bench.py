"""Speed benchmark: `python src/bench.py [--out FILE.json]`.

Checks correctness first (fused LRN against nn.LocalResponseNorm in fp32 and bf16 on the paper's
shapes, the grouped-conv implementations against each other, the GPU resize against torchvision's),
then times, on synthetic data already on the device:
  - full training steps (forward, backward, SGD) of torchvision's AlexNet and of the `alexnet` preset
    with LRN on/off and towers 2/1, in fp32, bf16 + channels_last, and bf16 + channels_last + compile;
  - LRN alone (fused, reference, PyTorch's, compiled PyTorch's) against a ReLU on the same tensor,
    and the fused kernels' launch parameters (`lrn_configs`), with what each launch costs an SM in
    registers and occupancy (`kernels`: read off the compiled code, so it runs without a GPU too);
then the JPEG pipeline alone (files -> augmented batch on the GPU; and the CPU path) and end to end
(files -> step), on generated ImageNet-sized JPEGs and on their resized copies (data.resized_jpegs). Warm-up excluded, median of repeats, device synchronised.
Prints a table last and writes JSON with the card, library versions and date.
`--only target` times just the rows the issue's target compares (each net eager and compiled), in
about 100 s on an H100: the short check for a lent GPU.

Without CUDA it runs a tiny version (batch 2, few steps, small images) in seconds, for the tests.
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import functools
import os
import statistics
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
if "--cpu" in sys.argv or not torch.cuda.is_available():
    # the Triton kernels (the fused LRN, the GPU resize) then run in Triton's interpreter, which must be
    # on before any kernel is defined (the imports below define them)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from alexlab.errors import ConfigError  # noqa: E402
from alexlab.io import atomic_write_json  # noqa: E402
from alexlab.lrn import FUSED_WINDOWS  # noqa: E402
from alexlab.model import TOWER_IMPLS, build_model  # noqa: E402
from alexlab.timing import seconds_per_call as time_steps, synchronize as sync  # noqa: E402
from alexlab.tracking import device_name, library_versions  # noqa: E402
from alexlab.train import COMPILE_MODES, TrainStep, dropout_seed, setup_model  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
PAPER_LRN_SHAPES = ((256, 96, 55, 55), (256, 256, 27, 27))  # conv1's and conv2's outputs, batch 256
# lrn_impl -> how its kernels form the window sums; fused_opaque runs fused_gather's kernels
LRN_WINDOWS = {impl: window for impl, window in FUSED_WINDOWS.items() if impl != "fused_opaque"}


def model_preset(name: str, **changes) -> dict:
    """A conf/model preset as a plain dict (its `defaults` list merged), without Hydra."""
    cfg = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    for base in reversed([d for d in cfg.pop("defaults", []) if d != "_self_"]):
        cfg = model_preset(base) | cfg
    cfg["in_channels"] = 3
    cfg["input_pixel_scale"] = 255.0  # the paper's alpha as printed (timing does not depend on it; a conf preset's is ${data.pixel_scale})
    cfg.update(changes)
    return cfg


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.cuda = self.device.type == "cuda"
        self.tiny = not self.cuda
        self.batch = args.batch or (256 if self.cuda else 2)
        # The tiny CPU version: the `small` preset (27 px) for ours, torchvision's net at 64 px.
        self.ours, self.ours_size, self.tv_size = ("alexnet", 227, 224) if self.cuda else ("small", 27, 64)
        self.image_size = 256 if self.cuda else 32
        self.warmup, self.steps, self.repeats = (5, 10, 3) if self.cuda else (1, 1, 2)
        self.started = time.perf_counter()
        self.cpu_shares = [float(v) for v in args.cpu_decode_shares.split(",") if v.strip()]
        self.decode_processes = [int(v) for v in args.decode_processes.split(",") if v.strip()]
        # The LRN's tensors (conv1's and conv2's outputs) and the fused kernels' launch parameters to try
        # (`lrn_configs` times them, `kernels` reads their registers and occupancy).
        self.lrn_shapes = list(PAPER_LRN_SHAPES) if self.cuda else [(2, 24, 3, 3)]
        from alexlab.lrn_triton import BLOCK_ELEMENTS, NUM_WARPS
        self.lrn_sweep = [(b, w) for b in (512, 1024, 2048, 4096) for w in (4, 8)] if self.cuda else \
            [(BLOCK_ELEMENTS, NUM_WARPS)]
        self.record = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(str(self.device)), "cpu_count": os.cpu_count(),
            "versions": library_versions() | {"triton": _version("triton")},
            "batch_size": self.batch, "tiny": self.tiny, "cudnn_benchmark_limit": torch.backends.cudnn.benchmark_limit,
            "checks": {}, "train_step": [], "lrn": [], "data": [], "end_to_end": [], "overlap": [], "notes": [],
            "errors": []}

    # ---- bookkeeping ----
    def out_of_time(self) -> bool:
        return time.perf_counter() - self.started > self.args.budget_s

    def save(self):
        if self.args.out:
            atomic_write_json(self.record, Path(self.args.out))

    def section(self, name, fn):
        if self.out_of_time():
            self.record["errors"].append(f"{name}: skipped, over the {self.args.budget_s} s budget")
            return
        print(f"== {name}", flush=True)
        # A section still running after --stack-dump-s prints every thread's stack (to stderr): where it hangs.
        faulthandler.dump_traceback_later(self.args.stack_dump_s, exit=False)
        tic = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 - one broken section must not lose the others' numbers
            self.record["errors"].append(f"{name}: {traceback.format_exc(limit=3)}")
            print(traceback.format_exc(), flush=True)
        finally:
            faulthandler.cancel_dump_traceback_later()
        # what each section costs, for planning the next run's budget on a lent GPU
        self.record.setdefault("section_seconds", {})[name] = round(time.perf_counter() - tic, 1)
        print(f"== {name}: {self.record['section_seconds'][name]} s", flush=True)
        self.save()

    def add_data_row(self, row: dict) -> None:
        self.record["data"].append(row)
        self.save()  # each row at once: a run stopped by its time limit keeps what it measured

    @contextlib.contextmanager
    def row_guard(self, label: str):
        """One row that fails (nvImageCodec on a machine it has never run on) is recorded as an error;
        the section's other rows still run."""
        try:
            yield
        except Exception:  # noqa: BLE001
            self.record["errors"].append(f"{label}: {traceback.format_exc(limit=3)}")
            print(f"   {label}: FAILED\n{traceback.format_exc()}", flush=True)

    # ---- correctness ----
    def checks(self):
        from torch import nn
        from alexlab.lrn import LocalResponseNorm
        shapes = [(8, 96, 55, 55), (8, 256, 27, 27)] if self.cuda else [(2, 24, 3, 3)]
        for shape in shapes:
            x = (torch.rand(shape, device=self.device) * 20).contiguous(memory_format=torch.channels_last)
            g = torch.randn(shape, device=self.device)
            ref_x = x.clone().requires_grad_()
            ref_y = nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)(ref_x)
            (ref_y * g).sum().backward()
            for impl in ("fused", "fused_gather", "fused_scan", "fused_opaque"):
                for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
                    fx = x.detach().clone().to(dtype).requires_grad_()
                    y = LocalResponseNorm(impl=impl)(fx)
                    (y.float() * g).sum().backward()
                    err_y = ((y.float() - ref_y.detach()).abs().max()).item()
                    err_g = ((fx.grad.float() - ref_x.grad).abs().max() / ref_x.grad.abs().max()).item()
                    ok = err_y <= tol * 20 and err_g <= tol
                    self.record["checks"][f"lrn_{impl}_{dtype}_{shape}"] = {"max_abs_err_y": err_y,
                                                                           "max_rel_err_grad": err_g, "ok": ok}
            # The model's block: ReLU, LRN and max-pool in one pass (pool_in_lrn), against PyTorch's in fp32
            # on the same (rounded) input. Rounding can still flip a window's near-equal maxima now and then,
            # which sends its gradient to another pixel, so the gradient check counts the elements off
            # instead of taking the largest error.
            x = x * 1.25 - 5  # some negatives for the ReLU
            for dtype, tol, off in ((torch.float32, 1e-5, 1e-5), (torch.bfloat16, 3e-2, 1e-3)):
                ref_x = x.to(dtype).float().clone().requires_grad_()
                ref_y = F.max_pool2d(nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)(torch.relu(ref_x)), 3, 2)
                g = torch.randn(ref_y.shape, device=self.device)
                (ref_y * g).sum().backward()
                fx = x.detach().clone().to(dtype).requires_grad_()
                y = LocalResponseNorm(impl="fused_gather", relu=True, pool=nn.MaxPool2d(3, 2))(fx)
                (y.float() * g).sum().backward()
                err_y = ((y.float() - ref_y.detach()).abs().max()).item()
                wrong = ((fx.grad.float() - ref_x.grad).abs() > tol * ref_x.grad.abs().max()).float().mean().item()
                self.record["checks"][f"lrn_pool_fused_gather_{dtype}_{shape}"] = {
                    "max_abs_err_y": err_y, "share_of_grad_off": wrong, "ok": err_y <= tol * 20 and wrong <= off}
        torch.manual_seed(0)
        x = torch.randn(4 if self.cuda else 1, 3, self.ours_size, self.ours_size, device=self.device)
        x = x.contiguous(memory_format=torch.channels_last)  # the trainer's layout
        outs, tf32 = {}, torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False  # the implementations pick other kernels: compare fp32 with fp32
        try:
            for impl in TOWER_IMPLS:
                torch.manual_seed(0)
                model = build_model(model_preset(self.ours, dropout=0.0, grouped_conv=impl), 1000).to(self.device)
                with torch.no_grad():
                    outs[impl] = model.to(memory_format=torch.channels_last)(x)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        scale = outs["native"].abs().max().item()
        for impl in TOWER_IMPLS[1:]:
            err = (outs[impl] - outs["native"]).abs().max().item()
            self.record["checks"][f"grouped_conv_{impl}"] = {"max_abs_err": err, "scale": scale,
                                                             "ok": err <= 1e-3 * max(scale, 1e-6)}
        if self.cuda:
            self.record["checks"]["training_steps_do_not_wait_for_the_gpu"] = host_time_while_gpu_busy(self.device)

    # ---- training steps ----
    def train_step_fn(self, model, mode: str, size: int):
        """The trainer's own step (alexlab.train: setup_model, TrainStep) on one fixed batch."""
        train_step = trainer_step(model, self.device, mode)
        x = torch.randn(self.batch, 3, size, size, device=self.device)
        if parse_mode(mode)[1]:  # channels_last
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (self.batch,), device=self.device)
        return functools.partial(train_step, x, y)

    def time_model(self, label: str, make_model, mode: str, size: int):
        if self.out_of_time():
            self.record["errors"].append(f"train_step {label} {mode}: skipped (budget)")
            return None
        torch.manual_seed(0)
        model = make_model().to(self.device)
        tic = time.perf_counter()
        step = self.train_step_fn(model, mode, size)
        warmup = self.warmup + (2 if parse_mode(mode)[2] else 0)
        try:
            seconds = time_steps(step, self.device, warmup, self.steps, self.repeats)
        except Exception as err:  # noqa: BLE001
            self.record["errors"].append(f"train_step {label} {mode}: {type(err).__name__}: {err}")
            print(f"   {label} {mode}: FAILED {err}", flush=True)
            return None
        row = {"model": label, "mode": mode, "images_per_s": self.batch / seconds, "ms_per_step": 1e3 * seconds,
               "setup_and_warmup_s": time.perf_counter() - tic - seconds * self.steps * self.repeats}
        if step.func.layer_impls:  # grouped_conv / conv1_impl / pool_in_lrn=auto: what the first step's timing chose
            row["layer_impls"], row["layer_ms"] = step.func.layer_impls, step.func.layer_ms
            for layer, ms in step.func.layer_ms.items():  # ways left out of the race: the step ran, but say so
                if "failed" in ms:
                    self.record["errors"].append(f"train_step {label} {mode}: {layer}'s ways failed: {ms['failed']}")
        self.record["train_step"].append(row)
        self.save()  # row by row: a run stopped by its time limit keeps what it measured
        print(f"   {label:<34} {mode:<22} {row['images_per_s']:>9.0f} img/s", flush=True)
        del model, step
        if self.cuda:
            torch.cuda.empty_cache()
        return row

    def train_steps(self):
        import torchvision
        tv = lambda: torchvision.models.alexnet(num_classes=1000)  # noqa: E731
        ours = lambda **c: (lambda: build_model(model_preset(self.ours, **c), 1000))  # noqa: E731
        size = self.ours_size
        eager, best = "bf16+cl", "bf16+cl+compile"
        compiled = [best + ("" if m == "default" else f":{m}") for m in self.args.compile_modes.split(",")]
        modes = ["fp32", eager] + (compiled if self.cuda and not self.args.no_compile else [])
        rates = {}  # grouped-conv implementation -> img/s of the paper net, eager
        for mode in modes:
            self.time_model("torchvision alexnet", tv, mode, self.tv_size)
            row = self.time_model("paper (lrn, towers 2)", ours(), mode, size)  # grouped_conv=auto
            if mode == eager:
                rates["auto"] = row["images_per_s"] if row else 0
        self.time_model("paper, reference LRN", ours(lrn_impl="reference"), eager, size)
        # the rows above run the max-pools after conv1's and conv2's LRN where the first step's timing put
        # them (pool_in_lrn=auto; see layer_ms); here each way throughout
        self.time_model("paper, pool_in_lrn=true", ours(pool_in_lrn=True), eager, size)
        self.time_model("paper, pool_in_lrn=false", ours(pool_in_lrn=False), eager, size)
        # lrn_impl=auto (the rows above) runs fused_gather on CUDA; the groups of four are timed here
        self.time_model("paper, lrn_impl=fused (groups of four)", ours(lrn_impl="fused"), eager, size)
        self.time_model("paper, lrn_impl=fused_scan", ours(lrn_impl="fused_scan"), eager, size)
        self.time_model("no LRN (towers 2)", ours(lrn=False), eager, size)
        self.time_model("one tower (lrn)", ours(towers=1), eager, size)
        self.time_model("no LRN, one tower", ours(lrn=False, towers=1), eager, size)
        for impl in ("native", "pad4", "space_to_depth"):  # conv1's ways (auto, in the rows above, picks one)
            self.time_model(f"paper, conv1_impl={impl}", ours(conv1_impl=impl), eager, size)
        # and one way per direction: cuDNN's grouped kernels, the weight's gradient by a dense call
        for impl in (*TOWER_IMPLS, "native/dense/dense"):
            row = self.time_model(f"paper, grouped_conv={impl}", ours(grouped_conv=impl), eager, size)
            rates[impl] = row["images_per_s"] if row else 0
        fastest = max(rates, key=rates.get)
        self.record["fastest_grouped_conv"] = fastest
        if self.cuda and not self.args.no_compile and fastest != "auto":
            self.time_model(f"paper, grouped_conv={fastest}", ours(grouped_conv=fastest), best, size)
        if self.cuda and not self.args.no_compile:
            # Compiled, the fused LRN cost ~3 ms a step instead of 0.7 (bench/RESULTS.md): is it the op
            # inside inductor's graph? Here the LRN layers run eagerly between compiled pieces.
            self.time_model(f"paper, grouped_conv={fastest}, LRN outside the compiled graph",
                            lambda: _lrn_not_compiled(ours(grouped_conv=fastest)()), best, size)
            # ... or inside it as an op inductor calls without tracing into (lrn_impl=fused_opaque)
            self.time_model(f"paper, grouped_conv={fastest}, lrn_impl=fused_opaque",
                            ours(grouped_conv=fastest, lrn_impl="fused_opaque"), best, size)
        paper = [r for r in self.record["train_step"] if r["model"].startswith("paper") and "reference" not in r["model"]
                 and (r["model"] == "paper (lrn, towers 2)" or r["model"].endswith(f"grouped_conv={fastest}"))]
        if paper:
            best_row = max(paper, key=lambda r: r["images_per_s"])
            self.record["fastest_paper_mode"] = best_row["mode"]

    def target(self):
        """The issue's speed target in one short run (about 100 s on an H100): the paper net against
        torchvision's AlexNet, each eager and compiled, then the eager rows again (their spread is the
        noise), then the paper net with dense towers compiled. `record["target"]`: each net's best row
        and their ratio (the target: the paper net at >= 95% of torchvision's best stock mode)."""
        import torchvision
        tv = lambda: torchvision.models.alexnet(num_classes=1000)  # noqa: E731
        ours = lambda **c: (lambda: build_model(model_preset(self.ours, **c), 1000))  # noqa: E731
        eager = "bf16+cl" if self.cuda else "fp32"
        modes = [eager] + (["bf16+cl+compile"] if self.cuda and not self.args.no_compile else [])
        rows = [row for mode in modes for row in (("torchvision alexnet", tv, mode, self.tv_size),
                                                  ("paper (lrn, towers 2)", ours(), mode, self.ours_size))]
        rows += rows[:2] + [("paper, grouped_conv=dense", ours(grouped_conv="dense"), modes[-1], self.ours_size)]
        timed = [self.time_model(*row) for row in rows]
        timed = [r for r in timed if r]
        best = {net: max((r for r in timed if r["model"].startswith(net)), key=lambda r: r["images_per_s"], default=None)
                for net in ("torchvision", "paper")}
        if best["torchvision"] and best["paper"]:
            ratio = best["paper"]["images_per_s"] / best["torchvision"]["images_per_s"]
            met = None if self.tiny else ratio >= 0.95  # tiny: other nets (the small preset), so no verdict
            self.record["target"] = {"paper_best": best["paper"], "torchvision_best": best["torchvision"],
                                     "ratio": ratio, "met": met}
            print(f"   target: the paper net at {ratio:.1%} of torchvision's best ({best['paper']['model']}, "
                  f"{best['paper']['mode']}: {best['paper']['images_per_s']:.0f} against "
                  f"{best['torchvision']['mode']}: {best['torchvision']['images_per_s']:.0f} img/s); "
                  + {True: "95% met", False: "95% not met", None: "the tiny CPU version's nets: no verdict"}[met],
                  flush=True)

    def traffic(self):
        """Bytes one bf16 channels_last training step moves through memory (alexlab.traffic: each op
        reads its inputs and writes its outputs once), at the real sizes (batch 256) on the meta
        device, so without a GPU too; beside each, on CUDA, the step measured by `train`."""
        import torchvision
        from alexlab.traffic import step_traffic
        measured = {r["model"]: r["ms_per_step"] for r in self.record["train_step"]
                    if r["mode"] == "bf16+cl" and self.cuda}
        ours = lambda **c: (lambda: build_model(model_preset("alexnet", **c), 1000))  # noqa: E731
        models = [("torchvision alexnet", lambda: torchvision.models.alexnet(num_classes=1000), 224),
                  ("paper, grouped_conv=native", ours(grouped_conv="native"), 227),
                  ("paper, grouped_conv=dense", ours(grouped_conv="dense"), 227),
                  ("paper, grouped_conv=split", ours(grouped_conv="split"), 227),
                  ("paper, grouped_conv=native, pool_in_lrn=false", ours(grouped_conv="native", pool_in_lrn=False), 227),
                  ("no LRN (towers 2)", ours(lrn=False, grouped_conv="native"), 227),
                  ("one tower (lrn)", ours(towers=1), 227),
                  ("no LRN, one tower", ours(lrn=False, towers=1), 227),
                  ("paper, reference LRN", ours(lrn_impl="reference", grouped_conv="native"), 227)]
        self.record["traffic"] = []
        for label, make, size in models:
            counter = step_traffic(make(), 256, size)
            row = {"model": label, "batch": 256, "gb_per_step": counter.total / 1e9,
                   "floor_ms_at_bandwidth": 1e3 * counter.total / (self.args.bandwidth_tbs * 1e12),
                   "top_ops_gb": {op: round(b / 1e9, 3) for op, b in counter.by_op.most_common(8)}}
            if label in measured:
                row["measured_ms_per_step"] = measured[label]
                row["effective_tb_per_s"] = counter.total / (measured[label] * 1e-3) / 1e12
            self.record["traffic"].append(row)
            print(f"   traffic, {label}: {row['gb_per_step']:.2f} GB a step, {row['floor_ms_at_bandwidth']:.2f} ms at "
                  f"{self.args.bandwidth_tbs} TB/s", flush=True)

    # ---- LRN alone ----
    def lrn_alone(self):
        from alexlab.lrn import LocalResponseNorm
        shape = (256, 96, 55, 55) if self.cuda else (2, 24, 3, 3)
        for dtype in (torch.float32, torch.bfloat16) if self.cuda else (torch.float32,):
            x = torch.randn(shape, device=self.device).contiguous(memory_format=torch.channels_last).to(dtype)
            g = torch.randn_like(x)
            contenders = {
                "relu": torch.relu,
                "lrn fused (ours, Triton)": LocalResponseNorm(impl="fused"),
                "lrn fused_gather (ours, Triton, a gather per window position)": LocalResponseNorm(impl="fused_gather"),
                "lrn fused_scan (ours, Triton, running-sum windows)": LocalResponseNorm(impl="fused_scan"),
                # conv1's block as the model runs it: the ReLU inside the LRN's kernels, against the two apart
                "relu inside lrn fused_gather (the model's conv1 and conv2)": LocalResponseNorm(impl="fused_gather",
                                                                                               relu=True),
                "relu, then lrn fused_gather": lambda t: LocalResponseNorm(impl="fused_gather")(torch.relu(t)),
                # ... and the max-pool after it inside too (pool_in_lrn=true), against it after (false);
                # pool_in_lrn=auto, the default, runs the faster of the two as timed before the first step
                "relu, lrn, max-pool in one fused_gather": LocalResponseNorm(
                    impl="fused_gather", relu=True, pool=nn.MaxPool2d(3, 2)),
                "relu inside lrn fused_gather, then max-pool": lambda t: F.max_pool2d(
                    LocalResponseNorm(impl="fused_gather", relu=True)(t), 3, 2),
                "lrn reference (ours, autograd.Function)": LocalResponseNorm(impl="reference"),
                "F.local_response_norm": lambda t: F.local_response_norm(t, 5, 1e-4, 0.75, 2.0)}
            if self.cuda and not self.args.no_compile:
                contenders["F.local_response_norm compiled"] = torch.compile(
                    lambda t: F.local_response_norm(t, 5, 1e-4, 0.75, 2.0))
            for name, fn in contenders.items():
                xr = x.detach().clone().requires_grad_()
                with torch.no_grad():
                    out_shape = fn(x).shape
                grad = g if out_shape == g.shape else torch.randn(out_shape, device=self.device, dtype=dtype)

                def step(fn=fn, xr=xr, grad=grad):
                    xr.grad = None
                    fn(xr).backward(grad)
                seconds = time_steps(step, self.device, 3, 10 if self.cuda else 1, 5 if self.cuda else 1)
                row = {"op": name, "dtype": str(dtype).replace("torch.", ""), "shape": list(shape),
                       "ms_fwd_bwd": 1e3 * seconds}
                self.record["lrn"].append(row)
                print(f"   {name:<40} {row['dtype']:<9} {row['ms_fwd_bwd']:.3f} ms", flush=True)

    def lrn_configs(self):
        """The fused LRN's launch parameters (alexlab.lrn_triton.BLOCK_ELEMENTS, NUM_WARPS, chosen without
        a GPU): forward + backward of each way of forming the window sums over block sizes and warp counts
        on conv1's output in bf16 channels_last (the trainer's case), and the defaults in NCHW and on
        conv2's output too (an NCHW input is what a layout change inside a compiled graph would hand the
        kernel)."""
        from alexlab import lrn_triton
        shapes, sweep = self.lrn_shapes, self.lrn_sweep
        dtype = torch.bfloat16 if self.cuda else torch.float32
        default = [(lrn_triton.BLOCK_ELEMENTS, lrn_triton.NUM_WARPS)]
        rows = self.record["lrn_configs"] = []
        for shape in shapes:
            for layout in ("channels_last", "nchw"):
                x = torch.randn(shape, device=self.device, dtype=dtype)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                g = torch.randn_like(x)
                pooled_size = lrn_triton.pooled_size(shape[2], 3, 2)
                g_pooled = torch.randn(*shape[:2], pooled_size, pooled_size, device=self.device, dtype=dtype)
                configs = sweep if (shape, layout) == (shapes[0], "channels_last") else default
                # "+pool": the pooled kernels, with the ReLU, as the model runs conv1's and conv2's block
                for impl, window, pooled in [(i + pool, w, bool(pool)) for pool in ("", "+pool")
                                             for i, w in LRN_WINDOWS.items()]:
                    for block, warps in configs:
                        if self.out_of_time():
                            self.record["errors"].append("lrn_configs: stopped (budget)")
                            return
                        xr = x.detach().clone().requires_grad_()

                        def step(xr=xr, window=window, block=block, warps=warps, pooled=pooled):
                            xr.grad = None
                            if pooled:
                                lrn_triton.lrn_pool_forward(xr, 5, 1e-4 / 5, 0.75, 2.0, window, block, warps,
                                                            True, 3, 2)[0].backward(g_pooled)
                            else:
                                lrn_triton.lrn_forward(xr, 5, 1e-4 / 5, 0.75, 2.0, window, block, warps).backward(g)
                        seconds = time_steps(step, self.device, 3, 10 if self.cuda else 1, 5 if self.cuda else 1)
                        rows.append({"impl": impl, "layout": layout, "shape": list(shape),
                                     "dtype": str(dtype).replace("torch.", ""), "block_elements": block,
                                     "num_warps": warps, "ms_fwd_bwd": 1e3 * seconds})
                        print(f"   lrn {impl:<12} {layout:<13} {'x'.join(map(str, shape)):<14} "
                              f"block {block:>5} warps {warps}: {1e3 * seconds:.3f} ms", flush=True)

    def kernels(self):
        """What each Triton kernel costs an SM (registers, spills, shared memory, occupancy), read off
        its code compiled for the GPU's architecture (sm_90 without one): no GPU time needed, so it
        also runs on a CPU machine (`--only kernels`). For the LRN, every launch `lrn_configs` times."""
        from alexlab import lrn_triton
        from alexlab.data.gpu_decode import RESIZE_BLOCK
        from alexlab.kernel_resources import compiled_resources, job_for_launch
        major, minor = torch.cuda.get_device_capability(self.device) if self.cuda else (9, 0)
        arch = 10 * major + minor
        default = (lrn_triton.BLOCK_ELEMENTS, lrn_triton.NUM_WARPS)
        rows, jobs = [], []
        # The paper's shapes even on a CPU (compiling needs no GPU); as the trainer launches them: bf16,
        # channels_last. The tiny version compiles the default launch only.
        for shape in PAPER_LRN_SHAPES:
            for impl, window, pool in [(i + name, w, pool) for name, pool in (("", None), ("+pool", (3, 2)))
                                       for i, w in LRN_WINDOWS.items()]:
                for block, warps in self.lrn_sweep:
                    for backward in (False, True):
                        jobs.append(lrn_triton.resource_job(backward, torch.bfloat16, shape, window=window,
                                                            block_elements=block, num_warps=warps,
                                                            relu=pool is not None, pool=pool))
                        rows.append({"kernel": f"lrn {impl} {'backward' if backward else 'forward'}",
                                     "channels": shape[1], "shape": list(shape), "dtype": "bfloat16",
                                     "layout": "channels_last", "block_elements": block,
                                     "default": (block, warps) == default})
        meta = functools.partial(torch.empty, device="meta")  # a batch of 256 as resize_square_batch launches it
        jobs.append(job_for_launch("alexlab.data.gpu_decode:_resize_crop_kernel",
                                   {"src_ptr": meta(256 * 3 * 375 * 500, dtype=torch.uint8),
                                    "offsets_ptr": meta(256, dtype=torch.int64),
                                    "meta_ptr": meta(256, 6, dtype=torch.int32), "scale_ptr": meta(256, 2),
                                    "out_ptr": meta(256, 3, 256, 256, dtype=torch.uint8), "S": 256},
                                   {"BLOCK": RESIZE_BLOCK}, 8))
        rows.append({"kernel": "resize_crop", "default": True, "block_elements": RESIZE_BLOCK})
        for row, found in zip(rows, compiled_resources(jobs, arch)):
            row.update(found)
            # loop-free kernels: each thread runs the code once (the pooled forward loops over the window's rows)
            if row["kernel"].startswith("lrn") and not row["kernel"].endswith("+pool forward") and found["instructions"]:
                row["instructions_per_element"] = found["instructions"] / (row["block_elements"] / (32 * row["num_warps"]))
        self.record["kernels"] = rows
        for r in rows:
            if r["default"]:
                print(f"   {r['kernel']:<26} {r.get('channels', ''):>4} block {r['block_elements']:>5} warps "
                      f"{r['num_warps']}: {r['registers']} registers, {r['spilled_bytes']} B spilled, "
                      f"occupancy {r['occupancy']:.0%}"
                      + (f", {r['instructions_per_element']:.0f} instructions per element" if r.get(
                          "instructions_per_element") else "") + f" ({r['arch']})", flush=True)

    # ---- JPEG pipeline ----
    @functools.cached_property
    def jpeg_files(self) -> list[str]:
        """The benchmark's JPEGs, generated once (and kept in --jpeg-dir for later runs)."""
        folder = Path(self.args.jpeg_dir)
        count = self.args.jpegs or (6144 if self.cuda else 6)
        paths = sorted(str(p) for p in folder.glob("*.JPEG")) if folder.is_dir() else []
        if len(paths) < count:
            folder.mkdir(parents=True, exist_ok=True)
            scale = 1.0 if self.cuda else 0.1  # the interpreter resizes slowly: small files on a CPU
            _in_processes(_make_jpeg, [(folder, i, scale) for i in range(count)])
            paths = sorted(str(p) for p in folder.glob("*.JPEG"))
        sizes = [os.path.getsize(p) for p in paths[:count]]
        self.record["jpeg_files"] = {"count": count, "mean_kb": sum(sizes) / len(sizes) / 1024,
                                     "note": "generated from scikit-image photos, ~500x375, grain, quality 93 "
                                             "(ILSVRC-2012 averages ~110 KB); in the page cache, so disk "
                                             "speed is not measured"}
        return paths[:count]

    @functools.cached_property
    def resized_files(self) -> list[str]:
        """The benchmark's JPEGs as `prepare.py data.resized_jpegs=true` writes them (the same function):
        shorter side to 256, centre crop, quality 95; generated once, kept beside --jpeg-dir."""
        folder = Path(f"{self.args.jpeg_dir}-{self.image_size}px-q95")
        targets = [folder / Path(p).name for p in self.jpeg_files]
        jobs = [(p, t, self.image_size, 95) for p, t in zip(self.jpeg_files, targets) if not t.is_file()]
        _in_processes(_write_resized_copy, jobs)
        self.record["resized_files"] = {"count": len(targets), "quality": 95, "size": self.image_size,
                                        "mean_kb": sum(t.stat().st_size for t in targets) / len(targets) / 1024}
        return [str(t) for t in targets]

    def files(self, resized: bool) -> list[str]:
        return self.resized_files if resized else self.jpeg_files

    def jpeg_source_and_augmenter(self, prefetch: int = 3, in_process: bool = True, resized: bool = False,
                                  cpu_share: float = 0.0, decoder: str = "torchvision", hw_load: float = 1.0,
                                  processes: int = 1):
        """The GPU JPEG source over the benchmark's files (or their resized copies), and the paper's
        augmentation."""
        from alexlab.data.augment import Augmenter, PixelStats
        from alexlab.data.gpu_decode import GpuJpegSource
        from alexlab.data.imagenet import decode_bytes
        paths = self.files(resized)
        size, crop = self.image_size, self.ours_size
        stats = PixelStats(torch.full((3, size, size), 0.45), torch.tensor([0.2, 0.02, 0.005]), torch.eye(3))
        augment = Augmenter(stats.to(self.device), crop, crop_flip=True, pca_lighting=True, pixel_scale=255.0)
        source = GpuJpegSource(paths, [i % 1000 for i in range(len(paths))], size, self.args.workers,
                               self.device, decode_bytes, prefetch=prefetch, in_process=in_process,
                               cpu_share=cpu_share, jpeg_decoder=decoder, hw_decoder_load=hw_load,
                               processes=processes)
        return source, augment

    def pipeline(self, model_step=None, epochs: int = 2, prefetch: int = 3, in_process: bool = True,
                 resized: bool = False, cpu_share: float = 0.0, decoder: str = "torchvision", hw_load: float = 1.0,
                 processes: int = 1):
        """(images/s from files to augmented batches, and through `model_step` if given; the number of
        files; the share of the time the main thread waited for the next batch). The share tells
        which side sets the rate: near 1, the pipeline (reading, decoding); near 0, the GPU work the
        main thread queues (the step, and the decode where it shares the GPU)."""
        from alexlab.data.augment import batch_generator
        if model_step is not None:  # the auto layers' race before decoding starts on the same GPU, as fit does
            model_step.choose_layers_on_noise(self.batch, 3, self.ours_size)
        source, augment = self.jpeg_source_and_augmenter(prefetch, in_process, resized, cpu_share, decoder, hw_load,
                                                         processes)
        paths = self.files(resized)
        rates, waited, timed = [], 0.0, 0.0
        for epoch in range(epochs):
            order = torch.randperm(len(paths), generator=batch_generator(0, epoch, -1))
            seen, tic, asked = 0, None, None
            for step, (images, labels) in enumerate(source.batches(order, self.batch)):
                if step:  # since the last batch's work was queued
                    waited += time.perf_counter() - asked
                x = augment.train(images, batch_generator(0, epoch, step))
                if model_step is not None:
                    model_step(x.contiguous(memory_format=torch.channels_last), labels)
                if step == 0:  # the first batch pays for the workers' start
                    sync(self.device)
                    tic = time.perf_counter()
                else:
                    seen += len(labels)
                asked = time.perf_counter()
            sync(self.device)
            if seen:
                rates.append(seen / (time.perf_counter() - tic))
                timed += time.perf_counter() - tic
        return statistics.median(rates) if rates else float("nan"), len(paths), waited / timed if timed else float("nan")

    def data_alone(self):
        """The JPEG pipeline without the training step: first its parts on one batch whose bytes are in
        memory (seconds each), then whole epochs from the files."""
        from alexlab.data.gpu_decode import decode_batch, read_batches, resize_square_batch
        from alexlab.data.imagenet import decode_bytes
        paths = self.jpeg_files
        batches = [list(range(i, min(i + self.batch, len(paths)))) for i in range(0, len(paths), self.batch)]
        tic = time.perf_counter()
        blobs = list(read_batches(paths, batches, self.args.workers, pin=self.cuda))
        self.add_data_row({"pipeline": "file bytes only (reading threads)", "threads": self.args.workers,
                           "images_per_s": len(paths) / (time.perf_counter() - tic)})
        decoded = decode_batch(blobs[0], self.device, decode_bytes)
        seconds = time_steps(lambda: resize_square_batch(decoded, self.image_size), self.device, 2, 5, 3)
        self.add_data_row({"pipeline": "resize kernel alone (decoded images on the device)",
                           "images_per_s": len(decoded) / seconds})
        seconds = time_steps(lambda: resize_square_batch(decode_batch(blobs[0], self.device, decode_bytes),
                                                         self.image_size), self.device, 2, 5, 3)
        self.add_data_row({"pipeline": "decode + resize, bytes in memory", "images_per_s": len(blobs[0]) / seconds})
        for row in self.record["data"][-3:]:
            print(f"   {row['pipeline']}: {row['images_per_s']:.0f} img/s", flush=True)
        if self.cuda:  # decode alone, bytes already in memory
            import numpy as np
            from torchvision.io import ImageReadMode, decode_jpeg
            datas = [torch.from_numpy(np.fromfile(p, dtype=np.uint8)) for p in self.jpeg_files[:self.batch]]
            seconds = time_steps(lambda: decode_jpeg(datas, mode=ImageReadMode.RGB, device="cuda"),
                                 self.device, 2, 5, 3)
            self.add_data_row({"pipeline": "nvJPEG batch decode alone (bytes in memory)",
                               "images_per_s": len(datas) / seconds})
            print(f"   nvjpeg decode alone: {len(datas) / seconds:.0f} img/s", flush=True)
        for hw_load in self.nvimgcodec_loads():  # 1.0: the hardware engines (where the card has them); 0: CUDA
            with self.row_guard(f"data, nvimgcodec decode alone, hw_decoder_load={hw_load}"):
                from alexlab.data.nvimgcodec_jpeg import NvImageCodecJpeg
                decoder = NvImageCodecJpeg(self.device, hw_load)
                datas = [b for b in blobs[0] if b.dim() == 1]
                seconds = time_steps(lambda: decoder(datas), self.device, 2, 5, 3)
                self.add_data_row({"pipeline": f"nvImageCodec batch decode alone, hw_decoder_load={hw_load} "
                                               f"(bytes in memory)", "images_per_s": len(datas) / seconds})
                print(f"   nvimgcodec decode alone, hw_decoder_load={hw_load}: {len(datas) / seconds:.0f} img/s",
                      flush=True)
        for prefetch, how, resized in ((3, "prefetch thread, side stream", False), (0, "inline", False),
                                       (3, "prefetch thread, side stream; the resized copies", True)):
            rate, n, waited = self.pipeline(prefetch=prefetch, resized=resized)
            self.add_data_row({"pipeline": f"JPEG files -> nvJPEG -> resize kernel -> augment ({how})",
                               "threads": self.args.workers, "images": n, "images_per_s": rate,
                               "waiting_for_batches_share": waited})
            print(f"   gpu jpeg pipeline ({how}): {rate:.0f} img/s", flush=True)
        for hw_load in self.nvimgcodec_loads():  # data.jpeg_decoder=nvimgcodec
            with self.row_guard(f"data, nvimgcodec pipeline, hw_decoder_load={hw_load}"):
                rate, n, waited = self.pipeline(decoder="nvimgcodec", hw_load=hw_load)
                self.add_data_row({"pipeline": f"JPEG files -> nvImageCodec (hw_decoder_load={hw_load}) -> "
                                               f"resize kernel -> augment (prefetch thread, side stream)",
                                   "threads": self.args.workers, "images": n, "images_per_s": rate,
                                   "waiting_for_batches_share": waited})
                print(f"   gpu jpeg pipeline, nvimgcodec hw_decoder_load={hw_load}: {rate:.0f} img/s", flush=True)
        # data.cpu_decode_share: libjpeg in the reading threads, beside nvJPEG (the tiny version: one share)
        for share in self.cpu_shares if self.cuda else self.cpu_shares[:1]:
            rate, n, waited = self.pipeline(cpu_share=share)
            self.add_data_row({"pipeline": f"JPEG files -> nvJPEG ({1 - share:.0%}) + libjpeg in the reading "
                                           f"threads ({share:.0%}) -> resize kernel -> augment",
                               "threads": self.args.workers, "images": n, "images_per_s": rate,
                               "waiting_for_batches_share": waited})
            print(f"   gpu jpeg pipeline, cpu_decode_share={share}: {rate:.0f} img/s", flush=True)
        for resized in (False, True):  # the CPU path (data.decode=cpu): PIL in DataLoader workers
            rate = self.cpu_pipeline(resized)
            what = "the resized copies" if resized else "the original-size files"
            self.add_data_row({"pipeline": f"CPU path: PIL decode + resize in DataLoader workers ({what})",
                               "workers": self.args.workers, "images_per_s": rate})
            print(f"   cpu pipeline ({what}): {rate:.0f} img/s", flush=True)

    def cpu_pipeline(self, resized: bool) -> float:
        """Images/s of data.decode=cpu's source (ImageFolderSource) over the files, worker start excluded."""
        from alexlab.data.imagenet import ImageFolderSource
        paths = self.files(resized)
        source = ImageFolderSource([(p, 0) for p in paths], self.image_size, self.args.workers, ["x"])
        seen, tic = 0, None
        for i, (images, _) in enumerate(source.batches(torch.arange(len(paths)), self.batch)):
            if i == 0:
                tic = time.perf_counter()
            else:
                seen += len(images)
        return seen / (time.perf_counter() - tic) if seen else float("nan")

    def end_to_end(self):
        impl = self.record.get("fastest_grouped_conv", "auto")
        mode = self.record.get("fastest_paper_mode", "bf16+cl" if self.cuda else "fp32")
        # Measured on an H100 (bench/RESULTS.md): nvJPEG (torchvision) and the step share the SMs and
        # mostly take turns; a child process for decoding helped 21%, the step on a CUDA stream of its
        # own 3% (no longer timed), libjpeg in the reading threads (cpu_decode_share) made it slower;
        # the reading threads then copied to pinned memory with torch's copy, which starts an OpenMP
        # team for each of them (now host_copy, by numpy).
        # Now first: nvImageCodec, which can decode on the GPU's hardware JPEG engines and leave the
        # SMs to the step, alone and with libjpeg's share beside it; then the resized copies
        # (data.resized_jpegs=true: a third of the bytes and pixels to decode).
        plain = dict(in_process=True, resized=False, share=0.0, decoder="torchvision", hw_load=1.0, processes=1)
        hw = [plain | dict(decoder="nvimgcodec", hw_load=load) for load in self.nvimgcodec_loads()]
        hw_child = [v | dict(in_process=False) for v in hw[:1]]
        # On 2026-11-28 (H100) the first four rows used the call's time; the resized copies (a third of
        # the pixels to decode, on the GPU or by libjpeg in the reading threads) and several decoder
        # processes (each with its own nvJPEG, interpreter lock and CUDA context) have never run on a
        # GPU and are the likeliest ways to 20k img/s, so they come first.
        children = [plain | dict(in_process=False, processes=n) for n in self.decode_processes]
        variants = [plain, *children[:1], plain | dict(resized=True), *(v | dict(resized=True) for v in children[:1]),
                    plain | dict(resized=True, in_process=False), *children[1:],
                    *(plain | dict(resized=True, share=s) for s in self.cpu_shares[-1:]),
                    plain | dict(in_process=False), *hw[:1], *hw_child,
                    *(v | dict(resized=True) for v in hw_child), *hw[1:],
                    *(v | dict(share=s) for v in hw_child for s in self.cpu_shares[:1]),
                    *(plain | dict(share=s) for s in self.cpu_shares)]
        if not self.cuda:  # the tiny version: each kind of row once
            variants = [plain, *hw[:1], plain | dict(resized=True), *(plain | dict(share=s) for s in self.cpu_shares[:1]),
                        *children[:1]]
        for v in variants:
            in_process, resized, share, processes = v["in_process"], v["resized"], v["share"], v["processes"]
            where = ", ".join(filter(None, [
                f"nvImageCodec, hw_decoder_load={v['hw_load']}" if v["decoder"] == "nvimgcodec" else "nvJPEG (torchvision)",
                "in the training process" if in_process else "in a child process (data.decode=gpu_process)"
                if processes == 1 else f"in {processes} child processes (data.decode=gpu_process, "
                                       f"data.decode_processes={processes})",
                "the resized copies (data.resized_jpegs=true)" if resized else "",
                f"data.cpu_decode_share={share}" if share else ""]))
            with self.row_guard(f"end to end, {where}"):
                torch.manual_seed(0)
                model = build_model(model_preset(self.ours, grouped_conv=impl), 1000).to(self.device)
                train_step = trainer_step(model, self.device, mode)
                rate, n, waited = self.pipeline(train_step, epochs=4 if self.cuda else 2, in_process=in_process,
                                        resized=resized, cpu_share=share, decoder=v["decoder"], hw_load=v["hw_load"],
                                        processes=processes)
                days = 90 * IMAGENET_TRAIN_IMAGES / rate / 86400
                row = {"pipeline": f"JPEG files -> GPU decode/augment -> paper net train step ({mode}, "
                                   f"grouped_conv={impl}; {where})",
                       "threads": self.args.workers, "images": n, "images_per_s": rate,
                       "waiting_for_batches_share": waited,
                       "jpeg_decoder": v["decoder"], "decode_processes": processes if not in_process else 0,
                       "projected_90_epochs_hours": 24 * days,
                       "layer_impls": train_step.layer_impls, "layer_ms": train_step.layer_ms}
                self.record["end_to_end"].append(row)
                self.save()
                print(f"   end to end, {where}: {rate:.0f} img/s -> 90 epochs of ImageNet in {24 * days:.1f} h; "
                      f"waiting for batches {waited:.0%} of the time", flush=True)
        for decoder in ("torchvision", *(["nvimgcodec"] if self.nvimgcodec_loads() else [])):
            with self.row_guard(f"overlap of decode ({decoder}) and step"):
                self.overlap(decoder=decoder)

    def nvimgcodec_loads(self) -> list[float]:
        """data.hw_decoder_load values to time with data.jpeg_decoder=nvimgcodec; none if it is not installed."""
        if not self.args.hw_decoder_loads:
            return []
        from alexlab.data.nvimgcodec_jpeg import import_nvimgcodec
        try:
            import_nvimgcodec()
        except ConfigError as err:
            note = f"nvImageCodec rows skipped: {err}"
            if note not in self.record["notes"]:
                self.record["notes"].append(note)
                print(f"   {note}", flush=True)
            return []
        loads = [float(v) for v in self.args.hw_decoder_loads.split(",")]
        return loads if self.cuda else loads[:1]  # nvImageCodec's CPU decoder has no engines to share

    def overlap(self, seconds: float = 0.0, decoder: str = "torchvision"):
        """Can decoding and the training step share the machine? Each alone for a few seconds, then
        both at once with no data between them (the decoder in a thread on its own CUDA stream, the
        step on synthetic batches). overlap = decode_together/decode_alone + step_together/step_alone:
        1 means they ran one after the other, 2 means neither slowed the other down."""
        from alexlab.data.augment import batch_generator
        seconds = seconds or (4.0 if self.cuda else 0.5)
        source, augment = self.jpeg_source_and_augmenter(prefetch=0, decoder=decoder)
        step = self.train_step_fn(build_model(model_preset(self.ours), 1000).to(self.device), "bf16+cl",
                                  self.ours_size)
        step()  # warm-up: the grouped-conv timing and cuDNN's search
        stop = threading.Event()

        def stream_sync():  # this thread's stream only: a device-wide sync would wait for the other thread
            if self.cuda:
                torch.cuda.current_stream(self.device).synchronize()

        def decode_for(counts):
            with torch.cuda.stream(torch.cuda.Stream(self.device)) if self.cuda else contextlib.nullcontext():
                epoch = 0
                while not stop.is_set():
                    order = torch.randperm(len(self.jpeg_files), generator=batch_generator(0, epoch, -1))
                    for i, (images, _) in enumerate(source.batches(order, self.batch)):
                        augment.train(images, batch_generator(0, epoch, i))
                        stream_sync()
                        counts.append(len(images))
                        if stop.is_set():
                            break
                    epoch += 1

        def steps_for(counts):
            while not stop.is_set():
                step()
                stream_sync()
                counts.append(self.batch)

        def rates(*jobs):
            counts = [[] for _ in jobs]
            stop.clear()
            threads = [threading.Thread(target=job, args=(c,), daemon=True) for job, c in zip(jobs, counts)]
            tic = time.perf_counter()
            for t in threads:
                t.start()
            time.sleep(seconds)
            stop.set()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - tic
            return [sum(c) / elapsed for c in counts]

        rates(decode_for)  # warm-up: page cache, nvJPEG's buffers
        decode_alone, = rates(decode_for)
        step_alone, = rates(steps_for)
        decode_together, step_together = rates(decode_for, steps_for)
        row = {"jpeg_decoder": decoder, "decode_alone": decode_alone, "step_alone": step_alone,
               "decode_together": decode_together, "step_together": step_together, "seconds_each": seconds,
               "overlap": decode_together / decode_alone + step_together / step_alone}
        self.record["overlap"].append(row)
        print(f"   overlap of decode ({decoder}) and step: {row['overlap']:.2f} (1 = one after the other, 2 = fully); "
              f"decode {decode_alone:.0f} -> {decode_together:.0f} img/s, "
              f"step {step_alone:.0f} -> {step_together:.0f} img/s", flush=True)

    # ---- where the time goes ----
    def profile(self):
        """torch.profiler over a few steps of: the paper net's step (eager, and compiled on CUDA), and
        end to end from JPEG files. The tables of the busiest ops go into the JSON; with
        --trace-dir, Chrome traces (chrome://tracing, ui.perfetto.dev) too."""
        from torch.profiler import ProfilerActivity, profile
        from alexlab.data.augment import batch_generator
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        impl = self.record.get("fastest_grouped_conv", "auto")
        preset = lambda: build_model(model_preset(self.ours, grouped_conv=impl), 1000)  # noqa: E731
        workloads = {"paper net step, bf16+cl": lambda: self.train_step_fn(preset().to(self.device), "bf16+cl",
                                                                           self.ours_size)}
        if self.cuda and not self.args.no_compile:
            workloads["paper net step, bf16+cl+compile"] = lambda: self.train_step_fn(
                preset().to(self.device), "bf16+cl+compile", self.ours_size)

        def end_to_end():
            model = preset().to(self.device)
            train_step = trainer_step(model, self.device, "bf16+cl")
            train_step.choose_layers_on_noise(self.batch, 3, self.ours_size)
            source, augment = self.jpeg_source_and_augmenter()
            order = torch.randperm(len(self.jpeg_files), generator=batch_generator(0, 0, -1))
            batches = enumerate(source.batches(order, self.batch))

            def step():
                i, (images, labels) = next(batches)
                x = augment.train(images, batch_generator(0, 0, i))
                train_step(x.contiguous(memory_format=torch.channels_last), labels)
            return step
        workloads["end to end from JPEG files, bf16+cl"] = end_to_end
        self.record["profiles"] = {}
        steps = 4 if self.cuda else 1
        for name, make_step in workloads.items():
            step = make_step()
            for _ in range(3 if self.cuda else 1):  # warm-up: compilation, cuDNN's search, the workers' start
                step()
            sync(self.device)
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    step()
                sync(self.device)
            table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
            self.record["profiles"][name] = {"steps": steps, "sorted_by": sort, "table": table}
            print(f"   profile: {name}\n{table}", flush=True)
            if self.args.trace_dir:
                folder = Path(self.args.trace_dir)
                folder.mkdir(parents=True, exist_ok=True)
                prof.export_chrome_trace(str(folder / (name.replace(" ", "_").replace(",", "") + ".json")))
            del step
            if self.cuda:
                torch.cuda.empty_cache()

    def table(self) -> str:
        lines = [f"# {self.record['device']} - {self.record['date']} - torch {self.record['versions'].get('torch')}"
                 f" - batch {self.batch}{' (tiny CPU version)' if self.tiny else ''}", "",
                 "| training step | mode | img/s | ms/step |", "|---|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['mode']} | {r['images_per_s']:.0f} | {r['ms_per_step']:.2f} |"
                  for r in self.record["train_step"]]
        lines += ["", "| op on " + ("x".join(map(str, self.record["lrn"][0]["shape"])) if self.record["lrn"] else "")
                  + " | dtype | fwd+bwd ms |", "|---|---|---:|"]
        lines += [f"| {r['op']} | {r['dtype']} | {r['ms_fwd_bwd']:.3f} |" for r in self.record["lrn"]]
        if self.record.get("lrn_configs"):
            compiled = {(k["kernel"], k.get("channels"), k.get("layout"), k["block_elements"], k["num_warps"]): k
                        for k in self.record.get("kernels", [])}

            def cost(r, what):  # of the forward / backward kernels, from `kernels`
                found = [compiled.get((f"lrn {r['impl']} {way}", r["shape"][1], r["layout"], r["block_elements"],
                                       r["num_warps"])) for way in ("forward", "backward")]
                return " / ".join("?" if not k or k.get(what) is None else f"{k[what]:.0%}" if what == "occupancy"
                                  else f"{k[what]:.0f}" for k in found)
            lines += ["", "| fused LRN | layout | shape | block | warps | registers fwd / bwd | occupancy fwd / bwd "
                          "| instructions per element fwd / bwd | fwd+bwd ms |", "|---|---|---|---:|---:|---|---|---|---:|"]
            lines += [f"| {r['impl']} | {r['layout']} | {'x'.join(map(str, r['shape']))} | {r['block_elements']} | "
                      f"{r['num_warps']} | {cost(r, 'registers')} | {cost(r, 'occupancy')} | "
                      f"{cost(r, 'instructions_per_element')} | {r['ms_fwd_bwd']:.3f} |" for r in self.record["lrn_configs"]]
        if self.record.get("traffic"):
            lines += ["", f"| bytes a bf16 step moves (batch 256) | GB | ms at {self.args.bandwidth_tbs} TB/s | "
                          "measured ms |", "|---|---:|---:|---:|"]
            lines += [f"| {r['model']} | {r['gb_per_step']:.2f} | {r['floor_ms_at_bandwidth']:.2f} | "
                      f"{r['measured_ms_per_step']:.2f} |" if "measured_ms_per_step" in r else
                      f"| {r['model']} | {r['gb_per_step']:.2f} | {r['floor_ms_at_bandwidth']:.2f} | |"
                      for r in self.record["traffic"]]
        lines += ["", "| pipeline | img/s | waiting for batches |", "|---|---:|---:|"]
        lines += [f"| {r['pipeline']} | {r['images_per_s']:.0f} | "
                  + (f"{r['waiting_for_batches_share']:.0%} |" if "waiting_for_batches_share" in r else " |")
                  for r in self.record["data"] + self.record["end_to_end"]]
        for o in self.record["overlap"]:
            lines.append(f"\ndecode ({o['jpeg_decoder']}) and step at once: overlap {o['overlap']:.2f} (1 = serial, 2 = full); decode "
                         f"{o['decode_alone']:.0f} -> {o['decode_together']:.0f} img/s, step {o['step_alone']:.0f} -> "
                         f"{o['step_together']:.0f} img/s")
        if self.record["end_to_end"]:
            best = max(self.record["end_to_end"], key=lambda r: r["images_per_s"])
            lines.append(f"\nprojected 90 epochs of ImageNet-1k (1,281,167 images): "
                         f"{best['projected_90_epochs_hours']:.1f} h on this card, at the best end-to-end rate "
                         f"({best['pipeline']})")
        failed = [k for k, v in self.record["checks"].items() if not v["ok"]]
        lines.append(f"\nchecks: {len(self.record['checks']) - len(failed)}/{len(self.record['checks'])} ok"
                     + (f"; FAILED: {failed}" if failed else ""))
        lines += first_step_choices(self.record["train_step"])
        if self.record["errors"]:
            lines += [f"errors: {len(self.record['errors'])} (whole in the JSON):", *error_lines(self.record["errors"])]
        return "\n".join(lines)


def first_step_choices(rows: list[dict]) -> list[str]:
    """A line per training-step row whose first step chose ways by timing (the `auto` settings): what
    it chose per layer, and the ways that failed there. Printed, since a lent GPU's session reads the
    printed tail first."""
    lines = []
    for r in rows:
        if r.get("layer_impls"):
            chosen = ", ".join(f"{layer.removeprefix('features.')} {way}" for layer, way in r["layer_impls"].items())
            failed = [f"{layer.removeprefix('features.')} {way}" for layer, ms in r.get("layer_ms", {}).items()
                      for way in ms.get("failed", {})]
            lines.append(f"- {r['model']}, {r['mode']}: {chosen}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return ["", "first step's choices (auto):", *lines] if lines else []


def error_lines(errors: list[str], most: int = 12) -> list[str]:
    """Each error as one line: where it happened, and the exception's own line (a traceback's last)."""
    lines = []
    for error in errors[:most]:
        text = [line.strip() for line in error.splitlines() if line.strip()]
        where, _, first = text[0].partition(": ")
        lines.append(f"- {where}: {text[-1] if len(text) > 1 else first}"[:300])
    return lines + ([f"- ... and {len(errors) - most} more"] if len(errors) > most else [])


def host_time_while_gpu_busy(device: torch.device, sleep_s: float = 1.0) -> dict:
    """Queue a `sleep_s` GPU sleep, then three training steps as fit runs them (a dataset in GPU
    memory, batches, augmentation, TrainStep): if any of them made the host wait for the GPU (a
    copy from pageable memory, .item(), ...), the host's time includes the sleep. CUDA only."""
    from alexlab.data.augment import Augmenter, PixelStats, batch_generator
    from alexlab.data.datasets import TensorSource
    gen = torch.Generator().manual_seed(0)
    source = TensorSource(torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=gen),
                          torch.randint(0, 10, (48,), generator=gen)).to(device)
    stats = PixelStats(torch.full((3, 32, 32), 0.5), torch.tensor([0.2, 0.02, 0.005]), torch.eye(3))
    augment = Augmenter(stats.to(device), 27, crop_flip=True, pca_lighting=True)
    model = build_model(model_preset("small"), 10).to(device)
    train_step = trainer_step(model, device, "bf16+cl")

    def epoch(k):
        for step, (images, labels) in enumerate(source.batches(torch.randperm(48, generator=gen), 16)):
            x = augment.train(images, batch_generator(0, k, step))
            torch.manual_seed(dropout_seed(0, k, step, 0))
            train_step(x.contiguous(memory_format=torch.channels_last), labels)
    epoch(0)  # warm-up: cuDNN's algorithm search synchronises
    torch.cuda.synchronize(device)
    tic = time.perf_counter()
    torch.cuda._sleep(10 ** 8)  # cycles: measure the clock
    torch.cuda.synchronize(device)
    cycles_per_s = 10 ** 8 / (time.perf_counter() - tic)
    tic = time.perf_counter()
    torch.cuda._sleep(int(sleep_s * cycles_per_s))
    epoch(1)
    host_s = time.perf_counter() - tic
    torch.cuda.synchronize(device)
    total_s = time.perf_counter() - tic
    return {"host_s": host_s, "total_s": total_s, "ok": total_s > 0.5 * sleep_s and host_s < 0.25 * total_s}


def parse_mode(mode: str) -> tuple[bool, bool, bool | str]:
    """"fp32" | "bf16+cl" | "bf16+cl+compile" | "bf16+cl+compile:<torch.compile mode>" ->
    (bf16, channels_last, compile: False, True or the mode)."""
    parts = mode.split("+")
    compile_mode = next(((p.partition(":")[2] or True) for p in parts if p.startswith("compile")), False)
    return "bf16" in parts, "cl" in parts, compile_mode


def trainer_step(model, device: torch.device, mode: str) -> TrainStep:
    """The trainer's own step (alexlab.train: setup_model, TrainStep) for `model` in a bench mode,
    with the paper's SGD settings; bf16 only on CUDA."""
    bf16, channels_last, compile_mode = parse_mode(mode)
    step_model = setup_model(model, device, channels_last, compile_mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return TrainStep(model, step_model, optimizer, device, bf16=bf16 and device.type == "cuda")


def _lrn_not_compiled(model):
    from alexlab.lrn import LocalResponseNorm
    for module in model.modules():
        if isinstance(module, LocalResponseNorm):
            module.forward = torch.compiler.disable(module.forward)
    return model


def _version(name):
    try:
        import importlib.metadata as md
        return md.version(name)
    except Exception:  # noqa: BLE001
        return None


def _in_processes(fn, jobs) -> None:
    """fn(job) for every job, in up to 16 processes (generating the benchmark's files). Spawned, not
    forked: a forked child of a process whose OpenMP threads have run hangs in libgomp at its first
    parallel region (resizing a photo), which stopped the H100 run of 2026-11-27 for minutes."""
    if jobs:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(16, os.cpu_count() or 1), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(fn, jobs, chunksize=64))


def _write_resized_copy(job):
    from alexlab.data.imagenet import write_resized_copy
    write_resized_copy(*job)


def _make_jpeg(job):
    """One ImageNet-like JPEG: a random crop of a scikit-image photo, resized to about 500x375, with
    sensor-like grain (sigma 15) at quality 93, so that files average about 105 KB like ILSVRC-2012's
    (about 110 KB): decoding cost follows the entropy-coded size, and smooth upscaled photos alone
    made 42 KB files (the 2026-11-26 run)."""
    import numpy as np
    from PIL import Image
    from skimage import data
    folder, i, scale = job
    rng = np.random.default_rng(i)
    photo = [data.astronaut, data.coffee, data.chelsea, data.rocket, data.immunohistochemistry][i % 5]()
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    image = Image.fromarray(photo[top:top + ch, left:left + cw])
    size = (round(500 * scale), round(375 * scale))
    size = size if rng.random() < 0.75 else size[::-1]
    pixels = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float32)
    pixels = np.clip(pixels + rng.normal(0, 15, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(Path(folder) / f"{i:06d}.JPEG", quality=93)


# --only's names -> Bench's methods
SECTIONS = {"checks": "checks", "train": "train_steps", "target": "target", "lrn": "lrn_alone", "lrn_configs": "lrn_configs",
            "kernels": "kernels", "data": "data_alone", "e2e": "end_to_end", "profile": "profile", "traffic": "traffic"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/latest.json", help="JSON record (default: bench/latest.json)")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default 256 on CUDA, 2 on CPU)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="threads reading the JPEG files")
    parser.add_argument("--jpeg-dir", default="", help="where generated JPEGs are kept "
                        "(default /tmp/alexlab-bench-jpeg-grain, -tiny on a CPU)")
    parser.add_argument("--jpegs", type=int, default=0, help="number of JPEGs (default 6144 on CUDA, 6 on CPU)")
    parser.add_argument("--budget-s", type=float, default=420, help="skip what would start after this many s")
    parser.add_argument("--stack-dump-s", type=float, default=240,
                        help="print every thread's stack when a section has run this long (finding a hang)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile modes")
    parser.add_argument("--compile-modes", default="default", help="torch.compile modes to time, comma-separated "
                        "(default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs)")
    parser.add_argument("--cpu", action="store_true", help="the tiny CPU version even where CUDA is available")
    parser.add_argument("--only", default="checks,kernels,lrn,lrn_configs,train,traffic,data,e2e,profile",
                        help="comma-separated sections; also `target`: the 95%% target's rows alone (about 100 s on an H100)")
    parser.add_argument("--trace-dir", default="", help="write the profile section's Chrome traces here")
    parser.add_argument("--cudnn-benchmark-limit", type=int, default=None,
                        help="cuDNN algorithms tried per convolution (PyTorch's default 10; 0: all). Its choices are "
                             "cached per process, so compare two runs, e.g. a second run with --only train")
    parser.add_argument("--cpu-decode-shares", default="0.25,0.5",
                        help="data.cpu_decode_share values to time beside nvJPEG alone, comma-separated ('' for none)")
    parser.add_argument("--bandwidth-tbs", type=float, default=3.0,
                        help="memory bandwidth (TB/s, bytes read + written) for the traffic section's floor; "
                             "3.0: a device-to-device copy on an H100")
    parser.add_argument("--decode-processes", default="4",
                        help="data.decode_processes values (child processes taking the batches in turn) to time "
                             "end to end beside one child, comma-separated ('' for none)")
    parser.add_argument("--hw-decoder-loads", default="1.0,0.75,0",
                        help="data.hw_decoder_load values to time with data.jpeg_decoder=nvimgcodec where it is "
                             "installed, comma-separated ('' for none); the first also runs in a child process")
    args = parser.parse_args(argv)
    # said before anything runs: a typo in a section name ran the sections before it, then ended in a KeyError
    unknown = [name for name in args.only.split(",") if name not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; the sections: {','.join(SECTIONS)}")
    modes = [m for m in args.compile_modes.split(",") if m not in COMPILE_MODES]
    if modes:
        parser.error(f"--compile-modes: unknown mode(s) {', '.join(modes)}; torch.compile's: {','.join(COMPILE_MODES)}")
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out {args.out}: its directory cannot be made ({err})")
    if args.cudnn_benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    bench = Bench(args)
    args.jpeg_dir = args.jpeg_dir or ("/tmp/alexlab-bench-jpeg-grain" + ("" if bench.cuda else "-tiny"))
    for name in args.only.split(","):
        bench.section(name, getattr(bench, SECTIONS[name]))
    table = bench.table()
    bench.record["table"] = table
    bench.save()
    print(table)
    ok = all(v["ok"] for v in bench.record["checks"].values()) and not bench.record["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
