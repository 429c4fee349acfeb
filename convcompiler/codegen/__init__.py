"""Triton emitters: spec + schedule -> KernelSource. Codegen never imports passes.

One template per module; each declares its schedule space (`SPACE`) next to its kernel.
"""

from __future__ import annotations

from ..schedule import InvalidSchedule, Schedule, ScheduleSpace
from ..spec import AttentionSpec, ConvSpec
from ..spec_block import MlpSpec
from . import (
    attention_backward,
    attention_sdpa,
    conv_transpose,
    conv_wgrad,
    direct_depthwise,
    dw_gemm,
    dw_mlp_block,
    gemm_1x1,
    im2win_band,
    im2win_implicit,
    mlp_block,
    window_attention,
)
from .template import KernelSource

KIND_TEMPLATES = {
    "conv": (im2win_band, im2win_implicit, direct_depthwise, gemm_1x1, dw_gemm),
    "conv_transpose": (conv_transpose,),
    "conv_wgrad": (conv_wgrad,),
    "window_attention": (window_attention, attention_sdpa),
    "attention_backward": (attention_backward,),
    "mlp_block": (mlp_block, dw_mlp_block),
}
TEMPLATES = {m.SPACE.name: m for modules in KIND_TEMPLATES.values() for m in modules}
SPACES: dict[str, ScheduleSpace] = {name: module.SPACE for name, module in TEMPLATES.items()}


def spec_kind(spec: ConvSpec | AttentionSpec | MlpSpec) -> str:
    """The template family a spec belongs to: "window_attention" (or its backward,
    "attention_backward"), "mlp_block", or the conv spec's op ("conv", "conv_transpose",
    "conv_wgrad")."""
    if isinstance(spec, AttentionSpec):
        return "attention_backward" if spec.grad else "window_attention"
    if isinstance(spec, MlpSpec):
        return "mlp_block"
    return spec.op


def kind_spaces(spec: ConvSpec | AttentionSpec) -> dict[str, ScheduleSpace]:
    return {m.SPACE.name: m.SPACE for m in KIND_TEMPLATES[spec_kind(spec)]}


def render_region(spec: ConvSpec | AttentionSpec, schedule: Schedule) -> KernelSource:
    """The generated module for one region under one schedule."""
    template = TEMPLATES.get(schedule.name)
    if template is None or schedule.name not in kind_spaces(spec):
        raise InvalidSchedule(f"no {spec_kind(spec)} template for schedule {schedule.name!r}")
    return template.render(spec, schedule)


render_conv = render_region  # the name the conv-only callers know

__all__ = ["KernelSource", "SPACES", "TEMPLATES", "kind_spaces", "render_region", "spec_kind"]
