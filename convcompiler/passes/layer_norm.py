"""A LayerNorm over the last dim, read back from its decomposition in the post-grad graph:

    xf = x                       (float32 tokens; float16/bfloat16 ones are converted first)
    var, mean = var_mean(xf, [-1], correction=0, keepdim=True)
    y = (xf - mean) * rsqrt(var + eps) [* weight] [+ bias]   (converted back to x's dtype)

`layer_norm_of(node)` walks from the node that produces y up to x, accepting only that
shape: every node on the way but y has one user (var_mean: its two getitems; y's users
are the caller's to check), and weight and bias are vectors over the last dim. A block
region, or a linear's kernel, takes the norm as its prologue.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from .meta import fake_value

aten, prims = torch.ops.aten, torch.ops.prims


@dataclass(frozen=True)
class LayerNormMatch:
    x: torch.fx.Node  # the normalised tokens (before any conversion to float32)
    stats: torch.fx.Node  # the var_mean node: its first argument is x, or x converted
    weight: torch.fx.Node | None
    bias: torch.fx.Node | None
    eps: float
    nodes: tuple[torch.fx.Node, ...]  # the norm's nodes, the statistics first, y last
    normed: torch.fx.Node  # (xf - mean) * rstd
    scaled: torch.fx.Node | None  # ... * weight
    shifted: torch.fx.Node | None  # ... + bias

    @property
    def kind(self) -> str | None:
        """The norm's parameters: "affine" (a weight and a bias), "plain" (neither), or None
        for a weight without a bias or a bias alone, which no kernel takes."""
        if (self.weight is None) != (self.bias is None):
            return None
        return "plain" if self.weight is None else "affine"


def _users(node: torch.fx.Node, forward: set | None) -> list[torch.fx.Node]:
    """Its users but the graph's output; in a joint graph, only those in its forward."""
    return [u for u in node.users if u.op != "output" and (forward is None or u in forward)]


