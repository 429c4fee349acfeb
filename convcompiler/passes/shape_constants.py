"""Post-grad pass: compute shape-only subgraphs once, not on every call.

torchvision rebuilds Swin's shifted-window mask inside the graph on every forward
(new_zeros, nine slice fills, masked_fill). Its value depends on shapes only, so this pass
cuts such a subgraph out into a `ShapeConstant`: the first call evaluates it, and later calls
with the same shapes, dtype and device read the cached tensor.

A node is shape-only if it is a constructor (new_zeros, full, arange, ... and lifted
constants), or a pure op on shape-only inputs; the tensor argument of new_* and *_like
constructors contributes only its dtype and device. Only subgraphs that contain a
constructor and feed something that is not shape-only are cut out.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from ..counters import counters
from .context import PassContext

log = logging.getLogger(__name__)
aten = torch.ops.aten

TEMPLATE_CONSTRUCTORS = {  # value from sizes; the tensor argument gives only dtype/device
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
}
CONSTRUCTORS = {
    aten.zeros.default,
    aten.ones.default,
    aten.full.default,
    aten.arange.default,
    aten.arange.start,
    aten.arange.start_step,
    aten.scalar_tensor.default,
    aten.lift_fresh_copy.default,
}
PURE = {
    aten.slice.Tensor,
    aten.slice_scatter.default,
    aten.fill.Tensor,
    aten.fill.Scalar,
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.clone.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.sub.Tensor,
    aten.add.Tensor,
    aten.mul.Tensor,
    aten.ne.Scalar,
    aten.eq.Scalar,
    aten.ne.Tensor,
    aten.eq.Tensor,
    aten.masked_fill.Scalar,
    aten.where.self,
    aten.expand.default,
    aten.select.int,
    aten.copy.default,
    aten.roll.default,
    aten.cat.default,
    aten.alias.default,
}


class ShapeConstant:
    """A cut-out shape-only subgraph, evaluated once per (shapes, dtype, device, sizes)."""

    def __init__(self, gm: torch.fx.GraphModule, name: str) -> None:
        self.gm = gm
        self.__name__ = self.__qualname__ = f"shape_constant_{name}"
        self.__module__ = __name__
        self._cache: dict = {}

    def __call__(self, *inputs):
        key = tuple(
            (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else int(x)
            for x in inputs
        )
        value = self._cache.get(key)
        if value is None:
            counters["shape_constant.built"] += 1
            with torch.no_grad():
                value = self._cache[key] = self.gm(*inputs)
        return value


def _is_shape_only(node: torch.fx.Node, memo: dict) -> bool:
    if node in memo:
        return memo[node]
    memo[node] = False  # cycles cannot happen in a DAG; this guards recursion on failure
    if node.op == "get_attr":
        ok = True
    elif node.op != "call_function":
        ok = False
    elif node.target in TEMPLATE_CONSTRUCTORS:
        ok = all(_is_shape_only(a, memo) for a in node.all_input_nodes[1:] if _is_tensor(a))
    elif node.target in CONSTRUCTORS:
        ok = all(_is_shape_only(a, memo) for a in node.all_input_nodes if _is_tensor(a))
    elif node.target in PURE:
        ok = all(_is_shape_only(a, memo) for a in node.all_input_nodes if _is_tensor(a))
    else:
        ok = False
    memo[node] = ok
    return ok


def _is_tensor(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor) or node.op == "get_attr"


def _has_constructor(node: torch.fx.Node, memo: dict) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen or not memo.get(n, False):
            continue
        seen.add(n)
        if n.target in TEMPLATE_CONSTRUCTORS or n.target in CONSTRUCTORS - {
            aten.lift_fresh_copy.default
        }:
            return True
        stack.extend(n.all_input_nodes)
    return False


def _cut_out(
    gm: torch.fx.GraphModule, root: torch.fx.Node, memo: dict
) -> tuple[torch.fx.GraphModule, list]:
    """A GraphModule computing `root`, whose inputs are the template tensors and sizes."""
    order: list[torch.fx.Node] = []
    seen: set = set()

    def visit(n: torch.fx.Node) -> None:
        if n in seen:
            return
        seen.add(n)
        inputs = n.all_input_nodes[1:] if n.target in TEMPLATE_CONSTRUCTORS else n.all_input_nodes
        for a in inputs:
            if memo.get(a, False):
                visit(a)
        order.append(n)

    visit(root)
    graph, env, outside = torch.fx.Graph(), {}, []
    for n in order:
        for a in n.all_input_nodes:
            if a not in env and not memo.get(a, False):
                env[a] = graph.placeholder(f"in_{len(outside)}")
                outside.append(a)
        if n.op == "get_attr":
            env[n] = graph.get_attr(n.target)
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[root])
    sub = torch.fx.GraphModule(gm, graph)
    return sub, outside


def hoist_shape_constants(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    memo: dict = {}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or not _is_shape_only(node, memo):
            continue
        if all(_is_shape_only(u, memo) for u in node.users) or not _has_constructor(node, memo):
            continue
        if node.meta.get("val") is None:
            continue
        sub, inputs = _cut_out(gm, node, memo)
        with graph.inserting_before(node):
            cached = graph.call_function(ShapeConstant(sub, node.name), tuple(inputs))
        cached.meta.update(node.meta)
        node.replace_all_uses_with(cached, delete_user_cb=lambda u: u is not cached)
        counters["pass.shape_constant.hoisted"] += 1
        log.debug(
            "%s: shape-only subgraph of %d nodes computed once", node.name, len(sub.graph.nodes)
        )
    graph.eliminate_dead_code()
    gm.recompile()
    return gm
