"""Window attention: the fused kernel's numerics (through Triton's interpreter, against a
float64 eager formula), the matcher on each implementation's layout, the mask built once,
and training through the fused forward."""

from __future__ import annotations

import re

from pathlib import Path

import pytest
import torch
from attention_modules import (
    HFWindowAttention,
    MicrosoftWindowAttention,
    shift_mask,
)
from helpers import (
    FAST,
    TOL,
    assert_close,
    float64_copy,
    inductor_kernels,
    lowered_ops,
    rel_error,
)

import convcompiler
from convcompiler.codegen import SPACES
from convcompiler.frontend.kernels import attention_kernel, attention_spec_of


def eager_attention(q, k, v, bias=None, mask=None, scale=None):
    """softmax(scale q k^T + bias[h] + mask[b mod nW]) v in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * q @ k.transpose(-2, -1)
    if bias is not None:
        s = s + bias.double()
    if mask is not None:
        b, h, n, _ = s.shape
        nw = mask.shape[0]
        s = (s.view(b // nw, nw, h, n, n) + mask.double()[None, :, None]).view(b, h, n, n)
    return s.softmax(-1) @ v


def qkv_views(b: int, heads: int, n: int, d: int, dtype: torch.dtype):
    """q, k, v as strided views of one [B, N, 3, H, D] projection output, as Swin has them."""
    qkv = torch.randn(b, n, 3, heads, d).to(dtype).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def window_side(n: int) -> int:
    return int(round(n**0.5))


KERNEL_CASES = [
    # (windows x images, heads, N, head_dim, mask, dtype)
    (8, 3, 49, 32, True, torch.float32),
    (2, 2, 49, 16, False, torch.float32),
    (4, 2, 64, 64, True, torch.float32),
    (1, 2, 64, 16, False, torch.float32),
    (4, 1, 144, 32, True, torch.float32),
    (1, 2, 144, 64, False, torch.float32),
    (4, 2, 49, 32, True, torch.float16),
    (2, 2, 64, 64, False, torch.float16),
    (4, 2, 49, 16, True, torch.bfloat16),
    (4, 1, 144, 64, True, torch.bfloat16),
    (4, 1, 49, 128, True, torch.float32),
    (2, 2, 49, 24, False, torch.float16),
]


@pytest.mark.parametrize("b,heads,n,d,masked,dtype", KERNEL_CASES)
def test_fused_kernel_matches_float64(b, heads, n, d, masked, dtype):
    torch.manual_seed(n + d)
    q, k, v = qkv_views(b, heads, n, d, dtype)
    bias = torch.randn(heads, n, n).to(dtype)
    side = window_side(n)
    mask = shift_mask(2 * side, 2 * side, side, side // 2).to(dtype) if masked else None
    call = attention_kernel(q, k, v, bias, mask, output="bnc")
    before = convcompiler.counters["launch.window_attention"]
    y = call(q, k, v, bias, mask)
    assert convcompiler.counters["launch.window_attention"] == before + 1
    ref = eager_attention(q, k, v, bias, mask).transpose(1, 2).reshape(b, n, heads * d)
    assert y.dtype == dtype
    assert_close(y, ref, dtype)


def test_random_tiles_match_float64():
    """Tiles other than the interpreter's choice: partial row and key blocks of N = 49."""
    torch.manual_seed(1)
    q, k, v = qkv_views(4, 2, 49, 32, torch.float32)
    bias, mask = torch.randn(2, 49, 49), shift_mask(14, 14, 7, 3)
    spec = attention_spec_of(q, k, v, bias, mask)
    ref = eager_attention(q, k, v, bias, mask)
    for block_m, block_n in ((16, 16), (64, 32), (32, 64)):
        schedule = SPACES["window_attention"].make(
            spec, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2
        )
        y = attention_kernel(q, k, v, bias, mask, schedule=schedule)(q, k, v, bias, mask)
        assert_close(y, ref, torch.float32, f"BLOCK_M={block_m} BLOCK_N={block_n}")


def test_spec_reads_bias_mask_and_layout():
    q, k, v = qkv_views(4, 3, 49, 32, torch.float32)
    spec = attention_spec_of(
        q, k, v, torch.randn(3, 49, 49), shift_mask(14, 14, 7, 3), output="bnc"
    )
    assert (spec.tokens, spec.heads, spec.head_dim, spec.windows) == (49, 3, 32, 4)
    assert spec.bias and spec.mask and not spec.cosine and spec.output == "bnc"
    assert spec.scale == pytest.approx(32**-0.5)


