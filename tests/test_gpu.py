"""GPU-only tests of the native launch paths (marker `gpu`; skipped without a CUDA GPU).

Run on a GPU by `python -m convcompiler.bench gpu` (its last part), or by hand with
`python -m pytest -m gpu tests/test_gpu.py`. They cover what Triton's interpreter cannot:
the CUDA device a kernel launches on, the stream it launches on, the autotuner's do_bench
benchmarker, and a compiled model end to end on the GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import kernel_launches, rel_error, run_compiled

import convcompiler

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL_TF32 = 5e-3  # TF32 convs over a whole small network, against float64


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Conv2d(16, 32, 1),
        nn.ReLU(),
    ).eval()


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernel_runs_on_the_tensors_device_not_the_current_one() -> None:
    model = small_net().to("cuda:1")
    x = torch.randn(2, 3, 33, 31, device="cuda:1")
    assert torch.cuda.current_device() == 0
    out, report = run_compiled(model, [x])
    assert out.device == torch.device("cuda:1")
    assert rel_error(out, reference(model, x)) <= TOL_TF32
    assert kernel_launches() >= 3 and not [r for r in report.regions if r.fallback_reason]


def test_kernels_launch_on_the_current_stream() -> None:
    """Inputs written on a side stream behind a long sleep: a kernel launched on any other
    stream would read them before they exist."""
    model = small_net().cuda()
    base = torch.randn(2, 3, 33, 31, device="cuda")
    compiled = torch.compile(model, backend="im2win")
    with torch.no_grad():
        compiled(base)  # compile outside the stream
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time before x is written
            x = base * 2.0
            out = compiled(x)
        torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert rel_error(out, reference(model, base * 2.0)) <= TOL_TF32
    assert kernel_launches() >= 2 * 3


def test_autotuning_measures_with_do_bench(cache_dir) -> None:
    model = small_net().cuda()
    x = torch.randn(4, 3, 40, 40, device="cuda")
    options = {"autotune": True, "benchmarker": "do_bench", "top_k": 2}
    out, report = run_compiled(model, [x], options=options)
    assert rel_error(out, reference(model, x)) <= TOL_TF32
    assert convcompiler.counters["tune.benchmark"] >= 3
    tuned = [r for r in report.regions if r.origin == "tuned"]
    assert tuned, "no region was tuned"
    for region in tuned:
        measured = [c.measured_s for c in region.candidates if c.measured_s is not None]
        assert measured and all(0 < s < 1 for s in measured)


def test_resnet18_end_to_end_on_cuda() -> None:
    dtype = torch.float16
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().to("cuda", dtype)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=dtype)
    out, report = run_compiled(model, [x])
    ref = reference(model, x)
    assert rel_error(out, ref) <= 2e-2
    # 20 convs; the cost model may leave a few to cuDNN on a GPU, with the reason recorded
    assert kernel_launches() >= 10
    assert all(r.fallback_reason for r in report.regions if r.schedule == "aten")


def test_swin_window_attention_fused_on_cuda() -> None:
    pytest.importorskip("torchvision")
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    torch.manual_seed(0)
    block = ShiftedWindowAttention(96, [7, 7], [3, 3], 3).eval().cuda().half()
    x = torch.randn(2, 14, 14, 96, device="cuda", dtype=torch.float16)
    out, _ = run_compiled(block, [x])
    assert rel_error(out, reference(block, x)) <= 2e-2
    assert convcompiler.counters["launch.window_attention"] == 1


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_inductor_launches_the_kernels_itself(mode, tmp_path) -> None:
    """Option launch="inductor": the regions' launchers are traced into the graph, so
    Inductor's wrapper launches the generated kernels (no im2win op in its output code);
    mode="reduce-overhead" replays them in a CUDA graph. Correct on every call."""
    model = small_net().cuda()
    options = {"launch": "inductor", "debug_dir": str(tmp_path)}
    compiled = torch.compile(model, backend="im2win", options=options, mode=mode)
    for _ in range(3):
        x = torch.randn(2, 3, 33, 31, device="cuda")
        with torch.no_grad():
            out = compiled(x)
        assert rel_error(out, reference(model, x)) <= TOL_TF32
    assert convcompiler.counters["inline.conv"] + convcompiler.counters["inline.conv_bn"] >= 3
    (dump,) = tmp_path.iterdir()
    code = "\n".join(p.read_text() for p in dump.glob("torchinductor/*/output_code.py"))
    assert "torch.ops.im2win" not in code and "conv_im2win" in code + "conv_gemm_1x1"
