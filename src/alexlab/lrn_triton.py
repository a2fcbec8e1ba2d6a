"""LRN as two fused Triton kernels (forward, backward), registered as `torch.library` ops so they
compose with autograd and torch.compile. Used on CUDA; `alexlab.lrn` keeps the reference for CPU.

Each program holds a block of pixels x all channels of one image in registers; the window sums
across channels move values between threads (tl.gather), not through memory. The forward reads x
once and writes y; the backward reads x and the incoming gradient and writes dx, recomputing the
denominators instead of saving them, so LRN moves the same bytes as a ReLU. Sums run in fp32
whatever the input dtype. (A first version loaded the five shifted channel windows from memory
instead: 14.7 ms in fp32 and 1.7 ms in bf16 on 256x96x55x55 on an H200, against 0.84 and 0.74 ms
for the gather windows, `window="gather"`; bench/RESULTS.md.) The window sums can also be formed by
groups of four channels (`window="lanes"`, `_window_sum_lanes`), which issues fewer instructions
under Triton 3.8 but ran no faster on an H100 under Triton 3.6, so `lrn_impl=auto` runs the gather
(the ops' default `window`).

    d_i = k + c * sum_{j in window(i)} a_j^2,     b_i = a_i * d_i^-beta
    dL/da_j = g_j d_j^-beta - 2 beta c a_j * sum_{i: j in window(i)} g_i a_i d_i^(-beta-1)

A second pair (`lrn_pool_forward`, where the model puts a max-pool in its LRN: model.pool_in_lrn) also runs
that max-pool: the forward writes the pooled output and, as int8, where each maximum was; the
backward hands each pixel the pooled gradient of the windows whose maximum it was, then runs the LRN's
backward. The LRN's full-size output and gradient never go through memory.

On a machine without a GPU the same kernels run in Triton's interpreter (TRITON_INTERPRET=1),
which is how the CPU tests check them.
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from alexlab.lrn import MAX_POOL_WINDOW

# How the kernels form each channel-window sum (see _window_sum); `window` in the ops below.
WINDOWS = {"lanes": 0, "gather": 1, "scan": 2}  # the `window` argument -> the kernels' WINDOW constant
LANES, GATHER, SCAN = (tl.constexpr(WINDOWS[name]) for name in ("lanes", "gather", "scan"))


@triton.jit
def _as_fp32(coeff, beta, k):
    """Inductor passes a Python float to a kernel in its graph as fp64 (torch/_inductor/codegen/
    triton_utils.py), where Triton's own launcher passes fp32: in fp64 the LRN's arithmetic ran in
    double precision, and the pooled kernel's running maximum changed type inside its loop, which
    Triton refuses (both seen compiled on an H100, 2026-11-28)."""
    return tl.cast(coeff, tl.float32), tl.cast(beta, tl.float32), tl.cast(k, tl.float32)


@triton.jit
def _neg_pow(d, beta, BETA_IS_075: tl.constexpr):
    """(d^-beta, d^(-beta-1)) without a division, which costs more than these in fp32."""
    if BETA_IS_075:  # the paper's beta: d^-0.5 * d^-0.25 from one rsqrt and one sqrt, no exp/log
        r = tl.rsqrt(d)
        scale = r * tl.sqrt(r)
        over_d = scale * r * r
    else:
        log_d = tl.log2(d)
        scale = tl.exp2(-beta * log_d)
        over_d = tl.exp2((-beta - 1.0) * log_d)
    return scale, over_d


@triton.jit
def _shift_chunks(v, by: tl.constexpr, G: tl.constexpr):
    """v[:, g + by], zero outside [0, G), for a [BLOCK_P, G] tensor."""
    g = tl.arange(0, G)[None, :] + by
    picked = tl.gather(v, tl.broadcast_to(tl.minimum(tl.maximum(g, 0), G - 1), v.shape), axis=1)
    return tl.where((g >= 0) & (g < G), picked, 0.0)


@triton.jit
def _lane_sum(j: tl.constexpr, lo: tl.constexpr, hi: tl.constexpr, lanes):
    """The window sum of the j-th of each group of four channels; lanes[4 + k] holds the channel at
    offset k (-4..7) from the group's first: the previous group's four, its own, the next group's."""
    s = lanes[4 + j + lo]
    for o in tl.static_range(lo + 1, hi + 1):
        s += lanes[4 + j + o]
    return s


