"""Build the generated kernel for one convolution or window attention, outside torch.compile.

    call = conv_kernel(x, weight, bias, stride=2, padding=1)      # a KernelCall
    y = call(x, weight, bias)
    call = attention_kernel(q, k, v, bias, mask)                  # q, k, v: [B, H, N, D]
    y = call(q, k, v, bias, mask)

The spec is read the way the backend reads it: the op is traced to an aten graph with
fake tensors and the post-grad matcher inspects it, so tests and benchmarks exercise
exactly the metadata path `torch.compile` uses.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from ..codegen import KernelSource, render_conv, render_region
from ..config import Config
from ..devices import device_for
from ..passes import PassContext
from ..passes.attention_pattern import find_attention
from ..passes.conv_spec import conv_fallback_reason, conv_spec
from ..passes.match_attention import (
    attention_fallback_reason,
    attention_spec,
    is_attention_candidate,
)
from ..runtime import KernelCall, load_source
from ..schedule import Schedule
from ..selection.select import Choice, SelectionContext, select_schedule
from ..spec import AttentionSpec, ConvSpec, Epilogue

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_spec_of(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    epilogue: Epilogue = Epilogue(),
    *,
    transposed: bool = False,
    output_padding: int | Sequence[int] = 0,
) -> ConvSpec:
    """The ConvSpec the backend would build for `F.conv{1,2,3}d(x, weight, bias, ...)` (with
    `transposed`: `F.conv_transpose{1,2,3}d`), with `epilogue` fused after it."""
    conv = (_CONV_T if transposed else _CONV).get(weight.dim() - 2)
    if conv is None:
        raise ValueError(
            f"only 1-D to 3-D convolutions (transposed too) have kernels, got weight "
            f"{tuple(weight.shape)}"
        )

    def f(x, w, b):
        if transposed:
            return conv(x, w, b, stride, padding, output_padding, groups, dilation)
        return conv(x, w, b, stride, padding, dilation, groups)

    gm = make_fx(f, tracing_mode="fake")(x, weight, bias)
    node = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.convolution.default)
    reason = conv_fallback_reason(node, PassContext(config=Config(), stage="inference"))
    if reason is not None:
        raise ValueError(f"this convolution has no generated kernel: {reason}")
    return dataclasses.replace(conv_spec(node), epilogue=epilogue)


def choose(spec: ConvSpec | AttentionSpec, config: Config | None = None) -> Choice:
    """The backend's choice for `spec` (no tuning cache), with its candidates and reasons."""
    config = config or Config(cache=False)
    device, reason = device_for(config.target, spec.device)
    return select_schedule(spec, SelectionContext(config, device, reason))


def conv_source(
    spec: ConvSpec, schedule: str | Schedule | None = None, config: Config | None = None
) -> KernelSource:
    """The kernel source for `spec`: the backend's choice, the model's best schedule of a
    named kind, or a given schedule."""
    if schedule is None or isinstance(schedule, str):
        config = (config or Config(cache=False)).replace(schedule=schedule)
        schedule = choose(spec, config).schedule
    return render_conv(spec, schedule)


def conv_kernel(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    schedule: str | Schedule | None = None,
    config: Config | None = None,
    epilogue: Epilogue = Epilogue(),
    transposed: bool = False,
    output_padding: int | Sequence[int] = 0,
    masked: bool = False,
) -> KernelCall:
    """Render, write and load the kernel for one convolution (and its epilogue); returns its
    launcher: call(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, residual).
    `transposed` (with `output_padding`) builds `F.conv_transpose{1,2}d`'s; `masked` (a
    transposed conv's) one whose x is where(mask, 0, x), the mask passed last."""
    config = config or Config(cache=False)
    spec = conv_spec_of(
        x, weight, bias, stride, padding, dilation, groups, epilogue,
        transposed=transposed, output_padding=output_padding,
    )
    spec = dataclasses.replace(spec, input_mask=masked)
    return _kernel_call("conv", spec, conv_source(spec, schedule, config), config)


def wgrad_kernel(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    schedule: str | Schedule | None = None,
    config: Config | None = None,
    masked: bool = False,
) -> KernelCall:
    """Render, write and load the weight-gradient kernel of `F.conv{1,2}d(x, weight, ...)`;
    returns its launcher: call(dy, x) -> dw, shaped and laid out like `weight`; `masked`:
    call(g, x, mask), the gradient being dy = where(mask, 0, g)."""
    config = config or Config(cache=False)
    spec = conv_spec_of(x, weight, None, stride, padding, dilation, groups)
    spec = dataclasses.replace(spec, op="conv_wgrad", input_mask=masked)
    return _kernel_call("conv_wgrad", spec, conv_source(spec, schedule, config), config)


def _kernel_call(kind: str, spec, source: KernelSource, config: Config) -> KernelCall:
    """Write and load `source` (hash-checked; interpreted for CPU specs) as a KernelCall."""
    module, path = load_source(source, config.kernel_path, interpret=spec.device == "cpu")
    return KernelCall(kind, spec.geometry(), getattr(module, source.entry), path)


def attention_spec_of(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    output: str = "bhnd",
) -> AttentionSpec:
    """The AttentionSpec the backend would build for

        softmax(scale * q @ k^T + bias[h] + mask[b mod nW]) @ v

    with q [B, H, N, D], k [B, H, Nk, D], v [B, H, Nk, Dv], bias [H, N, Nk], mask [nW, N, Nk];
    `output` "bnc" returns [B, N, H*Dv] (transpose + reshape, as Swin's projection reads it)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def f(q, k, v, bias, mask):
        b, h, n, _ = q.shape
        s = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            s = s + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            nk = k.shape[2]
            s = s.view(b // nw, nw, h, n, nk) + mask.unsqueeze(1).unsqueeze(0)
            s = s.view(b, h, n, nk)
        out = s.softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(b, n, -1) if output == "bnc" else out

    gm = make_fx(f, tracing_mode="fake")(q, k, v, bias, mask)
    match = find_attention(next(n for n in gm.graph.nodes if is_attention_candidate(n)))
    reason = attention_fallback_reason(match, private=True)
    if reason is not None:
        raise ValueError(f"this attention has no generated kernel: {reason}")
    return attention_spec(match)


def attention_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    output: str = "bhnd",
    schedule: Schedule | None = None,
    config: Config | None = None,
) -> KernelCall:
    """Render, write and load the fused window-attention kernel (see attention_spec_of);
    returns its launcher: call(q, k, v, bias, mask, general, logit_scale)."""
    config = config or Config(cache=False)
    spec = attention_spec_of(q, k, v, bias, mask, scale=scale, output=output)
    if schedule is None:
        schedule = choose(spec, config).schedule
    return _kernel_call("window_attention", spec, render_region(spec, schedule), config)
