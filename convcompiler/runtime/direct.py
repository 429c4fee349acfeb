"""Inductor launches a region's kernels itself (CUDA tensors, option launch="inductor").

The region's launcher (a generated module's `launch`) is traced on the fake operands with
each `@triton.jit` kernel wrapped by `torch.library.wrap_triton`, then functionalized:

    permute/clone (the weight pack) -> empty (the output) -> triton_kernel_wrapper_functional

and the traced nodes take the region's place in the post-grad graph. Inductor lowers the
wrapper node to a user-defined Triton kernel that its own wrapper launches (no Python
dispatch per launch; CUDA graphs and AOTInductor can hold it), and fuses the pack with what
computes the weight. Nothing here runs a kernel.

Under Triton's interpreter (CPU tensors) this is not possible: the interpreted kernel would
run on fake tensors, so CPU regions stay `im2win.*` ops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from ..codegen import KernelSource
from .loader import exec_module


def trace_launch(source: KernelSource, operands: Sequence[Any]) -> torch.fx.GraphModule:
    """The functional graph of `source`'s launcher on `operands` (fake tensors or None)."""
    from torch.library import wrap_triton

    module = exec_module(source.text, Path(source.filename), interpret=False)
    for name in source.kernels:
        setattr(module, name, wrap_triton(getattr(module, name)))
    launch = getattr(module, source.entry)
    present = [i for i, t in enumerate(operands) if t is not None]

    def run(*tensors: torch.Tensor) -> torch.Tensor:
        args = list(operands)
        for i, t in zip(present, tensors):
            args[i] = t
        return launch(*args)

    functional = torch.func.functionalize(run, remove="mutations_and_views")
    return make_fx(functional, tracing_mode="real")(*[operands[i] for i in present])


def inline(
    graph: torch.fx.Graph,
    traced: torch.fx.GraphModule,
    operands: Sequence[torch.fx.Node | None],
    before: torch.fx.Node,
) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """Copy `traced` into `graph` before `before`, its placeholders bound to the present
    operands; returns the node of its output and every node added."""
    inputs = iter([o for o in operands if o is not None])
    env: dict[torch.fx.Node, Any] = {}
    added: list[torch.fx.Node] = []
    out = None
    with graph.inserting_before(before):
        for node in traced.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(inputs)
            elif node.op == "output":
                out = torch.fx.map_arg(node.args[0], lambda n: env[n])
            else:
                env[node] = graph.node_copy(node, lambda n: env[n])
                added.append(env[node])
    if not isinstance(out, torch.fx.Node):
        raise ValueError("the launcher does not return one tensor")
    return out, added
