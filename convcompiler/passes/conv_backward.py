"""Post-grad pass on backward graphs: a conv's backward becomes the ops the matchers know.

Rules (output_mask says which gradients anyone needs; the others are not computed):

    convolution_backward(dy, x, w, ...)[0]  =>  convolution(dy, w, transposed=not t, ...)
        grad_input: a conv's is the transposed conv of dy (output_padding chosen so that it
        has x's size); a transposed conv's is the forward conv of dy. match_conv then takes
        it as an ordinary conv region (mode "grad_input"), with ATen as a candidate.
    convolution_backward(dy, x, w, ...)[1]  =>  conv_wgrad region over
        convolution_backward(dy, x, w, ..., output_mask=[False, True, False])[1]
        grad_weight: the region's op replaces the getitem; if it falls back, the ATen node
        with the narrowed mask stays and computes only dw.
    convolution_backward(dy, x, w, ...)[2]  =>  sum(dy, [0, 2, ...])
        grad_bias: a reduction Inductor fuses with what else reads dy.

A transposed conv's weight gradient is the weight gradient of the forward conv that maps dy
to x (same stride, padding, dilation and groups): the region's spec is that conv's, and its
op reads (x, dy) in place of (dy, x).
A 3-D conv's gradients are split the same way: its grad_input is a 3-D transposed conv, its
grad_weight a conv_wgrad region whose kernel walks the depth taps too. Only convolutions in
the kernels' dtypes are split; the others keep their convolution_backward untouched. Nothing
is split with option backward="aten", nor on CPU tensors under cpu="aten" (Inductor's own
lowering runs it there).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..counters import counters
from ..spec import DTYPES, Epilogue
from .context import PassContext, Region
from .conv_spec import conv_fallback_reason, conv_spec, padded_input
from .match_conv import GRAD_INPUT
from .meta import fake_value, memory_layout, run_on_fakes

aten = torch.ops.aten
RULES = {
    "grad_input": "convolution_backward(dy, x, w)[0] => convolution(dy, w, transposed=not t)",
    "conv_wgrad": "convolution_backward(dy, x, w)[1] => im2win_conv_wgrad(dy, x)",
    "grad_bias": "convolution_backward(dy, x, w)[2] => sum(dy, [0, 2, ...])",
}


def _getitems(node: torch.fx.Node) -> dict[int, torch.fx.Node]:
    return {
        user.args[1]: user
        for user in node.users
        if user.op == "call_function" and user.target is operator.getitem
    }


def _add(graph: torch.fx.Graph, target, args: tuple, like: torch.fx.Node) -> torch.fx.Node:
    node = graph.call_function(target, args)
    node.meta["val"] = run_on_fakes(node)
    for key in ("stack_trace", "nn_module_stack", "seq_nr"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def _grad_input_args(node: torch.fx.Node) -> tuple | None:
    """aten.convolution arguments computing grad_input, or None if no conv computes it."""
    dy, x, w, _, stride, padding, dilation, transposed, output_padding, groups, _ = node.args
    spatial = fake_value(w).dim() - 2
    stride, padding, dilation, output_padding = (
        list(v) if len(v) == spatial else list(v) * spatial
        for v in (stride, padding, dilation, output_padding)
    )
    if transposed:
        if any(op >= s for op, s in zip(output_padding, stride)):
            return None  # the forward conv of dy would not come back to x's size
        return (dy, w, None, stride, padding, dilation, False, [0] * spatial, groups)
    x_size, dy_size, k = fake_value(x).shape[2:], fake_value(dy).shape[2:], fake_value(w).shape[2:]
    extra = [
        int(xs - ((ys - 1) * s - 2 * p + d * (kk - 1) + 1))
        for xs, ys, s, p, d, kk in zip(x_size, dy_size, stride, padding, dilation, k)
    ]
    return (dy, w, None, stride, padding, dilation, True, extra, groups)


def _split(gm: torch.fx.GraphModule, node: torch.fx.Node, ctx: PassContext) -> None:
    graph = gm.graph
    items = _getitems(node)
    mask = [bool(m) and i in items for i, m in enumerate(node.args[10])]  # only what is read
    dy = node.args[0]
    with graph.inserting_before(node):
        if mask[0]:
            args = _grad_input_args(node)
            reason = "output_padding >= stride: no conv takes dy back to x's size"
            if args is not None:
                conv = _add(graph, aten.convolution.default, args, node)
                reason = conv_fallback_reason(conv, ctx)
                if reason is None:
                    items[0].replace_all_uses_with(conv)
                    graph.erase_node(items.pop(0))
                    ctx.facts.setdefault(GRAD_INPUT, set()).add(conv.name)
                    mask[0] = False
                else:
                    graph.erase_node(conv)
            if reason is not None:  # ATen's convolution_backward keeps it: say so and why
                _fallback(items[0], "grad_input", reason, ctx)
        if mask[2]:
            dims = [0, *range(2, fake_value(dy).dim())]
            total = _add(graph, aten.sum.dim_IntList, (dy, dims), node)
            items[2].replace_all_uses_with(total)
            graph.erase_node(items.pop(2))
            mask[2] = False
        if mask[1] and (mask[0] or mask[2]):
            # the weight gradient on its own node, so that its region can replace it alone
            wgrad = _add(graph, aten.convolution_backward.default,
                         (*node.args[:10], [False, True, False]), node)
            with graph.inserting_after(wgrad):
                item = graph.call_function(operator.getitem, (wgrad, 1))
            item.meta["val"] = fake_value(items[1])
            items[1].replace_all_uses_with(item)
            graph.erase_node(items.pop(1))
            mask[1] = False
            _wgrad_region(item, wgrad, ctx)
        elif mask[1]:
            _wgrad_region(items[1], node, ctx)
    if not any(mask) and not node.users:
        graph.erase_node(node)
    elif mask != list(node.args[10]):
        node.update_arg(10, mask)


def _fallback(item: torch.fx.Node, mode: str, reason: str, ctx: PassContext) -> None:
    """A gradient that stays in ATen's convolution_backward, recorded with its reason."""
    ctx.regions.append(
        Region(
            name=ctx.new_region_name("conv"),
            kind="conv",
            rule=RULES["conv_wgrad" if mode == "grad_weight" else mode],
            stage=ctx.stage,
            nodes=(item.name,),
            summary=f"{mode} of {item.args[0].name}",
            spec=None,
            fallback_reason=reason,
            mode=mode,
        )
    )
    counters["fallback.conv"] += 1


