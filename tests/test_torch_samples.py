"""PyTorch's own conv test samples through the backend, against float64 eager.

* OpInfo (`op_db`): every sample of nn.functional.conv1d, conv2d, conv3d, conv_transpose1d,
  conv_transpose2d and conv_transpose3d and its `.noncontiguous()` twin, in float32, float16
  and bfloat16, each a zeros-padded conv that must run a generated kernel; gradients of the
  float32 samples, through generated kernels too.
* ModuleInfo (`module_db`): every module input of nn.Conv1d, nn.Conv2d, nn.Conv3d,
  nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d and their Lazy variants, plus
  all four padding modes in 1-D, 2-D and 3-D (and their gradients).

To keep the suite fast, the samples of one op and dtype are compiled together, as one
function returning each sample's output (each is its own conv region, checked on its own),
and the static sm_90 check is off (it compiles each kernel ahead of time and adds nothing to
the numerics). PyTorch's test modules are imported on first use (about 15 s).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
from helpers import GRADIENTS, assert_close, float64_copy

import convcompiler

FAST = {"verify": False}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KERNEL_OPS = [
    "nn.functional.conv1d",
    "nn.functional.conv2d",
    "nn.functional.conv_transpose1d",
    "nn.functional.conv_transpose2d",
    "nn.functional.conv3d",
    "nn.functional.conv_transpose3d",
]
MODULES = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "LazyConv1d",
    "LazyConv2d",
    "LazyConv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "LazyConvTranspose1d",
    "LazyConvTranspose2d",
    "LazyConvTranspose3d",
]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@functools.cache
def opinfo(name: str):
    from torch.testing._internal.common_methods_invocations import op_db

    return next(op for op in op_db if op.name == name and not op.variant_test_name)


@functools.cache
def moduleinfo(name: str):
    from torch.testing._internal.common_modules import module_db

    return next(m for m in module_db if m.module_cls.__name__ == name)


def as_call(op, sample):
    """(tensors, fn): the sample's tensors, and a function of them that calls the op with
    the sample's other arguments baked in."""
    is_tensor = [isinstance(a, torch.Tensor) for a in sample.args]
    constants = [None if t else a for a, t in zip(sample.args, is_tensor)]
    tensors = [sample.input] + [a for a, t in zip(sample.args, is_tensor) if t]
    kwargs = dict(sample.kwargs)

    def fn(x, *rest):
        it = iter(rest)
        args = [next(it) if t else c for t, c in zip(is_tensor, constants)]
        return op.op(x, *args, **kwargs)

    return tensors, fn


def all_samples(name: str, dtype: torch.dtype, requires_grad: bool = False):
    """Every sample of the op and its noncontiguous twin, as (description, tensors, fn)."""
    op = opinfo(name)
    out = []
    for i, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=requires_grad)):
        for twin, s in (("", sample), (" noncontiguous", sample.noncontiguous())):
            tensors, fn = as_call(op, s)
            shapes = [tuple(t.shape) for t in tensors]
            out.append((f"sample {i}{twin}: {shapes} {s.kwargs}", tensors, fn))
    return out


def compile_together(samples):
    """One compiled function running every sample; returns its outputs and the report."""
    calls = [(len(tensors), fn) for _, tensors, fn in samples]

    def run(*flat):
        outs, start = [], 0
        for count, fn in calls:
            outs.append(fn(*flat[start : start + count]))
            start += count
        return outs

    flat = [t for _, tensors, _ in samples for t in tensors]
    return torch.compile(run, backend="im2win", options=FAST), flat


def conv_regions(report, stage=None):
    kinds = ("conv", "conv_bn")
    return [r for r in report.regions if r.kind in kinds and stage in (None, r.stage)]


def run_inference(name, dtype):
    """Every sample of `name` compiled together and run once: (samples, outputs, report,
    conv regions), with one region per sample checked."""
    samples = all_samples(name, dtype)
    compiled, flat = compile_together(samples)
    with torch.no_grad():
        outs = compiled(*flat)
    report = convcompiler.last_report()
    regions = conv_regions(report)
    assert len(regions) == len(samples), str(report)
    return samples, outs, report, regions


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", KERNEL_OPS)
def test_opinfo_samples_run_generated_kernels(name, dtype):
    samples, outs, report, regions = run_inference(name, dtype)
    assert all(r.fallback_reason is None and r.kernel_path for r in regions), str(report)
    assert convcompiler.counters["launch.conv"] == len(samples)
    for (what, tensors, fn), y in zip(samples, outs):
        ref = fn(*(t.double() for t in tensors))
        assert y.dtype == dtype
        assert_close(y, ref, dtype, what)


