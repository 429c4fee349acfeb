"""Swin's qkv and proj linears read and write their window tokens in place (issue 22's
traffic):

- `LayerNorm -> [roll] -> window partition -> qkv linear` (spec.windows) is one gemm_1x1
  region that reads the block's input image, computes each token's LayerNorm statistics
  and maps each GEMM row to its (rolled) pixel, so neither the normalised image nor its
  rolled, partitioned copy is ever written;
- `proj linear -> window reverse -> [roll back] -> + x` (spec.out_windows) is one gemm_1x1
  region that stores each row at its pixel of the image and adds the residual there.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from address_check import address_check
from helpers import (
    FAST,
    assert_close,
    compiled_and_float64,
    float64_copy,
    gradients_match_float64,
    kernel_launches,
)
from torchvision.models.swin_transformer import SwinTransformerBlock

import convcompiler
from convcompiler.bench import gpu_native
from convcompiler.codegen import SPACES, kind_spaces
from convcompiler.frontend.kernels import conv_spec_of
from convcompiler.runtime.reference import run_aten
from convcompiler.spec import Prologue, SpecError, Windows, spec_from_json, spec_to_json


def _block(shift: int, dtype: torch.dtype = torch.float32, dim: int = 32) -> SwinTransformerBlock:
    torch.manual_seed(shift)
    block = SwinTransformerBlock(dim, 2, [7, 7], [shift, shift]).eval()
    with torch.no_grad():
        block.norm1.weight.uniform_(0.5, 1.5)
        block.norm1.bias.uniform_(-0.5, 0.5)
    return block.to(dtype)


def _image(n: int = 2, dtype: torch.dtype = torch.float32, h: int = 14, w: int = 21):
    gen = torch.Generator().manual_seed(7)
    return (torch.randn(n, h, w, 32, generator=gen) + 0.5).to(dtype)


def _windowed(report, side: str = "qkv") -> object:
    """The qkv region (its input rows are windows) or the proj region (its output rows)."""
    mark = "(x)" if side == "qkv" else "to windows"
    (region,) = [r for r in report if "windows7x7" in r.spec and mark in r.spec]
    return region


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shift", [0, 3])
def test_qkv_reads_the_rolled_windows_of_the_image(dtype, shift) -> None:
    block = _block(shift, dtype)
    out, ref, report = compiled_and_float64(block, [_image(dtype=dtype)])
    assert_close(out, ref, dtype)
    qkv = _windowed(report)
    assert qkv.kind == "linear" and qkv.schedule == "gemm_1x1", str(report)
    assert "ln(x)" in qkv.spec and ("+roll3x3" in qkv.spec) == (shift > 0), qkv.spec
    proj = _windowed(report, "proj")
    assert proj.kind == "linear" and proj.schedule == "gemm_1x1", str(report)
    assert "+add to windows7x7" in proj.spec and ("+roll" in proj.spec) == (shift > 0)
    assert [r.kind for r in report.kernels()].count("window_attention") == 1, str(report)
    assert not report.fallbacks(), str(report)


def test_nan_stays_in_its_token_and_the_batch_may_vary() -> None:
    """A dynamic batch (a dynamic image size leaves Swin's attention unfused: its token
    count must be static)."""
    block = _block(3)
    x = _image()
    x[1, 4, 9, 5] = float("nan")
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        ref = float64_copy(block)(x.double())
        convcompiler.counters.reset()
        compiled = torch.compile(block, backend="im2win", options=FAST)
        out = compiled(x)
    assert torch.equal(out.isnan(), ref.isnan()) and ref[0].isfinite().all()
    assert_close(out[0], ref[0], torch.float32)
    with torch.no_grad():
        x3 = _image(3)
        out3 = compiled(x3)
        ref3 = float64_copy(block)(x3.double())
    assert_close(out3, ref3, torch.float32)
    assert "windows7x7+roll3x3" in _windowed(convcompiler.last_report()).spec
    assert kernel_launches() > 0


def test_inf_reaches_eager_s_tokens_and_an_empty_batch_is_eager_s() -> None:
    block = _block(3)
    x = _image()
    x[0, 2, 3, 7], x[1, 13, 20, 0] = float("inf"), float("-inf")
    out, ref, report = compiled_and_float64(block, [x])
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite()
    assert_close(out[finite], ref[finite], torch.float32)
    assert _windowed(report) and _windowed(report, "proj")
    out, _, report = compiled_and_float64(block, [_image(0)])
    assert out.shape == (0, 14, 21, 32)


def test_option_blocks_off_leaves_the_partition_to_inductor() -> None:
    block = _block(3)
    out, ref, report = compiled_and_float64(block, [_image()], {"blocks": False})
    assert_close(out, ref, torch.float32)
    assert not [r for r in report if "windows" in r.spec], str(report)


def _spec(x: torch.Tensor, w: torch.Tensor, windows: Windows):
    (wh, ww), (n, _, h, wd) = windows.size, x.shape
    tokens = torch.empty(n * (h // wh) * (wd // ww), x.shape[1], 1, wh * ww)
    base = conv_spec_of(tokens.to(memory_format=torch.channels_last), w)
    return dataclasses.replace(base, prologue=Prologue(ln="affine"), windows=windows)


@pytest.mark.parametrize("block_m", [16, 64])
def test_window_row_addresses(block_m) -> None:
    """Every lane's address stays inside the image, the rolled rows past its edge wrapped,
    rows and channels past the last masked; tiles within a window and across several."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 14, 21, 19, generator=gen).permute(0, 3, 1, 2)  # NHWC as [N, C, H, W]
    w = torch.randn(23, 19, 1, 1, generator=gen)
    ln = [torch.randn(19, generator=gen), torch.randn(19, generator=gen)]
    spec = _spec(x, w, Windows((7, 7), (3, 5)))
    schedule = SPACES["gemm_1x1"].make(spec, BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=16,
                                       GROUP_M=8, M_TILES="batch", num_warps=4, num_stages=2)
    launch = gpu_native.load_kernel(spec, schedule)
    with address_check() as check:
        y = launch(x, w, *[None] * 8, *ln, None, None)
    ref = run_aten(spec, x.double(), w.double(), *[None] * 8, *[t.double() for t in ln])
    assert y.shape == (12, 23, 1, 49)
    assert_close(y, ref, torch.float32)
    assert check.kernels == {"conv_gemm_1x1"} and check.accesses > 0
    with pytest.raises(ValueError, match="whole 7x7 windows"):
        launch(x[:, :, :13], w, *[None] * 8, *ln, None, None)


