"""Squeeze-and-excitation's scale as a prologue of the project conv: conv1x1(x * s), s
[N, C, 1, 1], runs gemm_1x1 reading x and s (spec.input_scale), so the scaled copy of the
expanded tensor is never written (passes/match_conv.py, codegen/gemm_1x1.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from address_check import address_check
from helpers import FAST, assert_close, float64_copy, kernel_launches, lowered_ops, run_compiled

import convcompiler
from convcompiler.bench import gpu_native
from convcompiler.codegen import SPACES
from convcompiler.frontend.kernels import conv_spec_of
from convcompiler.runtime.reference import run_aten


class SqueezeExcite(nn.Module):
    """EfficientNet's SE and project conv: bn(proj(x * sigmoid(fc2(relu(fc1(mean(x)))))))."""

    def __init__(self, c: int = 24, k: int = 11) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 6, 1), nn.Conv2d(6, c, 1)
        self.proj, self.bn = nn.Conv2d(c, k, 1, bias=False), nn.BatchNorm2d(k)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.bn(self.proj(x * scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_project_conv_scales_its_input_as_it_loads_it(dtype, tmp_path) -> None:
    torch.manual_seed(0)
    model = SqueezeExcite().eval().to(dtype)
    x = torch.randn(2, 24, 5, 7).to(dtype)
    if dtype == torch.float16:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
    convcompiler.counters.reset()
    out, report = run_compiled(model, [x], options={**FAST, "debug_dir": str(tmp_path)})
    assert_close(out, ref, dtype)
    (project,) = [r for r in report if r.kind == "conv_bn"]
    assert "1x1 x*scale[n,c]" in project.spec and project.schedule == "gemm_1x1", str(report)
    assert kernel_launches() == 3  # fc1, fc2 and the project conv
    assert lowered_ops(tmp_path)["mul"] == 0  # no x * s anywhere


def test_an_empty_batch_is_eager_s_empty_result() -> None:
    model = SqueezeExcite().eval()
    x = torch.randn(0, 24, 5, 7)
    with torch.no_grad():
        out, report = run_compiled(model, [x], options=FAST)
    assert out.shape == (0, 11, 5, 7)
    (project,) = [r for r in report if r.spec.startswith("[0,24,5,7]")]
    assert project.fallback_reason.startswith("zero-size"), project.fallback_reason


def test_nan_in_the_scale_reaches_only_its_image() -> None:
    torch.manual_seed(1)
    model = SqueezeExcite().eval()
    x = torch.randn(2, 24, 5, 7)
    x[1, 3, 2, 2] = float("nan")  # image 1's mean, so its scale, so all of its outputs
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
        out, _ = run_compiled(model, [x], options=FAST)
    assert torch.equal(out.isnan(), ref.isnan()) and out[1].isnan().all()
    assert_close(out[0], ref[0], torch.float32)


@pytest.mark.parametrize("tiling", ["image", "batch"])
def test_input_scale_addresses(tiling) -> None:
    """Every lane of the scale's loads stays inside s, in image and batch tiles, with rows
    and channels past the last (odd sizes)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 21, 5, 3, generator=gen)
    if tiling == "batch":
        x = x.to(memory_format=torch.channels_last)
    w, s = torch.randn(13, 21, 1, 1, generator=gen), torch.rand(3, 21, 1, 1, generator=gen)
    spec = conv_spec_of(x, w)
    spec = dataclasses.replace(spec, input_scale=True)
    schedule = SPACES["gemm_1x1"].make(spec, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8,
                                       M_TILES=tiling, num_warps=4, num_stages=2)
    launch = gpu_native.load_kernel(spec, schedule)
    with address_check() as check:
        y = launch(x, w, None, None, None, None, None, None, None, s)
    assert_close(y, run_aten(spec, x.double(), w.double(), x_scale=s.double()), torch.float32)
    assert check.kernels == {"conv_gemm_1x1"} and check.accesses > 0
