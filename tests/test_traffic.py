"""The traffic model (alexlab.traffic) against byte counts worked out by hand from the shapes."""
import torch
from torch import nn

from alexlab.lrn import LocalResponseNorm
from alexlab.traffic import step_traffic, tensor_bytes


def test_each_op_reads_its_inputs_and_writes_its_outputs_once_and_views_move_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    counter = step_traffic(model, batch=4, input_size=10, channels_last=False, dtype=torch.float32)
    x, w, b, y = 4 * 3 * 10 * 10, 8 * 3 * 3 * 3, 8, 4 * 8 * 8 * 8  # elements: input, conv weight, bias, output
    fc_w, fc_b, logits = 5 * 512, 5, 4 * 5
    assert counter.by_op["convolution"] == 4 * (x + w + b + y)
    assert counter.by_op["convolution_bias_add"] == 4 * (y + b + y)  # cuDNN's output, then add_(bias) on it
    assert counter.by_op["relu"] == 4 * (y + y)
    assert counter.by_op["addmm"] == 4 * (fc_b + y + fc_w + logits)  # the flattened conv output is a view
    assert counter.by_op["threshold_backward"] == 4 * (y + y + y)  # gradient and output in, gradient out
    # the input needs no gradient: grad_output and input and weight in, weight and bias gradients out
    assert counter.by_op["convolution_backward"] == 4 * (y + x + w + w + b)
    assert "view" not in counter.by_op and "t" not in counter.by_op and "_unsafe_view" not in counter.by_op
    assert counter.total == sum(counter.by_op.values())


def test_a_convolution_without_bias_adds_no_bias_pass():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Flatten())
    counter = step_traffic(model, batch=2, input_size=10, dtype=torch.float32)
    assert counter.by_op["convolution"] > 0 and "convolution_bias_add" not in counter.by_op


def test_a_broadcast_tensor_counts_its_distinct_elements():
    bias = torch.empty(1, 8, 1, 1, device="meta", dtype=torch.bfloat16)
    assert tensor_bytes(bias.expand(256, 8, 55, 55)) == 8 * 2
    assert tensor_bytes(torch.empty(256, 8, 55, 55, device="meta").contiguous(memory_format=torch.channels_last)) \
        == 256 * 8 * 55 * 55 * 4


def test_the_fused_lrn_moves_what_its_kernels_read_and_write():
    """Forward: x in, output out; backward: x and the gradient in, dx out (alexlab.lrn_triton)."""
    model = nn.Sequential(nn.Conv2d(3, 96, 11, stride=4), LocalResponseNorm(impl="auto"), nn.Flatten())
    counter = step_traffic(model, batch=2, input_size=63, dtype=torch.bfloat16)
    activation = 2 * 96 * 14 * 14 * 2  # bytes of conv1's output at 63 px, bf16
    assert counter.by_op["lrn_forward_opaque"] == 2 * activation
    assert counter.by_op["lrn_backward_opaque"] == 3 * activation


def test_the_fused_lrn_with_its_pool_moves_what_its_kernels_read_and_write():
    """Forward: x in, the pooled output and the int8 positions of its maxima out; backward: x, the
    positions and the pooled gradient in, dx out. The LRN's full-size output never moves."""
    model = nn.Sequential(nn.Conv2d(3, 96, 11, stride=4), LocalResponseNorm(relu=True, pool=nn.MaxPool2d(3, 2)),
                          nn.Flatten())
    counter = step_traffic(model, batch=2, input_size=63, dtype=torch.bfloat16)
    activation = 2 * 96 * 14 * 14 * 2  # bytes of conv1's output at 63 px, bf16
    pooled = 2 * 96 * 6 * 6  # elements after the 3/2 pool: (14 - 3) // 2 + 1 = 6
    assert counter.by_op["lrn_pool_forward_opaque"] == activation + 2 * pooled + pooled
    assert counter.by_op["lrn_pool_backward_opaque"] == activation + pooled + 2 * pooled + activation
    assert "max_pool2d_with_indices" not in counter.by_op and "lrn_forward_opaque" not in counter.by_op
