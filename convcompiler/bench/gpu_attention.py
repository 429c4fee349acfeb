"""Part c's attention beyond Swin's windows: neighborhood attention and ViT-B's global one.

    na2d   neighborhood attention over a 56 x 56 grid, kernel 7 (NATTEN's clamped borders),
           2 heads of 32, batch 32, fp16, written as SDPA with a constant boolean mask: the
           fused kernel (visiting only the key tiles the mask leaves some query of the tile)
           against SDPA with the same mask ("eager") and FlexAttention (compiled) with the
           mask as a mask_mod and its BlockMask
    vit_b  ViT-B/16's attention at 224 x 224 (197 tokens, 12 heads of 64), batch 32, fp16:
           the fused kernel against SDPA ("eager": its flash backend) and FlexAttention
    swin_bwd  Swin-T stage 1's attention backward (2048 windows of 49 tokens, 3 heads of 32,
           the bias and the shift mask), batch 32, fp16: the fused backward kernels
           (codegen/attention_backward.py: dq, dk, dv and the bias gradient) against eager
           autograd's backward of the same attention (the forward built before timing)

Each variant's output is checked against float64 (SDPA; autograd for the backward).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..devices import Device
from ..score_terms import tile_fractions, visible_pairs
from ..spec import AttentionSpec


@dataclass(frozen=True)
class GlobalCase:
    id: str
    variant: str  # the sharding unit
    kind: str  # "na2d" or "vit_b"
    batch: int = 32
    dtype: str = "float16"


def cases() -> list[GlobalCase]:
    return [
        GlobalCase("na2d 56x56 k7 b32 float16", "na2d", "na2d"),
        GlobalCase("vit_b 197 tokens b32 float16", "vit_b", "vit_b"),
        GlobalCase("swin_t stage1 backward b32 float16", "swin_bwd", "swin_bwd"),
    ]


def neighborhood_mask(shape: tuple[int, ...], kernel: int, dilation: int = 1) -> torch.Tensor:
    """[N, N] bool for a token grid of `shape` (1-D to 3-D), N = prod(shape): query sees key
    when, along every axis, they are in one dilation group and the key's position in the
    group lies in the query's kernel window, shifted at the borders to stay inside the group
    (NATTEN's rule: start = clamp(p - kernel // 2, 0, length - kernel))."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    for size in shape:
        i = torch.arange(size)
        group, pos = i % dilation, i // dilation
        length = (size - group + dilation - 1) // dilation  # the tokens of i's group
        start = torch.minimum((pos - kernel // 2).clamp(min=0), length - kernel)
        inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < start[:, None] + kernel)
        axis = (group[:, None] == group[None, :]) & inside
        mask = (mask[:, None, :, None] & axis[None, :, None, :]).flatten(2).flatten(0, 1)
    return mask


def case_spec(case: GlobalCase) -> tuple[AttentionSpec, torch.Tensor | None]:
    """The region's spec, as the backend would build it from the graph's SDPA call, and the
    boolean mask (None for ViT and the Swin backward)."""
    if case.kind == "swin_bwd":
        from .gpu_cases import attention_case_spec
        from .gpu_models import stage_case
        from .window_attention import SWIN_T

        forward = attention_case_spec(stage_case(SWIN_T[0], case.batch))
        return dataclasses.replace(forward, grad=True), None
    heads, tokens, head_dim = (2, 56 * 56, 32) if case.kind == "na2d" else (12, 197, 64)
    mask = neighborhood_mask((56, 56), 7) if case.kind == "na2d" else None
    spec = AttentionSpec(
        batch=case.batch, heads=heads, tokens=tokens, head_dim=head_dim, dtype=case.dtype,
        scale=head_dim**-0.5, cosine=False, logit_scale=False, bias=False, mask=False,
        windows=1, general=False, output="bhnd", device="cuda", precision="ieee", sdpa=True,
    )  # fmt: skip
    if mask is not None:
        visible = visible_pairs(None, None, None, mask[None, None], True, float("-inf"))
        fractions = tile_fractions(visible, 1)
        spec = dataclasses.replace(spec, select="keep", key_tiles=fractions)
    return spec, mask


def plan_case(case: GlobalCase, device: Device):
    from .gpu_cases import _select

    spec, mask = case_spec(case)
    return spec, mask, _select(spec, device).schedule


def dry_run(case: GlobalCase, device: Device, checker) -> dict:
    """Plan the case; compile the fused kernel for sm_90 even when SDPA is the choice."""
    from ..selection.cost import rank
    from ..selection.select import model_candidates

    spec, _, schedule = plan_case(case, device)
    fused = rank(spec, model_candidates(spec, device, include_aten=False), device)[0].schedule
    kernels = checker.check(spec, fused)
    problems = [f"{k['kernel']}: {p}" for k in kernels for p in k["problems"]]
    kernel = f"the fused kernel: {fused.describe()}"
    if spec.key_tiles:
        kernel += (
            f", {spec.visited(fused['BLOCK_M'], fused['BLOCK_N']):.1%} of the key tiles visited"
        )
    return {
        "case": case.id,
        "status": "problem" if problems else "planned",
        "schedule": f"{schedule.describe()} ({kernel})",
        "spec": spec.describe(),
        "kernels": kernels,
        "problems": problems,
    }


def _flex(mask: torch.Tensor | None, batch: int, heads: int, scale: float):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    if mask is None:
        return lambda q, k, v: flex(q, k, v, scale=scale)
    n = mask.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]

    blocks = create_block_mask(mask_mod, None, None, n, n, device=mask.device)
    return lambda q, k, v: flex(q, k, v, block_mask=blocks, scale=scale)


def time_case(case: GlobalCase, device: Device, warm: bool = False) -> dict:
    """One case on the GPU; `warm` compiles and runs each variant once, timing nothing."""
    import torch.nn.functional as F

    from .gpu_models import timed_variants
    from .gpu_native import load_kernel

    spec, mask, schedule = plan_case(case, device)
    fused_schedule = schedule
    if schedule.name == "aten":  # time the kernel anyway: the comparison is the point
        from ..selection.cost import rank
        from ..selection.select import model_candidates

        ranked = rank(spec, model_candidates(spec, device, include_aten=False), device)
        fused_schedule = ranked[0].schedule
    if case.kind == "swin_bwd":
        return _time_backward(case, spec, fused_schedule, schedule, warm)
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype = getattr(torch, case.dtype)
    b, h, n, d = case.batch, spec.heads, spec.tokens, spec.head_dim
    q, k, v = (torch.randn(b, h, n, d, generator=gen, device="cuda").to(dtype) for _ in range(3))
    mask = mask.cuda() if mask is not None else None
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    fused = load_kernel(spec, fused_schedule)
    torch._dynamo.reset()
    variants = {
        "eager": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "flex_attention": (lambda f=_flex(mask, b, h, spec.scale): f(q, k, v)),
        "im2win": lambda: fused(q, k, v, select=mask),
    }
    extra = {}
    if spec.key_tiles:
        extra["key_tiles"] = spec.visited(fused_schedule["BLOCK_M"], fused_schedule["BLOCK_N"])
    schedule_text = f"{schedule.describe()}; timed: {fused_schedule.describe()}"
    return timed_variants(case.id, schedule_text, variants, ref, warm, **extra)


def _time_backward(case: GlobalCase, spec: AttentionSpec, fused_schedule, schedule, warm: bool):
    """The Swin-T stage-1 backward: the fused kernels against eager autograd's backward."""
    from ..runtime.reference import run_attention
    from .gpu_models import attention_inputs, stage_case, timed_variants
    from .gpu_native import load_kernel
    from .window_attention import SWIN_T

    q, k, v, bias, mask = attention_inputs(stage_case(SWIN_T[0], case.batch), "cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    dout = torch.randn(q.shape, generator=gen, device="cuda").to(q.dtype)

    def eager_grads(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, bias)]
        out = run_attention(spec, *leaves[:3], leaves[3], mask.to(dtype))
        return leaves, out

    leaves, out = eager_grads(torch.float64)
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(out, leaves, dout.double())])
    leaves, out = eager_grads(q.dtype)  # the forward built once; only its backward is timed
    fused = load_kernel(spec, fused_schedule)
    variants = {
        "eager": lambda: torch.cat([g.flatten() for g in torch.autograd.grad(
            out, leaves, dout, retain_graph=True)]),
        "im2win": lambda: torch.cat([g.flatten() for g in fused(
            q, k, v, dout, bias=bias, mask=mask, bias_grad=True)]),
    }  # fmt: skip
    schedule_text = f"{schedule.describe()}; timed: {fused_schedule.describe()}"
    return timed_variants(case.id, schedule_text, variants, ref, warm)
