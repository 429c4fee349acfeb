"""Part a's block families: the kernels that fuse more than one layer, checked natively.

    bn_prologue   BN -> act -> conv (DenseNet, PreAct ResNet): gemm_1x1, or im2win_implicit's
                  tap order for a kxk conv, normalises its input as it loads it
    ln_prologue   LayerNorm over the channels -> 1x1 conv (a transformer's norm -> linear):
                  gemm_1x1 computes the rows' statistics, then normalises as it loads; or
                  -> kxk conv (ConvNeXt's LayerNorm2d -> 2x2 stride-2 downsampling):
                  im2win_implicit's tap order, each tap's pixels' statistics first
    late_bn       conv -> act -> BN (ConvMixer, RepViT): the BN after the activation
    ln_epilogue   conv -> LayerNorm over its output channels (ConvNeXt's stem, LayerNorm2d):
                  the tile holds every output channel and normalises them before the store
    layer_scale   a linear's 1x1 conv -> [act] -> * gamma [-> + residual] (ConvNeXt's fc2,
                  timm's LayerScale): gemm_1x1 scales its output per channel
    se_scale      conv1x1(x * s[n, c]) (squeeze-and-excitation's scale): gemm_1x1
    se_pool       depthwise conv whose output is globally pooled: direct_depthwise also writes
                  each tile's share of the channel means (checked against eager's mean)
    dw_prologue   depthwise kxk conv -> BN -> act -> 1x1 conv (the inverted residual's
                  tail): dw_gemm computes the depthwise conv's output as its operand tiles
    swin_windows  Swin's linears with window rows, gemm_1x1: "qkv", LayerNorm -> [roll] ->
                  window partition -> linear, reading the image in place (spec.windows);
                  "proj", linear -> window reverse -> [roll back] -> + x, storing each row at
                  its pixel (spec.out_windows)
    mlp_block     [LayerNorm ->] linear -> act -> linear [-> layer scale] [-> + residual] in
                  one kernel (spec_block.MlpSpec), with and without the LayerNorm, and gated
                  (SwiGLU: the activation times a second projection); "convnext": ConvNeXt's
                  whole block, the depthwise 7x7 conv of an image before the norm
                  (dw_mlp_block)

Conv families are ConvCase values (gpu_cases.py) with their spec fields set; the MLP is an
MlpCase, planned and checked here. Every family runs in each dtype and in both of its
"layouts" (nchw/nhwc; se_pool: nchw only, as its kernel's image tiles need; mlp_block:
"plain", "layernorm", "gated" and "convnext"). Case ids read like the conv
families': "bNNN.j FAMILY DTYPE LAYOUT".
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from ..config import Config
from ..devices import Device
from ..schedule import Schedule
from ..selection.select import SelectionContext, select_schedule
from ..spec import Activation, Depthwise, Epilogue, Prologue, Windows
from ..spec_block import MlpSpec
from .gpu_cases import DTYPES, SHAPES_PER_VARIANT, ConvCase

CONV_FAMILIES = (
    "bn_prologue", "ln_prologue", "late_bn", "se_scale", "se_pool", "layer_scale", "ln_epilogue",
    "dw_prologue", "swin_windows",
)
WINDOW_LAYOUTS = ("qkv", "proj")
FAMILIES = (*CONV_FAMILIES, "mlp_block")
MLP_LAYOUTS = ("plain", "layernorm", "gated", "convnext")
ACTS = (Activation("relu"), Activation("silu"), Activation("gelu"), Activation("hardswish"))


@dataclass(frozen=True)
class MlpCase:
    """One MLP block: x [tokens, C] -> [tokens, CO] through a hidden of H."""

    id: str
    variant: str
    tokens: int
    in_features: int
    hidden: int
    out_features: int
    act: Activation
    bias: bool
    scale: bool
    residual: bool
    norm: str | None
    dtype: str
    gated: bool = False
    image: tuple[int, ...] = ()  # ConvNeXt's block: (H, W); tokens = N x H x W pixels


def _conv_variant(rng: random.Random, index: int, family: str, dtype: str, layout: str) -> list:
    act = rng.choice(ACTS)
    geometry: dict = dict(kernel=(1, 1), in_channels=rng.randint(3, 80), groups=1)
    fields: dict = {}
    schedule = "gemm_1x1"
    if family == "bn_prologue":
        fields["prologue"] = Prologue(bn="affine", act=rng.choice((*ACTS, None)))
        if index % 2:  # a kxk conv: its padding stays zero after the BN
            k = rng.choice((3, 5))
            geometry = dict(kernel=(k, k), padding=(k // 2,) * 2, stride=(rng.choice((1, 2)),) * 2,
                            in_channels=rng.randint(16, 48), groups=1)  # fmt: skip
            schedule = "im2win_implicit:tap"
    elif family == "ln_prologue":
        fields["prologue"] = Prologue(ln=rng.choice(("affine", "plain")), eps=1e-6)
        if index % 2:  # ConvNeXt's downsampling, or a padded kxk conv after the norm
            k, stride, pad = rng.choice(((2, 2, 0), (3, 1, 1)))
            geometry = dict(kernel=(k, k), padding=(pad, pad), stride=(stride, stride),
                            in_channels=rng.randint(16, 48), groups=1)  # fmt: skip
            schedule = "im2win_implicit:tap"
    elif family == "late_bn":
        fields["epilogue"] = Epilogue(bn="affine", act=act, bn_after_act=True,
                                      residual=rng.random() < 0.5)  # fmt: skip
        schedule = None  # the cost model's choice among the generated kernels
        k = rng.choice((1, 3))
        geometry = dict(kernel=(k, k), padding=(k // 2,) * 2, in_channels=rng.randint(8, 48),
                        groups=1)  # fmt: skip
    elif family == "se_scale":
        fields["input_scale"] = True
    elif family == "ln_epilogue":  # ConvNeXt's stem, a kxk conv, then LayerNorm2d
        fields["epilogue"] = Epilogue(ln=rng.choice(("affine", "plain")), ln_eps=1e-6)
        k, stride, pad = rng.choice(((4, 4, 0), (2, 2, 0), (3, 1, 1)))
        geometry = dict(kernel=(k, k), padding=(pad, pad), stride=(stride, stride),
                        in_channels=rng.randint(3, 24), groups=1)  # fmt: skip
        schedule = None  # the cost model's choice among the generated kernels
    elif family == "dw_prologue":  # its image is each case's size (conv_case_spec)
        k, stride = rng.choice(((3, 1), (3, 2), (5, 1), (5, 2)))
        dw = Depthwise((k, k), (stride, stride), (k // 2, k // 2), rng.random() < 0.3, (0, 0))
        fields["prologue"] = Prologue(bn="affine", act=act, dw=dw)
        fields["epilogue"] = Epilogue(bn="affine")
        geometry = dict(kernel=(1, 1), in_channels=rng.randint(16, 120), groups=1)
        schedule = "dw_gemm"
    elif family == "swin_windows":  # 7x7 windows of an image 1 to 3 windows each way
        shift = rng.choice((0, 3, 2))
        windows = Windows((7, 7), (shift, shift + 1 if shift else 0))
        fields = dict(windows=windows, prologue=Prologue(ln=rng.choice(("affine", "plain"))))
        if layout == "proj":
            fields = dict(out_windows=windows, epilogue=Epilogue(residual=True))
        geometry = dict(kernel=(1, 1), in_channels=rng.choice((32, 48, 96)), groups=1)
    elif family == "layer_scale":
        fields["epilogue"] = Epilogue(act=rng.choice((act, None)), scale=True,
                                      residual=rng.random() < 0.7)  # fmt: skip
    else:  # se_pool
        c, k = rng.randint(3, 60), rng.choice((3, 5))
        geometry = dict(kernel=(k, k), padding=(k // 2,) * 2, stride=(rng.choice((1, 2)),) * 2,
                        in_channels=c, groups=c)  # fmt: skip
        fields.update(pool_sums=True, epilogue=Epilogue(bn="affine", act=act))
        schedule = "direct_depthwise"
    cases = []
    for j in range(SHAPES_PER_VARIANT):
        depthwise = geometry["groups"] > 1
        out = geometry["in_channels"] if depthwise else rng.randint(2, 80)
        size = (rng.randint(5, 23), rng.randint(5, 23))
        if family == "dw_prologue":
            dw = dataclasses.replace(fields["prologue"].dw, image=size)
            fields["prologue"] = dataclasses.replace(fields["prologue"], dw=dw)
        batch = rng.randint(1, 3)
        if family == "swin_windows":  # qkv: x is the image; proj: x the windows' tokens
            image = (7 * rng.randint(1, 3), 7 * rng.randint(1, 3))
            size = image if layout == "qkv" else (1, 49)
            if layout == "proj":
                batch *= (image[0] // 7) * (image[1] // 7)
                fields["window_image"] = image
            out = geometry["in_channels"] * rng.choice((1, 3)) if layout == "qkv" else (
                geometry["in_channels"])
        cases.append(
            ConvCase(
                id=f"b{index:03d}.{j} {family} {dtype} {layout}",
                variant=f"b{index:03d}",
                batch=batch,
                out_channels=out,
                size=size,
                bias=rng.random() < 0.5 and family != "se_pool",
                dtype=dtype,
                layout=layout,
                family=schedule,
                pick="kernel" if schedule is None else "model",
                **geometry,
                **fields,
            )
        )
    return cases


def _mlp_variant(rng: random.Random, index: int, dtype: str, layout: str) -> list:
    c = rng.choice((32, 48, 96))
    out, hidden = rng.choice((c, 2 * c)), rng.choice((2, 4)) * c
    act, bias, scale = rng.choice(ACTS), rng.random() < 0.7, rng.random() < 0.5
    convnext = layout == "convnext"
    if convnext:  # its norm, its square MLP, the input as its residual
        c = min(c, 64) if dtype == "float32" else c  # (float32's register budget)
        out, hidden = c, 4 * c
    cases = []
    for j in range(SHAPES_PER_VARIANT):
        image = (rng.randint(5, 23), rng.randint(5, 23)) if convnext else ()
        tokens = rng.randint(1, 3) * image[0] * image[1] if convnext else rng.randint(5, 300)
        cases.append(
            MlpCase(
                id=f"b{index:03d}.{j} mlp_block {dtype} {layout}",
                variant=f"b{index:03d}",
                tokens=tokens,
                in_features=c,
                hidden=hidden,
                out_features=out,
                act=act,
                bias=bias,
                scale=scale,
                residual=out == c and rng.random() < 0.7,
                norm="affine" if layout in ("layernorm", "convnext") else None,
                dtype=dtype,
                gated=layout == "gated",
                image=image,
            )
        )
    return cases


def block_cases(seed: int = 1) -> list:
    """Every block family x dtype x layout, one variant each (SHAPES_PER_VARIANT cases)."""
    rng = random.Random(seed)
    cases: list = []
    index = 0
    for family in FAMILIES:
        layouts = {"mlp_block": MLP_LAYOUTS, "se_pool": ("nchw",),
                   "swin_windows": WINDOW_LAYOUTS}.get(family, ("nchw", "nhwc"))
        for dtype in DTYPES:
            for layout in layouts:
                if family == "mlp_block":
                    cases += _mlp_variant(rng, index, dtype, layout)
                else:
                    cases += _conv_variant(rng, index, family, dtype, layout)
                index += 1
    return cases


# ---- the MLP: spec, schedule, inputs ----------------------------------------------------------
def mlp_case_spec(case: MlpCase) -> MlpSpec:
    dw, precision = {}, "ieee"
    if case.image:  # ConvNeXt's depthwise 7x7 conv, with its bias, output channels first
        dw = dict(dw_kernel=(7, 7), dw_padding=(3, 3), dw_bias=True, image=case.image,
                  channels_first=True)  # fmt: skip
        # a float32 whole block runs on tensor cores only (torch's matmul precision "tf32")
        precision = "tf32" if case.dtype == "float32" else precision
    return MlpSpec(
        case.tokens, case.in_features, case.hidden, case.out_features, case.act, case.bias,
        case.bias, case.scale, case.residual, case.dtype, "cuda", precision, norm=case.norm,
        gated=case.gated, **dw,
    )  # fmt: skip


def plan_mlp(case: MlpCase, device: Device) -> tuple[MlpSpec, list[Schedule]]:
    """The block kernel the cost model ranks first (never "per layer": that is ATen)."""
    from ..selection.cost import rank
    from ..selection.select import model_candidates

    spec = mlp_case_spec(case)
    choice = select_schedule(spec, SelectionContext(Config(cache=False), device, "planned"))
    if choice.schedule.name != "aten":
        return spec, [choice.schedule]
    ranked = rank(spec, model_candidates(spec, device, include_aten=False), device)
    return spec, [ranked[0].schedule]


def mlp_inputs(case: MlpCase, device: str, gen: torch.Generator) -> list:
    """(x, w1, b1, w2, b2, scale, residual, norm_weight, norm_bias, w3, b3), weights scaled
    so the hidden stays O(1); a ConvNeXt block's x is an [N, C, H, W] image (its residual,
    x itself, not passed), then (dw_weight, dw_bias)."""
    dtype = getattr(torch, case.dtype)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    m, c, h, co = case.tokens, case.in_features, case.hidden, case.out_features
    if case.image:
        image = randn(m // (case.image[0] * case.image[1]), c, *case.image)
        operands = mlp_inputs(dataclasses.replace(case, image=(), residual=False), device, gen)
        dw = [randn(c, 1, 7, 7, scale=1 / 7), randn(c) + 0.5]  # a mean the LayerNorm removes
        return [image, *operands[1:], *dw]
    return [
        randn(m, c) + 0.5,  # a mean the LayerNorm removes
        randn(h, c, scale=c**-0.5),
        randn(h) if case.bias else None,
        randn(co, h, scale=h**-0.5),
        randn(co) if case.bias else None,
        randn(co) if case.scale else None,
        randn(m, co) if case.residual else None,
        randn(c) if case.norm else None,
        randn(c) if case.norm else None,
        randn(h, c, scale=c**-0.5) if case.gated else None,
        randn(h) if case.gated and case.bias else None,
    ]

