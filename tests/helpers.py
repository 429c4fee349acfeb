"""The shared test helper: compare against a float64 eager reference and prove the kernel ran."""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch._subclasses import FakeTensorMode

import convcompiler

# Relative tolerances, max|y - ref| / max|ref|, against a float64 reference.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GRADIENTS = ("grad_input", "grad_weight")  # the report modes of a conv's backward regions


def lowered_ops(dump_root: Path, stage: str = "inference") -> Counter:
    """aten ops left in the lowered graph of the one compile dumped under `dump_root`."""
    (compile_dir,) = list(dump_root.iterdir())
    (lowered,) = (compile_dir / stage).glob("*_lowered.py")
    return Counter(re.findall(r"torch\.ops\.aten\.([a-z_0-9]+)", lowered.read_text()))


def inductor_kernels(dump_root: Path) -> list[str]:
    """Names of the kernels Inductor generated for the one compile dumped under `dump_root`
    (its trace of the compile: torchinductor/*/output_code.py), one entry per launch site."""
    (compile_dir,) = list(dump_root.iterdir())
    names: list[str] = []
    for code in sorted(compile_dir.glob("torchinductor/*/output_code.py")):
        text = code.read_text()
        call = text[text.index("def call(") :] if "def call(" in text else text
        names += re.findall(r"^\s+((?:cpp|triton)_\w+)\(", call, flags=re.M)
    return names


def kernel_launches() -> int:
    """Launches of generated kernels of every kind (conv, conv_bn, ...)."""
    return sum(v for k, v in convcompiler.counters.items() if k.startswith("launch."))


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().clamp_min(1e-30)
    return ((y.double() - ref.double()).abs().max() / scale).item()


def assert_close(
    y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output"
) -> None:
    assert y.shape == ref.shape, f"{what}: shape {tuple(y.shape)} != {tuple(ref.shape)}"
    err = rel_error(y, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g} ({dtype})"


def float64_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).double()


def fake_output(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
    """What eager would produce (shape, strides), without running it: PyTorch's CPU fp16
    convolution itself crashes on some odd configurations."""
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) if t is not None else None for t in tensors]
        return fn(*fakes)


# The static sm_90 check of each chosen kernel (option verify) adds nothing to what a CPU test
# checks (numerics through the interpreter), and its AOT compiles are most of a cold run's
# compile time; the check has its own tests (test_static_gate.py, the GPU command's dry run).
FAST = {"verify": False}


def run_compiled(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    options: dict[str, Any] | None = None,
    dynamic: bool | None = None,
) -> tuple[torch.Tensor, convcompiler.Report]:
    """Compile with backend="im2win", run once under no_grad, return output and report."""
    compiled = torch.compile(model, backend="im2win", options=options, dynamic=dynamic)
    with torch.no_grad():
        out = compiled(*inputs)
    return out, convcompiler.last_report()


def compiled_and_float64(
    model: torch.nn.Module, inputs: Sequence[torch.Tensor], options: dict[str, Any] | None = None
) -> tuple[Any, Any, convcompiler.Report]:
    """Counters reset, then (the compiled output under no_grad, float64 eager's output, the
    report); `options` add to FAST."""
    with torch.no_grad():
        ref = float64_copy(model)(*[t.double() for t in inputs])
    convcompiler.counters.reset()
    out, report = run_compiled(model, inputs, options={**FAST, **(options or {})})
    return out, ref, report


def gradients_match_float64(model: torch.nn.Module, *inputs: torch.Tensor) -> None:
    """Compile `model` (FAST), backpropagate the sum of its outputs' squares, and check every
    input's and parameter's gradient against float64 eager's (counters are the caller's)."""
    reference = float64_copy(model)
    xs = [t.detach().requires_grad_() for t in inputs]
    xs64 = [t.detach().double().requires_grad_() for t in inputs]
    for fn, args in ((torch.compile(model, backend="im2win", options=FAST), xs), (reference, xs64)):
        out = fn(*args)
        sum(y.square().sum() for y in (out if isinstance(out, tuple) else (out,))).backward()
    for i, (x, x64) in enumerate(zip(xs, xs64)):
        assert_close(x.grad, x64.grad, torch.float32, f"input {i} grad")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"{name} grad")


def assert_nan_and_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """NaN exactly where eager's is, and every other value within the dtype's tolerance."""
    assert torch.equal(out.isnan(), ref.isnan())
    assert_close(out[~ref.isnan()], ref[~ref.isnan()], dtype)


def compile_matches_eager(
    model: torch.nn.Module, x: torch.Tensor, *, launches: int
) -> convcompiler.Report:
    """A fresh compile of `model` (Dynamo reset, counters reset): its output equals float64
    eager's, and `launches` generated kernels ran."""
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
    convcompiler.counters.reset()
    torch._dynamo.reset()
    out, report = run_compiled(model, [x])
    assert_close(out, ref, x.dtype)
    assert kernel_launches() == launches, convcompiler.counters
    return report


def check_model(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    expect_kernels: int,
    expect_fallbacks: int = 0,
    options: dict[str, Any] | None = None,
) -> convcompiler.Report:
    """Compiled output == float64 eager output, and exactly `expect_kernels` conv kernels ran."""
    dtype = inputs[0].dtype
    reference = float64_copy(model)
    with torch.no_grad():
        ref = reference(*[x.double() for x in inputs])
    convcompiler.counters.reset()
    out, report = run_compiled(model, inputs, options=options)
    assert_close(out, ref, dtype)
    assert len(report.kernels()) == expect_kernels, str(report)
    assert len(report.fallbacks()) == expect_fallbacks, str(report)
    assert kernel_launches() == expect_kernels, convcompiler.counters
    for region in report.kernels():
        assert region.kernel_path is not None and region.fallback_reason is None
    return report
