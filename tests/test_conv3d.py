"""3-D convolutions as generated kernels (ConvSpec.depth, im2win_implicit's depth taps):
fused epilogues, channels_last_3d, a causal video conv's padding read in the loads, NaN and
empty inputs, 3-D transposed convs and every gradient (transposed_phase and wgrad_splitk
with the depth taps), the static check, and torchvision's video models.

PyTorch's own conv3d samples (OpInfo and ModuleInfo, every padding mode) are in
test_torch_samples.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from address_check import address_check
from helpers import (
    FAST,
    assert_close,
    compiled_and_float64,
    gradients_match_float64,
    lowered_ops,
)

import convcompiler

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class BasicBlock3d(nn.Module):
    """torchvision r3d_18's block: conv-BN-ReLU, conv-BN, + the input, ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(c, c, 3, padding=1, bias=False), nn.BatchNorm3d(c)
        self.conv2, self.bn2 = nn.Conv3d(c, c, 3, padding=1, bias=False), nn.BatchNorm3d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def _randomised(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_basic_block_runs_two_kernels_with_bn_relu_and_residual(dtype) -> None:
    """Each conv with its BN, ReLU and (the second) the residual add in one kernel, on a
    channels_last_3d clip of odd sizes, against float64 eager."""
    torch.manual_seed(0)
    model = _randomised(BasicBlock3d(6)).to(dtype)
    x = torch.randn(2, 6, 5, 7, 9).to(dtype).to(memory_format=torch.channels_last_3d)
    out, ref, report = compiled_and_float64(model, [x])
    assert_close(out, ref, dtype)
    regions = [r for r in report.regions if r.kind in ("conv", "conv_bn")]
    assert len(regions) == 2 and all(r.fallback_reason is None for r in regions), str(report)
    assert all("depth3p1" in r.spec and "+bn" in r.spec for r in regions), str(report)
    assert "add" in regions[1].spec, regions[1].spec
    c = convcompiler.counters
    assert c["launch.conv"] + c["launch.conv_bn"] == 2


class CausalConv3d(nn.Module):
    """A video VAE's causal conv: the past padded by replicating the first frame (F.pad
    replicate, two frames before and none after), then a 3x3x3 conv, GroupNorm and SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv3d(4, 8, 3), nn.GroupNorm(2, 8)

    def forward(self, x):
        x = F.pad(x, (1, 1, 1, 1, 2, 0), mode="replicate")
        return F.silu(self.norm(self.conv(x)))


def test_causal_conv3d_is_one_region_without_a_padded_copy(tmp_path) -> None:
    torch.manual_seed(1)
    model = CausalConv3d().eval()
    x = torch.randn(2, 4, 5, 7, 6)
    compiled = torch.compile(model, backend="im2win", options={**FAST, "debug_dir": tmp_path})
    with torch.no_grad(), address_check() as check:
        y = compiled(x)
        ref = model.double()(x.double())
    assert check.accesses > 0  # every lane's address inside x, the clamped border included
    assert_close(y, ref, torch.float32)
    [region] = [r for r in convcompiler.last_report() if r.kind == "conv"]
    assert region.fallback_reason is None and region.kernel_path, region
    assert "replicate" in region.spec and "depth3p2to0" in region.spec, region.spec
    assert convcompiler.counters["launch.conv"] == 1
    ops = lowered_ops(tmp_path)
    assert not any(op.startswith("replication_pad") for op in ops), ops


def test_nan_inf_and_an_empty_batch_match_eager() -> None:
    """NaN and Inf spread to the outputs whose windows hold them, as in eager; an empty
    batch falls back with the reason and gives eager's empty result."""
    torch.manual_seed(2)
    model = nn.Conv3d(3, 4, (3, 1, 3), stride=(2, 1, 1), padding=(1, 0, 1)).eval()
    x = torch.randn(1, 3, 6, 5, 7)
    x[0, 1, 2, 3, 4] = float("nan")
    x[0, 2, 5, 0, 0] = float("inf")
    _check_nan_inf_then_empty(model, x, (0, 4, 3, 5, 7))


def _check_nan_inf_then_empty(model: nn.Module, x: torch.Tensor, empty_out: tuple) -> None:
    """`x` (holding NaN and Inf) through one generated kernel, as float64 eager; then an empty
    batch, which falls back with the zero-size reason and gives eager's `empty_out`."""
    out, ref, report = compiled_and_float64(model, [x])
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert_close(out[ref.isfinite()], ref[ref.isfinite()], torch.float32)
    assert out.isnan().any() and convcompiler.counters["launch.conv"] == 1
    torch._dynamo.reset()
    out, ref, report = compiled_and_float64(model, [torch.randn(0, *x.shape[1:])])
    assert out.shape == ref.shape == empty_out
    [region] = [r for r in report.regions if r.kind == "conv"]
    assert "zero-size" in region.fallback_reason, region


class Mixed3d(nn.Module):
    """Strides, padding, dilation and groups along the depth too, a depthwise conv, ReLUs (their
    backward masks the gradients the kernels read) and a transposed conv with output padding."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(3, 6, 3, padding=1)
        self.c2 = nn.Conv3d(6, 6, (3, 3, 1), stride=(2, 1, 2), padding=(2, 1, 0),
                            dilation=(2, 1, 1), groups=3, bias=False)
        self.dw = nn.Conv3d(6, 6, 3, padding=1, groups=6)
        self.up = nn.ConvTranspose3d(6, 4, 3, stride=(2, 1, 2), padding=1,
                                     output_padding=(1, 0, 1))

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y))
        return self.up(self.dw(y) + y)


def test_every_gradient_runs_generated_kernels() -> None:
    """Training: each conv's grad_input (a 3-D transposed conv; the transposed conv's a
    forward conv) and grad_weight run generated kernels, against float64 eager."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 5, 6, 7)
    with address_check() as check:  # every lane's address inside its tensor
        gradients_match_float64(Mixed3d(), x.requires_grad_())
    assert check.accesses > 0
    report = convcompiler.last_report()
    grads = [r for r in report.regions if r.stage == "backward" and r.mode]
    assert sorted(r.mode for r in grads) == ["grad_input"] * 4 + ["grad_weight"] * 4, str(report)
    assert all(r.fallback_reason is None and r.kernel_path for r in grads), str(report)
    assert all("depth" in r.spec for r in grads), str(report)
    c = convcompiler.counters
    assert c["launch.conv_wgrad"] == 4
    # the three convs' grad_input run transposed_phase, the transposed conv's a forward conv
    transposed = [r for r in grads if r.mode == "grad_input" and "transposed" in r.spec]
    assert len(transposed) == 3 and sum("masked-grad" in r.spec for r in transposed) == 2
    assert all(r.schedule.startswith("transposed_phase") for r in transposed), str(report)


