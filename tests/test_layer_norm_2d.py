"""A LayerNorm over an image's channels before a convolution (torchvision's and timm's
LayerNorm2d before ConvNeXt's downsampling 2x2 stride-2 conv; issue 22): the conv's kernel
computes each input pixel's statistics and normalises the image as it loads it
(spec.prologue.ln; im2win_implicit's tap reduction, gemm_1x1 for a 1x1 conv), so the
normalised image and the permutes around the norm are never made."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from address_check import address_check
from helpers import (
    FAST,
    assert_close,
    assert_nan_and_close,
    compiled_and_float64,
    float64_copy,
    gradients_match_float64,
    kernel_launches,
    lowered_ops,
)
from torchvision.models.convnext import LayerNorm2d

import convcompiler
from convcompiler.bench import gpu_native
from convcompiler.codegen import SPACES
from convcompiler.frontend.kernels import conv_spec_of
from convcompiler.runtime.reference import run_aten
from convcompiler.spec import Prologue, SpecError


class Downsample(nn.Module):
    """ConvNeXt's downsampling: LayerNorm2d(c) -> Conv2d(c, k, 2, stride 2)."""

    def __init__(
        self,
        c: int = 24,
        k: int = 37,
        affine: bool = True,
        kernel: int = 2,
        stride: int = 2,
        padding: int = 0,
    ) -> None:
        super().__init__()
        self.norm = LayerNorm2d(c, eps=1e-6, elementwise_affine=affine)
        self.conv = nn.Conv2d(c, k, kernel, stride=stride, padding=padding)
        if affine:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


def _image(n: int = 2, c: int = 24, h: int = 9, w: int = 11) -> torch.Tensor:
    # a mean and a scale the norm removes; channels_last, as the block before it writes it
    x = torch.randn(n, c, h, w) * 2 + 0.5
    return x.to(memory_format=torch.channels_last)


def _normed_region(report) -> object:
    (region,) = [r for r in report if "ln(x)" in r.spec]
    return region


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_norm_runs_inside_the_downsampling_conv(dtype, tmp_path) -> None:
    torch.manual_seed(20)
    model = Downsample().eval().to(dtype)
    x = _image().to(dtype)
    out, ref, report = compiled_and_float64(model, [x], {"debug_dir": str(tmp_path)})
    assert_close(out, ref, dtype)
    region = _normed_region(report)
    assert "2x2 s2x2 ln(x)" in region.spec and region.schedule == "im2win_implicit", str(report)
    assert not report.fallbacks() and kernel_launches() == 1
    ops = lowered_ops(tmp_path)
    assert ops["var_mean"] == 0 and ops["permute"] == 0, ops  # no norm, no layout copies


def test_padded_taps_and_a_1x1_conv_without_affine() -> None:
    """A 3x3 conv with padding 1 after the norm: its padding is zero after the norm, as
    eager pads the normalised image; a 1x1 conv takes the norm in gemm_1x1."""
    torch.manual_seed(21)
    for kernel, padding, schedule in ((3, 1, "im2win_implicit"), (1, 0, "gemm_1x1")):
        model = Downsample(
            c=21, k=13, affine=False, kernel=kernel, stride=1, padding=padding
        ).eval()
        out, ref, report = compiled_and_float64(model, [_image(c=21, h=7, w=6)])
        assert_close(out, ref, torch.float32)
        region = _normed_region(report)
        assert region.schedule == schedule and kernel_launches() == 1, str(report)


def test_a_pixel_s_nan_stays_in_its_window_and_dynamic_batches() -> None:
    torch.manual_seed(22)
    model = Downsample().eval()
    x = _image()
    x[1, 5, 4, 6] = float("nan")  # pixel (4, 6): output pixel (2, 3) alone reads it
    out, ref, _ = compiled_and_float64(model, [x])
    assert_nan_and_close(out, ref, torch.float32)
    assert out[1, :, 2, 3].isnan().all() and out.isnan().sum() == out.shape[1]
    compiled = torch.compile(model, backend="im2win", options=FAST, dynamic=True)
    for n in (3, 1, 0):
        x = _image(n=n)
        with torch.no_grad():
            y, r = compiled(x), float64_copy(model)(x.double())
        assert y.shape == r.shape
        if n:
            assert_close(y, r, torch.float32)
            assert "ln(x)" in _normed_region(convcompiler.last_report()).spec


