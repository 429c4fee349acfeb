"""The conv backward as generated kernels: grad_input through the transposed (or forward)
conv kernel, grad_weight through `wgrad_splitk` (passes/conv_backward.py).

Each case runs a training step compiled with backend="im2win" and compares every gradient
with float64 eager; the report must show the backward regions ran generated kernels, and the
profiler must see no `aten::convolution_backward` in the compiled backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import GRADIENTS, assert_close, float64_copy, rel_error

import convcompiler


def backward_regions(report) -> list:
    return [r for r in report if r.stage == "backward" and r.mode in GRADIENTS]


def train_step(model: nn.Module, x: torch.Tensor, *, lr: float = 0.1, profile: bool = True):
    """One SGD step, compiled, in float32 eager and in float64 eager; returns (float32
    eager copy, float64 eager copy, the op names the profiler saw in the compiled backward).
    With `profile`, the compiled step is taken twice and the second backward is profiled
    (the first compiles it, and the compile's fake runs call every op)."""
    eager, reference = float64_copy(model).float(), float64_copy(model)
    compiled = torch.compile(model, backend="im2win")
    gen = torch.Generator().manual_seed(0)
    if profile:
        compiled(x).sum().backward()
        model.zero_grad()
        convcompiler.counters.reset()
    out = compiled(x)
    grad = torch.randn(out.shape, generator=gen)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(grad)
    eager(x).backward(grad)
    reference(x.double()).backward(grad.double())
    for m in (model, eager, reference):
        torch.optim.SGD(m.parameters(), lr=lr).step()
    return eager, reference, {e.name for e in prof.events()} if profile else set()


def assert_params_match(model: nn.Module, eager: nn.Module, reference: nn.Module) -> None:
    """Gradients and updated parameters within max(1e-4, 2x float32 eager's error) of
    float64 eager (a deep net's first-layer gradient carries eager's own rounding)."""
    for (name, p), e, q in zip(model.named_parameters(), eager.parameters(), reference.parameters()):
        for what, ours, theirs, ref in (
            ("grad", p.grad, e.grad, q.grad),
            ("value after the step", p.detach(), e.detach(), q.detach()),
        ):
            err, eager_err = rel_error(ours, ref), rel_error(theirs, ref)
            assert err <= max(1e-4, 2 * eager_err), f"{what} of {name}: {err:.3g} ({eager_err:.3g})"


class Mixed(nn.Module):
    """Strides, padding, dilation, groups, a 1-D conv and a transposed conv, every gradient
    needed except the first layer's input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=3, bias=False)
        self.dw = nn.Conv2d(6, 6, 5, padding=2, groups=6)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.c1d = nn.Conv1d(4, 3, 3, stride=2)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y))
        y = self.up(self.dw(y) + y)
        return self.c1d(y.mean(2))


def test_every_gradient_runs_generated_kernels() -> None:
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(2, 3, 11, 13)
    eager, reference, ops = train_step(model, x)
    assert_params_match(model, eager, reference)
    report = convcompiler.last_report()
    grads = backward_regions(report)
    modes = sorted(r.mode for r in grads)
    # grad_input of every layer but the first (x needs none), grad_weight of all five
    assert modes == ["grad_input"] * 4 + ["grad_weight"] * 5, str(report)
    assert all(r.fallback_reason is None and r.kernel_path for r in grads), str(report)
    assert convcompiler.counters["launch.conv_wgrad"] == 5
    assert "aten::convolution_backward" not in ops


def test_grad_input_only_when_weights_are_frozen() -> None:
    torch.manual_seed(1)
    model = Mixed()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 11, 13, requires_grad=True)
    compiled = torch.compile(model, backend="im2win")
    compiled(x).square().sum().backward()
    xr = x.detach().double().requires_grad_()
    float64_copy(model)(xr).square().sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, "grad of x")
    grads = backward_regions(convcompiler.last_report())
    assert {r.mode for r in grads} == {"grad_input"} and len(grads) == 5
    assert convcompiler.counters["launch.conv_wgrad"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_sgd_step_matches_float64(name: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    eager, reference, _ = train_step(model, x, lr=0.01, profile=False)
    assert_params_match(model, eager, reference)
    grads = backward_regions(convcompiler.last_report())
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert sum(r.mode == "grad_weight" for r in grads) == convs
    assert sum(r.mode == "grad_input" for r in grads) == convs - 1  # not the image's
    assert all(r.fallback_reason is None for r in grads)
    assert convcompiler.counters["launch.conv_wgrad"] == convs
