"""Option launch="inductor" without a GPU: a region's launcher traces into the graph nodes
Inductor launches itself (runtime/direct.py). The end-to-end run is in test_gpu.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._subclasses import FakeTensorMode

from convcompiler.codegen import render_region
from convcompiler.frontend.kernels import attention_spec_of, choose, conv_spec_of
from convcompiler.runtime.direct import trace_launch
from convcompiler.spec import Activation, Epilogue


def _targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("schedule", ["im2win_implicit", "im2win_band", "gemm_1x1"])
def test_conv_launcher_traces_to_a_functional_triton_call(schedule) -> None:
    x, w, b = torch.randn(2, 16, 9, 9), torch.randn(8, 16, 3, 3), torch.randn(8)
    if schedule == "gemm_1x1":
        w = torch.randn(8, 16, 1, 1)
    epilogue = Epilogue(act=Activation("relu"))
    spec = dataclasses.replace(
        conv_spec_of(x, w, b, 1, 1 if schedule != "gemm_1x1" else 0, epilogue=epilogue),
        device="cuda",
    )
    from convcompiler.config import Config

    chosen = choose(spec, Config(cache=False, schedule=schedule)).schedule
    source = render_region(spec, chosen)
    with FakeTensorMode():
        operands = [torch.empty(t.shape, device="cuda") for t in (x, w, b)]
        gm = trace_launch(source, operands + [None] * 5)
    targets = _targets(gm)
    assert sum("triton_kernel_wrapper_functional" in t for t in targets) == len(source.kernels)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out.meta["val"].shape) == (2, 8, 9, 9)
    if schedule != "gemm_1x1":  # the weight pack is a visible op Inductor can fuse
        assert any("permute_copy" in t or "clone" in t for t in targets), targets


def test_attention_launcher_traces_to_a_functional_triton_call() -> None:
    q = k = v = torch.randn(8, 2, 49, 16)
    bias, mask = torch.randn(2, 49, 49), torch.randn(4, 49, 49)
    spec = dataclasses.replace(attention_spec_of(q, k, v, bias, mask, output="bnc"), device="cuda")
    from convcompiler.config import Config

    source = render_region(spec, choose(spec, Config(cache=False)).schedule)
    with FakeTensorMode():
        qkv = torch.empty(8, 49, 3, 2, 16, device="cuda").permute(2, 0, 3, 1, 4)
        operands = [qkv[0], qkv[1], qkv[2], torch.empty(2, 49, 49, device="cuda")]
        operands += [torch.empty(4, 49, 49, device="cuda"), None, None]
        gm = trace_launch(source, operands)
    assert sum("triton_kernel_wrapper_functional" in t for t in _targets(gm)) == 1
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out.meta["val"].shape) == (8, 49, 32)


def test_sdpa_launcher_traces_to_one_sdpa_call_and_pointwise_ops() -> None:
    """Schedule "sdpa" on (fake) CUDA tensors: the launcher traces to SDPA, the terms' sum
    and the NaN rows as ops Inductor fuses, and no Triton kernel. SDPA's backend is chosen
    as it is traced: with a CUDA runtime one of its fused ops; without one (this sandbox)
    its math decomposition, whose softmax is the safe one."""
    q = k = v = torch.randn(8, 2, 49, 16)
    bias, mask = torch.randn(2, 49, 49), torch.randn(4, 49, 49)
    spec = dataclasses.replace(attention_spec_of(q, k, v, bias, mask, output="bnc"), device="cuda")
    from convcompiler.config import Config

    chosen = choose(spec, Config(cache=False, schedule="sdpa")).schedule
    assert chosen.name == "sdpa"
    source = render_region(spec, chosen)
    assert source.kernels == ()
    with FakeTensorMode():
        qkv = torch.empty(8, 49, 3, 2, 16, device="cuda").permute(2, 0, 3, 1, 4)
        operands = [qkv[0], qkv[1], qkv[2], torch.empty(2, 49, 49, device="cuda")]
        operands += [torch.empty(4, 49, 49, device="cuda"), None, None]
        gm = trace_launch(source, operands)
    targets = _targets(gm)
    assert not any("triton_kernel_wrapper" in t for t in targets), targets
    expected = "scaled_dot_product" if torch.cuda.is_available() else "aten._safe_softmax"
    assert any(expected in t for t in targets), targets
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out.meta["val"].shape) == (8, 49, 32)


def test_lowering_inlines_the_launcher_in_place_of_the_region() -> None:
    """The post-grad lowering with launch="inductor" on (fake) CUDA tensors: the conv chain
    is gone, the traced kernel call stands in its place, and the report names the kernel."""
    import torch.nn.functional as F
    from torch.fx.experimental.proxy_tensor import make_fx

    import convcompiler
    from convcompiler.config import Config
    from convcompiler.frontend.session import CompileSession

    def f(x, w, b):
        return F.relu(F.conv2d(x, w, b, 1, 1))

    with FakeTensorMode():
        inputs = [
            torch.empty(2, 16, 9, 9, device="cuda"),
            torch.empty(8, 16, 3, 3, device="cuda"),
            torch.empty(8, device="cuda"),
        ]
        gm = make_fx(f, tracing_mode="real")(*inputs)
        config = Config(launch="inductor", verify=False, cache=False)
        session = CompileSession(config, gm, inputs)
        session.post_grad(gm)
    targets = _targets(gm)
    assert "aten.convolution.default" not in targets and "aten.relu.default" not in targets
    assert any("triton_kernel_wrapper_functional" in t for t in targets), targets
    assert not any("im2win" in t for t in targets)
    (region,) = session.report.regions
    assert region.fallback_reason is None and region.kernel_path is not None
    assert convcompiler.counters["inline.conv"] == 1
