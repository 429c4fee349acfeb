"""Transposed convolutions (conv_transpose1d/2d) as generated kernels (`transposed_phase`).

Every case runs through Triton's interpreter under the address check (no lane, masked or
not, forms an address outside its tensor) and is compared with float64 eager. The sweep
draws strides, paddings, output paddings, dilations, groups, layouts, dtypes and the tiles,
so phases with no live tap, partial tiles and phases smaller than the grid all occur.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from address_check import address_check
from helpers import assert_close, check_model, fake_output, float64_copy, run_compiled

import convcompiler
from convcompiler.codegen import SPACES
from convcompiler.config import Config
from convcompiler.frontend.kernels import choose, conv_kernel, conv_spec_of
from convcompiler.schedule import InvalidSchedule
from convcompiler.spec import Activation, Epilogue

SWEEP_SIZE = 40
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d}


def random_case(rng: random.Random) -> dict:
    ndim = rng.choice((1, 2, 2))
    groups = rng.choice((1, 1, 2, 3))
    cg, kg = rng.randint(1, 6), rng.randint(1, 6)
    if rng.random() < 0.15:  # depthwise-transposed: one input channel per group
        groups, cg, kg = rng.randint(2, 6), 1, rng.choice((1, 2))
    kh, kw = rng.choice((1, 2, 3, 4, 5)), rng.choice((1, 2, 3, 4, 5))
    sh, sw = rng.randint(1, 3), rng.randint(1, 3)
    dh, dw = rng.randint(1, 2), rng.randint(1, 2)
    ph, pw = rng.randint(0, (kh - 1) * dh), rng.randint(0, (kw - 1) * dw)
    # output padding must be smaller than the stride or the dilation
    oph, opw = rng.randint(0, max(sh, dh) - 1), rng.randint(0, max(sw, dw) - 1)
    if ndim == 1:
        kh, sh, dh, ph, oph = 1, 1, 1, 0, 0
    h = rng.randint(1, 7) if ndim == 2 else 1
    w = rng.randint(1, 8)
    # at least one output row and column: HO = (H-1)*SH - 2*PH + DH*(KH-1) + OPH + 1
    ph = min(ph, ((h - 1) * sh + dh * (kh - 1) + oph) // 2)
    pw = min(pw, ((w - 1) * sw + dw * (kw - 1) + opw) // 2)
    return dict(
        ndim=ndim, n=rng.randint(1, 2), c=cg * groups, k=kg * groups, h=h, w=w,
        kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw), output_padding=(oph, opw),
        dilation=(dh, dw), groups=groups,
        dtype=rng.choice((torch.float32, torch.float32, torch.float16, torch.bfloat16)),
        channels_last=ndim == 2 and rng.random() < 0.3, bias=rng.random() < 0.6,
    )


def make(case: dict, seed: int):
    gen = torch.Generator().manual_seed(seed)
    dtype, groups = case["dtype"], case["groups"]
    wshape = (case["c"], case["k"] // groups, *case["kernel"])
    x = torch.randn(case["n"], case["c"], case["h"], case["w"], generator=gen)
    w = torch.randn(wshape, generator=gen)
    args = tuple(case[k] for k in ("stride", "padding", "output_padding", "dilation"))
    if case["ndim"] == 1:
        x, w = x.squeeze(2), w.squeeze(2)
        args = tuple(a[1] for a in args)
    b = torch.randn(case["k"], generator=gen).to(dtype) if case["bias"] else None
    x, w = x.to(dtype), w.to(dtype)
    if case["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    return x, w, b, args


def random_schedule(spec, rng: random.Random):
    base = choose(spec, Config(cache=False, schedule="transposed_phase")).schedule.as_dict()
    for _ in range(50):
        params = dict(base)
        params.update(
            BLOCK_M=rng.choice((16, 32)), BLOCK_N=rng.choice((16, 32)), BLOCK_K=rng.choice((16, 32))
        )
        try:
            return SPACES["transposed_phase"].make(spec, **params)
        except InvalidSchedule:
            continue
    raise AssertionError(f"no valid random schedule for {spec.describe()}")


def run_case(x, w, b, args, groups, schedule=None, epilogue=Epilogue(), extra=()):
    stride, padding, output_padding, dilation = args
    fn = CONV_T[x.dim() - 2]
    call = conv_kernel(
        x, w, b, stride, padding, dilation, groups, schedule=schedule, epilogue=epilogue,
        transposed=True, output_padding=output_padding,
    )
    convcompiler.counters.reset()
    with address_check() as check:
        y = call(x, w, b, *extra)
    assert convcompiler.counters["launch.conv"] == 1 and check.accesses > 0
    expected = fake_output(lambda x, w, b: fn(x, w, b, stride, padding, output_padding, groups,
                                               dilation), x, w, b)
    assert y.shape == expected.shape and y.stride() == expected.stride(), call.path.name
    return y, call


@pytest.mark.parametrize("index", range(SWEEP_SIZE))
def test_random_transposed_conv(index: int) -> None:
    rng = random.Random(1000 + index)
    case = random_case(rng)
    x, w, b, args = make(case, index)
    spec = conv_spec_of(x, w, b, args[0], args[1], args[3], case["groups"], transposed=True,
                        output_padding=args[2])
    y, call = run_case(x, w, b, args, case["groups"], random_schedule(spec, rng))
    stride, padding, output_padding, dilation = args
    ref = CONV_T[x.dim() - 2](x.double(), w.double(), None if b is None else b.double(), stride,
                              padding, output_padding, case["groups"], dilation)
    assert_close(y, ref, x.dtype, f"{call.path.name} {case}")


def test_epilogue_and_edges_match_eager() -> None:
    """Batch norm, activations and a residual fused; NaN and Inf propagate as eager's; a
    strided (non-contiguous) weight is read through its strides."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 5, 4, generator=gen)
    x[0, 1, 2, 3], x[1, 4, 0, 0] = float("nan"), float("inf")
    w = torch.randn(4, 6, 3, 3, generator=gen).transpose(0, 1)  # [6, 4, 3, 3], not contiguous
    b = torch.randn(4, generator=gen)
    mean, var = torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 0.5
    gamma, beta = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    epilogue = Epilogue(bn="affine", act=Activation("relu"), residual=True)
    args = ((2, 2), (1, 1), (1, 0), (1, 1))
    y_ref = F.conv_transpose2d(x.double(), w.double(), b.double(), 2, 1, (1, 0), 1, 1)
    r = torch.randn(y_ref.shape, generator=gen)
    ref = torch.relu(F.batch_norm(y_ref, mean.double(), var.double(), gamma.double(),
                                  beta.double(), False, 0.0, 1e-5)) + r.double()
    y, _ = run_case(x, w, b, args, 1, epilogue=epilogue, extra=(gamma, beta, mean, var, r))
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y).any()
    finite = torch.isfinite(ref)
    assert_close(y[finite], ref[finite], torch.float32)


