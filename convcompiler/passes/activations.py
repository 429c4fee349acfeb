"""Pointwise activations that a conv kernel can apply in its epilogue, read from aten nodes.

Canonical forms: relu6 is hardtanh(0, 6); clamp(x, lo, hi) with both bounds is hardtanh;
clamp_min(x, 0) is relu.
"""

from __future__ import annotations

import torch
import torch.fx

from ..spec import Activation

aten = torch.ops.aten


def _arg(node: torch.fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def as_activation(node: torch.fx.Node) -> Activation | None:
    """The activation `node` computes on its first argument, or None."""
    if node.op != "call_function":
        return None
    t = node.target
    if t is aten.relu.default:
        return Activation("relu")
    if t is aten.hardtanh.default:
        return Activation(
            "hardtanh",
            (float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0))),
        )
    if t is aten.clamp.default:
        lo, hi = _arg(node, 1, "min", None), _arg(node, 2, "max", None)
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            return Activation("hardtanh", (float(lo), float(hi)))
        return None
    if t is aten.clamp_min.default and _arg(node, 1, "min", None) == 0:
        return Activation("relu")
    if t is aten.gelu.default:
        return Activation("gelu_tanh" if _arg(node, 1, "approximate", "none") == "tanh" else "gelu")
    if t is aten.leaky_relu.default:
        return Activation("leaky_relu", (float(_arg(node, 1, "negative_slope", 0.01)),))
    simple = {
        aten.silu.default: "silu",
        aten.hardswish.default: "hardswish",
        aten.sigmoid.default: "sigmoid",
        aten.hardsigmoid.default: "hardsigmoid",
    }
    return Activation(simple[t]) if t in simple else None
