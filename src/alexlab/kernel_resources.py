"""What a Triton kernel costs an NVIDIA SM, read off its compiled code, without a GPU.

Triton compiles for a named architecture on any machine (its wheel carries ptxas and cuobjdump), so
registers per thread, spilled bytes and shared memory can be read here, and from them the share of
the SM's warp slots the kernel can fill (theoretical occupancy). A memory-bound kernel needs many
warps in flight to hide memory latency: the fused LRN kernels timed on an H200 used 193 registers
per thread in the backward, which leaves room for 8 of an SM's 64 warps (bench/RESULTS.md).

A job names its kernel as "module:function" so that, where Triton runs as its interpreter
(TRITON_INTERPRET=1, as in the tests) and cannot compile, the jobs run in one child process without it.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

# Per SM, compute capability 8.0 to 9.0 (CUDA C Programming Guide, "Compute capabilities" table).
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = {80: 64, 86: 48, 89: 48, 90: 64}
MAX_BLOCKS_PER_SM = {80: 32, 86: 16, 89: 24, 90: 32}
SHARED_BYTES_PER_SM = {80: 167936, 86: 102400, 89: 102400, 90: 233472}
REGISTER_ALLOCATION_UNIT = 256  # registers are given to a warp in blocks of 256


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: int = 90) -> float:
    """Theoretical occupancy: resident warps / the SM's maximum, for a block of `num_warps` warps."""
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    blocks = min(REGISTERS_PER_SM // (per_warp * num_warps), MAX_WARPS_PER_SM[arch] // num_warps,
                 MAX_BLOCKS_PER_SM[arch])
    if shared_bytes:
        blocks = min(blocks, SHARED_BYTES_PER_SM[arch] // (shared_bytes + 1024))  # 1 KB per block is the system's
    return blocks * num_warps / MAX_WARPS_PER_SM[arch]


def job_for_launch(kernel: str, arguments: dict, constexprs: dict, num_warps: int) -> dict:
    """A job for compiled_resources: the kernel ("module:function") as a launch with these runtime
    `arguments` (by name; tensors may be meta tensors) compiles it. Triton specialises on the values as
    at run time: an integer equal to 1 becomes a constant, and integers and pointers that are multiples
    of 16 are marked so, which lets it vectorise memory accesses."""
    signature, constants, divisible = {}, dict(constexprs), []
    for name, value in arguments.items():
        kind, hint = _specialize(value)
        if kind == "constexpr":
            constants[name] = hint
        else:
            signature[name] = kind
            if hint == "D":
                divisible.append(name)
    return {"kernel": kernel, "signature": signature, "constexprs": constants, "divisible_by_16": divisible,
            "num_warps": num_warps}


def _specialize(value) -> tuple:
    """(Triton type or "constexpr", "D" for a multiple of 16 / the constant) as Triton's launcher
    specialises an argument; its own function where this Triton has it (3.8 does)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
        return native_specialize_impl(BaseBackend, value, False, True, True)
    except ImportError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "data_ptr"):
        raise TypeError(f"cannot specialise {value!r}")
    if hasattr(value, "data_ptr"):  # a tensor: a pointer to its element type
        names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "uint8": "u8", "int32": "i32",
                 "int64": "i64"}
        return "*" + names[str(value.dtype).replace("torch.", "")], "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    if value == 1:
        return "constexpr", 1
    return ("i32" if -2**31 <= value < 2**31 else "i64"), "D" if value % 16 == 0 else ""


def compiled_resources(jobs: list[dict], arch: int = 90) -> list[dict]:
    """For each job {"kernel": "module:function" (a @triton.jit function), "signature": {argument:
    Triton type ('*bf16', 'i32', 'fp32')}, "constexprs": {...}, "num_warps": n, optionally
    "divisible_by_16": [arguments]} (job_for_launch makes one from a launch's arguments): compile it
    for sm_`arch` and report registers per thread, spilled bytes (local memory), shared memory per
    block, theoretical occupancy and the machine code's length."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(__file__)),
                                                          env.get("PYTHONPATH")]))
        done = subprocess.run([sys.executable, "-m", "alexlab.kernel_resources", str(arch)], input=json.dumps(jobs),
                              capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"compiling the kernels failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout)
    return [_compile(job, arch) for job in jobs]


def _compile(job: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    module, name = job["kernel"].split(":")
    kernel = getattr(importlib.import_module(module), name)
    signature = dict(job["signature"], **{arg: "constexpr" for arg in job["constexprs"]})
    attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in job.get("divisible_by_16", [])}
    source = ASTSource(fn=kernel, signature=signature, constexprs=job["constexprs"], attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": job["num_warps"]})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    instructions = None
    if os.path.isfile(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage, sass = (subprocess.run([cuobjdump, flag, cubin.name], capture_output=True, text=True,
                                          check=True).stdout for flag in ("--dump-resource-usage", "--dump-sass"))
        registers = int(re.search(r"REG:(\d+)", usage).group(1))
        spilled = int(re.search(r"LOCAL:(\d+)", usage).group(1)) + int(re.search(r"STACK:(\d+)", usage).group(1))
        instructions = len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+[A-Z]", sass))
    else:  # a Triton without cuobjdump: the driver reads the same numbers when it loads the kernel
        compiled._init_handles()
        registers, spilled = compiled.n_regs, compiled.n_spills
    shared = int(compiled.metadata.shared)
    # instructions: the machine code's length, which is what each thread runs once in a kernel without
    # loops (the LRN's); a measure of how much issuing each element costs, not a timing.
    return {"registers": registers, "spilled_bytes": spilled, "shared_bytes": shared, "num_warps": job["num_warps"],
            "occupancy": occupancy(registers, shared, job["num_warps"], arch), "instructions": instructions,
            "arch": f"sm_{arch}"}


if __name__ == "__main__":  # the child of compiled_resources: jobs as JSON on stdin, results on stdout
    print(json.dumps(compiled_resources(json.load(sys.stdin), int(sys.argv[1]))))
