"""The network against the paper's numbers, torchvision's AlexNet and PyTorch's LRN."""
import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from alexlab import build_model
from alexlab.errors import ConfigError
from alexlab.lrn import LocalResponseNorm, factor_percentiles
from alexlab.model import torchvision_state_dict_to_ours
from conftest import compose_cfg, model_cfg

PRESETS = ("alexnet", "alexnet_tv", "small")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_params(c_in, c_out, k, groups=1):
    return c_out * (c_in // groups) * k * k + c_out


def fc_params(n_in, n_out):
    return n_in * n_out + n_out


def test_paper_net_has_papers_parameter_count():
    assert n_params(build_model(model_cfg("alexnet"), 1000)) == 60_965_224


def test_paper_widths_without_groups_match_paper_count():
    # PAPER.md: "The same widths without groups: 62,378,344", i.e. towers=2 layout with groups=1.
    cfg = model_cfg("alexnet")
    for layer in cfg["conv"]:
        layer["grouped"] = False
    assert n_params(build_model(cfg, 1000)) == 62_378_344


def test_one_tower_net_count_from_the_footnote():
    # Footnote: half the kernels in conv1-conv4, conv5 and the fc layers unchanged; no groups.
    expected = (conv_params(3, 48, 11) + conv_params(48, 128, 5) + conv_params(128, 192, 3)
                + conv_params(192, 192, 3) + conv_params(192, 256, 3)
                + fc_params(6 * 6 * 256, 4096) + fc_params(4096, 4096) + fc_params(4096, 1000))
    model = build_model(model_cfg("alexnet", towers=1), 1000)
    assert n_params(model) == expected
    assert all(m.groups == 1 for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("pool_in_lrn", [False, True, "auto"])  # True, auto (the default): pool1 and pool2 are lrn1's, lrn2's
def test_output_size_after_each_layer(pool_in_lrn):
    model = build_model(model_cfg("alexnet", pool_in_lrn=pool_in_lrn), 1000).eval()
    if pool_in_lrn:
        want = "inside" if pool_in_lrn is True else "auto"
        assert model.features.lrn1.pool_impl == model.features.lrn2.pool_impl == want
    sizes = {}
    for name, module in model.features.named_children():
        module.register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, tuple(o.shape[1:])))
    model(torch.zeros(1, 3, 227, 227))
    # PAPER.md: 55 -> 27 -> 27 -> 13 -> 13 -> 13 -> 13 -> 6, with the paper's widths.
    assert sizes["conv1"] == (96, 55, 55)
    assert sizes["lrn1" if pool_in_lrn else "pool1"] == (96, 27, 27)
    assert ("pool1" in sizes) == ("pool2" in sizes) == (pool_in_lrn is False)
    assert sizes["conv2"] == (256, 27, 27)
    assert sizes["lrn2" if pool_in_lrn else "pool2"] == (256, 13, 13)
    assert sizes["conv3"] == (384, 13, 13)
    assert sizes["conv4"] == (384, 13, 13)
    assert sizes["conv5"] == (256, 13, 13)
    assert sizes["pool5"] == (256, 6, 6)
    conv = {n: m for n, m in model.features.named_children() if isinstance(m, nn.Conv2d)}
    assert [conv[n].groups for n in ("conv1", "conv2", "conv3", "conv4", "conv5")] == [1, 2, 1, 2, 2]


def test_torchvision_weights_give_torchvision_logits():
    torch.manual_seed(0)
    reference = torchvision.models.alexnet(weights=None).eval()
    ours = build_model(model_cfg("alexnet_tv"), 1000).eval()
    ours.load_state_dict(torchvision_state_dict_to_ours(reference.state_dict(), ours))
    assert n_params(ours) == n_params(reference) == 61_100_840
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


def lrn_numpy(a: np.ndarray, n: int, coefficient: float, beta: float, k: float) -> np.ndarray:
    """b_i = a_i / (k + coefficient * sum_{j=i-n/2}^{i+n/2} a_j^2)^beta, channels clipped at the edges."""
    out = np.empty_like(a)
    channels = a.shape[1]
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        out[:, i] = a[:, i] / (k + coefficient * (a[:, lo:hi + 1] ** 2).sum(1)) ** beta
    return out


@pytest.mark.parametrize("mode,torch_alpha,coefficient", [("per_size", 1e-4, 1e-4 / 5), ("literal", 5e-4, 1e-4)])
def test_lrn_matches_pytorch_and_the_formula(mode, torch_alpha, coefficient):
    torch.manual_seed(0)
    x = torch.rand(2, 12, 5, 5, dtype=torch.float64) * 40  # large enough for the sum to matter
    ours = LocalResponseNorm(5, 1e-4, 0.75, 2.0, alpha_mode=mode)(x)
    torch.testing.assert_close(ours, nn.LocalResponseNorm(5, torch_alpha, 0.75, 2.0)(x))
    np.testing.assert_allclose(ours.numpy(), lrn_numpy(x.numpy(), 5, coefficient, 0.75, 2.0), rtol=1e-12)


