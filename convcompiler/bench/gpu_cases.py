"""The cases of the GPU command's parts, as plain frozen values (no GPU needed to build them).

    correctness_cases()   part a: >= 150 random configurations over every kernel family,
                          dtype and layout, plus the 12 im2win layers in each dtype
    layer_cases()         parts b and e: the 12 im2win layers and ResNet-50's distinct convs
                          (part b: and their gradients, batch 32 float16, and r3d_18's
                          distinct 3-D convs)
    SWIN_T stages         part c (bench/window_attention.py)
    NETWORKS              part d

A case is resolved to a spec and a schedule by `plan_conv` / `plan_attention` with a
planning device, the same way on the GPU (the device in use) and in the dry run (the h200
entry of the device table), so the dry run compiles exactly the kernels the GPU run launches.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import torch

from ..codegen import SPACES
from ..config import Config
from ..devices import Device
from ..frontend.kernels import attention_spec_of, conv_spec_of
from ..runtime.reference import memory_format
from ..schedule import ATEN, InvalidSchedule, Schedule
from ..selection.cost import rank
from ..selection.select import SelectionContext, model_candidates, select_schedule
from ..spec import Activation, AttentionSpec, ConvSpec, Epilogue, Prologue, Windows
from .layers import load_layers

DTYPES = ("float32", "float16", "bfloat16")
FAMILIES = (
    "im2win_band",
    "im2win_implicit:tap",
    "im2win_implicit:flat",
    "direct_depthwise",
    "gemm_1x1",
    "conv_bn",
    "transposed_phase",  # conv_transpose, as the backward's grad_input
    "wgrad_splitk",  # the weight gradient
)
OPS = {"transposed_phase": "conv_transpose", "wgrad_splitk": "conv_wgrad"}  # else "conv"
NETWORKS = ("resnet50", "convnext_tiny", "swin_t")
RANDOM_CONFIGS = 150
SHAPES_PER_VARIANT = 4  # runtime sizes drawn per kernel variant (they share one compile)


@dataclass(frozen=True)
class ConvCase:
    """One convolution: its sizes, parameters, and how its schedule is picked.

    family None: the cost model's choice among every schedule (ATen included), as the
    backend picks, or its best generated kernel (`pick="kernel"`); otherwise that schedule
    family (`name` or `name:REDUCTION`), with the model's best tiles (`pick="model"`, made
    at `plan_sizes` when given) or seeded random valid tiles (`pick="random"`).

    op "conv_transpose": `in_channels` -> `out_channels` transposed, weight [C, K/groups, ..];
    op "conv_wgrad": the weight gradient of the forward conv the other fields describe; its
    launcher takes (dy, x). `masked` (those two ops): the gradient operand comes as
    where(mask, 0, g), a ReLU's backward fused in; the launcher takes the bool mask last.
    `padding_mode` (a forward conv): how its padding is filled, "zeros", "reflect",
    "replicate" or "circular" (the kernel reads the border of x in place). A 3-D conv's
    `size`, `kernel`, `stride`, `padding` and `dilation` have three entries, depth first."""

    id: str
    variant: str  # cases of one variant share a kernel source: kept in one worker
    batch: int
    in_channels: int
    out_channels: int
    size: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    dtype: str = "float16"
    layout: str = "nchw"
    epilogue: Epilogue = Epilogue()
    family: str | None = None
    pick: str = "model"
    plan_sizes: tuple[int, int, int, int] | None = None  # (batch, K, H, W) the pick is made at
    op: str = "conv"
    output_padding: tuple[int, int] = (0, 0)
    masked: bool = False
    padding_mode: str = "zeros"
    # the block families' fields (gpu_blocks.py): the input's BN prologue, SE's input scale,
    # the pooled sums
    prologue: Prologue = Prologue()
    input_scale: bool = False
    pool_sums: bool = False
    # Swin's window rows (gpu_blocks.py): the input's (x is the [batch, C, H, W] image of
    # `size`), or the output's (x the tokens, `window_image` the residual image's H, W)
    windows: Windows | None = None
    out_windows: Windows | None = None
    window_image: tuple[int, ...] = ()

    def tensors(self, device: str = "cpu", make=torch.empty) -> tuple:
        dtype = getattr(torch, self.dtype)
        x = make(self.batch, self.in_channels, *self.size, device=device, dtype=dtype)
        w_shape = (self.out_channels, self.in_channels // self.groups, *self.kernel)
        if self.op == "conv_transpose":
            w_shape = (self.in_channels, self.out_channels // self.groups, *self.kernel)
        w = make(*w_shape, device=device, dtype=dtype)
        last = self.layout == "nhwc" or self.windows or self.out_windows  # (Swin's: too)
        x = x.to(memory_format=memory_format("nhwc" if last else "nchw", x.dim()))
        b = make(self.out_channels, device=device, dtype=dtype) if self.bias else None
        return x, w, b

    def flops(self) -> int:
        pixels = math.prod(out_size(self))
        macs = self.batch * self.out_channels * pixels * (self.in_channels // self.groups)
        if self.op == "conv_transpose":  # each input pixel meets the whole kernel
            pixels = math.prod(self.size)
            macs = self.batch * self.in_channels * pixels * (self.out_channels // self.groups)
        return 2 * macs * math.prod(self.kernel)


@dataclass(frozen=True)
class AttentionCase:
    id: str
    variant: str
    images: int
    windows: int
    heads: int
    tokens: int
    head_dim: int
    dtype: str
    bias: bool
    mask: bool
    output: str  # "bnc" or "bhnd": the attention's "layout"

    @property
    def batch(self) -> int:
        return self.images * self.windows


def out_size(case: ConvCase) -> tuple[int, int]:
    if case.op == "conv_transpose":
        return tuple(
            (s - 1) * st - 2 * p + d * (k - 1) + op + 1
            for s, p, d, k, st, op in zip(
                case.size, case.padding, case.dilation, case.kernel, case.stride,
                case.output_padding,
            )
        )  # fmt: skip
    return tuple(
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, p, d, k, st in zip(case.size, case.padding, case.dilation, case.kernel, case.stride)
    )


# ---- part a: random configurations ---------------------------------------------------------
def _geometry(rng: random.Random, family: str) -> dict:
    """Kernel size, stride, padding, dilation, channels and groups for one family."""
    if family == "transposed_phase":
        kh, kw = rng.choice(((2, 2), (3, 3), (4, 4), (5, 5), (1, 3), (3, 1)))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        dilation = (rng.choice((1, 1, 2)), rng.choice((1, 1, 2)))
        groups = rng.choice((1, 1, 2))
        return dict(
            kernel=(kh, kw),
            stride=stride,
            padding=(rng.randint(0, (kh - 1) * dilation[0] // 2),
                     rng.randint(0, (kw - 1) * dilation[1] // 2)),
            dilation=dilation,
            output_padding=tuple(rng.randint(0, s - 1) for s in stride),
            in_channels=rng.randint(1, 24) * groups,
            groups=groups,
        )  # fmt: skip
    if family == "wgrad_splitk":
        return _geometry(rng, rng.choice(("im2win_band", "im2win_band", "direct_depthwise")))
    if family == "gemm_1x1":
        s = rng.choice((1, 1, 2))
        return dict(kernel=(1, 1), stride=(s, s), in_channels=rng.randint(3, 96), groups=1)
    if family == "direct_depthwise":
        k = rng.choice((3, 5, 7))
        c = rng.randint(3, 48)
        return dict(
            kernel=(k, k),
            stride=(rng.choice((1, 2)),) * 2,
            padding=(k // 2,) * 2,
            dilation=(rng.choice((1, 1, 2)),) * 2,
            in_channels=c,
            groups=c,
            multiplier=rng.choice((1, 2)),
        )
    kh, kw = rng.choice(((3, 3), (5, 5), (7, 7), (1, 3), (3, 1), (11, 11), (2, 2)))
    tap = family == "im2win_implicit:tap"
    groups = rng.choice((1, 1, 2))
    per_group = rng.randint(16, 48) if tap else rng.randint(1, 24)
    return dict(
        kernel=(kh, kw),
        stride=(rng.choice((1, 2)), rng.choice((1, 2))),
        padding=(rng.randint(0, kh // 2), rng.randint(0, kw // 2)),
        dilation=(rng.choice((1, 1, 2)), rng.choice((1, 1, 2))),
        in_channels=per_group * groups,
        groups=groups,
    )


def _epilogue(rng: random.Random) -> Epilogue:
    acts = (
        Activation("relu"),
        Activation("hardtanh", (0.0, 6.0)),
        Activation("silu"),
        Activation("gelu"),
        Activation("gelu_tanh"),
        Activation("hardswish"),
        Activation("leaky_relu", (0.1,)),
        Activation("sigmoid"),
        Activation("hardsigmoid"),
    )
    residual = rng.random() < 0.5
    return Epilogue(
        bn=rng.choice(("affine", "plain")),
        act=rng.choice(acts + (None,)),
        residual=residual,
        post_act=rng.choice((Activation("relu"), None)) if residual else None,
    )


def _conv_variant(rng: random.Random, index: int, family: str, dtype: str, layout: str) -> list:
    """SHAPES_PER_VARIANT cases of one kernel: the geometry, channels per group, bias and
    epilogue are the variant's; batch, output channels and image size are drawn per case."""
    base = rng.choice(FAMILIES[:3] + ("gemm_1x1",)) if family == "conv_bn" else family
    geo = _geometry(rng, base)
    depthwise = "multiplier" in geo
    multiplier = geo.pop("multiplier", 1)
    epilogue = _epilogue(rng) if family == "conv_bn" else Epilogue()
    bias = rng.random() < 0.5 and family != "wgrad_splitk"  # a weight gradient has none
    variant = f"a{index:03d}"
    # every other variant of a gradient kernel reads its gradient with a ReLU's mask; the
    # kernels that read a padding mode get reflect and replicate in turn with zeros
    masked = OPS.get(family, "conv") != "conv" and index % 4 >= 2
    mode = "zeros"
    if family in ("im2win_implicit:tap", "direct_depthwise") and any(geo.get("padding", ())):
        mode = ("zeros", "reflect", "replicate", "circular")[index % 4]
    tag = "[masked]" if masked else f"[{mode}]" if mode != "zeros" else ""
    cases, first = [], None
    for j in range(SHAPES_PER_VARIANT):
        groups = geo["groups"]
        k = groups * multiplier if depthwise else groups * rng.randint(2, 40)
        size = (rng.randint(geo["kernel"][0] * 2, 29), rng.randint(geo["kernel"][1] * 2, 31))
        batch = rng.randint(1, 3)
        first = first or (batch, k, *size)  # the variant's tiles are picked at its first shape
        pick = "model" if index % 2 == 0 else "random"
        cases.append(
            ConvCase(
                id=f"{variant}.{j} {family}{tag} {dtype} {layout}",
                variant=variant,
                batch=batch,
                out_channels=k,
                size=size,
                bias=bias,
                dtype=dtype,
                layout=layout,
                epilogue=epilogue,
                family=base,
                pick=pick,
                plan_sizes=first,
                op=OPS.get(family, "conv"),
                masked=masked,
                padding_mode=mode,
                **geo,
            )
        )
    return cases


