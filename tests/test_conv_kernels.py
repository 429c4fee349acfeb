"""Numerics of the generated conv kernels, run through Triton's interpreter.

Every case goes through the backend's own path (fake-tensor spec -> schedule -> rendered
source -> hash-checked module) and is compared with float64 eager. The random sweep also
draws the tile parameters, so masks, partial tiles, both reduction orders and both row
tilings are exercised, not only the rule's defaults.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, fake_output

import convcompiler
from convcompiler.codegen import SPACES
from convcompiler.config import Config
from convcompiler.frontend.kernels import choose, conv_kernel, conv_spec_of
from convcompiler.schedule import InvalidSchedule

SWEEP_SIZE = 240
SCHEDULES = ("im2win_implicit", "im2win_band")
DTYPES = (torch.float32, torch.float32, torch.float16, torch.bfloat16)


def random_case(rng: random.Random) -> dict:
    ndim = rng.choice((1, 2, 2, 2))
    if rng.random() < 0.2:  # depthwise, sometimes with a channel multiplier
        groups, cg, kg = rng.randint(2, 12), 1, rng.choice((1, 1, 2))
    else:
        groups, cg, kg = rng.choice((1, 1, 1, 2, 3)), rng.randint(1, 9), rng.randint(1, 9)
    kh, kw = rng.choice((1, 2, 3, 5, 7, 11)), rng.choice((1, 2, 3, 4, 5, 7, 11))
    sh, sw = rng.randint(1, 4), rng.randint(1, 4)
    dh, dw = rng.randint(1, 3), rng.randint(1, 3)
    ph, pw = rng.randint(0, 3), rng.randint(0, 3)
    if ndim == 1:
        kh, sh, dh, ph = 1, 1, 1, 0
    h = max(1, (kh - 1) * dh + 1 - 2 * ph + rng.randint(0, 12)) if ndim == 2 else 1
    w = max(1, (kw - 1) * dw + 1 - 2 * pw + rng.randint(0, 12))
    return dict(
        ndim=ndim,
        n=rng.randint(1, 3),
        c=cg * groups,
        k=kg * groups,
        h=h,
        w=w,
        kernel=(kh, kw),
        stride=(sh, sw),
        padding=(ph, pw),
        dilation=(dh, dw),
        groups=groups,
        dtype=rng.choice(DTYPES),
        channels_last=ndim == 2 and rng.random() < 0.3,
        bias=rng.random() < 0.6,
    )


def make_tensors(case: dict, seed: int):
    gen = torch.Generator().manual_seed(seed)
    dtype = case["dtype"]
    if case["ndim"] == 2:
        x = torch.randn(case["n"], case["c"], case["h"], case["w"], generator=gen)
        w = torch.randn(case["k"], case["c"] // case["groups"], *case["kernel"], generator=gen)
        args = (case["stride"], case["padding"], case["dilation"])
    else:
        x = torch.randn(case["n"], case["c"], case["w"], generator=gen)
        w = torch.randn(case["k"], case["c"] // case["groups"], case["kernel"][1], generator=gen)
        args = (case["stride"][1], case["padding"][1], case["dilation"][1])
    b = torch.randn(case["k"], generator=gen).to(dtype) if case["bias"] else None
    x, w = x.to(dtype), w.to(dtype)
    if case["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    return x, w, b, args


def schedule_for(spec, index: int) -> str:
    """Cycle through every schedule that can run the spec."""
    names = ["im2win_implicit", "im2win_band"]
    if spec.is_depthwise:
        names.append("direct_depthwise")
    if spec.kernel == (1, 1) and spec.padding == (0, 0):
        names.append("gemm_1x1")
    return names[index % len(names)]


def random_schedule(spec, name: str, rng: random.Random):
    """The model's best parameters for `name`, with the tiles and variants redrawn until valid."""
    base = choose(spec, Config(cache=False, schedule=name)).schedule.as_dict()
    for _ in range(50):
        params = dict(base)
        if name == "direct_depthwise":
            params.update(
                BLOCK_M=rng.choice((16, 32, 64)),
                BLOCK_C=rng.choice((8, 16, 32)),
                M_TILES=rng.choice(("image", "batch")),
            )
            try:
                return SPACES[name].make(spec, **params)
            except InvalidSchedule:
                continue
        params.update(
            BLOCK_M=rng.choice((16, 32, 64)),
            BLOCK_N=rng.choice((16, 32, 64)),
            BLOCK_K=rng.choice((16, 32, 64)),
            M_TILES=rng.choice(("image", "batch")),
        )
        if name == "im2win_implicit":
            params["REDUCTION"] = rng.choice(("tap", "flat"))
        elif name == "im2win_band":
            params.update(FILL_W=rng.choice((16, 32)), FILL_C=rng.choice((1, 4, 16)))
        try:
            return SPACES[name].make(spec, **params)
        except InvalidSchedule:
            continue
    raise AssertionError(f"no valid random {name} schedule for {spec.describe()}")


