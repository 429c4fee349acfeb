"""Post-grad pass: every `aten.convolution` becomes a conv region, with its epilogue chain.

Rules:
    convolution(x, w, b) => im2win_conv(x, w, b)
    convolution(reflection_pad(x, p), w, b, padding=0) => im2win_conv[padding p, reflect](x, w, b)
    convolution(x * s, w, b), 1x1, s [N, C, 1, 1] => im2win_conv[x*scale](x, w, b, s)
        (squeeze-and-excitation's scale before a project conv: gemm_1x1 scales x as it
        loads it, so the scaled copy is never made)
        (likewise replication_pad: nn.ConvNd's padding_mode, or F.pad feeding a conv; the
        kernel maps the border in its loads, so the padded copy is never made)
    convolution(act(batch_norm(x, mean, var, g, beta)), w, b)
        => im2win_conv[bn+act(x)](x, w, b, g, beta, mean, var)
    convolution(permute(layer_norm(permute(x, NHWC)), NCHW), w, b)
        => im2win_conv[ln(x)](x, w, b, g, beta)
    convolution(act(batch_norm(depthwise_convolution(x, wd))), w, b), 1x1
        => im2win_conv[dwKxK+bn+act(x)](x, w, b, g, beta, mean, var, wd)
        (the inverted residual's tail: dw_gemm computes the depthwise conv's output as its
        operand tiles, when the cost model prefers that to the two convs apart)
        (LayerNorm2d before ConvNeXt's downsampling: im2win_implicit computes each tap's
        pixel statistics and normalises x as it loads it)
    mean(y = depthwise_convolution(...) [-> epilogue], spatial dims, keepdim)
        => (y, sums) = im2win_conv_pool(...); mean = sum(sums, -1, keepdim)
        (squeeze-and-excitation's pool: direct_depthwise writes each tile's share of the
        channel means as it stores y, so the pool never reads y again)
        (pre-activation, DenseNet's and PreAct ResNet's BN -> ReLU -> conv: gemm_1x1 and
        im2win_implicit normalise x as they load it, so the normalised copy is never made)
    post_act(act(batch_norm(convolution(x, w, b), mean, var, g, beta)) + r)
        => im2win_conv[bn+act+add+post_act](x, w, b, g, beta, mean, var, r)

The rules on the conv's input (x * s, a BN or a LayerNorm it computes as it loads x) are
conv_inputs.py's. The guards run in order; the first that fails is the region's fallback
reason and the nodes stay ATen. The chain (conv_chain.py) takes what a kernel can fuse; a
BN in eval mode fed by the conv is folded into the kernel ("deploy"). A BN in train mode
stays ATen and its conv is a "train" region; a conv that the pre-grad Tune rewrite produced
is a "tune" region. Batch norms that no conv absorbs are recorded as fallbacks with their reason.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from ..counters import counters
from ..spec import ConvSpec, Epilogue, SpecError
from .context import PassContext, Region
from .conv_chain import BN_EVAL, BN_TRAIN, OUT_WINDOWS, Chain, grow_chain, window_chain
from .conv_inputs import (
    DW_PROLOGUE,
    depthwise_input,
    input_prologue,
    with_depthwise,
    with_out_windows,
)
from .conv_spec import conv_fallback_reason, conv_spec
from .linear_as_conv import FROM_LINEAR, IN_BLOCK
from .linear_as_conv import RULE as LINEAR_RULE
from .meta import conv_summary, dynamo_sources, fake_value, memory_layout, shape_summary

RULES = {
    "conv": "convolution(x, w, b) => im2win_conv(x, w, b)",
    "conv_bn": "post_act(act(batch_norm(convolution(x, w, b))) + r) => im2win_conv[epilogue](...)",
    "batch_norm": "batch_norm(x) (not fed by a convolution) => ATen",
}
aten = torch.ops.aten
GRAD_INPUT = "conv_grad_input"  # facts: the convolutions conv_backward.py made for grad_input


def _feeds_conv(bn: torch.fx.Node) -> bool:
    """Whether a convolution reads this batch norm's output, directly or through one op."""
    outputs = [u for u in bn.users if u.target is operator.getitem and u.args[1] == 0]
    after = [u for out in outputs for u in out.users]
    return any(u.target == aten.convolution.default for out in outputs + after for u in out.users)