def _conv3d_variant(rng: random.Random, index: int, dtype: str, layout: str, nth: int) -> list:
    """SHAPES_PER_VARIANT 3-D convs of one kernel (im2win_implicit's depth taps): a video
    net's kernel shapes, each padding mode in turn, a BN/activation/residual epilogue with
    zero padding."""
    mode = ("zeros", "reflect", "replicate", "circular")[nth % 4]  # the nth 3-D variant's
    shapes = ((3, 3, 3), (1, 3, 3), (3, 1, 1), (3, 7, 7), (2, 4, 4))
    kernel = rng.choice(shapes + (((1, 1, 1),) if mode == "zeros" else ()))
    stride = rng.choice(((1, 1, 1), (2, 2, 2), (1, 2, 2)))
    padding = tuple(k // 2 for k in kernel)
    dilation = rng.choice(((1, 1, 1), (1, 1, 1), (2, 1, 1)))
    groups = rng.choice((1, 1, 2))
    # an epilogue with zero padding (eager's BN of a padded copy's conv may change layout)
    epilogue = _epilogue(rng) if mode == "zeros" else Epilogue()
    variant = f"a{index:03d}"
    c, k = groups * rng.randint(1, 16), groups * rng.randint(2, 24)  # the kernel's constants
    cases = []
    for j in range(SHAPES_PER_VARIANT):
        size = tuple(rng.randint(max(2 * kk, 3), max(2 * kk, 3) + 7) for kk in kernel)
        batch = rng.randint(1, 2)
        cases.append(ConvCase(
            id=f"{variant}.{j} conv3d[{mode}] {dtype} {layout}", variant=variant, batch=batch,
            in_channels=c, out_channels=k, size=size, kernel=kernel,
            stride=stride, padding=padding, dilation=dilation, groups=groups,
            bias=rng.random() < 0.5, dtype=dtype, layout=layout, epilogue=epilogue,
            family="im2win_implicit:tap", pick="model" if index % 2 == 0 else "random",
            plan_sizes=None, padding_mode=mode,
        ))  # fmt: skip
    return cases


def _conv3d_grad_variant(rng: random.Random, index: int, dtype: str, layout: str,
                         op: str) -> list:
    """SHAPES_PER_VARIANT 3-D gradient kernels of one variant: a transposed conv (a 3-D conv's
    grad_input: transposed_phase, output padding drawn below the stride) or a weight gradient
    (wgrad_splitk with the depth taps), every other variant reading a ReLU's mask."""
    kernel = rng.choice(((3, 3, 3), (1, 3, 3), (3, 1, 1), (2, 4, 4), (1, 1, 1)))
    stride = rng.choice(((1, 1, 1), (2, 2, 2), (2, 1, 2)))
    padding = tuple(rng.randint(0, k // 2) for k in kernel)
    dilation = rng.choice(((1, 1, 1), (1, 1, 1), (2, 1, 1)))
    groups = rng.choice((1, 1, 2))
    output_padding = (0, 0, 0)
    if op == "conv_transpose":
        output_padding = tuple(rng.randint(0, s - 1) for s in stride)
    masked = index % 4 >= 2
    family = "transposed_phase" if op == "conv_transpose" else "wgrad_splitk"
    name = "conv3dT" if op == "conv_transpose" else "conv3dWgrad"
    variant = f"a{index:03d}"
    c, k = groups * rng.randint(1, 16), groups * rng.randint(2, 24)
    cases = []
    for j in range(SHAPES_PER_VARIANT):
        size = tuple(rng.randint(max(2 * kk, 3), max(2 * kk, 3) + 6) for kk in kernel)
        cases.append(ConvCase(
            id=f"{variant}.{j} {name}{'[masked]' if masked else ''} {dtype} {layout}",
            variant=variant, batch=rng.randint(1, 2), in_channels=c, out_channels=k, size=size,
            kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
            bias=op == "conv_transpose" and rng.random() < 0.5, dtype=dtype, layout=layout,
            family=family, pick="model" if index % 2 == 0 else "random", op=op,
            output_padding=output_padding, masked=masked,
        ))  # fmt: skip
    return cases


def _attention_variant(rng: random.Random, index: int, dtype: str, output: str) -> list:
    tokens = rng.choice((49, 64, 16, 50))
    head_dim = rng.choice((16, 32, 64))
    heads = rng.randint(1, 6)
    mask = rng.random() < 0.6
    bias = rng.random() < 0.8
    variant = f"a{index:03d}"
    cases = []
    for j in range(SHAPES_PER_VARIANT):
        windows = rng.choice((2, 4)) if mask else 1
        cases.append(
            AttentionCase(
                f"{variant}.{j} window_attention {dtype} {output}",
                variant,
                rng.randint(1, 3),
                windows,
                heads,
                tokens,
                head_dim,
                dtype,
                bias,
                mask,
                output,
            )
        )
    return cases


def correctness_cases(seed: int = 0) -> list:
    """Part a: every family x dtype x layout in turn until >= RANDOM_CONFIGS random cases,
    then the 12 im2win layers (batch 2) in each dtype."""
    rng = random.Random(seed)
    combos = [
        (f, d, lay)
        for f in FAMILIES + ("window_attention",)
        for d in DTYPES
        for lay in ("nchw", "nhwc")
    ]
    cases: list = []
    index = 0
    while len(cases) < RANDOM_CONFIGS or index < len(combos):  # every combination at least once
        family, dtype, layout = combos[index % len(combos)]
        if family == "window_attention":
            output = "bnc" if layout == "nchw" else "bhnd"
            cases += _attention_variant(rng, index, dtype, output)
        else:
            cases += _conv_variant(rng, index, family, dtype, layout)
        index += 1
    for dtype in DTYPES:
        layers = im2win_layer_cases(batch=2, dtype=dtype)
        cases += [dataclasses.replace(case, pick="kernel") for case in layers]
    combos3d = [(dtype, layout) for dtype in DTYPES for layout in ("nchw", "nhwc")]
    for nth, (dtype, layout) in enumerate(combos3d):  # 3-D convs (video)
        cases += _conv3d_variant(rng, index + nth, dtype, layout, nth)
    index += len(combos3d)
    for nth, (dtype, layout) in enumerate(combos3d):  # their gradients' kernels, in turn
        op = ("conv_transpose", "conv_wgrad")[nth % 2]
        cases += _conv3d_grad_variant(rng, index + nth, dtype, layout, op)
    return cases


# ---- parts b and e: layers ------------------------------------------------------------------
def im2win_layer_cases(batch: int, dtype: str) -> list[ConvCase]:
    return [
        ConvCase(
            id=f"{layer['name']} b{batch} {dtype}",
            variant=f"{layer['name']} {dtype}",
            batch=batch,
            in_channels=layer["C"],
            out_channels=layer["K"],
            size=(layer["H"], layer["W"]),
            kernel=(layer["kernel"],) * 2,
            stride=(layer["stride"],) * 2,
            padding=(layer["padding"],) * 2,
            dtype=dtype,
        )
        for layer in load_layers()
    ]


def resnet50_conv_shapes() -> list[dict]:
    """ResNet-50's distinct convolutions at 224 x 224 (read from the torchvision model on
    the meta device: nothing is computed)."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50()
    seen: dict[tuple, dict] = {}

    def hook(module, inputs, _output):
        _, c, h, w = inputs[0].shape
        shape = dict(
            C=c,
            H=h,
            W=w,
            K=module.out_channels,
            kernel=module.kernel_size[0],
            stride=module.stride[0],
            padding=module.padding[0],
        )
        seen.setdefault(tuple(shape.values()), shape)

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    return list(seen.values())


def resnet50_layer_cases(batch: int, dtype: str) -> list[ConvCase]:
    return [
        ConvCase(
            id=f"r50.{i:02d} {s['C']}x{s['H']}->{s['K']} {s['kernel']}x{s['kernel']}"
            f"/{s['stride']} b{batch} {dtype}",
            variant=f"r50.{i:02d} {dtype}",
            batch=batch,
            in_channels=s["C"],
            out_channels=s["K"],
            size=(s["H"], s["W"]),
            kernel=(s["kernel"],) * 2,
            stride=(s["stride"],) * 2,
            padding=(s["padding"],) * 2,
            dtype=dtype,
        )
        for i, s in enumerate(resnet50_conv_shapes())
    ]


def backward_cases(layers: list[ConvCase]) -> list[ConvCase]:
    """The two gradients of each layer: grad_weight (`wgrad`), and grad_input (`dgrad`, a
    transposed conv of dy; not for a stem, whose input, the image, needs none)."""
    cases = []
    for forward in layers:
        name = forward.id.split(" b")[0]
        cases.append(dataclasses.replace(
            forward, id=f"{name} wgrad{forward.id[len(name):]}",
            variant=f"{forward.variant} wgrad", op="conv_wgrad",
        ))  # fmt: skip
        if forward.in_channels == 3:
            continue
        out = out_size(forward)
        output_padding = tuple(
            s + 2 * p - (k - 1) - 1 - (o - 1) * st
            for s, p, k, o, st in zip(forward.size, forward.padding, forward.kernel, out,
                                      forward.stride)
        )  # fmt: skip
        cases.append(dataclasses.replace(
            forward, id=f"{name} dgrad{forward.id[len(name):]}",
            variant=f"{forward.variant} dgrad", op="conv_transpose",
            in_channels=forward.out_channels, out_channels=forward.in_channels, size=out,
            output_padding=output_padding,
        ))  # fmt: skip
    return cases


def resnet50_backward_cases(batch: int, dtype: str) -> list[ConvCase]:
    """The two gradients of ResNet-50's distinct convs (see backward_cases)."""
    return backward_cases(resnet50_layer_cases(batch, dtype))


def r3d_18_conv_shapes() -> list[dict]:
    """torchvision r3d_18's distinct 3-D convolutions on a 16 x 112 x 112 clip (read on the
    meta device), each its (C, D, H, W, K, kernel, stride, padding) triples."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.video.r3d_18()
    seen: dict[tuple, dict] = {}

    def hook(module, inputs, _output):
        _, c, *size = inputs[0].shape
        shape = dict(C=c, size=tuple(size), K=module.out_channels, kernel=module.kernel_size,
                     stride=module.stride, padding=module.padding)  # fmt: skip
        seen.setdefault(tuple(map(str, shape.values())), shape)

    for m in model.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.empty(1, 3, 16, 112, 112, device="meta"))
    return list(seen.values())


def r3d_18_layer_cases(batch: int, dtype: str) -> list[ConvCase]:
    return [
        ConvCase(
            id=f"r3d.{i:02d} {s['C']}x{'x'.join(map(str, s['size']))}->{s['K']} "
            f"{'x'.join(map(str, s['kernel']))}/{'x'.join(map(str, s['stride']))} b{batch} "
            f"{dtype}",
            variant=f"r3d.{i:02d} {dtype}", batch=batch, in_channels=s["C"],
            out_channels=s["K"], size=s["size"], kernel=s["kernel"], stride=s["stride"],
            padding=s["padding"], dilation=(1, 1, 1), dtype=dtype,
        )  # fmt: skip
        for i, s in enumerate(r3d_18_conv_shapes())
    ]


def layer_cases(
    batches=(1, 32), dtypes=("float16", "float32"), backward: bool = True
) -> list[ConvCase]:
    """Parts b and e: the 12 im2win layers and ResNet-50's distinct convs; with `backward`
    (part b), then ResNet-50's gradients at batch 32 in float16, and r3d_18's distinct 3-D
    convs on 8 clips of 16 x 112 x 112 in float16, then their gradients."""
    forward = [
        case
        for dtype in dtypes
        for batch in batches
        for case in im2win_layer_cases(batch, dtype) + resnet50_layer_cases(batch, dtype)
    ]
    if not backward:
        return forward
    clips = r3d_18_layer_cases(8, "float16")
    return forward + resnet50_backward_cases(32, "float16") + clips + backward_cases(clips)


# ---- resolving a case: spec + schedule -------------------------------------------------------
def conv_case_spec(case: ConvCase) -> ConvSpec:
    """The spec the backend builds for this conv on a GPU (built from CPU shapes)."""
    x, w, b = case.tensors()
    spec = conv_spec_of(
        x, w, b, case.stride, case.padding, case.dilation, case.groups, case.epilogue,
        transposed=case.op == "conv_transpose", output_padding=case.output_padding,
    )  # fmt: skip
    op = "conv_wgrad" if case.op == "conv_wgrad" else spec.op
    prologue, sizes = case.prologue, {}
    if prologue.dw:  # x is the depthwise conv's input: the 1x1 conv reads its output
        prologue = dataclasses.replace(
            prologue, dw=dataclasses.replace(prologue.dw, image=case.size))
        size = prologue.dw.out_size(*case.size)
        sizes = dict(in_size=size, out_size=size)
    if case.windows:  # the image's window tokens: N windows of 1 x WH*WW
        (wh, ww), (h, w) = case.windows.size, case.size
        tokens = (1, wh * ww)
        sizes = dict(in_size=tokens, out_size=tokens, batch=case.batch * (h // wh) * (w // ww),
                     windows=case.windows)  # fmt: skip
    if case.out_windows:
        sizes = dict(out_windows=case.out_windows, output_layout="nhwc")
    if case.padding_mode != "zeros":  # the layout of eager's conv of F.pad's copy (circular
        # and 3-D pads write it contiguous whatever x's layout; 2-D reflect keeps it)
        sizes = dict(output_layout=_padded_conv_layout(case, x, w))
    return dataclasses.replace(
        spec, device="cuda", op=op, input_mask=case.masked, padding_mode=case.padding_mode,
        prologue=prologue, input_scale=case.input_scale, pool_sums=case.pool_sums, **sizes,
    )  # fmt: skip


def _padded_conv_layout(case: ConvCase, x: torch.Tensor, w: torch.Tensor) -> str:
    """The layout eager's conv of F.pad(x, mode) has on the device that runs the case (the
    pads keep or drop channels-last by device and mode; meta tensors do not tell)."""
    from ..passes.meta import memory_layout

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pads = [p for p in reversed(case.padding) for _ in (0, 1)]
    with torch.no_grad():
        padded = torch.nn.functional.pad(x.to(device), pads, mode=case.padding_mode)
        y = torch.ops.aten.convolution(padded, w.to(device), None, list(case.stride),
                                       [0] * len(case.size), list(case.dilation), False,
                                       [0] * len(case.size), case.groups)  # fmt: skip
    return memory_layout(y)


def attention_case_spec(case: AttentionCase) -> AttentionSpec:
    q = torch.empty(
        case.batch, case.heads, case.tokens, case.head_dim, dtype=getattr(torch, case.dtype)
    )
    n = case.tokens
    bias = torch.empty(case.heads, n, n, dtype=q.dtype) if case.bias else None
    mask = torch.empty(case.windows, n, n, dtype=q.dtype) if case.mask else None
    spec = attention_spec_of(q, q, q, bias, mask, output=case.output)
    return dataclasses.replace(spec, device="cuda")


def plan(case, device: Device, top: int = 1) -> tuple[ConvSpec | AttentionSpec, list[Schedule]]:
    """The spec and schedule(s) of a case on `device`: the first `top` of the model's
    ranking for a conv case without family (ATen included), else the family's pick."""
    if isinstance(case, AttentionCase):
        spec = attention_case_spec(case)
        return spec, [_select(spec, device).schedule]
    spec = conv_case_spec(case)
    if case.family is None and case.pick == "kernel":  # the best generated kernel, not ATen
        return spec, [
            rank(spec, model_candidates(spec, device, include_aten=False), device)[0].schedule
        ]
    if case.family is None:
        if top == 1:
            return spec, [_select(spec, device).schedule]
        ranked = rank(spec, model_candidates(spec, device, include_aten=True), device)
        return spec, [p.schedule for p in ranked[:top]]
    name, _, reduction = case.family.partition(":")
    fixed = {"REDUCTION": reduction} if reduction else {}
    options = [
        s
        for s in model_candidates(spec, device, include_aten=False)
        if s.name == name and all(s.get(k) == v for k, v in fixed.items())
    ]
    if not options:
        raise ValueError(f"{case.id}: no {case.family} schedule can run {spec.describe()}")
    if case.pick == "random":
        return spec, [random.Random(case.variant).choice(options)]
    if case.plan_sizes is not None:  # one pick per variant: its cases share a kernel
        batch, k, h, w = case.plan_sizes
        at = dataclasses.replace(case, batch=batch, out_channels=k, size=(h, w), plan_sizes=None)
        pick = rank(conv_case_spec(at), options, device)[0].schedule
        try:
            return spec, [SPACES[pick.name].make(spec, device=device, **pick.as_dict())]
        except InvalidSchedule:
            pass
    return spec, [rank(spec, options, device)[0].schedule]


def _select(spec, device: Device):
    return select_schedule(spec, SelectionContext(Config(cache=False), device, "planned"))


def kernel_schedules(schedules: list[Schedule]) -> list[Schedule]:
    return [s for s in schedules if s != ATEN]
