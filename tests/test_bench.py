"""The benchmark's tiny CPU version runs end to end and writes a complete record."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_bench_tiny_version_runs_every_section_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    # as a user types it: the bench turns Triton's interpreter on by itself without CUDA
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "src" / "bench.py"), "--cpu", "--out", str(out),
                           "--workers", "0", "--jpeg-dir", str(tmp_path / "jpeg"), "--decode-processes", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["tiny"] and record["errors"] == []
    assert record["checks"] and all(check["ok"] for check in record["checks"].values())
    rows = {(r["model"], r["mode"]) for r in record["train_step"]}
    for model in ("torchvision alexnet", "paper (lrn, towers 2)", "no LRN (towers 2)", "one tower (lrn)",
                  "no LRN, one tower", "paper, grouped_conv=dense"):
        assert any(m == model for m, _ in rows), model
    assert all(r["images_per_s"] > 0 for r in record["train_step"])
    assert {r["op"] for r in record["lrn"]} >= {"relu", "lrn fused (ours, Triton)", "F.local_response_norm",
                                                "relu, lrn, max-pool in one fused_gather"}
    kernels = {k["kernel"]: k for k in record["kernels"]}  # compiled for sm_90 without a GPU
    assert set(kernels) >= {"lrn fused forward", "lrn fused backward", "lrn fused_gather backward",
                            "lrn fused_scan backward", "lrn fused_gather+pool forward",
                            "lrn fused_gather+pool backward", "resize_crop"}
    assert all(k["registers"] > 0 and 0 < k["occupancy"] <= 1 for k in kernels.values())
    assert {(r["impl"], r["layout"]) for r in record["lrn_configs"]} == {
        (impl + pool, layout) for impl in ("fused", "fused_gather", "fused_scan") for pool in ("", "+pool")
        for layout in ("channels_last", "nchw")}
    assert record["data"][0]["images_per_s"] > 0 and record["end_to_end"][0]["images_per_s"] > 0
    assert all("layer_impls" in r for r in record["end_to_end"])  # what the step ran, raced before decoding
    children = [r for r in record["end_to_end"] if r["decode_processes"] == 2]
    assert len(children) == 1 and children[0]["images_per_s"] > 0 and "in 2 child processes" in children[0]["pipeline"]
    # the share of the time the main thread waited for the next batch: which side sets the rate
    pipelines = record["end_to_end"] + [r for r in record["data"] if r["pipeline"].startswith("JPEG files ->")]
    assert pipelines and all(0 <= r["waiting_for_batches_share"] <= 1 for r in pipelines)
    resized = [r for r in record["data"] + record["end_to_end"] if "resized copies" in r["pipeline"]]
    assert len(resized) == 3 and all(r["images_per_s"] > 0 for r in resized)  # GPU pipeline, CPU path, end to end
    assert record["resized_files"]["count"] == record["jpeg_files"]["count"]
    shared = [r for r in record["data"] + record["end_to_end"] if "libjpeg in the reading threads" in r["pipeline"]
              or "cpu_decode_share" in r["pipeline"]]
    assert len(shared) == 2 and all(r["images_per_s"] > 0 for r in shared)  # 1 share alone, 1 end to end
    # data.jpeg_decoder=nvimgcodec (its CPU decoder here, one load): through the pipeline, alone, end to end
    hardware = [r for r in record["data"] + record["end_to_end"] if "nvImageCodec" in r["pipeline"]
                or r.get("jpeg_decoder") == "nvimgcodec"]
    assert len(hardware) == 3 and all(r["images_per_s"] > 0 for r in hardware)
    assert set(record["section_seconds"]) == {"checks", "kernels", "lrn", "lrn_configs", "train", "traffic", "data",
                                              "e2e", "profile"}
    assert record["versions"]["torch"] and record["device"] and record["date"]
    # Bytes a step moves, at the real sizes even here. conv1's and conv2's ReLU runs inside their fused
    # LRN, which reads and writes what the ReLU alone did (x in and out forward; x and gradient in, dx
    # out backward), so with the pool apart the paper's net moves what the net without LRN moves; the
    # reference LRN, many passes more.
    traffic = {r["model"]: r["gb_per_step"] for r in record["traffic"]}
    apart = traffic["paper, grouped_conv=native, pool_in_lrn=false"]
    assert abs(apart - traffic["no LRN (towers 2)"]) < 1e-6
    assert apart < traffic["paper, reference LRN"]
    # With the pool inside (the default), per conv output of E elements pooled to P, in bf16: apart, the
    # LRN moves 4E forward and 6E backward, the pool reads E and writes P and its int64 indices (2E + 10P),
    # and backward reads the pooled gradient, the indices and its input and writes the full gradient
    # (4E + 10P); inside, forward reads E and writes P and int8 positions (2E + 3P), backward reads x,
    # the positions and the pooled gradient and writes dx (4E + 3P). 10E + 14P fewer bytes.
    saved = sum(10 * e + 14 * p for e, p in ((256 * 96 * 55 * 55, 256 * 96 * 27 * 27),  # conv1: 55 -> 27 px
                                            (256 * 256 * 27 * 27, 256 * 256 * 13 * 13)))  # conv2: 27 -> 13
    assert abs(apart - traffic["paper, grouped_conv=native"] - saved / 1e9) < 1e-6
    # torchvision's net (64 and 192 channels where the paper has 96 and 256, a pool apart) moves less than
    # the paper's with its pools apart, more than with them inside
    assert traffic["paper, grouped_conv=native"] < traffic["torchvision alexnet"] < apart
    assert [o["jpeg_decoder"] for o in record["overlap"]] == ["torchvision", "nvimgcodec"]
    assert all(0 < o["overlap"] < 3 for o in record["overlap"])
    assert set(record["profiles"]) >= {"paper net step, bf16+cl", "end to end from JPEG files, bf16+cl"}
    assert all("Self CPU" in p["table"] for p in record["profiles"].values())
    assert "| training step |" in proc.stdout  # the table comes last


def test_bench_writes_resized_copies_after_the_parent_used_torch_threads(tmp_path):
    """The H100 run of 2026-11-27 hung for minutes where the benchmark wrote its resized copies: its
    process pool forked a parent whose OpenMP threads had run, and libgomp hangs in such a child at its
    first parallel region (here: resizing a 500x375 photo). The pool must start its workers clean."""
    from PIL import Image
    from skimage import data
    photo = tmp_path / "photo.JPEG"
    Image.fromarray(data.astronaut()).resize((500, 375)).save(photo, quality=90)
    script = f"""