@triton.jit
def _window_sum_lanes(t, lo: tl.constexpr, hi: tl.constexpr, BLOCK_P: tl.constexpr, G: tl.constexpr):
    """_window_sum by groups of four channels (-4 <= lo, hi <= 4): the [BLOCK_P, G, 4] tile is split into
    the four channels of each group, which one thread holds; a window takes its group's own four and,
    from the neighbouring groups, only the channels it reaches (for size 5: two from each side, four
    tl.gather of a quarter of the tile). The gathers move values between threads; the rest are
    additions in registers. Compiled for sm_90 this issues a quarter to a third fewer instructions per
    element than one gather per window position at the same launch, in fewer registers
    (bench/RESULTS.md)."""
    shape: tl.constexpr = t.shape
    a, b = tl.split(tl.reshape(t, (BLOCK_P, G, 2, 2)))
    c0, c2 = tl.split(a)
    c1, c3 = tl.split(b)
    zero = tl.zeros_like(c0)
    p0 = zero
    p1 = zero
    p2 = zero
    p3 = zero
    n0 = zero
    n1 = zero
    n2 = zero
    n3 = zero
    if lo <= -4:
        p0 = _shift_chunks(c0, -1, G)
    if lo <= -3:
        p1 = _shift_chunks(c1, -1, G)
    if lo <= -2:
        p2 = _shift_chunks(c2, -1, G)
    if lo <= -1:
        p3 = _shift_chunks(c3, -1, G)
    if hi >= 1:
        n0 = _shift_chunks(c0, 1, G)
    if hi >= 2:
        n1 = _shift_chunks(c1, 1, G)
    if hi >= 3:
        n2 = _shift_chunks(c2, 1, G)
    if hi >= 4:
        n3 = _shift_chunks(c3, 1, G)
    lanes = (p0, p1, p2, p3, c0, c1, c2, c3, n0, n1, n2, n3)
    o0 = _lane_sum(0, lo, hi, lanes)
    o1 = _lane_sum(1, lo, hi, lanes)
    o2 = _lane_sum(2, lo, hi, lanes)
    o3 = _lane_sum(3, lo, hi, lanes)
    return tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), shape)