def test_lrn_modes_differ_and_are_built_from_config():
    literal = build_model(model_cfg("alexnet", lrn_alpha="literal"), 10)
    lrns = [m for m in literal.modules() if isinstance(m, LocalResponseNorm)]
    assert len(lrns) == 2 and all(m.alpha_mode == "literal" for m in lrns)
    x = torch.rand(1, 96, 4, 4) * 50
    assert not torch.allclose(lrns[0](x), LocalResponseNorm(alpha_mode="per_size")(x))


def modules_of(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("preset", PRESETS)
def test_each_switch_changes_the_network(preset):
    base = build_model(model_cfg(preset, lrn=True), 10)
    assert len(modules_of(base, LocalResponseNorm)) == 2
    assert len(modules_of(build_model(model_cfg(preset, lrn=False), 10), LocalResponseNorm)) == 0

    pools = {m.kernel_size for m in modules_of(build_model(model_cfg(preset, overlap_pool=False), 10), nn.MaxPool2d)}
    assert pools == {2}
    assert {m.kernel_size for m in modules_of(base, nn.MaxPool2d)} == {3}

    assert len(modules_of(build_model(model_cfg(preset, dropout=0.0), 10), nn.Dropout)) == 0
    assert [m.p for m in modules_of(build_model(model_cfg(preset, dropout=0.3), 10), nn.Dropout)] == [0.3, 0.3]

    tanh = build_model(model_cfg(preset, activation="tanh"), 10)
    assert len(modules_of(tanh, nn.ReLU)) == 0 and len(modules_of(tanh, nn.Tanh)) == 7

    one = build_model(model_cfg(preset, towers=1), 10)
    two = build_model(model_cfg(preset, towers=2), 10)
    widths_one = [m.out_channels for m in modules_of(one, nn.Conv2d)]
    widths_two = [m.out_channels for m in modules_of(two, nn.Conv2d)]
    assert widths_one[:4] == [w // 2 for w in widths_two[:4]] and widths_one[4] == widths_two[4]
    assert all(m.groups == 1 for m in modules_of(one, nn.Conv2d))

    removed = build_model(model_cfg(preset, remove=["conv3", "fc7"]), 10)
    names = dict(removed.named_modules())
    assert "features.conv3" not in names and "classifier.fc7" not in names
    assert names["features.conv4"].in_channels == names["features.conv2"].out_channels
    assert names["classifier.fc8"].in_features == names["classifier.fc6"].out_features

    for model in (base, one, removed, tanh):
        size = model_cfg(preset)["input_size"]
        assert model.eval()(torch.zeros(2, 3, size, size)).shape == (2, 10)


@pytest.mark.parametrize("data,in_pixel_units,activation,coefficient", [
    ("imagenet", True, "relu", 1e-4 / 5),                        # raw pixels: PAPER.md's constants as they are
    ("fashion_mnist", True, "relu", 1e-4 / 5 * (255 / 3) ** 2),  # inputs at 3/255 of raw pixels
    ("cifar10", True, "relu", 1e-4 / 5 * (255 / 4) ** 2),
    ("fashion_mnist", False, "relu", 1e-4 / 5),
    ("fashion_mnist", True, "tanh", 1e-4 / 5)])  # tanh's outputs are bounded, not in the inputs' units
def test_lrn_alpha_follows_the_data_presets_pixel_scale(data, in_pixel_units, activation, coefficient):
    cfg = compose_cfg("model=small", f"data={data}", f"model.lrn_in_pixel_units={str(in_pixel_units).lower()}",
                      f"model.activation={activation}")
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), 10)
    lrns = [m for m in model.modules() if isinstance(m, LocalResponseNorm)]
    assert len(lrns) == 2 and all(m.coefficient == pytest.approx(coefficient, rel=1e-12) for m in lrns)


