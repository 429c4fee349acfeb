"""How an attention's output is read back: the layout its region writes.

From the [B, H, N, D] output of the second matmul (or [B, G, H, N, D] for 5-D operands) the
graph may permute, copy and reshape; the region takes that chain in and writes its end
directly, in the letters of AttentionSpec.output ("n,b,h,d", "b,t,n,hd", "bnc" for Swin's
[B, N, H*D], or a stored order of the 4-D output itself such as "bnhd").
"""

from __future__ import annotations

import itertools

import torch
import torch.fx

from .attention_views import (
    NoMatch,
    heads_axes,
    is_float_cast,
    is_reshape,
    same_values,
    shape,
)
from .meta import fake_value, hinted

aten = torch.ops.aten


def _call(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function"


def sole_user(node: torch.fx.Node, forward: set | None) -> torch.fx.Node | None:
    """The one user of `node`; in a joint graph, the one forward user (backward users, such
    as _softmax_backward_data reading the softmax, are ignored)."""
    users = [u for u in node.users if forward is None or u in forward]
    return users[0] if len(users) == 1 else None


def _strides_match(value: torch.Tensor, order: tuple[int, ...]) -> bool:
    """True if `value`'s strides are those of a contiguous tensor with its dims permuted to
    `order` (outermost first); size-1 dims are ignored."""
    sizes, strides = hinted(value.shape), hinted(value.stride())
    running = 1
    for dim in reversed(order):
        if sizes[dim] != 1 and strides[dim] != running:
            return False
        running *= sizes[dim]
    return True


def _permutation(node: torch.fx.Node) -> list[int] | None:
    """The dims order of a permute or transpose, else None."""
    rank = len(shape(node))
    if node.target is aten.permute.default:
        return [a % rank for a in node.args[1]]
    if node.target is aten.transpose.int:
        i, j = (a % rank for a in node.args[1:3])
        order = list(range(rank))
        order[i], order[j] = j, i
        return order
    return None


def _groups(sizes: dict, order: str, target: tuple) -> list[str] | None:
    """`order`'s letters split into consecutive runs whose size products are `target`'s
    dims (a row-major regrouping), or None."""
    groups, i = [], 0
    for size in target:
        group, product = "", 1
        while i < len(order) and (not group or product != size):
            group, product, i = group + order[i], product * sizes[order[i]], i + 1
        if product != size:
            return None
        groups.append(group)
    if i < len(order):  # trailing size-1 letters join the last group
        if not groups or any(sizes[c] != 1 for c in order[i:]):
            return None
        groups[-1] += order[i:]
    return groups


ORDERS = ["bhnd", "bnhd", "nbhd"] + [
    "".join(p) for p in itertools.permutations("bhnd") if "".join(p) not in ("bhnd", "bnhd", "nbhd")
]


def output_chain(node: torch.fx.Node, interior: list, forward: set | None, axis: int | None):
    """(final node, output layout, batch split) from the attention output [B, H, N, D] (or
    [B, G, H, N, D] with its heads at `axis`: the other two leading dims are the batch's
    outer "b" and inner "t" parts, t's size the split). A permute of it, then copies and
    reshapes, ending in a contiguous tensor whose dims group the permuted ones ("n,b,h,d";
    "bnc" for Swin's [B, N, H*D]); the chain goes on through reshapes of that result while
    the batch stays a dim of its own. Else the [B, H, N, D] output itself, stored in any
    order of its dims ("bhnd", "bnhd", ...). See AttentionSpec.output."""
    sizes_in = shape(node)
    letters = "bhnd" if len(sizes_in) == 4 else "bnd"  # 3-D: [B*H, N, D], one head each
    if axis is not None:
        lead = iter("bt")
        letters = "".join("h" if i == axis else next(lead) for i in range(3)) + "nd"
    sizes = dict(zip(letters, sizes_in))
    split = sizes.get("t", 1)
    if not isinstance(split, int):
        raise NoMatch(f"the batch's inner part ({split}) is not a static size")
    chain, cur, order = [], node, letters
    best, permuted = None, False
    while (nxt := sole_user(cur, forward)) is not None:
        perm = _permutation(nxt) if not permuted and _call(nxt) else None
        if perm is not None and not is_reshape(nxt):
            order, permuted = "".join(letters[i] for i in perm), True
        elif not (same_values(nxt) or is_reshape(nxt) or is_float_cast(nxt) and not chain):
            break  # (a cast first: the kernel stores in that dtype)
        chain.append(nxt)
        cur = nxt
        value = fake_value(cur)
        groups = _groups(sizes, order, shape(cur))
        if groups is None or ("t" in order and "bt" not in order):
            continue  # the batch's two parts must view as one: adjacent, outer first
        if _strides_match(value, tuple(range(value.dim()))):
            if best is not None and not any(g in ("b", "bt") for g in groups):
                break  # keep the batch a dim of its own once a result is found
            best = (len(chain), ",".join(groups))
    if best is not None:
        steps, layout = best
        interior.append(node)
        interior.extend(chain[: steps - 1])
        if "h" not in letters:  # the size-1 heads beside the head dim
            layout = layout.replace("d", "hd")
        return chain[steps - 1], "bnc" if layout == "b,n,hd" else layout, split
    value = fake_value(node)
    if axis is not None:
        raise NoMatch("a 5-D attention output is not read as one contiguous tensor")
    for order in ORDERS:
        if "h" not in letters:  # 3-D: its dims in this order, the size-1 heads by the head dim
            kept = order.replace("h", "")
            if _strides_match(value, tuple(letters.index(c) for c in kept)):
                layout = ",".join(kept).replace("d", "hd")
                return node, "bnc" if layout == "b,n,hd" else layout, 1
        elif _strides_match(value, tuple(letters.index(c) for c in order)):
            return node, order, 1
    raise NoMatch(f"the attention output has strides {tuple(value.stride())}")


def read_back(q, k, v, start, interior: list, forward: set | None):
    """(heads axis, output_chain's result): for 5-D operands the first heads axis that both
    the operands and the output view with (a size-1 dim merges either way, so the operands
    alone may allow several); 1 for 4-D ones."""
    values = [fake_value(x.node) for x in (q, k, v)]
    five_d = values[0].dim() == 5
    reasons = []
    for axis in heads_axes(values):
        trial: list = []
        try:
            result = output_chain(start, trial, forward, axis if five_d else None)
        except NoMatch as err:
            reasons.append(str(err))
            continue
        interior.extend(trial)
        return axis, result
    raise NoMatch(reasons[0] if reasons else "no heads axis views q, k and v")