@pytest.mark.parametrize("block_m", [16, 64])
def test_output_window_row_addresses(block_m) -> None:
    """The proj side: each row's store and residual load at its (rolled back) pixel, every
    lane inside the image; rows and channels past the last masked."""
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randn(24, 49, 19, generator=gen)  # 2 images of 2 x 6 windows
    x = tokens.reshape(24, 1, 49, 19).permute(0, 3, 1, 2)  # the linear's NHWC view
    w, bias = torch.randn(23, 19, 1, 1, generator=gen), torch.randn(23, generator=gen)
    residual = torch.randn(2, 14, 42, 23, generator=gen)
    base = conv_spec_of(x, w, bias)
    spec = dataclasses.replace(base, epilogue=dataclasses.replace(base.epilogue, residual=True),
                               out_windows=Windows((7, 7), (3, 5)))
    schedule = SPACES["gemm_1x1"].make(spec, BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=16,
                                       GROUP_M=8, M_TILES="batch", num_warps=4, num_stages=2)
    launch = gpu_native.load_kernel(spec, schedule)
    with address_check() as check:
        y = launch(x, w, bias, None, None, None, None, residual)
    ref = run_aten(spec, x.double(), w.double(), bias.double(), None, None, None, None,
                   residual.double())
    # the same as eager's reverse: tokens -> [B, nWh, nWw, 7, 7, K] -> [B, H, W, K] -> roll
    rows = (tokens.double() @ w.double().reshape(23, 19).T + bias.double()).reshape(2, 2, 6, 7, 7,
                                                                                   23)
    image = torch.roll(rows.permute(0, 1, 3, 2, 4, 5).reshape(2, 14, 42, 23), (3, 5), (1, 2))
    assert_close(ref, image + residual.double(), torch.float32)
    assert y.shape == (2, 14, 42, 23) and y.is_contiguous()
    assert_close(y, ref, torch.float32)
    assert check.kernels == {"conv_gemm_1x1"} and check.accesses > 0
    with pytest.raises(ValueError, match="not the image of 24 7x7 windows"):
        launch(x, w, bias, None, None, None, None, residual[:1])


def test_a_block_trains_through_both() -> None:
    """In a training graph the partition's and the reverse's nodes are read by the backward
    too, or not: either way the gradients match float64 eager's."""
    block = _block(3).train()
    gradients_match_float64(block, _image())


def test_the_spec_round_trips_and_only_gemm_1x1_runs_it() -> None:
    x, w = torch.randn(2, 19, 14, 21), torch.randn(23, 19, 1, 1)
    spec = _spec(x, w, Windows((7, 7), (3, 3)))
    assert spec_from_json(spec_to_json(spec)) == spec
    assert "windows7x7+roll3x3(x) ln(x)" in spec.describe()
    with pytest.raises(SpecError, match="window rows"):
        dataclasses.replace(spec, in_size=(7, 7))
    names = {s.name for space in kind_spaces(spec).values() for s in space.candidates(spec)}
    assert names == {"gemm_1x1"}
