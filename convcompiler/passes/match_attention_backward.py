"""Post-grad pass (backward graphs): a window attention's gradient becomes one region.

Rule:  dS = P * (dP - rowsum(dP * P)), dP = dO @ v^T;  dq = scale * dS @ k,
       dk = scale * dS^T @ q,  dv = P^T @ dO,  dbias = sum_b dS   =>  attention_backward(...)

The backward graph recomputes the forward's scores and softmax P (recompute.py tags them).
From each softmax the forward matcher proves the attention (q, k, v, the terms, the scale);
this pass then finds, among P's users, the softmax backward (the fma form Inductor's
decomposition writes, or `_softmax_backward_data`) and the four bmms of the gradient, and
follows each bmm's result through views, permutes and scalar factors to the node that is
the gradient of q's, k's or v's source. That the found node holds the gradient in the
source's layout is proved on index tensors: the chain is run on a tensor of element codes,
compared with the codes the kernel's output has there. The bias gradient is the batch sum of
dS when the bias is the scores' only term with a gradient. Anything else (a term whose
gradient is used, dropout, cosine attention) is refused with the reason; the recomputed
forward output (the projection's weight gradient reads it) stays the host's.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..counters import counters
from ..score_terms import canonical_view
from .attention_pattern import SOFTMAX, NoMatch, find_attention
from .attention_views import (
    is_float_cast,
    is_last_two_transpose,
    is_reshape,
    same_values,
    scalar_factor,
    shape,
    strip_reshapes,
)
from .context import PassContext, Region
from .match_attention import attention_fallback_reason, attention_spec
from .meta import fake_value

log = logging.getLogger(__name__)
RULE = "dq, dk, dv (, dbias) of softmax(scale * q @ k^T + terms) @ v => attention_backward(...)"
aten = torch.ops.aten
prims = torch.ops.prims
PERMUTES = (aten.permute.default, aten.transpose.int)
LAYOUT_OPS = (*PERMUTES, aten.clone.default, aten.alias.default)


def _call(node: object, *targets) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_function"
        and (not targets or node.target in targets)
    )


def _bmms(m, p: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(the scores bmm q @ k^T, the output bmm P @ v) of the matched forward."""
    bmms = [n for n in dict.fromkeys(m.interior + [m.final]) if _call(n, aten.bmm.default)]
    out = [n for n in bmms if strip_reshapes(n.args[0]) is p]
    scores = [n for n in bmms if n not in out]
    if len(out) != 1 or len(scores) != 1:
        raise NoMatch("the attention's matmuls are not one q @ k^T and one P @ v")
    return scores[0], out[0]


