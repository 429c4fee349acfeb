"""Canonicalise window multi-head self-attention in an aten graph into one pattern:

    out = softmax(scale * q @ k^T [x logit_scale[h]] + bias[h] + mask[b mod nW] + general) @ v

`find_attention(softmax_or_sdpa_node)` walks the graph around a softmax (or an SDPA call)
and returns an `AttentionMatch`, or the reason it is not one. What it looks through, so that
one pattern covers the implementations (torchvision, timm with and without SDPA, the
original Microsoft code, HF transformers, SwinV2):

* copies and views: view, _unsafe_view, reshape, clone, expand, alias, unsqueeze;
* q, k, v from `select` or `unbind`, of one qkv projection or of separate ones;
* a scale applied to q before the matmul, or to the scores after it (mul or div);
* cosine attention: q and k each divided by clamp_min(linalg_vector_norm(., 2, -1), eps);
* additive terms on the [B, H, N, N] scores (per-head bias), on the [B/nW, nW, H, N, N] view
  (per-window mask), or SDPA's attn_mask, which is split into its bias and mask parts;
* dropout with p = 0 (eval models have none).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from .meta import fake_value

aten = torch.ops.aten
COPIES = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.clone.default,
    aten.expand.default,
    aten.alias.default,
    aten.unsqueeze.default,
    aten.detach.default,
}
SDPA = {
    getattr(aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
    )
    if hasattr(aten, name)
}


class NoMatch(Exception):
    """The softmax is not window attention; the message says why."""


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
    output: str  # "bnc" or "bhnd"
    final: torch.fx.Node  # the node whose value the fused kernel produces
    interior: list[torch.fx.Node] = field(default_factory=list)  # replaced by the kernel


def _shape(node: object) -> tuple[int, ...]:
    value = fake_value(node)
    if value is None:
        raise NoMatch(f"no metadata on {getattr(node, 'name', node)}")
    return tuple(value.shape)


def _strip(node: object, interior: list) -> torch.fx.Node:
    """Follow copies and views back to the node that produced the values."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in COPIES:
        interior.append(node)
        node = node.args[0]
    if not isinstance(node, torch.fx.Node):
        raise NoMatch("an operand is not a tensor")
    return node


def _normalized(node: torch.fx.Node) -> torch.fx.Node | None:
    """x if node is x / clamp_min(linalg_vector_norm(x, 2, [-1], True), eps), else None."""
    if node.target is not aten.div.Tensor or not isinstance(node.args[1], torch.fx.Node):
        return None
    x, den = node.args
    chain: list = []
    den = _strip(den, chain)
    if den.target is not aten.clamp_min.default:
        return None
    norm = den.args[0]
    if not isinstance(norm, torch.fx.Node) or norm.target is not aten.linalg_vector_norm.default:
        return None
    if norm.args[0] is not x or norm.args[1] != 2 or list(norm.args[2]) not in ([-1], [3]):
        return None
    return x


def _peel_operand(node: object, interior: list) -> tuple[torch.fx.Node, float, bool]:
    """(base tensor, scalar factor, cosine-normalised) of a q or k operand."""
    scale, cosine = 1.0, False
    while True:
        node = _strip(node, interior)
        if node.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(
            node.args[1], (int, float)
        ):
            factor = float(node.args[1])
            scale *= factor if node.target is aten.mul.Tensor else 1.0 / factor
            interior.append(node)
            node = node.args[0]
            continue
        base = _normalized(node)
        if base is not None and not cosine:
            interior.append(node)
            cosine, node = True, base
            continue
        return node, scale, cosine


def reaches(node: object, target: set, depth: int = 12) -> bool:
    while depth and isinstance(node, torch.fx.Node) and node.op == "call_function":
        if node.target in target:
            return True
        if node.target in COPIES or node.target in (
            aten.add.Tensor,
            aten.mul.Tensor,
            aten.div.Tensor,
        ):
            node, depth = node.args[0], depth - 1
            continue
        return False
    return False


