"""Parts b (per-layer speed) and e (autotuning: calibration of the cost model) on a GPU.

Part b, per layer case: the generated kernel the cost model ranks best (and the schedule the
backend would choose, which may be ATen) against cuDNN (`F.conv2d`, TF32 for float32 as
cuDNN uses it by default), do_bench medians, TFLOP/s and the fraction of the device's peak
for that math (fp16 tensor cores; TF32 for float32). Then, while the part's budget allows,
Inductor's max-autotune (its Triton conv templates against ATen) on the same layers, the
batch-32 fp16 layers first.

Part e, per fp16 batch-32 layer: the model's top candidates (ATen always among the measured)
timed with the autotuner's own benchmarker (`tuning.benchmarker("do_bench")`): whether the
model's first choice is the measured winner, the model's error (predicted / measured) and
the regret (the first choice's time over the winner's).

Both have a warm stage, run in parallel worker processes before the timing process: it
launches every kernel once, so Triton's JIT compiles land in its on-disk cache.
"""

from __future__ import annotations

import math
import time
import traceback

import torch
import torch.nn.functional as F

from ..devices import Device
from ..runtime.reference import run_aten
from ..schedule import ATEN
from ..selection.cost import predict
from ..selection.tuning import benchmarker
from .budget import PartBudget
from .gpu_cases import ConvCase, conv_case_spec, layer_cases, out_size, plan
from .gpu_native import load_kernel

REP_MS = 50  # do_bench repetition window per measurement
MAX_AUTOTUNE_FIRST_ESTIMATE_S = 20.0  # Inductor max-autotune of one conv, before one is seen


def autotune_cases() -> list[ConvCase]:
    return layer_cases(batches=(32,), dtypes=("float16",), backward=False)


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=REP_MS, return_mode="median")


def math_kind(case: ConvCase, spec) -> str:
    if case.dtype != "float32":
        return "fp16" if case.dtype == "float16" else "bf16"
    return "tf32" if spec.precision == "tf32" else "fp32"


def _inputs(case: ConvCase):
    """The launcher's operands: (x, w), or (dy, x) for a weight gradient."""
    x, w, _ = case.tensors("cuda", make=torch.randn)
    if case.op != "conv_wgrad":
        return x, w
    dy = torch.randn(case.batch, case.out_channels, *out_size(case), device="cuda",
                     dtype=x.dtype)
    return dy, x


def _conv(case: ConvCase):
    """cuDNN's call for the same operands (`F.conv2d` or `F.conv3d`, or aten's transposed
    conv / weight gradient)."""
    if case.op == "conv":
        conv = F.conv3d if len(case.size) == 3 else F.conv2d
        return lambda x, w: conv(x, w, None, case.stride, case.padding, case.dilation,
                                 case.groups)  # fmt: skip
    spec = conv_case_spec(case)
    return lambda a, b: run_aten(spec, a, b)


def warm(case: ConvCase, device: Device, top: int = 1) -> dict:
    """Compile (by launching once) the kernel(s) a case will time."""
    x, w = _inputs(case)
    spec, schedules = plan(case, device, top)
    kernel = plan_kernel(case, device)
    for schedule in {*schedules, kernel} - {ATEN}:
        load_kernel(spec, schedule)(x, w)
    torch.cuda.synchronize()
    return {"case": case.id, "status": "compiled"}


def guarded_warm(case: ConvCase, device: Device, top: int = 1) -> dict:
    return _guarded(case, lambda: warm(case, device, top))


def plan_kernel(case: ConvCase, device: Device):
    """The generated kernel the model ranks best for a layer (its choice may be ATen)."""
    import dataclasses

    return plan(dataclasses.replace(case, pick="kernel"), device)[1][0]


def time_layer(case: ConvCase, device: Device) -> dict:
    x, w = _inputs(case)
    spec, [chosen] = plan(case, device)
    kernel = plan_kernel(case, device)
    launch = load_kernel(spec, kernel)
    conv = _conv(case)
    ms = {"im2win": bench_ms(lambda: launch(x, w)), "cudnn": bench_ms(lambda: conv(x, w))}
    kind = math_kind(case, spec)
    peak = device.peak(kind)
    flops = case.flops()
    return {
        "case": case.id,
        "status": "ok",
        "chosen": chosen.describe(),
        "kernel": kernel.describe(),
        "math": kind,
        "ms": ms,
        "tflops": {k: flops / v / 1e9 for k, v in ms.items()},
        "peak_fraction": {k: flops / (v * 1e-3) / peak for k, v in ms.items()},
        "cudnn_over_im2win": ms["cudnn"] / ms["im2win"],
    }