def test_lrn_in_pixel_units_normalises_scaled_inputs_as_raw_pixels():
    """The reason for the alpha scaling: with zero biases, conv1 then its LRN on inputs at scale/255 of
    raw pixels must give scale/255 times what the paper's alpha gives on the raw pixels, so the LRN
    does the same normalisation (at the paper's alpha on the scaled inputs, it is a near-constant)."""
    torch.manual_seed(0)
    raw = torch.rand(4, 1, 27, 27, dtype=torch.float64) * 255 - 128
    outputs, weights = {}, None
    for pixel_scale in (255.0, 3.0):
        model = build_model(model_cfg("small", channels=1, input_pixel_scale=pixel_scale), 10).double()
        weights = weights or model.state_dict()
        model.load_state_dict(weights)  # the same net, but for its LRN's alpha
        model.features.conv1.bias.data.zero_()
        layers = list(model.features.children())
        conv1, lrn1 = layers[0], layers[1]
        assert isinstance(lrn1, LocalResponseNorm)
        lrn1.pool = None  # the factor, elementwise
        outputs[pixel_scale] = lrn1(conv1(raw * pixel_scale / 255))
    torch.testing.assert_close(outputs[3.0], outputs[255.0] * 3 / 255)
    factor = outputs[255.0] / torch.relu(layers[0](raw)).clamp_min(1e-9)  # far from constant here
    assert factor[outputs[255.0] > 0].min() < 0.9 * 2 ** -0.75


@pytest.mark.parametrize("in_pixel_units", [False, True])
def test_lrn_factor_percentiles_tell_a_constant_scale_from_a_normalisation(in_pixel_units):
    """The small net on unit-variance inputs (data.pixel_scale=3's): at the paper's alpha as given, each
    LRN multiplies nearly every activation by k^-beta = 2^-0.75; in pixel units it normalises."""
    torch.manual_seed(0)
    model = build_model(model_cfg("small", channels=1, input_pixel_scale=3.0, lrn_in_pixel_units=in_pixel_units), 10).eval()
    x = torch.randn(64, 1, 27, 27)
    with torch.no_grad():
        factors = factor_percentiles(model, lambda: model(x))
    assert sorted(factors) == [f"lrn{n}_factor_{p}" for n in (1, 2) for p in ("p01", "p50", "p99")]
    for n in (1, 2):
        p01, p50, p99 = (factors[f"lrn{n}_factor_{p}"] for p in ("p01", "p50", "p99"))
        assert p01 <= p50 <= p99 <= 2 ** -0.75 + 1e-6
        if in_pixel_units:
            assert p01 < 0.9 * 2 ** -0.75
        else:
            assert p01 > 0.995 * 2 ** -0.75