def pooled_mean(last: torch.fx.Node, spec: ConvSpec, ctx: PassContext):
    """The global average pool of a forward depthwise conv's output (its chain's `last`):
    mean.dim(y, spatial dims, keepdim=True) of y's dtype, which direct_depthwise's kernel can
    turn into a sum of its tiles' shares (spec.pool_sums); else None."""
    if ctx.stage == "backward" or spec.op != "conv" or spec.in_channels_per_group != 1:
        return None
    if spec.output_layout != "nchw" or spec.hint(spec.batch) > 65535:
        return None  # direct_depthwise's image tiles (template.py's check_row_tiling)
    rank = spec.ndim + 2
    for user in last.users:
        if user.target is not aten.mean.dim or user.args[0] is not last or user.kwargs:
            continue
        dims = {int(d) % rank for d in user.args[1]}
        keepdim = user.args[2] if len(user.args) > 2 else False
        out = fake_value(user)
        if dims == set(range(2, rank)) and keepdim and out is not None:
            if out.dtype == fake_value(last).dtype:
                return user
    return None


def _mode(node: torch.fx.Node, chain: Chain, ctx: PassContext) -> str | None:
    if node.name in ctx.facts.get(GRAD_INPUT, ()):
        return "grad_input"
    if chain.epilogue.bn:
        return "deploy"
    tuned = ctx.facts.get("conv_bn_tune", set())
    if any(name in tuned for name in dynamo_sources(node)):
        return "tune"
    trained = ctx.facts.get("conv_bn_train", set())
    if any(name in trained for name in dynamo_sources(node)):
        return "train"
    if any(user.target is BN_TRAIN and user.args[0] is node for user in node.users):
        return "train"
    return None


DW_NOTE = "dw_note"  # node.meta: what the report says of a 1x1 conv's depthwise input


def _depthwise_readers(gm: torch.fx.GraphModule, ctx: PassContext) -> dict[str, torch.fx.Node]:
    """{depthwise conv: the 1x1 conv that could compute it} (conv_inputs.depthwise_input),
    in inference graphs with option blocks."""
    if not ctx.config.blocks or ctx.stage != "inference":
        return {}
    found = {}
    for node in gm.graph.nodes:
        if node.target == aten.convolution.default and not node.meta.get(FROM_LINEAR):
            hit = depthwise_input(node)
            if hit is not None:
                found[dict(hit[2])["dw_conv"]] = node
    return found


def _fused_into(dw: torch.fx.Node, conv: torch.fx.Node, ctx: PassContext, claimed: set) -> bool:
    """Whether the depthwise conv `dw` runs inside the 1x1 conv that reads its BN and
    activation: the cost model's call (ctx.plan_fusion) between that kernel and the two
    convs' own regions. Marks the 1x1 conv (DW_PROLOGUE), or leaves it the reason (DW_NOTE)."""
    if conv_fallback_reason(conv, ctx) is not None:
        return False
    x, prologue, roles = depthwise_input(conv)
    dw_chain = grow_chain(dw, claimed)
    chain = grow_chain(conv, claimed | {name for _, name in roles})
    try:
        parts = (conv_spec(dw, dw_chain.epilogue, dw_chain.last),
                 conv_spec(conv, chain.epilogue, chain.last))  # fmt: skip
        fused = with_depthwise(parts[1], prologue, fake_value(x))
    except SpecError as err:
        conv.meta[DW_NOTE] = f"not fused with its depthwise conv: {err}"
        return False
    reason, note = ctx.plan_fusion(fused, parts) if ctx.plan_fusion else (None, "")
    if reason is not None:
        conv.meta[DW_NOTE] = f"not fused with its depthwise conv: {reason}"
        return False
    conv.meta[DW_PROLOGUE] = True
    conv.meta[DW_NOTE] = f"its depthwise conv's output stays on chip: {note}" if note else None
    return True


