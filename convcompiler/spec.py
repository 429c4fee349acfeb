"""Region specs: frozen, hashable descriptions of what a matched region computes.

A spec is read from fake-tensor metadata by a pass and handed, unchanged, to schedule
selection and codegen. Sizes that Dynamo made dynamic are sympy expressions; everything
the generated kernel bakes in (kernel size, stride, padding, dilation, dtype, layouts) is a
plain int or string.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Union

import sympy

Size = Union[int, sympy.Expr]

DTYPES = ("float32", "float16", "bfloat16")


def _fmt(v: object) -> str:
    if isinstance(v, tuple):
        return "x".join(_fmt(e) for e in v)
    return str(v)


ACTIVATIONS = (
    "relu",
    "hardtanh",
    "silu",
    "gelu",
    "gelu_tanh",
    "hardswish",
    "leaky_relu",
    "sigmoid",
    "hardsigmoid",
)


@dataclass(frozen=True)
class Activation:
    """A pointwise activation fused after the conv: a name from ACTIVATIONS and its
    constant arguments (hardtanh: min, max; leaky_relu: negative slope)."""

    name: str
    args: tuple[float, ...] = ()

    def __str__(self) -> str:
        if self.name == "hardtanh" and self.args == (0.0, 6.0):
            return "relu6"
        return self.name


@dataclass(frozen=True)
class Epilogue:
    """What a conv kernel applies to its fp32 accumulator before the store, in order:

    conv bias -> batch norm with running stats -> act -> + residual -> post_act
    """

    bn: str | None = None  # None, "affine" (weight and bias) or "plain" (no affine)
    bn_eps: float = 1e-5
    act: Activation | None = None
    residual: bool = False
    post_act: Activation | None = None

    def name(self) -> str:
        """e.g. "bn+relu", "bn+add+relu", "" for a plain conv."""
        parts = ["bn"] if self.bn else []
        parts += [str(self.act)] if self.act else []
        parts += ["add"] if self.residual else []
        parts += [str(self.post_act)] if self.post_act else []
        return "+".join(parts)


class SizeHints:
    """Concrete values for the symbolic sizes of a spec, from its `hints` field
    ((symbol name, value) pairs)."""

    @property
    def is_dynamic(self) -> bool:
        return bool(self.hints)

    def hint(self, size: Size) -> int:
        """A concrete value for a (possibly symbolic) size, from the recorded hints."""
        if isinstance(size, int):
            return size
        known = dict(self.hints)
        return int(size.xreplace({s: known[s.name] for s in size.free_symbols}))


@dataclass(frozen=True)
class ConvSpec(SizeHints):
    """One `aten.convolution` (1-D or 2-D, not transposed), in 2-D form.

    A 1-D conv is described as a 2-D conv with H = 1 and a 1-row kernel, exactly how the
    kernels run it.
    """

    ndim: int  # spatial dims of the original op: 1 or 2
    batch: Size
    in_channels: int
    out_channels: int
    in_size: tuple[Size, Size]  # (H, W)
    out_size: tuple[Size, Size]  # (HO, WO)
    kernel: tuple[int, int]  # (KH, KW)
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    has_bias: bool
    dtype: str  # one of DTYPES
    input_layout: str  # "nchw", "nhwc" or "strided"
    weight_layout: str  # "nchw", "nhwc" or "strided"
    output_layout: str  # "nchw" or "nhwc": the memory format eager produces
    device: str  # "cpu" or "cuda"
    precision: str  # how a float32 tl.dot runs on a GPU: "ieee" or "tf32"
    hints: tuple[tuple[str, int], ...] = ()  # size hints for the symbols in the sizes
    epilogue: Epilogue = Epilogue()  # what is fused after the conv

    # ---- derived sizes -------------------------------------------------------------
    @property
    def in_channels_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_channels_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def reduction(self) -> int:
        """Length of one output's dot product: C/groups * KH * KW."""
        return self.in_channels_per_group * self.kernel[0] * self.kernel[1]

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.in_channels_per_group == 1

    @property
    def output_pixels(self) -> Size:
        """GEMM M: batch * HO * WO (symbolic under dynamic shapes)."""
        return self.batch * self.out_size[0] * self.out_size[1]

    def flops(self) -> int:
        """Multiply-adds * 2, at the size hints."""
        m = self.hint(self.output_pixels)
        return 2 * m * self.out_channels * self.reduction

    # ---- identity ------------------------------------------------------------------
    def geometry(self) -> str:
        """A short readable name of what is baked into a kernel for this spec."""
        kh, kw = self.kernel
        return (
            f"conv{self.ndim}d_k{kh}x{kw}_s{_fmt(self.stride)}_p{_fmt(self.padding)}"
            f"_d{_fmt(self.dilation)}_g{self.groups}_{self.dtype}_{self.input_layout}"
            f"_to_{self.output_layout}"
            + (f"_{self.epilogue.name().replace('+', '_')}" if self.epilogue.name() else "")
        )

    def key(self) -> str:
        """Deterministic key of every field (sizes as strings, symbols included)."""
        parts = [f"{f.name}={_fmt(getattr(self, f.name))}" for f in fields(self)]
        return "ConvSpec(" + ",".join(parts) + ")"

    def digest(self) -> str:
        return hashlib.sha256(self.key().encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line for reports: shapes and conv parameters."""
        c, k = self.in_channels, self.out_channels
        h, w = self.in_size
        ho, wo = self.out_size
        if self.ndim == 1:
            shape = f"[{self.batch},{c},{w}] -> [{self.batch},{k},{wo}]"
        else:
            shape = f"[{self.batch},{c},{h},{w}] -> [{self.batch},{k},{ho},{wo}]"
        kh, kw = self.kernel
        ks = f"{kw}" if self.ndim == 1 else f"{kh}x{kw}"
        extra = []
        if self.stride != (1, 1):
            extra.append(f"s{_fmt(self.stride[2 - self.ndim :])}")
        if self.padding != (0, 0):
            extra.append(f"p{_fmt(self.padding[2 - self.ndim :])}")
        if self.dilation != (1, 1):
            extra.append(f"d{_fmt(self.dilation[2 - self.ndim :])}")
        if self.groups != 1:
            extra.append("dw" if self.is_depthwise else f"g{self.groups}")
        fused = [f"+{self.epilogue.name()}"] if self.epilogue.name() else []
        return " ".join([shape, ks, *extra, self.dtype, self.output_layout, *fused])


@dataclass(frozen=True)
class AttentionSpec(SizeHints):
    """One window multi-head self-attention, canonicalised:

        out[b, h] = softmax(scale * q[b, h] @ k[b, h]^T  (x logit_scale[h])
                            + bias[h] + mask[b mod windows] + general[b, h]) @ v[b, h]

    q, k, v are [batch, heads, tokens, head_dim] views (read through their strides); with
    `cosine`, q and k rows are L2-normalised first (SwinV2). `batch` is windows x images.
    """

    batch: Size
    heads: int
    tokens: int  # N = window area (49, 64, 144, ...)
    head_dim: int
    dtype: str
    scale: float
    cosine: bool
    logit_scale: bool  # a per-head multiplier tensor (SwinV2: exp(clamp(logit_scale)))
    bias: bool  # a per-head [heads, N, N] additive term (relative position bias)
    mask: bool  # a per-window [windows, N, N] additive term (shifted-window mask)
    windows: int  # windows per image: the period of `mask` over the batch (1 without mask)
    general: bool  # a [batch, heads, N, N] additive term that did not split into the two above
    # "bnc": [batch, N, heads * head_dim]; "bhnd": [batch, heads, N, head_dim] contiguous;
    # "bnhd": [batch, heads, N, head_dim] stored as [batch, N, heads, head_dim]
    output: str
    device: str
    precision: str  # how a float32 tl.dot runs on a GPU (torch's matmul precision)
    hints: tuple[tuple[str, int], ...] = ()
    mask_repeat: int = 1  # the mask is added this many times (HF Swinv2 adds it twice)
    safe_softmax: bool = False  # a row of all -inf scores gives 0 (SDPA), not NaN (softmax)

    def terms(self) -> str:
        parts = (["cosine"] if self.cosine else []) + (["bias"] if self.bias else [])
        parts += (["mask"] if self.mask else []) + (["attn_mask"] if self.general else [])
        return "+".join(parts)

    def geometry(self) -> str:
        terms = self.terms().replace("+", "_")
        return f"window_attention_n{self.tokens}_d{self.head_dim}_{self.dtype}_{self.output}" + (
            f"_{terms}" if terms else ""
        )

    def key(self) -> str:
        parts = [f"{f.name}={_fmt(getattr(self, f.name))}" for f in fields(self)]
        return "AttentionSpec(" + ",".join(parts) + ")"

    def describe(self) -> str:
        mask = f"[{self.windows},N,N] per window" if self.mask else "none"
        if self.mask and self.mask_repeat != 1:
            mask += f" x{self.mask_repeat}"
        text = (
            f"N={self.tokens} heads={self.heads} head_dim={self.head_dim} batch={self.batch} "
            f"bias={'[heads,N,N]' if self.bias else 'none'} mask={mask}"
        )
        if self.general:
            text += " attn_mask=[batch,heads,N,N]"
        if self.cosine:
            text += f" cosine{'+logit_scale' if self.logit_scale else ''}"
        elif self.logit_scale:
            text += " logit_scale"
        if self.safe_softmax:
            text += " safe_softmax"
        return f"{text} {self.dtype} out={self.output}"

    def flops(self) -> int:
        return 4 * self.hint(self.batch) * self.heads * self.tokens**2 * self.head_dim
