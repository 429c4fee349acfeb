"""The `torch.ops.im2win.*` ops a compiled graph calls in place of each region.

    im2win::conv(x, weight, bias?, bn_weight?, bn_bias?, bn_mean?, bn_var?, residual?, mask?,
                 x_scale?, x_bn_weight?, x_bn_bias?, x_bn_mean?, x_bn_var?, layer_scale?,
                 dw_weight?, dw_bias?, kernel)
    im2win::conv_pool(x, weight, bias?, bn_weight?, bn_bias?, bn_mean?, bn_var?, residual?,
                      kernel) -> (y, pool)  a conv that also writes its output's pooled
                                            sums (spec.pool_sums; see pool_shape)
    im2win::conv_wgrad(dy, x, mask?, kernel)  a conv's weight gradient
    im2win::window_attention(q, k, v, bias?, mask?, general?, logit_scale?, select?, kernel)
    im2win::attention_backward(q, k, v, dout, bias?, mask?, general?, logit_scale?, select?,
                               bias_grad, kernel) -> (dq, dk, dv, dbias)
                                               its gradients, [B, H, N|Nk, D] contiguous;
                                               dbias in the bias's shape (empty unless
                                               bias_grad)
    im2win::mlp_block(x, w1, b1?, w2, b2?, scale?, residual?, norm_weight?, norm_bias?, w3?,
                      b3?, dw_weight?, dw_bias?, kernel)
                                               a transformer MLP, [LayerNorm ->] included
                                               (w3, b3: a gated MLP's up projection; dw_*:
                                               ConvNeXt's depthwise conv of the image x
                                               before it; its residual, x itself, is not
                                               passed)

A conv's `mask` (backward kernels only, spec.input_mask): the gradient operand (x of a
transposed conv, dy of a weight gradient) stands for where(mask, 0, gradient), a ReLU's
backward. Its `x_scale` (a forward 1x1 conv, spec.input_scale): the input stands for
x * x_scale, x_scale [N, C, 1, 1] (squeeze-and-excitation's channel scale). Its `x_bn_*`
(a forward conv, spec.prologue): the input stands for act(norm(x)), the norm a batch
norm with these running statistics (pre-activation: DenseNet's BN -> ReLU -> conv) or a
LayerNorm over the channels with this weight and bias (a transformer's norm -> linear).
Its `dw_*` (a forward 1x1 conv, spec.prologue.dw): the input stands for
act(norm(depthwise_conv(x, dw_weight, dw_bias))), the inverted residual's tail.

`kernel` is a KernelRef (kernel_ref.py): the spec and schedule the kernel was generated
from and the hash of its source. Inductor keeps the ops opaque, fuses what is around them and
calls them from its wrapper. Their fake implementations give exactly the sizes and strides
the kernels write (Inductor asserts them): the conv output in the memory format eager
produces, the attention output as [B, N, H*D] or [B, H, N, D], the MLP's as x's leading dims and its
output features, contiguous (or that permuted to [N, CO, *spatial]: spec.channels_first);
sizes may be symbolic.

The first call of a kernel in a process renders its source again, checks the hash, writes
the file and loads it (`preload` does this at compile time); later calls find it loaded.
On CPU tensors the kernels run through Triton's interpreter.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from ..codegen.template import with_depthwise, with_layer_scale
from ..counters import counters
from ..spec import ConvSpec
from . import packing
from .kernel_call import interpreter_notice, launch_on_device
from .kernel_ref import KernelRef, decode
from .loader import load_source
from .reference import attention_output, canonical_operand, memory_format

log = logging.getLogger(__name__)
Tensor = torch.Tensor

_LAUNCHERS: dict[tuple[str, bool], Callable[..., Any]] = {}
_lock = threading.Lock()


def default_kernel_dir() -> Path:
    from ..config import cache_root

    return cache_root() / "kernels"


def preload(ref: KernelRef, directory: Path, *, interpret: bool) -> Path:
    """Render, check, write and load `ref`'s kernel now; returns its file."""
    source = ref.source()
    if interpret:
        interpreter_notice()
    module, path = load_source(source, directory, interpret=interpret)
    with _lock:
        _LAUNCHERS[(ref.sha256, interpret)] = getattr(module, source.entry)
    return path


