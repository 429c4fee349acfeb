"""The ConvSpec of one `aten.convolution` node, and why a convolution cannot run a
generated kernel (the guards, in order; the first that fails is its fallback reason).

match_conv.py builds every conv region's spec here; conv_backward.py and the front end's
direct kernels (frontend/kernels.py) read the same specs.
"""

from __future__ import annotations

import torch
import torch.fx

from ..spec import DTYPES, ConvSpec, Depth, Epilogue
from .context import PassContext
from .linear_as_conv import FROM_LINEAR, matmul_precision
from .meta import dynamo_sources, fake_value, fp32_precision, memory_layout, size_hints, sizes

aten = torch.ops.aten


def _conv_precision() -> str:
    """How cuDNN runs a float32 conv right now: TF32 unless the user turned it off.

    Read for CPU tensors too: the plan is made for a GPU, and Triton's interpreter computes
    a float32 tl.dot exactly whatever the precision says."""
    cudnn = torch.backends.cudnn
    return fp32_precision(getattr(cudnn, "conv", None), lambda: cudnn.allow_tf32)


def _precision(node: torch.fx.Node, dtype: torch.dtype) -> str:
    """A float32 kernel's precision: a linear's is torch's matmul precision, a conv's cuDNN's."""
    if dtype != torch.float32:
        return "ieee"
    return matmul_precision(dtype) if node.meta.get(FROM_LINEAR) else _conv_precision()


def conv_params(node: torch.fx.Node) -> tuple[tuple[int, ...], ...]:
    """(stride, padding, dilation, output_padding) of an aten.convolution, one value per
    spatial dim (output_padding is zeros for a forward conv).

    ATen broadcasts a one-element list over the spatial dims: `padding="valid"` reaches the
    aten graph as `padding=[0]` for a 2-D convolution."""
    _, w, _, stride, padding, dilation, transposed, output_padding = node.args[:8]
    spatial = len(fake_value(w).shape) - 2
    output_padding = output_padding if transposed else [0]
    return tuple(
        tuple(int(v) for v in (values if len(values) == spatial else list(values) * spatial))
        for values in (stride, padding, dilation, output_padding)
    )


PADS = {  # the padding modes a kernel reads in place (anchored in frontend/inductor.py)
    aten.reflection_pad1d.default: "reflect",
    aten.reflection_pad2d.default: "reflect",
    aten.replication_pad1d.default: "replicate",
    aten.replication_pad2d.default: "replicate",
    aten.reflection_pad3d.default: "reflect",
    aten.replication_pad3d.default: "replicate",
}


def _pad_mode(pad: torch.fx.Node) -> str | None:
    """The mode of a pad a conv kernel reads in place: ATen's reflection and replication
    pads, and im2win.pad_circular (passes/padding_modes.py); None for any other node."""
    if pad.op != "call_function":
        return None
    if str(pad.target) == "im2win.pad_circular.default":
        return "circular"
    return PADS.get(pad.target)


def padded_input(node: torch.fx.Node) -> tuple[torch.fx.Node, str, tuple, int] | None:
    """(x, mode, padding per spatial dim, padding after the depth) when the conv reads
    F.pad(x, mode) with the same amount on both sides of each dim (a 3-D conv's depth may
    differ: a causal video conv pads the past only) and has no zero padding of its own;
    else None."""
    pad = node.args[0]
    if not isinstance(pad, torch.fx.Node) or _pad_mode(pad) is None or node.args[6]:
        return None
    if any(conv_params(node)[1]):
        return None  # zero padding around a mirrored border: not one index map
    amounts = [int(a) for a in pad.args[1]]  # F.pad order: last dim first, (before, after)
    pairs = [amounts[i : i + 2] for i in range(0, len(amounts), 2)][::-1]  # outer dim first
    spatial = len(fake_value(node.args[1]).shape) - 2
    if len(pairs) != spatial or any(a < 0 or b < 0 for a, b in pairs):
        return None
    if any(a != b for a, b in pairs[1:]) or (spatial < 3 and pairs[0][0] != pairs[0][1]):
        return None
    return pad.args[0], _pad_mode(pad), tuple(a for a, _ in pairs), pairs[0][1]