def check_attention_module(module, inputs, *, regions: int, dtype=torch.float32, mask=None):
    """Compiled == float64 eager, with `regions` fused window-attention regions launched."""
    reference = float64_copy(module)
    with torch.no_grad():
        ref = reference(
            *[x.double() for x in inputs], *([mask.double()] if mask is not None else [])
        )
    convcompiler.counters.reset()
    compiled = torch.compile(module, backend="im2win")
    with torch.no_grad():
        y = compiled(*inputs, *([mask] if mask is not None else []))
    assert_close(y, ref, dtype)
    report = convcompiler.last_report()
    attention = [r for r in report.regions if r.kind == "window_attention"]
    assert len(attention) == regions, str(report)
    for region in attention:
        assert region.fallback_reason is None, str(report)
        assert region.schedule == "window_attention", str(report)
    assert convcompiler.counters["launch.window_attention"] == regions, convcompiler.counters
    return report


@pytest.mark.parametrize("style", [MicrosoftWindowAttention, HFWindowAttention])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_layouts_fuse(style, masked):
    torch.manual_seed(2)
    window, dim, heads = 7, 48, 3
    module = style(dim, window, heads).eval()
    mask = shift_mask(14, 14, window, 3) if masked else None
    x = torch.randn(2 * 4, window * window, dim)
    report = check_attention_module(module, (x,), regions=1, mask=mask)
    region = next(r for r in report.regions if r.kind == "window_attention")
    assert "N=49 heads=3 head_dim=16" in region.spec and "bias=[heads,N,N]" in region.spec
    assert ("mask=[4,N,N] per window" in region.spec) == masked, region.spec
    assert "out=bnc" in region.spec, "the output should be written in the projection's layout"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_layout_half_precision(dtype):
    torch.manual_seed(3)
    module = MicrosoftWindowAttention(32, 8, 2).eval()
    x = torch.randn(4, 64, 32)
    ref = float64_copy(module)(x.double(), shift_mask(16, 16, 8, 4).double())
    compiled = torch.compile(module.to(dtype), backend="im2win")
    with torch.no_grad():
        y = compiled(x.to(dtype), shift_mask(16, 16, 8, 4).to(dtype))
    # the projections run ATen in `dtype`; the tolerance is the dtype's
    assert rel_error(y, ref) <= TOL[dtype]
    assert convcompiler.counters["launch.window_attention"] == 1


# ---- the implementations as the models ship them ----------------------------------------------
def _tv_attention(version: int, dim: int = 32, heads: int = 2, shift: int = 3):
    from torchvision.models import swin_transformer as tv

    layer = tv.ShiftedWindowAttention if version == 1 else tv.ShiftedWindowAttentionV2
    module = layer(dim, [7, 7], [shift, shift], heads).eval()
    if version == 2:  # a non-trivial per-head logit scale, some clamped at log(100)
        with torch.no_grad():
            module.logit_scale.copy_(torch.tensor([0.5, 5.0]).log().view(-1, 1, 1) + 2.0)
    return module


@pytest.mark.parametrize("version", [1, 2])
def test_torchvision_shifted_window_attention_pads_and_masks(version, tmp_path):
    """torchvision pads before the roll: a 10 x 11 map (not a multiple of 7) becomes 14 x 14,
    four windows, and the padding tokens take part exactly as in eager."""
    torch.manual_seed(4)
    module = _tv_attention(version)
    x = torch.randn(2, 10, 11, 32)
    ref = float64_copy(module)(x.double())
    compiled = torch.compile(module, backend="im2win", options={"debug_dir": str(tmp_path)})
    with torch.no_grad():
        y = compiled(x)
        for _ in range(2):
            y_again = compiled(x)
    assert_close(y, ref, torch.float32)
    assert torch.equal(y, y_again)
    (region,) = [r for r in convcompiler.last_report().regions if r.kind == "window_attention"]
    assert region.fallback_reason is None and region.schedule == "window_attention"
    assert "mask=[4,N,N] per window" in region.spec and "N=49 heads=2 head_dim=16" in region.spec
    assert ("cosine+logit_scale" in region.spec) == (version == 2), region.spec
    assert convcompiler.counters["launch.window_attention"] == 3
    ops = lowered_ops(tmp_path)
    assert ops["_softmax"] == ops["bmm"] == 0, ops  # the attention is one op
    assert_mask_costs_no_launch(tmp_path)


