"""On CPU tensors the default runs what is fast (the host compiler's code for the regions);
CONVCOMPILER_CPU=interpret, which this suite sets, runs the generated kernels."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from helpers import assert_close, float64_copy

import convcompiler
from convcompiler.frontend import backend


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 1)
    ).eval()
    for p in model.parameters():
        nn.init.normal_(p, 0.0, 0.5)
    return model


def test_cpu_default_runs_the_host_compiler_not_the_interpreter(monkeypatch, caplog) -> None:
    monkeypatch.delenv("CONVCOMPILER_CPU", raising=False)
    monkeypatch.setattr(backend, "_cpu_notice_given", False)
    model, x = _model(), torch.randn(2, 3, 13, 11)
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
        with caplog.at_level(logging.INFO, logger="convcompiler"):
            compiled = torch.compile(model, backend="im2win")
            out = compiled(x)
            torch._dynamo.reset()
            torch.compile(model, backend="im2win")(x)
    assert_close(out, ref, torch.float32)
    assert not [k for k, n in convcompiler.counters.items() if k.startswith("launch.") and n]
    report = convcompiler.last_report()
    assert report.regions and all("cpu='aten'" in r.fallback_reason for r in report)
    notices = [r for r in caplog.records if "generated kernels target GPUs" in r.getMessage()]
    assert len(notices) == 1


def test_environment_interpret_runs_the_generated_kernels(monkeypatch) -> None:
    monkeypatch.setenv("CONVCOMPILER_CPU", "interpret")
    model, x = _model(), torch.randn(2, 3, 13, 11)
    with torch.no_grad():
        out = torch.compile(model, backend="im2win")(x)
        ref = float64_copy(model)(x.double())
    assert_close(out, ref, torch.float32)
    assert convcompiler.counters["launch.conv_bn"] + convcompiler.counters["launch.conv"] == 2
    assert all(r.kernel_path is not None for r in convcompiler.last_report())