def test_option_blocks_off_and_training_leave_the_norm_to_inductor() -> None:
    """blocks=False keeps the norm Inductor's; in training the conv's weight gradient needs
    the normalised image, so it is saved and the norm stays outside; gradients match."""
    torch.manual_seed(23)
    model = Downsample().eval()
    out, ref, report = compiled_and_float64(model, [_image()], {"blocks": False})
    assert_close(out, ref, torch.float32)
    assert not any("ln(x)" in r.spec for r in report) and kernel_launches() == 1
    gradients_match_float64(Downsample().train(), _image(h=6, w=8))
    assert not any("ln(x)" in r.spec for r in convcompiler.last_report())


def test_grouped_convs_refuse_the_norm() -> None:
    x, w = _image(c=24), torch.randn(24, 12, 2, 2)
    spec = conv_spec_of(x, w, stride=2, groups=2)
    with pytest.raises(SpecError, match="groups must be 1"):
        dataclasses.replace(spec, prologue=Prologue(ln="affine"))


@pytest.mark.parametrize("tiling", ["image", "batch"])
def test_tap_statistics_addresses(tiling) -> None:
    """im2win_implicit with a LayerNorm prologue: the taps' statistics loads and the
    normalised tiles stay inside x (halo taps, channels and pixels past the last); the
    result is F.layer_norm's over the channels, then the padded conv."""
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(2, 21, 6, 5, generator=gen) * 3 + 1
    if tiling == "batch":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(11, 21, 3, 3, generator=gen)
    vectors = [torch.randn(21, generator=gen), torch.randn(21, generator=gen)]
    spec = dataclasses.replace(
        conv_spec_of(x, w, padding=1), prologue=Prologue(ln="affine", eps=1e-6)
    )
    schedule = SPACES["im2win_implicit"].make(
        spec,
        BLOCK_M=16,
        BLOCK_N=16,
        BLOCK_K=16,
        GROUP_M=8,
        M_TILES=tiling,
        REDUCTION="tap",
        num_warps=4,
        num_stages=2,
    )
    launch = gpu_native.load_kernel(spec, schedule)
    with address_check() as check:
        y = launch(x, w, None, None, None, None, None, None, None, None, *vectors)
    ref = run_aten(spec, x.double(), w.double(), None, *[None] * 7, *[v.double() for v in vectors])
    normed = torch.nn.functional.layer_norm(
        x.double().permute(0, 2, 3, 1), (21,), vectors[0].double(), vectors[1].double(), 1e-6
    )
    eager = torch.nn.functional.conv2d(normed.permute(0, 3, 1, 2), w.double(), padding=1)
    assert_close(ref, eager, torch.float32, "the reference")
    assert_close(y, ref, torch.float32)
    assert check.kernels == {"conv_im2win_implicit"} and check.accesses > 0


class Stem(nn.Module):
    """ConvNeXt's stem: Conv2d(3, k, 4, stride 4) -> LayerNorm2d(k)."""

    def __init__(self, k: int = 24, affine: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, k, 4, stride=4)
        self.norm = LayerNorm2d(k, eps=1e-6, elementwise_affine=affine)
        if affine:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def _stem_region(report) -> object:
    (region,) = [r for r in report if r.spec.endswith("+ln")]
    return region


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_stem_s_norm_runs_in_the_conv_s_epilogue(dtype, tmp_path) -> None:
    """The conv's tile holds every output channel of its pixels: it normalises them before
    the store, in eager's channels_last strides; the norm and its permutes are never run."""
    torch.manual_seed(25)
    model = Stem().eval().to(dtype)
    x = torch.randn(2, 3, 20, 28).to(dtype)
    out, ref, report = compiled_and_float64(model, [x], {"debug_dir": str(tmp_path)})
    assert_close(out, ref, dtype)
    assert out.stride() == ref.stride()
    region = _stem_region(report)
    assert "4x4 s4x4" in region.spec and region.schedule == "im2win_implicit", str(report)
    assert not report.fallbacks() and kernel_launches() == 1
    ops = lowered_ops(tmp_path)
    assert ops["var_mean"] == 0 and ops["permute"] == 0, ops