def assert_mask_costs_no_launch(dump: Path) -> None:
    """torchvision rebuilds its shift mask in every forward. Inductor computes it in the same
    kernel that gathers the relative-position bias (which runs anyway): the mask adds no
    launch, and it writes [nW, N, N] per block (stage 1 of Swin-T: 64 x 49 x 49 x 4 B = 615
    KB), independent of the batch."""
    kernels = inductor_kernels(dump)
    masks = [k for k in kernels if "masked_fill" in k]
    assert masks and all("index" in k for k in masks), kernels


def test_last_stage_has_no_shift_and_no_mask():
    torch.manual_seed(5)
    module = _tv_attention(1, shift=0)
    report = check_attention_module(module, (torch.randn(1, 7, 7, 32),), regions=1)
    assert "mask=none" in report.regions[-1].spec


@pytest.mark.parametrize("fused", [False, True], ids=["matmul", "sdpa"])
def test_timm_block_rolls_then_pads(fused):
    """timm rolls, then pads; with fused_attn (TIMM_FUSED_ATTN=2) the bias and mask reach
    SDPA as one attn_mask, which the matcher splits back into bias[h] and mask[b mod nW]."""
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(6)
    block = timm_swin.SwinTransformerBlock(32, (10, 10), num_heads=2, window_size=7, shift_size=3)
    block.attn.fused_attn = fused
    report = check_attention_module(block.eval(), (torch.randn(2, 10, 10, 32),), regions=1)
    region = next(r for r in report.regions if r.kind == "window_attention")
    assert "bias=[heads,N,N] mask=[4,N,N] per window" in region.spec, region.spec


# ---- training: fused forward; the backward fused too (SwinV2's: the host's) -----------------
@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_training_small_swin_gradients(version):
    from torchvision.models import swin_transformer as tv

    torch.manual_seed(7)
    extra = (
        {}
        if version == 1
        else dict(block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2)
    )
    model = tv.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=[4, 4],
        stochastic_depth_prob=0.0,
        num_classes=10,
        **extra,
    )
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    reference = float64_copy(model)
    x_ref = x.detach().double().requires_grad_()
    reference(x_ref).square().sum().backward()
    # v1 in Inductor's graph (the default host); v2 on the ATen host, which spares a new CI
    # machine half a minute of C++ compiling for host code v1 already covers
    options = {**FAST, "host": "inductor" if version == 1 else "aten"}
    y = torch.compile(model, backend="im2win", options=options)(x)
    y.square().sum().backward()
    forward = [
        r
        for r in convcompiler.last_report().regions
        if r.kind == "window_attention" and r.stage == "forward"
    ]
    assert len(forward) == 4 and all(r.fallback_reason is None for r in forward)
    assert convcompiler.counters["launch.window_attention"] == 4
    backward = [r for r in convcompiler.last_report().regions if r.kind == "attention_backward"]
    if version == 1:  # the fused backward: dq, dk, dv and the bias table's gradient
        assert len(backward) == 4, str(convcompiler.last_report())
        assert all(r.fallback_reason is None for r in backward), str(convcompiler.last_report())
        assert convcompiler.counters["launch.attention_backward"] == 4
    else:  # SwinV2's cosine attention: its normalisation's gradient stays the host's
        assert all(r.fallback_reason for r in backward)
        assert convcompiler.counters["launch.attention_backward"] == 0
    assert rel_error(x.grad, x_ref.grad) <= 1e-3
    names = []
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        assert rel_error(p.grad, p_ref.grad) <= 1e-3, name
        names.append(name)
    wanted = ("qkv.weight", "relative_position_bias_table" if version == 1 else "cpb_mlp")
    assert all(any(w in n for n in names) for w in wanted)
    assert version == 1 or any("logit_scale" in n for n in names)


# ---- whole models at 112 x 112 ------------------------------------------------------------------
# A quarter of the pixels of 224 (the interpreter's time) with the same attentions: stages 1
# and 2 keep their shifted blocks; stage 3 (7 x 7) is one window, so it is not shifted; stage
# 4 (4 x 4) is padded to one window by torchvision and made a 4 x 4 window by timm.
SIZE = 112
def _swin(name: str) -> torch.nn.Module:
    if name.startswith("timm"):
        timm = pytest.importorskip("timm")
        # TIMM_FUSED_ATTN=2, as the environment variable sets it at import
        timm.layers.set_fused_attn(True, experimental=name == "timm-sdpa")
        try:
            model = timm.create_model("swin_tiny_patch4_window7_224", img_size=SIZE)
        finally:
            timm.layers.set_fused_attn(False)
        assert model.layers[0].blocks[0].attn.fused_attn == (name == "timm-sdpa")
        return model
    import torchvision

    return getattr(torchvision.models, name)()


