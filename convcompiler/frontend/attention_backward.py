"""An attention backward region's op in the graph: one `im2win.attention_backward` call whose
dq, dk and dv (contiguous [B, H, N|Nk, D]) are laid out back as the sources of q, k and v
(transposed, 3-D or 5-D as matched) with the strides of the nodes they replace, and whose
bias gradient replaces the batch sum of dS (passes/match_attention_backward.py)."""

from __future__ import annotations

import operator

import torch
import torch.fx

from ..passes import Region
from ..passes.meta import run_on_fakes
from ..runtime import ops
from ..runtime.kernel_ref import KernelRef

aten = torch.ops.aten


def _source_layout(name: str, spec, source: torch.Tensor) -> list[tuple]:
    """(op, args) steps that view a canonical gradient ([B, H, X, Y]) as `source` (q, k or
    v as the graph holds it) is laid out: transposed, 3-D or 5-D as matched."""
    steps = []
    if name in spec.transposed:
        steps.append((aten.transpose.int, (2, 3)))
    if source.dim() == 3:
        steps.append((aten.squeeze.dim, (1,)))
    elif source.dim() == 5:  # [B, H, X, Y] -> [b0, b1, H, X, Y] -> the heads at their axis
        axis = spec.heads_axis
        lead = [source.shape[d] for d in range(3) if d != axis]
        steps.append((aten.reshape.default, ([*lead, spec.heads, *source.shape[3:]],)))
        others = iter((0, 1))
        perm = [2 if d == axis else next(others) for d in range(3)] + [3, 4]
        steps.append((aten.permute.default, (perm,)))
    return steps


def replace_attention_backward(
    gm: torch.fx.GraphModule, nodes: dict, region: Region, ref: KernelRef
) -> str | None:
    """Put the op in the graph and the gradients in their targets' places; None, or why not
    (the graph is then left as it was)."""
    graph, spec, roles = gm.graph, ref.spec, dict(region.roles)
    get = lambda role: nodes[roles[role]] if role in roles else None  # noqa: E731
    targets = {role: nodes[roles[role]] for role in ("dq", "dk", "dv", "dbias") if role in roles}
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min(targets.values(), key=order.__getitem__)
    b, h, n, dv = spec.batch, spec.heads, spec.tokens, spec.value_dim  # static (the pass)
    added: list[torch.fx.Node] = []
    replacements = {}

    def call(target, args, kwargs=None) -> torch.fx.Node:
        node = graph.call_function(target, args, kwargs or {})
        added.append(node)
        node.meta["val"] = run_on_fakes(node)
        return node

    try:
        with graph.inserting_before(first):
            dout = call(aten.reshape.default, (get("dout"), [b, h, n, dv]))
            operands = (get("q"), get("k"), get("v"), dout, get("bias"), get("mask"),
                        get("general"), None, get("select"))  # fmt: skip
            op = call(ops.OPS["attention_backward"], (*operands, "dbias" in roles, ref.encode()))
            for i, role in enumerate(("dq", "dk", "dv", "dbias")):
                out = call(operator.getitem, (op, i))
                if role not in targets:
                    continue
                if role != "dbias":
                    name = role[1]
                    for target, args in _source_layout(name, spec, get(name).meta["val"]):
                        out = call(target, (out, *args))
                want, got = targets[role].meta["val"], out.meta["val"]
                if role == "dbias" and got.shape != want.shape and got.numel() == want.numel():
                    out = call(aten.reshape.default, (out, list(want.shape)))  # batch 1: squeezed
                    got = out.meta["val"]
                if got.shape != want.shape or got.dtype != want.dtype:
                    raise ValueError(f"{role}: {tuple(got.shape)} {got.dtype} for "
                                     f"{tuple(want.shape)} {want.dtype}")  # fmt: skip
                if got.stride() != want.stride():  # the target's dense permuted layout
                    order = sorted(range(want.dim()), key=lambda d: (-want.stride(d), d))
                    out = call(aten.permute.default, (out, order))
                    out = call(aten.clone.default, (out,),
                               {"memory_format": torch.contiguous_format})  # fmt: skip
                    inverse = [order.index(d) for d in range(want.dim())]
                    out = call(aten.permute.default, (out, inverse))
                    if out.meta["val"].stride() != want.stride():
                        raise ValueError(f"{role}: strides {want.stride()} not reproduced")
                replacements[role] = out
    except Exception as err:  # a layout the op cannot give: the host's backward stays
        for node in reversed(added):
            if not node.users:
                graph.erase_node(node)
        return f"the gradients cannot take their places: {type(err).__name__}: {err}"
    for role, new in replacements.items():
        targets[role].replace_all_uses_with(new)
    return None
