"""The bench's breakdown of a step by operation class (model.tools.op_profile)."""

from __future__ import annotations

import pytest
import torch

from model.tools.op_profile import breakdown_table, op_breakdown, op_class


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("aten::mkldnn_convolution", "convolution"),
        ("aten::convolution_backward", "convolution"),
        ("aten::native_batch_norm_backward", "norm"),
        ("aten::native_layer_norm", "norm"),
        ("aten::addmm", "matrix product"),
        ("aten::grid_sampler_2d_backward", "sampling / gather"),
        ("aten::copy_", "copies / layout"),
        ("aten::_fused_adamw_", "optimizer"),
        ("aten::relu_", "elementwise"),
        ("aten::add", "elementwise"),
        ("autograd::engine::evaluate_function: ConvolutionBackward0", None),
    ],
)
def test_operators_fall_in_their_class(name, label):
    assert op_class(name) == label


def test_a_conv_bn_relu_step_is_mostly_convolution_and_norm():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU()
    )
    x = torch.randn(4, 16, 32, 32)

    def step():
        net(x).sum().backward()

    classes, wall_ms = op_breakdown(step, 2, torch.device("cpu"))
    assert classes["convolution"] > 0 and classes["norm"] > 0
    assert sum(classes.values()) <= wall_ms * 1.05  # self times: nothing counted twice
    table = breakdown_table(classes, wall_ms, "test")
    assert "| convolution |" in table and "| all operators |" in table
