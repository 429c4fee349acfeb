"""Pre-grad pass: ConvBN "Tune mode" for transfer learning (BN frozen in eval, weights trained).

Rule:  batch_norm(conv(x, W, b), mean, var, g, beta, training=False)
           => conv(x, W * c, beta + c * (b - mean)),   c = g * rsqrt(var + eps)

Applied on the Dynamo graph, before autograd, when grad mode is on and the conv weight or
the BN affine parameters require grad: autograd then differentiates through the weight
transform, so every gradient equals eager's in eval mode, the running statistics are not
updated (eval BN never updates them), and BN's backward no longer needs the conv output.
W * c is cheap to recompute, so the min-cut partitioner (see frontend/backend.py) keeps W and c
rather than saving the folded weight. In inference the BN is instead folded into the conv
kernel's epilogue after autograd ("deploy", match_conv.py).

Leaves a fact for match_conv: facts["conv_bn_tune"] = {names of the new conv nodes}.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F

from .context import PassContext

CONVS = {torch.conv1d: 1, torch.conv2d: 2, F.conv1d: 1, F.conv2d: 2}
_BATCH_NORMS = {F.batch_norm, torch.batch_norm}


def _example(node: object) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("example_value")
    return value if isinstance(value, torch.Tensor) else None


def bn_args(node: torch.fx.Node) -> dict | None:
    """F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)."""
    names = (
        "input",
        "running_mean",
        "running_var",
        "weight",
        "bias",
        "training",
        "momentum",
        "eps",
    )
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    if node.target is torch.batch_norm:  # weight, bias, mean, var, training, momentum, eps
        order = (
            "input",
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "training",
            "momentum",
            "eps",
        )
        args = dict(zip(order, node.args))
    else:
        args = dict(zip(names, node.args))
    args.update(node.kwargs)
    for key, value in defaults.items():
        args.setdefault(key, value)
    return args if all(k in args for k in names) else None


def is_batch_norm(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in _BATCH_NORMS


def _tunable(conv: torch.fx.Node, bn: dict) -> bool:
    if bn["training"] is not False or not isinstance(bn["eps"], (int, float)):
        return False
    if bn["running_mean"] is None or bn["running_var"] is None:
        return False
    params = [conv.args[1], bn["weight"], bn["bias"]]
    return any(getattr(_example(p), "requires_grad", False) for p in params)


def fold_conv_bn_tune(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    folded = ctx.facts.setdefault("conv_bn_tune", set())
    if not torch.is_grad_enabled():
        return gm
    graph = gm.graph
    for bn_node in list(graph.nodes):
        if not is_batch_norm(bn_node):
            continue
        bn = bn_args(bn_node)
        conv = bn["input"] if bn else None
        if (
            not isinstance(conv, torch.fx.Node)
            or conv.op != "call_function"
            or conv.target not in CONVS
            or len(conv.users) != 1
            or not _tunable(conv, bn)
        ):
            continue
        x, weight = conv.args[:2]
        conv_bias = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
        rest = conv.args[3:]
        shape = (-1,) + (1,) * (CONVS[conv.target] + 1)
        with graph.inserting_before(bn_node):
            var_eps = graph.call_function(operator.add, (bn["running_var"], float(bn["eps"])))
            c = graph.call_function(torch.rsqrt, (var_eps,))
            if bn["weight"] is not None:
                c = graph.call_function(operator.mul, (c, bn["weight"]))
            w_folded = graph.call_function(
                operator.mul, (weight, graph.call_function(torch.reshape, (c, shape)))
            )
            centred = graph.call_function(operator.neg, (bn["running_mean"],))
            if conv_bias is not None:
                centred = graph.call_function(operator.sub, (conv_bias, bn["running_mean"]))
            b_folded = graph.call_function(operator.mul, (c, centred))
            if bn["bias"] is not None:
                b_folded = graph.call_function(operator.add, (bn["bias"], b_folded))
            kwargs = {k: v for k, v in conv.kwargs.items() if k != "bias"}
            new_conv = graph.call_function(conv.target, (x, w_folded, b_folded, *rest), kwargs)
        kept = ("stack_trace", "nn_module_stack")
        for node in (c, w_folded, b_folded, new_conv):
            node.meta.update({k: v for k, v in bn_node.meta.items() if k in kept})
        padding = ctx.facts.get("conv_padding_mode", {})
        if conv.name in padding:  # facts about the old conv hold for the new one
            padding[new_conv.name] = padding[conv.name]
        bn_node.replace_all_uses_with(new_conv)
        graph.erase_node(bn_node)
        graph.erase_node(conv)
        folded.add(new_conv.name)
    gm.recompile()
    return gm