def launcher(ref: KernelRef, *, interpret: bool) -> Callable[..., Any]:
    found = _LAUNCHERS.get((ref.sha256, interpret))
    if found is None:
        counters["kernel.loaded_at_call"] += 1
        preload(ref, default_kernel_dir(), interpret=interpret)
        found = _LAUNCHERS[(ref.sha256, interpret)]
    return found


def _launch(ref: KernelRef, args: tuple, mask: Tensor | None = None) -> Tensor:
    """Count one launch of the kernel `ref` names and run it on `args` (activation first),
    plus the gradient's mask for a kernel built with one."""
    launch = launcher(ref, interpret=args[0].device.type == "cpu")
    if mask is not None:
        args = (*args, mask)
    # an attention run as one SDPA call (schedule "sdpa") is not the fused kernel's launch
    counters["launch.sdpa" if ref.schedule.name == "sdpa" else f"launch.{ref.kind}"] += 1
    return launch_on_device(launch, args)


# ---- im2win::conv ---------------------------------------------------------------------------
@torch.library.custom_op("im2win::conv", mutates_args=())
def conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    residual: Tensor | None,
    mask: Tensor | None,
    x_scale: Tensor | None,
    x_bn_weight: Tensor | None,
    x_bn_bias: Tensor | None,
    x_bn_mean: Tensor | None,
    x_bn_var: Tensor | None,
    layer_scale: Tensor | None,
    dw_weight: Tensor | None,
    dw_bias: Tensor | None,
    kernel: str,
) -> Tensor:
    ref = decode(kernel)
    if ref.weight == "cached":  # a parameter or buffer, straight from a graph input
        weight = packing.packed_view(weight)
    args = (x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, residual)
    if x_scale is not None:  # after the (absent) mask, as the launcher's parameters go
        args = (*args, None, x_scale)
    elif any(t is not None for t in (x_bn_weight, x_bn_bias, x_bn_mean, x_bn_var)):
        args = (*args, None, None, x_bn_weight, x_bn_bias, x_bn_mean, x_bn_var)
    if layer_scale is not None:  # the launcher's 15th parameter (gemm_1x1's)
        args = with_layer_scale(args, layer_scale)
    if dw_weight is not None:  # the 16th and 17th (dw_gemm's): x is the depthwise input
        args = with_depthwise(args, dw_weight, dw_bias)
    return _launch(ref, args, mask)