def _wgrad_region(item: torch.fx.Node, node: torch.fx.Node, ctx: PassContext) -> None:
    """The conv_wgrad region of `node` (a convolution_backward computing only dw)."""
    dy, x, w = node.args[:3]
    transposed = bool(node.args[7])
    # The forward conv whose weight gradient this is (x -> dy; for a transposed conv the
    # conv dy -> x): added for a moment, so the conv matcher's guards and spec read it.
    args = (dy if transposed else x, w, None, *node.args[4:7], False, [0], node.args[9])
    with node.graph.inserting_before(node):
        forward = _add(node.graph, aten.convolution.default, args, node)
    reason = conv_fallback_reason(forward, ctx)
    target = fake_value(x if transposed else dy)
    given = fake_value(forward).shape
    fits = all(statically_known_true(a == b) for a, b in zip(given, target.shape))
    if reason is None and not fits:
        # a transposed conv with output_padding >= stride (allowed when dilation > stride)
        reason = (
            f"the conv from dy back to x gives {tuple(given)}, not "
            f"{tuple(target.shape)}: output_padding >= stride"
        )
    if reason is None and padded_input(forward) is not None:
        # x is an F.pad the forward conv would read in place; the gradient kernel reads the
        # padded tensor itself, with no padding mode
        reason = "x is a padding-mode F.pad in the backward graph: no kernel reads it for dw"
    spec = None
    if reason is None:
        spec = dataclasses.replace(
            conv_spec(forward),
            op="conv_wgrad",
            has_bias=False,
            epilogue=Epilogue(),
            weight_layout=memory_layout(fake_value(item)),
        )
    node.graph.erase_node(forward)
    ctx.regions.append(
        Region(
            name=ctx.new_region_name("conv_wgrad"),
            kind="conv_wgrad",
            rule=RULES["conv_wgrad"],
            stage=ctx.stage,
            nodes=(node.name, item.name),
            summary=spec.describe() if spec is not None else f"weight gradient of {node.name}",
            spec=spec,
            fallback_reason=reason,
            roles=(("wgrad", node.name), ("out", item.name)),
            mode="grad_weight",
        )
    )
    counters["match.conv_wgrad" if reason is None else "fallback.conv_wgrad"] += 1


def split_conv_backward(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if ctx.stage != "backward" or ctx.config.backward == "aten":
        return gm
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.convolution_backward.default:
            continue
        dy, w = fake_value(node.args[0]), fake_value(node.args[2])
        if dy is None or w is None or (dy.device.type == "cpu" and ctx.config.cpu == "aten"):
            continue
        if str(dy.dtype).removeprefix("torch.") not in DTYPES:
            continue  # no kernel would take either gradient (float64): leave it whole
        _split(gm, node, ctx)
        counters["pass.conv_backward_split"] += 1
    gm.graph.lint()
    gm.recompile()
    return gm
