"""Post-grad pass: window multi-head self-attention becomes one region.

Rule:  softmax(scale * q @ k^T + bias[h] + mask[b mod nW]) @ v  =>  window_attention(q, k, v, ...)

Every `_softmax` (and SDPA call) is tried with attention_pattern.find_attention. A softmax
whose scores do not come from a matmul is not attention and is left alone silently; an
attention-like one that does not fit is recorded as a fallback with the reason. In a
training forward graph the attention's intermediates are recomputed in backward (see
recompute.py), so they are private to the region here too. In the backward graph the
recomputed forward stays the host's; the gradient around its softmax is the region of
match_attention_backward.py.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx

from ..counters import counters
from ..spec import DTYPES, MAX_HEAD_DIM, AttentionSpec
from .attention_pattern import (
    SDPA,
    SOFTMAX,
    AttentionMatch,
    NoMatch,
    find_attention,
    reaches_matmul,
)
from .attention_sparsity import key_tile_fractions
from .attention_views import canonical_dims, canonical_sizes
from .context import PassContext, Region
from .dims import Dim
from .meta import as_size, fake_value, fp32_precision, shape_summary, size_hints

log = logging.getLogger(__name__)
RULE = "softmax(scale * q @ k^T + bias[h] + mask[b mod nW]) @ v => window_attention(q, k, v, ...)"
aten = torch.ops.aten


def is_attention_candidate(node: torch.fx.Node) -> bool:
    """A softmax over matmul scores, or an SDPA call."""
    if node.op != "call_function":
        return False
    if node.target in SDPA:
        return True
    return node.target in SOFTMAX and reaches_matmul(node.args[0])


def _matmul_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    return fp32_precision(matmul, lambda: matmul.allow_tf32)


def attention_fallback_reason(m: AttentionMatch, private: bool) -> str | None:
    q = fake_value(m.q)
    dtype = str(q.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported"
    if q.device.type not in ("cpu", "cuda"):
        return f"device {q.device.type!r} is not supported"
    b, heads, n, d = _canonical(q, "q", m)
    nk, dv = _canonical(fake_value(m.k), "k", m)[2], _canonical(fake_value(m.v), "v", m)[3]
    if not all(isinstance(s, int) for s in (heads, n, d, nk, dv)):
        return "heads, tokens and head dims must be static"
    if 0 in (b, heads, n, d):
        return "zero-size q: nothing to compute, ATen returns eager's empty result"
    for name, dim in (("head_dim", d), ("v head_dim", dv)):
        if dim > MAX_HEAD_DIM:
            return f"{name} {dim} over {MAX_HEAD_DIM} (the kernel holds a head's row in registers)"
    for t in (m.k, m.v):
        if fake_value(t).dtype != q.dtype:
            return "q, k and v dtypes differ"
    if m.out_dtype is not None and str(m.out_dtype).removeprefix("torch.") not in DTYPES:
        return f"the output is cast to {m.out_dtype}"
    if private:
        inside = set(m.interior) | {m.final}
        for node in m.interior:
            outside = [user for user in node.users if user not in inside]
            if any(user.target is aten.sym_size.int for user in outside):
                return (
                    f"a symbolic size of {node.name}, inside the attention, is read outside it "
                    "(dynamic shapes: not supported yet)"
                )
            if outside:
                return f"{node.name}, inside the attention, is also used outside it"
    return None


def rewire_sizes(gm: torch.fx.GraphModule, m: AttentionMatch) -> None:
    """Dynamic shapes: a size that nodes outside the attention read from a node inside it
    (`sym_size(scores, 0)`, say) is read instead from an equal size computed before the
    attention (a SymInt input, typically), so the fused kernel can replace the inside."""
    inside = set(m.interior) | {m.final}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    first = min(order[node] for node in inside)
    earlier = [
        node
        for node in gm.graph.nodes
        if order[node] < first and isinstance(node.meta.get("val"), torch.SymInt)
    ]
    for node in m.interior:
        for user in list(node.users):
            if user in inside or user.target is not aten.sym_size.int:
                continue
            if not all(u in inside for u in user.users):
                size = Dim.of(user.meta["val"]) if "val" in user.meta else None
                twin = next((c for c in earlier if Dim.of(c.meta["val"]) == size), None)
                if size is not None and twin is not None:
                    user.replace_all_uses_with(twin, delete_user_cb=lambda u: u not in inside)
            if all(u in inside for u in user.users):  # now read only inside: part of it
                m.interior.append(user)
                inside.add(user)


def _canonical(value: torch.Tensor, name: str, m: AttentionMatch) -> tuple:
    """[B, H, N, D] sizes of a q, k or v value (see attention_views.canonical_dims)."""
    return canonical_dims(value, name in m.transposed, m.heads_axis)


def attention_spec(m: AttentionMatch) -> AttentionSpec:
    q = fake_value(m.q)
    b, heads, n, d = _canonical(q, "q", m)
    nk, dv = _canonical(fake_value(m.k), "k", m)[2], _canonical(fake_value(m.v), "v", m)[3]
    return AttentionSpec(
        batch=as_size(canonical_sizes(tuple(q.shape), False, m.heads_axis)[0]),
        heads=int(heads),
        tokens=int(n),
        head_dim=int(d),
        dtype=str(q.dtype).removeprefix("torch."),
        scale=float(m.scale),
        cosine=m.cosine,
        logit_scale=m.logit_scale is not None,
        bias=m.bias is not None,
        mask=m.mask is not None,
        windows=int(m.windows),
        general=m.general is not None,
        output=m.output,
        device=q.device.type,
        precision=_matmul_precision(q.dtype),
        hints=size_hints(q),
        mask_repeat=m.mask_repeat,
        safe_softmax=m.safe_softmax,
        key_tokens=None if int(nk) == int(n) else int(nk),
        v_head_dim=None if int(dv) == int(d) else int(dv),
        transposed=m.transposed,
        sdpa=m.sdpa,
        heads_axis=m.heads_axis,
        batch_split=m.batch_split,
        out_dtype=None if m.out_dtype is None else str(m.out_dtype).removeprefix("torch."),
        select=None if m.select is None else ("keep" if m.select.keep else "drop"),
        fill=float("-inf") if m.select is None else m.select.fill,
    )


def match_window_attention(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if ctx.stage == "backward":
        return gm  # the backward recomputes the attention in ATen (see recompute.py)
    for node in list(gm.graph.nodes):
        if not is_attention_candidate(node):
            continue
        try:
            m = find_attention(node)
        except NoMatch as err:
            reason, m = f"not window attention: {err}", None
        except Exception as err:  # a matcher bug: ATen runs the attention, the compile goes on
            log.warning("the attention matcher failed on %s", node.name, exc_info=True)
            counters["match.attention_error"] += 1
            reason, m = f"the attention matcher failed: {type(err).__name__}: {err}", None
        else:
            rewire_sizes(gm, m)
            reason = attention_fallback_reason(m, private=True)
        spec = attention_spec(m) if m is not None and reason is None else None
        if spec is not None:
            tiles = key_tile_fractions(gm, m, spec, ctx.constants)
            spec = dataclasses.replace(spec, key_tiles=tiles) if tiles else spec
        roles = ()
        if m is not None:
            operands = (
                ("q", m.q),
                ("k", m.k),
                ("v", m.v),
                ("bias", m.bias),
                ("mask", m.mask),
                ("general", m.general),
                ("logit_scale", m.logit_scale),
                ("select", m.select and m.select.node),
            )
            roles = tuple((role, n.name) for role, n in operands if n is not None)
            roles += (("final", m.final.name),)
        ctx.regions.append(
            Region(
                name=ctx.new_region_name("window_attention"),
                kind="window_attention",
                rule=RULE,
                stage=ctx.stage,
                nodes=tuple(n.name for n in (m.interior + [m.final])) if m else (node.name,),
                summary=spec.describe() if spec else shape_summary(node),
                spec=spec,
                fallback_reason=reason,
                roles=roles,
            )
        )
        counters["match.window_attention" if reason is None else "fallback.window_attention"] += 1
    return gm
