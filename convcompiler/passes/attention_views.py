"""Reading attention operands through views, copies and scalings, with every step proved.

The attention matcher walks from a matmul operand back to the tensor whose values it reads.
A step is taken only when it provably keeps those values (possibly reshaped):

    same values   clone, alias, detach; view/reshape/expand to the same shape
    reshape       view, _unsafe_view, reshape, (un)squeeze: row-major reinterpretation
    merge         [B*H, R, C] read as a view of [B, H, R, C] (what matmul does to 4-D inputs)
    transpose     of the last two dims (k^T): toggles which of the two is the token dim; an
                  operand that ends transposed ([B, H, D, N], LeViT's k) is read so
    scale         mul/div by a Python number
    cosine        x / clamp_min(linalg_vector_norm(x, 2, [-1], keepdim), 1e-12) (F.normalize)

Each walk records the nodes it passed ("interior": the fused kernel replaces them) and stops
at the first node it cannot see through; that node is read through its strides.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from .dims import Dim, dims
from .meta import fake_value

aten = torch.ops.aten
prims = torch.ops.prims

VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
RESHAPES = VIEWS | {
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
}
IDENTITIES = {aten.clone.default, aten.alias.default, aten.detach.default}
CASTS = {aten._to_copy.default, prims.convert_element_type.default}
NORMALIZE_EPS = 1e-12  # F.normalize's default, and the kernel's


class NoMatch(Exception):
    """The node is not attention the kernel computes exactly; the message says why."""


def shape(node: object) -> tuple[int | Dim, ...]:
    """The node's sizes as ints, or Dims when dynamic: comparing them never adds a guard on a
    dynamic size (dims.py)."""
    value = fake_value(node)
    if value is None:
        raise NoMatch(f"no tensor metadata on {getattr(node, 'name', node)}")
    return dims(value)


def dtype(node: object) -> torch.dtype:
    value = fake_value(node)
    if value is None:
        raise NoMatch(f"no tensor metadata on {getattr(node, 'name', node)}")
    return value.dtype


def _call(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function"


def same_values(node: object) -> bool:
    """True if `node` is its first argument's values in the same shape (and dtype)."""
    if not _call(node) or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.target in IDENTITIES:
        return True
    if node.target in RESHAPES or node.target is aten.expand.default:
        return shape(node) == shape(node.args[0])
    return False


def is_float_cast(node: object) -> bool:
    """A conversion between floating-point dtypes on the same device (values kept up to
    rounding; a memory format changes strides only)."""
    if not _call(node) or node.target not in CASTS or not isinstance(node.args[0], torch.fx.Node):
        return False
    kwargs = node.kwargs
    if kwargs.get("layout") not in (None, torch.strided):
        return False
    if kwargs.get("pin_memory") or kwargs.get("non_blocking"):
        return False
    device, source = kwargs.get("device"), fake_value(node.args[0])
    if source is None or (device is not None and torch.device(device) != source.device):
        return False
    return dtype(node).is_floating_point and dtype(node.args[0]).is_floating_point


def is_reshape(node: object) -> bool:
    return _call(node) and node.target in RESHAPES and isinstance(node.args[0], torch.fx.Node)


def strip_reshapes(node: torch.fx.Node, interior: list | None = None) -> torch.fx.Node:
    """Back through reshapes and same-value copies (a chain of row-major reinterpretations:
    two such chains from one node to one shape give the same values)."""
    while same_values(node) or is_reshape(node):
        if interior is not None:
            interior.append(node)
        node = node.args[0]
    return node


def is_last_two_transpose(node: object) -> bool:
    """transpose(-2, -1) or the permute that swaps the last two dims."""
    if not _call(node) or not isinstance(node.args[0], torch.fx.Node):
        return False
    rank = len(shape(node))
    if node.target is aten.transpose.int:
        return sorted(d % rank for d in node.args[1:3]) == [rank - 2, rank - 1]
    if node.target is aten.permute.default:
        return [d % rank for d in node.args[1]] == [*range(rank - 2), rank - 1, rank - 2]
    return node.target is aten.t.default and rank == 2


