"""Block fusion, ConvNeXt's whole block: depthwise conv -> permute -> LayerNorm -> MLP ->
permute back -> layer scale -> + input, as one `dw_mlp_block` kernel (the conv's output and
the hidden never in memory), where the cost model prefers it to the conv apart and the MLP
fused (codegen/dw_mlp_block.py, passes/match_block.py, selection/select.select_block)."""

from __future__ import annotations

import pytest
import torch
from helpers import FAST, assert_close, compiled_and_float64, float64_copy

import convcompiler
from convcompiler.bench import gpu_native
from convcompiler.codegen import SPACES
from convcompiler.devices import lookup
from convcompiler.runtime.reference import run_mlp
from convcompiler.selection.choice import SelectionContext
from convcompiler.selection.select import select_block
from convcompiler.spec import Activation, spec_from_json, spec_to_json
from convcompiler.spec_block import MlpSpec


def cn_block(c: int = 16, seed: int = 8, dtype: torch.dtype = torch.float32):
    from torchvision.models.convnext import CNBlock

    torch.manual_seed(seed)
    model = CNBlock(c, 0.5, 0.0).eval()
    with torch.no_grad():  # away from the initial constant layer scale and norm
        model.layer_scale.uniform_(0.5, 1.5)
        norm = model.block[2]
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return model.to(dtype)


def whole_blocks(report) -> list:
    return [r for r in report if r.kind == "mlp_block" and r.schedule == "dw_mlp_block"]