def test_stem_nan_plain_norm_wide_convs_blocks_off_and_training() -> None:
    torch.manual_seed(26)
    model = Stem(affine=False).eval()
    x = torch.randn(2, 3, 12, 16)
    x[1, 2, 5, 9] = float("nan")  # output pixel (1, 2) alone reads it
    out, ref, report = compiled_and_float64(model, [x])
    assert_nan_and_close(out, ref, torch.float32)
    assert out[1, :, 1, 2].isnan().all() and out.isnan().sum() == out.shape[1]
    assert _stem_region(report).fallback_reason is None
    # wider than a tile: the conv keeps its kernel, the norm is Inductor's
    out, ref, report = compiled_and_float64(Stem(k=136).eval(), [x[:1, :, :8, :8]])
    assert_close(out, ref, torch.float32)
    assert not any(r.spec.endswith("+ln") for r in report) and kernel_launches() == 1
    out, ref, report = compiled_and_float64(model, [x[:1]], {"blocks": False})
    assert not any(r.spec.endswith("+ln") for r in report)
    gradients_match_float64(Stem().train(), torch.randn(2, 3, 8, 12))
    assert not any(r.spec.endswith("+ln") for r in convcompiler.last_report())


@pytest.mark.parametrize("tiling", ["image", "batch"])
def test_stem_epilogue_addresses(tiling) -> None:
    """The LayerNorm epilogue's channel tail (21 channels in a 32-wide tile) and pixel tail
    stay in bounds and out of the statistics; the result is F.layer_norm's."""
    gen = torch.Generator().manual_seed(27)
    x = torch.randn(3, 5, 9, 7, generator=gen)
    w = torch.randn(21, 5, 2, 2, generator=gen)
    b = torch.randn(21, generator=gen)
    vectors = [torch.rand(21, generator=gen) + 0.5, torch.randn(21, generator=gen)]
    spec = dataclasses.replace(
        conv_spec_of(x, w, b, stride=2), output_layout="nchw" if tiling == "image" else "nhwc",
        epilogue=dataclasses.replace(conv_spec_of(x, w).epilogue, ln="affine", ln_eps=1e-6),
    )  # fmt: skip
    schedule = SPACES["im2win_implicit"].make(
        spec, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, M_TILES=tiling, REDUCTION="tap",
        num_warps=4, num_stages=2)  # fmt: skip
    launch = gpu_native.load_kernel(spec, schedule)
    with address_check() as check:
        y = launch(x, w, b, *vectors, None, None)
    ref = run_aten(spec, x.double(), w.double(), b.double(), *[v.double() for v in vectors])
    conv = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), stride=2)
    eager = torch.nn.functional.layer_norm(
        conv.permute(0, 2, 3, 1), (21,), vectors[0].double(), vectors[1].double(), 1e-6
    ).permute(0, 3, 1, 2)
    assert_close(ref, eager, torch.float32, "the reference")
    assert_close(y, ref, torch.float32)
    assert check.kernels == {"conv_im2win_implicit"} and check.accesses > 0
    with pytest.raises(ValueError, match="LayerNorm's weight and bias"):
        launch(x, w, b, None, None, None, None)


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_sliced_input_and_inf_as_eager(where) -> None:
    """A non-contiguous input (a slice of a wider image) with an Inf pixel: the kernel reads
    it through its strides, and the Inf's pixel comes out NaN (its statistics are), as eager."""
    torch.manual_seed(28)
    if where == "before":
        model, wide = Downsample().eval(), _image(c=24, w=15)[:, :, :, 2:13]
    else:
        model, wide = Stem().eval(), torch.randn(2, 3, 12, 20)[:, :, :, 2:18]
    x = wide  # a view: not contiguous in either memory format
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    x[0, 1, 4, 5] = float("inf")
    out, ref, report = compiled_and_float64(model, [x])
    assert_nan_and_close(out, ref, torch.float32)
    assert out.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    region = _normed_region(report) if where == "before" else _stem_region(report)
    assert region.fallback_reason is None and kernel_launches() == 1