def conv_fallback_reason(node: torch.fx.Node, ctx: PassContext) -> str | None:
    """Why this convolution cannot run a generated kernel, or None if it can."""
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = node.args
    out, xv, wv = fake_value(node), fake_value(x), fake_value(w)
    if out is None or xv is None or wv is None:
        return "no fake-tensor metadata on the convolution"
    spatial = len(wv.shape) - 2
    if spatial not in (1, 2, 3):
        return f"{spatial}-D convolution: only 1-D, 2-D and 3-D convolutions are supported"
    if any(len(values) not in (1, spatial) for values in (stride, padding, dilation)):
        return "stride, padding or dilation does not give one value per spatial dim"
    if transposed and len(output_padding) not in (1, spatial):
        return "output_padding does not give one value per spatial dim"
    empty = [name for name, t in (("input", xv), ("weight", wv), ("output", out)) if 0 in sizes(t)]
    if empty:
        return (
            f"zero-size {' and '.join(empty)}: nothing to compute, ATen returns eager's empty "
            "result"
        )
    mode = ctx.facts.get("conv_padding_mode", {})
    padded = padded_input(node) is not None  # a mode the kernel reads itself
    for name in sorted(dynamo_sources(node)):
        if name in mode and not padded:
            return (
                f"padding_mode={mode[name]!r}: the input is padded by a separate op; "
                "only zeros, and reflect, replicate or circular padding the same on both "
                "sides (a 3-D conv's depth aside), are read by the kernel"
            )
    dtype = str(xv.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported (kernels run {', '.join(DTYPES)})"
    if wv.dtype != xv.dtype or (fake_value(b) is not None and fake_value(b).dtype != xv.dtype):
        return "input, weight and bias dtypes differ"
    if xv.device.type not in ("cpu", "cuda"):
        return f"device {xv.device.type!r} is not supported (cpu or cuda)"
    if not all(isinstance(s, int) for s in sizes(wv)):
        return "the weight shape is symbolic; kernels need a static kernel size"
    if memory_layout(out) == "strided":
        return "the output is neither contiguous nor channels_last"
    return None


def conv_spec(
    node: torch.fx.Node, epilogue: Epilogue = Epilogue(), out_node: torch.fx.Node | None = None
) -> ConvSpec:
    """The ConvSpec of a supported convolution node, in 2-D form; `out_node` is the last
    node of its epilogue chain (its value is what the kernel writes)."""
    x, w, b = node.args[:3]
    transposed, groups = bool(node.args[6]), node.args[8]
    stride, padding, dilation, output_padding = conv_params(node)
    padded, padding_mode = padded_input(node), "zeros"
    padding_end = None  # after the depth: as before it, unless an F.pad says otherwise
    if padded is not None:  # the kernel reads x itself, mapping the border
        x, padding_mode, padding, padding_end = padded
    xv, wv, out = fake_value(x), fake_value(w), fake_value(out_node or node)
    xs, ws, os_ = sizes(xv), sizes(wv), sizes(out)
    depth = None
    if len(ws) == 3:  # conv1d as a 2-D conv over a 1-row image
        xs, ws, os_ = (*xs[:2], 1, xs[2]), (*ws[:2], 1, ws[2]), (*os_[:2], 1, os_[2])
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
        output_padding = (0, *output_padding)
    elif len(ws) == 5:  # conv3d: the depth axis apart, the 2-D fields its H and W
        end = padding[0] if padding_end is None else padding_end
        depth = Depth(xs[2], os_[2], int(ws[2]), int(stride[0]), int(padding[0]),
                      int(dilation[0]), int(end), int(output_padding[0]) if transposed else 0)
        xs, ws, os_ = (*xs[:2], *xs[3:]), (*ws[:2], *ws[3:]), (*os_[:2], *os_[3:])
        stride, padding, dilation = stride[1:], padding[1:], dilation[1:]
        output_padding = output_padding[1:]
    device = xv.device.type
    # weight: [K, C/groups, KH, KW]; transposed: [C, K/groups, KH, KW]
    in_channels, out_channels = int(ws[1]) * int(groups), int(ws[0])
    if transposed:
        in_channels, out_channels = int(ws[0]), int(ws[1]) * int(groups)
    return ConvSpec(
        ndim=len(wv.shape) - 2,
        batch=xs[0],
        in_channels=in_channels,
        out_channels=out_channels,
        in_size=(xs[2], xs[3]),
        out_size=(os_[2], os_[3]),
        kernel=(int(ws[2]), int(ws[3])),
        stride=tuple(int(s) for s in stride),
        padding=tuple(int(p) for p in padding),
        dilation=tuple(int(d) for d in dilation),
        groups=int(groups),
        has_bias=b is not None,
        dtype=str(xv.dtype).removeprefix("torch."),
        input_layout=memory_layout(xv),
        weight_layout=memory_layout(wv),
        output_layout=memory_layout(out),
        device=device,
        precision=_precision(node, xv.dtype),
        hints=size_hints(xv, out),
        epilogue=epilogue,
        op="conv_transpose" if transposed else "conv",
        output_padding=tuple(int(p) for p in output_padding),
        padding_mode=padding_mode,
        depth=depth,
    )