@triton.jit
def _window_sum(t, lo: tl.constexpr, hi: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                WINDOW: tl.constexpr):
    """out[:, i] = sum_{o = lo..hi} t[:, i + o] over a tile of BLOCK_P pixels x BLOCK_C channels held in
    registers as [BLOCK_P, BLOCK_C] or [BLOCK_P, BLOCK_C // 4, 4] (channel 4g + j at [:, g, j]; see
    _load_tile), zero outside [0, BLOCK_C) (channels >= C are zero in t). Values move between threads
    (tl.gather), not through memory, so each input element is read from memory once. WINDOW: how the
    sum is formed: LANES (_window_sum_lanes), GATHER (one tl.gather of the whole tile per window
    position, hi - lo + 1 of them; the kernels timed on the H200), SCAN (a running sum along the
    channels and two gathers, its ends)."""
    if WINDOW == LANES:
        out = _window_sum_lanes(t, lo, hi, BLOCK_P, BLOCK_C // 4)
    else:
        flat = tl.reshape(t, (BLOCK_P, BLOCK_C))
        c = tl.arange(0, BLOCK_C)[None, :]
        if WINDOW == SCAN:
            running = tl.cumsum(flat, axis=1)
            top = tl.gather(running, tl.broadcast_to(tl.minimum(c + hi, BLOCK_C - 1), flat.shape), axis=1)
            below = c + (lo - 1)
            bottom = tl.gather(running, tl.broadcast_to(tl.maximum(below, 0), flat.shape), axis=1)
            summed = top - tl.where(below >= 0, bottom, 0.0)
        else:
            summed = tl.zeros(flat.shape, dtype=tl.float32)
            for o in tl.static_range(lo, hi + 1):
                idx = c + o
                valid = (idx >= 0) & (idx < BLOCK_C)
                picked = tl.gather(flat, tl.broadcast_to(tl.minimum(tl.maximum(idx, 0), BLOCK_C - 1), flat.shape),
                                   axis=1)
                summed += tl.where(valid, picked, 0.0)
        out = tl.reshape(summed, t.shape)
    return out


@triton.jit
def _channels(BLOCK_C: tl.constexpr, GROUPED: tl.constexpr):
    """The channel offsets of a tile: [1, BLOCK_C], or [1, BLOCK_C // 4, 4] where GROUPED (Triton then gives
    each thread a group of four channels from the load on; LANES sums need no layout change through shared
    memory; for up to 128 channels, 32 groups, one per thread of a warp)."""
    if GROUPED:
        c = tl.arange(0, BLOCK_C // 4)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    else:
        c = tl.arange(0, BLOCK_C)[None, :]
    return c


@triton.jit
def _per_pixel(v, GROUPED: tl.constexpr):
    """A [BLOCK_P] vector of per-pixel values, shaped to broadcast against _channels."""
    if GROUPED:
        out = v[:, None, None]
    else:
        out = v[:, None]
    return out


@triton.jit
def _load_lrn(x_ptr, at, mask, coeff, k, SIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
              WINDOW: tl.constexpr, RELU: tl.constexpr):
    """(x in fp32, denominator base d) at the offsets `at` (a tile of pixels x all channels of one image).
    RELU: x is the ReLU of what is loaded (the LRN of a ReLU in one pass over memory)."""
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        x = tl.maximum(x, 0.0)
    # window of channel i: i - SIZE//2 .. i + (SIZE-1)//2, as nn.LocalResponseNorm pads
    d = k + coeff * _window_sum(x * x, -(SIZE // 2), (SIZE - 1) // 2, BLOCK_P, BLOCK_C, WINDOW)
    return x, d


@triton.jit
def _load_tile(x_ptr, P, C, stride_n, stride_c, stride_p, coeff, k, SIZE: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_C: tl.constexpr, WINDOW: tl.constexpr, GROUPED: tl.constexpr, RELU: tl.constexpr):
    """This program's tile, BLOCK_P pixels x all channels of image n: (offsets, mask, x in fp32,
    denominator base d)."""
    n = tl.program_id(1)
    p = _per_pixel(tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P), GROUPED)
    c = _channels(BLOCK_C, GROUPED)
    at = n.to(tl.int64) * stride_n + c * stride_c + p * stride_p
    mask = (p < P) & (c < C)
    x, d = _load_lrn(x_ptr, at, mask, coeff, k, SIZE, BLOCK_P, BLOCK_C, WINDOW, RELU)
    return at, mask, x, d


@triton.jit
def _lrn_grad(x, d, g, coeff, beta, SIZE: tl.constexpr, BETA_IS_075: tl.constexpr, BLOCK_P: tl.constexpr,
              BLOCK_C: tl.constexpr, WINDOW: tl.constexpr, RELU: tl.constexpr):
    """dL/dx of the LRN (of the ReLU, where RELU) given x, its d and the output's gradient g, all fp32."""
    scale, over_d = _neg_pow(d, beta, BETA_IS_075)
    # channel j is in the window of the channels i = j - (SIZE-1)//2 .. j + SIZE//2
    back = _window_sum(g * x * over_d, -((SIZE - 1) // 2), SIZE // 2, BLOCK_P, BLOCK_C, WINDOW)
    dx = g * scale - (2.0 * beta * coeff) * x * back
    if RELU:  # x is the ReLU's output here: the gradient passes where it is positive, as PyTorch's ReLU's
        dx = tl.where(x > 0.0, dx, 0.0)
    return dx


@triton.jit
def _lrn_fwd_kernel(x_ptr, y_ptr, P, C, stride_n, stride_c, stride_p, coeff, beta, k,
                    SIZE: tl.constexpr, BETA_IS_075: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                    WINDOW: tl.constexpr, GROUPED: tl.constexpr, RELU: tl.constexpr):
    coeff, beta, k = _as_fp32(coeff, beta, k)
    at, mask, x, d = _load_tile(x_ptr, P, C, stride_n, stride_c, stride_p, coeff, k, SIZE, BLOCK_P, BLOCK_C,
                                WINDOW, GROUPED, RELU)
    scale, _ = _neg_pow(d, beta, BETA_IS_075)
    y = x * scale
    tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lrn_bwd_kernel(x_ptr, g_ptr, dx_ptr, P, C, stride_n, stride_c, stride_p, coeff, beta, k,
                    SIZE: tl.constexpr, BETA_IS_075: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                    WINDOW: tl.constexpr, GROUPED: tl.constexpr, RELU: tl.constexpr):
    coeff, beta, k = _as_fp32(coeff, beta, k)
    at, mask, x, d = _load_tile(x_ptr, P, C, stride_n, stride_c, stride_p, coeff, k, SIZE, BLOCK_P, BLOCK_C,
                                WINDOW, GROUPED, RELU)
    g = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32)
    dx = _lrn_grad(x, d, g, coeff, beta, SIZE, BETA_IS_075, BLOCK_P, BLOCK_C, WINDOW, RELU)
    tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lrn_pool_fwd_kernel(x_ptr, y_ptr, arg_ptr, W, C, Wo, Q, stride_n, stride_c, stride_p, out_n, out_c, out_p,
                         coeff, beta, k, SIZE: tl.constexpr, BETA_IS_075: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_C: tl.constexpr, WINDOW: tl.constexpr, GROUPED: tl.constexpr, RELU: tl.constexpr,
                         POOL_K: tl.constexpr, POOL_S: tl.constexpr):
    """The max-pool (POOL_K x POOL_K, stride POOL_S, no padding) of the LRN: a program holds BLOCK_P pooled
    pixels x all channels and computes the LRN at each of their window's pixels (a pixel in two windows
    is computed twice; its second read comes from the cache), keeping the largest and, as int8, where it
    was (dh * POOL_K + dw; the first of equals in row-major order, and NaN wins, as PyTorch's max-pool).
    The window's rows run as a loop and its columns unrolled: fully unrolled, Triton 3.8 issued all nine
    loads at once and compiled conv1's forward to 135 registers (conv2's 184), 19% (12%) of the SM's
    warp slots; with the loop 72 (80), 44% (38%), read off the code compiled for sm_90 (no GPU timed
    either)."""
    coeff, beta, k = _as_fp32(coeff, beta, k)
    n = tl.program_id(1)
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    row = (q // Wo) * POOL_S
    col = (q % Wo) * POOL_S
    c = _channels(BLOCK_C, GROUPED)
    mask = (_per_pixel(q, GROUPED) < Q) & (c < C)
    image = n.to(tl.int64) * stride_n + c * stride_c
    best = tl.full(mask.shape, float("-inf"), tl.float32)
    where = tl.zeros(mask.shape, tl.int32)
    for dh in range(POOL_K):
        for dw in tl.static_range(POOL_K):
            at = image + _per_pixel((row + dh) * W + col + dw, GROUPED) * stride_p
            x, d = _load_lrn(x_ptr, at, mask, coeff, k, SIZE, BLOCK_P, BLOCK_C, WINDOW, RELU)
            scale, _ = _neg_pow(d, beta, BETA_IS_075)
            y = x * scale
            take = (y > best) | (y != y)
            best = tl.where(take, y, best)
            where = tl.where(take, dh * POOL_K + dw, where)
    out = n.to(tl.int64) * out_n + c * out_c + _per_pixel(q, GROUPED) * out_p
    tl.store(y_ptr + out, best.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(arg_ptr + out, where.to(tl.int8), mask=mask)


@triton.jit
def _lrn_pool_bwd_kernel(x_ptr, arg_ptr, g_ptr, dx_ptr, H, W, C, Ho, Wo, stride_n, stride_c, stride_p,
                         out_n, out_c, out_p, coeff, beta, k, SIZE: tl.constexpr, BETA_IS_075: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WINDOW: tl.constexpr,
                         GROUPED: tl.constexpr, RELU: tl.constexpr, POOL_K: tl.constexpr, POOL_S: tl.constexpr):
    """dL/dx of _lrn_pool_fwd_kernel: a program holds BLOCK_P input pixels x all channels; each pixel takes
    the pooled gradient of every window (at most ceil(POOL_K / POOL_S) per axis) whose saved position is
    it, then the LRN's backward runs on that as _lrn_bwd_kernel's does. The LRN's output and its
    full-size gradient never go through memory."""
    coeff, beta, k = _as_fp32(coeff, beta, k)
    n = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    h = p // W
    w = p % W
    c = _channels(BLOCK_C, GROUPED)
    mask = (_per_pixel(p, GROUPED) < H * W) & (c < C)
    at = n.to(tl.int64) * stride_n + c * stride_c + _per_pixel(p, GROUPED) * stride_p
    x, d = _load_lrn(x_ptr, at, mask, coeff, k, SIZE, BLOCK_P, BLOCK_C, WINDOW, RELU)
    image = n.to(tl.int64) * out_n + c * out_c
    g = tl.zeros(mask.shape, tl.float32)
    for a in tl.static_range((POOL_K + POOL_S - 1) // POOL_S):
        ho = h // POOL_S - a
        dh = h - ho * POOL_S
        for b in tl.static_range((POOL_K + POOL_S - 1) // POOL_S):
            wo = w // POOL_S - b
            dw = w - wo * POOL_S
            inside = (ho >= 0) & (ho < Ho) & (dh < POOL_K) & (wo >= 0) & (wo < Wo) & (dw < POOL_K)
            there = mask & _per_pixel(inside, GROUPED)
            out = image + _per_pixel(ho * Wo + wo, GROUPED) * out_p
            saved = tl.load(arg_ptr + out, mask=there, other=-1).to(tl.int32)
            mine = there & (saved == _per_pixel(dh * POOL_K + dw, GROUPED))
            g += tl.load(g_ptr + out, mask=mine, other=0.0).to(tl.float32)
    dx = _lrn_grad(x, d, g, coeff, beta, SIZE, BETA_IS_075, BLOCK_P, BLOCK_C, WINDOW, RELU)
    tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int, int]:
    """(x, pixels, channels, stride_n, stride_c, stride_p) for NCHW or NHWC (channels_last) x."""
    if x.dim() != 4:
        raise ValueError(f"LRN expects (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    s_n, s_c, s_h, s_w = x.stride()
    if s_h != w * s_w or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
        s_n, s_c, s_h, s_w = x.stride()
    return x, h * w, c, s_n, s_c, s_w


# Elements per program (pixels x padded channels) and warps per program: 8 elements per thread. Two
# costs trade here, both read off the kernels compiled for sm_90 without a GPU (`resource_job`,
# bench/RESULTS.md). The kernels timed on an H200 (gather windows, 4096 elements, 4 warps) took 193
# registers per thread in the backward, room for 8 of an SM's 64 warps, too few to hide memory
# latency. Fewer elements per thread free registers but cost instructions per element, and the LRN's
# issue time is near a ReLU's memory time. This launch with the LANES window sums, on conv1's output:
# 32 / 40 registers (forward / backward), 100% / 75% of the warps, 60 instructions per element
# against those H200 kernels' 77; with the gather windows 40 / 64 registers, 75% / 50%. The gather
# kernels took 4x a ReLU's time at 4096 x 4 on an H200, and 1.8x at this launch on an H100 (bf16).
# tests/test_fast_paths.py holds it there; the bench's `lrn_configs` times the others.
BLOCK_ELEMENTS, NUM_WARPS = 1024, 4


def _arguments(kernel, x, extra, size, coefficient, beta, k, window, block_elements, relu=False):
    """(runtime arguments by name, compile-time constants, grid, output) of a launch of `kernel`."""
    x, pixels, channels, s_n, s_c, s_p = _layout(x)
    tensors = [t.contiguous(memory_format=_memory_format(x)) for t in extra]  # same strides as x
    out = torch.empty_like(x)
    constants = _constants(channels, size, beta, window, block_elements, relu)
    values = [x, *tensors, out, pixels, channels, s_n, s_c, s_p, coefficient, beta, k]
    grid = (triton.cdiv(pixels, constants["BLOCK_P"]), x.shape[0])
    return _by_name(kernel, constants, values), constants, grid, out


def _by_name(kernel, constants: dict, values: list) -> dict:
    """`kernel`'s runtime arguments (its arguments but the constants) by name, from `values` in its order."""
    return dict(zip([name for name in kernel.arg_names if name not in constants], values))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def _constants(channels: int, size: int, beta: float, window: str, block_elements: int, relu: bool) -> dict:
    """The kernels' compile-time constants for a tensor of `channels` channels."""
    block_c = max(4, triton.next_power_of_2(channels))  # whole groups of four channels
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {list(WINDOWS)}, got {window!r}")
    if window == "lanes" and size > 9:  # the groups reach four channels either side
        window = "gather"
    return {"SIZE": size, "BETA_IS_075": beta == 0.75, "BLOCK_P": max(1, block_elements // block_c),
            "BLOCK_C": block_c, "WINDOW": WINDOWS[window], "GROUPED": window == "lanes" and block_c <= 128,
            "RELU": bool(relu)}


def _launch(kernel, launch: tuple, num_warps: int):
    """Run `kernel` as `launch` = (_arguments or _pool_arguments of it) says; its outputs."""
    arguments, constants, grid, outputs = launch
    torch.library.wrap_triton(kernel)[grid](*arguments.values(), **constants, num_warps=num_warps)  # kernel's order
    return outputs


def resource_job(backward: bool, dtype: torch.dtype, shape: tuple, channels_last: bool = True, size: int = 5,
                 beta: float = 0.75, window: str = "gather", block_elements: int = BLOCK_ELEMENTS,
                 num_warps: int = NUM_WARPS, relu: bool = False, pool: tuple[int, int] | None = None) -> dict:
    """The kernel that a launch on a tensor of this shape and layout compiles (Triton specialises on the
    arguments' values: a stride of 1, multiples of 16), as a job for
    alexlab.kernel_resources.compiled_resources: registers, spills, occupancy, instructions, read
    off its code without a GPU. The tensors are meta tensors: nothing is allocated. pool: (window,
    stride) of the max-pool inside (the pooled kernels)."""
    from alexlab.kernel_resources import job_for_launch
    x = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if pool is not None:
        kernel = _lrn_pool_bwd_kernel if backward else _lrn_pool_fwd_kernel
        where = _pool_outputs(x, *pool)[1] if backward else None
        grad = where.to(dtype) if backward else None
        arguments, constants, _, _ = _pool_arguments(kernel, x, size, 1e-4 / size, beta, 2.0, window, block_elements,
                                                      relu, *pool, where=where, grad=grad)
    else:
        kernel = _lrn_bwd_kernel if backward else _lrn_fwd_kernel
        arguments, constants, _, _ = _arguments(kernel, x, [x] if backward else [], size, 1e-4 / size, beta, 2.0,
                                                window, block_elements, relu)
    return job_for_launch(f"{__name__}:{kernel.fn.__name__}", arguments, constants, num_warps)


def _forward(x: torch.Tensor, size: int, coefficient: float, beta: float, k: float, window: str = "gather",
             block_elements: int = BLOCK_ELEMENTS, num_warps: int = NUM_WARPS, relu: bool = False) -> torch.Tensor:
    """relu: the LRN of relu(x), x read once (the ReLU before conv1's and conv2's LRN, fused)."""
    return _launch(_lrn_fwd_kernel, _arguments(_lrn_fwd_kernel, x, [], size, coefficient, beta, k, window,
                                               block_elements, relu), num_warps)


def _backward(x: torch.Tensor, grad: torch.Tensor, size: int, coefficient: float, beta: float, k: float,
              window: str = "gather", block_elements: int = BLOCK_ELEMENTS,
              num_warps: int = NUM_WARPS, relu: bool = False) -> torch.Tensor:
    return _launch(_lrn_bwd_kernel, _arguments(_lrn_bwd_kernel, x, [grad.to(x.dtype)], size, coefficient, beta, k,
                                               window, block_elements, relu), num_warps)


def pooled_size(size: int, kernel: int, stride: int) -> int:
    """A max-pool's output size along one axis (no padding, as the paper's pooling)."""
    return (size - kernel) // stride + 1


def _pool_outputs(x: torch.Tensor, pool_kernel: int, pool_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (pooled output, int8 position of each maximum in its window), in x's memory format."""
    if not 1 <= pool_kernel <= MAX_POOL_WINDOW or pool_stride < 1:
        raise ValueError(f"the fused pool takes windows of 1 to {MAX_POOL_WINDOW} and a positive stride, "
                         f"got {pool_kernel}, {pool_stride}")
    n, c, h, w = x.shape
    ho, wo = pooled_size(h, pool_kernel, pool_stride), pooled_size(w, pool_kernel, pool_stride)
    if ho < 1 or wo < 1:
        raise ValueError(f"a {pool_kernel}x{pool_kernel} max-pool needs at least {pool_kernel}x{pool_kernel} "
                         f"pixels, got {h}x{w}")
    fmt = _memory_format(x)
    return (torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt),
            torch.empty((n, c, ho, wo), dtype=torch.int8, device=x.device, memory_format=fmt))


def _pool_arguments(kernel, x, size, coefficient, beta, k, window, block_elements, relu, pool_kernel, pool_stride,
                    where=None, grad=None):
    """(runtime arguments by name, compile-time constants, grid, outputs) of a launch of a pooled kernel:
    _lrn_pool_fwd_kernel (outputs: pooled y, positions) or _lrn_pool_bwd_kernel (outputs: dx)."""
    x, pixels, channels, s_n, s_c, s_p = _layout(x)
    constants = dict(_constants(channels, size, beta, window, block_elements, relu), POOL_K=pool_kernel,
                     POOL_S=pool_stride)
    if kernel is _lrn_pool_bwd_kernel:
        fmt = _memory_format(x)
        where = where.contiguous(memory_format=fmt)
        grad = grad.to(x.dtype).contiguous(memory_format=fmt)  # the strides of `where` (same shape and layout)
        outputs = (torch.empty_like(x),)
        values = [x, where, grad, outputs[0], x.shape[2], x.shape[3], channels, grad.shape[2], grad.shape[3]]
        rows = pixels
    else:
        outputs = _pool_outputs(x, pool_kernel, pool_stride)
        grad = outputs[0]  # its strides are the positions' too
        rows = grad.shape[2] * grad.shape[3]
        values = [x, *outputs, x.shape[3], channels, grad.shape[3], rows]
    out_n, out_c, _, out_p = grad.stride()
    values += [s_n, s_c, s_p, out_n, out_c, out_p, coefficient, beta, k]
    grid = (triton.cdiv(rows, constants["BLOCK_P"]), x.shape[0])
    return _by_name(kernel, constants, values), constants, grid, outputs


def _pool_forward(x: torch.Tensor, size: int, coefficient: float, beta: float, k: float, window: str = "gather",
                  block_elements: int = BLOCK_ELEMENTS, num_warps: int = NUM_WARPS, relu: bool = False,
                  pool_kernel: int = 3, pool_stride: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_pool2d(LRN(x)), where each maximum was): the max-pool after conv1's and conv2's LRN in the
    same pass, so the LRN's output never goes through memory. relu: of relu(x), as _forward."""
    return _launch(_lrn_pool_fwd_kernel, _pool_arguments(_lrn_pool_fwd_kernel, x, size, coefficient, beta, k, window,
                                                         block_elements, relu, pool_kernel, pool_stride), num_warps)


def _pool_backward(x: torch.Tensor, where: torch.Tensor, grad: torch.Tensor, size: int, coefficient: float,
                   beta: float, k: float, window: str = "gather", block_elements: int = BLOCK_ELEMENTS,
                   num_warps: int = NUM_WARPS, relu: bool = False, pool_kernel: int = 3,
                   pool_stride: int = 2) -> torch.Tensor:
    (dx,) = _launch(_lrn_pool_bwd_kernel, _pool_arguments(_lrn_pool_bwd_kernel, x, size, coefficient, beta, k, window,
                                                          block_elements, relu, pool_kernel, pool_stride, where, grad),
                    num_warps)
    return dx


def _register(make_op, suffix: str, pooled: bool = False):
    """The forward and backward kernels as one differentiable op. make_op = torch.library.triton_op:
    torch.compile traces into it and sees the kernels; torch.library.custom_op: opaque, compiled
    graphs call it as it is (then it needs a fake version that gives the output's shape and strides).
    pooled: the LRN and the max-pool after it (_pool_forward), whose positions the backward also reads."""
    name, run_forward, run_backward = ("lrn_pool", _pool_forward, _pool_backward) if pooled else \
        ("lrn", _forward, _backward)
    forward = make_op(f"alexlab::{name}_forward{suffix}", run_forward, mutates_args=())
    backward = make_op(f"alexlab::{name}_backward{suffix}", run_backward, mutates_args=())
    if make_op is torch.library.custom_op:
        def fake_forward(*args, **kwargs):
            given = inspect.signature(run_forward).bind(*args, **kwargs)
            given.apply_defaults()
            x = _layout(given.arguments["x"])[0]
            if pooled:
                return _pool_outputs(x, given.arguments["pool_kernel"], given.arguments["pool_stride"])
            return torch.empty_like(x)
        forward.register_fake(fake_forward)
        backward.register_fake(lambda x, *params: torch.empty_like(_layout(x)[0]))

    def setup_context(ctx, inputs, output):
        x, *params = inputs
        if pooled:
            ctx.save_for_backward(x, output[1])
            ctx.set_materialize_grads(False)  # else autograd fills a zero gradient for the positions, a pass
        else:
            ctx.save_for_backward(x)
        ctx.params = params

    def backward_of_forward(ctx, grad, *grad_of_positions):  # the int8 positions have none
        return backward(*ctx.saved_tensors, grad, *ctx.params), *[None] * len(ctx.params)

    forward.register_autograd(backward_of_forward, setup_context=setup_context)
    return forward, backward


lrn_forward, lrn_backward = _register(torch.library.triton_op, "")
# A candidate fix for the fused LRN's slowdown inside compiled graphs (bench/RESULTS.md), timed by the bench.
lrn_forward_opaque, lrn_backward_opaque = _register(torch.library.custom_op, "_opaque")
lrn_pool_forward, lrn_pool_backward = _register(torch.library.triton_op, "", pooled=True)
lrn_pool_forward_opaque, lrn_pool_backward_opaque = _register(torch.library.custom_op, "_opaque", pooled=True)
