"""Window attention as other libraries ship it, fused in every block: timm's swinv2_cr (a flat
per-head bias from an MLP), timm's MaxViT block and grid attention (a relative position
bias from an einsum lookup; SDPA or matmul + softmax), and HF transformers' SwinModel (SDPA or
eager: the shift mask expanded to B*nW and added to the bias) and Swinv2Model (the mask added
twice). Each model is built from a reduced config with random weights and compared with its
float64 copy; every attention must run the fused kernel."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, float64_copy, run_compiled

import convcompiler

FAST = {"verify": False}  # the static sm_90 check adds nothing to numerics


def check_fused(model: torch.nn.Module, x: torch.Tensor, attentions: int, shifted: int) -> list:
    """Compiled == float64 eager, with `attentions` fused regions, `shifted` of them masked."""
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
    y, report = run_compiled(model, [x], options=FAST)
    if not isinstance(y, torch.Tensor):  # HF model outputs
        y, ref = y.last_hidden_state, ref.last_hidden_state
    assert_close(y, ref, torch.float32)
    regions = [r for r in report.regions if r.kind == "window_attention"]
    assert len(regions) == attentions, str(report)
    assert all(r.fallback_reason is None and r.schedule == "window_attention" for r in regions), (
        str(report)
    )
    assert convcompiler.counters["launch.window_attention"] == attentions
    masked = [r for r in regions if "per window" in r.spec or "attn_mask" in r.spec]
    assert len(masked) == shifted, [r.spec for r in regions]
    assert not [r for r in report.fallbacks() if r.kind == "window_attention"]
    return regions


@pytest.mark.slow
def test_timm_swinv2_cr():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "swinv2_cr_tiny_ns_224",
        img_size=32,
        window_size=4,
        embed_dim=32,
        depths=(2, 2),
        num_heads=(2, 4),
    ).eval()
    regions = check_fused(model, torch.randn(2, 3, 32, 32), attentions=4, shifted=1)
    assert all("cosine+logit_scale" in r.spec and "bias=[heads,N,N]" in r.spec for r in regions)
    assert sum("mask=[4,N,N] per window" in r.spec for r in regions) == 1


@pytest.mark.slow
@pytest.mark.parametrize("fused_attn", [True, False], ids=["sdpa", "matmul"])
def test_timm_maxvit_block_and_grid_attention(fused_attn):
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    model = timm.create_model(
        "maxvit_tiny_tf_224", img_size=64, embed_dim=(32, 64), depths=(1, 2), stem_width=16
    ).eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused_attn
    regions = check_fused(model, torch.randn(2, 3, 64, 64), attentions=6, shifted=0)
    assert all("bias=[heads,N,N]" in r.spec and "N=4 " in r.spec for r in regions)
    assert all(("safe_softmax" in r.spec) == fused_attn for r in regions)


def _hf_swin(version: int, attn: str):
    transformers = pytest.importorskip("transformers")
    config_cls = transformers.SwinConfig if version == 1 else transformers.Swinv2Config
    model_cls = transformers.SwinModel if version == 1 else transformers.Swinv2Model
    config = config_cls(
        image_size=64,
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        attn_implementation=attn,
    )
    return model_cls(config).eval()


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_swin_shifted_windows(attn):
    """HF SwinModel: the shift mask reaches the attention expanded to [B*nW, 1, N, N] and
    summed with the [1, H, N, N] bias; it is split back into bias and per-window mask."""
    torch.manual_seed(2)
    model = _hf_swin(1, attn)
    assert model.config._attn_implementation == attn
    regions = check_fused(model, torch.randn(2, 3, 64, 64), attentions=4, shifted=2)
    assert sum("mask=[16,N,N] per window" in r.spec for r in regions) == 1
    assert sum("mask=[4,N,N] per window" in r.spec for r in regions) == 1
    assert all(("safe_softmax" in r.spec) == (attn == "sdpa") for r in regions)


@pytest.mark.slow
def test_hf_swinv2_mask_added_twice():
    """HF Swinv2Model (eager attention only: it has no SDPA path) adds its shift mask twice."""
    torch.manual_seed(3)
    model = _hf_swin(2, "eager")
    regions = check_fused(model, torch.randn(2, 3, 64, 64), attentions=4, shifted=2)
    assert sum("per window x2" in r.spec for r in regions) == 2
    assert all("cosine+logit_scale" in r.spec for r in regions)


@pytest.mark.slow
@pytest.mark.parametrize(
    "attn,dtype", [("eager", torch.float16), ("sdpa", torch.bfloat16)], ids=["eager", "sdpa"]
)
def test_hf_swin_half_precision(attn, dtype):
    """HF's eager path takes the softmax in float32 and casts back (`_to_copy` on the
    probabilities): the fused kernel does the same in one pass."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    config = transformers.SwinConfig(
        image_size=32,
        embed_dim=32,
        depths=[2],
        num_heads=[2],
        window_size=4,
        attn_implementation=attn,
    )
    model = transformers.SwinModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = float64_copy(model)(x.double()).last_hidden_state
    y, report = run_compiled(model.to(dtype), [x.to(dtype)], options=FAST)
    assert_close(y.last_hidden_state, ref, dtype)
    regions = [r for r in report.regions if r.kind == "window_attention"]
    assert len(regions) == 2 and all(r.fallback_reason is None for r in regions), str(report)
    assert convcompiler.counters["launch.window_attention"] == 2