def test_wrong_inputs_are_rejected_with_a_message() -> None:
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 3, 3, 3)
    call = conv_kernel(x, w, None, 2, 1, transposed=True, output_padding=1)
    with pytest.raises(ValueError, match="do not fit"):
        call(torch.randn(1, 5, 5, 5), torch.randn(5, 3, 2, 2))
    with pytest.raises(TypeError, match="built for torch.float32"):
        call(x.half(), w.half())


class Decoder(nn.Module):
    """A segmentation-style decoder: two upsampling transposed convs (one fused with BN and
    ReLU, one channels_last and grouped), a 1-D transposed conv and a plain conv."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.up2 = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.head = nn.Conv2d(4, 3, 3, padding=1)
        self.up1d = nn.ConvTranspose1d(3, 2, 5, stride=3, padding=2, dilation=2)

    def forward(self, x):
        y = torch.relu(self.bn(self.up1(x)))
        y = self.head(self.up2(y.contiguous(memory_format=torch.channels_last)))
        return self.up1d(y.mean(2))


def test_decoder_runs_generated_transposed_kernels() -> None:
    torch.manual_seed(0)
    model = Decoder().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    report = check_model(model, [torch.randn(2, 8, 5, 6)], expect_kernels=4)
    transposed = [r for r in report.kernels() if "transposed" in r.spec]
    assert [r.schedule for r in transposed] == ["transposed_phase"] * 3, str(report)
    assert convcompiler.counters["codegen.conv_transpose"] == 3
    assert any("+bn+relu" in r.spec for r in transposed)  # eval BN folded into the kernel


def test_dynamic_batch_and_empty_batch() -> None:
    torch.manual_seed(1)
    model = nn.ConvTranspose2d(3, 5, 3, stride=2, padding=1, output_padding=1).eval()
    compiled = torch.compile(model, backend="im2win", dynamic=True)
    ref64 = float64_copy(model)
    with torch.no_grad():
        for n in (2, 3):
            x = torch.randn(n, 3, 4, 5)
            assert_close(compiled(x), ref64(x.double()), torch.float32, f"batch {n}")
        empty = compiled(torch.randn(0, 3, 4, 5))
    assert empty.shape == (0, 5, 8, 10)
    assert convcompiler.counters["launch.conv"] >= 2
    out, report = run_compiled(model, [torch.randn(1, 3, 4, 5)])
    assert report.kernels() and report.kernels()[0].schedule == "transposed_phase"
