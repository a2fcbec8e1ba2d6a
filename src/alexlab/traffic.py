"""Bytes a training step moves through GPU memory, op by op, as eager PyTorch runs it.

Why: the paper's net does the multiply-adds of torchvision's AlexNet (0.72 G per image each) yet
trained at 67-73% of its speed on an H100 (bench/RESULTS.md). Neither net comes near the card's
arithmetic peak, so the bytes each step moves are the next suspect: conv1's output alone is 96
channels against torchvision's 64, and LRN reads and writes it twice more.

The model: every aten op reads each tensor input once and writes each output once (views move
nothing; an expanded tensor counts its distinct elements). That is exact for elementwise ops and
the fused LRN, and a lower bound for convolutions and matrix products, which re-read through the
cache. One pass hides inside an op and is added: on CUDA, PyTorch runs a convolution with a bias as
cuDNN's convolution and then `output.add_(bias)` (aten/src/ATen/native/Convolution.cpp), a read
and a write of the output (`convolution_bias_add`). It runs on the meta device: shapes only, no
arithmetic, any machine, about a second.
"""
from __future__ import annotations

import collections
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
ALLOCATES_ONLY = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor refers to (a broadcast dimension, stride 0, counts once)."""
    distinct = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return distinct * t.element_size()


class TrafficCounter(TorchDispatchMode):
    """Inside `with TrafficCounter() as c:`, c.by_op[name] sums the bytes each aten op read and wrote."""

    def __init__(self):
        super().__init__()
        self.by_op: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket not in ALLOCATES_ONLY:
            moved = sum(tensor_bytes(t) for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
            self.by_op[func.overloadpacket.__name__] += moved
            if func.overloadpacket is aten.convolution and args[2] is not None:  # the bias, added after cuDNN
                self.by_op["convolution_bias_add"] += 2 * tensor_bytes(out) + tensor_bytes(args[2])
        return out

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


def step_traffic(model: nn.Module, batch: int, input_size: int, channels_last: bool = True,
                 dtype: torch.dtype = torch.bfloat16) -> TrafficCounter:
    """The bytes of one forward and backward pass (loss included, the optimizer not) of a copy of
    `model` on the meta device, in `dtype` (the trainer's bf16 on CUDA; its autocast also casts the
    fp32 weights, about the same bytes for nets of equal parameter counts, not counted here)."""
    meta = _meta_copy(model).to(dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    meta = meta.to(memory_format=memory_format)
    x = torch.empty(batch, 3, input_size, input_size, device="meta", dtype=dtype).contiguous(
        memory_format=memory_format)
    labels = torch.zeros(batch, dtype=torch.int64, device="meta")
    with TrafficCounter() as counter:
        F.cross_entropy(meta(x), labels).backward()
    return counter


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy on the meta device whose fused LRNs run as the opaque op: one op reading x and writing
    the output (backward: reading x and the gradient, writing dx), the bytes the CUDA kernels move."""
    import copy
    from alexlab.lrn import LocalResponseNorm, _fused_lrn
    meta = copy.deepcopy(model).to("meta")
    fused = [m for m in meta.modules() if isinstance(m, LocalResponseNorm) and m.impl != "reference"]
    if fused and _fused_lrn(True) is None:  # else the reference's many ops would be counted instead
        raise RuntimeError("counting the fused LRN's bytes needs its op, which needs Triton")
    for module in fused:
        module.impl = "fused_opaque"
    return meta
