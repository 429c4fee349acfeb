"""The `im2win` torch.compile backend (entry point `torch_dynamo_backends: im2win`).

    compiled = torch.compile(model, backend="im2win", options={...}, mode=...)

Inductor hosts the compile (`compile_fx`) and compiles everything outside the regions; the
project's passes run on its hooks (frontend/inductor.py):

    1. pre-grad, on the Dynamo graph: padding modes, train-mode BN, ConvBN Tune fold;
    2. the partitioner, on the joint graph: what the backward recomputes;
    3. post-grad, on each forward, backward or inference graph: regions are found, a
       schedule is selected, the kernel rendered and loaded, and the region's nodes become
       one `torch.ops.im2win.*` op; Inductor then fuses and compiles the rest.

Option `host="aten"` runs the same passes under aot_autograd alone and everything outside
the regions as ATen ops: no C++ compiler needed. It is also what a CPU compile falls back
to, with one warning, when no C++ compiler is found.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import time
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

from ..config import Config
from .inductor import (
    anchored_decompositions,
    aten_host_decompositions,
    config_patches,
    graph_caches_off,
)
from .session import CompileSession

log = logging.getLogger(__name__)

_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@functools.lru_cache(maxsize=1)
def cpp_compiler() -> str | None:
    """The C++ compiler Inductor would use for CPU code, or None when there is none."""
    from torch._inductor import config as inductor_config

    for name in inductor_config.cpp.cxx:
        if name and shutil.which(name):
            return name
    return None


_warned_no_compiler = False
_cpu_notice_given = False


def _cpu_notice(config: Config, example_inputs: Sequence[Any]) -> None:
    """Say once per process what the regions run on CPU tensors by default."""
    global _cpu_notice_given
    if _cpu_notice_given or config.cpu != "aten":
        return
    if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in example_inputs):
        _cpu_notice_given = True
        log.info(
            "convcompiler: the generated kernels target GPUs; on CPU tensors the regions run "
            "the host compiler's own code (cpu='aten'). options={'cpu': 'interpret'} or "
            "CONVCOMPILER_CPU=interpret runs the generated kernels through Triton's "
            "interpreter, for verification (slow)."
        )


def _host(config: Config, example_inputs: Sequence[Any]) -> str:
    """The host compiler for this graph (see Config.host)."""
    global _warned_no_compiler
    if config.host is not None:
        return config.host
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    if any(t.numel() == 0 for t in tensors):
        # Dynamo specialises empty tensors, so this compile only ever sees them. Inductor
        # mis-lowers some ops on them (convolution_backward on an empty batch asserts a
        # wrong weight-gradient stride, torch 2.14), while ATen gives eager's results.
        log.info("convcompiler: a graph input is empty; running it as ATen (host='aten')")
        return "aten"
    cpu = any(t.device.type == "cpu" for t in tensors)
    if cpu and config.cpu == "plan" and all(t.device.type == "cpu" for t in tensors):
        return "aten"  # planning GPU kernels: how the CPU runs the rest does not matter
    if cpu and cpp_compiler() is None:
        if not _warned_no_compiler:
            _warned_no_compiler = True
            log.warning(
                "convcompiler: Inductor needs a C++ compiler for CPU code and none was found "
                "(looked for %s); everything outside the regions runs as ATen instead. "
                "Install one (e.g. `apt-get install g++`, or set CXX), or pass "
                "options={'host': 'aten'} to choose this explicitly.",
                ", ".join(n for n in torch._inductor.config.cpp.cxx if n),
            )
        return "aten"
    return "inductor"


ATEN_HOST_RANGE = "## Call convcompiler ATen-host graph"  # the profiler's range around a run


def _compile_with_aten(
    session: CompileSession, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> Callable:
    """aot_autograd alone: the same hooks, and ATen for everything outside the regions. The
    LayerNorm and dtype conversions alone are decomposed, as Inductor decomposes them, so
    that the matchers that take a norm into a kernel (passes/layer_norm.py) see the same
    graph under either host (and `explain`, `aot` and `cpu="plan"`, which run on this host,
    plan the same regions)."""
    gm = session.pre_grad(gm)

    def stage(graph: torch.fx.GraphModule, _inputs: Sequence[Any]) -> Callable:
        session.post_grad(graph)

        def run(*args: Any) -> Any:  # named in a profile, as Inductor names its graphs' runs
            with torch.profiler.record_function(ATEN_HOST_RANGE):
                return graph.forward(*args)

        return make_boxed_func(run)

    def partition(joint: torch.fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any):
        session.tag_recompute(joint, kwargs["num_fwd_outputs"])
        return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)

    compile_aot = aot_autograd(
        fw_compiler=stage,
        bw_compiler=stage,
        inference_compiler=stage,
        partition_fn=partition,
        decompositions=aten_host_decompositions(),
    )
    return compile_aot(gm, example_inputs)


def im2win(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """Compile one Dynamo graph: regions run generated Triton kernels, Inductor the rest."""
    config = Config.from_options(options)
    if mode not in _MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r} for backend 'im2win'")
    if mode in ("max-autotune", "max-autotune-no-cudagraphs"):
        config = config.replace(autotune=True)
    start = time.perf_counter()
    _cpu_notice(config, example_inputs)
    host = _host(config, example_inputs)
    session = CompileSession(config, gm, example_inputs, mode)
    session.report.host = host
    if host == "inductor":
        from torch._inductor.compile_fx import compile_fx

        off = torch._functorch.config.patch(enable_autograd_cache=False)
        with off if graph_caches_off(session) else contextlib.nullcontext():
            compiled = compile_fx(
                gm,
                example_inputs,
                config_patches=config_patches(session, mode),
                decompositions=anchored_decompositions(),
            )
    else:
        if mode == "reduce-overhead":
            log.info("mode='reduce-overhead' (CUDA graphs) needs host='inductor'")
        compiled = _compile_with_aten(session, gm, example_inputs)
    session.finish()
    session.report.compile_seconds = time.perf_counter() - start
    return compiled
