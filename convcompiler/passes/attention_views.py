"""Reading attention operands through views, copies and scalings, with every step proved.

The attention matcher walks from a matmul operand back to the tensor whose values it reads.
A step is taken only when it provably keeps those values (possibly reshaped):

    same values   clone, alias, detach; view/reshape/expand to the same shape; a reshape
                  that only adds, drops or moves size-1 dims (einsum's unsqueezes)
    reshape       view, _unsafe_view, reshape, (un)squeeze: row-major reinterpretation
    merge         [B*H, R, C] read as a view of [B, H, R, C] or [B, G, H, R, C] (what matmul
                  does to the leading dims of its inputs)
    transpose     of the last two dims (k^T): toggles which of the two is the token dim; an
                  operand that ends transposed ([B, H, D, N], LeViT's k) is read so
    scale         mul/div by a Python number
    cosine        x / clamp_min(linalg_vector_norm(x, 2, [-1], keepdim), 1e-12) (F.normalize)

Each walk records the nodes it passed ("interior": the fused kernel replaces them) and stops
at the first node it cannot see through; that node is read through its strides.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx

from .dims import Dim, dims
from .meta import fake_value, hinted

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


def _squeezed_order(node: torch.fx.Node) -> list[int] | None:
    """For a permute: its dims order with the size-1 dims left out, else None."""
    if node.target is not aten.permute.default:
        return None
    sizes = shape(node.args[0])
    return [d % len(sizes) for d in node.args[1] if sizes[d % len(sizes)] != 1]


def is_reshape(node: object) -> bool:
    """A row-major reinterpretation: view, reshape, (un)squeeze, or a permute that moves
    size-1 dims only (einsum's graphs have them)."""
    if not _call(node) or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.target in RESHAPES:
        return True
    order = _squeezed_order(node)
    return order is not None and order == sorted(order)


def strip_reshapes(node: torch.fx.Node, interior: list | None = None) -> torch.fx.Node:
    """Back through reshapes and same-value copies (a chain of row-major reinterpretations:
    two such chains from one node to one shape give the same values)."""
    while same_values(node) or is_reshape(node):
        if interior is not None:
            interior.append(node)
        node = node.args[0]
    return node


def _size_one_only(node: object) -> bool:
    """A reshape that only adds, drops or moves size-1 dims (einsum's unsqueezes). The
    operand walk steps through one only from a tensor of more than 5 dims: below that a
    size-1 dim may be a real one (one token, one image), and stepping would relabel it."""
    if not is_reshape(node):
        return False
    return [s for s in shape(node) if s != 1] == [s for s in shape(node.args[0]) if s != 1]


def is_last_two_transpose(node: object) -> bool:
    """transpose(-2, -1) or the permute that swaps the last two dims."""
    if not _call(node) or not isinstance(node.args[0], torch.fx.Node):
        return False
    rank = len(shape(node))
    if node.target is aten.transpose.int:
        return sorted(d % rank for d in node.args[1:3]) == [rank - 2, rank - 1]
    if node.target is aten.permute.default:
        if [d % rank for d in node.args[1]] == [*range(rank - 2), rank - 1, rank - 2]:
            return True
        order = _squeezed_order(node)  # the same, but for size-1 dims moved around
        ordered = sorted(order)
        return len(order) >= 2 and order == [*ordered[:-2], ordered[-1], ordered[-2]]
    return node.target is aten.t.default and rank == 2


def merged_source(node: object) -> torch.fx.Node | None:
    """x if `node` is a view of x [B, H, R, C] (or of a tensor of 5 dims or more, its
    size-1 dims aside, as einsum leaves them) as [B*H, R, C] (what bmm does to the leading
    dims of a matmul's operands), else None."""
    if not _call(node) or node.target not in VIEWS or not isinstance(node.args[0], torch.fx.Node):
        return None
    src = node.args[0]
    out, inp = shape(node), shape(src)
    if len(out) != 3 or len(inp) < 4:
        return None
    if len(inp) == 4 and out == (inp[0] * inp[1], *inp[2:]):
        return src
    if len(inp) < 5 or 1 in (out[1], out[2]):  # a size-1 row or column: ambiguous
        return None
    kept = [size for size in inp if size != 1]  # einsum moves size-1 dims around
    lead = 1
    for size in kept[:-2]:
        lead = lead * size
    if len(kept) >= 3 and (lead, *kept[-2:]) == out:
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
        if same_values(node) or (_size_one_only(node) and len(shape(node)) > 5):
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
    if len(shape(node)) not in (3, 4, 5):
        raise NoMatch(
            f"{role} {shape(node)} is none of [B*H, N, D], [B, H, N, D] and [B, G, H, N, D] "
            "(5-D, two of whose leading dims merge into the batch)"
        )
    return Operand(node, scale, cosine, transposed=flipped)


def mergeable(value: torch.Tensor, i: int, j: int) -> bool:
    """Dims i < j of `value` view as one (dim i outer): adjacent in memory, or size 1 (at
    the size hints: the strides of a graph's tensors follow from its sizes alike)."""
    sizes, strides = hinted(value.shape), hinted(value.stride())
    if sizes[i] == 1 or sizes[j] == 1:
        return True
    return strides[i] == strides[j] * sizes[j]


def heads_axes(values: list[torch.Tensor]) -> list[int]:
    """The leading dims of 5-D q, k, v that may be the heads dim, last first: those whose
    other two leading dims view as one batch dim in every operand ([1] for 4-D ones)."""
    if all(v.dim() == 4 for v in values) or all(v.dim() == 3 for v in values):
        return [1]
    if any(v.dim() != 5 for v in values):
        raise NoMatch("q, k and v are not all 3-D, all 4-D or all 5-D")
    axes = [axis for axis in (2, 1, 0) if all(mergeable(v, *batch_axes(axis)) for v in values)]
    if not axes:
        raise NoMatch("no two leading dims of q, k and v view as one batch dim")
    return axes


def batch_axes(axis: int) -> tuple[int, int]:
    """The two leading dims of a 5-D q, k or v that make its batch, given its heads dim."""
    i, j = (d for d in range(3) if d != axis)
    return i, j


def canonical_sizes(sizes: tuple, transposed: bool, axis: int) -> tuple:
    """[B, H, N, D] from a q, k or v's sizes: a 5-D one's leading dims other than the heads
    `axis` make the batch; a 3-D one is [B, 1, N, D] (heads merged into its batch); a
    transposed one is stored [.., D, N]."""
    if len(sizes) == 5:
        i, j = batch_axes(axis)
        sizes = (sizes[i] * sizes[j], sizes[axis], *sizes[3:])
    elif len(sizes) == 3:  # [B*H, N, D]: the merged batch, one head each
        sizes = (sizes[0], 1, *sizes[1:])
    b, h, x, y = sizes
    return (b, h, y, x) if transposed else (b, h, x, y)


def canonical_dims(value: torch.Tensor, transposed: bool, axis: int) -> tuple:
    """canonical_sizes of a value, as Dims (comparing them adds no guard)."""
    return canonical_sizes(dims(value), transposed, axis)


def canonical_shape(op: Operand, axis: int = 1) -> tuple:
    """The operand's [B, H, N, D] sizes (see canonical_dims)."""
    value = fake_value(op.node)
    if value is None:
        raise NoMatch(f"no tensor metadata on {op.node.name}")
    return canonical_dims(value, op.transposed, axis)


def first_output(node: torch.fx.Node, forward: set | None) -> torch.fx.Node | None:
    """getitem(node, 0) among the (forward) users of a multi-output op."""
    for user in node.users:
        if forward is not None and user not in forward:
            continue
        if user.target is operator.getitem and user.args[1] == 0:
            return user
    return None


def keeps_last_two(node: object) -> bool:
    """A reshape that regroups the leading dims of the scores and keeps [.., Nq, Nk]
    (size-1 dims aside: einsum's graphs view [.., N, 1, Nk] and move the 1)."""
    if not is_reshape(node):
        return False
    out, inp = shape(node), shape(node.args[0])
    if len(out) < 3 or len(inp) < 3:
        return False
    if out[-2:] == inp[-2:]:
        return True
    kept_out, kept_in = [s for s in out if s != 1], [s for s in inp if s != 1]
    return len(kept_out) >= 3 and len(kept_in) >= 3 and kept_out[-2:] == kept_in[-2:]


def splits_tokens(node: object) -> bool:
    """A reshape between [.., N, Nk] and a view that splits the query and key tokens into
    their grid axes ([B, H, qh, qw, kh, kw]: MViTv2 adds its relative position terms there),
    the leading dims kept."""
    if not is_reshape(node):
        return False
    out, inp = shape(node), shape(node.args[0])
    for flat, split in ((out, inp), (inp, out)):
        if len(flat) < 3 or len(split) <= len(flat) or split[: len(flat) - 2] != flat[:-2]:
            continue
        axes, n, nk = split[len(flat) - 2 :], flat[-2], flat[-1]
        if any(math.prod(axes[:p]) == n and math.prod(axes[p:]) == nk for p in range(len(axes))):
            return True
    return False


def score_copy(node: object) -> bool:
    """copy(s, t) of a whole score tensor (a slice assignment `attn[...] = t` covering all of
    it, functionalized): the values of t in s's shape and dtype."""
    if not _call(node) or node.target is not aten.copy.default:
        return False
    dst, src = node.args[:2]
    return isinstance(src, torch.fx.Node) and shape(dst) == shape(src) and dtype(dst) == dtype(src)
