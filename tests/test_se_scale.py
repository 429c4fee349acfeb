"""Squeeze-and-excitation around its expanded tensor, without extra passes over it:

- its scale as a prologue of the project conv: conv1x1(x * s), s [N, C, 1, 1], runs gemm_1x1
  reading x and s (spec.input_scale), so the scaled copy is never written;
- its pool from the depthwise conv's kernel: direct_depthwise also writes each tile's share
  of the channel means (spec.pool_sums), so the pool never reads the tensor again
(passes/match_conv.py, codegen/gemm_1x1.py, codegen/direct_depthwise.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from address_check import address_check
from helpers import FAST, assert_close, float64_copy, kernel_launches, lowered_ops, run_compiled
from torchvision.ops import SqueezeExcitation

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


# ---- the SE pool from the depthwise conv's kernel (spec.pool_sums) -------------------------
class MBConvTail(nn.Module):
    """EfficientNet's MBConv after the expand conv: depthwise -> BN -> SiLU -> SE (torchvision's
    SqueezeExcitation: adaptive pool, fc1, ReLU, fc2, sigmoid, scale) -> project -> BN."""

    def __init__(self, e: int = 40, k: int = 13) -> None:
        super().__init__()
        self.dw = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False)
        self.bn, self.act = nn.BatchNorm2d(e), nn.SiLU()
        self.se = SqueezeExcitation(e, 10)
        self.proj, self.bn2 = nn.Conv2d(e, k, 1, bias=False), nn.BatchNorm2d(k)
        for bn in (self.bn, self.bn2):
            with torch.no_grad():
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.proj(self.se(self.act(self.bn(self.dw(x))))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_depthwise_kernel_pools_for_squeeze_excitation(dtype, tmp_path) -> None:
    torch.manual_seed(3)
    model = MBConvTail().eval().to(dtype)
    x = torch.randn(2, 40, 9, 7).to(dtype)
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
    convcompiler.counters.reset()
    out, report = run_compiled(model, [x], options={**FAST, "debug_dir": str(tmp_path)})
    assert_close(out, ref, dtype)
    (dw,) = [r for r in report if " dw " in r.spec]
    assert dw.spec.endswith("+bn+silu +pool sums") and dw.schedule == "direct_depthwise"
    assert kernel_launches() == 4 and not report.fallbacks()
    ops = lowered_ops(tmp_path)
    assert ops["mean"] == 0 and ops["sum"] == 1, ops  # the pool sums the tiles' shares


def test_a_channels_last_depthwise_leaves_the_pool_to_inductor() -> None:
    """direct_depthwise's image tiles store an NCHW output only: a channels_last one keeps
    its pool outside, and the result is eager's."""
    model = MBConvTail().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 40, 9, 7).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
    out, report = run_compiled(model, [x], options=FAST)
    assert_close(out, ref, torch.float32)
    (dw,) = [r for r in report if " dw " in r.spec]
    assert "nhwc" in dw.spec and "+pool sums" not in dw.spec and dw.fallback_reason is None


def test_nan_in_one_image_pools_into_that_image_only() -> None:
    torch.manual_seed(4)
    model = MBConvTail().eval()
    x = torch.randn(2, 40, 9, 7)
    x[1, 5, 4, 4] = float("nan")
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
        out, report = run_compiled(model, [x], options=FAST)
    assert "+pool sums" in " ".join(r.spec for r in report)
    assert torch.equal(out.isnan(), ref.isnan()) and out[1].isnan().all()
    assert_close(out[0], ref[0], torch.float32)


def test_pooled_sums_with_a_dynamic_batch_and_option_blocks_off() -> None:
    torch.manual_seed(5)
    model = MBConvTail().eval()
    compiled = torch.compile(model, backend="im2win", options=FAST, dynamic=True)
    for n in (3, 1):
        x = torch.randn(n, 40, 11, 6)
        with torch.no_grad():
            assert_close(compiled(x), float64_copy(model)(x.double()), torch.float32)
    assert "+pool sums" in " ".join(r.spec for r in convcompiler.last_report())
    x = torch.randn(2, 40, 9, 7)
    out, report = run_compiled(model, [x], options={**FAST, "blocks": False})
    assert_close(out, float64_copy(model)(x.double()), torch.float32)
    assert "+pool sums" not in " ".join(r.spec for r in report)


def test_pooled_sums_addresses() -> None:
    """Every lane of the pooled sums' stores stays inside them (pixels and channels past the
    last, odd sizes); their sum is the output's mean."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 21, 7, 5, generator=gen)
    w = torch.randn(21, 1, 3, 3, generator=gen)
    spec = dataclasses.replace(conv_spec_of(x, w, padding=1, groups=21), pool_sums=True)
    schedule = SPACES["direct_depthwise"].make(spec, BLOCK_M=16, BLOCK_C=16, GROUP_M=8,
                                               M_TILES="image", num_warps=4, num_stages=1)
    launch = gpu_native.load_kernel(spec, schedule)
    pool = torch.full((3, 21, 1, 3), float("nan"))  # ceil(35 / 16) tiles; every one written
    with address_check() as check:
        y = launch(x, w, None, None, None, None, None, None, pool)
    ref = run_aten(spec, x.double(), w.double())
    assert_close(y, ref, torch.float32)
    assert_close(pool.sum(-1, keepdim=True), ref.mean((2, 3), keepdim=True), torch.float32)
    assert check.kernels == {"conv_depthwise_direct"} and check.accesses > 0
