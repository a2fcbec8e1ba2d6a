"""The network of Krizhevsky et al. (2012), built from a plain model config.

Every ablation switch of the paper lives in `build_model`:

    lrn / lrn_alpha   LRN after the activation of the layers marked `lrn` (conv1, conv2); a ReLU
                      there runs inside the LRN module (LocalResponseNorm(relu=True)), same function,
                      and so does the max-pool after it (its `pool`; pool_in_lrn=false: its own module)
    lrn_in_pixel_units  the paper's alpha is for activations of raw-pixel inputs; inputs scaled down to
                      input_pixel_scale/255 of that (data.pixel_scale: 3 on Fashion-MNIST) scale a ReLU net's
                      activations by the same (exactly, with zero biases: kaiming init), so alpha is multiplied
                      by (255/input_pixel_scale)^2 and the LRN normalises as it would on raw pixels (false:
                      alpha as given, where at unit-variance inputs the LRN is a near-constant factor 2^-0.75,
                      not a normalisation). Not for tanh, whose outputs are bounded, not in the inputs' units
    overlap_pool      max-pool 3/2 (paper) or 2/2
    dropout           p on the outputs of fc6 and fc7 (0 = off)
    activation        relu or tanh for every hidden layer
    towers            2: groups=2 on layers marked `grouped` (conv2, conv4, conv5)
                      1: the footnote's one-tower net: half the kernels in every conv
                         layer but the last, groups=1, fully connected layers unchanged
    remove            drop middle conv layers and/or fc6, fc7; widths adapt, pooling stays
    init              paper (N(0, 0.01), bias 1 in conv2/4/5 and fc6/7) or kaiming

Speed only (same function, same parameters): lrn_impl (auto|fused|fused_gather|fused_scan|fused_opaque|
reference, see lrn.py), pool_in_lrn (auto|true|false: where the max-pool after an LRN runs, see
LocalResponseNorm), grouped_conv (auto|native|native_nchw|split|dense, or a way per direction such as
native/dense/dense, see TowerConv2d) and conv1_impl (auto|native|pad4|pad8|space_to_depth, see FirstConv2d).
pool_in_lrn's, grouped_conv's and conv1_impl's auto are settled on CUDA by timing at the first training
step (choose_layer_impls); lrn_impl's auto is fused_gather on CUDA, timed there beside the reference
only so that a fused kernel that fails on the card is left out.

The config is a dict or an OmegaConf node; nothing here knows about Hydra.
"""
from __future__ import annotations

import contextlib
import functools
import statistics
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Mapping

import torch
from torch import nn

from alexlab.errors import ConfigError, first_line, require_integer, require_number
from alexlab.lrn import ALPHA_MODES, IMPLEMENTATIONS as LRN_IMPLEMENTATIONS, LocalResponseNorm
from alexlab.timing import seconds_per_call, synchronize

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
GROUPED_CONV_IMPLS = ("auto", "native", "native_nchw", "split", "dense")
TOWER_IMPLS = GROUPED_CONV_IMPLS[1:]  # what auto chooses from, beside a choice per direction:
# grouped_conv="F/I/W": the forward, the input's gradient and the weight's gradient each run one of
# these ways (TowerConv2d), e.g. "native/dense/dense".
DIRECTION_IMPLS = ("native", "split", "dense")
DIRECTIONS = ("forward", "input_grad", "weight_grad")
CONV1_IMPLS = ("auto", "native", "pad4", "pad8", "space_to_depth")  # FirstConv2d
REMOVABLE_FC = ("fc6", "fc7")
# Section 5: "We initialized the neuron biases in the second, fourth, and fifth convolutional
# layers, as well as in the fully-connected hidden layers, with the constant 1."
PAPER_BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")


def _plain(cfg: Any) -> dict:
    """Accept a dict or an OmegaConf node without importing OmegaConf at module level."""
    if isinstance(cfg, Mapping) and not hasattr(cfg, "_get_node"):
        return dict(cfg)
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True)


