"""Which nodes of the live graph a region's op reads, in its launcher's order.

Read when the region is lowered, not when it was matched: an earlier region may have
replaced an operand's producer by its own op since.
"""

from __future__ import annotations

import torch
import torch.fx

from ..codegen.template import with_depthwise, with_layer_scale
from ..passes import Region
from ..passes.conv_inputs import scaled_operands
from ..passes.grad_mask import gradient_operand
from ..passes.match_block import linear_operands

ATTENTION_OPERANDS = ("q", "k", "v", "bias", "mask", "general", "logit_scale", "select")


def _other(nodes: dict, region: Region, role: str) -> torch.fx.Node:
    """The operand of a binary chain node (role "add", "scale") that the chain did not bring."""
    names = [name for _, name in region.roles]
    name = dict(region.roles)[role]
    before = names[names.index(name) - 1]
    a, b = nodes[name].args
    return b if isinstance(a, torch.fx.Node) and a.name == before else a


def mlp_operands(nodes: dict[str, torch.fx.Node], region: Region) -> tuple:
    """(x, w1, b1, w2, b2, scale, residual, norm_weight, norm_bias, w3, b3, dw_weight, dw_bias)
    of an MLP block (w3, b3: a gated MLP's up projection, role "fc3"; dw_*: ConvNeXt's
    depthwise conv, role "dw_conv", whose input image is then x and the residual): x as
    the [*L, C] tokens the first linear's [M, C] view reads (role "x_view"), or that view
    itself; with a LayerNorm prologue, the tokens its statistics read (before a conversion
    to float32), and its weight and bias."""
    roles = dict(region.roles)
    x2d, w1, b1 = linear_operands(nodes[roles["fc1"]])
    _, w2, b2 = linear_operands(nodes[roles["fc2"]])
    x = x2d.args[0] if "x_view" in roles else x2d
    norm_weight = norm_bias = None
    if "x_copy" in roles:  # the kernel reads the copy's source through its strides
        x = nodes[roles["x_copy"]].args[0]
    elif "ln_stats" in roles:
        x = nodes[roles["ln_stats"]].args[0]
        if x.target is torch.ops.prims.convert_element_type.default:
            x = x.args[0]
    if "ln_stats" in roles:
        norm_weight = _other(nodes, region, "ln_scaled") if "ln_scaled" in roles else None
        norm_bias = _other(nodes, region, "ln_shifted") if "ln_shifted" in roles else None
    scale = _other(nodes, region, "scale") if "scale" in roles else None
    residual = _other(nodes, region, "add") if "add" in roles else None
    w3 = b3 = None
    if "fc3" in roles:  # a gated MLP's up projection
        _, w3, b3 = linear_operands(nodes[roles["fc3"]])
    dw_weight = dw_bias = None
    if "dw_conv" in roles:  # ConvNeXt's block: the image, its residual not passed
        x, dw_weight, dw_bias = nodes[roles["dw_conv"]].args[:3]
        residual = None
    return (x, w1, b1, w2, b2, scale, residual, norm_weight, norm_bias, w3, b3, dw_weight, dw_bias)


def region_operands(nodes: dict[str, torch.fx.Node], region: Region) -> tuple:
    """The kernel's arguments, read from the live graph (an earlier region may have replaced
    an operand's producer). A conv chain: (x, weight, bias, bn_weight, bn_bias, bn_mean,
    bn_var, residual); a weight gradient: (dy, x); window attention: (q, k, v, bias, mask,
    general, logit_scale, select); an MLP block: see mlp_operands. A backward region whose gradient
    is masked (role "grad_mask", spec.input_mask: where(m, 0, g), ...; passes/grad_mask.py)
    reads g in its place, and last the bool mask (role "mask")."""
    roles = dict(region.roles)
    masked = nodes[roles["grad_mask"]] if "grad_mask" in roles else None
    if masked is not None:
        gradient, mask = gradient_operand(masked), nodes[roles["mask"]]
    if region.kind == "conv_wgrad":  # (dy, x); a transposed conv's: the conv from dy to x
        dy, x = nodes[roles["wgrad"]].args[:2]
        if masked is not None:
            return (gradient, x, mask)
        return (x, dy) if nodes[roles["wgrad"]].args[7] else (dy, x)
    if region.kind == "window_attention":
        return tuple(nodes[roles[r]] if r in roles else None for r in ATTENTION_OPERANDS)
    if region.kind == "mlp_block":
        return mlp_operands(nodes, region)
    x, weight, bias = nodes[roles["conv"]].args[:3]
    if masked is not None:
        x = gradient
    if "pad" in roles:  # a padding mode: the kernel reads the unpadded input
        x = nodes[roles["pad"]].args[0]
    x_scale = None
    if "x_scale" in roles:  # x * s[n, c]: the kernel reads x and s
        x, x_scale = scaled_operands(nodes[roles["x_scale"]])
    bn = nodes[roles["bn"]].args[1:5] if "bn" in roles else (None,) * 4
    if "ln_scaled" in roles:  # a LayerNorm epilogue: its weight and bias in the BN's places
        bn = (_other(nodes, region, "ln_scaled"), _other(nodes, region, "ln_shifted"), None, None)
    residual = _other(nodes, region, "add") if "add" in roles else None
    if x_scale is not None:
        operands = (x, weight, bias, *bn, residual, None, x_scale)
    elif "x_ln" in roles or "x_ln2d" in roles:  # a LayerNorm over the channels: the kernel
        # reads its input (x_ln2d: the permute to NHWC the norm reads, of the image)
        vectors = [nodes[roles[r]] if r in roles else None for r in ("ln_weight", "ln_bias")]
        normed = nodes[roles["x_ln"]] if "x_ln" in roles else nodes[roles["x_ln2d"]].args[0]
        operands = (normed, weight, bias, *bn, residual, None, None, *vectors)
    elif "dw_conv" in roles:  # act(bn(dwconv(x))): x, the BN's parameters, the conv's weights
        dw, pre = nodes[roles["dw_conv"]], nodes[roles["x_bn"]]
        operands = (dw.args[0], weight, bias, *bn, residual, None, None, *pre.args[1:5])
        operands = with_depthwise(operands, dw.args[1], dw.args[2])
    elif "x_bn" in roles:  # [act](batch_norm(x)): the kernel reads x and the BN's parameters
        pre = nodes[roles["x_bn"]]
        operands = (pre.args[0], weight, bias, *bn, residual, None, None, *pre.args[1:5])
    else:
        operands = (x, weight, bias, *bn, residual) + ((mask,) if masked is not None else ())
    if "scale" in roles:  # the layer scale: the launcher's 15th operand (gemm_1x1's)
        operands = with_layer_scale(operands, _other(nodes, region, "scale"))
    return operands
