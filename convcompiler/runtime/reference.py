"""What a conv region computes, in ATen: the tuner's ATen candidate and the tests' oracle."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..score_terms import canonical_view
from ..spec import Activation, ConvSpec


def memory_format(layout: str, dim: int) -> torch.memory_format:
    """The memory format of a `dim`-D tensor laid out as `layout` (a spec's "nchw" or
    "nhwc"; "nhwc" is channels_last_3d for a 5-D tensor, the inverse of passes/meta.py's
    memory_layout)."""
    if layout != "nhwc":
        return torch.contiguous_format
    return torch.channels_last_3d if dim == 5 else torch.channels_last


def activation(act: Activation, x: torch.Tensor) -> torch.Tensor:
    fns = {
        "relu": F.relu,
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "hardswish": F.hardswish,
        "sigmoid": torch.sigmoid,
        "hardsigmoid": F.hardsigmoid,
    }
    if act.name == "hardtanh":
        return F.hardtanh(x, *act.args)
    if act.name == "leaky_relu":
        return F.leaky_relu(x, *act.args)
    return fns[act.name](x)


def run_aten(
    spec: ConvSpec,
    x,
    weight,
    bias=None,
    bn_weight=None,
    bn_bias=None,
    bn_mean=None,
    bn_var=None,
    residual=None,
    mask=None,
    x_scale=None,
    x_bn_weight=None,
    x_bn_bias=None,
    x_bn_mean=None,
    x_bn_var=None,
    layer_scale=None,
    dw_weight=None,
    dw_bias=None,
) -> torch.Tensor:
    """conv -> batch norm (running stats) -> act [-> * layer scale] -> + residual -> act, as
    separate ATen ops
    (the batch norm after the act with spec.epilogue.bn_after_act).
    A weight-gradient spec takes (dy, x, mask?) and returns dw. With spec.input_mask the
    gradient operand (x of a transposed conv, dy of a weight gradient) is where(mask, 0, g);
    with spec.input_scale the conv reads x * x_scale; with spec.prologue, act(norm(x)), x
    first the depthwise conv of the input with spec.prologue.dw."""
    stride, padding, dilation, output_padding = (
        list(v[2 - min(spec.ndim, 2) :])
        for v in (spec.stride, spec.padding, spec.dilation, spec.output_padding)
    )
    d = spec.depth
    if d:  # a 3-D conv: the depth axis first
        stride, padding = [d.stride, *stride], [d.padding, *padding]
        dilation, output_padding = [d.dilation, *dilation], [d.output_padding, *output_padding]
    if spec.op == "conv_wgrad":
        dy, x, mask = x, weight, bias
        if mask is not None:
            dy = dy.masked_fill(mask, 0)
        taps = (d.kernel, *spec.kernel) if d else spec.kernel[2 - spec.ndim :]
        shape = (spec.out_channels, spec.in_channels_per_group, *taps)
        return torch.ops.aten.convolution_backward(
            dy, x, x.new_empty(shape), None, stride, padding, dilation, False, output_padding,
            spec.groups, [False, True, False],
        )[1]
    if mask is not None:
        x = x.masked_fill(mask, 0)
    if x_scale is not None:
        x = x * x_scale
    p = spec.prologue
    if p.dw:
        x = F.conv2d(x, dw_weight, dw_bias, list(p.dw.stride), list(p.dw.padding),
                     groups=x.shape[1])
    if p.bn:
        x = F.batch_norm(x, x_bn_mean, x_bn_var, x_bn_weight, x_bn_bias, False, 0.0, p.eps)
    if p.ln:  # over the channels, dim 1; the result laid out as x is
        t = x.movedim(1, -1)
        t = F.layer_norm(t, t.shape[-1:], x_bn_weight, x_bn_bias, p.eps).movedim(-1, 1)
        x = torch.empty_like(x).copy_(t)
    if p.act:
        x = activation(p.act, x)
    if spec.windows:  # the image's window tokens, rolled, as [B*nW, C, 1, WH*WW]
        (wh, ww), (sh, sw) = spec.windows.size, spec.windows.shift
        n, c, h, w = x.shape
        x = torch.roll(x, (-sh, -sw), (2, 3)).permute(0, 2, 3, 1)  # [B, H, W, C], as Swin
        x = x.reshape(n, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, 1, wh * ww, c).permute(0, 3, 1, 2)  # the tokens, channels last
    if spec.padding_mode != "zeros" or (d and d.padding_end != d.padding):
        # F.pad's copy, then a conv without padding (a 3-D conv's depth may pad the past only)
        pads = [p for p in reversed(padding) for _ in (0, 1)]
        if d:
            pads[-1] = d.padding_end
        mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
        x = F.pad(x, pads, mode=mode)
        padding = [0] * spec.ndim
    y = torch.ops.aten.convolution(
        x, weight, bias, stride, padding, dilation, spec.transposed, output_padding, spec.groups
    )
    e = spec.epilogue
    if e.ln:  # over the output channels (LayerNorm2d), its weight and bias in the BN's places
        t = y.movedim(1, -1)
        t = F.layer_norm(t, t.shape[-1:], bn_weight, bn_bias, e.ln_eps).movedim(-1, 1)
        y = torch.empty_like(y).copy_(t)
    if e.bn and not e.bn_after_act:
        y = F.batch_norm(y, bn_mean, bn_var, bn_weight, bn_bias, False, 0.0, e.bn_eps)
    if e.act:
        y = activation(e.act, y)
    if e.bn and e.bn_after_act:
        y = F.batch_norm(y, bn_mean, bn_var, bn_weight, bn_bias, False, 0.0, e.bn_eps)
    if e.scale:  # one value per output channel
        y = y * layer_scale.reshape(1, -1, *[1] * (y.dim() - 2))
    if spec.out_windows:  # window rows back to the residual's [B, H, W, K] image, rolled
        (wh, ww), (sh, sw) = spec.out_windows.size, spec.out_windows.shift
        b, h, w, k = residual.shape
        y = y.permute(0, 2, 3, 1).reshape(b, h // wh, w // ww, wh, ww, k)
        y = torch.roll(y.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, k), (sh, sw), (1, 2))
    if e.residual:
        y = y + residual
    if e.post_act:
        y = activation(e.post_act, y)
    return y


def run_attention(spec, q, k, v, bias=None, mask=None, general=None, logit_scale=None,
                  select=None):
    """The canonical window attention (AttentionSpec), as separate ATen ops. The operands
    are viewed as the kernel's launcher views them (see codegen/window_attention.py)."""
    q, k, v = (canonical_operand(spec, name, t) for name, t in (("q", q), ("k", k), ("v", v)))
    b, h, n, nk = q.shape[0], spec.heads, spec.tokens, spec.keys
    if spec.cosine:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    s = (q * spec.scale) @ k.transpose(-2, -1)
    if logit_scale is not None:
        s = s * logit_scale.reshape(-1).expand(h).reshape(1, h, 1, 1)
    if bias is not None:
        while bias.dim() > 3:
            bias = bias[0]
        s = s + bias
    if mask is not None:
        mask = mask[0, :, 0] if mask.dim() == 5 else mask[:, 0] if mask.dim() == 4 else mask
        mask = mask.expand(-1, n, nk) if mask.dim() == 3 else mask.expand(1, n, nk)
        nw = mask.shape[0]
        s = s.view(b // nw, nw, h, n, nk)
        for _ in range(spec.mask_repeat):
            s = s + mask[None, :, None]
        s = s.view(b, h, n, nk)
    if general is not None:
        s = s + general
    if select is not None:  # where(m, s, fill) ("keep") or where(m, fill, s) ("drop")
        fill = torch.full((), spec.fill, dtype=s.dtype, device=s.device)
        s = torch.where(select, s, fill) if spec.select == "keep" else torch.where(select, fill, s)
    p = torch.ops.aten._safe_softmax(s, -1) if spec.safe_softmax else torch.softmax(s, dim=-1)
    out = p.to(v.dtype) @ v
    if spec.out_dtype is not None:
        out = out.to(getattr(torch, spec.out_dtype))
    y, canonical = attention_output(spec, out, with_view=True)
    canonical.copy_(out)
    return y


def canonical_operand(spec, name: str, t: torch.Tensor) -> torch.Tensor:
    """q, k or v as [B, H, N, D] (score_terms.canonical_view, as the spec matched it)."""
    return canonical_view(t, name in spec.transposed, spec.heads_axis)


def attention_output(spec, like: torch.Tensor, *, with_view: bool = False):
    """An empty output as the region's graph reads it (the batch from `like`, a canonical
    [B, H, N, D] tensor, its dtype and device too); with_view: also its [B, H, N, Dv] view,
    into which the attention writes."""
    layout = "b,n,hd" if spec.output == "bnc" else spec.output  # see AttentionSpec.output
    order = layout.replace(",", "")
    b = like.shape[0]
    sizes = {"b": b // spec.batch_split, "t": spec.batch_split, "h": spec.heads,
             "n": spec.tokens, "d": spec.value_dim}  # fmt: skip
    dtype = like.dtype if spec.out_dtype is None else getattr(torch, spec.out_dtype)
    memory = like.new_empty([sizes[c] for c in order], dtype=dtype)
    canonical = memory.permute([order.index(c) for c in "bthnd" if c in order])
    canonical = canonical.reshape(b, spec.heads, spec.tokens, spec.value_dim)
    y = canonical
    if "," in layout:  # a contiguous result, its dims grouping the letters
        y = memory.view([math.prod(sizes[c] for c in group) for group in layout.split(",")])
    return (y, canonical) if with_view else y


def run_mlp(spec, x, w1, b1, w2, b2=None, scale=None, residual=None, norm_w=None, norm_b=None,
            w3=None, b3=None, dw_weight=None, dw_bias=None):
    """The MLP block (spec_block.MlpSpec) layer by layer, as ATen ops (a ConvNeXt block's
    depthwise conv first, its output seen channels last, and the result channels first)."""
    if spec.depthwise:
        image = F.conv2d(x, dw_weight, dw_bias, 1, spec.dw_padding, 1, spec.in_features)
        tokens = image.permute(0, 2, 3, 1)
        y = run_mlp(spec.without_depthwise(), tokens, w1, b1, w2, b2,
                    None if scale is None else scale.reshape(-1), None, norm_w, norm_b)
        y = y.permute(0, 3, 1, 2)
        return y + x if spec.residual else y  # the residual is the image itself
    if spec.norm is not None:
        x = F.layer_norm(x, (x.shape[-1],), norm_w, norm_b, spec.norm_eps)
    hidden = activation(spec.act, F.linear(x, w1, b1))
    if spec.gated:
        hidden = hidden * F.linear(x, w3, b3)
    y = F.linear(hidden, w2, b2)
    if scale is not None:
        y = y * scale
    return y + residual if residual is not None else y