def _check(cfg: dict) -> None:
    require_integer("model.in_channels", cfg.get("in_channels"), 1)
    if not isinstance(cfg.get("conv"), list) or not cfg["conv"]:
        raise ConfigError(f"model.conv must list the conv layers (at least conv1), got {cfg.get('conv')!r}")
    for i, layer in enumerate(cfg["conv"]):
        for key, least in (("out", 1), ("kernel", 1), ("stride", 1), ("pad", 0)):
            require_integer(f"model.conv[{i}].{key}", layer.get(key, 1 if key == "stride" else 0), least)
    fc = cfg.get("fc")
    if not isinstance(fc, list) or len(fc) != len(REMOVABLE_FC):  # fc=[10] once built no fc7, silently
        raise ConfigError(f"model.fc must give the widths of fc6 and fc7, as [4096, 4096] (model.remove drops "
                          f"either), got {fc!r}")
    for name, width in zip(REMOVABLE_FC, fc):
        require_integer(f"model.fc ({name})", width, 1)
    require_integer("model.adaptive_pool", cfg.get("adaptive_pool"), 1, null_means="none")
    conv_names = [layer["name"] for layer in cfg["conv"]]
    towers = cfg.get("towers")
    if isinstance(towers, bool) or towers not in (1, 2):  # true == 1 built the one-tower net
        raise ConfigError(f"model.towers must be 1 or 2, got {towers!r}")
    if not isinstance(cfg.get("activation"), str) or cfg.get("activation") not in ACTIVATIONS:  # a list: TypeError
        raise ConfigError(f"model.activation must be one of {sorted(ACTIVATIONS)}, got {cfg.get('activation')!r}")
    if cfg.get("lrn_alpha") not in ALPHA_MODES:
        raise ConfigError(f"model.lrn_alpha must be one of {list(ALPHA_MODES)}, got {cfg.get('lrn_alpha')!r}")
    for key, value in (("lrn", cfg.get("lrn")), ("overlap_pool", cfg.get("overlap_pool")),
                       ("dropout_before_fc", cfg.get("dropout_before_fc", False))):  # "maybe" would count as true
        if not isinstance(value, bool):
            raise ConfigError(f"model.{key} must be true or false, got {value!r}")
    pool_in_lrn = cfg.get("pool_in_lrn", "auto")  # a speed switch: absent in older configs
    if not (isinstance(pool_in_lrn, bool) or pool_in_lrn == "auto"):
        raise ConfigError(f"model.pool_in_lrn must be auto, true or false, got {cfg.get('pool_in_lrn')!r}")
    require_number("model.dropout", cfg.get("dropout"), "a number in [0, 1)", lambda v: 0 <= v < 1)
    if cfg.get("lrn_impl", "auto") not in LRN_IMPLEMENTATIONS:
        raise ConfigError(f"model.lrn_impl must be one of {list(LRN_IMPLEMENTATIONS)}, got {cfg.get('lrn_impl')!r}")
    lrn = cfg.get("lrn_params") or {}
    require_integer("model.lrn_params.size", lrn.get("size"), 1)
    for key in ("alpha", "beta"):
        require_number(f"model.lrn_params.{key}", lrn.get(key), "a number >= 0", lambda v: v >= 0)
    require_number("model.lrn_params.k", lrn.get("k"), "a number > 0", lambda v: v > 0)  # the denominator's base
    if not isinstance(cfg.get("lrn_in_pixel_units", False), bool):
        raise ConfigError(f"model.lrn_in_pixel_units must be true or false, got {cfg.get('lrn_in_pixel_units')!r}")
    require_number("model.input_pixel_scale", cfg.get("input_pixel_scale", RAW_PIXELS), "a positive number", lambda v: v > 0)
    if not is_tower_impl(cfg.get("grouped_conv", "auto")):
        raise ConfigError(f"model.grouped_conv must be one of {list(GROUPED_CONV_IMPLS)}, or one of "
                          f"{list(DIRECTION_IMPLS)} per direction as forward/input_grad/weight_grad "
                          f"(such as native/dense/dense), got {cfg.get('grouped_conv')!r}")
    if cfg.get("conv1_impl", "auto") not in CONV1_IMPLS:
        raise ConfigError(f"model.conv1_impl must be one of {list(CONV1_IMPLS)}, got {cfg.get('conv1_impl')!r}")
    if cfg.get("init") not in ("paper", "kaiming"):
        raise ConfigError(f"model.init must be paper or kaiming, got {cfg.get('init')!r}")
    remove = cfg.get("remove") or []
    if isinstance(remove, str) or not isinstance(remove, Sequence):  # 3: TypeError; {conv3: 1} built as [conv3]
        raise ConfigError(f"model.remove must be a list such as [conv3], got {remove!r}")
    removable = conv_names[1:] + list(REMOVABLE_FC)
    for name in remove:
        if name == conv_names[0] or name == "fc8":
            raise ConfigError(f"model.remove: {name} cannot be removed (the network needs its first "
                              f"conv layer and its classifier); removable: {removable}")
        if name not in removable:
            raise ConfigError(f"model.remove: unknown layer {name!r}; removable: {removable}")
    twice = sorted({name for name in remove if list(remove).count(name) > 1})
    if twice:  # the same net as naming it once, but a config the report would not pair with the claim's
        raise ConfigError(f"model.remove names {', '.join(twice)} more than once")