@pytest.mark.parametrize("preset", ["alexnet", "small"])
def test_the_relu_and_pool_inside_the_lrn_are_relu_then_pytorchs_lrn_then_max_pool(preset):
    """conv1's and conv2's ReLU runs inside their LRN module (relu=True, one pass over memory), and
    so does the max-pool after it (pool): the net must compute what ReLU, nn.LocalResponseNorm and
    nn.MaxPool2d in a row compute, forward and backward."""
    torch.manual_seed(0)
    ours = build_model(model_cfg(preset), 10)
    assert len(modules_of(ours, nn.ReLU)) == 5  # conv3, conv4, conv5, fc6, fc7; conv1's and conv2's are in the LRNs
    oracle = build_model(model_cfg(preset), 10)
    oracle.load_state_dict(ours.state_dict())
    for name, module in list(oracle.features.named_children()):
        if isinstance(module, LocalResponseNorm):
            assert module.relu
            torch_alpha = module.coefficient * module.size  # PyTorch divides alpha by size
            assert module.pool is not None and module.pool.kernel_size == 3  # the paper's overlapping pool
            setattr(oracle.features, name, nn.Sequential(nn.ReLU(), nn.LocalResponseNorm(
                module.size, torch_alpha, module.beta, module.k), nn.MaxPool2d(3, stride=2)))
    size = model_cfg(preset)["input_size"]
    # float64: float32's rounding differences between the two LRNs flip max-pooling's near ties
    ours, oracle = ours.double().eval(), oracle.double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    out, expected = ours(x), oracle(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_removing_layers_keeps_the_spatial_size_and_adapts_widths():
    model = build_model(model_cfg("alexnet", remove=["conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]), 10)
    convs = modules_of(model, nn.Conv2d)
    assert len(convs) == 1
    assert model.classifier.fc8.in_features == 96 * 6 * 6  # conv1's maps after three pools


@pytest.mark.parametrize("bad,message", [
    ({"towers": 3}, "model.towers must be 1 or 2"),
    ({"towers": True}, "model.towers must be 1 or 2, got True"),  # true == 1 built the one-tower net
    ({"activation": ["relu"]}, "model.activation must be one of"),  # TypeError: unhashable
    ({"remove": 3}, r"model.remove must be a list such as \[conv3\], got 3"),  # TypeError: not iterable
    ({"remove": {"conv3": 1}}, r"model.remove must be a list such as \[conv3\]"),  # built as [conv3]
    ({"remove": ["conv1"]}, "conv1 cannot be removed"),
    ({"remove": ["fc8"]}, "fc8 cannot be removed"),
    ({"remove": ["conv3", "fc7", "conv3"]}, "model.remove names conv3 more than once"),
    ({"remove": ["conv9"]}, "unknown layer 'conv9'"),
    ({"activation": "sigmoid"}, "model.activation"),
    ({"lrn_alpha": "half"}, "model.lrn_alpha"),
    ({"lrn_in_pixel_units": "yes"}, "model.lrn_in_pixel_units must be true or false, got 'yes'"),
    ({"input_pixel_scale": 0}, "model.input_pixel_scale must be a positive number, got 0"),
    ({"dropout": 1.5}, "model.dropout"),
    ({"grouped_conv": "fast"}, "model.grouped_conv must be one of"),
    ({"grouped_conv": "native/dense"}, "forward/input_grad/weight_grad"),  # a way for each of three
    ({"grouped_conv": "native/dense/native_nchw"}, "forward/input_grad/weight_grad"),
    ({"conv1_impl": "dense"}, "model.conv1_impl must be one of"),
    ({"lrn": "yes"}, "model.lrn must be true or false, got 'yes'"),
    ({"overlap_pool": 1}, "model.overlap_pool must be true or false, got 1"),
    ({"dropout_before_fc": "maybe"}, "model.dropout_before_fc must be true or false, got 'maybe'"),
    ({"pool_in_lrn": "inside"}, "model.pool_in_lrn must be auto, true or false, got 'inside'"),
    ({"pool_in_lrn": 1}, "model.pool_in_lrn must be auto, true or false, got 1"),
    # each of these built a net that trained (a width-0 fc6: nothing learned; fc=[10]: no fc7) or failed in torch
    ({"fc": [0, 10]}, r"model.fc \(fc6\) must be a positive integer, got 0"),
    ({"fc": [10]}, r"model.fc must give the widths of fc6 and fc7, as \[4096, 4096\]"),
    ({"fc": "abc"}, "model.fc must give the widths of fc6 and fc7"),
    ({"in_channels": 0}, "model.in_channels must be a positive integer, got 0"),
    ({"conv": []}, r"model.conv must list the conv layers \(at least conv1\), got \[\]"),
    ({"adaptive_pool": "abc"}, r"model.adaptive_pool must be a positive integer or null \(none\), got 'abc'"),
])
def test_bad_model_config_is_refused_clearly(bad, message):
    with pytest.raises(ConfigError, match=message):
        build_model(model_cfg("alexnet", **bad), 10)


def test_paper_init():
    model = build_model(model_cfg("alexnet"), 1000)
    named = dict(model.named_modules())
    for name in ("features.conv2", "features.conv4", "features.conv5", "classifier.fc6", "classifier.fc7"):
        assert torch.all(named[name].bias == 1)
    for name in ("features.conv1", "features.conv3", "classifier.fc8"):
        assert torch.all(named[name].bias == 0)
    assert abs(named["classifier.fc6"].weight.std().item() - 0.01) < 1e-4


@pytest.mark.parametrize("preset", PRESETS)
def test_the_tanh_net_starts_from_the_relu_nets_weights(preset):
    """The relu claim switches the activation and nothing else: with model.init=kaiming the tanh net
    once took tanh's gain (5/3 against the square root of 2), so its weights started smaller too."""
    state = {}
    for activation in ("relu", "tanh"):
        torch.manual_seed(0)
        state[activation] = build_model(model_cfg(preset, activation=activation), 10).state_dict()
    assert state["relu"].keys() == state["tanh"].keys()
    assert all(torch.equal(state["relu"][k], state["tanh"][k]) for k in state["relu"])


@pytest.mark.parametrize("channels, size, beta", [(9, 5, 0.75), (2, 5, 0.75), (1, 3, 0.75), (6, 4, 0.5), (3, 7, 0.6)])
def test_lrn_output_and_gradient_match_pytorch_lrn(channels, size, beta):
    """Windows wider than the channels and even windows too (2 before, 1 after for size 4)."""
    torch.manual_seed(1)
    x = (torch.rand(2, channels, 3, 4, dtype=torch.float64) * 30).requires_grad_()
    grad = torch.randn(2, channels, 3, 4, dtype=torch.float64)
    ours = x.detach().clone().requires_grad_()
    y = LocalResponseNorm(size, 0.1, beta, 2.0, impl="reference")(ours)
    torch.testing.assert_close(y, nn.LocalResponseNorm(size, 0.1, beta, 2.0)(x))
    y.backward(grad)
    nn.LocalResponseNorm(size, 0.1, beta, 2.0)(x).backward(grad)
    torch.testing.assert_close(ours.grad, x.grad)


def test_lrn_gradcheck():
    torch.manual_seed(1)
    x = (torch.rand(1, 6, 2, 2, dtype=torch.float64) * 30).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: LocalResponseNorm(5, 1e-4, 0.75, 2.0, "literal")(t), (x,))
