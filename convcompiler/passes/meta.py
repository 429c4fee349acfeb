"""Reading aten-graph fake-tensor metadata (`node.meta["val"]`) as plain values.

Sizes come back as ints, or as sympy expressions when Dynamo made them dynamic.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx
from torch.fx.experimental import symbolic_shapes

from ..spec import Size

# A SymInt's hint, read without adding a guard: `optimization_hint` in recent torch (2.14);
# torch 2.11 has no such name, and its `size_hint` reads the same recorded value.
if hasattr(symbolic_shapes, "optimization_hint"):
    optimization_hint = symbolic_shapes.optimization_hint
else:
    optimization_hint = symbolic_shapes.size_hint


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
            env = s.node.shape_env
            known = getattr(env, "backed_var_to_val", None) or env.var_to_val
            for sym in s.node.expr.free_symbols:
                if sym.name not in hints:
                    hints[sym.name] = int(known[sym])
    return tuple(sorted(hints.items()))


def hinted(values: tuple[int | torch.SymInt, ...]) -> tuple[int, ...]:
    """Sizes or strides at their hints (no guard added)."""
    return tuple(optimization_hint(v) if isinstance(v, torch.SymInt) else int(v) for v in values)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, running = [], 1
    for s in reversed(shape):
        out.append(running)
        running *= max(s, 1)
    return tuple(reversed(out))


def memory_layout(t: torch.Tensor) -> str:
    """ "nchw" (contiguous), "nhwc" (channels_last, or channels_last_3d for 5-D) or
    "strided".

    Decided at the size hints: a memory format does not depend on the sizes' values.
    """
    shape, stride = hinted(tuple(t.shape)), hinted(tuple(t.stride()))
    if stride == _contiguous_strides(shape):
        return "nchw"
    if len(shape) in (4, 5):
        n, c, *spatial = shape
        last = _contiguous_strides((n, *spatial, c))
        if stride == (last[0], last[-1], *last[1:-1]):
            return "nhwc"
    return "strided"


def fp32_precision(flags: object, allow_tf32: Callable[[], bool]) -> str:
    """How a float32 GEMM runs under one torch backend's flags (cuDNN's conv, or cuBLAS's
    matmul): its `fp32_precision` when set, else its legacy `allow_tf32` (read only then:
    torch refuses to read the legacy flag once the new one was set); "tf32" or "ieee"."""
    flag = getattr(flags, "fp32_precision", None) if flags is not None else None
    if flag is not None and flag != "none":
        return "tf32" if flag == "tf32" else "ieee"
    return "tf32" if allow_tf32() else "ieee"


def shape_summary(node: torch.fx.Node) -> str:
    """ "[2,3,8,8] -> [2,4,6,6]": the first tensor argument's shape and the node's."""
    inputs = [fake_value(a) for a in node.args if fake_value(a) is not None]
    out = fake_value(node)

    def fmt(t: torch.Tensor | None) -> str:
        return "?" if t is None else "[" + ",".join(str(s) for s in sizes(t)) + "]"

    return f"{fmt(inputs[0] if inputs else None)} -> {fmt(out)}"


def conv_summary(node: torch.fx.Node) -> str:
    """A fallback conv's row, as a spec would describe it, from the node alone:
    "[1,8,14,14] -> [1,4,15,15] 2x2 s2x2 transposed float32 nchw"."""
    x, w = fake_value(node.args[0]), fake_value(node.args[1])
    if x is None or w is None or len(node.args) < 9:
        return shape_summary(node)
    stride, padding, dilation, transposed, _, groups = node.args[3:9]

    def dims(values) -> str:
        return "x".join(str(v) for v in values)

    parts = [shape_summary(node), dims(sizes(w)[2:]) or "0-d"]
    for letter, values, unit in (("s", stride, 1), ("p", padding, 0), ("d", dilation, 1)):
        if any(v != unit for v in values):
            parts.append(letter + dims(values))
    if groups != 1:
        parts.append(f"g{groups}")
    if transposed:
        parts.append("transposed")
    parts += [str(x.dtype).removeprefix("torch."), memory_layout(x)]
    return " ".join(parts)


def dynamo_sources(node: torch.fx.Node) -> set[str]:
    """Names of the Dynamo-graph nodes an aten node was created from (`meta["from_node"]`)."""
    names: set[str] = set()
    stack = list(node.meta.get("from_node", ()))
    while stack:
        src = stack.pop()
        names.add(src.name)
        stack.extend(getattr(src, "from_node", ()))
    return names


def run_on_fakes(node: torch.fx.Node):
    """Run `node`'s target on its arguments' fake values, in their fake mode: the value a
    node a pass adds gets as `meta["val"]`."""
    from torch._guards import detect_fake_mode

    def val(a):
        return a.meta["val"] if isinstance(a, torch.fx.Node) else a

    args = torch.fx.map_arg(node.args, val)
    kwargs = torch.fx.map_arg(node.kwargs, val)
    fakes = [a.meta["val"] for a in node.all_input_nodes]
    mode = detect_fake_mode(fakes)
    with mode if mode is not None else torch._subclasses.FakeTensorMode():
        return node.target(*args, **kwargs)


def _same(a, b) -> bool:
    """Sizes equal for every value of the symbols (no guard is added)."""
    return symbolic_shapes.statically_known_true(a == b)


def layout_mismatch(new, old) -> str | None:
    """Why a new value cannot stand in for the node it replaces (sizes, strides of every
    dimension longer than 1, dtype), or None."""
    if not isinstance(old, torch.Tensor):
        return "the replaced node has no tensor metadata"
    if new.dtype != old.dtype or len(new.shape) != len(old.shape):
        return f"the op would give {new.dtype} {len(new.shape)}-D, eager {old.dtype}"
    if not all(_same(a, b) for a, b in zip(new.shape, old.shape)):
        return f"the op's shape {tuple(new.shape)} differs from eager's {tuple(old.shape)}"
    for size, a, b in zip(new.shape, new.stride(), old.stride()):
        if not _same(size, 1) and not _same(a, b):
            return f"the op's strides {new.stride()} differ from eager's {old.stride()}"
    return None
