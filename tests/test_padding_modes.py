"""Reflect, replicate and circular padding read in the kernel's loads (passes/conv_spec.py
PADS and im2win.pad_circular, codegen/template.py _window_tap's PAD_MODE): the padded copy
F.pad would write never exists.

Each case compiles a conv with that padding (nn.ConvNd's padding_mode, or an explicit
F.pad feeding a conv), compares with float64 eager, checks that a generated kernel ran with
the mode in its spec, that the lowered graph has no pad op left, and that every lane's
address stays inside x (the mirrored and clamped borders included).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from address_check import address_check
from helpers import FAST, assert_close, float64_copy, lowered_ops, rel_error

import convcompiler

CASES = {
    # name: (module for a padding mode, input shape)
    "conv2d_3x3_p1": (lambda m: nn.Conv2d(5, 7, 3, padding=1, padding_mode=m), (2, 5, 9, 11)),
    "conv2d_s2_d2_p3": (
        lambda m: nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=3, padding_mode=m),
        (1, 4, 10, 9),
    ),
    "conv2d_5x3_p21_groups2": (
        lambda m: nn.Conv2d(4, 6, (5, 3), padding=(2, 1), groups=2, padding_mode=m),
        (2, 4, 7, 8),
    ),
    "depthwise_3x3": (
        lambda m: nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode=m),
        (1, 6, 6, 7),
    ),
    "conv1d_k5_p2": (lambda m: nn.Conv1d(3, 4, 5, padding=2, padding_mode=m), (2, 3, 13)),
    "conv3d_3x3x3_p1": (lambda m: nn.Conv3d(3, 5, 3, padding=1, padding_mode=m), (1, 3, 4, 6, 5)),
    "conv3d_s2_p121": (
        lambda m: nn.Conv3d(4, 4, (3, 5, 3), stride=(2, 1, 2), padding=(1, 2, 1), padding_mode=m),
        (2, 4, 5, 6, 7),
    ),
}
# the pad op, and what its decomposition would leave (circular's: slices copied into place)
PADS = {"reflect": "reflection_pad", "replicate": "replication_pad", "circular": "slice_scatter"}
PAD_DECOMPOSED = {"_unsafe_index", "clamp", "clamp_min", "clamp_max", "abs", "iota",
                  "slice_scatter", "new_empty"}


@pytest.mark.parametrize("mode", sorted(PADS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_padding_mode_runs_in_the_kernel(tmp_path, name: str, mode: str) -> None:
    torch.manual_seed(0)
    make, shape = CASES[name]
    model = make(mode).eval()
    x = torch.randn(shape)
    compiled = torch.compile(model, backend="im2win", options={**FAST, "debug_dir": tmp_path})
    with torch.no_grad(), address_check() as check:
        y = compiled(x)
    assert check.accesses > 0
    assert_close(y, float64_copy(model)(x.double()), torch.float32, f"{name} {mode}")
    [region] = [r for r in convcompiler.last_report() if r.kind == "conv"]
    assert region.fallback_reason is None and region.kernel_path, region
    assert mode in region.spec, region.spec
    assert convcompiler.counters["launch.conv"] == 1
    # no padded copy: neither the pad nor its decomposition (iota, clamp, _unsafe_index)
    ops = lowered_ops(tmp_path)
    assert not any(op.startswith(PADS[mode]) or op in PAD_DECOMPOSED for op in ops), ops
    assert "pad_circular" not in "".join(p.read_text() for p in tmp_path.rglob("*_lowered.py"))


def test_a_circular_pad_no_region_takes_is_computed_by_its_decomposition() -> None:
    """A circular F.pad before a conv that stays ATen's (schedule="aten"), and one that feeds
    no conv: the im2win.pad_circular op becomes F.pad's own slices again, exactly."""

    class Pads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            padded = F.pad(x, (2, 1, 1, 2), mode="circular")
            return self.conv(padded), padded * 2

    torch.manual_seed(5)
    model, x = Pads().eval(), torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        y, doubled = torch.compile(model, backend="im2win",
                                   options={**FAST, "schedule": "aten"})(x)
        ref, ref_doubled = float64_copy(model)(x.double())
    assert_close(y, ref, torch.float32)
    assert torch.equal(doubled.double(), ref_doubled)
    assert convcompiler.counters["launch.conv"] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_explicit_pad_channels_last_and_half_precision(dtype) -> None:
    """F.pad(mode=...) written out before a conv with padding 0 (as image-to-image models
    do), a channels-last input, and 16-bit: one region each, against float64 eager."""

    class Explicit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 7)
            self.b = nn.Conv2d(8, 4, 3, stride=2)

        def forward(self, x):
            y = torch.relu(self.a(F.pad(x, (3, 3, 3, 3), mode="reflect")))
            return self.b(F.pad(y, (1, 1, 1, 1), mode="replicate"))

    torch.manual_seed(1)
    model = Explicit().to(dtype).eval()
    x = torch.randn(1, 3, 12, 10).to(dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = torch.compile(model, backend="im2win", options=FAST)(x)
        ref = float64_copy(model)(x.double())
        eager = model(x)
    err, eager_err = rel_error(y, ref), rel_error(eager, ref)
    assert err <= max(1e-2, 2 * eager_err), (err, eager_err)
    regions = [r for r in convcompiler.last_report() if r.kind == "conv"]
    assert [("reflect" in r.spec, "replicate" in r.spec) for r in regions] == [
        (True, False),
        (False, True),
    ]
    assert all(r.fallback_reason is None and r.kernel_path for r in regions), regions


@pytest.mark.parametrize("ndim", [2, 3])
def test_padding_mode_gradients_match(ndim: int) -> None:
    """Training: the forward reads the border in place; the backward matches float64 eager,
    both gradients of each conv generated kernels (over the padded input, with padding 0;
    the padded input's gradient then goes through ATen's pad backward)."""
    torch.manual_seed(2)
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    model = nn.Sequential(
        conv(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        conv(4, 5, 3, padding=2, stride=2, padding_mode="replicate"),
        nn.ReLU(),
        conv(5, 3, 3, padding=1, padding_mode="circular"),
    )
    reference = float64_copy(model)
    x = torch.randn((2, 3, 9, 8) if ndim == 2 else (1, 3, 5, 6, 4), requires_grad=True)
    torch.compile(model, backend="im2win", options=FAST)(x).square().sum().backward()
    xr = x.detach().double().requires_grad_()
    reference(xr).square().sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, "grad of x")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"grad of {name}")
    forward = [r for r in convcompiler.last_report() if r.stage == "forward" and r.kind == "conv"]
    modes = [("reflect" in r.spec) + 2 * ("replicate" in r.spec) + 3 * ("circular" in r.spec)
             for r in forward]  # fmt: skip
    assert sorted(modes) == [1, 2, 3], str(convcompiler.last_report())
    assert all(r.fallback_reason is None for r in forward)
    backward = [r for r in convcompiler.last_report() if r.stage == "backward" and r.mode]
    assert sorted(r.mode for r in backward) == ["grad_input"] * 3 + ["grad_weight"] * 3
    assert all(r.fallback_reason is None and r.kernel_path for r in backward), backward
    assert convcompiler.counters["launch.conv_wgrad"] == 3


