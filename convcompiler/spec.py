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
CONV_OPS = ("conv", "conv_transpose", "conv_wgrad")
# how a forward conv's padding is filled: zeros, or the input's border mirrored (reflect,
# without repeating the edge) or repeated (replicate), as F.pad's modes
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


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

    conv bias -> batch norm with running stats -> act -> * layer scale -> + residual -> post_act

    or conv bias -> LayerNorm over the output channels (`ln`; ConvNeXt's stem: conv ->
    LayerNorm2d), alone: the kernel's tile holds every output channel of its pixels.
    """

    bn: str | None = None  # None, "affine" (weight and bias) or "plain" (no affine)
    bn_eps: float = 1e-5
    act: Activation | None = None
    residual: bool = False
    post_act: Activation | None = None
    # the batch norm comes after the activation (conv -> act -> BN: ConvMixer, RepViT)
    bn_after_act: bool = False
    # a per-output-channel layer scale multiplies the output before the residual (a linear's:
    # ConvNeXt's and LayerScale's gamma * fc2(h); gemm_1x1 only)
    scale: bool = False
    ln: str | None = None  # None, "affine" or "plain": a LayerNorm over the output channels
    ln_eps: float = 1e-5

    def name(self) -> str:
        """e.g. "bn+relu", "bn+add+relu", "gelu+bn", "ln", "" for a plain conv."""
        if self.ln:
            return "ln"
        parts = ["bn"] if self.bn and not self.bn_after_act else []
        parts += [str(self.act)] if self.act else []
        parts += ["bn"] if self.bn and self.bn_after_act else []
        parts += ["scale"] if self.scale else []
        parts += ["add"] if self.residual else []
        parts += [str(self.post_act)] if self.post_act else []
        return "+".join(parts)


@dataclass(frozen=True)
class Depthwise:
    """A depthwise conv whose output a 1x1 conv's kernel computes as it loads it
    (spec.prologue.dw; the inverted residual's depthwise -> BN -> act -> project): the
    kernel reads the conv's [N, C, H, W] input x (`image`: (H, W)) and its weight
    [C, 1, KH, KW] [and bias], zero padding, no dilation."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    bias: bool
    image: tuple[Size, Size]  # symbolic under dynamic shapes, as the spec's sizes

    def name(self) -> str:
        """e.g. "dw3x3s2"."""
        (kh, kw), (sh, sw) = self.kernel, self.stride
        return f"dw{kh}x{kw}" + (f"s{_fmt(self.stride)}" if (sh, sw) != (1, 1) else "")

    def out_size(self, h: Size, w: Size) -> tuple[Size, Size]:
        """The conv's output size for an H x W input."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


@dataclass(frozen=True)
class Windows:
    """The rows of a 1x1 conv's input are window tokens of an image it reads in place
    (spec.windows; Swin's LayerNorm -> [roll] -> window partition -> qkv linear): row t of
    window n is pixel (b, (wh*SH + i + shift_h) % H, (ww*SW + j + shift_w) % W) of the
    [B, C, H, W] image, with n = (b*nWh + wh)*nWw + ww, t = i*WW + j, (WH, WW) = `size` and
    nWh = H // WH, nWw = W // WW windows down and across (torch.roll by -shift, then the
    partition)."""

    size: tuple[int, int]
    shift: tuple[int, int]

    def name(self) -> str:
        """e.g. "windows7x7" or "windows7x7+roll3x3"."""
        roll = f"+roll{_fmt(self.shift)}" if self.shift != (0, 0) else ""
        return f"windows{_fmt(self.size)}{roll}"


@dataclass(frozen=True)
class Depth:
    """A 3-D conv's depth axis (spec.depth, ndim 3): the 2-D fields hold its H and W. Input
    depth `size`, output depth `out`, and the kernel's depth, stride, padding and dilation
    along it."""

    size: Size
    out: Size
    kernel: int
    stride: int
    padding: int  # before the first slice
    dilation: int
    padding_end: int  # after the last (a causal video conv pads the past only: 2, then 0)
    output_padding: int = 0  # a transposed conv's extra output slices

    def out_size(self, d: Size, transposed: bool = False) -> Size:
        """The output depth for an input of depth d (a forward or a transposed conv)."""
        k = self.dilation * (self.kernel - 1)
        if transposed:
            return (d - 1) * self.stride - 2 * self.padding + k + self.output_padding + 1
        return (d + self.padding + self.padding_end - k - 1) // self.stride + 1

    def name(self) -> str:
        """e.g. "depth3s2p1", "depth3p2to0" (stride, padding, dilation and output padding when
        not 1, 0, 1, 0)."""
        pad = f"{self.padding}" + (f"to{self.padding_end}" if self.padding_end != self.padding
                                   else "")  # fmt: skip
        return (f"depth{self.kernel}" + (f"s{self.stride}" if self.stride != 1 else "")
                + (f"p{pad}" if self.padding or self.padding_end else "")
                + (f"d{self.dilation}" if self.dilation != 1 else "")
                + (f"op{self.output_padding}" if self.output_padding else ""))  # fmt: skip


@dataclass(frozen=True)
class Prologue:
    """What a conv kernel applies to each input tile as it loads it, in order, before the
    products:

        a norm -> act

    the norm being a batch norm with running stats (`bn`; pre-activation, DenseNet's
    BN -> ReLU -> conv) or a LayerNorm over the channels (`ln`; a transformer's LayerNorm
    before a linear, its row statistics computed by the kernel), each rounded to the input's
    dtype as eager rounds it; padded input stays zero. With `dw` the tile itself is first
    computed, a depthwise conv of the kernel's input (a 1x1 conv only: dw_gemm)."""

    bn: str | None = None  # None, "affine" or "plain", as the epilogue's
    ln: str | None = None  # None, "affine" or "plain": a LayerNorm over the channels
    eps: float = 1e-5
    act: Activation | None = None
    dw: Depthwise | None = None  # the depthwise conv that makes the input (see above)

    def name(self) -> str:
        """e.g. "bn+relu", "ln", "dw3x3s2+bn+hardswish", "" for none."""
        parts = [self.dw.name()] if self.dw else []
        parts += (["bn"] if self.bn else []) + (["ln"] if self.ln else [])
        return "+".join(parts + ([str(self.act)] if self.act else []))


class SizeHints:
    """What every spec shares: concrete values for its symbolic sizes, from its `hints`
    field ((symbol name, value) pairs), and its identity, a key of every field."""

    def key(self) -> str:
        """Deterministic key of every field (sizes as strings, symbols included)."""
        parts = [f"{f.name}={_fmt(getattr(self, f.name))}" for f in fields(self)]
        return f"{type(self).__name__}(" + ",".join(parts) + ")"

    def digest(self) -> str:
        return hashlib.sha256(self.key().encode()).hexdigest()[:16]

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
    """One `aten.convolution` (1-D, 2-D or 3-D), in 2-D form (a 3-D conv's depth apart).

    A 1-D conv is described as a 2-D conv with H = 1 and a 1-row kernel, exactly how the
    kernels run it. `op` says what is computed:

    conv            y = conv(x, w): x [N, C, H, W], w [K, C/groups, KH, KW], y [N, K, HO, WO]
    conv_transpose  y = conv_transpose(x, w): w [C, K/groups, KH, KW] and
                    HO = (H - 1)*SH - 2*PH + DH*(KH - 1) + OPH + 1 (OPH: `output_padding`);
                    channels, kernel, stride, padding and dilation keep the forward names
    conv_wgrad      dw = the weight gradient of `conv` (this spec's sizes) from x and
                    dy [N, K, HO, WO]: dw [K, C/groups, KH, KW] in `weight_layout`

    `input_mask` (conv_transpose and conv_wgrad, in backward graphs): the gradient operand
    arrives as where(mask, 0, g), a ReLU's (or clamp's) backward, and the kernel reads g and
    the bool mask instead of a materialised copy.
    """

    ndim: int  # spatial dims of the original op: 1, 2 or 3 (with `depth`)
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
    op: str = "conv"  # one of CONV_OPS: the forward conv, its transpose, its weight gradient
    output_padding: tuple[int, int] = (0, 0)  # conv_transpose only: extra output rows/columns
    input_mask: bool = False  # the gradient operand is where(mask, 0, g): see above
    padding_mode: str = "zeros"  # one of PADDING_MODES (a forward conv only)
    # the input arrives as x * s, s [N, C, 1, 1] (squeeze-and-excitation's scale before a
    # 1x1 conv); gemm_1x1 multiplies each x tile as it loads it (a forward conv only)
    input_scale: bool = False
    prologue: Prologue = Prologue()  # the input's BN and activation, applied as it is loaded
    # the kernel also writes, per tile of each image, its output's channel sums over the
    # tile's pixels divided by the image's: a global average pool that reads the output
    # (squeeze-and-excitation's) then only sums those (a forward conv only; see pool_shape)
    pool_sums: bool = False
    # the input's rows are window tokens of an image the kernel reads (see Windows): x is
    # that [B, C, H, W] image, the GEMM's N the B x nWh x nWw windows, in_size (1, WH*WW)
    windows: Windows | None = None
    # ... the output's rows too, stored at their pixels of the residual's [B, H, W, K] image
    # (Swin's proj -> window reverse -> [roll] -> + x): the kernel writes that image, x + y
    out_windows: Windows | None = None
    # a 3-D conv (ndim 3): its depth axis; the kernels walk the depth taps too
    depth: Depth | None = None

    def __post_init__(self) -> None:
        if (self.ndim == 3) != (self.depth is not None):
            raise SpecError("a 3-D conv (ndim 3) has a depth axis, and only it")
        if self.depth and (self.windows or self.out_windows or self.prologue.dw
                           or self.pool_sums or self.input_scale):
            raise SpecError("a depth axis is for a conv without window rows, a depthwise "
                            "prologue, pooled sums or an input scale")
        if self.depth and self.depth.output_padding and self.op != "conv_transpose":
            raise SpecError("a depth output padding is for a transposed conv only")
        if self.op not in CONV_OPS:
            raise SpecError(f"op={self.op!r} is not one of {CONV_OPS}")
        if self.input_mask and self.op == "conv":
            raise SpecError("input_mask is for the backward kernels (conv_transpose, conv_wgrad)")
        if self.padding_mode not in PADDING_MODES:
            raise SpecError(f"padding_mode={self.padding_mode!r} is not one of {PADDING_MODES}")
        if self.padding_mode != "zeros" and self.op != "conv":
            raise SpecError("a padding mode other than zeros is for forward convs only")
        if (self.input_scale or self.prologue.name()) and self.op != "conv":
            raise SpecError("an input scale or prologue is for forward convs only")
        if self.pool_sums and self.op != "conv":
            raise SpecError("pooled sums are for forward convs only")
        if self.prologue.bn and self.prologue.ln:
            raise SpecError("a prologue has one norm")
        e = self.epilogue
        if e.ln and (e.bn or e.act or e.residual or e.post_act or e.scale):
            raise SpecError("a LayerNorm epilogue follows the conv (and its bias) alone")
        if e.ln and (self.groups != 1 or self.op != "conv"):
            raise SpecError("a LayerNorm epilogue is for a forward conv with groups=1")
        if self.prologue.ln and self.groups != 1:
            raise SpecError("a LayerNorm prologue normalises every channel: groups must be 1")
        if self.input_scale and self.prologue.name():
            raise SpecError("an input scale and a prologue together are not a fused pattern")
        if self.windows and not (
            self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
            and self.groups == 1 and self.op == "conv" and self.padding_mode == "zeros"
            and not self.prologue.dw and not self.input_scale and not self.pool_sums
            and self.in_size == (1, self.windows.size[0] * self.windows.size[1])
        ):  # fmt: skip
            raise SpecError("window rows are for a 1x1 conv over [windows, 1, WH*WW] tokens")
        w = self.out_windows
        if w and not (
            self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
            and self.groups == 1 and self.op == "conv" and self.epilogue.residual
            and not self.epilogue.scale and not self.epilogue.ln and not self.pool_sums
            and self.output_layout == "nhwc" and self.in_size == (1, w.size[0] * w.size[1])
        ):  # fmt: skip
            raise SpecError(
                "output window rows are for a 1x1 conv over [windows, 1, WH*WW] tokens with a "
                "residual add (no layer scale), its output channels last"
            )
        if self.prologue.dw and not (
            self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
            and self.groups == 1 and self.ndim == 2 and self.op == "conv"
            and self.padding_mode == "zeros" and not self.prologue.ln and not self.pool_sums
        ):  # fmt: skip
            raise SpecError(
                "a depthwise prologue feeds a 2-D 1x1 conv (stride 1, no padding, groups 1) "
                "without a LayerNorm prologue or pooled sums"
            )
        if self.op == "conv_wgrad" and (self.epilogue != Epilogue() or self.has_bias):
            raise SpecError("a weight gradient has no bias and no epilogue")

    @property
    def transforms_input(self) -> bool:
        """The kernel computes its input from x as it loads it (input_scale, prologue, or
        window rows)."""
        return self.input_scale or bool(self.prologue.name()) or self.windows is not None

    @property
    def transposed(self) -> bool:
        return self.op == "conv_transpose"

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
        taps = self.kernel[0] * self.kernel[1] * (self.depth.kernel if self.depth else 1)
        return self.in_channels_per_group * taps

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.in_channels_per_group == 1

    @property
    def output_pixels(self) -> Size:
        """GEMM M: batch * HO * WO (symbolic under dynamic shapes)."""
        depth = self.depth.out if self.depth else 1
        return self.batch * depth * self.out_size[0] * self.out_size[1]

    def flops(self) -> int:
        """Multiply-adds * 2, at the size hints. A transposed conv multiplies every input
        pixel by the whole kernel (its outputs sum a varying number of taps)."""
        if self.op == "conv_transpose":
            depth = (self.depth.size, self.depth.kernel) if self.depth else (1, 1)
            pixels = self.hint(self.batch * depth[0] * self.in_size[0] * self.in_size[1])
            return 2 * pixels * self.in_channels * self.out_channels_per_group * (
                self.kernel[0] * self.kernel[1] * depth[1]
            )
        m = self.hint(self.output_pixels)
        dw = self.prologue.dw  # its taps, one per pixel and channel
        taps = dw.kernel[0] * dw.kernel[1] * self.in_channels if dw else 0
        return 2 * m * (self.out_channels * self.reduction + taps)

    # ---- identity ------------------------------------------------------------------
    def geometry(self) -> str:
        """A short readable name of what is baked into a kernel for this spec."""
        kh, kw = self.kernel
        op = f"_op{_fmt(self.output_padding)}" if self.output_padding != (0, 0) else ""
        kind = {"conv": "conv", "conv_transpose": "convT", "conv_wgrad": "convWgrad"}[self.op]
        return (
            f"{kind}{self.ndim}d_k{kh}x{kw}_s{_fmt(self.stride)}"
            f"_p{_fmt(self.padding)}{op}"
            f"_d{_fmt(self.dilation)}_g{self.groups}_{self.dtype}_{self.input_layout}"
            f"_to_{self.output_layout}"
            + (f"_{self.epilogue.name().replace('+', '_')}" if self.epilogue.name() else "")
            + ("_masked" if self.input_mask else "")
            + (f"_{self.padding_mode}" if self.padding_mode != "zeros" else "")
            + ("_xscale" if self.input_scale else "")
            + (f"_pre_{self.prologue.name().replace('+', '_')}" if self.prologue.name() else "")
            + ("_pooled" if self.pool_sums else "")
            + (f"_{self.windows.name().replace('+', '_')}" if self.windows else "")
            + (f"_to_{self.out_windows.name().replace('+', '_')}" if self.out_windows else "")
            + (f"_{self.depth.name()}" if self.depth else "")
        )

    def describe(self) -> str:
        """One line for reports: shapes and conv parameters."""
        c, k = self.in_channels, self.out_channels
        h, w = self.in_size
        ho, wo = self.out_size
        if self.ndim == 1:
            shape = f"[{self.batch},{c},{w}] -> [{self.batch},{k},{wo}]"
        elif self.depth:
            d, do = self.depth.size, self.depth.out
            shape = f"[{self.batch},{c},{d},{h},{w}] -> [{self.batch},{k},{do},{ho},{wo}]"
        else:
            shape = f"[{self.batch},{c},{h},{w}] -> [{self.batch},{k},{ho},{wo}]"
        kh, kw = self.kernel
        ks = f"{kw}" if self.ndim == 1 else f"{kh}x{kw}"
        extra = []
        if self.stride != (1, 1):
            extra.append(f"s{_fmt(self.stride[2 - self.ndim :])}")
        if self.padding != (0, 0):
            extra.append(f"p{_fmt(self.padding[2 - self.ndim :])}")
        if self.padding_mode != "zeros":
            extra.append(self.padding_mode)
        if self.dilation != (1, 1):
            extra.append(f"d{_fmt(self.dilation[2 - self.ndim :])}")
        if self.output_padding != (0, 0):
            extra.append(f"op{_fmt(self.output_padding[2 - self.ndim :])}")
        if self.op != "conv":
            extra.append({"conv_transpose": "transposed", "conv_wgrad": "weight-grad"}[self.op])
        if self.input_mask:
            extra.append("masked-grad")
        if self.input_scale:
            extra.append("x*scale[n,c]")
        if self.windows:
            extra.append(f"{self.windows.name()}(x)")
        if self.depth:
            extra.append(self.depth.name())
        if self.prologue.name():
            extra.append(f"{self.prologue.name()}(x)")
        if self.groups != 1:
            extra.append("dw" if self.is_depthwise else f"g{self.groups}")
        fused = [f"+{self.epilogue.name()}"] if self.epilogue.name() else []
        fused += [f"to {self.out_windows.name()}"] if self.out_windows else []
        fused += ["+pool sums"] if self.pool_sums else []
        return " ".join([shape, ks, *extra, self.dtype, self.output_layout, *fused])


MAX_HEAD_DIM = 512  # an attention's head row lives in registers (padded to a power of two)


@dataclass(frozen=True)
class AttentionSpec(SizeHints):
    """One window multi-head self-attention, canonicalised:

        out[b, h] = softmax(scale * q[b, h] @ k[b, h]^T  (x logit_scale[h])
                            + bias[h] + mask[b mod windows] + general[b, h]) @ v[b, h]

    q is a [batch, heads, tokens, head_dim] view, k [batch, heads, key_tokens, head_dim] and
    v [batch, heads, key_tokens, v_head_dim] (read through their strides; an operand named in
    `transposed` is stored with its last two dims swapped: LeViT's k as [B, H, D, N]). With
    `cosine`, q and k rows are L2-normalised first (SwinV2). `batch` is windows x images.
    Pooled keys and values (Nk != N) and a value head dim other than q's are the
    `key_tokens` and `v_head_dim` fields; None means N and head_dim.
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
    # b, h, n, d (batch, heads, tokens, v head dim) in memory order, outermost first. Without
    # commas the result is the [batch, heads, N, head_dim] view stored so ("bhnd": contiguous;
    # "bnhd": SDPA's [B, N, H, D]; "nbhd": nn.MultiheadAttention's sequence-first). Commas group
    # the dims of a contiguous result: "nb,hd" is [N * batch, heads * head_dim]; "bnc" is
    # "b,n,hd", [batch, N, heads * head_dim] (Swin's projection reads it). With 5-D q, k, v
    # the batch's inner part is a letter of its own, "t", right after "b": "b,t,n,hd" is
    # [batch / t, t, N, heads * head_dim] (torchvision MaxViT's [B, G, P, C]).
    output: str
    device: str
    precision: str  # how a float32 tl.dot runs on a GPU (torch's matmul precision)
    hints: tuple[tuple[str, int], ...] = ()
    mask_repeat: int = 1  # the mask is added this many times (HF Swinv2 adds it twice)
    safe_softmax: bool = False  # a row of all -inf scores gives 0 (SDPA), not NaN (softmax)
    key_tokens: int | None = None  # Nk, the keys' and values' tokens (None: N)
    v_head_dim: int | None = None  # the values' and the output's head dim (None: head_dim)
    transposed: tuple[str, ...] = ()  # operands stored [.., D, N] ("q", "k", "v")
    sdpa: bool = False  # the graph calls SDPA: its ATen path is that one kernel
    # 5-D q, k, v ([B, G, H, N, D] or another order of the three leading dims): which is the
    # heads dim; the other two view as the batch, the inner one's size `batch_split` (the
    # output's letter "t"). 4-D operands: 1 and 1.
    heads_axis: int = 1
    batch_split: int = 1
    out_dtype: str | None = None  # the output cast to another float dtype (None: dtype)
    # a boolean mask applied last, as a select: "keep" (SDPA's bool attn_mask: False gives
    # `fill`, -inf) or "drop" (masked_fill / where(m, fill, s): True gives `fill`); None
    select: str | None = None
    fill: float = float("-inf")
    # a mask constant for the compile that hides whole key tiles (score_terms.py): for each
    # tile shape of the kernel's space, the fraction of key tiles its query tiles visit,
    # ((BLOCK_M, BLOCK_N, fraction), ...); () when every key tile is visited
    key_tiles: tuple[tuple[int, int, float], ...] = ()
    # the backward: dq, dk, dv (and a bias's gradient summed over the batch) from the
    # output's gradient, the scores recomputed (codegen/attention_backward.py)
    grad: bool = False

    @property
    def keys(self) -> int:
        return self.tokens if self.key_tokens is None else self.key_tokens

    @property
    def value_dim(self) -> int:
        return self.head_dim if self.v_head_dim is None else self.v_head_dim

    def visited(self, block_m: int, block_n: int) -> float:
        """The fraction of key tiles a kernel with these tiles visits (1.0: all)."""
        return next((f for m, n, f in self.key_tiles if (m, n) == (block_m, block_n)), 1.0)

    def terms(self) -> str:
        parts = (["cosine"] if self.cosine else []) + (["bias"] if self.bias else [])
        parts += (["mask"] if self.mask else []) + (["attn_mask"] if self.general else [])
        parts += [self.select] if self.select else []
        return "+".join(parts)

    def geometry(self) -> str:
        terms = self.terms().replace("+", "_")
        shape = f"n{self.tokens}" + (f"k{self.keys}" if self.keys != self.tokens else "")
        shape += f"_d{self.head_dim}" + (f"v{self.value_dim}" if self.value_dim != self.head_dim
                                         else "")  # fmt: skip
        shape += "".join(f"_{name}T" for name in self.transposed)
        output = self.output.replace(",", "_")
        kind = "attention_backward" if self.grad else "window_attention"
        return f"{kind}_{shape}_{self.dtype}_{output}" + (
            f"_{terms}" if terms else ""
        )

    def describe(self) -> str:
        mask = f"[{self.windows},N,N] per window" if self.mask else "none"
        if self.mask and self.mask_repeat != 1:
            mask += f" x{self.mask_repeat}"
        tokens = f"N={self.tokens}" + (f" Nk={self.keys}" if self.keys != self.tokens else "")
        dims = f"head_dim={self.head_dim}" + (
            f" v_head_dim={self.value_dim}" if self.value_dim != self.head_dim else "")
        text = (
            f"{tokens} heads={self.heads} {dims} batch={self.batch} "
            f"bias={'[heads,N,N]' if self.bias else 'none'} mask={mask}"
        )
        if self.transposed:
            text += " " + ",".join(f"{name}^T" for name in self.transposed) + " stored"
        if self.general:
            text += " attn_mask=[batch,heads,N,N]"
        if self.cosine:
            text += f" cosine{'+logit_scale' if self.logit_scale else ''}"
        elif self.logit_scale:
            text += " logit_scale"
        if self.select:
            text += f" {self.select}=[..,N,Nk] bool" + (
                f" fill={self.fill}" if self.fill != float("-inf") else "")
        if self.safe_softmax:
            text += " safe_softmax"
        if self.key_tiles:
            least = min(f for _, _, f in self.key_tiles)
            text += f" sparse(key tiles visited >= {least:.1%})"
        cast = f" -> {self.out_dtype}" if self.out_dtype else ""
        text = f"{text} {self.dtype}{cast} out={self.output}"
        return text + " backward" if self.grad else text

    def flops(self) -> int:
        b, h, n, nk = self.hint(self.batch), self.heads, self.tokens, self.keys
        return 2 * b * h * n * nk * (self.head_dim + self.value_dim)


# ---- specs as data ---------------------------------------------------------------------
# A generated op carries its spec as JSON (see runtime/kernel_ref.py), so a compiled graph
# served from Inductor's caches can regenerate exactly the kernel it was built with. Decoding
# is strict: every field is checked against its type and, for names that reach a template
# (dtype, layouts, activations), against the closed set of values the templates know.

LAYOUTS = ("nchw", "nhwc", "strided")
PRECISIONS = ("ieee", "tf32")
DEVICES = ("cpu", "cuda")
BN_KINDS = (None, "affine", "plain")


class SpecError(ValueError):
    """Stored or passed spec data that is not a valid spec."""


# Symbolic sizes travel as expression trees of an allow-listed set of sympy classes and are
# rebuilt by calling those classes: nothing is parsed or evaluated as Python.
def _expr_classes() -> dict[str, type]:
    from torch.utils._sympy.functions import CeilDiv, FloorDiv, Mod, ModularIndexing

    classes = {c.__name__: c for c in (sympy.Add, sympy.Mul, sympy.Pow, sympy.Max, sympy.Min)}
    classes.update(
        {c.__name__: c for c in (FloorDiv, CeilDiv, Mod, ModularIndexing)},
        floor=sympy.floor,
        ceiling=sympy.ceiling,
    )
    return classes


MAX_EXPR_NODES = 64


def _size_to_json(v: Size) -> object:
    if isinstance(v, int):
        return v
    if isinstance(v, sympy.Integer):
        return int(v)
    if isinstance(v, sympy.Symbol):
        return {"sym": v.name}
    name = type(v).__name__ if type(v).__name__ in _expr_classes() else v.func.__name__
    return {"fn": name, "args": [_size_to_json(a) for a in v.args]}


def _size_from_json(v: object, budget: list[int] | None = None) -> Size:
    budget = [MAX_EXPR_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise SpecError("size expression too large")
    if isinstance(v, bool):
        raise SpecError(f"size {v!r} is not an int")
    if isinstance(v, int):
        return v
    if isinstance(v, dict) and set(v) == {"sym"}:
        name = v["sym"]
        if not isinstance(name, str) or not name.isidentifier() or len(name) > 32:
            raise SpecError(f"symbol {name!r} is not a name")
        return sympy.Symbol(name, integer=True, positive=True)
    if isinstance(v, dict) and set(v) == {"fn", "args"} and isinstance(v["args"], list):
        cls = _expr_classes().get(v["fn"]) if isinstance(v["fn"], str) else None
        if cls is None or not 1 <= len(v["args"]) <= 8:
            raise SpecError(f"size function {v['fn']!r} is not allowed")
        args = [_size_from_json(a, budget) for a in v["args"]]
        expr = cls(*[sympy.Integer(a) if isinstance(a, int) else a for a in args])
        return int(expr) if isinstance(expr, sympy.Integer) else expr
    raise SpecError(f"size {v!r} is neither an int nor an expression")


def _check(value: object, allowed: tuple, name: str) -> object:
    if value not in allowed or isinstance(value, bool) and value not in (True, False):
        raise SpecError(f"{name}={value!r} is not one of {allowed}")
    return value


def _int(value: object, name: str, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SpecError(f"{name}={value!r} is not an int >= {low}")
    return value


def _float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{name}={value!r} is not a number")
    return float(value)


def attention_output_ok(value: object) -> bool:
    """An attention output layout (AttentionSpec.output): "bnc", or b, h, n, d once each in
    memory order, commas (none empty) grouping a contiguous result's dims."""
    if value == "bnc":
        return True
    if not isinstance(value, str) or "" in value.split(","):
        return False
    order = value.replace(",", "")
    if "t" in order and ("bt" not in order or "," not in value):
        return False  # the batch's two parts view as one; only in a contiguous result
    return sorted(order) in (sorted("bhnd"), sorted("bthnd"))


def _output(value: object) -> str:
    if not attention_output_ok(value):
        raise SpecError(f"output={value!r} is not an attention output layout")
    return value


def _not_nan(value: float, name: str) -> float:
    if value != value:
        raise SpecError(f"{name} is NaN")
    return value


def _optional_int(value: object, name: str) -> int | None:
    return None if value is None else _int(value, name, 1)


def _names(value: object, allowed: tuple[str, ...], name: str) -> tuple[str, ...]:
    """A list of distinct names from `allowed`, in its order."""
    if not isinstance(value, list) or any(v not in allowed for v in value):
        raise SpecError(f"{name}={value!r} is not a list of names from {allowed}")
    if list(value) != [a for a in allowed if a in value]:
        raise SpecError(f"{name}={value!r} repeats a name or is out of order")
    return tuple(value)


def _fill(value: object) -> float:
    """AttentionSpec.fill: a number, or "inf" / "-inf" (JSON has no infinity)."""
    if value in ("inf", "-inf"):
        return float(value)
    return _not_nan(_float(value, "fill"), "fill")


def _key_tiles(value: object) -> tuple[tuple[int, int, float], ...]:
    """AttentionSpec.key_tiles: [[BLOCK_M, BLOCK_N, fraction in 0..1], ...]."""
    if not isinstance(value, list) or not all(isinstance(r, list) and len(r) == 3 for r in value):
        raise SpecError(f"key_tiles={value!r} is not [[BLOCK_M, BLOCK_N, fraction], ...]")
    rows = tuple((_int(m, "BLOCK_M", 1), _int(n, "BLOCK_N", 1), _float(f, "fraction"))
                 for m, n, f in value)  # fmt: skip
    if not all(0.0 <= f <= 1.0 for _, _, f in rows):
        raise SpecError(f"key_tiles={value!r}: a fraction outside 0..1")
    return rows


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{name}={value!r} is not a bool")
    return value


def _pair(value: object, name: str, low: int) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise SpecError(f"{name}={value!r} is not a pair")
    return (_int(value[0], name, low), _int(value[1], name, low))


def _activation_from_json(value: object) -> Activation | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2 or not isinstance(value[1], list):
        raise SpecError(f"activation {value!r} is not [name, args]")
    name = _check(value[0], ACTIVATIONS, "activation")
    return Activation(name, tuple(_float(a, "activation argument") for a in value[1]))


def _sizes(value: object, name: str) -> tuple[Size, Size]:
    if not isinstance(value, list) or len(value) != 2:
        raise SpecError(f"{name}={value!r} is not a pair")
    return tuple(_size_from_json(v) for v in value)


def _windows_from_json(value: object) -> Windows | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"size", "shift"}:
        raise SpecError(f"windows {value!r} are not windows")
    return Windows(_pair(value["size"], "size", 1), _pair(value["shift"], "shift", 0))


