"""Post-grad pass on backward graphs: a ReLU's backward folds into the conv gradient kernels.

    convolution(where(m, 0, g), w, transposed=True)  =>  im2win_conv[masked](g, w, m)
    convolution_backward(where(m, 0, g), x, w)[1]    =>  im2win_conv_wgrad[masked](g, x, m)

where m (True: the gradient is 0) comes from the form the activation's backward takes:

    where(m, 0, g)                   ReLU, ReLU6, hardtanh under Inductor's decompositions
    where(m, g, 0)                   torch.clamp              m := logical_not(m)
    threshold_backward(g, y, t)      ReLU on the ATen host    m := y <= t
    hardtanh_backward(g, y, lo, hi)  ReLU6 on the ATen host   m := (y <= lo) | (y >= hi)

That masked gradient is the dy of the conv before the activation. Both gradient kernels
then read g and the 1-byte mask instead of a masked copy that one kernel writes and each of
them reads back. The other reader of the copy, the bias gradient sum(dy), is a reduction
Inductor fuses with the where, so under Inductor the copy is never written at all. A mask
the pass builds is a few pointwise nodes, which Inductor fuses with what computes y or m.

BYTES: fused only where that saves memory traffic. Per gradient element, with e = g's item
size, N conv readers and s the mask's source (m: 1 byte; y: e bytes), the copy costs its
producer (read g and the source, write e) and N reads of e; fused, the readers read e + 1
each, and a mask that is not a saved tensor is written once (1 byte). Under Inductor a bias
gradient's sum fuses with the where either way; on the ATen host it keeps the copy, so
nothing is saved there. E.g. Tune mode (a bias) in float32, both gradients, a computed mask:
17 bytes per element (read g and m, write the copy, two reads of it) become 16 (4 - 2 - 1
= 1 saved); in float16, 2 - 2 - 1 < 0: not fused.

Guards (any failing keeps the masked gradient as it is; the regions still run, reading it):
- one of the forms above, with a literal zero (where) or number (t, lo, hi); m bool; m, y
  and g of its shape (no broadcast); g of its dtype and memory layout;
- every reader is a gradient region of a regular conv (its input gradient, a transposed
  conv; its weight gradient) that a generated kernel can run, reading it as dy, or a sum
  (the bias gradient): any other reader would need the copy anyway.
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
RULE = "convolution_backward(where(m, 0, g), x, w) => gradient kernels[masked](g, m)"


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
    if not isinstance(node, torch.fx.Node):
        return False
    if node.target is aten.scalar_tensor.default:  # the ATen host's zero
        return node.args[0] == 0
    return node.target is aten.full.default and list(node.args[0]) == [] and node.args[1] == 0


def gradient_operand(node: torch.fx.Node) -> object:
    """The gradient g of a masked gradient `node` (one of the forms above), live."""
    if node.target is aten.where.self:
        return node.args[2] if _is_zero(node.args[1]) else node.args[1]
    return node.args[0]  # threshold_backward(g, y, t), hardtanh_backward(g, y, lo, hi)


def _mask_of(node: torch.fx.Node, graph: torch.fx.Graph) -> torch.fx.Node:
    """The bool mask (True: the gradient is 0) of a masked gradient; new nodes before it
    (Inductor fuses them with what computes their inputs) unless it is where(m, 0, g)'s m."""
    if node.target is aten.where.self and _is_zero(node.args[1]):
        return node.args[0]
    with graph.inserting_before(node):
        if node.target is aten.where.self:  # where(m, g, 0)
            mask = graph.call_function(aten.logical_not.default, (node.args[0],))
        elif node.target is aten.threshold_backward.default:
            mask = graph.call_function(aten.le.Scalar, (node.args[1], node.args[2]))
        else:  # hardtanh_backward: 0 outside (lo, hi)
            low = graph.call_function(aten.le.Scalar, (node.args[1], node.args[2]))
            high = graph.call_function(aten.ge.Scalar, (node.args[1], node.args[3]))
            low.meta["val"], high.meta["val"] = run_on_fakes(low), run_on_fakes(high)
            mask = graph.call_function(aten.logical_or.default, (low, high))
    mask.meta["val"] = run_on_fakes(mask)
    return mask


def _masked_gradient(node: object) -> bool:
    """Whether `node` is a gradient zeroed by a mask (the forms above) that a gradient kernel
    can read as g and the mask."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.target is aten.where.self:
        if not (_is_zero(node.args[1]) or _is_zero(node.args[2])):
            return False
        operands = (node.args[0], gradient_operand(node))
    elif node.target in (aten.threshold_backward.default, aten.hardtanh_backward.default):
        if not all(isinstance(a, (int, float)) for a in node.args[2:]):
            return False
        operands = node.args[:2]
    else:
        return False
    out = fake_value(node)
    values = [fake_value(t) for t in operands]
    if out is None or any(v is None for v in values):
        return False
    same_shape = all(
        v.dim() == out.dim() and all(statically_known_true(a == b) for a, b in zip(v.shape, out.shape))
        for v in values
    )
    g = fake_value(gradient_operand(node))
    bool_mask = node.target is not aten.where.self or values[0].dtype == torch.bool
    return (
        same_shape
        and bool_mask
        and g.dtype == out.dtype
        and memory_layout(g) == memory_layout(out)
    )


def bytes_saved(node: torch.fx.Node, readers: int, summed: bool, host: str) -> int:
    """Bytes per gradient element the fusion saves, to first order (each tensor read once
    per reader; see BYTES in the module docstring). e: g's item size; s: the mask's source
    (m: 1 byte, y: e bytes); `summed`: a bias gradient also reads the masked copy."""
    e = fake_value(node).element_size()
    where = node.target is aten.where.self
    s = 1 if where else e
    given = where and _is_zero(node.args[1])  # m is used as it is, nothing is built
    if host == "aten":  # no fusion: a built mask is one more op; a sum keeps the copy
        if summed:
            return -readers - (0 if given else s + 1)
        return 2 * e + s - readers - (0 if given else s + 1)
    # Inductor fuses the mask and the sum with what computes their inputs, but the mask is
    # now written (unless it is a saved tensor already) and the kernels read it
    written = 0 if given and node.args[0].op == "placeholder" else 1
    if summed:
        return e - readers - written
    return 2 * e + s - readers - (s + 1 if written else 0)


def fuse_gradient_masks(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if ctx.stage != "backward":
        return gm
    nodes = {node.name: node for node in gm.graph.nodes}
    # dy -> [(index of the region in ctx.regions, its node that reads dy)]
    by_where: dict[torch.fx.Node, list[tuple[int, torch.fx.Node]]] = {}
    for index, region in enumerate(ctx.regions):
        name = _reader(region, nodes)
        if name is not None and isinstance(nodes[name].args[0], torch.fx.Node):
            by_where.setdefault(nodes[name].args[0], []).append((index, nodes[name]))
    for where, readers in by_where.items():
        if not _masked_gradient(where):
            continue
        others = [u for u in where.users if all(u is not node for _, node in readers)]
        if any(u.target is not aten.sum.dim_IntList for u in others):
            continue  # another reader needs the masked copy: nothing to save
        if any(where in node.args[1:] for _, node in readers):
            continue  # a reader that also reads it as something else than dy
        if bytes_saved(where, len(readers), bool(others), ctx.host) <= 0:
            counters["fuse.grad_mask_not_worth"] += 1
            continue  # the masked copy costs no more than the mask would
        mask = _mask_of(where, gm.graph)
        roles = (("grad_mask", where.name), ("mask", mask.name))
        for index, _ in readers:
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
