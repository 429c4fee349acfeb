"""A linear followed by an activation or a residual add runs as a 1x1-conv GEMM region with the
epilogue fused (passes/linear_as_conv.py); a linear with nothing to fuse stays the host's mm.

These tests are about the per-layer regions, so block fusion, which would take each whole MLP
as one region (test_block_mlp.py), is off in every compile here (PER_LAYER)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_close, float64_copy, kernel_launches, lowered_ops

import convcompiler
from convcompiler.passes.linear_as_conv import matmul_precision


class MLPBlock(nn.Module):
    """Swin's MLP half-block on [..., C] tokens: x + fc2(gelu(fc1(norm(x))))."""

    def __init__(self, c: int, hidden: int, approximate: str = "none") -> None:
        super().__init__()
        self.norm, self.approximate = nn.LayerNorm(c), approximate
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x)), approximate=self.approximate))


PER_LAYER = {"blocks": False}


def compiled_run(model, x, options=None):
    """Compiled output under no_grad, the float64 eager reference, and the report."""
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
        out = torch.compile(model, backend="im2win", options={**PER_LAYER, **(options or {})})(x)
    return out, ref, convcompiler.last_report()


def linear_rows(report) -> list[tuple[str, str]]:
    return [(r.epilogue, r.schedule) for r in report if r.kind == "linear"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mlp_block_fuses_gelu_and_residual(dtype, approximate) -> None:
    torch.manual_seed(0)
    model = MLPBlock(13, 37, approximate).eval().to(dtype)
    x = torch.randn(1, 5, 6, 13).to(dtype)
    out, ref, report = compiled_run(model, x)
    assert_close(out, ref, dtype)
    assert out.shape == x.shape and out.is_contiguous()
    gelu = "gelu_tanh" if approximate == "tanh" else "gelu"
    assert linear_rows(report) == [(gelu, "gemm_1x1"), ("add", "gemm_1x1")], str(report)
    assert report[0].spec.startswith("linear as [1,13,5,6] -> [1,37,5,6] 1x1"), str(report)
    assert convcompiler.counters["match.linear"] == 2
    assert convcompiler.counters["launch.linear"] == 2 == kernel_launches()


def test_tokens_2d_and_3d(tmp_path) -> None:
    """2-D tokens ([M, C]: fc1 + silu) and 3-D ([B, N, C]: fc2 + residual add + relu); the
    last linear has nothing to fuse and stays an addmm."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(11, 19), nn.Linear(19, 11), nn.Linear(11, 5)

        def forward(self, x2, x3):
            h = F.silu(self.fc1(x2))  # [M, 19]
            y = F.relu(self.fc2(h.view(x3.shape[0], -1, 19)) + x3)  # [B, N, 11]
            return self.fc3(y)

    torch.manual_seed(0)
    model = Tokens().eval()
    x2, x3 = torch.randn(14, 11), torch.randn(2, 7, 11)
    with torch.no_grad():
        ref = float64_copy(model)(x2.double(), x3.double())
        options = {**PER_LAYER, "debug_dir": str(tmp_path)}
        compiled = torch.compile(model, backend="im2win", options=options)
        out = compiled(x2, x3)
    assert_close(out, ref, torch.float32)
    report = convcompiler.last_report()
    assert linear_rows(report) == [("silu", "gemm_1x1"), ("add+relu", "gemm_1x1")], str(report)
    assert convcompiler.counters["launch.linear"] == 2
    ops = lowered_ops(tmp_path)
    assert ops["addmm"] == 1 and ops["convolution"] == 0, ops  # fc3, untouched


class LayerScale(nn.Module):
    """x + gamma * fc(x) (timm's LayerScale), or fc(x) alone."""

    def __init__(self, scaled: bool = True) -> None:
        super().__init__()
        self.fc, self.gamma = nn.Linear(9, 9), nn.Parameter(torch.rand(9) + 0.5)
        self.scaled = scaled

    def forward(self, x):
        return x + self.gamma * self.fc(x) if self.scaled else self.fc(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_scale_and_residual_are_the_linears_epilogue(dtype, tmp_path) -> None:
    """A layer scale (a mul by one value per output feature) and the residual after it run in
    gemm_1x1's epilogue: the scaled output is never written apart."""
    torch.manual_seed(0)
    model, x = LayerScale().eval().to(dtype), torch.randn(1, 3, 4, 9).to(dtype)
    out, ref, report = compiled_run(model, x, {"debug_dir": str(tmp_path)})
    assert_close(out, ref, dtype)
    (row,) = report
    assert (row.kind, row.schedule, row.epilogue) == ("linear", "gemm_1x1", "scale+add"), row
    assert convcompiler.counters["launch.linear"] == 1
    ops = lowered_ops(tmp_path)
    assert ops["addmm"] == 0 and ops["mul"] == 0 and ops["add"] == 0, ops


def test_a_plain_linear_is_untouched(tmp_path) -> None:
    """A linear output with nothing after it to fuse: no region, the host's matmul."""
    torch.manual_seed(0)
    model, x = LayerScale(scaled=False).eval(), torch.randn(1, 3, 4, 9)
    out, ref, report = compiled_run(model, x, {"debug_dir": str(tmp_path)})
    assert_close(out, ref, torch.float32)
    assert len(report) == 0 and convcompiler.counters["match.linear"] == 0, str(report)
    assert lowered_ops(tmp_path)["addmm"] == 1


def test_a_linear_region_that_runs_aten_is_the_linear_again(tmp_path) -> None:
    """schedule='aten' (as when the cost model picks ATen): the region falls back and the
    graph holds the original addmm, not a 1x1 convolution."""
    torch.manual_seed(0)
    model, x = MLPBlock(10, 17).eval(), torch.randn(1, 3, 5, 10)
    options = {"schedule": "aten", "debug_dir": str(tmp_path)}
    out, ref, report = compiled_run(model, x, options)
    assert_close(out, ref, torch.float32)
    assert [r.kind for r in report.fallbacks()] == ["linear", "linear"], str(report)
    ops = lowered_ops(tmp_path)
    assert ops["addmm"] == 2 and ops["convolution"] == 0, ops
    assert kernel_launches() == 0


def test_cpu_aten_leaves_linears_to_the_host() -> None:
    torch.manual_seed(0)
    model, x = MLPBlock(10, 17).eval(), torch.randn(1, 3, 5, 10)
    out, ref, report = compiled_run(model, x, {"cpu": "aten"})
    assert_close(out, ref, torch.float32)
    assert len(report) == 0 and convcompiler.counters["match.linear"] == 0, str(report)


@contextlib.contextmanager
def matmul_allow_tf32(allow: bool) -> Iterator[None]:
    """cuBLAS's legacy switch, then every flag it moves put back: setting allow_tf32 also
    sets torch's float32 matmul precision and the matmul's fp32_precision ("none" by
    default), which setting allow_tf32 back would leave changed."""
    matmul = torch.backends.cuda.matmul
    legacy, precision = torch.get_float32_matmul_precision(), matmul.fp32_precision
    matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        matmul.fp32_precision = precision  # after the legacy one, or the two disagree


def test_float32_linear_keeps_matmul_precision() -> None:
    """cuDNN's conv flag allows TF32 by default, cuBLAS's matmul flag does not: a linear
    region follows the matmul flag."""
    torch.manual_seed(0)
    model, x = MLPBlock(10, 17).eval(), torch.randn(1, 3, 5, 10)
    for allow in (False, True):
        with matmul_allow_tf32(allow):
            torch._dynamo.reset()
            out, ref, report = compiled_run(model, x)
            specs = [spec for _, spec in report.generated]
        assert_close(out, ref, torch.float32)
        expected = "tf32" if allow else "ieee"
        assert matmul_precision(torch.float32) == "ieee"  # restored
        assert [s.precision for s in specs] == [expected] * 2, specs


def test_training_gradients_match_eager() -> None:
    """In training the pre-GELU activation is saved for backward: fc1 stays a matmul; fc2 +
    residual add (nothing of it is saved) is a region in the forward graph."""
    torch.manual_seed(0)
    model = MLPBlock(10, 17).train()
    reference = float64_copy(model)
    x = torch.randn(1, 3, 5, 10, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out = torch.compile(model, backend="im2win", options=PER_LAYER)(x)
    ref = reference(x64)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    assert_close(out, ref, torch.float32)
    assert_close(x.grad, x64.grad, torch.float32, "input grad")
    for (name, p), p64 in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, p64.grad, torch.float32, f"{name}.grad")
    report = convcompiler.last_report()
    assert [(r.stage, r.epilogue) for r in report if r.kind == "linear"] == [("forward", "add")]
    assert convcompiler.counters["launch.linear"] == 1


def test_dynamic_token_counts() -> None:
    torch.manual_seed(0)
    model = MLPBlock(10, 17).eval()
    compiled = torch.compile(model, backend="im2win", options=PER_LAYER, dynamic=True)
    reference = float64_copy(model)
    with torch.no_grad():
        for shape in [(1, 3, 5, 10), (2, 4, 3, 10)]:
            x = torch.randn(shape)
            assert_close(compiled(x), reference(x.double()), torch.float32, str(shape))
    report = convcompiler.last_report()
    assert linear_rows(report) == [("gelu", "gemm_1x1"), ("add", "gemm_1x1")], str(report)
    assert report[0].spec.startswith("linear as [s"), str(report)  # a symbolic batch
    assert convcompiler.counters["launch.linear"] == 4


def test_aten_host_graph() -> None:
    """host='aten' lowers the graph Inductor did not decompose (view, t, addmm, mm)."""
    torch.manual_seed(0)
    model, x = MLPBlock(10, 17).eval(), torch.randn(1, 3, 5, 10)
    out, ref, report = compiled_run(model, x, {"host": "aten"})
    assert_close(out, ref, torch.float32)
    assert linear_rows(report) == [("gelu", "gemm_1x1"), ("add", "gemm_1x1")], str(report)
    assert convcompiler.counters["launch.linear"] == 2


def test_linear_reshaped_into_heads_is_untouched() -> None:
    """A GELU after the linear's output is split into heads ([M, K] -> [M, 3, 4]) is not an
    epilogue over the K output channels: the linear stays a matmul."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 12)

        def forward(self, x):
            return F.gelu(self.fc(x).view(14, 3, 4))

    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(14, 12)
    out, ref, report = compiled_run(model, x)
    assert_close(out, ref, torch.float32)
    assert len(report) == 0 and convcompiler.counters["match.linear"] == 0, str(report)


# ---- eager's edges ------------------------------------------------------------------------
class ResidualMLP(nn.Module):
    """gelu(fc1(x)) then fc2(.) + r, with the residual `r` given (possibly broadcast)."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x))) + r


def _run_pair(model, x, r):
    with torch.no_grad():
        ref = float64_copy(model)(x.double(), r.double())
        out = torch.compile(model, backend="im2win", options=PER_LAYER)(x, r)
    return out, ref, convcompiler.last_report()


def test_a_broadcast_residual_stays_outside_the_kernel() -> None:
    """A residual of shape [C] broadcast over the tokens: eager's result; the GELU fuses
    into fc1, and the broadcast add is not taken as a residual (its shape differs)."""
    torch.manual_seed(0)
    model = ResidualMLP(11, 23).eval()
    x, r = torch.randn(2, 5, 6, 11), torch.randn(11)
    out, ref, report = _run_pair(model, x, r)
    assert_close(out, ref, torch.float32)
    assert linear_rows(report) == [("gelu", "gemm_1x1")], str(report)
    assert convcompiler.counters["launch.linear"] == 1


def test_non_contiguous_tokens_match_eager() -> None:
    """Tokens read through a transpose: eager's result. ATen's linear then runs as mm plus
    a separate bias add, which is not a fusable epilogue, so the host's matmul runs it (the
    reason is logged); whatever was matched also launched."""
    torch.manual_seed(0)
    model = ResidualMLP(11, 23).eval()
    x = torch.randn(2, 6, 5, 11).transpose(1, 2)  # [2, 5, 6, 11], not contiguous
    out, ref, _ = _run_pair(model, x, torch.randn(2, 5, 6, 11))
    assert_close(out, ref, torch.float32)
    assert convcompiler.counters["launch.linear"] == convcompiler.counters["match.linear"]


def test_nan_and_inf_through_a_linear_epilogue() -> None:
    """NaN and +-Inf in the tokens reach the output where eager puts them."""
    torch.manual_seed(0)
    model = ResidualMLP(7, 9).eval()
    x, r = torch.randn(1, 3, 4, 7), torch.randn(1, 3, 4, 7)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    r[0, 1, 2, 0] = float("inf")
    out, ref, report = _run_pair(model, x, r)
    assert linear_rows(report) == [("gelu", "gemm_1x1"), ("add", "gemm_1x1")], str(report)
    assert convcompiler.counters["launch.linear"] == 2
    assert torch.equal(out.isnan(), ref.isnan()), (out.isnan() != ref.isnan()).nonzero()
    assert torch.equal(out.isinf(), ref.isinf()) and torch.equal(
        out[out.isinf()], ref[ref.isinf()].float()
    )
    finite = ref.isfinite()
    assert_close(out[finite], ref[finite], torch.float32)


def test_empty_tokens_give_eagers_empty_result() -> None:
    torch.manual_seed(0)
    model = ResidualMLP(7, 9).eval()
    x, r = torch.randn(0, 3, 4, 7), torch.randn(0, 3, 4, 7)
    out, ref, _ = _run_pair(model, x, r)
    assert out.shape == ref.shape == (0, 3, 4, 7) and out.dtype == torch.float32
