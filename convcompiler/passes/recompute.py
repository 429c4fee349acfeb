"""Joint-graph pass (run by the partitioner): weight transforms are recomputed, not saved.

A convolution whose weight is computed from primal inputs by cheap pointwise and view ops
(Tune mode's W * c, for example) would otherwise save that weight-sized value for backward,
which costs as much memory as the activations Tune mode removes. Such nodes are tagged
MUST_RECOMPUTE, so the min-cut partitioner saves W and c (already alive) and the backward
recomputes W * c.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.utils.checkpoint import CheckpointPolicy

aten = torch.ops.aten
CHEAP = {
    aten.mul.Tensor,
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.div.Tensor,
    aten.neg.default,
    aten.rsqrt.default,
    aten.sqrt.default,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.expand.default,
}


def _from_primals(node: object, memo: dict[torch.fx.Node, bool]) -> bool:
    """True if `node` is computed from primal inputs (and constants) by cheap ops only."""
    if not isinstance(node, torch.fx.Node):
        return True  # a constant
    if node not in memo:
        if node.op == "placeholder":
            memo[node] = node.name.startswith("primals")
        elif node.op == "call_function" and node.target in CHEAP:
            memo[node] = all(_from_primals(a, memo) for a in node.all_input_nodes)
        else:
            memo[node] = False
    return memo[node]


def tag_weight_transforms(joint: torch.fx.GraphModule) -> int:
    """Tag the weight transforms feeding convolutions; returns how many nodes were tagged."""
    memo: dict[torch.fx.Node, bool] = {}
    tagged = 0
    for conv in joint.graph.nodes:
        if conv.op != "call_function" or conv.target is not aten.convolution.default:
            continue
        weight = conv.args[1]
        if not isinstance(weight, torch.fx.Node) or weight.op == "placeholder":
            continue
        if not _from_primals(weight, memo):
            continue
        stack = [weight]
        while stack:
            node = stack.pop()
            if node.op != "call_function" or node.meta.get("recompute") is not None:
                continue
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            tagged += 1
            stack.extend(node.all_input_nodes)
    return tagged
