"""SDPA against the fused kernel: when the graph itself calls SDPA, the attention region's
"aten" candidate is that one call, priced as SDPA's backend on the planning GPU (flash, or
memory-efficient with an additive mask or in float32), not as ATen's nine kernels. The
report names what ran and why; either side can be forced, and both are correct.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from attention_modules import MicrosoftWindowAttention
from helpers import assert_close, compiled_and_float64

import convcompiler


class ViTAttention(nn.Module):
    """torchvision ViT's self-attention: nn.MultiheadAttention, batch first, SDPA inside."""

    def __init__(self, dim=32, heads=2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _attention(report):
    (region,) = [r for r in report.regions if r.kind == "window_attention"]
    return region


def test_vit_b_attention_planned_for_h100_names_sdpa_and_its_backend() -> None:
    """ViT-B's attention (197 tokens, 12 heads of 64) at fp16 on an H100 plan: the report
    weighs SDPA's flash backend against the fused kernel and says which runs."""
    model = ViTAttention(768, 12).eval().half()
    compiled = torch.compile(model, backend="im2win",
                             options={"verify": False, "cpu": "plan", "target": "h100"})
    with torch.no_grad():
        compiled(torch.randn(4, 197, 768).half())
    region = _attention(convcompiler.last_report())
    assert "aten (SDPA's flash backend)" in region.why and "window_attention" in region.why
    if region.schedule == "aten":
        assert region.fallback_reason.startswith("cost model: aten (SDPA's flash backend)")


def test_softmax_written_attention_prices_atens_nine_kernels() -> None:
    """Swin's attention written with softmax: its ATen path is not SDPA."""
    model = MicrosoftWindowAttention(96, 7, 3).eval().half()
    compiled = torch.compile(model, backend="im2win",
                             options={"verify": False, "cpu": "plan", "target": "h100"})
    with torch.no_grad():
        compiled(torch.randn(64, 49, 96).half())
    region = _attention(convcompiler.last_report())
    assert region.schedule == "window_attention"  # planned (cpu="plan": ATen runs on the CPU)
    assert "aten (ATen's 9 kernels)" in region.why, region.why


@pytest.mark.parametrize("forced", ["aten", "window_attention", None])
def test_either_side_forced_is_correct(forced) -> None:
    """schedule="aten" keeps the graph's SDPA call, schedule="window_attention" runs the
    kernel; unforced on the CPU the interpreter runs the kernel and says why."""
    torch.manual_seed(9)
    model = ViTAttention().eval()
    x = torch.randn(2, 17, 32)
    out, ref, report = compiled_and_float64(model, [x], {"schedule": forced})
    assert_close(out, ref, torch.float32)
    region = _attention(report)
    assert region.schedule == (forced or "window_attention")
    assert convcompiler.counters["launch.window_attention"] == (forced != "aten")
    if forced is None:  # under the interpreter ATen is no candidate: said so
        assert "ATen (SDPA's memory-efficient backend)" in region.why, region.why