def check_every_attention_fused(name: str, dump: Path) -> None:
    """The last compile of a Swin model at 112 px (dumped under `dump`) ran its 12 window
    attentions as fused kernels, with no fallback and no softmax or bmm left."""
    report = convcompiler.last_report()
    attention = [r for r in report.regions if r.kind == "window_attention"]
    assert len(attention) == 12, str(report)
    assert all(r.fallback_reason is None and r.schedule == "window_attention" for r in attention)
    assert not report.fallbacks(), str(report)
    assert convcompiler.counters["launch.window_attention"] == 12
    tokens = {"swin_t": [49] * 12, "swin_v2_t": [64] * 12}.get(name, [49] * 10 + [16] * 2)
    assert sorted(int(re.search(r"\bN=(\d+) ", r.spec).group(1)) for r in attention) == sorted(
        tokens
    ), [r.spec for r in attention]
    assert all("head_dim=32" in r.spec for r in attention)
    assert sum("per window" in r.spec for r in attention) == 2  # shifted blocks, stages 1-2
    assert sum("cosine+logit_scale" in r.spec for r in attention) == 12 * (name == "swin_v2_t")
    ops = lowered_ops(dump)
    assert ops["_softmax"] == ops["bmm"] == 0, ops
    if not name.startswith("timm"):  # torchvision builds its masks in the graph
        assert_mask_costs_no_launch(dump)


# torchvision's swin_t: test_launches.py compiles it at 112 px in Inductor's graph and runs
# check_every_attention_fused on that compile (one interpreted pass of the model, not two)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_v2_t", "timm", "timm-sdpa"])
def test_swin_models_run_every_attention_fused(name, tmp_path):
    torch.manual_seed(8)
    model = _swin(name).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
        # timm's Swin on the ATen host: torchvision's two run in Inductor's graph (and
        # test_launches.py counts swin_t's launches there); a cold C++ compile of two more
        # Swin graphs would check nothing new on a new CI machine
        host = "aten" if name.startswith("timm") else "inductor"
        options = {"debug_dir": str(tmp_path), "host": host, **FAST}
        y = torch.compile(model, backend="im2win", options=options)(x)
    assert_close(y, ref, torch.float32)
    check_every_attention_fused(name, tmp_path)


def test_minus_inf_mask_blocks_fully_masked_key_blocks():
    """A 0/-inf mask (some implementations use -inf, not -100) that hides a whole key block
    from some rows: the online softmax must not turn -inf - -inf into NaN."""
    torch.manual_seed(9)
    q, k, v = qkv_views(4, 2, 49, 16, torch.float32)
    bias = torch.randn(2, 49, 49)
    mask = torch.zeros(4, 49, 49)
    mask[:, :20, :16] = float("-inf")  # rows 0-19 never see keys 0-15 (the first key block)
    mask[1, 30:, 40:] = float("-inf")  # and a partial last block
    schedule = SPACES["window_attention"].make(
        attention_spec_of(q, k, v, bias, mask), BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2
    )
    y = attention_kernel(q, k, v, bias, mask, schedule=schedule)(q, k, v, bias, mask)
    assert not y.isnan().any()
    assert_close(y, eager_attention(q, k, v, bias, mask), torch.float32)


def test_dynamic_batch_runs_fused_at_three_sizes():
    """A dynamic batch (mark_dynamic) compiles once and runs the fused kernel at every size:
    the sizes the graph reads from inside the attention are rewired to equal sizes outside
    it (passes/match_attention.rewire_sizes). Each batch holds at least two images of four
    windows (one image would let Dynamo specialise the broadcast)."""
    torch.manual_seed(10)
    module = MicrosoftWindowAttention(32, 7, 2).eval()
    mask = shift_mask(14, 14, 7, 3)
    compiled = torch.compile(module, backend="im2win")
    reference = float64_copy(module)
    for b in (8, 12, 20):
        x = torch.randn(b, 49, 32)
        torch._dynamo.mark_dynamic(x, 0)
        with torch.no_grad():
            assert_close(compiled(x, mask), reference(x.double(), mask.double()), torch.float32)
    (region,) = [r for r in convcompiler.last_report().regions if r.kind == "window_attention"]
    assert region.fallback_reason is None and "batch=s" in region.spec, region
    assert convcompiler.counters["pass.match_window_attention"] == 1  # one compile
    assert convcompiler.counters["launch.window_attention"] == 3
