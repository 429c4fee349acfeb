"""SDPA against the fused kernel: when the graph itself calls SDPA, the attention region's
"aten" candidate is that one call, priced as SDPA's backend on the planning GPU (flash, or
memory-efficient with an additive mask or in float32), not as ATen's nine kernels. When the
graph writes the softmax itself, SDPA is a third candidate, "sdpa": the region rewritten as
one SDPA call on its terms summed (codegen/attention_sdpa.py). The report names what ran and
why; each side can be forced, and all are correct.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from attention_modules import MicrosoftWindowAttention
from helpers import assert_close, assert_nan_and_close, compiled_and_float64

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


def test_softmax_written_attention_prices_sdpa_and_atens_nine_kernels() -> None:
    """Swin's attention written with softmax: its ATen path is not SDPA, and SDPA on the
    bias and mask summed is priced as a candidate of its own."""
    model = MicrosoftWindowAttention(96, 7, 3).eval().half()
    compiled = torch.compile(model, backend="im2win",
                             options={"verify": False, "cpu": "plan", "target": "h100"})
    with torch.no_grad():
        compiled(torch.randn(64, 49, 96).half())
    region = _attention(convcompiler.last_report())
    assert region.schedule == "window_attention"  # planned (cpu="plan": ATen runs on the CPU)
    assert "aten (ATen's 9 kernels)" in region.why, region.why
    assert "sdpa (one call, SDPA's memory-efficient backend) is" in region.why, region.why


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


class SoftmaxAttention(nn.Module):
    """Attention written with softmax over given q, k, v and an additive [B, H, N, Nk] mask
    (Nk != N, v's head dim other than q's)."""

    def forward(self, q, k, v, mask):
        return ((q @ k.transpose(-2, -1)) * 0.25 + mask).softmax(-1) @ v


def _masked_inputs(dtype=torch.float32):
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 11, 16), torch.randn(2, 3, 11, 8)
    mask = torch.randn(2, 3, 9, 11)
    mask[0, 1, 4] = float("-inf")  # a row with every key hidden: NaN in eager
    mask[1, 0, 2, :7] = float("-inf")  # some keys hidden
    return [t.to(dtype) for t in (q, k, v, mask)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("forced", ["sdpa", "window_attention"])
def test_softmax_written_attention_forced_either_way_is_correct(forced, dtype) -> None:
    """Both candidates of a softmax-written attention give eager's values, its NaN row
    included (SDPA alone would give 0 there), and the forced one ran."""
    out, ref, report = compiled_and_float64(SoftmaxAttention(), _masked_inputs(dtype),
                                            {"schedule": forced})
    assert_nan_and_close(out, ref, dtype)
    assert out[0, 1, 4].isnan().all() and not out[1, 0, 2].isnan().any()
    assert _attention(report).schedule == forced
    assert convcompiler.counters["launch.sdpa"] == (forced == "sdpa")
    assert convcompiler.counters["launch.window_attention"] == (forced != "sdpa")


def test_sdpa_rewrite_gives_nan_where_eager_does_for_infinite_q_and_k() -> None:
    """Eager's row is NaN when no score is finite. A q row with -inf against keys whose
    matching entry is positive makes every score -inf (SDPA: 0); a non-finite k row that is
    the only key a mask leaves makes that row's scores non-finite. Finite rows stay exact."""
    q, k, v, mask = _masked_inputs()
    k[..., 0] = k[..., 0].abs() + 0.5
    q[0, 2, 6, 0] = float("-inf")
    mask[1, 1, 3] = float("-inf")
    mask[1, 1, 3, 5] = 0.0
    k[1, 1, 5, 2] = float("inf")
    out, ref, _ = compiled_and_float64(SoftmaxAttention(), [q, k, v, mask], {"schedule": "sdpa"})
    assert ref[0, 2, 6].isnan().all() and ref[1, 1, 3].isnan().all()
    assert_nan_and_close(out, ref, torch.float32)
    assert convcompiler.counters["launch.sdpa"] == 1


def test_sdpa_is_not_a_candidate_under_the_interpreter_or_for_a_select() -> None:
    """Unforced on the CPU the interpreter runs this project's kernel; a boolean select
    (masked_fill replaces scores, SDPA's mask adds) has no sdpa candidate even when forced."""
    out, ref, report = compiled_and_float64(SoftmaxAttention(), _masked_inputs())
    assert_nan_and_close(out, ref, torch.float32)
    assert _attention(report).schedule == "window_attention"
    assert convcompiler.counters["launch.sdpa"] == 0

    class Filled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("keep", torch.rand(2, 3, 9, 11) > 0.3)

        def forward(self, q, k, v):
            s = (q @ k.transpose(-2, -1)).masked_fill(~self.keep, float("-inf"))
            return s.softmax(-1) @ v

    q, k, v, _ = _masked_inputs()
    out, ref, report = compiled_and_float64(Filled(), [q, k, v], {"schedule": "sdpa"})
    assert_nan_and_close(out, ref, torch.float32)
    assert _attention(report).schedule == "window_attention"
    assert convcompiler.counters["launch.sdpa"] == 0


def test_long_softmax_written_attention_planned_for_h100_picks_sdpa() -> None:
    """Global attention over 2048 tokens written with softmax (batch 32, 12 heads of 64),
    fp16 on an H100 plan: compute dominates, one call to SDPA's flash backend runs at a
    higher fraction of the peak than the fused kernel, so it is picked and the why says so.
    The same attention over Swin's 49 tokens keeps the fused kernel."""
    from convcompiler.config import Config
    from convcompiler.devices import lookup
    from convcompiler.selection.select import SelectionContext, select_schedule
    from convcompiler.spec import AttentionSpec

    def spec(tokens):
        return AttentionSpec(
            batch=32, heads=12, tokens=tokens, head_dim=64, dtype="float16", scale=0.125,
            cosine=False, logit_scale=False, bias=False, mask=False, windows=1, general=False,
            output="bnc", device="cuda", precision="tf32")  # fmt: skip

    ctx = SelectionContext(Config(verify=False), lookup("h100"), "planned")
    long = select_schedule(spec(2048), ctx)
    assert long.schedule.name == "sdpa" and long.fallback_reason is None, long.why
    assert long.why.startswith("sdpa (one call, SDPA's flash backend)"), long.why
    assert "best other schedule window_attention" in long.why
    short = select_schedule(spec(49), ctx)
    assert short.schedule.name == "window_attention", short.why
    assert "sdpa (one call, SDPA's flash backend) is" in short.why


def test_sdpa_rewrite_reads_strided_operands_and_a_broadcast_mask() -> None:
    """q, k and v as strided views of one projection ([B, N, 3, H, D] permuted, as Swin's
    qkv), and an additive mask broadcast over the batch and the heads: as eager."""
    torch.manual_seed(6)
    qkv = torch.randn(2, 9, 3, 3, 16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    assert not q.is_contiguous()
    mask = torch.randn(1, 1, 9, 9)
    out, ref, report = compiled_and_float64(SoftmaxAttention(), [q, k, v, mask],
                                            {"schedule": "sdpa"})
    assert_close(out, ref, torch.float32)
    assert _attention(report).schedule == "sdpa"
    assert convcompiler.counters["launch.sdpa"] == 1