def merged_source(node: object) -> torch.fx.Node | None:
    """x if `node` is a view of a 4-D x [B, H, R, C] as [B*H, R, C], else None."""
    if not _call(node) or node.target not in VIEWS or not isinstance(node.args[0], torch.fx.Node):
        return None
    src = node.args[0]
    out, inp = shape(node), shape(src)
    if len(out) == 3 and len(inp) == 4 and out == (inp[0] * inp[1], *inp[2:]):
        return src
    return None


def scalar_factor(node: object) -> float | None:
    """f if `node` is x * f or x / f with f a Python number (x the first argument)."""
    if not _call(node) or len(node.args) != 2 or not isinstance(node.args[0], torch.fx.Node):
        return None
    f = node.args[1]
    if isinstance(f, bool) or not isinstance(f, (int, float)):
        return None
    if node.target in (aten.mul.Tensor, aten.mul.Scalar):
        return float(f)
    if node.target in (aten.div.Tensor, aten.div.Scalar) and f != 0:
        return 1.0 / float(f)
    return None


def normalized_source(node: object) -> torch.fx.Node | None:
    """x if `node` is F.normalize(x, dim=-1) with the kernel's eps, else None."""
    if not _call(node) or node.target is not aten.div.Tensor:
        return None
    x, den = node.args
    if not isinstance(x, torch.fx.Node) or not isinstance(den, torch.fx.Node):
        return None
    while is_reshape(den) or same_values(den) or (_call(den) and den.target is aten.expand.default):
        den = den.args[0]  # the norm, broadcast back over the rows (expand_as)
    if not _call(den) or den.target is not aten.clamp_min.default:
        return None
    norm, eps = den.args[0], den.args[1]
    if not _call(norm) or norm.target is not aten.linalg_vector_norm.default:
        return None
    rank = len(shape(x))
    ord_, dims = norm.args[1], norm.args[2] if len(norm.args) > 2 else None
    keepdim = norm.args[3] if len(norm.args) > 3 else norm.kwargs.get("keepdim", False)
    if norm.args[0] is not x or ord_ != 2 or dims is None or not keepdim:
        return None
    if [d % rank for d in dims] != [rank - 1] or float(eps) != NORMALIZE_EPS:
        return None
    return x


@dataclass(frozen=True)
class Operand:
    """A q, k or v operand: the [B, H, N, D] tensor read through its strides, the product of
    the scalar factors applied on the way, and whether its rows were L2-normalised."""

    node: torch.fx.Node
    scale: float
    cosine: bool
    transposed: bool = False  # stored [B, H, D, N]: read with its last two strides swapped


def operand(
    node: object, interior: list, *, role: str, transposed: bool, scalable: bool
) -> Operand:
    """Walk back from a matmul operand to the [B, H, N, D] tensor it reads.

    `transposed`: the matmul reads it as [.., D, N] (k^T). `scalable`: scalar factors and
    cosine normalisation may be taken into the kernel (q and k; not v)."""
    scale, cosine, flipped = 1.0, False, transposed
    while isinstance(node, torch.fx.Node):
        step = None
        if same_values(node):
            step = node.args[0]
        elif (src := merged_source(node)) is not None:
            step = src
        elif is_last_two_transpose(node):
            flipped, step = not flipped, node.args[0]
        elif scalable and (factor := scalar_factor(node)) is not None:
            if cosine:
                raise NoMatch(f"{role} is scaled inside its cosine normalisation")
            scale, step = scale * factor, node.args[0]
        elif scalable and not cosine and not flipped and (src := normalized_source(node)):
            cosine, step = True, src
        if step is None:
            break
        interior.append(node)
        node = step
    if not isinstance(node, torch.fx.Node):
        raise NoMatch(f"{role} is not a tensor")
    if len(shape(node)) != 4:
        raise NoMatch(f"{role} {shape(node)} is not a 4-D [B, H, N, D] tensor")
    return Operand(node, scale, cosine, transposed=flipped)


def canonical_shape(op: Operand) -> tuple:
    """The operand's [B, H, N, D] sizes (a transposed one is stored [B, H, D, N])."""
    b, h, x, y = shape(op.node)
    return (b, h, y, x) if op.transposed else (b, h, x, y)


def first_output(node: torch.fx.Node, forward: set | None) -> torch.fx.Node | None:
    """getitem(node, 0) among the (forward) users of a multi-output op."""
    for user in node.users:
        if forward is not None and user not in forward:
            continue
        if user.target is operator.getitem and user.args[1] == 0:
            return user
    return None