def conv_output_shape(spec: ConvSpec, x: Tensor) -> tuple:
    """(N, K, HO, WO) of the conv `spec` on `x` (2-D form; sizes may be symbolic)."""
    n, h, w = x.shape[0], (1 if spec.ndim == 1 else x.shape[-2]), x.shape[-1]
    if spec.prologue.dw:  # x is the depthwise conv's input: its output is the conv's
        h, w = spec.prologue.dw.out_size(h, w)
    if spec.windows:  # x is the image: its windows are the batch, their tokens one row
        (wh, ww) = spec.windows.size
        n, h, w = n * (h // wh) * (w // ww), 1, wh * ww
    (kh, kw), (sh, sw) = spec.kernel, spec.stride
    (ph, pw), (dh, dw) = spec.padding, spec.dilation
    if spec.transposed:
        oph, opw = spec.output_padding
        ho = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
        wo = (w - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
        return n, spec.out_channels, ho, wo
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return n, spec.out_channels, ho, wo


@conv.register_fake
def _conv_fake(
    x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, residual, mask, x_scale, x_bn_weight,
    x_bn_bias, x_bn_mean, x_bn_var, layer_scale, dw_weight, dw_bias, kernel
):
    spec = decode(kernel).spec
    if spec.out_windows:  # window rows stored in the residual's [B, H, W, K] image
        return torch.empty_like(residual, memory_format=torch.contiguous_format)
    n, k, *out = conv_output_shape(spec, x)
    if spec.depth:  # [N, K, DO, HO, WO]
        out.insert(0, spec.depth.out_size(x.shape[2], spec.transposed))
    fmt = memory_format(spec.output_layout, 2 + len(out))
    y = torch.empty((n, k, *out), dtype=x.dtype, device=x.device, memory_format=fmt)
    return y.squeeze(2) if spec.ndim == 1 else y


# ---- im2win::conv_pool ----------------------------------------------------------------------
def pool_shape(spec: ConvSpec, schedule, x: Tensor) -> tuple:
    """The pooled sums a spec.pool_sums kernel writes for input x: [N, K, 1, T] (2-D) or
    [N, K, T] (1-D), T tiles of BLOCK_M pixels per image; their sum over the last dim,
    keepdim, is y's mean over its spatial dims, keepdim (sizes may be symbolic)."""
    n, k, ho, wo = conv_output_shape(spec, x)
    block = dict(schedule.params)["BLOCK_M"]
    tiles = (ho * wo + block - 1) // block
    return (n, k, tiles) if spec.ndim == 1 else (n, k, 1, tiles)


@torch.library.custom_op("im2win::conv_pool", mutates_args=())
def conv_pool(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    residual: Tensor | None,
    kernel: str,
) -> tuple[Tensor, Tensor]:
    ref = decode(kernel)
    if ref.weight == "cached":
        weight = packing.packed_view(weight)
    pool = x.new_empty(pool_shape(ref.spec, ref.schedule, x), dtype=torch.float32)
    y = _launch(ref, (x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, residual, pool))
    return y, pool


@conv_pool.register_fake
def _conv_pool_fake(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, residual, kernel):
    ref = decode(kernel)
    y = _conv_fake(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, residual, None, None,
                   None, None, None, None, None, None, None, kernel)
    return y, x.new_empty(pool_shape(ref.spec, ref.schedule, x), dtype=torch.float32)


# ---- im2win::conv_wgrad ----------------------------------------------------------------------
@torch.library.custom_op("im2win::conv_wgrad", mutates_args=())
def conv_wgrad(dy: Tensor, x: Tensor, mask: Tensor | None, kernel: str) -> Tensor:
    return _launch(decode(kernel), (dy, x), mask)


@conv_wgrad.register_fake
def _conv_wgrad_fake(dy, x, mask, kernel):
    spec = decode(kernel).spec
    taps = (spec.depth.kernel, *spec.kernel) if spec.depth else spec.kernel  # [K, C/G, (KD,) ..]
    shape = (spec.out_channels, spec.in_channels_per_group, *taps)
    fmt = memory_format(spec.weight_layout, len(shape))
    w = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    return w.squeeze(2) if spec.ndim == 1 else w


# ---- im2win::window_attention ---------------------------------------------------------------
@torch.library.custom_op("im2win::window_attention", mutates_args=())
def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    general: Tensor | None,
    logit_scale: Tensor | None,
    select: Tensor | None,
    kernel: str,
) -> Tensor:
    return _launch(decode(kernel), (q, k, v, bias, mask, general, logit_scale, select))


@window_attention.register_fake
def _window_attention_fake(q, k, v, bias, mask, general, logit_scale, select, kernel):
    spec = decode(kernel).spec
    return attention_output(spec, canonical_operand(spec, "q", q))


# ---- im2win::attention_backward -------------------------------------------------------------
@torch.library.custom_op("im2win::attention_backward", mutates_args=())
def attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    general: Tensor | None,
    logit_scale: Tensor | None,
    select: Tensor | None,
    bias_grad: bool,
    kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (q, k, v, dout, bias, mask, general, logit_scale, select, bias_grad)
    dq, dk, dv, dbias = _launch(decode(kernel), args)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(0)


@attention_backward.register_fake
def _attention_backward_fake(q, k, v, dout, bias, mask, general, logit_scale, select, bias_grad,
                             kernel):  # fmt: skip
    spec = decode(kernel).spec
    b, h, n, nk = canonical_operand(spec, "q", q).shape[0], spec.heads, spec.tokens, spec.keys
    dq = q.new_empty((b, h, n, spec.head_dim))
    dk = q.new_empty((b, h, nk, spec.head_dim))
    dv = q.new_empty((b, h, nk, spec.value_dim))
    dbias = bias.new_empty(bias.shape) if bias_grad and bias is not None else q.new_empty(0)
    return dq, dk, dv, dbias


# ---- im2win::mlp_block ----------------------------------------------------------------------
@torch.library.custom_op("im2win::mlp_block", mutates_args=())
def mlp_block(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    scale: Tensor | None,
    residual: Tensor | None,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    w3: Tensor | None,
    b3: Tensor | None,
    dw_weight: Tensor | None,
    dw_bias: Tensor | None,
    kernel: str,
) -> Tensor:
    operands = (x, w1, b1, w2, b2, scale, residual, norm_weight, norm_bias, w3, b3)
    if dw_weight is not None:  # ConvNeXt's block: x is the image (its residual, if any)
        operands = (*operands, dw_weight, dw_bias)
    return _launch(decode(kernel), operands)


@mlp_block.register_fake
def _mlp_block_fake(
    x, w1, b1, w2, b2, scale, residual, norm_weight, norm_bias, w3, b3, dw_weight, dw_bias, kernel
):
    spec = decode(kernel).spec
    if spec.depthwise:  # [N, C, H, W] in, [N, H, W, CO] written, seen as [N, CO, H, W]
        n, _, h, w = x.shape
        return x.new_empty((n, h, w, spec.out_features)).permute(0, 3, 1, 2)
    y = x.new_empty((*x.shape[:-1], spec.out_features))
    if spec.channels_first:  # [N, *spatial, CO] seen as [N, CO, *spatial]
        return y.permute(0, y.dim() - 1, *range(1, y.dim() - 1))
    return y


# ---- im2win::pad_circular -------------------------------------------------------------------
# F.pad(x, pad, mode="circular") as one op: ATen has none (it decomposes into slices and
# copies), and a conv region can read x with the circular index map only if it can see the
# pad. passes/padding_modes.py puts this op where an F.pad(circular) feeds a conv; one that
# no region took becomes F.pad's slices again (frontend/inductor.py redecompose).
@torch.library.custom_op("im2win::pad_circular", mutates_args=())
def pad_circular(x: Tensor, pad: list[int]) -> Tensor:
    return torch.nn.functional.pad(x, pad, mode="circular")


@pad_circular.register_fake
def _pad_circular_fake(x, pad):
    sizes = list(x.shape)
    for i in range(len(pad) // 2):  # F.pad order: the last dim first, (before, after)
        sizes[-1 - i] = sizes[-1 - i] + pad[2 * i] + pad[2 * i + 1]
    return x.new_empty(sizes)


def _pad_circular_backward(ctx, grad):
    """Each padded entry's gradient added back to the entry it copies."""
    pad = ctx.pad
    for i in range(len(pad) // 2):
        dim, before, after = grad.dim() - 1 - i, pad[2 * i], pad[2 * i + 1]
        size = grad.shape[dim] - before - after
        core = grad.narrow(dim, before, size)
        if before:  # the first `before` entries copy x's last ones
            core = core + torch.nn.functional.pad(
                grad.narrow(dim, 0, before), _along(dim, grad.dim(), size - before, 0))
        if after:  # the last `after` copy x's first ones
            core = core + torch.nn.functional.pad(
                grad.narrow(dim, before + size, after), _along(dim, grad.dim(), 0, size - after))
        grad = core
    return grad, None


def _along(dim: int, ndim: int, before: int, after: int) -> list[int]:
    """F.pad's list padding only `dim` of an `ndim`-D tensor."""
    pad = [0, 0] * (ndim - dim)
    pad[-2:] = [before, after]
    return pad


pad_circular.register_autograd(
    _pad_circular_backward, setup_context=lambda ctx, inputs, output: setattr(ctx, "pad", inputs[1])
)


OPS = {
    "conv": torch.ops.im2win.conv.default,
    "conv_bn": torch.ops.im2win.conv.default,
    "linear": torch.ops.im2win.conv.default,
    "conv_wgrad": torch.ops.im2win.conv_wgrad.default,
    "conv_pool": torch.ops.im2win.conv_pool.default,
    "window_attention": torch.ops.im2win.window_attention.default,
    "attention_backward": torch.ops.im2win.attention_backward.default,
    "mlp_block": torch.ops.im2win.mlp_block.default,
}
