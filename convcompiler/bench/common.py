"""Shared pieces of the benchmark suites: GPU timing, the compiled variants, workspace maths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..codegen.im2win_band import band_elements
from ..spec import ConvSpec

VARIANTS = ("eager", "inductor", "inductor-max-autotune", "im2win")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Timing:
    variant: str
    median_ms: float
    peak_mem_mb: float


def compiled(fn: Callable, variant: str) -> Callable:
    torch._dynamo.reset()
    if variant == "eager":
        return fn
    if variant == "inductor":
        return torch.compile(fn)
    if variant == "inductor-max-autotune":
        return torch.compile(fn, mode="max-autotune-no-cudagraphs")
    if variant == "im2win":
        return torch.compile(fn, backend="im2win")
    raise ValueError(variant)


def time_gpu(fn: Callable, args: tuple, variant: str) -> Timing:
    """do_bench median of `fn(*args)` compiled as `variant`, and its peak memory."""
    from triton.testing import do_bench

    run = compiled(fn, variant)
    with torch.no_grad():
        run(*args)  # compile (and autotune) outside the timing
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(*args)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        median = do_bench(lambda: run(*args), return_mode="median")
    return Timing(variant, median, peak)


def im2col_bytes(spec: ConvSpec) -> int:
    """Workspace of im2col + GEMM: N * C * KH * KW * HO * WO elements."""
    ho, wo = (spec.hint(s) for s in spec.out_size)
    kh, kw = spec.kernel
    n = spec.hint(spec.batch)
    return n * spec.in_channels * kh * kw * ho * wo * ITEMSIZE[spec.dtype]


def workspace_bytes(spec: ConvSpec, schedule: str) -> int:
    """Workspace each schedule allocates per call (the band; the others none)."""
    if schedule == "im2win_band":
        return band_elements(spec) * ITEMSIZE[spec.dtype]
    return 0


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


# aten ops that only make a view (no kernel, no traffic): what the byte models skip
VIEWS = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "expand",
        "transpose",
        "permute",
        "select",
        "unbind",
        "unsqueeze",
        "alias",
        "detach",
        "t",
    }
)