@pytest.mark.parametrize("name", KERNEL_OPS)
def test_opinfo_float32_gradients(name):
    """Forward and backward through the generated kernels: input, weight and bias gradients
    equal float64 eager's. A backward region may fall back only with its reason (a transposed
    conv whose output_padding reaches its stride has no conv from dy back to x)."""
    samples = all_samples(name, torch.float32)
    leaves = [[t.detach().requires_grad_() for t in tensors] for _, tensors, _ in samples]
    samples = [(what, ts, fn) for (what, _, fn), ts in zip(samples, leaves)]
    compiled, flat = compile_together(samples)
    outs = compiled(*flat)
    gen = torch.Generator().manual_seed(0)
    grads_out = [torch.randn(y.shape, generator=gen) for y in outs]
    grads = torch.autograd.grad(outs, flat, grads_out)
    forward = conv_regions(convcompiler.last_report(), "forward")
    assert len(forward) == len(samples), str(convcompiler.last_report())
    assert all(r.fallback_reason is None for r in forward)
    assert convcompiler.counters["launch.conv"] >= len(samples)
    backward = [r for r in convcompiler.last_report() if r.stage == "backward"]
    backward = [r for r in backward if r.mode in GRADIENTS]
    fell_back = [r for r in backward if r.fallback_reason is not None]
    print(f"{name}: {len(backward)} backward regions, {len(backward) - len(fell_back)} "
          f"generated, {len(fell_back)} fell back: {[r.fallback_reason for r in fell_back]}")
    # only transposed convs whose output_padding reaches the stride (dilation > stride)
    assert all("output_padding >= stride" in r.fallback_reason for r in fell_back)
    if not name.startswith("nn.functional.conv_transpose"):
        assert not fell_back
    # each sample's input and weight gradients, generated or recorded with their reason
    assert len(backward) == 2 * len(samples), str(convcompiler.last_report())
    start = 0
    for (what, tensors, fn), g_out in zip(samples, grads_out):
        ref_in = [t.detach().double().requires_grad_() for t in tensors]
        ref_grads = torch.autograd.grad(fn(*ref_in), ref_in, g_out.double())
        for j, (g, ref) in enumerate(zip(grads[start : start + len(tensors)], ref_grads)):
            assert_close(g, ref, torch.float32, f"{what}: gradient of operand {j}")
        start += len(tensors)


class Together(nn.Module):
    """Several modules, each applied to its own input."""

    def __init__(self, modules) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, *inputs):
        return [m(x) for m, x in zip(self.parts, inputs)]


def module_cases(dtype: torch.dtype):
    """(description, module, input, padding mode) for every ModuleInfo input of the four
    conv modules, and a Conv1d, a Conv2d and a Conv3d in each padding mode."""
    cases = []
    for name in MODULES:
        info = moduleinfo(name)
        inputs = info.module_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=False, training=False
        )
        for i, mi in enumerate(inputs):
            ctor = mi.constructor_input
            module = info.module_cls(*ctor.args, **ctor.kwargs, dtype=dtype)
            (x,) = mi.forward_input.args
            cases.append((f"{name} input {i}: {ctor.kwargs} x{tuple(x.shape)}", module, x, "zeros"))
    gen = torch.Generator().manual_seed(1)
    for mode in PADDING_MODES:
        for cls, shape in ((nn.Conv1d, (2, 3, 9)), (nn.Conv2d, (2, 3, 7, 6)),
                           (nn.Conv3d, (1, 3, 5, 6, 4))):
            module = cls(3, 4, 3, padding=2, padding_mode=mode, dtype=dtype)
            x = torch.randn(shape, generator=gen).to(dtype)
            cases.append((f"{cls.__name__} padding_mode={mode}", module, x, mode))
    return cases


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moduleinfo_conv_modules(dtype):
    cases = module_cases(dtype)
    model = Together([m for _, m, _, _ in cases]).eval()
    inputs = [x for _, _, x, _ in cases]
    with torch.no_grad():
        outs = torch.compile(model, backend="im2win", options=FAST)(*inputs)
        refs = float64_copy(model)(*(x.double() for x in inputs))  # Lazy modules now built
    report = convcompiler.last_report()
    regions = conv_regions(report)
    assert len(regions) == len(cases), str(report)
    for (what, _, _, mode), region in zip(cases, regions):  # every mode read in the loads
        assert region.fallback_reason is None and region.kernel_path, f"{what}: {region}"
        assert mode == "zeros" or mode in region.spec, f"{what}: {region}"
    assert convcompiler.counters["launch.conv"] == len(cases)
    for (what, *_), y, ref in zip(cases, outs, refs):
        assert_close(y, ref, dtype, what)
