"""Cheap stems are recomputed in the backward instead of saved (passes/recompute.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import FAST, GRADIENTS, assert_close, float64_copy
from test_conv_bn import randomize_bn

import convcompiler
from convcompiler.bench.transfer import saved_bytes


def small_cnn() -> nn.Module:
    """A stem (5x5, 3 -> 8 channels: 75 MACs per output) + relu + max-pool, then a block."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    return randomize_bn(net).eval()


def compile_and_step(model: nn.Module, x: torch.Tensor, **options) -> int:
    compiled = torch.compile(model, backend="im2win", options={**FAST, **options})
    return saved_bytes(lambda: compiled(x).square().sum().backward())


def test_stem_is_recomputed_and_gradients_match_eager() -> None:
    model = small_cnn()
    reference = float64_copy(model)
    x = torch.randn(2, 3, 37, 41)
    compile_and_step(model, x)
    report = convcompiler.last_report()
    (line,) = report.recomputed
    assert "5x5 3->8 + relu + max_pool2d (75 MACs per output)" in line, line
    (stem,) = [r for r in report if r.stage == "backward" and r.mode not in GRADIENTS]
    assert stem.kind == "conv_bn" and stem.mode == "tune" and stem.fallback_reason is None
    assert "recompute: convolution 5x5" in str(report)
    # forward: 2 conv_bn kernels; backward: the stem again
    assert convcompiler.counters["launch.conv_bn"] == 3
    reference(x.double()).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"grad of {name}")


def test_recompute_saves_the_stem_outputs_and_can_be_turned_off() -> None:
    model = small_cnn()
    x = torch.randn(2, 3, 64, 64)
    recomputed = compile_and_step(model, x, cpu="aten")
    assert len(convcompiler.last_report().recomputed) == 1
    torch._dynamo.reset()
    saved = compile_and_step(model, x, cpu="aten", recompute_conv_macs=0)
    assert convcompiler.last_report().recomputed == []
    # Inductor's partitioner already recomputes the relu and the pool's values from what it
    # saves; with the stem recomputed it no longer saves the max-pool indices (int64
    # [2,8,16,16]) either, at the cost of the stem BN's bias (8 floats) for the folded bias
    assert saved - recomputed >= 2 * 8 * 16 * 16 * 8 - 8 * 4, (saved, recomputed)


def test_expensive_first_conv_is_saved_not_recomputed() -> None:
    model = small_cnn()
    compile_and_step(model, torch.randn(2, 3, 32, 32), cpu="aten", recompute_conv_macs=74)
    report = convcompiler.last_report()
    assert report.recomputed == [] and all(r.stage == "forward" for r in report)


def test_frozen_stem_weight_is_not_recomputed() -> None:
    """With the stem's weight frozen the backward does not keep the image, so recomputing
    the stem would make it save more, not less."""
    model = small_cnn()
    for p in list(model[0].parameters()) + list(model[1].parameters()):
        p.requires_grad_(False)
    compile_and_step(model, torch.randn(2, 3, 32, 32), cpu="aten")
    assert convcompiler.last_report().recomputed == []


def test_bad_option_value() -> None:
    with pytest.raises(ValueError, match="recompute_conv_macs"):
        convcompiler.Config.from_options({"recompute_conv_macs": -1})


@pytest.mark.slow
def test_tune_mode_resnet50_saves_at_most_half_of_eager_at_224() -> None:
    """Issue 6, acceptance 3: batch 8, 3x224x224, parameters included, by unique storage.
    cpu='aten' (the saved tensors are decided by the graph, not by the kernels). Counted over
    the forward, which saves them: no backward runs, so none is compiled."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(8, 3, 224, 224)
    eager = saved_bytes(lambda: model(x).square().mean())
    compiled = torch.compile(model, backend="im2win", options={"cpu": "aten"})
    compiled(x)  # compile the forward outside the measurement
    ours = saved_bytes(lambda: compiled(x).square().mean())
    assert ours <= 0.5 * eager, (ours / 2**20, eager / 2**20)