def run_case(x, w, b, args, groups, schedule):
    conv = F.conv2d if x.dim() == 4 else F.conv1d
    convcompiler.counters.reset()
    call = conv_kernel(x, w, b, *args, groups, schedule=schedule)
    y = call(x, w, b)
    assert convcompiler.counters["launch.conv"] == 1
    ref = conv(x.double(), w.double(), None if b is None else b.double(), *args, groups)
    assert_close(y, ref, x.dtype, f"{call.path.name}")
    expected = fake_output(lambda x, w, b: conv(x, w, b, *args, groups), x, w, b)
    assert y.stride() == expected.stride(), f"strides {y.stride()} != eager's {expected.stride()}"
    return call


@pytest.mark.parametrize("index", range(SWEEP_SIZE))
def test_random_conv(index: int) -> None:
    rng = random.Random(1000 + index)
    case = random_case(rng)
    x, w, b, args = make_tensors(case, seed=index)
    spec = conv_spec_of(x, w, b, *args, case["groups"])
    schedule = random_schedule(spec, schedule_for(spec, index), rng)
    run_case(x, w, b, args, case["groups"], schedule)


NAMED = {
    # name: (x shape, weight shape, stride, padding, dilation, groups, bias, dtype, channels_last)
    "depthwise_3x3": ((2, 12, 15, 13), (12, 1, 3, 3), 1, 1, 1, 12, True, torch.float32, False),
    "depthwise_x2_5x5_s2": ((1, 6, 17, 11), (12, 1, 5, 5), 2, 2, 1, 6, False, torch.float32, False),
    "dilation_2": ((2, 5, 19, 17), (7, 5, 3, 3), 1, 2, 2, 1, True, torch.float32, False),
    "dilation_3_asym": (
        (1, 4, 21, 23),
        (6, 4, 3, 5),
        1,
        (3, 1),
        (3, 2),
        1,
        True,
        torch.float32,
        False,
    ),
    "stride_3": ((2, 3, 25, 19), (8, 3, 5, 5), 3, 1, 1, 1, True, torch.float32, False),
    "stride_4": ((1, 5, 31, 29), (9, 5, 3, 3), 4, 0, 1, 1, False, torch.float32, False),
    "kernel_11x11_s4": ((1, 3, 47, 43), (16, 3, 11, 11), 4, 0, 1, 1, True, torch.float32, False),
    "kernel_7x7_s2": ((2, 3, 29, 23), (16, 3, 7, 7), 2, 3, 1, 1, False, torch.float32, False),
    "pointwise_1x1": ((2, 37, 9, 7), (29, 37, 1, 1), 1, 0, 1, 1, True, torch.float32, False),
    "groups_3": ((2, 9, 11, 13), (15, 3, 3, 3), 1, 1, 1, 3, True, torch.float32, False),
    "channels_last": ((2, 19, 13, 11), (23, 19, 3, 3), 1, 1, 1, 1, True, torch.float32, True),
    "channels_last_dw": ((2, 16, 13, 11), (16, 1, 3, 3), 2, 1, 1, 16, True, torch.float32, True),
    "fp16": ((2, 17, 13, 11), (21, 17, 3, 3), 1, 1, 1, 1, True, torch.float16, False),
    "bf16": ((2, 17, 13, 11), (21, 17, 3, 3), 1, 1, 1, 1, True, torch.bfloat16, False),
    "bf16_channels_last_s2": (
        (2, 24, 15, 9),
        (32, 24, 3, 3),
        2,
        1,
        1,
        1,
        True,
        torch.bfloat16,
        True,
    ),
    "fp16_depthwise": ((1, 8, 12, 10), (8, 1, 3, 3), 1, 1, 1, 8, True, torch.float16, False),
    "h_ne_w": ((1, 4, 5, 33), (6, 4, 3, 3), 1, 1, 1, 1, True, torch.float32, False),
    "conv1d": ((2, 7, 41), (9, 7, 5), 2, 2, 1, 1, True, torch.float32, False),
    "conv1d_dilated_groups": ((3, 6, 37), (6, 2, 3), 1, 3, 3, 3, False, torch.float32, False),
    "conv1d_bf16": ((2, 5, 29), (8, 5, 3), 1, 1, 1, 1, True, torch.bfloat16, False),
    "output_1x1": ((2, 10, 3, 3), (12, 10, 3, 3), 1, 0, 1, 1, True, torch.float32, False),
    "batch_1_odd": ((1, 1, 7, 5), (3, 1, 2, 2), 1, 0, 1, 1, True, torch.float32, False),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_conv(name: str, schedule: str) -> None:
    xs, ws, stride, padding, dilation, groups, bias, dtype, cl = NAMED[name]
    gen = torch.Generator().manual_seed(len(name))
    x = torch.randn(xs, generator=gen).to(dtype)
    w = torch.randn(ws, generator=gen).to(dtype)
    b = torch.randn(ws[0], generator=gen).to(dtype) if bias else None
    if cl:
        x = x.to(memory_format=torch.channels_last)
    call = run_case(x, w, b, (stride, padding, dilation), groups, schedule)
    assert schedule in call.path.name


def test_channels_last_output_matches_eager_fp32() -> None:
    """The memory format is eager's, checked against eager itself (not only fake tensors)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 10, 9, generator=gen).to(memory_format=torch.channels_last)
    w = torch.randn(12, 8, 3, 3, generator=gen)
    for weight in (w, w.to(memory_format=torch.channels_last)):
        y = conv_kernel(x, weight, None, 1, 1)(x, weight, None)
        eager = F.conv2d(x, weight, None, 1, 1)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert y.stride() == eager.stride()
        assert_close(y, F.conv2d(x.double(), weight.double(), None, 1, 1), torch.float32)


def test_wrong_inputs_are_rejected_with_a_message() -> None:
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(6, 4, 3, 3)
    call = conv_kernel(x, w, None, 1, 1)
    with pytest.raises(TypeError, match="float32"):
        call(x.half(), w.half(), None)
    with pytest.raises(ValueError, match="do not fit"):
        call(torch.randn(1, 5, 8, 8), w, None)
    with pytest.raises(ValueError, match="do not fit"):
        call(x, torch.randn(6, 4, 5, 5), None)
    with pytest.raises(ValueError, match="bias"):
        call(x, w, torch.randn(6))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_64_bit_offsets_path(schedule: str) -> None:
    """Tensors over 2**31 elements switch to 64-bit offsets; lower the limit to run that path."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 11, 9, generator=gen)
    w, b = torch.randn(10, 3, 3, 3, generator=gen), torch.randn(10, generator=gen)
    call = conv_kernel(x, w, b, 1, 1, 1, 2, schedule=schedule)
    module = call._launch.__globals__
    old = module["INDEX_LIMIT"]
    module["INDEX_LIMIT"] = 0
    try:
        y = call(x, w, b)
    finally:
        module["INDEX_LIMIT"] = old
    assert_close(y, F.conv2d(x.double(), w.double(), b.double(), 1, 1, 1, 2), torch.float32)