def _peel_scores(node: object, interior: list, terms: list, factors: list) -> torch.fx.Node:
    """Walk back from the softmax input to the q @ k^T bmm, collecting additive terms
    (with the rank of the scores they were added to) and multiplicative factors."""
    bmm = {aten.bmm.default}
    while True:
        node = _strip(node, interior)
        if node.target is aten.bmm.default:
            return node
        if node.target is aten.add.Tensor and node.kwargs.get("alpha", 1) == 1:
            a, b = node.args
            on_path, term = (a, b) if reaches(a, bmm) else (b, a)
            if not reaches(on_path, bmm) or not isinstance(term, torch.fx.Node):
                raise NoMatch("an add on the scores has no score operand")
            terms.append((term, len(_shape(node))))
        elif node.target in (aten.mul.Tensor, aten.div.Tensor):
            a, b = node.args
            if isinstance(b, (int, float)):
                factors.append(float(b) if node.target is aten.mul.Tensor else 1.0 / float(b))
                on_path = a
            elif node.target is aten.mul.Tensor:
                on_path, factor = (a, b) if reaches(a, bmm) else (b, a)
                factors.append(factor)
            else:
                raise NoMatch("the scores are divided by a tensor")
        else:
            raise NoMatch(f"unexpected {node.target} on the score path")
        interior.append(node)
        node = on_path


def _window_mask(term: torch.fx.Node, heads: int, n: int) -> tuple[torch.fx.Node, int] | None:
    """(base, nW) if `term` ([B, H, N, N]) is a [nW, N, N] mask repeated over images and
    heads (timm's SDPA path: view [1, nW, 1, N, N] -> expand -> reshape)."""
    chain: list = []
    node = term
    while node.op == "call_function" and node.target in COPIES - {aten.expand.default}:
        node = node.args[0]
    if node.target is not aten.expand.default:
        return None
    shape = _shape(node)
    if len(shape) != 5 or shape[2] != heads or shape[3:] != (n, n):
        return None
    base = _strip(node.args[0], chain)
    inner = _shape(node.args[0])
    if len(inner) != 5 or inner[0] != 1 or inner[2] != 1:
        return None
    return base, inner[1]


def _classify(term: torch.fx.Node, rank: int, heads: int, n: int, out: AttentionMatch) -> None:
    """File an additive term under bias, mask or general."""
    shape = _shape(term)
    if rank == 5:
        if len(shape) != 5 or shape[0] != 1 or shape[2] != 1 or shape[3:] != (n, n):
            raise NoMatch(f"a term {shape} on the per-window scores is not [1, nW, 1, N, N]")
        if out.mask is not None:
            raise NoMatch("two per-window masks")
        out.mask, out.windows = _strip(term, []), shape[1]
        return
    if term.target is aten.add.Tensor and all(isinstance(a, torch.fx.Node) for a in term.args):
        for part in term.args:  # SDPA's attn_mask = bias + mask: split it
            _classify(part, rank, heads, n, out)
        return
    squeezed = (
        tuple(shape[shape.index(next(s for s in shape if s != 1)) :])
        if any(s != 1 for s in shape)
        else shape
    )
    if squeezed == (heads, n, n) and out.bias is None:
        out.bias = _strip(term, [])
        return
    mask = _window_mask(term, heads, n) if len(shape) == 4 else None
    if mask is not None and out.mask is None:
        out.mask, out.windows = mask
        return
    if len(shape) == 4 and shape[1:] == (heads, n, n) and out.general is None:
        out.general = term
        return
    raise NoMatch(f"an additive term of shape {shape} fits neither bias, mask nor attn_mask")


def _sole_user(node: torch.fx.Node, forward: set | None) -> torch.fx.Node | None:
    """The one user of `node`; in a joint graph, the one forward user (backward users, such
    as _softmax_backward_data reading the softmax, are ignored)."""
    users = [u for u in node.users if forward is None or u in forward]
    return users[0] if len(users) == 1 else None


def _output_chain(
    node: torch.fx.Node, interior: list, forward: set | None
) -> tuple[torch.fx.Node, str]:
    """From the [B, H, N, D] attention output, follow transpose(1, 2) (or permute(0, 2, 1, 3))
    -> copies -> [B, N, H*D]."""
    user = _sole_user(node, forward)
    swaps_h_n = user is not None and (
        user.target is aten.transpose.int
        and sorted(a % 4 for a in user.args[1:]) == [1, 2]
        or user.target is aten.permute.default
        and [a % 4 for a in user.args[1]] == [0, 2, 1, 3]
    )
    if not swaps_h_n:
        return node, "bhnd"
    b, h, n, d = _shape(node)
    chain, cur = [user], user
    while (nxt := _sole_user(cur, forward)) is not None and nxt.target in COPIES:
        chain.append(nxt)
        cur = nxt
        if _shape(cur) == (b, n, h * d):
            interior.append(node)
            interior.extend(chain[:-1])
            return cur, "bnc"
    return node, "bhnd"


