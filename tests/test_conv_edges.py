"""Conv kernels at eager's edges: strided and broadcast per-channel vectors, padding="valid",
NaN and Inf through every fused activation, zero-size tensors (eager's result or error)."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_close, check_model, float64_copy, run_compiled

import convcompiler
from convcompiler.selection.cache import files_hash

FAST = {"verify": False}  # the static sm_90 check adds nothing to numerics


class Conv(nn.Module):
    """F.conv1d/conv2d on a given weight and bias (any strides), optionally schedule-forced."""

    def __init__(self, weight, bias, **kwargs) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.kwargs = kwargs

    def forward(self, x):
        conv = F.conv2d if x.dim() == 4 else F.conv1d
        return conv(x, self.weight, self.bias, **self.kwargs)


SCHEDULE_CASES = [
    # (schedule, x shape, weight shape, groups)
    ("im2win_implicit", (2, 3, 9, 8), (8, 3, 3, 3), 1),
    ("im2win_band", (2, 3, 9, 8), (8, 3, 3, 3), 1),
    ("gemm_1x1", (2, 5, 7, 6), (8, 5, 1, 1), 1),
    ("direct_depthwise", (2, 8, 7, 9), (8, 1, 3, 3), 8),
    ("im2win_implicit", (2, 3, 17), (8, 3, 3), 1),  # conv1d
]


@pytest.mark.parametrize("schedule,xs,ws,groups", SCHEDULE_CASES)
@pytest.mark.parametrize("kind", ["strided", "broadcast"])
def test_strided_and_broadcast_bias(schedule, xs, ws, groups, kind):
    """The epilogue reads per-channel vectors as runs of K values: a bias of stride 2, or an
    expanded (stride 0) one, is read through its strides like eager does."""
    torch.manual_seed(0)
    x, w = torch.randn(xs), torch.randn(ws)
    bias = torch.randn(2 * ws[0])[::2] if kind == "strided" else torch.full((1,), 0.5).expand(8)
    assert not bias.is_contiguous()
    model = Conv(w, bias, groups=groups)
    report = check_model(model, [x], expect_kernels=1, options={**FAST, "schedule": schedule})
    assert report[0].schedule == schedule


def test_strided_batch_norm_parameters():
    """Batch-norm vectors folded into the epilogue may be strided too."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()).eval()
    bn = model[1]
    bn.running_mean = torch.randn(12)[::2]
    bn.running_var = torch.rand(12)[::2] + 0.5
    bn.weight = nn.Parameter(torch.randn(12)[::2])
    report = check_model(model, [torch.randn(2, 3, 8, 7)], expect_kernels=1, options=FAST)
    assert report[0].epilogue == "bn+relu" and report[0].kind == "conv_bn"


@pytest.mark.parametrize("ndim", [1, 2])
def test_padding_valid(ndim):
    """padding="valid" reaches the aten graph as padding=[0] (one value for every dim)."""
    torch.manual_seed(2)
    if ndim == 2:
        model, x = nn.Conv2d(3, 5, (3, 2), padding="valid", stride=(1, 2)), torch.randn(2, 3, 9, 8)
    else:
        model, x = nn.Conv1d(3, 5, 3, padding="valid"), torch.randn(2, 3, 11)
    report = check_model(model.eval(), [x], expect_kernels=1, options=FAST)
    assert report[0].fallback_reason is None

    def functional(x):
        conv = F.conv2d if ndim == 2 else F.conv1d
        return conv(x, model.weight, model.bias, model.stride, padding="valid")

    torch._dynamo.reset()
    convcompiler.counters.reset()
    y, _ = run_compiled(functional, [x], options=FAST)
    assert_close(y, float64_copy(model)(x.double()), torch.float32)
    assert convcompiler.counters["launch.conv"] == 1