def layer_plan(model_cfg: Any) -> list[dict]:
    """The conv layers as built: widths, groups and removals applied (used by tests and docs)."""
    cfg = _plain(model_cfg)
    _check(cfg)
    remove = set(cfg.get("remove") or [])
    plan = []
    last = len(cfg["conv"]) - 1
    for i, layer in enumerate(cfg["conv"]):
        out = layer["out"] // 2 if cfg["towers"] == 1 and i != last else layer["out"]
        groups = 2 if cfg["towers"] == 2 and layer.get("grouped", False) else 1
        plan.append(dict(layer, out=out, groups=groups, removed=layer["name"] in remove))
    return plan


RAW_PIXELS = 255.0  # the input scale the paper's LRN constants were set for


def lrn_alpha_factor(cfg: Mapping) -> float:
    """What lrn_params.alpha is multiplied by (see lrn_in_pixel_units above): LRN is not scale-invariant,
    and with zero biases a ReLU net's activations scale with its inputs. tanh's do not (on raw pixels
    it saturates at +-1 whatever the scale), so a tanh net keeps alpha as given."""
    if not cfg.get("lrn_in_pixel_units", False) or cfg.get("activation") != "relu":  # older configs lack the key
        return 1.0
    return (RAW_PIXELS / float(cfg.get("input_pixel_scale", RAW_PIXELS))) ** 2


