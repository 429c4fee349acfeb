"""Reading aten-graph fake-tensor metadata (`node.meta["val"]`) as plain values.

Sizes come back as ints, or as sympy expressions when Dynamo made them dynamic.
"""

from __future__ import annotations

import sympy
import torch
import torch.fx

from ..spec import Size


def fake_value(node: object) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def as_size(x: int | torch.SymInt) -> Size:
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        return int(expr) if expr.is_number else expr
    return int(x)


def sizes(t: torch.Tensor) -> tuple[Size, ...]:
    return tuple(as_size(s) for s in t.shape)


def strides(t: torch.Tensor) -> tuple[Size, ...]:
    return tuple(as_size(s) for s in t.stride())


def size_hints(*tensors: torch.Tensor) -> tuple[tuple[str, int], ...]:
    """Hints for every symbol appearing in the sizes of `tensors`, sorted by name."""
    hints: dict[str, int] = {}
    for t in tensors:
        for s in tuple(t.shape) + tuple(t.stride()):
            if not isinstance(s, torch.SymInt) or s.node.expr.is_number:
                continue
            shape_env = s.node.shape_env
            for sym in s.node.expr.free_symbols:
                if sym.name not in hints:
                    hints[sym.name] = int(shape_env.var_to_val[sym])
    return tuple(sorted(hints.items()))


def _same(a: Size, b: Size) -> bool:
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def _contiguous_strides(shape: tuple[Size, ...]) -> tuple[Size, ...]:
    out: list[Size] = []
    running: Size = 1
    for s in reversed(shape):
        out.append(running)
        running = running * s
    return tuple(reversed(out))


def memory_layout(t: torch.Tensor) -> str:
    """ "nchw" (contiguous), "nhwc" (channels_last, 4-D only) or "strided"."""
    shape, stride = sizes(t), strides(t)
    if all(_same(a, b) for a, b in zip(stride, _contiguous_strides(shape))):
        return "nchw"
    if len(shape) == 4:
        n, c, h, w = shape
        channels_last = _contiguous_strides((n, h, w, c))
        expected = (channels_last[0], channels_last[3], channels_last[1], channels_last[2])
        if all(_same(a, b) for a, b in zip(stride, expected)):
            return "nhwc"
    return "strided"


def dynamo_sources(node: torch.fx.Node) -> set[str]:
    """Names of the Dynamo-graph nodes an aten node was created from (`meta["from_node"]`)."""
    names: set[str] = set()
    stack = list(node.meta.get("from_node", ()))
    while stack:
        src = stack.pop()
        names.add(src.name)
        stack.extend(getattr(src, "from_node", ()))
    return names