def test_transposed_conv3d_with_fused_bias_bn_and_residual_matches_eager() -> None:
    """A decoder's ConvTranspose3d (stride 2 in depth only, output padding) with its BN,
    ReLU and a skip connection fused, channels_last_3d, against float64 eager."""

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose3d(5, 4, (3, 2, 3), stride=(2, 1, 1), padding=(1, 0, 1),
                                         output_padding=(1, 0, 0))
            self.bn = nn.BatchNorm3d(4)

        def forward(self, x, skip):
            return torch.relu(self.bn(self.up(x)) + skip)

    torch.manual_seed(5)
    model = _randomised(Up())
    x = torch.randn(2, 5, 3, 4, 5).to(memory_format=torch.channels_last_3d)
    skip = torch.randn(2, 4, 6, 5, 5)
    out, ref, report = compiled_and_float64(model, [x, skip])
    assert_close(out, ref, torch.float32)
    [region] = [r for r in report.regions if r.kind in ("conv", "conv_bn")]
    assert region.fallback_reason is None and region.schedule.startswith("transposed_phase")
    assert "depth3s2p1op1" in region.spec and "add" in region.spec, region.spec
    assert convcompiler.counters["launch.conv_bn"] + convcompiler.counters["launch.conv"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("model", ["r3d_18", "r2plus1d_18"])
def test_video_model_conv3d_kernels_pass_the_static_check(model: str) -> None:
    """Every conv3d kernel planned for the model (fp16, an H100) compiles for sm_90 and
    sm_80 with no spill, shared memory within the limit and tensor-core instructions."""
    from convcompiler.inspection.cli import static_table

    stats = static_table(f"torchvision:{model}", "2,3,8,32,32", "float16", ["sm_90", "sm_80"],
                         {"cpu": "plan", "target": "h100"})
    assert stats and {st.arch for st in stats} == {"sm_90", "sm_80"}
    assert all(st.ok for st in stats), [(st.kernel, st.arch, st.problems()) for st in stats]
    assert all(st.tensor_core_ops > 0 for st in stats if st.uses_dot), stats


def test_transposed_conv3d_at_the_edges_matches_eager() -> None:
    """A batch broadcast from one clip (stride 0), NaN and Inf spread to the outputs whose
    taps read them, as in eager; an empty batch falls back with the reason."""
    torch.manual_seed(6)
    model = nn.ConvTranspose3d(3, 4, (2, 3, 3), stride=(2, 1, 2), padding=(0, 1, 1)).eval()
    x = torch.randn(1, 3, 3, 4, 5)
    x[0, 1, 1, 2, 3] = float("nan")
    x[0, 2, 0, 0, 4] = float("inf")
    _check_nan_inf_then_empty(model, x.expand(2, -1, -1, -1, -1), (0, 4, 6, 4, 9))


@pytest.mark.slow
def test_video_gradient_kernels_pass_the_static_check() -> None:
    """r3d_18's gradients on 8 clips of 16 x 112 x 112 in fp16 (part b's cases): each layer's
    best wgrad_splitk and transposed_phase kernel the model ranks for an H100 and an A100
    compiles for sm_90 and sm_80 with no spill and tensor-core instructions."""
    from convcompiler.bench import gpu_cases
    from convcompiler.codegen import render_region
    from convcompiler.devices import lookup
    from convcompiler.inspection.aot import static_report

    clips = gpu_cases.r3d_18_layer_cases(8, "float16")
    stats = []
    for case in gpu_cases.backward_cases(clips):
        family = "wgrad_splitk" if case.op == "conv_wgrad" else "transposed_phase"
        for target, arch in (("h100", "sm_90"), ("a100", "sm_80")):
            spec, [schedule] = gpu_cases.plan(
                dataclasses.replace(case, family=family, pick="model"), lookup(target))
            assert spec.depth and schedule.name == family, (case.id, schedule)
            stats += static_report(render_region(spec, schedule), spec, (arch,))
    assert len(stats) == 2 * 21
    assert all(st.ok for st in stats), [(st.kernel, st.arch, st.problems()) for st in stats]
    assert all(st.tensor_core_ops > 0 for st in stats), stats


VIDEO = {  # torchvision video model: its clip (S3D's average pool made adaptive to fit it)
    "r3d_18": (1, 3, 4, 32, 32),
    "mc3_18": (1, 3, 4, 32, 32),
    "r2plus1d_18": (1, 3, 4, 32, 32),
    "s3d": (1, 3, 8, 32, 32),
    "swin3d_t": (1, 3, 2, 64, 64),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VIDEO))
def test_video_models_match_float64_with_every_conv_generated(name: str) -> None:
    """torchvision's video models on a small clip, through the interpreter: every conv a
    generated kernel (swin3d_t's patch embedding is its one conv, and its 12 window
    attentions run fused)."""
    import torchvision

    torch.manual_seed(4)
    model = _randomised(getattr(torchvision.models.video, name)(num_classes=10))
    if name == "s3d":  # its 2x7x7 average pool needs a 16 x 224 x 224 clip
        model.avgpool = nn.AdaptiveAvgPool3d(1)
    out, ref, report = compiled_and_float64(model, [torch.randn(VIDEO[name])])
    assert_close(out, ref, torch.float32)
    convs = [r for r in report.regions if r.kind in ("conv", "conv_bn") and "depth" in r.spec]
    assert convs and all(r.fallback_reason is None for r in convs), str(report)
    c = convcompiler.counters
    assert c["launch.conv"] + c["launch.conv_bn"] >= len(convs)
    if name == "swin3d_t":
        attention = [r for r in report.regions if r.kind == "window_attention"]
        assert len(attention) == 12 and all(r.fallback_reason is None for r in attention)
        assert c["launch.window_attention"] == 12
