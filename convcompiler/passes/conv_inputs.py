"""What a forward conv's kernel computes from its input as it loads it, so that the
computed copy is never written (match_conv.py asks `input_prologue` for each conv):

    convolution(x * s, w, b), 1x1, s [N, C, 1, 1]          => spec.input_scale (x*scale)
        (squeeze-and-excitation's scale before a project conv: gemm_1x1)
    convolution(act(batch_norm(x)), w, b), an eval-mode BN  => spec.prologue bn[+act] (x)
        (pre-activation: DenseNet's, PreAct ResNet's BN -> ReLU -> conv; option blocks)
    convolution(nhwc(layer_norm(tokens)), w, b)            => spec.prologue ln (x)
        (a linear that alone reads a LayerNorm: linear_as_conv.py records it as PRE_NORM)
    convolution(permute(layer_norm(permute(x, NHWC)), NCHW), w, b), groups 1
                                                            => spec.prologue ln (x)
        (LayerNorm2d before ConvNeXt's downsampling; layer_norm.image_norm_input)
    convolution(nhwc(partition([roll](layer_norm(x)))), w, b)  => spec.prologue ln, spec.windows
        (Swin's qkv linear: its rows are the window tokens of the image x, read in place;
        linear_as_conv.py records the windows)
    convolution(act(batch_norm(depthwise_convolution(x, wd, bd))), w, b), 1x1
                                                            => spec.prologue dw+bn+act (x)
        (the inverted residual's tail, dw_gemm; when the cost model prefers it, match_conv
        marks the 1x1 conv DW_PROLOGUE and the depthwise conv gets no region of its own)

Each applies only when the conv alone reads what it replaces; a norm's nodes are claimed
(no other region takes them), and the kernel reads x through its own strides.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from ..spec import ConvSpec, Depthwise, Prologue, Windows
from .activations import as_activation
from .context import PassContext
from .conv_chain import BN_EVAL
from .layer_norm import image_norm_input
from .linear_as_conv import PRE_NORM, WINDOWS
from .meta import fake_value, memory_layout, size_hints, sizes

aten = torch.ops.aten
DW_PROLOGUE = "dw_prologue"  # node.meta of a 1x1 conv that computes its depthwise input


def scaled_operands(mul: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(x, s) of mul(x, s) or mul(s, x) with x [N, C, *spatial] and s [N, C, 1, ...] of x's
    dtype (a per-image channel scale), or None."""
    if mul.target is not aten.mul.Tensor or len(mul.args) != 2:
        return None
    for x, s in (mul.args, reversed(mul.args)):
        xv, sv = fake_value(x), fake_value(s)
        if xv is None or sv is None or xv.dim() < 3 or sv.dim() != xv.dim():
            continue
        if sv.dtype == xv.dtype and sizes(sv) == (*sizes(xv)[:2], *[1] * (xv.dim() - 2)):
            return x, s
    return None


def _scaled_input(node: torch.fx.Node, spec: ConvSpec, ctx: PassContext):
    """The mul(x, s) a forward 1x1 conv alone reads, which its kernel can apply, or None."""
    mul = node.args[0]
    if not _forward_input(node, spec, ctx) or len(mul.users) != 1 or spec.groups != 1:
        return None
    if spec.kernel != (1, 1) or spec.padding != (0, 0):
        return None
    return mul if scaled_operands(mul) is not None else None


def _forward_input(node: torch.fx.Node, spec: ConvSpec, ctx: PassContext) -> bool:
    """Whether a forward conv's kernel could compute its input as it loads it."""
    return (
        ctx.stage != "backward" and spec.op == "conv" and isinstance(node.args[0], torch.fx.Node)
    )


def _sole_input(node: torch.fx.Node, user: torch.fx.Node) -> bool:
    return isinstance(node, torch.fx.Node) and list(node.users) == [user]


def normed_input(conv: torch.fx.Node) -> tuple[torch.fx.Node, Prologue, tuple] | None:
    """(x, prologue, roles) when the conv reads [act](getitem(batch_norm(x), 0)), an eval-mode
    batch norm whose output (and activation) only the conv reads; else None."""
    cur, act, roles = conv.args[0], None, []
    if not _sole_input(cur, conv):
        return None
    if cur.target is not operator.getitem:
        act = as_activation(cur)
        if act is None or not cur.args or not _sole_input(cur.args[0], cur):
            return None
        roles.append(("x_act", cur.name))
        cur = cur.args[0]
    bn = cur.args[0] if cur.target is operator.getitem and cur.args[1] == 0 else None
    if bn is None or bn.target is not BN_EVAL or list(bn.users) != [cur]:
        return None
    weight, bias, _mean, _var, _momentum, eps = bn.args[1:7]
    if (weight is None) != (bias is None) or not isinstance(eps, (int, float)):
        return None
    kind = "plain" if weight is None else "affine"
    roles += [("x_getitem", cur.name), ("x_bn", bn.name)]
    return bn.args[0], Prologue(bn=kind, eps=float(eps), act=act), tuple(roles)


def _pairs(values: list, n: int = 2) -> tuple[int, ...]:
    return tuple(int(v) for v in (values if len(values) == n else list(values) * n))