# ---- NaN and Inf through every fused activation -------------------------------------------
ACTIVATIONS = {
    "relu": nn.ReLU(),
    "relu6": nn.ReLU6(),
    "hardtanh": nn.Hardtanh(-2.0, 3.0),
    "clamp": None,  # torch.clamp(x, -1, 1): hardtanh in the epilogue
    "silu": nn.SiLU(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "hardswish": nn.Hardswish(),
    "hardsigmoid": nn.Hardsigmoid(),
    "leaky_relu": nn.LeakyReLU(0.1),
    "sigmoid": nn.Sigmoid(),
}


class Branches(nn.Module):
    """One 1x1 conv (one input channel: outputs are exactly w * x + b) per activation, with or
    without a batch norm, so every fused epilogue sees NaN, +Inf and -Inf."""

    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(1, 3, 1) for _ in ACTIVATIONS)
        self.bns = nn.ModuleList(nn.BatchNorm2d(3) if bn else nn.Identity() for _ in ACTIVATIONS)
        with torch.no_grad():
            for conv in self.convs:
                conv.weight.copy_(torch.tensor([1.0, -2.0, 0.5]).view(3, 1, 1, 1))
            for bn_ in self.bns:
                if bn:
                    bn_.weight.copy_(torch.tensor([1.5, -0.5, 1.0]))
                    bn_.running_var.copy_(torch.tensor([0.5, 2.0, 1.0]))
                    bn_.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x):
        outs = []
        for (name, act), conv, bn in zip(ACTIVATIONS.items(), self.convs, self.bns):
            y = bn(conv(x))
            outs.append(y.clamp(-1.0, 1.0) if act is None else act(y))
        return torch.stack(outs)


