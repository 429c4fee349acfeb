"""CI gate: every kernel planned for these models compiles for sm_90 and sm_80 without a
GPU, with 0 spills, shared memory within the limit, and tensor cores in GEMM-like kernels.

The plans are made with verify=False, so what keeps the kernels clean is the schedule
spaces' own constraints (the static check at compile time is a second line of defence).
"""

from __future__ import annotations

import pytest

from convcompiler.inspection.cli import static_table

ARCHS = ["sm_90", "sm_80"]
GATE = {
    # model: (input, extra options)
    "resnet50": ("1,3,64,64", {}),
    "resnet50-band": ("1,3,64,64", {"schedule": "im2win_band"}),
    "resnet50-implicit": ("1,3,64,64", {"schedule": "im2win_implicit"}),
    "mobilenet_v2": ("1,3,64,64", {}),
    "mobilenet_v2-direct": ("1,3,64,64", {"schedule": "direct_depthwise"}),
    "convnext_tiny": ("1,3,64,64", {"schedule": "im2win_implicit"}),
    "swin_t": ("1,3,64,64", {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(GATE))
def test_static_gate(case: str) -> None:
    model = "torchvision:" + case.split("-")[0]
    shape, options = GATE[case]
    stats = static_table(model, shape, "float32", ARCHS, {"verify": False, **options})
    assert stats, "no kernel was generated"
    assert {st.arch for st in stats} == set(ARCHS)
    failures = [(st.source, st.kernel, st.arch, st.problems()) for st in stats if not st.ok]
    assert not failures, failures
    for st in stats:
        if st.uses_dot:
            assert (st.wgmma + st.mma if st.arch == "sm_90" else st.mma) > 0, st


# the MLP blocks the cost model fuses at batch 32 on an H100 plan (Swin-T's and ConvNeXt-T's
# first two stages; wider ones stay per layer), each in its model's form
BLOCKS = {
    # name: (tokens, C, layer scale, residual, channels_first, dtype)
    "swin_t-stage2-fp16": (32 * 28 * 28, 192, False, True, False, "float16"),
    "convnext_tiny-stage1-bf16": (32 * 56 * 56, 96, True, True, True, "bfloat16"),
    "convnext_tiny-stage2-fp16": (32 * 28 * 28, 192, True, True, True, "float16"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_kernels_pass_the_static_check(name: str) -> None:
    from convcompiler.codegen import render_region
    from convcompiler.config import Config
    from convcompiler.inspection.aot import static_report
    from convcompiler.selection.choice import SelectionContext
    from convcompiler.selection.devices import lookup
    from convcompiler.selection.select import select_block
    from convcompiler.spec import Activation
    from convcompiler.spec_block import MlpSpec

    tokens, c, scale, residual, first, dtype = BLOCKS[name]
    spec = MlpSpec(tokens, c, 4 * c, c, Activation("gelu"), True, True, scale, residual, dtype,
                   "cuda", "ieee", norm="affine", norm_eps=1e-6, channels_first=first)
    config = Config(cpu="plan", verify=False, cache=False)
    choice = select_block(spec, SelectionContext(config, lookup("h100"), "test"))
    assert choice.fallback_reason is None and choice.schedule.name == "mlp_block", choice.why
    stats = static_report(render_region(spec, choice.schedule), spec, tuple(ARCHS))
    assert {st.arch for st in stats} == set(ARCHS)
    assert all(st.ok for st in stats), [(st.arch, st.problems()) for st in stats]
    assert all(st.uses_dot and st.tensor_core_ops > 0 for st in stats), stats