def max_autotune_order(cases: list[ConvCase]) -> list[ConvCase]:
    """fp16 batch 32 first, then fp32 batch 32, then batch 1."""
    return sorted(cases, key=lambda c: (c.batch != 32, c.dtype != "float16"))


def time_max_autotune(case: ConvCase) -> dict:
    import time

    x, w = _inputs(case)
    torch._dynamo.reset()
    compiled = torch.compile(_conv(case), mode="max-autotune-no-cudagraphs")
    start = time.perf_counter()
    compiled(x, w)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    return {
        "case": case.id,
        "inductor_max_autotune_ms": bench_ms(lambda: compiled(x, w)),
        "inductor_max_autotune_compile_s": compile_s,
    }


def run_layer_speed(part: PartBudget, cases: list[ConvCase], device: Device, emit) -> None:
    for case in cases:
        if not part.admits():
            return
        emit(_guarded(case, lambda c=case: time_layer(c, device)))
        part.step_done()
    slowest = MAX_AUTOTUNE_FIRST_ESTIMATE_S
    for case in max_autotune_order([c for c in cases if c.op == "conv"]):  # forward only
        if not part.admits(slowest):  # a max-autotune compile, not a timing, is the step now
            return
        started = time.monotonic()
        emit(_guarded(case, lambda c=case: time_max_autotune(c)))
        part.step_done()
        slowest = max(slowest, time.monotonic() - started)


# ---- part e ----------------------------------------------------------------------------------
TOP = 3


def calibrate(case: ConvCase, device: Device) -> dict:
    x, w = _inputs(case)
    spec, ranked = plan(case, device, top=TOP)
    measured = ranked + ([ATEN] if ATEN not in ranked else [])
    bench = benchmarker("do_bench")
    conv = _conv(case)
    rows = []
    for schedule in measured:
        pred = predict(spec, schedule, device, symbolic=False)
        if schedule == ATEN:
            run = lambda: conv(x, w)  # noqa: E731
        else:
            launch = load_kernel(spec, schedule)
            run = lambda launch=launch: launch(x, w)  # noqa: E731
        seconds = bench(pred, spec.key(), run)
        rows.append(
            {
                "schedule": schedule.describe(),
                "predicted_us": pred.at_hint * 1e6,
                "measured_us": seconds * 1e6,
                "model_rank": ranked.index(schedule) + 1 if schedule in ranked else None,
            }
        )
    winner = min(rows, key=lambda r: r["measured_us"])
    first = rows[0]
    return {
        "case": case.id,
        "status": "ok",
        "candidates": rows,
        "model_first": first["schedule"],
        "measured_winner": winner["schedule"],
        "first_is_winner": first is winner,
        "first_error": first["predicted_us"] / first["measured_us"],
        "regret": first["measured_us"] / winner["measured_us"],
    }


def calibration_summary(rows: list[dict]) -> dict:
    done = [r for r in rows if r.get("status") == "ok" and "candidates" in r]
    if not done:
        return {"layers": 0}
    logs = sorted(
        abs(math.log2(c["predicted_us"] / c["measured_us"])) for r in done for c in r["candidates"]
    )
    regrets = sorted(r["regret"] for r in done)
    return {
        "layers": len(done),
        "first_is_winner": sum(r["first_is_winner"] for r in done) / len(done),
        "median_abs_log2_error": logs[len(logs) // 2],
        "median_regret": regrets[len(regrets) // 2],
        "worst_regret": regrets[-1],
    }


def guarded_calibrate(case: ConvCase, device: Device) -> dict:
    return _guarded(case, lambda: calibrate(case, device))


def _guarded(case, fn) -> dict:
    try:
        return fn()
    except Exception as err:  # one failing case is reported, the part goes on
        return {
            "case": case.id,
            "status": "error",
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(limit=4)[-1500:],
        }