def _depth_from_json(value: object) -> Depth | None:
    if value is None:
        return None
    names = {f.name for f in fields(Depth)}
    if not isinstance(value, dict) or set(value) not in (names, names - {"output_padding"}):
        raise SpecError(f"depth {value!r} is not a depth axis")
    return Depth(
        size=_size_from_json(value["size"]),
        out=_size_from_json(value["out"]),
        kernel=_int(value["kernel"], "kernel", 1),
        stride=_int(value["stride"], "stride", 1),
        padding=_int(value["padding"], "padding", 0),
        dilation=_int(value["dilation"], "dilation", 1),
        padding_end=_int(value["padding_end"], "padding_end", 0),
        output_padding=_int(value.get("output_padding", 0), "output_padding", 0),
    )


def _depthwise_from_json(value: object) -> Depthwise:
    if not isinstance(value, dict) or set(value) != {f.name for f in fields(Depthwise)}:
        raise SpecError(f"depthwise prologue {value!r} is not one")
    return Depthwise(
        kernel=_pair(value["kernel"], "kernel", 1),
        stride=_pair(value["stride"], "stride", 1),
        padding=_pair(value["padding"], "padding", 0),
        bias=_bool(value["bias"], "bias"),
        image=_sizes(value["image"], "image"),
    )


