"""Local response normalisation (paper section 3.3), and the alpha-scaling trap.

    b = a / (k + alpha' * sum_{n neighbouring maps} a^2) ** beta

The paper prints alpha = 1e-4 with no division by n, but Krizhevsky's own code
(cuda-convnet), Caffe and PyTorch all use alpha' = alpha / n.  `alpha_mode`
picks which reading is built:

    per_size -> alpha' = alpha / n   (his code; nn.LocalResponseNorm(n, alpha, beta, k))
    literal  -> alpha' = alpha       (the formula as printed: 5x stronger at n=5)
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

ALPHA_MODES = ("per_size", "literal")


def effective_alpha(alpha: float, size: int, alpha_mode: str) -> float:
    """The coefficient of the sum of squares that the formula above multiplies."""
    if alpha_mode == "per_size":
        return alpha / size
    if alpha_mode == "literal":
        return alpha
    raise ValueError(f"model.lrn_alpha must be one of {ALPHA_MODES}, got {alpha_mode!r}")


def _window_sum(t: torch.Tensor, size: int, before: int) -> torch.Tensor:
    """Sum over `size` neighbouring channels, zero outside: out[:, i] = sum t[:, i-before : i-before+size].
    Added in place, slice by slice: no padded copy (new tensors cost page faults on a CPU)."""
    out = t.clone()
    channels = t.shape[1]
    for offset in range(-before, size - before):
        if offset == 0 or abs(offset) >= channels:
            continue
        if offset > 0:
            out[:, :channels - offset] += t[:, offset:]
        else:
            out[:, -offset:] += t[:, :channels + offset]
    return out


def _power(d: torch.Tensor, exponent: float) -> torch.Tensor:
    if exponent == -0.75:  # the paper's beta: rsqrt and sqrt are several times faster than pow on a CPU
        root = torch.rsqrt(d)                # d^-1/2
        return root.sqrt().mul_(root)        # d^-1/4 * d^-1/2
    return d.pow(exponent)


class _LRNFunction(torch.autograd.Function):
    """LRN with a hand-written backward: 4x faster than F.local_response_norm on a CPU (fwd+bwd),
    and it keeps x, the denominator base d and d^-beta for the backward pass.

        d_i = k + c * sum_{j in window(i)} a_j^2,   b_i = a_i * d_i^-beta
        dL/da_j = g_j d_j^-beta - 2 beta c a_j * sum_{i: j in window(i)} g_i b_i / d_i
    """

    @staticmethod
    def forward(ctx, x, size: int, coefficient: float, beta: float, k: float):
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # the sum of squares needs fp32 under bf16 autocast
        d = _window_sum(x * x, size, size // 2).mul_(coefficient).add_(k)
        scale = _power(d, -beta)
        ctx.save_for_backward(x, d, scale)
        ctx.params = (size, coefficient, beta)
        return (x * scale).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        x, d, scale = ctx.saved_tensors
        size, coefficient, beta = ctx.params
        g_scaled = grad.to(x.dtype) * scale
        back = _window_sum(torch.mul(g_scaled, x).div_(d), size, (size - 1) // 2)
        return back.mul_(x).mul_(-2 * beta * coefficient).add_(g_scaled).to(grad.dtype), None, None, None, None


# (opaque, pooled) -> the op, or None without Triton; filled at the first call. A plain dict, not
# functools.cache: torch.compile traces through this lookup, and warns at every compile about a cache
# wrapper it ignores.
_FUSED_OPS: dict[tuple[bool, bool], Any] = {}


def _fused_lrn(opaque: bool, pooled: bool = False):
    """The Triton op (alexlab.lrn_triton) where Triton is installed, else None. pooled: the op that also
    max-pools its output (returning the pooled output and where each maximum was)."""
    if (opaque, pooled) not in _FUSED_OPS:
        try:
            from alexlab import lrn_triton
            ops = {(False, False): lrn_triton.lrn_forward, (True, False): lrn_triton.lrn_forward_opaque,
                   (False, True): lrn_triton.lrn_pool_forward, (True, True): lrn_triton.lrn_pool_forward_opaque}
        except ImportError:
            ops = dict.fromkeys([(False, False), (True, False), (False, True), (True, True)])
        _FUSED_OPS.update(ops)
    return _FUSED_OPS[opaque, pooled]


# The widest max-pool window the fused kernels take: a maximum's position in it, up to 11 x 11 - 1, fits an int8.
MAX_POOL_WINDOW = 11


def _fusable_pool(pool: nn.MaxPool2d) -> tuple[int, int] | None:
    """(window, stride) of a max-pool the fused kernels can run (square, no padding or dilation, floor
    sizes: the paper's pooling and its non-overlapping ablation), else None."""
    size, stride = nn.modules.utils._pair(pool.kernel_size), nn.modules.utils._pair(pool.stride)
    plain = nn.modules.utils._pair(pool.padding) == (0, 0) and nn.modules.utils._pair(pool.dilation) == (1, 1)
    square_and_small = size[0] == size[1] <= MAX_POOL_WINDOW and stride[0] == stride[1]
    if plain and square_and_small and not pool.ceil_mode and not pool.return_indices:
        return size[0], stride[0]
    return None


IMPLEMENTATIONS = ("auto", "fused", "fused_gather", "fused_scan", "fused_opaque", "reference")
# The fused kernels' ways of forming the channel-window sums (alexlab.lrn_triton._window_sum).
FUSED_WINDOWS = {"fused": "lanes", "fused_gather": "gather", "fused_scan": "scan"}
# impl=auto on CUDA: on an H100 (2026-11-27, Triton 3.6) the gather window sums ran as fast as the
# groups of four in bf16 (0.466 against 0.465 ms on conv1's output) and 1.5x faster in fp32 (0.51 ms
# against 0.75, where Triton 3.6 moves the groups' tile through shared memory).
AUTO_FUSED_IMPL = "fused_gather"
# fused_opaque: auto's kernels, called as an opaque op, so the two differ only in the tracing
FUSED_WINDOWS["fused_opaque"] = FUSED_WINDOWS[AUTO_FUSED_IMPL]


# Where a LocalResponseNorm's `pool` runs: in the LRN's fused kernels, or after them on their output.
POOL_IMPLS = ("auto", "inside", "after")


def local_response_norm(x: torch.Tensor, size: int, coefficient: float, beta: float, k: float,
                        impl: str = "auto", relu: bool = False, pool: nn.MaxPool2d | None = None,
                        pool_inside: bool = True) -> torch.Tensor:
    """b = x / (k + coefficient * window sum of x^2) ** beta, across channels (dim 1).
    impl: auto (fused_gather on CUDA, the reference elsewhere) | fused (window sums by groups of four
    channels in registers) | fused_gather (one gather of the tile per window position) | fused_scan
    (each window as the difference of a running sum) | fused_opaque (fused_gather, as an op torch.compile
    calls without tracing into it) | reference. Timings: bench/RESULTS.md.
    relu: the LRN of relu(x); the fused kernels apply it as they load x, saving the ReLU's own passes
    over memory (forward and backward).
    pool: a max-pool applied to the result; the fused kernels run it in the same pass (the LRN's output
    and its gradient then never go through memory) where they can (_fusable_pool) and pool_inside."""
    # Triton runs on CUDA, or on a CPU in its interpreter (TRITON_INTERPRET=1, as the tests do);
    # the opaque op also on the meta device (shapes only: alexlab.traffic); elsewhere (a CPU tensor,
    # such as the shape probe in build_model) the reference runs.
    explicit = impl in FUSED_WINDOWS
    runnable = x.is_cuda or (explicit and os.environ.get("TRITON_INTERPRET") == "1") or \
        (impl == "fused_opaque" and x.is_meta)
    if impl != "reference" and runnable:
        pool_shape = _fusable_pool(pool) if pool is not None and pool_inside else None
        fused = _fused_lrn(impl == "fused_opaque", pooled=pool_shape is not None)
        if fused is not None:
            window = FUSED_WINDOWS[impl if explicit else AUTO_FUSED_IMPL]
            if pool_shape is not None:
                return fused(x, size, coefficient, beta, k, window, relu=relu, pool_kernel=pool_shape[0],
                             pool_stride=pool_shape[1])[0]
            out = fused(x, size, coefficient, beta, k, window, relu=relu)
            return pool(out) if pool is not None else out
        if explicit:
            raise RuntimeError(f"LRN impl={impl} needs Triton, which is not installed")
    out = _LRNFunction.apply(torch.relu(x) if relu else x, size, coefficient, beta, k)
    return pool(out) if pool is not None else out


class LocalResponseNorm(nn.Module):
    """Across-channel LRN with explicit alpha semantics (see the module docstring). relu=True: the
    ReLU that comes before it in the paper runs inside it, in the fused kernels' one pass. pool: the
    max-pool that comes after it in the paper, a submodule, `pool`; pool_impl says where it runs:
    inside (in the fused kernels' pass: the LRN's output and its gradient never go through memory,
    but each pixel's LRN is computed about twice), after (on the fused kernels' output), or auto: on
    CUDA the trainer times both on the layer's real input at its first step and keeps the faster
    (alexlab.model.choose_layer_impls); before that, inside (fewer bytes). With impl=auto the trainer
    times the reference beside them (`candidates`), so a fused kernel that fails is left out."""

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                 alpha_mode: str = "per_size", impl: str = "auto", relu: bool = False,
                 pool: nn.MaxPool2d | None = None, pool_impl: str = "auto"):
        super().__init__()
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"LRN impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        if pool_impl not in POOL_IMPLS:
            raise ValueError(f"LRN pool_impl must be one of {POOL_IMPLS}, got {pool_impl!r}")
        self.impl, self.relu, self.pool, self.pool_impl = impl, relu, pool, pool_impl
        self.size, self.alpha, self.beta, self.k, self.alpha_mode = size, alpha, beta, k, alpha_mode
        self.coefficient = effective_alpha(alpha, size, alpha_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_response_norm(x, self.size, self.coefficient, self.beta, self.k, self.impl, self.relu, self.pool,
                                   pool_inside=self.pool_impl != "after")

    def candidates(self) -> tuple[str, ...]:
        """The ways choose_layer_impls times for this layer (see `way`): where the pool runs, if that is left
        at auto, and with impl=auto the reference too, so that a fused kernel that fails on the card at
        hand (one that does not compile for it, say) is left out of the race, not the run. Empty when
        there is nothing to choose."""
        if self.impl == "reference":
            return ()
        fused = ("fused",) if self.pool is None else POOL_IMPLS[1:] if self.pool_impl == "auto" else (self.pool_impl,)
        ways = fused + (("reference",) if self.impl == "auto" else ())
        return ways if len(ways) > 1 else ()

    @property
    def way(self) -> str:
        """How the layer runs, as choose_layer_impls names it: reference (PyTorch's ops, pool after), or the
        fused kernels: fused (no pool), inside (the pool in their pass), after (PyTorch's pool after them)."""
        if self.impl == "reference":
            return "reference"
        return "fused" if self.pool is None else self.pool_impl

    @way.setter
    def way(self, way: str) -> None:
        if way == "reference":
            self.impl = "reference"
            return
        if self.impl == "reference":  # only a layer at impl=auto is timed with the reference
            self.impl = "auto"
        if way != "fused":
            self.pool_impl = way

    def extra_repr(self) -> str:
        return (f"{'relu first, ' if self.relu else ''}size={self.size}, alpha={self.alpha}, beta={self.beta}, "
                f"k={self.k}, alpha_mode={self.alpha_mode}" + (f", pool_impl={self.pool_impl}" if self.pool is not None else ""))


def factor_percentiles(model: nn.Module, run_forward, per_image: int = 64) -> dict[str, float]:
    """What each LRN layer of `model` multiplied its positive activations by, d^-beta above, over the
    forward passes that `run_forward()` makes: {"lrn1_factor_p01": .., "lrn1_factor_p50": ..,
    "lrn1_factor_p99": .., ...}, the 1st, 50th and 99th percentiles of a random sample of `per_image`
    positive activations per layer and image of each call (all, where there are fewer), so every image
    weighs alike whatever the batches. Near-equal percentiles mean the layer acted as a fixed scale
    (k^-beta: 2^-0.75 = 0.5946 with the paper's k and beta), not as a normalisation: its sum of squares
    was negligible beside k, as where activations are small (the paper's alpha on the small datasets'
    unit-variance inputs, model.lrn_in_pixel_units=false). The report checks this before it credits the
    lrn claim to normalisation. The reference formula, in float32, whatever impl runs."""
    samples: dict[str, list[torch.Tensor]] = {}
    generator: dict[str, torch.Generator] = {}

    def record(name, module, inputs):
        a = inputs[0].detach().float()
        if module.relu:
            a = a.clamp_min(0)
        d = _window_sum(a * a, module.size, module.size // 2).mul_(module.coefficient).add_(module.k)
        factors = d.pow_(-module.beta)[a > 0]
        wanted = per_image * a.shape[0]
        if factors.numel():
            if factors.numel() > wanted:
                g = generator.setdefault(name, torch.Generator(factors.device).manual_seed(0))
                factors = factors[torch.randint(factors.numel(), (wanted,), generator=g, device=factors.device)]
            samples.setdefault(name, []).append(factors.cpu())

    hooks = [module.register_forward_pre_hook(lambda m, i, name=name: record(name, m, i))
             for name, module in model.named_modules() if isinstance(module, LocalResponseNorm)]
    try:
        run_forward()
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for name, parts in samples.items():
        values = torch.quantile(torch.cat(parts).double(), torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64))
        layer = name.rsplit(".", 1)[-1]
        out.update({f"{layer}_factor_{p}": v for p, v in zip(("p01", "p50", "p99"), values.tolist())})
    return out