def match_conv(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    claimed: set[str] = set()
    conv_reasons: dict[str, str] = {}  # the convolutions that stay ATen, and why
    readers = _depthwise_readers(gm, ctx)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.convolution.default:
            continue
        if IN_BLOCK in node.meta:  # ConvNeXt's depthwise conv, inside a block region
            continue
        reason = conv_fallback_reason(node, ctx)
        if reason is not None:
            conv_reasons[node.name] = reason
        elif node.name in readers and _fused_into(node, readers[node.name], ctx, claimed):
            counters["match.dw_prologue"] += 1
            continue  # the 1x1 conv that reads it computes it (conv_inputs.DW_PROLOGUE)
        chain = Chain((("conv", node.name),), Epilogue(), node)
        if reason is None:
            scale = 1 if node.meta.get(FROM_LINEAR) else None  # a linear's layer scale
            norm = ctx.config.blocks and ctx.stage == "inference" and not scale
            chain = window_chain(node, claimed) or grow_chain(
                node, claimed, layer_scale=scale, layer_norm=norm)
            out = fake_value(chain.last)
            if (
                out is None
                or out.dtype != fake_value(node).dtype
                or memory_layout(out) == "strided"
            ):
                chain = Chain((("conv", node.name),), Epilogue(), node)
        claimed.update(name for _, name in chain.roles)
        linear = bool(node.meta.get(FROM_LINEAR))
        mode = None if linear else _mode(node, chain, ctx)
        kind = "linear" if linear else "conv_bn" if mode in ("deploy", "tune", "train") else "conv"
        spec = conv_spec(node, chain.epilogue, chain.last) if reason is None else None
        if spec is not None and chain.roles[1:2] and chain.roles[1][0] == "win_out":
            spec = with_out_windows(spec, node.meta[OUT_WINDOWS][0], chain.last)
        summary = spec.describe() if spec is not None else conv_summary(node)
        rule = "conv_bn" if chain.epilogue.name() else "conv"
        roles = chain.roles
        if spec is not None and spec.padding_mode != "zeros":
            roles = (*roles, ("pad", node.args[0].name))  # the kernel reads its input
        if spec is not None:  # what the kernel computes from its input as it loads it
            spec, roles, taken = input_prologue(node, spec, roles, ctx, claimed, linear)
            summary = spec.describe()
            claimed.update(taken)
        blocks = spec is not None and not linear and ctx.config.blocks
        pool = pooled_mean(chain.last, spec, ctx) if blocks else None
        if pool is not None and pool.name not in claimed:  # the kernel also pools y
            spec = dataclasses.replace(spec, pool_sums=True)
            summary, roles = spec.describe(), (*roles, ("pool", pool.name))
            claimed.add(pool.name)
        ctx.regions.append(
            Region(
                name=ctx.new_region_name(kind),
                kind=kind,
                rule=LINEAR_RULE if linear else RULES[rule],
                stage=ctx.stage,
                nodes=tuple(name for _, name in chain.roles),
                summary=f"linear as {summary}" if linear else summary,
                spec=spec,
                fallback_reason=reason,
                roles=roles,
                mode=mode,
                note=node.meta.get(DW_NOTE),
            )
        )
        counters[f"match.{kind}" if reason is None else f"fallback.{kind}"] += 1
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (BN_EVAL, BN_TRAIN):
            source = node.args[0]
            fed_by_conv = (
                isinstance(source, torch.fx.Node) and source.target == aten.convolution.default
            )
            if node.name in claimed or (node.target is BN_TRAIN and fed_by_conv):
                continue
            if fed_by_conv and source.name in conv_reasons:
                reason = f"its convolution runs ATen: {conv_reasons[source.name]}"
            elif fed_by_conv:
                reason = "the convolution's output has other users, so BN cannot be folded into it"
            elif ctx.stage == "backward":
                reason = (
                    "batch_norm recomputed by the backward from its input (recompute.py): "
                    "Inductor compiles it"
                )
            elif _feeds_conv(node):
                reason = (
                    "batch_norm before a convolution that cannot normalise its input as it "
                    "loads it (a forward conv that alone reads the BN's output, or its "
                    "activation's, does, with option blocks=True): Inductor compiles it"
                )
            else:
                reason = (
                    "batch_norm neither fed by a convolution nor feeding one (e.g. BN -> ReLU"
                    " -> pool): Inductor compiles it"
                )
            ctx.regions.append(
                Region(
                    name=ctx.new_region_name("batch_norm"),
                    kind="batch_norm",
                    rule=RULES["batch_norm"],
                    stage=ctx.stage,
                    nodes=(node.name,),
                    summary=shape_summary(node),
                    spec=None,
                    fallback_reason=reason,
                    mode="train" if node.target is BN_TRAIN else "eval",
                )
            )
            counters["fallback.batch_norm"] += 1
    return gm