def spec_to_json(spec) -> dict:
    """A JSON-ready dict of every field (sizes as ints or expression strings)."""
    out: dict = {"type": type(spec).__name__}
    for f in fields(spec):
        v = getattr(spec, f.name)
        if f.name == "epilogue":
            e = v
            act = [e.act.name, list(e.act.args)] if e.act else None
            post = [e.post_act.name, list(e.post_act.args)] if e.post_act else None
            v = {
                "bn": e.bn,
                "bn_eps": e.bn_eps,
                "act": act,
                "residual": e.residual,
                "post_act": post,
                "bn_after_act": e.bn_after_act,
                "scale": e.scale,
                "ln": e.ln,
                "ln_eps": e.ln_eps,
            }
        elif f.name == "prologue":
            act = [v.act.name, list(v.act.args)] if v.act else None
            dw = None
            if v.dw is not None:
                dw = {name: ([_size_to_json(e) for e in value] if isinstance(value, tuple)
                             else value) for name, value in vars(v.dw).items()}  # fmt: skip
            v = {"bn": v.bn, "ln": v.ln, "eps": v.eps, "act": act, "dw": dw}
        elif f.name in ("windows", "out_windows") and isinstance(spec, ConvSpec):
            v = None if v is None else {"size": list(v.size), "shift": list(v.shift)}
        elif f.name == "depth" and isinstance(spec, ConvSpec):
            v = None if v is None else {
                name: _size_to_json(value) for name, value in vars(v).items()}
        elif isinstance(v, Activation):  # a block's activation
            v = [v.name, list(v.args)]
        elif f.name == "hints":
            v = [[name, value] for name, value in v]
        elif f.name == "transposed":
            v = list(v)
        elif f.name == "key_tiles":
            v = [list(row) for row in v]
        elif f.name == "fill" and isinstance(spec, AttentionSpec) and abs(v) == float("inf"):
            v = str(v)  # "-inf": JSON has no infinity
        elif isinstance(v, tuple):
            v = [_size_to_json(x) for x in v]
        elif isinstance(v, sympy.Basic):
            v = _size_to_json(v)
        out[f.name] = v
    return out


