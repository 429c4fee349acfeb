"""Canonicalise attention in an aten graph into the one pattern the fused kernel computes:

    out = select(softmax(scale * q @ k^T [x logit_scale[h]] + bias[h] + mask[b mod nW]
                         + general), m) @ v

`find_attention(node)` starts at a softmax (`_softmax`, `_safe_softmax`) or an SDPA call and
returns an `AttentionMatch`, or raises NoMatch with the reason. It proves what it accepts:

* SDPA: every argument is read from the op's schema (positional or keyword). dropout_p != 0,
  is_causal and grouped-query heads are refused; the scale is the given one or 1/sqrt(D); a
  boolean attn_mask is a select. Keys and values may have their own token count (Nk,
  pooled keys) and v its own head dim.
* softmax: over the last dim only; the scores are walked back to the q @ k^T matmul through
  views, casts, scalings, adds and, as the last step only, a select by a boolean mask
  (masked_fill, where), and forward through casts, copies and dropout(p=0) to the matmul
  with v. A division by a tensor, or a factor that would also scale an additive term, is
  refused. q, k and v are [B, H, N, D] or 5-D [B, G, H, N, D] (attention_views.py).
* additive terms, factors and the select are filed under bias, mask, general, logit scale
  and select with their shapes proved (attention_terms.py); the output is read back in the
  layout the graph reads (attention_output.py).

SDPA and `_safe_softmax` give 0 for a row whose scores are all -inf; `_softmax` gives NaN.
The match records which (`safe_softmax`), and the kernel does the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx

from .attention_output import read_back, sole_user
from .attention_terms import Select, Term, check_form, classify, file_factor, file_select
from .attention_views import (
    NoMatch,
    Operand,
    canonical_shape,
    dtype,
    first_output,
    heads_axes,
    is_float_cast,
    is_reshape,
    keeps_last_two,
    operand,
    same_values,
    scalar_factor,
    score_copy,
    shape,
    splits_tokens,
)
from .meta import fake_value

aten = torch.ops.aten
SOFTMAX = {aten._softmax.default, aten._safe_softmax.default}
SDPA_COMPOSITE = aten.scaled_dot_product_attention.default  # returns the output itself
SDPA = {SDPA_COMPOSITE} | {
    getattr(aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    if hasattr(aten, name)
}
__all__ = ["SDPA", "SOFTMAX", "AttentionMatch", "NoMatch", "find_attention", "reaches_matmul"]


@dataclass
class AttentionMatch:
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    scale: float
    cosine: bool
    logit_scale: torch.fx.Node | None
    bias: torch.fx.Node | None
    mask: torch.fx.Node | None
    windows: int
    general: torch.fx.Node | None
    output: str  # "bnc", "bhnd" or "bnhd"
    final: torch.fx.Node  # the node whose value the fused kernel produces
    mask_repeat: int = 1  # how many times the mask is added
    safe_softmax: bool = False  # all -inf rows give 0 (SDPA, _safe_softmax), not NaN
    transposed: tuple[str, ...] = ()  # operands stored [B, H, D, N] (read transposed)
    sdpa: bool = False  # matched at an SDPA call (its ATen path is that one kernel)
    heads_axis: int = 1  # 5-D q, k, v: their heads dim (the other two make the batch)
    batch_split: int = 1  # 5-D: the batch's inner part (the output's "t"; see AttentionSpec)
    out_dtype: torch.dtype | None = None  # the output is cast to this dtype in the region
    select: Select | None = None  # a boolean mask applied last (Terms.select)
    interior: list[torch.fx.Node] = field(default_factory=list)  # replaced by the kernel


def _call(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function"


def reaches_matmul(node: object, depth: int = 12) -> bool:
    """True if a bmm is among the first few producers of `node` (a softmax's input)."""
    if depth <= 0 or not _call(node):
        return False
    if node.target is aten.bmm.default:
        return True
    args = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if node.target in (aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor):
        return any(reaches_matmul(a, depth - 1) for a in args)
    if node.target is aten.where.self:  # masked_fill, as Inductor decomposes it
        return any(reaches_matmul(a, depth - 1) for a in args[1:])
    return bool(args) and reaches_matmul(args[0], depth - 1)


def _on_score_path(node: object, depth: int = 16) -> bool:
    """True if `node` is computed from a bmm by the ops a score path may hold."""
    while depth > 0 and _call(node):
        if node.target is aten.bmm.default:
            return True
        if (
            same_values(node)
            or is_float_cast(node)
            or keeps_last_two(node)
            or splits_tokens(node)
            or scalar_factor(node) is not None
        ):
            node, depth = node.args[0], depth - 1
            continue
        if score_copy(node):
            node, depth = node.args[1], depth - 1
            continue
        if node.target in (aten.add.Tensor, aten.mul.Tensor):
            return any(_on_score_path(a, depth - 1) for a in node.args)
        return False
    return False


def _fill_value(node: object) -> float | None:
    """v if `node` is a 0-d full(v) (masked_fill's value, as the graph holds it), else None."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    if not _call(node) or node.target is not aten.full.default or node.args[0] not in ([], ()):
        return None
    value = node.args[1]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _select(node: object) -> tuple[torch.fx.Node, Select] | None:
    """(the scores, the select) if `node` is masked_fill(s, m, v) or where(m, v, s) /
    where(m, s, v) with v a number, else None."""
    if not _call(node):
        return None
    if node.target in (aten.masked_fill.Scalar,) and isinstance(node.args[1], torch.fx.Node):
        fill = _fill_value(node.args[2])
        if fill is not None:
            return node.args[0], Select(node.args[1], False, fill, shape(node))
    if node.target is aten.where.self and isinstance(node.args[0], torch.fx.Node):
        cond, a, b = node.args
        if (fill := _fill_value(a)) is not None and isinstance(b, torch.fx.Node):
            return b, Select(cond, False, fill, shape(node))
        if (fill := _fill_value(b)) is not None and isinstance(a, torch.fx.Node):
            return a, Select(cond, True, fill, shape(node))
    return None


def _score_path(
    node: object, interior: list, terms: list, factors: list, selects: list
) -> torch.fx.Node:
    """Walk back from the softmax input to the q @ k^T bmm, collecting additive terms and
    factors (each with the shape of the scores it applies to) and, as the last step before
    the softmax only, a select by a boolean mask (masked_fill)."""
    while True:
        if not _call(node):
            raise NoMatch("the scores are not computed in the graph")
        if node.target is aten.bmm.default:
            return node
        step = None
        if same_values(node) or is_float_cast(node) or keeps_last_two(node):
            step = node.args[0]
        elif splits_tokens(node):  # the terms added on the split view say how they broadcast
            step = node.args[0]
        elif score_copy(node):
            step = node.args[1]
        elif node.target is aten.add.Tensor and node.kwargs.get("alpha", 1) == 1:
            a, b = node.args
            if not all(isinstance(x, torch.fx.Node) for x in (a, b)):
                raise NoMatch("a constant is added to the scores")
            on_a, on_b = _on_score_path(a), _on_score_path(b)
            if on_a and on_b:  # a term computed by a bmm of its own (MViTv2's q @ rel_pos):
                on_a, on_b = shape(a) == shape(node), shape(b) == shape(node)  # it broadcasts
            if on_a == on_b:
                raise NoMatch("an add on the scores has no single score operand")
            if factors:
                raise NoMatch("the scores are scaled after an additive term (it would scale it)")
            step, term = (a, b) if on_a else (b, a)
            terms.append(Term(term, shape(node), node))
        elif (factor := scalar_factor(node)) is not None:
            factors.append(factor)
            step = node.args[0]
        elif node.target is aten.mul.Tensor and all(
            isinstance(x, torch.fx.Node) for x in node.args
        ):
            a, b = node.args
            if _on_score_path(a) == _on_score_path(b):
                raise NoMatch("a product on the scores has no single score operand")
            step, factor_node = (a, b) if _on_score_path(a) else (b, a)
            factors.append(Term(factor_node, shape(node)))
        elif node.target in (aten.div.Tensor, aten.div.Scalar):
            raise NoMatch("the scores are divided by a tensor")
        elif (found := _select(node)) is not None and not (terms or factors or selects):
            step = found[0]
            selects.append(found[1])
        elif node.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self):
            raise NoMatch(
                "masked_fill (where) on the scores by a tensor value, or before another step"
            )
        else:
            raise NoMatch(f"{getattr(node.target, '__name__', node.target)} on the score path")
        interior.append(node)
        node = step


def sdpa_arguments(node: torch.fx.Node) -> dict[str, object]:
    """Every argument of an SDPA call by its schema name (positional, keyword or default)."""
    bound: dict[str, object] = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


def _sdpa(node: torch.fx.Node, interior: list, terms: list, selects: list, forward: set | None):
    """q, k, v operands, the score scale and the output node of an SDPA call."""
    args = sdpa_arguments(node)
    if args.get("dropout_p") not in (None, 0, 0.0):
        raise NoMatch(f"SDPA with dropout_p={args['dropout_p']}")
    if args.get("is_causal"):
        raise NoMatch("SDPA with is_causal=True: the kernel has no causal mask")
    if args.get("return_debug_mask"):
        raise NoMatch("SDPA returning its debug mask")
    scale = args.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise NoMatch(f"SDPA scale {scale!r} is not a number")
    q = operand(args["query"], interior, role="q", transposed=False, scalable=True)
    k = operand(args["key"], interior, role="k", transposed=False, scalable=True)
    v = operand(args["value"], interior, role="v", transposed=False, scalable=False)
    axis = _check_qkv(q, k, v, gqa=bool(args.get("enable_gqa")))
    mask = args.get("attn_mask", args.get("attn_bias"))
    if mask is not None:
        if not isinstance(mask, torch.fx.Node):
            raise NoMatch("SDPA attn_mask is not a tensor")
        if dtype(mask) == torch.bool:  # True keeps the score, False gives -inf
            selects.append(Select(mask, True, float("-inf"), _scores_form(q, k, axis)))
        else:
            terms.append(Term(mask, _scores_form(q, k, axis)))
    interior.append(node)
    if node.target is SDPA_COMPOSITE:
        start = node
    else:
        start = first_output(node, forward)
        if start is None:
            raise NoMatch("the SDPA output is not read")
        interior += [u for u in node.users if u is not start and not u.users]  # dead outputs
    d = canonical_shape(q, axis)[-1]
    base = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return q, k, v, base * q.scale * k.scale, start, axis


def _scores_form(q: Operand, k: Operand, axis: int) -> tuple:
    """The scores' shape as the operands' leading dims give it: [B, H, N, Nk], or
    [B, G, H, N, Nk] for 5-D operands."""
    value = fake_value(q.node)
    n, nk = canonical_shape(q, axis)[2], canonical_shape(k, axis)[2]
    if value.dim() == 5:
        return (*shape(q.node)[:3], n, nk)
    return (*canonical_shape(q, axis)[:2], n, nk)


def _check_qkv(q: Operand, k: Operand, v: Operand, gqa: bool = False) -> int:
    """Checks q, k and v agree; returns the first heads axis they allow (heads_axes; the
    output may pick a later one, read_back)."""
    values = [fake_value(x.node) for x in (q, k, v)]
    axis = heads_axes(values)[0]
    if values[0].dim() == 5 and not (shape(q.node)[:3] == shape(k.node)[:3] == shape(v.node)[:3]):
        raise NoMatch("q, k and v disagree on their leading dims")
    (b, heads, n, d), (bk, hk, nk, dk), (bv, hv, nv, dv) = (
        canonical_shape(x, axis) for x in (q, k, v))
    if 0 in (b, heads, n, d, bk, hk, nk, dk, bv, hv, nv, dv):
        raise NoMatch("zero-size q, k or v: nothing to compute, ATen returns eager's result")
    if nv != nk:
        raise NoMatch(f"{nk} keys but {nv} values")
    if hk != heads or hv != heads:
        what = "grouped-query attention" if gqa or heads % max(hk, 1) == 0 else "attention"
        raise NoMatch(f"{what}: q has {heads} heads, k {hk} and v {hv}")
    if bk != b or bv != b:
        raise NoMatch(f"q, k and v batches differ: {b}, {bk}, {bv}")
    if dk != d:
        raise NoMatch(f"q's head dim {d} is not k's {dk}")
    if q.cosine != k.cosine:
        raise NoMatch("only one of q and k is normalised")
    return axis


def _softmax(
    node: torch.fx.Node, interior: list, terms: list, factors: list, selects: list, forward
):
    """q, k, v operands, the score scale and the output node of softmax(scores) @ v."""
    rank = len(shape(node))
    if node.args[1] % rank != rank - 1:
        raise NoMatch(f"softmax over dim {node.args[1]}, not the last (keys) dim")
    if node.target is aten._softmax.default and node.args[2]:
        raise NoMatch("softmax with half_to_float")
    bmm = _score_path(node.args[0], interior, terms, factors, selects)
    q = operand(bmm.args[0], interior, role="q", transposed=False, scalable=True)
    k = operand(bmm.args[1], interior, role="k", transposed=True, scalable=True)
    interior += [bmm, node]
    cur = node
    while True:  # softmax -> casts, copies, dropout(p=0) -> bmm(p, v)
        user = sole_user(cur, forward)
        if user is None:
            readers = sorted(str(getattr(u.target, "__name__", u.target)) for u in cur.users)
            raise NoMatch(f"the probabilities are read by {', '.join(readers) or 'nothing'}")
        if user.target is aten.bmm.default and user.args[0] is cur:
            break
        if same_values(user) or is_float_cast(user) or keeps_last_two(user):
            cur = user
        elif user.target is aten.native_dropout.default:
            if user.args[1] != 0:
                raise NoMatch(f"dropout with p={user.args[1]} on the probabilities")
            interior.append(user)
            cur = first_output(user, forward)
            if cur is None or len([u for u in user.users if forward is None or u in forward]) > 1:
                raise NoMatch("dropout's mask is used")
        else:
            what = getattr(user.target, "__name__", user.target)
            raise NoMatch(f"the probabilities go through {what}, not straight to the matmul with v")
        interior.append(cur)
    v = operand(user.args[1], interior, role="v", transposed=False, scalable=False)
    axis = _check_qkv(q, k, v)
    b, heads, n, _ = canonical_shape(q, axis)
    form = shape(node)
    if form != _scores_form(q, k, axis):
        check_form(form, b, heads, n, canonical_shape(k, axis)[2])
    interior.append(user)
    start = user  # the bmm output [B*H, N, Dv], viewed back as [B, H, N, Dv] ([B, G, H, ..])
    out_form = (*_scores_form(q, k, axis)[:-2], n, canonical_shape(v, axis)[3])
    if fake_value(q.node).dim() == 3:  # [B*H, N, D] operands: the output as the bmm gives it
        out_form = (b, *out_form[2:])
    while shape(start) != out_form:
        nxt = sole_user(start, forward)
        if nxt is None or not (same_values(nxt) or is_reshape(nxt)):
            raise NoMatch("the attention output is not viewed as [B, H, N, D]")
        interior.append(start)
        start = nxt
    return q, k, v, q.scale * k.scale, start, axis


def find_attention(node: torch.fx.Node, forward: set | None = None) -> AttentionMatch:
    """The attention around `node` (a softmax or an SDPA call); raises NoMatch.
    `forward`, for a joint graph, is the set of forward nodes: only their uses count."""
    interior: list[torch.fx.Node] = []
    terms: list[Term] = []
    factors: list = []
    selects: list[Select] = []
    if node.target in SDPA:
        q, k, v, scale, start, axis = _sdpa(node, interior, terms, selects, forward)
    elif node.target in SOFTMAX:
        q, k, v, scale, start, axis = _softmax(node, interior, terms, factors, selects, forward)
    else:
        raise NoMatch(f"{node.target} is neither a softmax nor an SDPA call")
    five_d = fake_value(q.node).dim() == 5
    axis, (final, output, split) = read_back(q, k, v, start, interior, forward)
    b, heads, n, _ = canonical_shape(q, axis)
    nk = canonical_shape(k, axis)[2]
    if five_d and axis != 2 and (terms or any(not isinstance(f, float) for f in factors)):
        raise NoMatch(f"a term on [{', '.join(map(str, _scores_form(q, k, axis)))}] scores "
                      "whose heads are not their third dim")  # fmt: skip
    filed = classify(terms, b, heads, n, nk)
    for select in selects:
        file_select(filed, select, b, heads, n, nk)
    for factor in factors:
        if isinstance(factor, float):
            scale *= factor
        else:
            file_factor(filed, factor, b, heads, n, nk)
    out_dtype = dtype(final) if dtype(final) != dtype(start) else None
    match = AttentionMatch(
        q=q.node,
        k=k.node,
        v=v.node,
        transposed=tuple(name for name, x in (("q", q), ("k", k), ("v", v)) if x.transposed),
        scale=scale,
        cosine=q.cosine,
        logit_scale=filed.logit_scale,
        bias=filed.bias,
        mask=filed.mask,
        windows=filed.windows,
        general=filed.general,
        output=output,
        final=final,
        mask_repeat=filed.mask_repeat,
        safe_softmax=node.target in SDPA or node.target is aten._safe_softmax.default,
        sdpa=node.target in SDPA,
        heads_axis=axis,
        batch_split=split,
        out_dtype=out_dtype,
        select=filed.select,
    )
    match.interior = [x for x in dict.fromkeys(interior) if x is not final]
    return match
