"""Values known at compile time: a node that depends only on a module's parameters and buffers
(their values now: PassContext.constants) and on ops that build tensors from shapes alone
(`arange`, `full`, comparisons of them: Swin's shift mask, NA's window mask).

Such a value is computed by running the node's ancestors on the real tensors. It is what the
graph computes now; a pass that relies on it must stay exact if a buffer later changes (the
attention kernel recomputes its key tiles from each call's mask, and only its price comes
from here).
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

log = logging.getLogger(__name__)

MAX_NODES = 64  # a constant worth computing is a short chain (a buffer and a where, a mask)
MAX_ELEMENTS = 1 << 26  # and small enough to compute at compile time


def _ancestors(node: torch.fx.Node, constants: Mapping[str, torch.Tensor]) -> list | None:
    """node and the nodes it depends on, inputs first; None unless every placeholder among
    them is a constant and every op is a deterministic function of its arguments."""
    order: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()

    def visit(n: torch.fx.Node) -> bool:
        if n in seen:
            return True
        seen.add(n)
        if len(seen) > MAX_NODES:
            return False
        if n.op == "placeholder":
            ok = n.name in constants
        elif n.op == "get_attr":
            ok = True
        elif n.op == "call_function":
            tags = getattr(n.target, "tags", ())
            ok = torch.Tag.nondeterministic_seeded not in tags and all(
                visit(a) for a in n.all_input_nodes
            )
        else:
            ok = False
        order.append(n)
        return ok

    return order if visit(node) else None


def constant_value(
    gm: torch.fx.GraphModule, node: torch.fx.Node, constants: Mapping[str, torch.Tensor]
) -> torch.Tensor | None:
    """node's value computed from constants alone, or None when it depends on anything else
    (or is too large or fails to compute)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.numel() > MAX_ELEMENTS:
        return None
    order = _ancestors(node, constants)
    if order is None:
        return None
    env: dict[torch.fx.Node, object] = {}
    try:
        with unset_fake_temporarily(), torch.no_grad():
            for n in order:
                if n.op == "placeholder":
                    env[n] = constants[n.name]
                elif n.op == "get_attr":
                    env[n] = getattr(gm, n.target)
                else:
                    args, kwargs = torch.fx.map_arg((n.args, n.kwargs), lambda a: env[a])
                    env[n] = n.target(*args, **kwargs)
    except Exception as err:  # an op that cannot run here (a device not present): not known
        log.debug("%s is not computed at compile time: %s", node.name, err)
        return None
    value = env[node]
    return value if isinstance(value, torch.Tensor) else None