@pytest.mark.parametrize("mode", sorted(PADS))
def test_nan_and_inf_at_the_border_and_an_empty_batch(mode: str) -> None:
    """A NaN and an Inf on the image's edge reach the outputs whose mirrored or repeated
    border reads them, as in eager; an empty batch returns eager's empty result (ATen, with
    the zero-size reason)."""
    torch.manual_seed(3)
    model = nn.Conv2d(3, 4, 3, padding=2, padding_mode=mode).eval()
    x = torch.randn(1, 3, 6, 7)
    x[0, 0, 0, 1] = float("nan")  # top edge: reflect mirrors row 1, replicate repeats row 0
    x[0, 1, 5, 6] = float("inf")  # bottom-right corner
    compiled = torch.compile(model, backend="im2win", options=FAST)
    with torch.no_grad():
        y, ref = compiled(x), float64_copy(model)(x.double())
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    ok = torch.isfinite(ref)
    assert_close(y[ok], ref[ok], torch.float32, f"{mode} finite outputs")
    [region] = [r for r in convcompiler.last_report() if r.kind == "conv"]
    assert region.fallback_reason is None and mode in region.spec
    with torch.no_grad():
        empty = torch.compile(model, backend="im2win", options=FAST)(torch.randn(0, 3, 6, 7))
    assert empty.shape == model(torch.randn(0, 3, 6, 7)).shape
    [region] = [r for r in convcompiler.last_report() if r.kind == "conv"]
    assert "zero-size" in region.fallback_reason
