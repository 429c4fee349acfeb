"""Lowering: region -> schedule -> kernel source -> loaded kernel -> rewritten graph node.

This is where passes (regions) meet codegen (sources); neither imports the other.
"""

from __future__ import annotations

import logging

import torch.fx

from .codegen import render_conv
from .config import Config
from .counters import counters
from .passes import Region
from .report import RegionRecord, Report
from .runtime import KernelCall, interpreter_notice, load_source
from .select import select_conv_schedule

log = logging.getLogger(__name__)


def _record(report: Report, region: Region, **fields) -> None:
    report.regions.append(
        RegionRecord(
            name=region.name,
            kind=region.kind,
            stage=region.stage,
            spec=region.summary,
            **fields,
        )
    )


def lower_conv_regions(
    gm: torch.fx.GraphModule, regions: list[Region], config: Config, report: Report
) -> torch.fx.GraphModule:
    """Replace each runnable conv region's node by a call to its generated kernel."""
    nodes = {node.name: node for node in gm.graph.nodes}
    for region in regions:
        if region.fallback_reason is not None:
            _record(report, region, schedule="aten", params="", kernel_path=None,
                    fallback_reason=region.fallback_reason, why="pattern guard")
            continue
        choice = select_conv_schedule(region.spec, config)
        if choice.fallback_reason is not None:
            counters["fallback.conv"] += 1
            _record(report, region, schedule="aten", params="", kernel_path=None,
                    fallback_reason=choice.fallback_reason, why=choice.why)
            continue
        source = render_conv(region.spec, choice.schedule)
        counters["codegen.conv"] += 1
        interpret = region.spec.device == "cpu"
        if interpret:
            interpreter_notice()
        module, path = load_source(source, config.kernel_path, interpret=interpret)
        node = nodes[region.nodes[-1]]
        x, weight, bias = node.args[:3]
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(
                KernelCall("conv", region.name, getattr(module, source.entry), path),
                (x, weight, bias),
            )
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        log.debug("%s: %s -> %s (%s)", region.name, region.spec.describe(), path.name, choice.why)
        _record(report, region, schedule=choice.schedule.name,
                params=" ".join(f"{k}={v}" for k, v in choice.schedule.params),
                kernel_path=str(path), fallback_reason=None, why=choice.why)
    gm.graph.lint()
    gm.recompile()
    return gm