import sys; sys.path.insert(0, {str(ROOT / 'src')!r})
import torch, torch.nn.functional as F
from pathlib import Path
import bench
F.interpolate(torch.rand(64, 3, 500, 375), size=(256, 256), mode="bilinear", antialias=True)  # OpenMP threads run
folder = Path({str(tmp_path)!r})
bench._in_processes(bench._write_resized_copy, [(folder / "photo.JPEG", folder / f"copy{{i}}.JPEG", 256, 95)
                                                for i in range(4)])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in range(4):
        assert Image.open(tmp_path / f"copy{i}.JPEG").size == (256, 256)


def test_the_printed_tail_names_each_error_and_each_first_step_choice():
    """A lent GPU's session reads the bench's printed tail first: each error as where + the exception's
    own line (not a traceback's "Traceback (most recent call last):"), and what auto chose per layer."""
    sys.path.insert(0, str(ROOT / "src"))
    from bench import error_lines, first_step_choices
    errors = ["lrn_configs: Traceback (most recent call last):\n  File \"bench.py\", line 390, in lrn_configs\n"
              "    seconds = time_steps(step)\nRuntimeError: 0 active drivers ([]). There should only be one.\n",
              "train_step paper bf16+cl: OutOfMemoryError: CUDA out of memory"]
    assert error_lines(errors) == ["- lrn_configs: RuntimeError: 0 active drivers ([]). There should only be one.",
                                   "- train_step paper bf16+cl: OutOfMemoryError: CUDA out of memory"]
    assert error_lines(errors * 7)[-1] == "- ... and 2 more"
    rows = [{"model": "torchvision alexnet", "mode": "fp32"},  # nothing chosen: no line
            {"model": "paper (lrn, towers 2)", "mode": "bf16+cl",
             "layer_impls": {"features.conv1": "pad4", "features.lrn1": "after", "features.conv2": "dense"},
             "layer_ms": {"features.lrn1": {"whole": {"after": 0.5, "reference": 2.0},
                                            "failed": {"inside": "CompilationError: out of resources"}}}}]
    assert first_step_choices(rows) == ["", "first step's choices (auto):",
                                        "- paper (lrn, towers 2), bf16+cl: conv1 pad4, lrn1 after, conv2 dense; "
                                        "failed: lrn1 inside"]
    assert first_step_choices(rows[:1]) == []


def test_a_mistyped_section_or_mode_stops_the_bench_before_anything_runs(tmp_path):
    """`--only checks,trian` ran the checks, then ended in a KeyError with no table: on a lent GPU, a wasted call."""
    for args, message in ((["--only", "checks,trian"], "--only: unknown section(s) trian; the sections: checks,"),
                          (["--compile-modes", "default,fastest"], "--compile-modes: unknown mode(s) fastest;")):
        proc = subprocess.run([sys.executable, str(ROOT / "src" / "bench.py"), "--cpu", "--out", str(tmp_path / "b.json"),
                               *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
        assert not (tmp_path / "b.json").exists()


def test_the_target_section_compares_each_nets_best_row(tmp_path):
    """`--only target`, the short run for a lent GPU: both nets timed, each eager row twice, and the
    ratio is the paper net's best row over torchvision's best, whatever row each was."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "src" / "bench.py"), "--cpu", "--only", "target", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = record["train_step"]
    assert [r["model"] for r in rows].count("torchvision alexnet") == 2  # the CPU version: fp32 only, twice
    assert [r["model"] for r in rows].count("paper (lrn, towers 2)") == 2
    tv = max(r["images_per_s"] for r in rows if r["model"].startswith("torchvision"))
    paper = max(r["images_per_s"] for r in rows if r["model"].startswith("paper"))
    target = record["target"]
    assert target["ratio"] == paper / tv and target["paper_best"]["images_per_s"] == paper
    assert target["met"] is None  # the tiny version's nets are not the paper's: no verdict
    assert "target: the paper net at" in proc.stdout