def find_attention(node: torch.fx.Node, forward: set | None = None) -> AttentionMatch:
    """The window attention around `node` (a _softmax or an SDPA call); raises NoMatch.
    `forward`, for a joint graph, is the set of forward nodes: only their uses count."""
    interior: list[torch.fx.Node] = []
    terms: list = []
    factors: list = []
    if node.target in SDPA:
        q, k, v = node.args[:3]
        mask = node.kwargs.get("attn_mask", node.kwargs.get("attn_bias"))
        if node.kwargs.get("dropout_p", 0.0) not in (0, 0.0) or node.kwargs.get("is_causal"):
            raise NoMatch("SDPA with dropout or a causal mask")
        if mask is not None:
            terms.append((mask, 4))
        q, k, v = _strip(q, interior), _strip(k, interior), _strip(v, interior)
        scale = node.kwargs.get("scale") or 1.0 / math.sqrt(_shape(q)[-1])
        cosine = False
        items = [u for u in node.users if u.target is operator.getitem]
        out = next((u for u in items if u.args[1] == 0), None)
        if out is None:
            raise NoMatch("the SDPA output is not read")
        interior += [node]
        start = out
    else:
        if node.args[1] not in (-1, 3) or node.args[2]:
            raise NoMatch("softmax not over the last dim in the input dtype")
        bmm = _peel_scores(node.args[0], interior, terms, factors)
        a, b = bmm.args
        interior.append(bmm)
        q, q_scale, q_cos = _peel_operand(a, interior)
        kt = _strip(b, interior)
        if kt.target is not aten.transpose.int or sorted(x % 4 for x in kt.args[1:]) != [2, 3]:
            raise NoMatch("the second matmul operand is not k transposed")
        interior.append(kt)
        k, k_scale, k_cos = _peel_operand(kt.args[0], interior)
        if q_cos != k_cos:
            raise NoMatch("only one of q and k is normalised")
        scale, cosine = q_scale * k_scale, q_cos
        # softmax -> [dropout p=0] -> copies -> bmm(p, v)
        cur, after = node, node
        interior.append(node)
        while (user := _sole_user(cur, forward)) is not None:
            if user.target in COPIES:
                interior.append(user)
                cur = user
            elif user.target is aten.native_dropout.default and user.args[1] == 0:
                interior.append(user)
                items = [u for u in user.users if forward is None or u in forward]
                if len(items) != 1 or items[0].args[1] != 0:
                    raise NoMatch("dropout's mask is used")
                cur = items[0]
                interior.append(cur)
            else:
                after = user
                break
        if (
            after.target is not aten.bmm.default
            or _strip(after.args[0], []) is not node
            and after.args[0] is not cur
        ):
            raise NoMatch("the softmax does not feed the matmul with v")
        v = _strip(after.args[1], interior)
        interior.append(after)
        start = after
        while (
            (user := _sole_user(start, forward)) is not None
            and user.target in COPIES
            and len(_shape(user)) == 4
        ):
            interior.append(start)
            start = user
    match = AttentionMatch(q, k, v, scale, cosine, None, None, None, 1, None, "bhnd", start)
    b, heads, n, d = _shape(q)
    if _shape(k) != (b, heads, n, d) or _shape(v) != (b, heads, n, d):
        raise NoMatch(f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)} differ")
    for factor in factors:
        if isinstance(factor, float):
            match.scale *= factor
        elif match.logit_scale is None and math.prod(_shape(factor)) == heads:
            match.logit_scale = factor
        else:
            raise NoMatch("a multiplicative factor is neither a scalar nor per head")
    for term, rank in terms:
        _classify(term, rank, heads, n, match)
    match.final, match.output = _output_chain(start, interior, forward)
    match.interior = [x for x in dict.fromkeys(interior) if x is not match.final]
    return match