def convnext_spec(c: int, hw: int, dtype: str = "float16", batch: int = 32, **extra) -> MlpSpec:
    return MlpSpec(batch * hw * hw, c, 4 * c, c, Activation("gelu"), True, True, True, True,
                   dtype, "cuda", "ieee", norm="affine", channels_first=True, dw_kernel=(7, 7),
                   dw_padding=(3, 3), dw_bias=True, image=(hw, hw), **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_and_inf_stay_in_their_pixels_windows(dtype) -> None:
    """A NaN or Inf input pixel reaches, as eager's, the pixels whose 7x7 window holds it
    (through the conv, then every channel through the norm), and no other."""
    model = cn_block(dtype=dtype)
    x = torch.randn(2, 16, 9, 11).to(dtype)
    x[0, 3, 1, 1], x[1, 5, 7, 9] = float("nan"), float("inf")
    out, ref, report = compiled_and_float64(model, [x])
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert 0 < int(ref.isnan().sum()) < ref.numel() // 2
    finite = ref.isfinite()
    assert_close(out[finite], ref[finite], dtype)
    assert convcompiler.counters["launch.mlp_block"] == 1
    if dtype == torch.float32:  # float32 without TF32: partly fused (no register budget)
        kinds = [(r.kind, r.schedule) for r in report]
        assert kinds == [("mlp_block", "mlp_block"), ("conv", "direct_depthwise")], kinds
        why = report.regions[0].why  # the MLP's choice, then why the block is not whole
        assert "not whole with its depthwise conv: partly fused: no whole-block" in why, why
    else:
        assert len(whole_blocks(report)) == 1


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_input_layouts(layout) -> None:
    """A channels_last image, and one sliced out of a wider tensor: the kernel reads x (the
    conv's taps and the residual) through its strides (bfloat16: a float32 block runs whole
    with TF32 only)."""
    model = cn_block(seed=9, dtype=torch.bfloat16)
    x = torch.randn(2, 16, 6, 9).to(torch.bfloat16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(2, 16, 6, 20).to(torch.bfloat16)[..., 3:12]
    out, ref, report = compiled_and_float64(model, [x])
    assert_close(out, ref, torch.bfloat16)
    assert out.stride() == model(x).stride()
    assert len(whole_blocks(report)) == 1 == convcompiler.counters["launch.mlp_block"]


def test_dynamic_batch_and_an_empty_one() -> None:
    """One compile for every batch (the spec's pixel count is symbolic, the image size
    fixed: the kernel is built for it); an empty batch compiles on its own and stays per
    layer, with its reason."""
    model = cn_block(seed=11, dtype=torch.float16)
    compiled = torch.compile(model, backend="im2win", options=FAST)
    convcompiler.counters.reset()
    with torch.no_grad():
        for batch in (2, 3):
            x = torch.randn(batch, 16, 5, 6).half()
            torch._dynamo.mark_dynamic(x, 0)
            assert_close(compiled(x), float64_copy(model)(x.double()), torch.float16)
        (row,) = whole_blocks(convcompiler.last_report())
        assert "M=" in row.spec and "dwconv 7x7" in row.spec, row.spec
        assert convcompiler.counters["launch.mlp_block"] == 2
        assert compiled(torch.randn(0, 16, 5, 6).half()).shape == (0, 16, 5, 6)
    rows = [r for r in convcompiler.last_report() if r.kind == "mlp_block"]
    assert [r.why for r in rows] == ["per layer: zero-size block: nothing to compute"]


def test_blocks_false_keeps_the_conv_and_the_layers_apart() -> None:
    """Per layer: the conv, fc1 with its GELU, and fc2 reading the permute back to the image
    with the layer scale and the input in its epilogue (ConvNeXt's wider stages, where the
    MLP is not one kernel, run these linears too)."""
    model = cn_block(seed=12)
    out, ref, report = compiled_and_float64(model, [torch.randn(1, 16, 5, 5)], {"blocks": False})
    assert_close(out, ref, torch.float32)
    assert [(r.kind, r.schedule, r.epilogue) for r in report] == [
        ("conv", "direct_depthwise", ""),
        ("linear", "gemm_1x1", "gelu"),
        ("linear", "gemm_1x1", "scale+add"),
    ], str(report)
    assert out.stride() == model(torch.randn(1, 16, 5, 5)).stride()


def test_a_residual_other_than_the_input_keeps_the_conv_apart() -> None:
    """The kernel adds x itself; a block whose residual is another tensor fuses the MLP only."""

    class Shifted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = cn_block(seed=13).block

        def forward(self, x, r):
            return self.block(x) + r

    model = Shifted().eval()
    x, r = torch.randn(1, 16, 5, 5), torch.randn(1, 16, 5, 5)
    out, ref, report = compiled_and_float64(model, [x, r])
    assert_close(out, ref, torch.float32)
    assert not whole_blocks(report)
    assert [r.schedule for r in report if r.kind == "mlp_block"] == ["mlp_block"], str(report)


def test_kernel_tails_and_padding_against_float64() -> None:
    """The launcher alone: an odd image (5 x 7), C = 13 (a 16-wide channel tile, the tail
    wrapped), a hidden of 37 (a partial chunk), every tap's halo clamped."""
    gen = torch.Generator().manual_seed(5)
    n, c, h, w, hid = 2, 13, 5, 7, 37
    spec = MlpSpec(n * h * w, c, hid, c, Activation("gelu"), True, True, True, True, "float32",
                   "cpu", "ieee", norm="affine", channels_first=True, dw_kernel=(7, 7),
                   dw_padding=(3, 3), dw_bias=True, image=(h, w))
    sched = SPACES["dw_mlp_block"].make(spec, BLOCK_M=16, BLOCK_H=16, num_warps=4, num_stages=2)
    x = torch.randn(n, c, h, w, generator=gen)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    operands = (x, rnd(hid, c, scale=0.25), rnd(hid), rnd(c, hid, scale=0.2), rnd(c),
                rnd(c).abs() + 0.5, None, rnd(c).abs() + 0.5, rnd(c), None, None,
                rnd(c, 1, 7, 7, scale=0.15), rnd(c))
    launch = gpu_native.load_kernel(spec, sched)
    y = launch(*operands)
    ref = run_mlp(spec, *[t if t is None else t.double() for t in operands])
    assert_close(y, ref, torch.float32)
    assert y.shape == (n, c, h, w) and y.stride() == (h * w * c, 1, w * c, c)
    with pytest.raises(ValueError, match="adds x itself"):
        launch(*operands[:6], x, *operands[7:])


def test_the_cost_model_fuses_the_narrow_stage_and_not_the_wider_one() -> None:
    """ConvNeXt-T at batch 32: on an H100 the first stage (C = 96, 56 x 56) runs whole, the
    conv computed once per pixel; on an A100 (sm_80's operand budget: 32-row tiles) the conv
    apart and the MLP fused are predicted faster ("partly fused", with both times and MiB);
    the second stage (C = 192) has no whole-block schedule (every channel in registers)."""
    from convcompiler.config import Config

    def planned(target):
        return SelectionContext(Config(verify=False), lookup(target), "planned")

    narrow, wide = convnext_spec(96, 56), convnext_spec(192, 28)
    choice = select_block(narrow, planned("h100"))
    assert choice.schedule.name == "dw_mlp_block" and choice.fallback_reason is None
    assert "the whole block" in choice.why and "against the conv apart" in choice.why
    choice = select_block(narrow, planned("a100"))
    assert choice.fallback_reason.startswith("partly fused: the whole block"), choice
    assert "MiB against the conv apart and the MLP mlp_block" in choice.fallback_reason
    choice = select_block(wide, planned("h100"))
    assert choice.fallback_reason.startswith("partly fused: no whole-block schedule"), choice
    assert select_block(wide.without_depthwise(), planned("h100")).schedule.name == "mlp_block"
    assert spec_from_json(spec_to_json(narrow)) == narrow
    assert "dw7x7p3x3b_56x56" in narrow.geometry()


def test_gpu_command_part_a_checks_the_whole_block() -> None:
    """Part a's "convnext" mlp_block cases plan the whole-block kernel; one, shrunk, runs
    through the same check as on the GPU (here Triton's interpreter) against float64."""
    import dataclasses

    from convcompiler.bench import gpu_blocks
    from convcompiler.devices import DEVICES

    cases = [c for c in gpu_blocks.block_cases() if c.id.endswith("mlp_block float32 convnext")]
    assert cases and all(c.image and c.out_features == c.in_features <= 128 for c in cases)
    tiny = dataclasses.replace(cases[0], image=(5, 6), tokens=2 * 5 * 6)
    row = gpu_native.check_case(tiny, DEVICES["h200"])
    assert row["status"] == "ok", row
    assert row["schedule"].startswith("dw_mlp_block") and row["rel_err"] <= row["tolerance"]
