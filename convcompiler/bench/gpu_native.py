"""Kernel-level pieces of the GPU command: building a case's kernel, the static sm_90 check
of the dry run, and part a (native correctness).

Part a, per case: random inputs (odd sizes; q, k, v as strided views of one projection), the
generated kernel, cuDNN / eager in the same dtype, and a float64 reference. A case is a
mismatch when the kernel's error exceeds max(the dtype's tolerance, 4 x cuDNN's own error):

    rel = max|y - ref| / max|ref|     fp32: 1e-4 (5e-4 with TF32), fp16 / bf16: 1e-2

Part a also compiles small nets of repeated identical layers under float16 autocast
(gpu_autocast.py): within twice eager autocast's own error of float64.
"""

from __future__ import annotations

import dataclasses
import traceback
import zlib
from typing import Any

import torch

from ..codegen import KernelSource, render_region
from ..codegen.template import with_depthwise, with_layer_scale
from ..config import Config
from ..inspection.aot import capture_launches, compile_launch, launch_key
from ..runtime.loader import load_source
from ..runtime.ops import pool_shape
from ..runtime.reference import memory_format, run_aten, run_attention, run_mlp
from ..schedule import Schedule
from ..spec import AttentionSpec, ConvSpec
from .gpu_autocast import AutocastCase, check_autocast_case, plan_autocast_case
from .gpu_blocks import MlpCase, mlp_inputs, plan_mlp
from .gpu_cases import AttentionCase, ConvCase
from .gpu_cases import plan as plan_case

TOLERANCE = {"float32": 1e-4, "tf32": 5e-4, "float16": 1e-2, "bfloat16": 1e-2}
ARCH = "sm_90"


def load_kernel(spec: ConvSpec | AttentionSpec, schedule: Schedule):
    """The generated module's launcher for `spec` under `schedule`, compiled for the GPU
    (interpreted for CPU specs)."""
    source = render_region(spec, schedule)
    module, _ = load_source(source, Config(cache=False).kernel_path, interpret=spec.device == "cpu")
    return getattr(module, source.entry)


# ---- the dry run's static check ------------------------------------------------------------
class StaticChecker:
    """Compile every kernel for sm_90 without a GPU, once per kernel text and constexpr set.

    Kernels of one template that differ only in their docstring share a compile. The
    divisibility hints Triton's JIT adds per shape (16-aligned sizes and strides) are taken
    from the first launch of each such kernel; the other alignment variants are not each
    compiled (they change vector widths, not the tiles that decide spills)."""

    def __init__(self) -> None:
        self.seen: dict[str, dict] = {}

    def check(self, spec: ConvSpec | AttentionSpec, schedule: Schedule) -> list[dict]:
        return self.check_source(render_region(spec, schedule), spec)

    def check_source(self, source: KernelSource, spec: ConvSpec | AttentionSpec) -> list[dict]:
        rows = []
        for launch in capture_launches(source, spec):
            key = launch_key(launch, ARCH, hints=False)
            if key not in self.seen:
                stats = compile_launch(launch, ARCH, source.filename)
                self.seen[key] = {
                    "kernel": stats.kernel,
                    "registers": stats.registers,
                    "spill_bytes": stats.spill_bytes,
                    "shared_bytes": stats.shared_bytes,
                    "tensor_core_ops": stats.tensor_core_ops,
                    "problems": stats.problems(),
                }
                rows.append({**self.seen[key], "compiled": True})
            else:
                rows.append({**self.seen[key], "compiled": False})
        return rows


def plan(case, device, top: int = 1):
    """A case's spec and schedule(s): gpu_cases.plan, or the MLP block's (gpu_blocks.py)."""
    if isinstance(case, MlpCase):
        return plan_mlp(case, device)
    return plan_case(case, device, top)


