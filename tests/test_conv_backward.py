"""The conv backward as generated kernels: grad_input through the transposed (or forward)
conv kernel, grad_weight through `wgrad_splitk` (passes/conv_backward.py).

Each case runs a training step compiled with backend="im2win" and compares every gradient
with float64 eager; the report must show the backward regions ran generated kernels, and the
profiler must see no `aten::convolution_backward` in the compiled backward.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import FAST, GRADIENTS, assert_close, float64_copy, rel_error

import convcompiler
from convcompiler.frontend.backend import ATEN_HOST_RANGE


def backward_regions(report) -> list:
    return [r for r in report if r.stage == "backward" and r.mode in GRADIENTS]


# the profiler's ranges around a compiled graph's run: Inductor's, and the ATen host's
RUN = ("## Call CompiledFxGraph", ATEN_HOST_RANGE)


def _run_ops(prof) -> set[str]:
    """The ops the profiler saw while a compiled graph ran (not while it was compiled: the
    compile's fake-tensor runs call every op of the graph, convolution_backward included)."""
    names = set()
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(RUN):
            parent = parent.cpu_parent
        if parent is not None:
            names.add(event.name)
    return names


def train_step(model: nn.Module, x: torch.Tensor, *, lr: float = 0.1, host: str = "inductor"):
    """One SGD step, compiled, in float32 eager and in float64 eager; returns (float32
    eager copy, float64 eager copy, the ops the profiler saw run in the compiled backward)."""
    eager, reference = float64_copy(model).float(), float64_copy(model)
    compiled = torch.compile(model, backend="im2win", options={**FAST, "host": host})
    gen = torch.Generator().manual_seed(0)
    out = compiled(x)
    grad = torch.randn(out.shape, generator=gen)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(grad)
    eager(x).backward(grad)
    reference(x.double()).backward(grad.double())
    for m in (model, eager, reference):
        torch.optim.SGD(m.parameters(), lr=lr).step()
    ops = _run_ops(prof)
    assert any(name.startswith("im2win::") for name in ops), sorted(ops)[:20]
    return eager, reference, ops


def assert_params_match(model: nn.Module, eager: nn.Module, reference: nn.Module) -> None:
    """Gradients and updated parameters within max(1e-4, 2x float32 eager's error) of
    float64 eager (a deep net's first-layer gradient carries eager's own rounding)."""
    pairs = zip(model.named_parameters(), eager.parameters(), reference.parameters())
    for (name, p), e, q in pairs:
        for what, ours, theirs, ref in (
            ("grad", p.grad, e.grad, q.grad),
            ("value after the step", p.detach(), e.detach(), q.detach()),
        ):
            err, eager_err = rel_error(ours, ref), rel_error(theirs, ref)
            assert err <= max(1e-4, 2 * eager_err), f"{what} of {name}: {err:.3g} ({eager_err:.3g})"


class Mixed(nn.Module):
    """Strides, padding, dilation, groups, a 1-D conv and a transposed conv, every gradient
    needed except the first layer's input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=3, bias=False)
        self.dw = nn.Conv2d(6, 6, 5, padding=2, groups=6)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.c1d = nn.Conv1d(4, 3, 3, stride=2)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y))
        y = self.up(self.dw(y) + y)
        return self.c1d(y.mean(2))


def test_every_gradient_runs_generated_kernels() -> None:
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(2, 3, 11, 13)
    eager, reference, ops = train_step(model, x)
    assert_params_match(model, eager, reference)
    report = convcompiler.last_report()
    grads = backward_regions(report)
    modes = sorted(r.mode for r in grads)
    # grad_input of every layer but the first (x needs none), grad_weight of all five
    assert modes == ["grad_input"] * 4 + ["grad_weight"] * 5, str(report)
    assert all(r.fallback_reason is None and r.kernel_path for r in grads), str(report)
    assert convcompiler.counters["launch.conv_wgrad"] == 5
    assert "aten::convolution_backward" not in ops


def test_grad_input_only_when_weights_are_frozen() -> None:
    torch.manual_seed(1)
    model = Mixed()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 11, 13, requires_grad=True)
    compiled = torch.compile(model, backend="im2win", options=FAST)
    compiled(x).square().sum().backward()
    xr = x.detach().double().requires_grad_()
    float64_copy(model)(xr).square().sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, "grad of x")
    grads = backward_regions(convcompiler.last_report())
    assert {r.mode for r in grads} == {"grad_input"} and len(grads) == 5
    assert convcompiler.counters["launch.conv_wgrad"] == 0


# resnet18's step runs in Inductor's graph (the default host); resnet50's, the same kernels
# 53 times over, on the ATen host: its forward and backward graphs would cost about a minute
# of cold C++ compiling on a new CI machine, for host code resnet18 already covers
@pytest.mark.slow
@pytest.mark.parametrize("name,host", [("resnet18", "inductor"), ("resnet50", "aten")])
def test_resnet_sgd_step_matches_float64(name: str, host: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    eager, reference, ops = train_step(model, x, lr=0.01, host=host)
    assert_params_match(model, eager, reference)
    assert "aten::convolution_backward" not in ops
    grads = backward_regions(convcompiler.last_report())
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert sum(r.mode == "grad_weight" for r in grads) == convs
    assert sum(r.mode == "grad_input" for r in grads) == convs - 1  # not the image's
    assert all(r.fallback_reason is None for r in grads)
    assert convcompiler.counters["launch.conv_wgrad"] == convs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_gradients_accumulate_in_fp32(dtype) -> None:
    """fp16/bf16 weights and activations: every gradient within 2x of eager's own error
    (against float64), or the dtype's tolerance."""
    torch.manual_seed(2)
    model = Mixed().to(dtype)
    x = torch.randn(2, 3, 11, 13).to(dtype)
    eager, reference = float64_copy(model).to(dtype), float64_copy(model)
    out = torch.compile(model, backend="im2win", options=FAST)(x)
    grad = torch.randn(out.shape).to(dtype)
    out.backward(grad)
    eager(x).backward(grad)
    reference(x.double()).backward(grad.double())
    pairs = zip(model.named_parameters(), eager.parameters(), reference.parameters())
    for (name, p), e, q in pairs:
        assert p.grad.dtype == dtype
        err, eager_err = rel_error(p.grad, q.grad), rel_error(e.grad, q.grad)
        assert err <= max(1e-2, 2 * eager_err), f"grad of {name}: {err:.3g} ({eager_err:.3g})"
    grads = backward_regions(convcompiler.last_report())
    assert len(grads) == 9 and all(r.fallback_reason is None for r in grads)


def test_strided_gradient_nan_and_dynamic_batch() -> None:
    """A gradient that reaches the conv through a transpose, NaN in the input, and a batch
    that changes under dynamic=True (one compile, then an empty batch)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 5, 3, stride=2, padding=1)
    reference = float64_copy(conv)
    compiled = torch.compile(
        lambda x: conv(x).transpose(2, 3), backend="im2win", options=FAST, dynamic=True
    )
    for n in (2, 3):
        x = torch.randn(n, 4, 9, 7, requires_grad=True)
        with torch.no_grad():
            x[0, 1, 2, 3] = float("nan")
        y = compiled(x)
        grad = torch.randn(y.shape)
        y.backward(grad)
        xr = x.detach().double().requires_grad_()
        reference(xr).transpose(2, 3).backward(grad.double())
        assert torch.equal(torch.isnan(x.grad), torch.isnan(xr.grad))
        ok = ~torch.isnan(xr.grad)
        assert_close(x.grad[ok], xr.grad[ok], torch.float32, f"grad of x, batch {n}")
        for name, p in conv.named_parameters():
            q = dict(reference.named_parameters())[name]
            assert torch.equal(torch.isnan(p.grad), torch.isnan(q.grad)), name
        conv.zero_grad()
        reference.zero_grad()
    grads = backward_regions(convcompiler.last_report())
    assert {r.mode for r in grads} == {"grad_input", "grad_weight"}
    assert all(r.fallback_reason is None for r in grads), grads
    empty = compiled(torch.randn(0, 4, 9, 7, requires_grad=True))
    empty.sum().backward()
    assert torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))


# ---- the weight-gradient kernel alone: every lane's address, odd sizes, splits -----------
WGRAD_CASES = {
    # name: (x shape, weight shape, stride, padding, dilation, groups, channels_last, SPLIT)
    "pad1_3x3": ((2, 5, 7, 9), (6, 5, 3, 3), 1, 1, 1, 1, False, 1),
    "s21_p10_d12_g3_split2": ((2, 6, 9, 8), (9, 2, 3, 2), (2, 1), (1, 0), (1, 2), 3, False, 2),
    "depthwise_s2_split2": ((1, 4, 13, 12), (4, 1, 3, 3), 2, 1, 1, 4, True, 2),
    "pointwise_nhwc": ((2, 8, 6, 7), (5, 8, 1, 1), 1, 0, 1, 1, True, 1),
    "conv1d": ((2, 5, 13), (4, 5, 3), 1, 1, 1, 1, False, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(WGRAD_CASES))
def test_wgrad_kernel_addresses_and_numerics(name: str, dtype) -> None:
    from address_check import address_check

    from convcompiler.codegen import SPACES
    from convcompiler.config import Config
    from convcompiler.frontend.kernels import choose, conv_spec_of, wgrad_kernel

    xs, ws, stride, padding, dilation, groups, nhwc, split = WGRAD_CASES[name]
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(xs, generator=gen).to(dtype), torch.randn(ws, generator=gen).to(dtype)
    if nhwc:
        x = x.to(memory_format=torch.channels_last)
    args = (stride, padding, dilation, groups)
    spec = dataclasses.replace(conv_spec_of(x, w, None, *args), op="conv_wgrad")
    params = choose(spec, Config(cache=False, schedule="wgrad_splitk")).schedule.as_dict()
    params.update(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=split)  # partial tiles everywhere
    call = wgrad_kernel(x, w, *args, schedule=SPACES["wgrad_splitk"].make(spec, **params))
    conv = torch.nn.functional.conv2d if x.dim() == 4 else torch.nn.functional.conv1d
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    y = conv(xr, wr, None, *args)
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(dy.double())
    with address_check() as check:
        dw = call(dy, x)
    assert check.accesses > 0
    assert dw.shape == w.shape and dw.dtype == dtype and dw.stride() == w.stride()
    assert_close(dw, wr.grad, dtype, call.path.name)


# ---- a ReLU's backward, where(mask, 0, g), read by the gradient kernels (passes/grad_mask.py)
class ReluNet(nn.Module):
    """conv -> ReLU -> strided conv -> clamp -> 1x1 conv -> ReLU6 -> conv: every mask folds,
    in each of the forms the activations' backwards take (passes/grad_mask.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False)
        self.c3 = nn.Conv2d(6, 5, 1)
        self.c4 = nn.Conv2d(5, 4, 3)

    def forward(self, x):
        y = torch.clamp(self.c2(torch.relu(self.c1(x))), 0, 6)
        return self.c4(nn.functional.relu6(self.c3(y)))


# which layers' gradients read a mask, where that saves bytes (passes/grad_mask.py, BYTES):
# under Inductor in float32 all three; on the ATen host the bias sums keep c1's and c3's
# masked copies (nothing to save); in bfloat16 a mask costs as much as c1's and c3's copies
MASKED_LAYERS = {
    ("inductor", torch.float32): {"c1": ("grad_weight",), "c2": GRADIENTS, "c3": GRADIENTS},
    ("aten", torch.float32): {"c2": GRADIENTS},
    ("inductor", torch.bfloat16): {"c2": GRADIENTS},
}


@pytest.mark.parametrize("host,dtype", sorted(MASKED_LAYERS, key=str), ids=str)
def test_relu_masks_fold_into_the_gradient_kernels(tmp_path, host: str, dtype) -> None:
    from helpers import TOL, lowered_ops

    torch.manual_seed(4)
    model = ReluNet().to(dtype)
    eager, reference = float64_copy(model).to(dtype), float64_copy(model)
    options = {**FAST, "debug_dir": tmp_path, "host": host}
    compiled = torch.compile(model, backend="im2win", options=options)
    x = torch.randn(2, 3, 11, 13).to(dtype)
    out = compiled(x)
    grad = torch.randn(out.shape).to(dtype)
    grad[0, 0, 0, 0] = float("nan")  # masked or not, as eager: NaN only where it flows
    out.backward(grad)
    eager(x).backward(grad)
    reference(x.double()).backward(grad.double())
    for (name, p), e, q in zip(model.named_parameters(), eager.parameters(), reference.parameters()):
        assert torch.equal(torch.isnan(p.grad), torch.isnan(q.grad)), name
        ok = ~torch.isnan(q.grad)
        if ok.any():  # the NaN reaches every element of some gradients
            err = rel_error(p.grad[ok], q.grad[ok])
            assert err <= max(TOL[dtype], 2 * rel_error(e.grad[ok], q.grad[ok])), name
    grads = backward_regions(convcompiler.last_report())
    assert all(r.fallback_reason is None and r.kernel_path for r in grads), str(grads)
    # which convs' gradients read a mask, the layer named by its forward conv's shapes (an
    # input gradient's spec is the transposed conv's, "[dy] -> [x]")
    layers = {("[2,3,11,13]", "[2,8,11,13]"): "c1", ("[2,8,11,13]", "[2,6,6,7]"): "c2",
              ("[2,6,6,7]", "[2,5,6,7]"): "c3", ("[2,5,6,7]", "[2,4,4,5]"): "c4"}
    masked = set()
    for r in grads:
        src, _, dst = r.spec.split()[:3]
        forward = (dst, src) if r.mode == "grad_input" else (src, dst)
        if "masked" in r.spec:
            masked.add((layers[forward], r.mode))
    expected = {(n, m) for n, modes in MASKED_LAYERS[host, dtype].items() for m in modes}
    assert masked == expected
    assert convcompiler.counters["fuse.grad_mask"] == len(expected)
    if host == "inductor" and dtype == torch.float32:  # c1's and c3's, read by their bias sums
        assert lowered_ops(tmp_path, "backward")["where"] == 2  # only (fused there)


def test_a_mask_another_reader_needs_stays_a_where() -> None:
    """A transposed conv's input gradient is a forward conv, which reads no mask: the where
    before it stays, and the weight-gradient region reads it as it is (nothing is saved)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.ConvTranspose2d(4, 5, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(5, 3, 3))
    x = torch.randn(2, 4, 6, 7)
    eager, reference, _ = train_step(model, x)
    assert_params_match(model, eager, reference)
    grads = backward_regions(convcompiler.last_report())
    assert not any("masked" in r.spec for r in grads) and len(grads) == 3, str(grads)
    assert convcompiler.counters["fuse.grad_mask"] == 0


def _strided_mask(shape, gen) -> torch.Tensor:
    """A bool mask whose strides differ from the gradient's (every other column of a wider one)."""
    wide = torch.rand((*shape[:-1], 2 * shape[-1]), generator=gen) < 0.5
    return wide[..., ::2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["pad1_3x3", "s21_p10_d12_g3_split2", "conv1d"])
def test_masked_gradient_kernels_addresses_and_numerics(name: str, dtype) -> None:
    """Both gradient kernels of a conv, reading dy as (g, mask) with a strided mask and a NaN
    in a masked place of g, against float64 eager on where(mask, 0, g)."""
    from address_check import address_check

    from convcompiler.codegen import SPACES
    from convcompiler.config import Config
    from convcompiler.frontend.kernels import choose, conv_kernel, conv_spec_of, wgrad_kernel

    xs, ws, stride, padding, dilation, groups, nhwc, split = WGRAD_CASES[name]
    gen = torch.Generator().manual_seed(8)
    x, w = torch.randn(xs, generator=gen).to(dtype), torch.randn(ws, generator=gen).to(dtype)
    args = (stride, padding, dilation, groups)
    conv = torch.nn.functional.conv2d if x.dim() == 4 else torch.nn.functional.conv1d
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    y = conv(xr, wr, None, *args)
    g = torch.randn(y.shape, generator=gen).to(dtype)
    mask = _strided_mask(y.shape, gen)
    first = mask.flatten().nonzero()[0, 0]
    g.view(-1)[first] = float("nan")  # masked: must come out as 0
    y.backward(g.double().masked_fill(mask, 0))

    spec = dataclasses.replace(conv_spec_of(x, w, None, *args), op="conv_wgrad", input_mask=True)
    params = choose(spec, Config(cache=False, schedule="wgrad_splitk")).schedule.as_dict()
    params.update(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=split)
    wgrad = wgrad_kernel(x, w, *args, schedule=SPACES["wgrad_splitk"].make(spec, **params),
                         masked=True)
    # the input gradient: the transposed conv of dy, back to x's size
    extra = [int(a - ((b - 1) * s - 2 * p + d * (k - 1) + 1)) for a, b, s, p, d, k in zip(
        x.shape[2:], y.shape[2:], *(_pairs(v, x.dim() - 2) for v in args[:3]), w.shape[2:])]
    dgrad = conv_kernel(g, w, None, *args, transposed=True, output_padding=extra,
                        schedule="transposed_phase", masked=True)
    with address_check() as check:
        dw = wgrad(g, x, mask)
        dx = dgrad(g, w, None, None, None, None, None, None, mask)
    assert check.accesses > 0 and len(check.kernels) == 2
    assert_close(dw, wr.grad, dtype, wgrad.path.name)
    assert_close(dx, xr.grad, dtype, dgrad.path.name)


def _pairs(v, n: int) -> list[int]:
    return list(v) if isinstance(v, tuple) else [v] * n


def test_a_weight_gradient_of_a_padding_mode_pad_falls_back_with_the_reason() -> None:
    """A backward graph whose conv input is an F.pad (the partitioner may recompute it): the
    weight-gradient kernel reads x as given, so the pad a forward conv would read in place
    leaves the region to ATen, with the reason, and the compile goes on."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from convcompiler.config import Config
    from convcompiler.passes.context import PassContext
    from convcompiler.passes.conv_backward import split_conv_backward

    def grad_weight(dy, x, w):
        xp = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        return torch.ops.aten.convolution_backward(
            dy, xp, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False])[1]

    dy, x, w = torch.randn(1, 4, 5, 6), torch.randn(1, 3, 5, 6), torch.randn(4, 3, 3, 3)
    gm = make_fx(grad_weight, tracing_mode="fake")(dy, x, w)
    ctx = PassContext(config=Config(cpu="interpret"), stage="backward")
    split_conv_backward(gm, ctx)
    [region] = ctx.regions
    assert region.kind == "conv_wgrad" and region.spec is None, region
    assert "F.pad" in region.fallback_reason, region.fallback_reason
    torch.testing.assert_close(gm(dy, x, w), grad_weight(dy, x, w))
