"""The inverted residual's tail in one kernel (issue 22's family 3): a depthwise conv, its BN
and activation, and the 1x1 project conv that alone reads them (MobileNetV2/V3,
EfficientNet, MnasNet). dw_gemm computes the depthwise conv's output as its GEMM's operand
tiles (spec.prologue.dw), so that output is never written; the depthwise conv gets no region
of its own. The cost model makes the call (selection/fusion.py) and the report says why.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from address_check import address_check
from helpers import (
    FAST,
    assert_close,
    compiled_and_float64,
    float64_copy,
    gradients_match_float64,
    kernel_launches,
    run_compiled,
)

import convcompiler
from convcompiler.bench import gpu_native
from convcompiler.codegen import SPACES
from convcompiler.frontend.kernels import conv_spec_of
from convcompiler.runtime.reference import run_aten
from convcompiler.spec import (
    Activation,
    Depthwise,
    Prologue,
    SpecError,
    spec_from_json,
    spec_to_json,
)

DW = "dw3x3"  # how the report's spec shows the prologue, e.g. "dw3x3s2x2+bn+hardswish(x)"


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


class InvertedResidual(nn.Module):
    """expand 1x1 -> BN -> act -> depthwise kxk -> BN -> act -> project 1x1 -> BN [+ x]."""

    def __init__(self, c: int = 13, hidden: int = 39, co: int | None = None, k: int = 3,
                 stride: int = 1, act: type = nn.Hardswish, dw_bias: bool = False) -> None:
        super().__init__()
        co = co or c
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), _bn(hidden), act())
        self.dw = nn.Sequential(
            nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden, bias=dw_bias),
            _bn(hidden), act())
        self.project = nn.Sequential(nn.Conv2d(hidden, co, 1, bias=False), _bn(co))
        self.residual = stride == 1 and co == c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


def _input(n: int = 2, dtype: torch.dtype = torch.float32, c: int = 13) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(n, c, 11, 9, generator=gen).to(dtype)


def _fused(report) -> object:
    """The one region whose spec shows a depthwise prologue."""
    (region,) = [r for r in report if "(x)" in r.spec and "dw" in r.spec]
    return region


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_bn_act_runs_inside_the_project_conv(dtype, stride) -> None:
    torch.manual_seed(0)
    model = InvertedResidual(stride=stride).eval().to(dtype)
    x = _input(dtype=dtype)
    if dtype == torch.float16:
        x = x.to(memory_format=torch.channels_last)
    out, ref, report = compiled_and_float64(model, [x])
    assert_close(out, ref, dtype)
    fused = _fused(report)
    assert fused.schedule == "dw_gemm" and fused.fallback_reason is None, str(report)
    name = "dw3x3" + ("s2x2" if stride == 2 else "") + "+bn+hardswish(x)"
    assert name in fused.spec and ("+bn+add" in fused.spec) == (stride == 1), fused.spec
    assert "its depthwise conv's output stays on chip: fused dw_gemm" in fused.why, fused.why
    assert len(report.kernels()) == 2 and not report.fallbacks(), str(report)
    assert kernel_launches() == 2  # the expand conv and the fused one
    assert convcompiler.counters["match.dw_prologue"] == 1


@pytest.mark.parametrize("act, k", [(nn.ReLU6, 5), (nn.SiLU, 3)])
def test_other_kernels_activations_and_a_depthwise_bias(act, k) -> None:
    """MobileNetV2's ReLU6 (hardtanh), EfficientNet's SiLU, a 5x5 kernel with a bias, and a
    wider output than input (no residual)."""
    torch.manual_seed(1)
    model = InvertedResidual(co=17, k=k, act=act, dw_bias=True).eval()
    out, ref, report = compiled_and_float64(model, [_input()])
    assert_close(out, ref, torch.float32)
    assert f"dw{k}x{k}" in _fused(report).spec and kernel_launches() == 2, str(report)


def test_nan_and_inf_reach_only_their_windows() -> None:
    """A NaN pixel of the depthwise conv's input spoils the 3x3 outputs around it; +-Inf
    become NaN or +-Inf where eager's do."""
    torch.manual_seed(2)
    model = InvertedResidual().eval()
    model.expand, model.residual = nn.Identity(), False
    x = _input(c=39)
    x[0, 3, 4, 4], x[1, 7, 0, 0], x[1, 2, 10, 8] = float("nan"), float("inf"), float("-inf")
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
        convcompiler.counters.reset()
        out, report = run_compiled(model, [x], options=FAST)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert out[0, :, 3:6, 3:6].isnan().all()
    finite = ref.isfinite()
    assert_close(out[finite], ref[finite], torch.float32)
    assert _fused(report).schedule == "dw_gemm" and kernel_launches() == 1


def test_sliced_input_dynamic_batch_and_an_empty_one() -> None:
    torch.manual_seed(3)
    model = InvertedResidual().eval()
    model.expand, model.residual = nn.Identity(), False
    compiled = torch.compile(model, backend="im2win", options=FAST, dynamic=True)
    for n in (3, 1):
        x = _input(n, c=41)[:, 1:40]  # a strided view: the kernel reads it in place
        with torch.no_grad():
            ref = float64_copy(model)(x.double())
            convcompiler.counters.reset()
            out = compiled(x)
        assert_close(out, ref, torch.float32)
        assert kernel_launches() == 1
    assert _fused(convcompiler.last_report()).schedule == "dw_gemm"
    with torch.no_grad():
        out, report = run_compiled(model, [_input(0, c=39)], options=FAST)
    assert out.shape == (0, 13, 11, 9)
    assert all(r.fallback_reason.startswith("zero-size") for r in report.fallbacks()), str(report)