def dry_run_case(
    case, device, checker: StaticChecker, top: int = 1, best_kernel: bool = False
) -> dict:
    """Plan one case and compile its kernel(s) for sm_90 (the model's first `top`; with
    `best_kernel` also the best generated kernel, timed even when ATen is the choice)."""
    if isinstance(case, AutocastCase):
        return plan_autocast_case(case, checker)
    spec, schedules = plan(case, device, top)
    if best_kernel:
        best = plan(dataclasses.replace(case, pick="kernel"), device)[1][0]
        schedules += [best] if best not in schedules else []
    kernels = []
    for schedule in schedules:
        if schedule.name != "aten":
            kernels += checker.check(spec, schedule)
    problems = [f"{k['kernel']}: {p}" for k in kernels for p in k["problems"]]
    return {
        "case": case.id,
        "status": "problem" if problems else "planned",
        "schedule": " | ".join(s.describe() for s in schedules),
        "spec": spec.describe(),
        "kernels": kernels,
        "problems": problems,
    }


# ---- part a: native correctness ------------------------------------------------------------
def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    err = (y.double() - ref).abs().max().item()
    return err / scale if scale else err


def _conv_inputs(case: ConvCase, spec: ConvSpec, device: str, gen: torch.Generator) -> list:
    def randn(*shape, dtype=getattr(torch, case.dtype)):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    x, w, b = case.tensors(device, make=lambda *s, **kw: randn(*s, dtype=kw["dtype"]))
    k = case.out_channels
    def laid_out(t, layout=case.layout):  # (a clip's channels-last is channels_last_3d)
        return t.to(memory_format=memory_format(layout, t.dim()))

    def mask_of(g):  # a ReLU's mask, laid out as the gradient it zeroes (about half of it)
        return [laid_out(torch.rand(g.shape, generator=gen, device=device) < 0.5)]

    if spec.op == "conv_wgrad":  # (dy, x, mask?), dy laid out as the forward's output
        depth = [spec.hint(spec.depth.out)] if spec.depth else []
        dy = laid_out(randn(case.batch, k, *depth, *(spec.hint(s) for s in spec.out_size)))
        return [dy, x, *(mask_of(dy) if spec.input_mask else [])]
    bn = case.epilogue.bn
    f32 = torch.float32
    stats = (randn(k, dtype=f32), randn(k, dtype=f32).abs() + 0.5) if bn else (None, None)
    affine = (randn(k, dtype=f32), randn(k, dtype=f32)) if bn == "affine" else (None, None)
    if case.epilogue.ln == "affine":  # a LayerNorm's weight and bias, of the input's dtype
        affine = (randn(k) * 0.5 + 1.0, randn(k))
    residual = None
    if case.epilogue.residual:
        out = [spec.hint(s) for s in spec.out_size]
        if spec.depth:  # a clip: [N, K, DO, HO, WO]
            out.insert(0, spec.hint(spec.depth.out))
        residual = laid_out(randn(case.batch, k, *out), spec.output_layout)
    if spec.out_windows:  # the [B, H, W, K] image the output rows go back to
        (wh, ww), (ih, iw) = spec.out_windows.size, case.window_image
        residual = randn(case.batch // ((ih // wh) * (iw // ww)), ih, iw, k)
    inputs = [x, w, b, *affine, *stats, residual, *(mask_of(x) if spec.input_mask else [])]
    c = case.in_channels
    if spec.input_scale:  # after the absent mask: s [N, C, 1, 1], a sigmoid's range
        inputs += [None, torch.rand(case.batch, c, 1, 1, generator=gen, device=device).to(x.dtype)]
    pre = spec.prologue
    if pre.bn or pre.ln:  # after the absent mask and scale: the input's norm, [C] each
        affine = []
        if "affine" in (pre.bn, pre.ln):
            affine = [randn(c, dtype=f32), randn(c, dtype=f32)]
        stats = [randn(c, dtype=f32), randn(c, dtype=f32).abs() + 0.5] if pre.bn else []
        inputs += [None, None, *(affine or [None, None]), *(stats or [None, None])]
    if case.epilogue.scale:  # the launcher's 15th operand: a layer scale, one per channel
        inputs = list(with_layer_scale(tuple(inputs), randn(k) * 0.5 + 1.0))
    dw = pre.dw
    if dw:  # the 16th and 17th: the depthwise conv's weight and bias, its output O(1)
        taps = dw.kernel[0] * dw.kernel[1]
        weight = (randn(c, 1, *dw.kernel, dtype=f32) * taps**-0.5).to(x.dtype)
        inputs = list(with_depthwise(tuple(inputs), weight, randn(c) if dw.bias else None))
    return inputs


def _attention_inputs(case: AttentionCase, device: str, gen: torch.Generator) -> list:
    dtype = getattr(torch, case.dtype)
    b, h, n, d = case.batch, case.heads, case.tokens, case.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    qkv = randn(b, n, 3, h, d).permute(2, 0, 3, 1, 4)  # strided views, as Swin's projection
    bias = randn(h, n, n) if case.bias else None
    mask = None
    if case.mask:
        mask = torch.where(torch.rand(case.windows, n, n, generator=gen, device=device) < 0.3,
                           -100.0, 0.0).to(dtype)  # fmt: skip
    return [qkv[0], qkv[1], qkv[2], bias, mask]


def check_case(case, device) -> dict:
    """Part a on the GPU (or, for tests, through Triton's interpreter): one record."""
    if isinstance(case, AutocastCase):
        return check_autocast_case(case)
    where = "cuda" if torch.cuda.is_available() else "cpu"
    record: dict[str, Any] = {"case": case.id}
    try:
        try:
            spec, [schedule] = plan(case, device)
        except ValueError as err:  # no generated kernel can run it: ATen would (a fallback)
            record.update(status="fallback", error=str(err))
            return record
        if where == "cpu":  # tests: the same kernel through Triton's interpreter
            spec = dataclasses.replace(spec, device="cpu")
        record.update(schedule=schedule.describe(), spec=spec.describe())
        gen = torch.Generator(device=where).manual_seed(zlib.crc32(case.id.encode()))
        pool = None
        if isinstance(case, AttentionCase):
            args = _attention_inputs(case, where, gen)
            y = load_kernel(spec, schedule)(*args)
            ref = run_attention(spec, *[a.double() if a is not None else None for a in args])
            eager = run_attention(spec, *args)
        elif isinstance(case, MlpCase):
            args = mlp_inputs(case, where, gen)
            y = load_kernel(spec, schedule)(*args)
            ref = run_mlp(spec, *[a.double() if a is not None else None for a in args])
            eager = run_mlp(spec, *args)
        else:
            args = _conv_inputs(case, spec, where, gen)
            extra = []
            if spec.pool_sums:  # every entry is written: NaN where one is not
                shape = pool_shape(spec, schedule, args[0])
                pool = torch.full(shape, float("nan"), device=where)
                extra = [pool]
            y = load_kernel(spec, schedule)(*args, *extra)
            ref = run_aten(spec, *[a.double() if a is not None and a.is_floating_point()
                                   else a for a in args])
            eager = run_aten(spec, *args)
        tol_key = "tf32" if spec.precision == "tf32" and where == "cuda" else case.dtype
        err, eager_err = _rel(y, ref), _rel(eager, ref)
        tol = max(TOLERANCE[tol_key], 4 * eager_err)
        expected = eager
        # a weight gradient is laid out as the weight (autograd's layout contract)
        if isinstance(spec, ConvSpec) and spec.op == "conv_wgrad":
            expected = eager.contiguous(memory_format=memory_format(spec.weight_layout, y.dim()))
        # the same strides where they matter (a size-1 dim's stride is arbitrary: cuDNN's 1x1x1
        # weight gradient gives it a different one than torch.empty)
        same_format = y.shape == expected.shape and all(
            a == b for a, b, n in zip(y.stride(), expected.stride(), y.shape) if n > 1)
        ok = err <= tol and same_format and bool(torch.isfinite(y).all())
        if pool is not None:  # the pooled sums add up to eager's mean of the output
            dims = tuple(range(2, ref.dim()))
            pool_err = _rel(pool.sum(-1, keepdim=True), ref.mean(dims, keepdim=True))
            record["pool_rel_err"] = pool_err
            ok = ok and pool_err <= tol
        record.update(
            status="ok" if ok else "mismatch",
            rel_err=err,
            eager_rel_err=eager_err,
            tolerance=tol,
            layout_matches_eager=same_format,
        )
    except Exception as err:  # a case that fails is listed with its error, and the run goes on
        record.update(
            status="error",
            error=f"{type(err).__name__}: {err}",
            traceback=traceback.format_exc(limit=4)[-1500:],
        )
    return record