def _vector_operand(node: torch.fx.Node, width) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(the vector, the other operand) of a binary op with a [width] vector operand."""
    a, b = node.args[:2]
    for vec, other in ((b, a), (a, b)):
        v = fake_value(vec)
        if isinstance(vec, torch.fx.Node) and v is not None and tuple(v.shape) == (width,):
            return vec, other
    return None


def _convert(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.target is prims.convert_element_type.default


def layer_norm_of(y: torch.fx.Node, forward: set | None = None) -> LayerNormMatch | None:
    """The LayerNorm that produces `y`, or None (see the module docstring); `forward`: in a
    joint graph, its forward's nodes (the backward's users do not count)."""
    out = fake_value(y)
    if out is None or out.dim() < 1:
        return None
    width, chain, cur = out.shape[-1], [y], y
    if _convert(cur):
        cur = cur.args[0]
        chain.append(cur)
    weight = bias = scaled = shifted = None
    # every node on the way has one user; y's own users are the caller's to check
    if cur.target is aten.add.Tensor and (cur is y or len(_users(cur, forward)) == 1):
        found = _vector_operand(cur, width)
        if found is not None:
            shifted = cur
            bias, cur = found
            chain.append(cur)
    if cur.target is aten.mul.Tensor and (cur is y or len(_users(cur, forward)) == 1):
        found = _vector_operand(cur, width)
        if found is not None and found[1].target is aten.mul.Tensor:
            scaled = cur
            weight, cur = found
            chain.append(cur)
    if cur.target is not aten.mul.Tensor or (cur is not y and len(_users(cur, forward)) != 1):
        return None
    a, b = cur.args[:2]
    sub, rsqrt = (a, b) if getattr(b, "target", None) is aten.rsqrt.default else (b, a)
    if getattr(rsqrt, "target", None) is not aten.rsqrt.default:
        return None
    if getattr(sub, "target", None) is not aten.sub.Tensor:
        return None
    plus_eps = rsqrt.args[0]
    if getattr(plus_eps, "target", None) is not aten.add.Tensor:
        return None
    var, eps = plus_eps.args[:2]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return None
    xf, mean = sub.args[:2]
    for getter, index in ((var, 0), (mean, 1)):
        if getattr(getter, "target", None) is not operator.getitem or getter.args[1] != index:
            return None
    stats = var.args[0]
    if stats is not mean.args[0] or stats.target is not aten.var_mean.correction:
        return None
    dims = list(stats.args[1]) if len(stats.args) > 1 else None
    xv = fake_value(xf)
    if xv is None or dims not in ([-1], [xv.dim() - 1]) or stats.args[0] is not xf:
        return None
    if stats.kwargs.get("correction", 1) != 0 or not stats.kwargs.get("keepdim", False):
        return None
    if any(len(_users(n, forward)) != 1 for n in (sub, rsqrt, plus_eps, var, mean)):
        return None
    x = xf.args[0] if _convert(xf) else xf
    nodes = (stats, var, mean, sub, plus_eps, rsqrt, *reversed(chain))
    return LayerNormMatch(x, stats, weight, bias, float(eps), nodes, cur, scaled, shifted)


def _permute_of(node: object, dims: list[int]) -> torch.fx.Node | None:
    """The permuted node when `node` is permute(it, dims), else None."""
    if not isinstance(node, torch.fx.Node) or node.target is not aten.permute.default:
        return None
    return node.args[0] if list(node.args[1]) == dims else None


def image_norm_input(conv: torch.fx.Node) -> tuple[torch.fx.Node, LayerNormMatch] | None:
    """(the norm's input permute, the norm) when the conv reads a LayerNorm over an NCHW
    image's channels, torchvision's and timm's LayerNorm2d (ConvNeXt's downsampling):

        conv(permute(layer_norm([clone](permute(x, [0, 2, 3, 1]))), [0, 3, 1, 2]), w, b)

    and nothing else reads the norm's output or its permute (a training graph saves the
    permute for the weight gradient: no), the norm of x's dtype, with both a weight and a
    bias or neither. The kernel reads x (the first permute's input) and normalises it."""
    image = conv.args[0]
    y = _permute_of(image, [0, 3, 1, 2])
    if y is None or list(image.users) != [conv] or len(y.users) != 1:
        return None
    norm = layer_norm_of(y)
    if norm is None:
        return None
    src = norm.x  # the permuted image, or its contiguous copy (a sliced image's)
    if src.target is aten.clone.default:
        src = src.args[0]
    if _permute_of(src, [0, 2, 3, 1]) is None:
        return None
    return (src, norm) if _image_norm(norm, src, image) else None


def _image_norm(norm: LayerNormMatch, image: torch.fx.Node, normed: torch.fx.Node) -> bool:
    """A LayerNorm2d a conv kernel can take: from a 4-D image to its normalised image of the
    same dtype, with both a weight and a bias or neither."""
    xv, out = fake_value(image), fake_value(normed)
    ok = xv is not None and out is not None and xv.dtype == out.dtype and xv.dim() == 4
    return ok and norm.kind is not None


def image_norm_after(
    node: torch.fx.Node,
) -> tuple[LayerNormMatch, tuple[torch.fx.Node, ...]] | None:
    """(the norm, its nodes in graph order from the first permute to the permute back to
    NCHW, which is last) when the NCHW image `node` is read only by a LayerNorm over its
    channels, torchvision's and timm's LayerNorm2d (ConvNeXt's stem):

        permute(layer_norm([clone](permute(node, [0, 2, 3, 1]))), [0, 3, 1, 2])

    and every node between the two permutes is used only inside the norm, of node's dtype,
    with both a weight and a bias or neither. A conv's kernel can then normalise its output
    tile before storing it (spec.epilogue.ln)."""
    users = list(node.users)
    if len(users) != 1 or _permute_of(users[0], [0, 2, 3, 1]) is not node:
        return None
    first = start = users[0]
    copies = list(start.users)  # the permuted NCHW image made contiguous for the norm
    if len(copies) == 1 and copies[0].target is aten.clone.default:
        start = copies[0]
    frontier, seen = list(start.users), set()
    for _ in range(16):  # the decomposition is about a dozen nodes deep
        back = next((n for n in frontier if _permute_of(n, [0, 3, 1, 2]) is not None), None)
        if back is not None:
            break
        seen.update(frontier)
        frontier = [u for n in frontier for u in n.users if u not in seen]
    else:
        return None
    y = back.args[0]
    norm = layer_norm_of(y)
    if norm is None or norm.x is not start or len(y.users) != 1:
        return None
    xf = norm.stats.args[0]  # x, or x converted to float32
    inside = set(norm.nodes) | {xf}
    if not set(start.users) <= inside or not set(xf.users) <= inside:
        return None
    if not _image_norm(norm, node, back):
        return None
    return norm, tuple(dict.fromkeys((first, start, xf, *norm.nodes, back)))
