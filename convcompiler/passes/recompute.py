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

from .attention_pattern import NoMatch, find_attention
from .match_attention import is_attention_candidate

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


def forward_nodes(joint: torch.fx.GraphModule, num_fwd_outputs: int) -> set[torch.fx.Node]:
    """The nodes the joint graph's forward outputs depend on."""
    output = next(n for n in reversed(joint.graph.nodes) if n.op == "output")
    stack = [a for a in output.args[0][:num_fwd_outputs] if isinstance(a, torch.fx.Node)]
    seen: set[torch.fx.Node] = set()
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def tag_attention_intermediates(joint: torch.fx.GraphModule, num_fwd_outputs: int) -> int:
    """Tag the inside of every window attention (scores, softmax, their copies) for
    recomputation: the backward recomputes them in ATen from q, k, v and the additive terms,
    and the forward keeps them private, so the fused forward kernel can replace them."""
    forward = forward_nodes(joint, num_fwd_outputs)
    tagged = 0
    for node in list(joint.graph.nodes):
        if node not in forward or not is_attention_candidate(node):
            continue
        try:
            match = find_attention(node, forward)
        except NoMatch:
            continue
        for inner in match.interior:
            if inner.meta.get("recompute") is None:
                inner.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                tagged += 1
    return tagged