def spec_from_json(data: object):
    """The spec (ConvSpec, AttentionSpec or spec_block.MlpSpec) `spec_to_json` wrote; raises
    SpecError for anything else."""
    if not isinstance(data, dict):
        raise SpecError("a spec is a JSON object")
    from .spec_block import MlpSpec, mlp_from_json

    kind = data.get("type")
    cls = {"ConvSpec": ConvSpec, "AttentionSpec": AttentionSpec, "MlpSpec": MlpSpec}.get(kind)
    if cls is None:
        raise SpecError(f"unknown spec type {kind!r}")
    names = {f.name for f in fields(cls)}
    if set(data) - {"type"} != names:
        raise SpecError(f"{kind} fields differ: {sorted(set(data) - {'type'} ^ names)}")
    hints = data["hints"]
    if not isinstance(hints, list) or not all(
        isinstance(h, list) and len(h) == 2 and isinstance(h[0], str) and len(h[0]) < 40
        for h in hints
    ):
        raise SpecError(f"hints {hints!r} are not [[name, value], ...]")
    common = dict(
        dtype=_check(data["dtype"], DTYPES, "dtype"),
        device=_check(data["device"], DEVICES, "device"),
        precision=_check(data["precision"], PRECISIONS, "precision"),
        hints=tuple((name, _int(value, "hint")) for name, value in hints),
    )
    if cls is MlpSpec:
        return mlp_from_json(data, common)
    common["batch"] = _size_from_json(data["batch"])
    if cls is AttentionSpec:
        return AttentionSpec(
            heads=_int(data["heads"], "heads", 1),
            tokens=_int(data["tokens"], "tokens", 1),
            head_dim=_int(data["head_dim"], "head_dim", 1),
            scale=_float(data["scale"], "scale"),
            cosine=_bool(data["cosine"], "cosine"),
            logit_scale=_bool(data["logit_scale"], "logit_scale"),
            bias=_bool(data["bias"], "bias"),
            mask=_bool(data["mask"], "mask"),
            windows=_int(data["windows"], "windows", 1),
            general=_bool(data["general"], "general"),
            output=_output(data["output"]),
            mask_repeat=_int(data["mask_repeat"], "mask_repeat", 1),
            safe_softmax=_bool(data["safe_softmax"], "safe_softmax"),
            key_tokens=_optional_int(data["key_tokens"], "key_tokens"),
            v_head_dim=_optional_int(data["v_head_dim"], "v_head_dim"),
            transposed=_names(data["transposed"], ("q", "k", "v"), "transposed"),
            sdpa=_bool(data["sdpa"], "sdpa"),
            heads_axis=_check(data["heads_axis"], (0, 1, 2), "heads_axis"),
            batch_split=_int(data["batch_split"], "batch_split", 1),
            out_dtype=_check(data["out_dtype"], (None, *DTYPES), "out_dtype"),
            select=_check(data["select"], (None, "keep", "drop"), "select"),
            fill=_fill(data["fill"]),
            key_tiles=_key_tiles(data["key_tiles"]),
            grad=_bool(data["grad"], "grad"),
            **common,
        )
    e = data["epilogue"]
    keys = {"bn", "bn_eps", "act", "residual", "post_act", "bn_after_act", "scale", "ln",
            "ln_eps"}
    if not isinstance(e, dict) or set(e) != keys:
        raise SpecError(f"epilogue {e!r} is not an epilogue")
    epilogue = Epilogue(
        bn=_check(e["bn"], BN_KINDS, "bn"),
        bn_eps=_float(e["bn_eps"], "bn_eps"),
        act=_activation_from_json(e["act"]),
        residual=_bool(e["residual"], "residual"),
        post_act=_activation_from_json(e["post_act"]),
        bn_after_act=_bool(e["bn_after_act"], "bn_after_act"),
        scale=_bool(e["scale"], "scale"),
        ln=_check(e["ln"], BN_KINDS, "ln"),
        ln_eps=_float(e["ln_eps"], "ln_eps"),
    )
    p = data["prologue"]
    if not isinstance(p, dict) or set(p) != {"bn", "ln", "eps", "act", "dw"}:
        raise SpecError(f"prologue {p!r} is not a prologue")
    prologue = Prologue(
        bn=_check(p["bn"], BN_KINDS, "bn"),
        ln=_check(p["ln"], BN_KINDS, "ln"),
        eps=_float(p["eps"], "eps"),
        act=_activation_from_json(p["act"]),
        dw=None if p["dw"] is None else _depthwise_from_json(p["dw"]),
    )
    sizes = {name: _sizes(data[name], name) for name in ("in_size", "out_size")}
    return ConvSpec(
        ndim=_check(data["ndim"], (1, 2, 3), "ndim"),
        in_channels=_int(data["in_channels"], "in_channels", 1),
        out_channels=_int(data["out_channels"], "out_channels", 1),
        kernel=_pair(data["kernel"], "kernel", 1),
        stride=_pair(data["stride"], "stride", 1),
        padding=_pair(data["padding"], "padding", 0),
        dilation=_pair(data["dilation"], "dilation", 1),
        groups=_int(data["groups"], "groups", 1),
        has_bias=_bool(data["has_bias"], "has_bias"),
        input_layout=_check(data["input_layout"], LAYOUTS, "input_layout"),
        weight_layout=_check(data["weight_layout"], LAYOUTS, "weight_layout"),
        output_layout=_check(data["output_layout"], LAYOUTS[:2], "output_layout"),
        epilogue=epilogue,
        op=_check(data["op"], CONV_OPS, "op"),
        output_padding=_pair(data["output_padding"], "output_padding", 0),
        input_mask=_bool(data["input_mask"], "input_mask"),
        padding_mode=_check(data["padding_mode"], PADDING_MODES, "padding_mode"),
        input_scale=_bool(data["input_scale"], "input_scale"),
        prologue=prologue,
        pool_sums=_bool(data["pool_sums"], "pool_sums"),
        windows=_windows_from_json(data["windows"]),
        out_windows=_windows_from_json(data["out_windows"]),
        depth=_depth_from_json(data["depth"]),
        **sizes,
        **common,
    )