def test_option_blocks_off_keeps_the_depthwise_conv_apart() -> None:
    model = InvertedResidual().eval()
    out, ref, report = compiled_and_float64(model, [_input()], {"blocks": False})
    assert_close(out, ref, torch.float32)
    assert not [r for r in report if "(x)" in r.spec] and kernel_launches() == 3, str(report)


def test_the_cost_model_can_keep_them_apart(monkeypatch) -> None:
    """When the model predicts the layers apart faster, each conv is its own region and the
    project conv's report says why."""
    from convcompiler.frontend import lowering

    def apart(fused, parts, ctx):
        return "per layer: a test's verdict", "a test's verdict"

    monkeypatch.setattr(lowering, "select_fusion", apart)
    with torch._inductor.config.patch(fx_graph_cache=False):  # the passes must run
        out, ref, report = compiled_and_float64(InvertedResidual().eval(), [_input()])
    assert_close(out, ref, torch.float32)
    assert kernel_launches() == 3 and convcompiler.counters["match.dw_prologue"] == 0
    assert any("not fused with its depthwise conv: per layer" in r.why for r in report), str(
        report)


def test_a_training_block_keeps_the_depthwise_conv_apart() -> None:
    """In training the depthwise conv's output is saved for the backward (its BN and
    activation read it): the two convs stay regions of their own, and the gradients match
    float64 eager's."""
    model = InvertedResidual().train()
    gradients_match_float64(model, _input())
    assert convcompiler.counters["match.dw_prologue"] == 0
    assert convcompiler.counters["launch.conv_bn"] + convcompiler.counters["launch.conv"] > 0


def _spec(x: torch.Tensor, w: torch.Tensor, stride: int = 2) -> object:
    d = Depthwise((3, 3), (stride, stride), (1, 1), True, tuple(x.shape[2:]))
    base = conv_spec_of(torch.empty(x.shape[0], x.shape[1], *d.out_size(*x.shape[2:])), w)
    return dataclasses.replace(base, prologue=Prologue(bn="affine", act=Activation("relu"), dw=d),
                               input_layout="nhwc" if x.stride(1) == 1 else "nchw")


@pytest.mark.parametrize("tiling", ["image", "batch"])
def test_dw_gemm_addresses(tiling) -> None:
    """Every lane of every load stays inside its tensor: halo taps above and left of the
    image, rows and channels past the last (odd sizes), image and batch tiles."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 21, 7, 5, generator=gen)
    if tiling == "batch":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(19, 21, 1, 1, generator=gen)
    wd, bd = torch.randn(21, 1, 3, 3, generator=gen), torch.randn(21, generator=gen)
    params = [torch.randn(21, generator=gen), torch.randn(21, generator=gen),
              torch.randn(21, generator=gen), torch.rand(21, generator=gen) + 0.5]
    spec = _spec(x, w)
    schedule = SPACES["dw_gemm"].make(spec, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8,
                                      M_TILES=tiling, num_warps=4, num_stages=1)
    launch = gpu_native.load_kernel(spec, schedule)
    with address_check() as check:
        y = launch(x, w, *[None] * 8, *params, None, wd, bd)
    wide = [t.double() for t in (x, w, *params, wd, bd)]
    ref = run_aten(spec, wide[0], wide[1], *[None] * 8, *wide[2:6], None, *wide[6:])
    assert y.shape == (3, 19, 4, 3)
    assert_close(y, ref, torch.float32)
    assert check.kernels == {"conv_dw_gemm"} and check.accesses > 0


def test_the_launcher_checks_the_depthwise_operands() -> None:
    x, w = torch.randn(1, 21, 7, 5), torch.randn(19, 21, 1, 1)
    spec = _spec(x, w)
    schedule = next(SPACES["dw_gemm"].candidates(spec))
    launch = gpu_native.load_kernel(spec, schedule)
    params = [torch.ones(21)] * 4
    with pytest.raises(ValueError, match="depthwise weight"):
        launch(x, w, *[None] * 8, *params, None, torch.randn(21, 1, 5, 5), torch.randn(21))
    with pytest.raises(ValueError, match="depthwise bias"):
        launch(x, w, *[None] * 8, *params, None, torch.randn(21, 1, 3, 3), None)


def test_the_spec_round_trips_and_refuses_other_convs() -> None:
    x, w = torch.randn(2, 21, 7, 5), torch.randn(19, 21, 1, 1)
    spec = _spec(x, w)
    assert spec_from_json(spec_to_json(spec)) == spec
    assert "dw3x3s2x2+bn+relu(x)" in spec.describe()
    assert spec.flops() == 2 * 2 * 4 * 3 * (19 * 21 + 21 * 9)
    with pytest.raises(SpecError, match="depthwise prologue"):
        dataclasses.replace(spec, kernel=(3, 3), padding=(1, 1))
    for name in ("gemm_1x1", "im2win_implicit"):
        assert not list(SPACES[name].candidates(spec)), name
