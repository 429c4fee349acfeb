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