def depthwise_input(conv: torch.fx.Node) -> tuple[torch.fx.Node, Prologue, tuple] | None:
    """(x, prologue, roles) when the conv reads act(getitem(batch_norm(dw))), normed_input's
    chain, and dw, which only the batch norm reads, is a 2-D depthwise convolution of x
    with zero padding and no dilation; else None (the 1x1 conv's own checks are its
    spec's)."""
    normed = normed_input(conv)
    if normed is None or not isinstance(normed[0], torch.fx.Node):
        return None
    dw, prologue, roles = normed
    if dw.target is not aten.convolution.default or len(dw.users) != 1:
        return None
    x, weight, bias, stride, padding, dilation, transposed, _, groups = dw.args
    xv, wv = fake_value(x), fake_value(weight)
    if xv is None or wv is None or xv.dim() != 4 or wv.dim() != 4 or transposed:
        return None
    if not all(isinstance(v, int) for v in (xv.shape[1], *wv.shape)):
        return None
    c = wv.shape[0]
    if groups != c or wv.shape[1] != 1 or xv.shape[1] != c or set(_pairs(dilation)) != {1}:
        return None
    depthwise = Depthwise(
        kernel=tuple(wv.shape[2:]),
        stride=_pairs(stride),
        padding=_pairs(padding),
        bias=bias is not None,
        image=sizes(xv)[2:],
    )
    return x, dataclasses.replace(prologue, dw=depthwise), (*roles, ("dw_conv", dw.name))


def with_depthwise(spec: ConvSpec, prologue: Prologue, x: torch.Tensor) -> ConvSpec:
    """The 1x1 conv's spec reading `x`, the depthwise conv's input, through `prologue`."""
    hints = dict(spec.hints) | dict(size_hints(x))
    return dataclasses.replace(spec, prologue=prologue, input_layout=memory_layout(x),
                               hints=tuple(sorted(hints.items())))  # fmt: skip


def with_out_windows(spec: ConvSpec, windows: Windows, image: torch.fx.Node) -> ConvSpec:
    """The spec of a linear's conv whose output rows are `windows` tokens stored at their
    pixels of the residual add's [B, H, W, K] `image` (conv_chain.window_chain; not an input
    rule, but the same windows): its output is the GEMM's rows, channels last."""
    hints = dict(spec.hints) | dict(size_hints(fake_value(image)))
    return dataclasses.replace(spec, out_size=spec.in_size, output_layout="nhwc",
                               out_windows=windows, hints=tuple(sorted(hints.items())))


def input_prologue(
    node: torch.fx.Node,
    spec: ConvSpec,
    roles: tuple,
    ctx: PassContext,
    claimed: set[str],
    linear: bool,
) -> tuple[ConvSpec, tuple, set[str]]:
    """(the spec with what its kernel computes from x, the region's roles with the nodes it
    replaces, the names it claims) for the convolution `node` (see the module docstring);
    `claimed`: nodes other regions took, `linear`: a linear made a 1x1 conv."""
    taken: set[str] = set()
    scaled = None if linear else _scaled_input(node, spec, ctx)
    if scaled is not None:  # the kernel reads x and s
        x, _ = scaled_operands(scaled)
        layout = memory_layout(fake_value(x))
        spec = dataclasses.replace(spec, input_scale=True, input_layout=layout)
        roles = (*roles, ("x_scale", scaled.name))
    blocks = not linear and ctx.config.blocks and _forward_input(node, spec, ctx)
    fused = depthwise_input(node) if blocks and node.meta.get(DW_PROLOGUE) else None
    if fused is not None:  # the kernel reads the depthwise conv's input (see match_conv)
        x, prologue, pre_roles = fused
        spec = with_depthwise(spec, prologue, fake_value(x))
        return spec, (*roles, *pre_roles), {name for _, name in pre_roles}
    normed = normed_input(node) if blocks else None
    if normed is not None and any(name in claimed for _, name in normed[2]):
        normed = None  # the BN is the epilogue of the conv that feeds it
    if normed is not None:  # the kernel reads x and the BN's parameters
        x, prologue, pre_roles = normed
        layout = memory_layout(fake_value(x))
        spec = dataclasses.replace(spec, prologue=prologue, input_layout=layout)
        roles = (*roles, *pre_roles)
        taken.update(name for _, name in pre_roles)
    pre = node.meta.get(PRE_NORM) if ctx.config.blocks else None
    role = "x_ln"  # the norm's input as an image (a view linear_as_conv built)
    if pre is None and normed is None and blocks:
        pre = image_norm_input(node) if spec.groups == 1 else None
        role = "x_ln2d"  # the permute the norm reads: the kernel reads its input
    if pre is not None and not any(n.name in claimed for n in pre[1].nodes):
        normed_x, norm = pre  # a LayerNorm over the tokens' channels: the kernel's
        prologue = Prologue(ln=norm.kind, eps=norm.eps)
        image = normed_x.args[0] if role == "x_ln2d" else normed_x
        layout = memory_layout(fake_value(image))
        spec = dataclasses.replace(spec, prologue=prologue, input_layout=layout)
        windows = node.meta.get(WINDOWS) if role == "x_ln" else None
        if windows is not None:  # Swin's qkv: the image's window tokens, read in place
            hints = dict(spec.hints) | dict(size_hints(fake_value(image)))
            spec = dataclasses.replace(spec, windows=windows, hints=tuple(sorted(hints.items())))
        vectors = [(r, n.name) for r, n in (("ln_weight", norm.weight), ("ln_bias", norm.bias))
                   if n is not None]  # fmt: skip
        roles = (*roles, (role, normed_x.name), *vectors)
        taken.update(n.name for n in norm.nodes)
    return spec, roles, taken
