"""GPU-free codegen checks: rendered source snapshots, and the static sm_90/sm_80 report.

Snapshots pin the generated text for a few fixed specs, so a refactor can prove it changed
nothing. After an intended template change, refresh them with

    CONVCOMPILER_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_codegen.py
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from convcompiler.codegen import SPACES, render_region
from convcompiler.devices import DEVICES
from convcompiler.frontend.kernels import attention_spec_of, conv_source, conv_spec_of
from convcompiler.inspection.aot import static_report
from convcompiler.spec import Activation, Epilogue

SNAPSHOTS = Path(__file__).parent / "snapshots"


def gpu_spec(x_shape, w_shape, stride, padding, dilation, groups, dtype, channels_last=False):
    x, w = torch.empty(x_shape, dtype=dtype), torch.empty(w_shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    spec = conv_spec_of(x, w, None, stride, padding, dilation, groups)
    return dataclasses.replace(
        spec, device="cuda", precision="tf32" if dtype == torch.float32 else "ieee"
    )


def fixed(spec, name, **params):
    params = {"GROUP_M": 8, "num_stages": 3, **params}
    return spec, SPACES[name].make(spec, device=DEVICES["h100"], **params)


def swin_stage1_attention(dtype):
    """Swin-T stage 1, batch 8: 512 windows x 3 heads, N = 49, head_dim 32, shifted."""
    q = torch.empty(512, 3, 49, 32, dtype=dtype)
    spec = attention_spec_of(
        q,
        q,
        q,
        torch.empty(3, 49, 49, dtype=dtype),
        torch.empty(64, 49, 49, dtype=dtype),
        output="bnc",
    )
    spec = dataclasses.replace(spec, device="cuda")
    schedule = SPACES["window_attention"].make(
        spec, device=DEVICES["h100"], BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=2
    )
    return spec, schedule


GEMM = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8)
FIXED = {
    "resnet_3x3_fp16_nchw_band": fixed(
        gpu_spec((8, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1, 1, torch.float16),
        "im2win_band",
        M_TILES="image",
        FILL_W=64,
        FILL_C=64,
        **GEMM,
    ),
    "alexnet_11x11_fp32_implicit": fixed(
        gpu_spec((8, 3, 227, 227), (96, 3, 11, 11), 4, 0, 1, 1, torch.float32),
        "im2win_implicit",
        M_TILES="image",
        REDUCTION="flat",
        **GEMM,
    ),
    "depthwise_3x3_bf16_nhwc_implicit": fixed(
        gpu_spec((8, 96, 28, 28), (96, 1, 3, 3), 2, 1, 1, 96, torch.bfloat16, True),
        "im2win_implicit",
        M_TILES="batch",
        REDUCTION="flat",
        **{**GEMM, "BLOCK_N": 16, "BLOCK_K": 16},
    ),
    "depthwise_5x5_fp16_direct": fixed(
        gpu_spec((8, 96, 28, 28), (96, 1, 5, 5), 1, 2, 1, 96, torch.float16),
        "direct_depthwise",
        M_TILES="image",
        BLOCK_M=64,
        BLOCK_C=32,
        num_warps=4,
        **{"num_stages": 2},
    ),
    "resnet_3x3_bn_add_relu_fp16_implicit": fixed(
        dataclasses.replace(
            gpu_spec((8, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1, 1, torch.float16),
            epilogue=Epilogue(bn="affine", residual=True, post_act=Activation("relu")),
        ),
        "im2win_implicit",
        M_TILES="image",
        REDUCTION="tap",
        **GEMM,
    ),
    "pointwise_fp16_gemm": fixed(
        gpu_spec((8, 256, 14, 14), (1024, 256, 1, 1), 1, 0, 1, 1, torch.float16),
        "gemm_1x1",
        M_TILES="image",
        **GEMM,
    ),
    "swin_window_attention_fp16_mask": swin_stage1_attention(torch.float16),
    # CycleGAN's residual blocks: a 3x3 conv reading its reflect padding in place
    "cyclegan_3x3_reflect_fp16_implicit": fixed(
        dataclasses.replace(
            gpu_spec((8, 256, 64, 64), (256, 256, 3, 3), 1, 1, 1, 1, torch.float16),
            padding_mode="reflect",
        ),
        "im2win_implicit",
        M_TILES="image",
        REDUCTION="tap",
        **GEMM,
    ),
    # the backward kernels, reading dy as (g, mask): a ReLU's backward fused in
    "resnet_3x3_s2_fp16_dgrad_masked": fixed(
        dataclasses.replace(
            conv_spec_of(torch.empty(8, 128, 28, 28, dtype=torch.float16),
                         torch.empty(128, 64, 3, 3, dtype=torch.float16), None, 2, 1, 1, 1,
                         transposed=True, output_padding=1),
            device="cuda", precision="ieee", input_mask=True,
        ),
        "transposed_phase",
        **{**GEMM, "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4},
    ),
    "resnet_3x3_fp16_wgrad_masked_split4": (
        spec := dataclasses.replace(
            gpu_spec((8, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1, 1, torch.float16),
            op="conv_wgrad", input_mask=True,
        ),
        SPACES["wgrad_splitk"].make(spec, device=DEVICES["h100"], BLOCK_M=64, BLOCK_N=64,
                                    BLOCK_K=32, SPLIT=4, num_warps=4, num_stages=3),
    ),
}


@pytest.mark.parametrize("name", sorted(FIXED))
def test_source_snapshot(name: str) -> None:
    spec, schedule = FIXED[name]
    text = render_region(spec, schedule).text
    path = SNAPSHOTS / f"{name}.py.txt"
    if os.environ.get("CONVCOMPILER_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing snapshot {path}; run with CONVCOMPILER_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text(), f"generated source for {name} changed"


def test_rendered_source_is_readable_and_self_describing() -> None:
    spec, schedule = FIXED["resnet_3x3_fp16_nchw_band"]
    text = conv_source(spec, schedule).text
    assert text.startswith('"""Generated by convcompiler')
    assert spec.describe() in text and "def launch(x, weight, bias=None, bn_weight=None" in text
    for stage in ("# ---- 1. the tile", "# ---- 3. reduction", "# ---- 5. store"):
        assert stage in text
    for banned in ("tl.zeros", "tl.cdiv", "tl.sum("):  # jit helpers the interpreter cannot call
        assert banned not in text


@pytest.mark.parametrize("name", sorted(FIXED))
def test_static_report_no_spills_and_tensor_cores(name: str) -> None:
    """Compile for sm_90 and sm_80 without a GPU: no spills, shared memory fits, mma/wgmma."""
    spec, schedule = FIXED[name]
    stats = static_report(render_region(spec, schedule), spec, ("sm_90", "sm_80"))
    assert stats
    for st in stats:
        assert st.ok, (st, st.problems())
        if st.uses_dot:
            assert (st.wgmma if st.arch == "sm_90" else st.mma) > 0, st
