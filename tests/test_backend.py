"""torch.compile(model, backend="im2win") end to end on small models."""

from __future__ import annotations

import torch
import torch.nn as nn
from helpers import assert_close, check_model, float64_copy, run_compiled

import convcompiler


def small_cnn(channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 5, stride=2, padding=2),  # stem
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise
        nn.Conv2d(16, 24, 1),  # pointwise
        nn.ReLU(),
        nn.Conv2d(24, 30, 3, stride=2, padding=1, groups=3, bias=False),  # grouped
        nn.ReLU(),
        nn.Conv2d(30, 10, 3, padding=2, dilation=2),  # dilated
    ).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def test_small_cnn_fp32() -> None:
    x = torch.randn(2, 3, 33, 27)
    report = check_model(small_cnn(), [x], expect_kernels=5)
    assert {r.kind for r in report} == {"conv"}
    assert all(r.stage == "inference" for r in report)


def test_channels_last_model_keeps_channels_last() -> None:
    model = small_cnn(channels_last=True)
    x = torch.randn(2, 3, 33, 27).to(memory_format=torch.channels_last)
    check_model(model, [x], expect_kernels=5)
    out, _ = run_compiled(model, [x])
    with torch.no_grad():
        assert out.stride() == model(x).stride()


def test_half_precision_models() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        torch._dynamo.reset()
        model = small_cnn().to(dtype)
        x = torch.randn(1, 3, 29, 31).to(dtype)
        check_model(model, [x], expect_kernels=5)


def test_conv1d_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(4, 8, 5, padding=2), nn.GELU(), nn.Conv1d(8, 6, 3, stride=2, dilation=2)
    ).eval()
    check_model(model, [torch.randn(3, 4, 45)], expect_kernels=2)


def test_training_gradients_match_eager() -> None:
    """Forward and backward run the generated kernels; every gradient matches float64
    eager."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, stride=2, groups=2),
        nn.SiLU(),
        nn.Conv2d(8, 6, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )
    reference = float64_copy(model)
    x = torch.randn(2, 3, 15, 13)
    xc = x.clone().requires_grad_()
    xr = x.double().requires_grad_()
    compiled = torch.compile(model, backend="im2win")
    loss = compiled(xc).square().sum()
    loss.backward()
    reference(xr).square().sum().backward()
    # forward: 3 convs; backward: grad_input of each (the input needs one here) as a conv
    # region, and grad_weight of each as a conv_wgrad region
    assert convcompiler.counters["launch.conv"] == 6
    assert convcompiler.counters["launch.conv_wgrad"] == 3
    report = convcompiler.last_report()
    stages = [(r.stage, r.mode) for r in report.kernels()]
    assert stages.count(("forward", None)) == 3, stages
    assert stages.count(("backward", "grad_input")) == 3, stages
    assert stages.count(("backward", "grad_weight")) == 3, stages
    assert_close(xc.grad, xr.grad, torch.float32, "input grad")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"grad of {name}")


def test_batch_size_change_recompiles_or_goes_symbolic() -> None:
    model = small_cnn()
    compiled = torch.compile(model, backend="im2win")
    reference = float64_copy(model)
    with torch.no_grad():
        for n in (2, 3, 5):
            x = torch.randn(n, 3, 21, 19)
            assert_close(compiled(x), reference(x.double()), torch.float32, f"batch {n}")
    assert convcompiler.counters["launch.conv"] == 3 * 5


def test_dynamic_batch_is_symbolic_in_the_report() -> None:
    model = small_cnn()
    compiled = torch.compile(model, backend="im2win", dynamic=True)
    reference = float64_copy(model)
    with torch.no_grad():
        for n in (2, 4):
            x = torch.randn(n, 3, 21, 19)
            assert_close(compiled(x), reference(x.double()), torch.float32, f"batch {n}")
    report = convcompiler.last_report()
    assert len(report.kernels()) == 5
    assert report[0].spec.startswith("[s"), report[0].spec


def test_unmatched_ops_stay_aten_without_graph_break() -> None:
    torch.manual_seed(0)

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            y = self.conv(x).permute(0, 2, 3, 1)
            return torch.softmax(self.norm(y), dim=-1).sum(dim=(1, 2))

    dynamo_counters = torch._dynamo.utils.counters
    dynamo_counters.clear()
    check_model(Mixed().eval(), [torch.randn(2, 3, 9, 8)], expect_kernels=1)
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    assert not dynamo_counters["graph_break"]
