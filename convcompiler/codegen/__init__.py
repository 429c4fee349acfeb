"""Triton emitters: spec + schedule -> KernelSource. Codegen never imports passes.

One template per module; each declares its schedule space (`SPACE`) next to its kernel.
"""

from __future__ import annotations

from ..schedule import InvalidSchedule, Schedule, ScheduleSpace
from ..spec import ConvSpec
from . import direct_depthwise, gemm_1x1, im2win_band, im2win_implicit
from .template import KernelSource

TEMPLATES = {
    module.SPACE.name: module
    for module in (im2win_band, im2win_implicit, direct_depthwise, gemm_1x1)
}

SPACES: dict[str, ScheduleSpace] = {name: module.SPACE for name, module in TEMPLATES.items()}


def render_conv(spec: ConvSpec, schedule: Schedule) -> KernelSource:
    """The generated module for one conv region under one schedule."""
    template = TEMPLATES.get(schedule.name)
    if template is None:
        raise InvalidSchedule(f"no kernel template for schedule {schedule.name!r}")
    return template.render(spec, schedule)


__all__ = ["KernelSource", "SPACES", "TEMPLATES", "render_conv"]
