"""The `im2win` torch.compile backend (entry point `torch_dynamo_backends: im2win`).

    compiled = torch.compile(model, backend="im2win", options={...})

Stages of one compile:
    1. PRE_GRAD_PASSES on the Dynamo graph (torch-level ops), before autograd;
    2. aot_autograd traces forward/backward (or inference) aten graphs;
    3. POST_GRAD_PASSES find regions in each aten graph;
    4. lowering selects a schedule per region, renders and loads its kernel and rewrites
       the node; everything not matched runs as ATen.
With a debug dump directory, each step's graph, the report and the kernels are written
there (convcompiler/debug.py).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

from ..config import Config
from ..inspection.debug import dump_dir_for, dump_lowered
from ..inspection.report import Report, new_report
from ..passes import POST_GRAD_PASSES, PRE_GRAD_PASSES, PassContext, run_passes
from ..passes.recompute import tag_attention_intermediates, tag_cheap_stems, tag_weight_transforms
from ..selection.graph_cache import graph_key
from ..selection.graph_cache import load as load_graph
from ..selection.graph_cache import store as store_graph
from .lowering import Lowering

log = logging.getLogger(__name__)

_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _graph_compiler(
    stage: str,
    config: Config,
    facts: dict,
    lowering: Lowering,
    dump: Path | None,
    lowered: Callable[[torch.fx.GraphModule], object] | None = None,
) -> Callable:
    def compile_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        ctx = PassContext(config=config, stage=stage, facts=facts, dump_dir=dump)
        gm = run_passes(POST_GRAD_PASSES, gm, ctx)
        gm = lowering.lower_regions(gm, ctx.regions)
        dump_lowered(gm, ctx, len(POST_GRAD_PASSES) + 1, lowering.report)
        if lowered is not None:
            lowered(gm)
        return make_boxed_func(gm.forward)

    compile_graph.__name__ = f"im2win_{stage}_compiler"
    return compile_graph


def _partition(
    joint: torch.fx.GraphModule,
    joint_inputs: Sequence[Any],
    *,
    config: Config,
    report: Report,
    **kwargs: Any,
):
    """Min-cut partitioning, with weight transforms (Tune mode's W * c), cheap stems and the
    inside of window attentions recomputed in the backward instead of saved by the forward."""
    tag_weight_transforms(joint)
    stems = tag_cheap_stems(joint, kwargs["num_fwd_outputs"], config.recompute_conv_macs)
    report.recomputed.extend(stems)
    tag_attention_intermediates(joint, kwargs["num_fwd_outputs"])
    return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)


def im2win(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """Compile one Dynamo graph: convolutions run generated im2win Triton kernels."""
    config = Config.from_options(options)
    if mode not in _MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r} for backend 'im2win'")
    if mode in ("max-autotune", "max-autotune-no-cudagraphs"):
        config = config.replace(autotune=True)
    elif mode == "reduce-overhead":
        log.info("mode='reduce-overhead' (CUDA graphs) is not implemented by the im2win backend")
    start = time.perf_counter()
    report = new_report(config)
    lowering = Lowering(config, report)
    key = graph_key(gm, example_inputs, config) if lowering.cache is not None else None
    if key is not None:
        cached = load_graph(lowering.cache, key, report, config)
        if cached is not None:
            report.compile_seconds = time.perf_counter() - start
            return cached

    def store(lowered: torch.fx.GraphModule) -> None:
        if key is not None:
            args = (lowering.cache, key, lowered, report, lowering.record_keys)
            store_graph(*args, num_inputs=len(example_inputs))

    facts: dict[str, Any] = {}
    dump = dump_dir_for(config, report.compile_id)
    pre_grad = PassContext(config=config, stage="pre_grad", facts=facts, dump_dir=dump)
    gm = run_passes(PRE_GRAD_PASSES, gm, pre_grad)
    compile_aot = aot_autograd(
        partition_fn=functools.partial(_partition, config=config, report=report),
        fw_compiler=_graph_compiler("forward", config, facts, lowering, dump),
        bw_compiler=_graph_compiler("backward", config, facts, lowering, dump),
        inference_compiler=_graph_compiler("inference", config, facts, lowering, dump, store),
    )
    compiled = compile_aot(gm, example_inputs)
    report.compile_seconds = time.perf_counter() - start
    return compiled