def _softmax_backward(p: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(dS, dP) of the softmax P: `_softmax_backward_data(dP, P)`, or the decomposition
    fma(-P, sum(dP * P, -1), dP * P)."""
    for user in p.users:
        if _call(user, aten._softmax_backward_data.default) and user.args[1] is p:
            return user, user.args[0]
        if _call(user, aten.neg.default):
            for fma in user.users:
                if not _call(fma, prims.fma.default) or fma.args[0] is not user:
                    continue
                total, prod = fma.args[1], fma.args[2]
                if (_call(prod, aten.mul.Tensor) and p in prod.args
                        and _call(total, aten.sum.dim_IntList) and total.args[0] is prod
                        and list(total.args[1]) in ([-1], [len(shape(p)) - 1])):  # fmt: skip
                    dp = prod.args[0] if prod.args[1] is p else prod.args[1]
                    return fma, dp
    raise NoMatch("no softmax backward reads the recomputed softmax")


def _strip_ones(sizes: tuple) -> tuple:
    while sizes and sizes[0] == 1:
        sizes = sizes[1:]
    return sizes


def _batch_sum(node: torch.fx.Node, ds: torch.fx.Node) -> bool:
    """node sums dS over its batch dim: sum(dS, [0]) (keepdim or not), or squeeze(dS, 0) when
    the batch is 1 (what autograd's sum_to_size becomes then)."""
    if _call(node, aten.sum.dim_IntList):
        return list(node.args[1]) == [0]
    return _call(node, aten.squeeze.dim) and node.args[1] == 0 and shape(ds)[0] == 1


def _transposed_of(node: object, source: torch.fx.Node) -> bool:
    """node is `source` with its last two dims swapped."""
    return is_last_two_transpose(node) and node.args[0] is source


def _grad_chain(bmm: torch.fx.Node, target_shape: tuple) -> list[torch.fx.Node]:
    """bmm and the single-user chain of views, layout copies, casts and scalar factors after
    it, up to the first node of `target_shape` after which the chain goes no further."""
    chain, node = [bmm], bmm
    while len(node.users) == 1:
        nxt = next(iter(node.users))
        if not (is_reshape(nxt) or same_values(nxt) or is_float_cast(nxt)
                or _call(nxt, *LAYOUT_OPS) or scalar_factor(nxt) is not None):  # fmt: skip
            break
        chain.append(nxt)
        node = nxt
    while chain and shape(chain[-1]) != target_shape:
        chain.pop()
    if not chain:
        raise NoMatch(f"no node after {bmm.name} holds a gradient of shape {target_shape}")
    return chain


def _codes_through(chain: list[torch.fx.Node], codes: torch.Tensor) -> torch.Tensor:
    """Run the chain (after its first node) on `codes` in place of the first node's value:
    scalar factors and casts are skipped, every other op is run as the graph runs it."""
    env = {chain[0]: codes}
    for node in chain[1:]:
        if scalar_factor(node) is not None or is_float_cast(node):
            env[node] = env[node.args[0]]
            continue
        args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda a: env[a])
        env[node] = node.target(*args, **kwargs)
    return env[chain[-1]]


def _source_codes(value: torch.Tensor, name: str, spec) -> torch.Tensor:
    """The codes of the canonical [B, H, N, D] gradient's elements, laid out as the source
    operand `value` (q, k or v) holds them: where the canonical view of `value`
    (score_terms.canonical_view: 5-D, transposed or 3-D as matched) reads source element p
    as its c-th element, the result holds c at p."""
    source = torch.arange(value.numel()).view(value.shape)
    where = canonical_view(source, name in spec.transposed, spec.heads_axis)
    codes = torch.empty(value.numel(), dtype=torch.int64)
    codes[where.flatten()] = torch.arange(value.numel())
    return codes.view(value.shape)


def _verified(chain, bmm_codes: torch.Tensor, value, name, spec) -> None:
    with unset_fake_temporarily():
        got = _codes_through(chain, bmm_codes)
        want = _source_codes(value, name, spec)
    if got.shape != want.shape or not torch.equal(got, want):
        raise NoMatch(f"the gradient of {name} is not laid out as {name} is")


def recomputed(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The nodes of a backward graph that recompute the forward: not computed from the
    output gradients (tangents), and not a view (P^T for dv) or a negation (-P for the
    softmax backward) read only by nodes that are."""
    grad: set[torch.fx.Node] = set()
    nodes = list(graph.nodes)
    for node in nodes:
        if node.op == "placeholder" and node.name.startswith("tangents"):
            grad.add(node)
        elif any(a in grad for a in node.all_input_nodes):
            grad.add(node)
    helpers = set()
    for node in nodes:
        view = is_reshape(node) or same_values(node) or _call(node, *PERMUTES)
        if (view or _call(node, aten.neg.default)) and node.users and node.users.keys() <= grad:
            helpers.add(node)
    return {node for node in nodes if node not in grad and node not in helpers}


def match_attention_backward(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if ctx.stage != "backward":
        return gm
    forward = None
    for node in list(gm.graph.nodes):
        if not _call(node, *SOFTMAX):
            continue
        forward = forward if forward is not None else recomputed(gm.graph)
        try:
            m = find_attention(node, forward)
        except NoMatch:
            continue  # not an attention: nothing to say
        except Exception as err:  # a matcher bug: the host runs it
            log.warning("the attention matcher failed on %s", node.name, exc_info=True)
            counters["match.attention_error"] += 1
            reason, roles, spec = f"the attention matcher failed: {err}", (), None
        else:
            try:
                roles, spec = _gradient(node, m)
                reason = attention_fallback_reason(m, private=False)
            except NoMatch as err:
                reason, roles, spec = f"not an attention backward: {err}", (), None
        targets = tuple(name for role, name in roles if role in ("dq", "dk", "dv", "dbias"))
        ctx.regions.append(
            Region(
                name=ctx.new_region_name("attention_backward"),
                kind="attention_backward",
                rule=RULE,
                stage=ctx.stage,
                nodes=targets or (node.name,),
                summary=spec.describe() if spec else node.name,
                spec=spec if reason is None else None,
                fallback_reason=reason,
                roles=roles,
            )
        )
        kind = "match" if reason is None else "fallback"
        counters[f"{kind}.attention_backward"] += 1
    return gm


def _gradient(p: torch.fx.Node, m) -> tuple[tuple, object]:
    """(roles, spec) of the gradient of the attention m whose softmax is p."""
    if m.cosine:
        raise NoMatch("cosine attention (its normalisation's gradient is the host's)")
    if m.out_dtype is not None:
        raise NoMatch("the attention output is cast")
    if m.logit_scale is not None:
        raise NoMatch("a logit scale (its gradient is the host's)")
    scores_bmm, out_bmm = _bmms(m, p)
    p3, v3 = out_bmm.args
    q3, kt3 = scores_bmm.args
    ds, dp = _softmax_backward(p)
    dp_bmm = strip_reshapes(dp)
    if not _call(dp_bmm, aten.bmm.default) or not _transposed_of(dp_bmm.args[1], v3):
        raise NoMatch("dP is not dO @ v^T")
    dout = dp_bmm.args[0]
    # dv = P^T @ dO
    dv_bmm = next((u for t in p3.users if _transposed_of(t, p3) for u in t.users
                   if _call(u, aten.bmm.default) and u.args == (t, dout)), None)  # fmt: skip
    if dv_bmm is None:
        raise NoMatch("no P^T @ dO")
    # dS's users: its [B*H, N, Nk] view for the two bmms, and the bias's batch sum
    ds3, dbias = None, None
    for user in ds.users:
        feeds_bmms = all(_call(u, aten.bmm.default) for u in user.users)
        if is_reshape(user) and shape(user) == shape(scores_bmm) and feeds_bmms and ds3 is None:
            ds3 = user
        elif m.bias is not None and _batch_sum(user, ds):
            if _strip_ones(shape(user)) != _strip_ones(shape(m.bias)):
                raise NoMatch(f"the bias gradient {shape(user)} is not shaped as the bias")
            dbias = user
        else:
            raise NoMatch(f"the scores' gradient is also read by {user.name}")
    if ds3 is None:
        raise NoMatch("dS is not viewed as the scores bmm's output")
    dq_bmm = dk_bmm = None
    for user in ds3.users:
        if (
            _call(user, aten.bmm.default)
            and user.args[0] is ds3
            and _transposed_of(user.args[1], kt3)
        ):
            dq_bmm = user
        elif (
            _call(user, aten.bmm.default)
            and user.args[1] is ds3
            and _transposed_of(user.args[0], q3)
        ):
            dk_bmm = user
        else:
            raise NoMatch(f"dS is also read by {user.name}")
    if dq_bmm is None or dk_bmm is None:
        raise NoMatch("no dS @ k or q^T @ dS")
    spec = attention_spec(m)
    if spec.is_dynamic:
        raise NoMatch("dynamic shapes: the backward kernel is planned for static sizes")
    b, h, n, nk = spec.batch, spec.heads, spec.tokens, spec.keys
    d, dv = spec.head_dim, spec.value_dim
    targets = {}
    for name, bmm, codes in (
        ("q", dq_bmm, torch.arange(b * h * n * d).view(b * h, n, d)),
        (
            "k",
            dk_bmm,
            torch.arange(b * h * nk * d).view(b, h, nk, d).transpose(2, 3).reshape(b * h, d, nk),
        ),  # fmt: skip
        ("v", dv_bmm, torch.arange(b * h * nk * dv).view(b * h, nk, dv)),
    ):
        source = {"q": m.q, "k": m.k, "v": m.v}[name]
        value = fake_value(source)
        chain = _grad_chain(bmm, tuple(value.shape))
        _verified(chain, codes, value, name, spec)
        targets[name] = chain[-1]
    roles = (("q", m.q.name), ("k", m.k.name), ("v", m.v.name), ("dout", dout.name))
    terms = (("bias", m.bias), ("mask", m.mask), ("general", m.general),
             ("select", m.select and m.select.node))  # fmt: skip
    roles += tuple((role, x.name) for role, x in terms if x is not None)
    roles += tuple((f"d{name}", targets[name].name) for name in "qkv")
    if dbias is not None:
        roles += (("dbias", dbias.name),)
    return roles, dataclasses.replace(spec, grad=True, key_tiles=())