def build_model(model_cfg: Any, num_classes: int) -> nn.Module:
    """Build the network described by `model_cfg` (see conf/model/*.yaml) for `num_classes`."""
    cfg = _plain(model_cfg)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    plan = layer_plan(cfg)
    act = ACTIVATIONS[cfg["activation"]]
    lrn_cfg = cfg["lrn_params"]
    lrn_alpha = lrn_cfg["alpha"] * lrn_alpha_factor(cfg)
    pool_kernel = 3 if cfg["overlap_pool"] else 2

    features: OrderedDict[str, nn.Module] = OrderedDict()
    channels = cfg["in_channels"]
    for layer in plan:
        n = layer["name"][len("conv"):] if layer["name"].startswith("conv") else layer["name"]
        pool_in_lrn = False
        if not layer["removed"]:
            if channels % layer["groups"] or layer["out"] % layer["groups"]:
                raise ConfigError(f"{layer['name']}: {channels} -> {layer['out']} channels cannot be split "
                                  f"into {layer['groups']} towers")
            geometry = dict(stride=layer.get("stride", 1), padding=layer.get("pad", 0))
            if layer is plan[0] and layer["groups"] == 1:  # on the image's few channels
                features[layer["name"]] = FirstConv2d(channels, layer["out"], layer["kernel"], **geometry,
                                                      impl=cfg.get("conv1_impl", "auto"))
            else:
                features[layer["name"]] = TowerConv2d(channels, layer["out"], layer["kernel"], **geometry,
                                                      groups=layer["groups"], impl=cfg.get("grouped_conv", "auto"))
            lrn_here = cfg["lrn"] and layer.get("lrn", False)
            # ReLU then LRN: the ReLU runs inside the LRN module (relu=True), whose fused kernels apply it
            # as they load the conv output: one pass over it instead of two, forward and backward.
            relu_in_lrn = lrn_here and cfg["activation"] == "relu"
            if not relu_in_lrn:
                features[f"act{n}"] = act()
            # LRN then max-pool: likewise the pool is the LRN module's `pool`, which its fused kernels can
            # run in the same pass (pool_impl), so that the LRN's output and its gradient never go
            # through memory.
            where = cfg.get("pool_in_lrn", "auto")
            pool_in_lrn = lrn_here and layer.get("pool", False) and where is not False
            if lrn_here:
                features[f"lrn{n}"] = LocalResponseNorm(lrn_cfg["size"], lrn_alpha, lrn_cfg["beta"],
                                                        lrn_cfg["k"], alpha_mode=cfg["lrn_alpha"],
                                                        impl=cfg.get("lrn_impl", "auto"), relu=relu_in_lrn,
                                                        pool=nn.MaxPool2d(pool_kernel, stride=2) if pool_in_lrn else None,
                                                        pool_impl="inside" if where is True else "auto")
            channels = layer["out"]
        # A removed layer's pooling stays, so the later layers see the same spatial size.
        if layer.get("pool", False) and not pool_in_lrn:
            features[f"pool{n}"] = nn.MaxPool2d(pool_kernel, stride=2)
    if cfg.get("adaptive_pool"):
        features["avgpool"] = nn.AdaptiveAvgPool2d(cfg["adaptive_pool"])

    feature_net = nn.Sequential(features)
    with torch.no_grad():
        probe = torch.zeros(1, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
        try:
            flat = feature_net(probe).numel()
        except RuntimeError as err:
            raise ConfigError(f"model.input_size={cfg['input_size']} is too small for this network: {err}") from err

    remove = set(cfg.get("remove") or [])
    classifier: OrderedDict[str, nn.Module] = OrderedDict()
    width = flat
    dropout = float(cfg["dropout"])
    # torchvision puts dropout on the inputs of fc6/fc7; the paper on their outputs. Same net in eval.
    before = bool(cfg.get("dropout_before_fc", False))
    for name, hidden in zip(REMOVABLE_FC, cfg["fc"]):
        if name in remove:
            continue
        if dropout and before:
            classifier[f"drop{name[2:]}"] = nn.Dropout(dropout)
        classifier[name] = nn.Linear(width, hidden)
        classifier[f"act{name[2:]}"] = act()
        if dropout and not before:
            classifier[f"drop{name[2:]}"] = nn.Dropout(dropout)
        width = hidden
    classifier["fc8"] = nn.Linear(width, num_classes)

    model = AlexNet(feature_net, nn.Sequential(classifier))
    init_weights(model, cfg["init"])
    return model


def is_tower_impl(impl) -> bool:
    """One of GROUPED_CONV_IMPLS, or DIRECTION_IMPLS per direction ("native/dense/dense")."""
    if not isinstance(impl, str):
        return False
    parts = impl.split("/")
    return impl in GROUPED_CONV_IMPLS or (len(parts) == len(DIRECTIONS) and all(p in DIRECTION_IMPLS for p in parts))


def block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's weight (out, in/groups, k, k) as the dense weight (out, in, k, k) of the same
    function: each group's block on the diagonal, zeros elsewhere."""
    blocks = weight.chunk(groups, 0)
    return torch.cat([torch.cat([blk if j == i else torch.zeros_like(blk) for j in range(groups)], 1)
                      for i, blk in enumerate(blocks)], 0)


def _conv_backward(grad, x, weight, stride, padding, groups, want_input: bool):
    """One of a convolution's two gradients (input's or weight's), by the kernels autograd would call."""
    mask = [want_input, not want_input, False]
    grads = torch.ops.aten.convolution_backward(grad, x, weight, None, list(stride), list(padding), [1, 1],
                                                False, [0, 0], groups, mask)
    return grads[0] if want_input else grads[1]


def grouped_conv_direction(direction: str, how: str, x, weight, groups: int, stride, padding,
                           bias=None, grad=None) -> torch.Tensor:
    """One direction of a grouped convolution (groups > 1, no dilation), run `how`:
    native (groups in one cuDNN call), split (a dense call per group, then concatenated) or dense
    (one dense call with the block-diagonal weight: `groups` times the multiply-adds, but dense
    kernels). forward -> the output; input_grad, weight_grad -> that gradient, given the output's
    gradient `grad`. Every way gives the same values up to rounding."""
    if how == "native":
        if direction == "forward":
            return nn.functional.conv2d(x, weight, bias, stride, padding, 1, groups)
        return _conv_backward(grad, x, weight, stride, padding, groups, direction == "input_grad")
    if how == "dense":
        dense = block_diagonal(weight, groups)
        if direction == "forward":
            return nn.functional.conv2d(x, dense, bias, stride, padding)
        if direction == "input_grad":
            return _conv_backward(grad, x, dense, stride, padding, 1, True)
        full = _conv_backward(grad, x, dense, stride, padding, 1, False)  # (out, in, k, k): keep the diagonal
        rows, cols = weight.shape[0] // groups, weight.shape[1]
        return torch.cat([full[i * rows:(i + 1) * rows, i * cols:(i + 1) * cols] for i in range(groups)], 0)
    if how != "split":
        raise ValueError(f"a grouped conv direction runs native, split or dense, not {how!r}")
    xs, ws = x.chunk(groups, 1), weight.chunk(groups, 0)
    if direction == "forward":
        bs = bias.chunk(groups, 0) if bias is not None else [None] * groups
        return torch.cat([nn.functional.conv2d(xi, wi, bi, stride, padding) for xi, wi, bi in zip(xs, ws, bs)], 1)
    gs = grad.chunk(groups, 1)
    parts = [_conv_backward(gi, xi, wi, stride, padding, 1, direction == "input_grad") for gi, xi, wi in zip(gs, xs, ws)]
    return torch.cat(parts, 1 if direction == "input_grad" else 0)


class _ConvByDirection(torch.autograd.Function):
    """A grouped convolution whose forward, input gradient and weight gradient each run their own
    way (grouped_conv_direction). Under autocast it computes in the autocast dtype, as F.conv2d
    does there, and returns the gradients in the parameters' dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, groups, hows):
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        dtype = _compute_dtype(x)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            out = grouped_conv_direction("forward", hows[0], x, weight, groups, stride, padding, bias=bias)
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.hows = (groups, stride, padding), hows
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        (x_dtype, w_dtype, b_dtype), (groups, stride, padding) = ctx.dtypes, ctx.geometry
        grad = grad.to(x.dtype)
        grads = [None, None, None]
        for i, direction, dtype in ((0, "input_grad", x_dtype), (1, "weight_grad", w_dtype)):
            if ctx.needs_input_grad[i]:
                grads[i] = grouped_conv_direction(direction, ctx.hows[1 + i], x, weight, groups, stride, padding,
                                                  grad=grad).to(dtype)
        if ctx.needs_input_grad[2]:
            grads[2] = grad.sum((0, 2, 3)).to(b_dtype)
        return *grads, None, None, None, None


class TowerConv2d(nn.Conv2d):
    """nn.Conv2d whose grouped case (the two towers) can run several ways, same weights and result:
    native (groups=2 in one call), native_nchw (the same on NCHW copies of a channels_last input and
    weight: cuDNN's grouped kernels differ by layout), split (one dense conv per tower, then
    concatenate) or dense (one dense conv with a block-diagonal weight: twice the multiply-adds, but
    sometimes cuDNN's faster kernels); or "F/I/W", a way for each direction: the forward, the input's
    gradient and the weight's gradient (native, split or dense each; cuDNN's grouped kernels have
    been slow in one direction only, e.g. the weight's gradient in channels_last, PyTorch issue
    34977). auto: on CUDA the trainer times them on each layer's input before its first step and
    keeps the fastest (`choose_layer_impls`); before that, dense on CUDA (24.2k vs 20.3k img/s for
    the paper net on an H200, bench/RESULTS.md) and native elsewhere (the CPU's grouped kernels are
    not slow)."""

    def __init__(self, *args, impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if not is_tower_impl(impl):
            raise ValueError(f"unknown grouped conv impl {impl!r}")
        if self.dilation != (1, 1) or not isinstance(self.padding, tuple):
            raise ValueError("TowerConv2d: no dilation, numeric padding")
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = ("dense" if x.is_cuda else "native") if self.impl == "auto" else self.impl
        if self.groups == 1 or impl == "native":
            return super().forward(x)
        if impl == "native_nchw":
            out = self._conv_forward(x.contiguous(), self.weight.contiguous(), self.bias)
            return out.contiguous(memory_format=torch.channels_last) if not x.is_contiguous() else out
        if impl in ("split", "dense"):
            return grouped_conv_direction("forward", impl, x, self.weight, self.groups, self.stride, self.padding,
                                          bias=self.bias)
        return _ConvByDirection.apply(x, self.weight, self.bias, self.stride, self.padding, self.groups,
                                      tuple(impl.split("/")))

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", impl={self.impl}" if self.groups > 1 else "")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.conv2d computes in here: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class FirstConv2d(nn.Conv2d):
    """conv1, on the image's 1 or 3 channels, computed one of several ways, same weights and result:
    native; pad4 / pad8: the input's and the weight's channels padded with zeros to a multiple of 4 /
    8 (tensor-core convolution kernels want channel counts that are multiples of 4 or 8, which is
    why NVIDIA's DALI can pad images to 4 channels); space_to_depth: each stride x stride block of
    pixels becomes channels, so conv1's 11x11 stride-4 conv on 3 channels becomes a 3x3 stride-1 conv
    on 48 (the weight zero-padded to 12x12: 19% more multiply-adds). auto: native until the trainer
    times them on CUDA before its first step and keeps the fastest (`choose_layer_impls`). The input's
    copy is made in the dtype the conv computes in (bf16 under autocast), in channels_last."""

    def __init__(self, *args, impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if impl not in CONV1_IMPLS:
            raise ValueError(f"unknown conv1 impl {impl!r}")
        if self.groups != 1 or self.dilation != (1, 1) or not isinstance(self.padding, tuple):
            raise ValueError("FirstConv2d: groups=1, no dilation, numeric padding")
        self.impl = impl

    def candidates(self) -> tuple[str, ...]:
        """The ways worth timing here: native, and those that differ from it for this layer (a padding
        that adds channels; space_to_depth where the stride is over 1)."""
        ways = ["native"] + [f"pad{m}" for m in (4, 8) if self.in_channels % m]
        return tuple(ways + (["space_to_depth"] if self.stride != (1, 1) else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = "native" if self.impl == "auto" else self.impl
        if impl in ("pad4", "pad8"):
            extra = -self.in_channels % int(impl[3:])
            if extra:
                n, c, h, w = x.shape
                padded = torch.empty((n, c + extra, h, w), dtype=_compute_dtype(x), device=x.device,
                                     memory_format=torch.channels_last)
                padded[:, :c] = x
                padded[:, c:] = 0
                weight = nn.functional.pad(self.weight, (0, 0, 0, 0, 0, extra))
                return nn.functional.conv2d(padded, weight, self.bias, self.stride, self.padding)
        elif impl == "space_to_depth" and self.stride != (1, 1):
            return self._space_to_depth(x)
        return super().forward(x)

    def _space_to_depth(self, x: torch.Tensor) -> torch.Tensor:
        (sy, sx), (ky, kx), (py, px) = self.stride, self.kernel_size, self.padding
        n, c, h, w = x.shape
        blocks_y, blocks_x = -(-ky // sy), -(-kx // sx)  # the kernel, in blocks
        out_h, out_w = (h + 2 * py - ky) // sy + 1, (w + 2 * px - kx) // sx + 1
        rows, cols = (out_h + blocks_y - 1) * sy, (out_w + blocks_x - 1) * sx  # what the blocks cover
        x = nn.functional.pad(x.to(_compute_dtype(x)), (px, cols - w - px, py, rows - h - py))  # < 0: crop
        # (n, c, rows, cols) -> channels_last (n, c*sy*sx, rows/sy, cols/sx), channel (c, dy, dx): one copy
        x = x.permute(0, 2, 3, 1).reshape(n, rows // sy, sy, cols // sx, sx, c).permute(0, 1, 3, 5, 2, 4)
        x = x.reshape(n, rows // sy, cols // sx, c * sy * sx).permute(0, 3, 1, 2)
        weight = nn.functional.pad(self.weight, (0, blocks_x * sx - kx, 0, blocks_y * sy - ky))
        o = weight.shape[0]
        weight = weight.reshape(o, c, blocks_y, sy, blocks_x, sx).permute(0, 1, 3, 5, 2, 4)
        return nn.functional.conv2d(x, weight.reshape(o, c * sy * sx, blocks_y, blocks_x), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", impl={self.impl}"


def _ways(module: nn.Module) -> tuple[str, tuple[str, ...], str] | None:
    """(the attribute that says how `module` runs, the ways to time, the plainest of them: PyTorch's own
    ops) for a layer left at auto with a choice to make, else None."""
    if isinstance(module, TowerConv2d) and module.groups > 1 and module.impl == "auto":
        return "impl", TOWER_IMPLS, "native"
    if isinstance(module, FirstConv2d) and module.impl == "auto":
        return "impl", module.candidates(), "native"
    if isinstance(module, LocalResponseNorm) and (ways := module.candidates()):
        return "way", ways, "reference" if "reference" in ways else "after"
    return None


def choose_layer_impls(model: nn.Module, x: torch.Tensor, autocast=contextlib.nullcontext, repeats: int = 5,
                       timings: dict | None = None) -> dict[str, str]:
    """For each layer left at auto with ways to choose from (a grouped TowerConv2d: each of TOWER_IMPLS;
    FirstConv2d: its candidates(); a LocalResponseNorm: its candidates(), the pool inside its kernels
    or after them and, at lrn_impl=auto, the reference), time forward + backward of each way on the
    input the layer gets from `x`, and keep the fastest in the layer. For the towers, also time each
    direction (forward, input's gradient, weight's gradient) alone each of the DIRECTION_IMPLS ways, and
    where the fastest ways differ, that mix ("native/dense/dense") forward + backward too. Gradients are
    taken with autograd.grad, so no .grad is written and no DDP hook fires; conv1's input, the data,
    needs none. Returns {layer: way};
    fills `timings`, if given, with {layer: {"whole": {way: ms}, "directions": {direction: {way: ms}}}}
    (how close the races were; "directions" for the towers only), and "failed": {way: error} where a way
    raised (a kernel that does not compile for this card): that way is left out of the race, with a
    warning, and the run goes on with the fastest way that ran; only a layer with no way that runs
    raises."""
    layers = {name: (m, ways) for name, m in model.named_modules() if (ways := _ways(m))}
    if not layers:
        return {}
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0].detach()))
             for name, (m, _) in layers.items()]
    for layer, (attribute, _, plain) in layers.values():  # every way gives each layer the same input:
        setattr(layer, attribute, plain)                   # find it with the way least likely to fail
    try:
        with torch.no_grad(), autocast():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()

    def time_ways(ways, call_for_way):
        return _time_ways(ways, call_for_way, x.device, steps=repeats)

    chosen = {}
    for name, (layer, (attribute, ways, _)) in layers.items():
        towers = isinstance(layer, TowerConv2d)
        inp = inputs[name].requires_grad_(not isinstance(layer, FirstConv2d))  # an LRN has no weight
        wrt = [t for t in (inp, getattr(layer, "weight", None), getattr(layer, "bias", None))
               if t is not None and t.requires_grad]

        def step():
            with autocast():
                out = layer(inp)
            torch.autograd.grad(out, wrt, torch.ones_like(out))

        def way_step(way):  # the ways are timed in turn, so each call sets its own
            def call():
                setattr(layer, attribute, way)
                step()
            return call
        seconds, failed = time_ways(ways, way_step)
        if not seconds:
            raise RuntimeError(f"{name}: no way of running it worked: {failed}")
        setattr(layer, attribute, min(seconds, key=seconds.get))  # a way that runs, for the directions' output dtype
        directions = _time_directions(layer, inp, autocast, time_ways, failed) if towers else {}
        if directions:
            mix = "/".join(min(directions[d], key=directions[d].get) for d in DIRECTIONS)
            if len(set(mix.split("/"))) > 1:  # one way for all three is timed above already
                more_seconds, more_failed = time_ways([mix], way_step)
                seconds.update(more_seconds)
                failed.update(more_failed)
        for way, error in failed.items():
            warnings.warn(f"{name}: {attribute}={way} failed when timed and is left out: {error}")
        chosen[name] = min(seconds, key=seconds.get)
        setattr(layer, attribute, chosen[name])
        if timings is not None:
            timings[name] = {"whole": {way: round(1e3 * t, 4) for way, t in seconds.items()}}
            if directions:
                timings[name]["directions"] = {d: {how: round(1e3 * t, 4) for how, t in by_way.items()}
                                               for d, by_way in directions.items()}
            if failed:
                timings[name]["failed"] = failed
    return chosen


def _time_ways(ways, call_for_way, device: torch.device, steps: int, rounds: int = 3
               ) -> tuple[dict[str, float], dict[str, str]]:
    """({way: seconds per call} for each way whose call runs, {way: its error, first line} for each that
    raises). Each way is warmed up (cuDNN's search, Triton's compiling), then timed `steps` calls at a
    time in `rounds` rounds that take the ways in turn, and its median kept: a slow spell of the device
    (another process's kernels, a clock change) then costs one round of each way, which the median
    drops, instead of every run of the one way timed during it (on an H100, 2026-11-28, conv2's dense
    way once took 2.10 ms in its race against 1.50 in the others, and lost)."""
    calls, failed = {}, {}

    def failure(way, error):
        failed[way] = f"{type(error).__name__}: {first_line(error)}"[:300]
    for way in ways:
        try:
            calls[way] = call_for_way(way)
            for _ in range(2):
                calls[way]()
            synchronize(device)
        except Exception as error:  # noqa: BLE001 (any failure of one candidate: the race goes on without it)
            calls.pop(way, None)
            failure(way, error)
    times: dict[str, list[float]] = {way: [] for way in calls}
    for _ in range(rounds):
        for way in [w for w in calls if w not in failed]:
            try:
                times[way].append(seconds_per_call(calls[way], device, warmup=0, steps=steps, repeats=1))
            except Exception as error:  # noqa: BLE001
                failure(way, error)
    return {way: statistics.median(t) for way, t in times.items() if way not in failed}, failed


def _time_directions(layer: TowerConv2d, inp: torch.Tensor, autocast, time_ways,
                     failed: dict[str, str]) -> dict[str, dict[str, float]]:
    """Seconds of each direction of `layer` on `inp`, each way that runs, on the tensors it computes
    with (under autocast, the autocast dtype: that of the layer's output); the ways that raise go into
    `failed` as "direction:way"."""
    with torch.no_grad(), autocast():
        out = layer(inp)
    dtype = out.dtype
    x, weight = inp.detach().to(dtype), layer.weight.detach().to(dtype)
    bias = layer.bias.detach().to(dtype) if layer.bias is not None else None
    grad = torch.ones_like(out)
    seconds: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for direction in DIRECTIONS:
            seconds[direction], failed_here = time_ways(
                DIRECTION_IMPLS, lambda how: functools.partial(grouped_conv_direction, direction, how, x, weight,
                                                               layer.groups, layer.stride, layer.padding,
                                                               bias=bias, grad=grad))
            failed.update({f"{direction}:{how}": error for how, error in failed_here.items()})
            if not seconds[direction]:  # no way of this direction runs: no mix to try
                return {}
    return seconds


class AlexNet(nn.Module):
    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def init_weights(model: AlexNet, scheme: str) -> None:
    """Kaiming's gain is ReLU's whatever model.activation says, so that the relu claim's tanh net
    starts from the same weights and differs in its activation alone (with tanh's gain, 5/3 against
    the square root of 2, it also started from weights 15% smaller)."""
    named = [(name, m) for part in (model.features, model.classifier)
             for name, m in part.named_children() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, m in named:
        if scheme == "paper":
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.constant_(m.bias, 1.0 if name in PAPER_BIAS_ONE else 0.0)
        elif name == "fc8":
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
        else:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


def torchvision_state_dict_to_ours(tv_state: Mapping[str, torch.Tensor], model: AlexNet) -> dict:
    """Map `torchvision.models.alexnet().state_dict()` onto an `alexnet_tv` model, layer by layer
    in order (torchvision names them features.0, features.3, ..., classifier.6)."""
    ours = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    theirs = sorted({k.rsplit(".", 1)[0] for k in tv_state},
                    key=lambda k: (not k.startswith("features"), int(k.split(".")[1])))
    if len(ours) != len(theirs):
        raise ValueError(f"cannot map {len(theirs)} torchvision layers onto {len(ours)} layers")
    return {f"{o}.{p}": tv_state[f"{t}.{p}"] for o, t in zip(ours, theirs) for p in ("weight", "bias")}
