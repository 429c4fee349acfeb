"""Joint-graph passes (run by the partitioner): what the backward recomputes instead of saving.

Weight transforms. A convolution whose weight is computed from primal inputs by cheap
pointwise and view ops (Tune mode's W * c, for example) would otherwise save that
weight-sized value for backward, which costs as much memory as the activations Tune mode
removes. Such nodes are tagged MUST_RECOMPUTE, so the min-cut partitioner saves W and c
(already alive) and the backward recomputes W * c.

Cheap stems. A convolution that reads a graph input the backward keeps anyway (for the
convolution's own weight gradient) and does few multiply-adds per output element
(C_in/groups x kernel volume <= Config.recompute_conv_macs) is recomputed in the backward,
together with the activations and max pooling right after it. Its outputs are a CNN's
largest activations (full resolution, before the first pooling) and the cheapest to rebuild:
ResNet-50's 7x7 stem is 147 MACs per output; recomputing it adds about 1% to a training
step's multiply-adds (118 M per 224 px image against about 12.3 G), while saving its ReLU
output, max-pool indices and max-pool output costs 43 MiB per 8 images at 224 px.

Window attention. The scores and softmax inside a matched attention are recomputed in ATen
by the backward, so the fused forward kernel can keep them private.

Blocks. The inside of an MLP block that the cost model runs as one kernel (its LayerNorm's
output and statistics, the hidden before and after the activation, the second linear's
output before the layer scale and the residual) is recomputed by the backward from x and
the weights, so the forward saves x alone and the block kernel never writes its hidden. The
backward pays one more pass of the block's forward GEMMs in ATen.

Prologues. An eval-mode batch norm (and its activation) that only a convolution reads in the
forward (pre-activation: BN -> ReLU -> conv, with frozen statistics) is recomputed by the
backward from its input, which the BN's own backward keeps anyway: the forward saves x alone
instead of x and act(BN(x)), and the conv's kernel applies the BN as it loads x (spec.prologue).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx
from torch.utils.checkpoint import CheckpointPolicy

from .activations import as_activation
from .attention_pattern import NoMatch, find_attention
from .conv_chain import BN_EVAL
from .match_attention import is_attention_candidate
from .match_block import block_interiors

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


# What a cheap stem's recomputation follows after the convolution, besides the activations
# a conv epilogue knows (activations.py): max pooling and its getitems.
STEM_POOLS = {
    aten.max_pool2d_with_indices.default,
    aten.max_pool1d_with_indices.default,
    operator.getitem,
} | {  # Inductor's decomposition of max pooling: values and int8 offsets, then indices
    getattr(torch.ops.prims, name).default
    for name in ("_low_memory_max_pool_with_offsets", "_low_memory_max_pool_offsets_to_indices")
    if hasattr(torch.ops.prims, name)
}


def _in_stem_chain(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target in STEM_POOLS or as_activation(node) is not None
    )


def _from_primals(node: object, memo: dict[torch.fx.Node, bool]) -> bool:
    """True if `node` is computed from primal inputs (and constants) by cheap ops only."""
    if not isinstance(node, torch.fx.Node):
        return True  # a constant
    if node not in memo:
        if node.op == "placeholder":
            memo[node] = _is_primal(node)
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
        tagged += _must_recompute(match.interior)
    return tagged


def _must_recompute(nodes) -> int:
    """Tag the untagged `nodes` MUST_RECOMPUTE; returns how many."""
    tagged = 0
    for node in nodes:
        if node.meta.get("recompute") is None:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            tagged += 1
    return tagged


def tag_block_intermediates(joint: torch.fx.GraphModule, num_fwd_outputs: int, plan_block) -> int:
    """Tag the inside of every MLP block that runs as one kernel for recomputation (see the
    module docstring); `plan_block(spec)` is None for those (the backend's cost model)."""
    forward = forward_nodes(joint, num_fwd_outputs)
    return sum(_must_recompute(inner) for inner in block_interiors(joint, forward, plan_block))


def tag_prologues(joint: torch.fx.GraphModule, num_fwd_outputs: int) -> int:
    """Tag every forward [act](getitem(BN_eval(x), 0)) that one convolution alone reads in the
    forward for recomputation (see the module docstring); returns how many nodes."""
    forward = forward_nodes(joint, num_fwd_outputs)

    def sole_forward_user(node: torch.fx.Node) -> torch.fx.Node | None:
        users = [u for u in node.users if u in forward]
        return users[0] if len(users) == 1 else None

    tagged = 0
    for bn in joint.graph.nodes:
        if bn not in forward or bn.target is not BN_EVAL:
            continue
        item = sole_forward_user(bn)
        if item is None or item.target is not operator.getitem or item.args[1] != 0:
            continue
        inside, user = [bn, item], sole_forward_user(item)
        if user is not None and as_activation(user) is not None and user.args[0] is item:
            inside.append(user)
            user = sole_forward_user(user)
        if user is not None and user.target is aten.convolution.default and (
            user.args[0] is inside[-1]
        ):
            tagged += _must_recompute(inside)
    return tagged


def _is_primal(node: object) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "placeholder"
        and (node.name.startswith("primals"))
    )


def conv_macs_per_output(conv: torch.fx.Node) -> int | None:
    """Multiply-adds per output element of an aten.convolution (None for transposed)."""
    weight = conv.args[1].meta.get("val") if isinstance(conv.args[1], torch.fx.Node) else None
    if weight is None or conv.args[6]:
        return None
    return int(weight.shape[1]) * math.prod(int(k) for k in weight.shape[2:])


def _pretty(target) -> str:
    """The op's name as the report shows it: max pooling reads "max_pool2d" (or 1d) whether
    it is one op or Inductor's decomposition (values and offsets, then indices)."""
    name = target._opname
    if name.startswith("_low_memory_max_pool") or name.startswith("max_pool"):
        return "max_pool1d" if "1d" in name else "max_pool2d"
    return name


def tag_cheap_stems(joint: torch.fx.GraphModule, num_fwd_outputs: int, max_macs: int) -> list[str]:
    """Tag cheap stem convolutions and the activation/pooling chain after them for
    recomputation (see the module docstring); returns one line per recomputed stem."""
    if max_macs <= 0:
        return []
    forward = forward_nodes(joint, num_fwd_outputs)
    stems = []
    for conv in joint.graph.nodes:
        if conv not in forward or conv.target is not aten.convolution.default:
            continue
        x = conv.args[0]
        if not _is_primal(x) or all(user in forward for user in x.users):
            continue  # the backward would have to keep an input it does not keep now
        macs = conv_macs_per_output(conv)
        if macs is None or macs > max_macs:
            continue
        chain, stack = [conv], list(conv.users)
        while stack:
            node = stack.pop()
            if node in chain or not _in_stem_chain(node):
                continue
            if any(arg not in chain for arg in node.all_input_nodes):
                continue
            chain.append(node)
            stack.extend(node.users)
        for node in chain:
            if node.meta.get("recompute") is None:
                node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        weight = conv.args[1].meta["val"]
        kernel = "x".join(str(k) for k in weight.shape[2:])
        ops = list(
            dict.fromkeys(_pretty(n.target) for n in chain[1:] if n.target is not operator.getitem)
        )
        shape = ",".join(str(d) for d in x.meta["val"].shape)
        stems.append(
            f"convolution {kernel} {weight.shape[1]}->{weight.shape[0]}"
            + "".join(f" + {op}" for op in ops)
            + f" ({macs} MACs per output): recomputed in backward from the input [{shape}]"
        )
    return stems