def nonfinite_input() -> torch.Tensor:
    x = torch.randn(2, 1, 5, 7) * 3
    x[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
    x[1, 0, 4, 3:] = torch.tensor([-1e30, float("inf"), float("nan"), -float("inf")])
    return x


def assert_same_nonfinite(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """NaN where eager has NaN, the same infinities where eager has them, close elsewhere."""
    ref = ref.to(y.dtype).double()  # eager's value in the output dtype (1e30 * 2 overflows fp16)
    y = y.double()
    assert torch.equal(y.isnan(), ref.isnan()), (y.isnan() != ref.isnan()).nonzero()
    assert torch.equal(y.isinf(), ref.isinf()), (y.isinf() != ref.isinf()).nonzero()
    assert torch.equal(y[y.isinf()], ref[ref.isinf()])
    finite = ref.isfinite()
    assert_close(y[finite], ref[finite], dtype)


@pytest.mark.parametrize("bn", [False, True], ids=["conv", "conv_bn"])
def test_nan_and_inf_through_every_activation(bn):
    torch.manual_seed(3)
    model = Branches(bn).eval()
    x = nonfinite_input()
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
    y, report = run_compiled(model, [x], options=FAST)
    assert_same_nonfinite(y, ref, torch.float32)
    regions = [r for r in report if r.fallback_reason is None]
    assert len(regions) == len(ACTIVATIONS), str(report)
    want = {"relu", "relu6", "hardtanh", "silu", "gelu", "gelu_tanh", "hardswish"}
    want |= {"hardsigmoid", "leaky_relu", "sigmoid"}
    fused = {r.epilogue.removeprefix("bn+") for r in regions}
    assert want <= fused, fused
    kind = "conv_bn" if bn else "conv"
    assert convcompiler.counters[f"launch.{kind}"] == len(ACTIVATIONS)


def test_nan_and_inf_through_residual_and_half_precision():
    """conv -> relu -> + residual -> relu6 in fp16: NaN and Inf of the residual propagate."""
    torch.manual_seed(4)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x, r):
            return F.relu6(F.relu(self.conv(x)) + r)

    model = Block().half().eval()
    x = nonfinite_input().half()
    r = torch.randn(2, 1, 5, 7).half()
    r[0, 0, 2, :3] = torch.tensor([float("nan"), -float("inf"), float("inf")])
    with torch.no_grad():
        ref = float64_copy(model)(x.double(), r.double())
    y, report = run_compiled(model, [x, r], options=FAST)
    assert_same_nonfinite(y, ref, torch.float16)
    assert report[0].epilogue == "relu+add+relu6", str(report)
    assert convcompiler.counters["launch.conv"] == 1


# ---- zero-size tensors ---------------------------------------------------------------------
ZERO_CASES = [
    # (x shape, weight shape, padding): eager returns an empty (or bias-only) result
    ((0, 3, 9, 8), (4, 3, 3, 3), 1),
    ((2, 0, 9, 8), (4, 0, 3, 3), 1),  # no input channels: the output is the bias
    ((0, 3, 11), (4, 3, 3), 0),
]


@pytest.mark.parametrize("xs,ws,padding", ZERO_CASES)
@pytest.mark.parametrize("bn", [False, True], ids=["conv", "conv_bn"])
def test_zero_size_gives_eagers_result(xs, ws, padding, bn):
    torch.manual_seed(5)
    conv = (nn.Conv2d if len(xs) == 4 else nn.Conv1d)(xs[1], ws[0], ws[2:], padding=padding)
    bn_layer = (nn.BatchNorm2d if len(xs) == 4 else nn.BatchNorm1d)(ws[0]) if bn else None
    model = nn.Sequential(conv, bn_layer, nn.ReLU()) if bn else nn.Sequential(conv, nn.ReLU())
    model = model.eval()
    x = torch.randn(xs)
    with torch.no_grad():
        eager = model(x)
        ref = float64_copy(model)(x.double())
    y, report = run_compiled(model, [x], options=FAST)
    assert y.shape == eager.shape and y.stride() == eager.stride()
    if y.numel():
        assert_close(y, ref, torch.float32)
    conv_regions = [r for r in report if r.kind in ("conv", "conv_bn")]
    assert conv_regions and all("zero-size" in r.fallback_reason for r in conv_regions)
    assert all("zero-size" in r.fallback_reason for r in report.fallbacks()), str(report)


@pytest.mark.parametrize(
    "xs,out_channels,kernel,padding,message",
    [
        ((2, 3, 0, 8), 4, 3, 0, "Kernel size can't be greater than actual input"),
        ((2, 3, 0, 8), 4, 1, 1, "Only zero batch or zero channel inputs are supported"),
        ((2, 3, 9, 8), 0, 3, 0, "expected weight to be at least 1 at dimension 0"),
    ],
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_size_gives_eagers_error(xs, out_channels, kernel, padding, message):
    """Eager refuses zero-size spatial dims and zero output channels; so does the compile."""
    model = nn.Conv2d(xs[1], out_channels, kernel, padding=padding).eval()
    x = torch.randn(xs)
    with pytest.raises(RuntimeError, match=message):
        model(x)
    with pytest.raises(RuntimeError, match=message):
        run_compiled(model, [x], options=FAST)


def test_training_batch_norm_on_an_empty_batch_matches_eager():
    """Train-mode BN after a conv on an empty batch: eager's empty output and eager's
    running statistics afterwards."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    eager_model = copy.deepcopy(model)
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    eager = eager_model(x)
    y = torch.compile(model, backend="im2win", options=FAST)(x)
    assert y.shape == eager.shape == (0, 4, 6, 6)
    for name, buf in model.named_buffers():
        assert torch.equal(buf, dict(eager_model.named_buffers())[name]), name
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# ---- the tuning cache keys on the real sources ----------------------------------------------
def test_cache_keys_hash_the_package_sources():
    """files_hash globs from the package root: the template and cost-model sources are in
    the tuning-cache key, and every source in the graph-cache key (a stale kernel would
    otherwise be reused after a template change)."""
    empty = hashlib.sha256().hexdigest()
    for pattern in ("codegen/template.py", "codegen/*.py", "selection/cost.py", "**/*.py"):
        assert files_hash(pattern) != empty, pattern
    assert files_hash("**/*.py") != files_hash("selection/*.py")
