"""Post-grad pass on backward graphs: a ReLU's backward folds into the conv gradient kernels.

    convolution(where(m, 0, g), w, transposed=True)  =>  im2win_conv[masked](g, w, m)
    convolution_backward(where(m, 0, g), x, w)[1]    =>  im2win_conv_wgrad[masked](g, x, m)
    where(m, g, 0)                                   =>  where(logical_not(m), 0, g)

A ReLU (or a clamp: ReLU6, hardtanh, torch.clamp) right after a conv becomes
where(m, 0, g) or where(m, g, 0) in the backward graph (threshold_backward's and clamp's
decompositions; m is a saved or recomputed bool mask), and that is the dy of the conv's
backward. The second form gets a logical_not, which Inductor fuses with what computes m. Both gradient kernels then read g and the 1-byte
mask instead of a masked copy that one kernel writes and each of them reads back. The other
reader of the copy, the bias gradient sum(where(m, 0, g)), is a reduction that Inductor
fuses with the where, so the copy is never written at all.

Guards (any failing keeps the where as it is; the regions still run, reading the copy):
- the where is where.self(m, 0, g) or (m, g, 0) with a literal zero, m bool and g of the
  where's dtype,
  both of its shape (no broadcast) and g in its memory layout;
- every reader of the where is a gradient region of a regular conv (its input gradient, a
  transposed conv; its weight gradient) that a generated kernel can run, or a sum (the bias
  gradient): any other reader would need the copy anyway.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..counters import counters
from .context import PassContext, Region
from .meta import fake_value, memory_layout, run_on_fakes

aten = torch.ops.aten
RULE = "convolution_backward(where(m, 0, g), x, w) => im2win gradient kernels[masked](g, m)"


def _reader(region: Region, nodes: dict[str, torch.fx.Node]) -> str | None:
    """The node of `region` that reads the conv's gradient dy, if the region is a generated
    kernel candidate for a regular conv's input or weight gradient; else None (a transposed
    conv's weight gradient reads its dy as the kernel's x)."""
    if region.stage != "backward" or region.spec is None or region.fallback_reason is not None:
        return None
    roles = dict(region.roles)
    if region.mode == "grad_input" and region.spec.op == "conv_transpose":
        return roles.get("conv")
    if region.kind == "conv_wgrad" and not nodes[roles["wgrad"]].args[7]:
        return roles["wgrad"]
    return None


def _is_zero(node: object) -> bool:
    if isinstance(node, (int, float)):
        return node == 0
    return (
        isinstance(node, torch.fx.Node)
        and node.target is aten.full.default
        and list(node.args[0]) == []
        and node.args[1] == 0
    )


def _masked_gradient(node: object) -> bool:
    """Whether `node` is where(m, 0, g) or where(m, g, 0) that a gradient kernel can read as
    g and a mask."""
    if not isinstance(node, torch.fx.Node) or node.target is not aten.where.self:
        return False
    mask, a, b = node.args
    if not (_is_zero(a) or _is_zero(b)):
        return False
    grad = b if _is_zero(a) else a
    out, m, g = fake_value(node), fake_value(mask), fake_value(grad)
    if out is None or m is None or g is None:
        return False
    same_shape = all(
        m.dim() == out.dim() == t.dim()
        and all(statically_known_true(a == b) for a, b in zip(t.shape, out.shape))
        for t in (m, g)
    )
    return (
        same_shape
        and m.dtype == torch.bool
        and g.dtype == out.dtype
        and memory_layout(g) == memory_layout(out)
    )


def fuse_gradient_masks(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if ctx.stage != "backward":
        return gm
    nodes = {node.name: node for node in gm.graph.nodes}
    readers: dict[str, int] = {}  # reader node name -> index of its region in ctx.regions
    for index, region in enumerate(ctx.regions):
        name = _reader(region, nodes)
        if name is not None:
            readers[name] = index
    by_where: dict[torch.fx.Node, list[int]] = {}
    for name, index in readers.items():
        dy = nodes[name].args[0]
        if isinstance(dy, torch.fx.Node):
            by_where.setdefault(dy, []).append(index)
    for where, indices in by_where.items():
        if not _masked_gradient(where):
            continue
        others = [u for u in where.users if u.name not in readers]
        if any(u.target is not aten.sum.dim_IntList for u in others):
            continue  # another reader needs the masked copy: nothing to save
        if any(where in nodes[_reader(ctx.regions[i], nodes)].args[1:] for i in indices):
            continue  # a reader that also reads it as something else than dy
        roles: tuple[tuple[str, str], ...] = (("grad_mask", where.name),)
        if not _is_zero(where.args[1]):  # where(m, g, 0): the kernels zero where ~m
            with gm.graph.inserting_before(where):
                keep = gm.graph.call_function(aten.logical_not.default, (where.args[0],))
            keep.meta["val"] = run_on_fakes(keep)
            roles += (("mask", keep.name),)
        for index in indices:
            region = ctx.regions[index]
            spec = dataclasses.replace(region.spec, input_mask=True)
            summary = region.summary
            summary = spec.describe() if summary == region.spec.describe() else f"{summary} masked"
            ctx.regions[index] = dataclasses.replace(
                region,
                spec=spec,
                roles=(*region.roles, *roles),
                summary=summary,
                rule=f"{region.rule}; {RULE}",
            )
            counters["fuse.grad_mask"] += 1
    return gm
