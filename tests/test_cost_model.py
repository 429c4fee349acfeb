"""Named cost-model cases, with the device specs fixed here (not read from the table)."""

from __future__ import annotations

import dataclasses

import pytest
import sympy
import torch

from convcompiler.config import Config
from convcompiler.devices import Device
from convcompiler.frontend.kernels import conv_spec_of
from convcompiler.schedule import ATEN
from convcompiler.selection.cost import predict
from convcompiler.selection.select import SelectionContext, select_conv_schedule

# Two fixed devices with different FLOP-to-byte ratios (fp16 tensor-core peak / DRAM).
H100_LIKE = Device(
    "test-h100",
    "H100-like",
    (9, 0),
    132,
    (("fp32", 67.0), ("tf32", 494.7), ("fp16", 989.4), ("bf16", 989.4)),
    3350.0,
    50 * 2**20,
    227 * 1024,
)
A100_LIKE = Device(
    "test-a100",
    "A100-like",
    (8, 0),
    108,
    (("fp32", 19.5), ("tf32", 156.0), ("fp16", 312.0), ("bf16", 312.0)),
    2039.0,
    40 * 2**20,
    163 * 1024,
)
IM2WIN = ("im2win_band", "im2win_implicit")


def gpu_spec(
    x_shape,
    w_shape,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    dtype=torch.float16,
    channels_last=False,
):
    x, w = torch.empty(x_shape, dtype=dtype), torch.empty(w_shape, dtype=dtype)
    if channels_last:
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    return dataclasses.replace(
        conv_spec_of(x, w, None, stride, padding, dilation, groups), device="cuda"
    )


def choose_on(spec, device):
    return select_conv_schedule(spec, SelectionContext(Config(cache=False), device, "test"))


def test_pointwise_1x1_picks_gemm() -> None:
    choice = choose_on(gpu_spec((32, 256, 28, 28), (512, 256, 1, 1)), H100_LIKE)
    assert choice.schedule.name == "gemm_1x1", choice.why


def test_depthwise_3x3_picks_direct() -> None:
    choice = choose_on(gpu_spec((32, 96, 56, 56), (96, 1, 3, 3), 1, 1, groups=96), H100_LIKE)
    assert choice.schedule.name == "direct_depthwise", choice.why


def test_im2win_table_conv1_picks_im2win() -> None:
    """conv1 of the im2win paper: C=3, 11x11, stride 4, batch 128, fp32."""
    spec = gpu_spec((128, 3, 227, 227), (96, 3, 11, 11), 4, dtype=torch.float32)
    for device in (H100_LIKE, A100_LIKE):
        choice = choose_on(spec, device)
        assert choice.schedule.name in IM2WIN, (device.name, choice.why)


def test_large_channel_3x3_fp16_on_h100_says_why() -> None:
    choice = choose_on(gpu_spec((32, 512, 14, 14), (512, 512, 3, 3), 1, 1), H100_LIKE)
    print(f"\nlarge-channel 3x3 fp16 on H100: {choice.schedule.describe()}\n  why: {choice.why}")
    assert choice.why.startswith(choice.schedule.name) and " us " in choice.why
    assert len(choice.candidates) >= 8


def test_choice_flips_with_the_flop_to_byte_ratio() -> None:
    """The 11x11 stem: on the compute-rich H100-like device the band's extra traffic does
    not pay; on the A100-like one the band's better compute efficiency does."""
    assert H100_LIKE.flops_per_byte("fp16") > 1.8 * A100_LIKE.flops_per_byte("fp16")
    spec = gpu_spec((128, 3, 227, 227), (96, 3, 11, 11), 4)
    on_h100, on_a100 = choose_on(spec, H100_LIKE), choose_on(spec, A100_LIKE)
    assert on_h100.schedule.name == "im2win_implicit", on_h100.why
    assert on_a100.schedule.name == "im2win_band", on_a100.why


def test_channels_last_spares_cudnn_the_transposes() -> None:
    nchw = gpu_spec((32, 64, 56, 56), (64, 64, 3, 3), 1, 1)
    nhwc = gpu_spec((32, 64, 56, 56), (64, 64, 3, 3), 1, 1, channels_last=True)
    slow, fast = predict(nchw, ATEN, H100_LIKE), predict(nhwc, ATEN, H100_LIKE)
    assert slow.bytes > fast.bytes and slow.at_hint > fast.at_hint


def test_tiny_conv_is_launch_bound() -> None:
    choice = choose_on(gpu_spec((1, 8, 8, 8), (8, 8, 3, 3), 1, 1), H100_LIKE)
    pred = choice.prediction
    assert pred.launch_s > pred.compute_s and pred.launch_s > pred.memory_s


def test_band_workspace_and_padding_are_counted() -> None:
    spec = gpu_spec((2, 16, 33, 31), (24, 16, 3, 3), 1, 1)
    band = choose_on(spec, H100_LIKE)  # any schedule; build the band one explicitly
    from convcompiler.codegen import SPACES

    schedule = SPACES["im2win_band"].make(
        spec,
        BLOCK_M=64,
        BLOCK_N=32,
        BLOCK_K=32,
        GROUP_M=8,
        M_TILES="image",
        FILL_W=32,
        FILL_C=16,
        num_warps=4,
        num_stages=3,
    )
    pred = predict(spec, schedule, H100_LIKE)
    wb = (31 - 1) * 1 + 2 + 1
    assert pred.workspace_bytes == 2 * 16 * 33 * wb * 3 * 2
    assert pred.padded_flops > pred.flops > 0
    assert band.prediction is not None


def test_cost_is_symbolic_in_a_dynamic_batch() -> None:
    spec = gpu_spec((8, 32, 28, 28), (64, 32, 3, 3), 1, 1)
    s0 = sympy.Symbol("s0", integer=True, positive=True)
    dynamic = dataclasses.replace(spec, batch=s0, hints=(("s0", 8),))
    choice = choose_on(dynamic, H100_LIKE)
    seconds = choice.prediction.seconds
    assert isinstance(seconds, sympy.Basic) and s0 in seconds.free_symbols
    assert float(seconds.subs(s0, 8)) == pytest.approx(choice.prediction.at_hint)
    assert "s0" in choice.valid_for and "<= s0 <=" in choice.valid_for


@pytest.mark.parametrize("op,schedule", [("conv_wgrad", "wgrad_splitk"),
                                         ("conv_transpose", "transposed_phase")])
def test_a_masked_gradient_costs_its_mask_and_spares_the_copy(op: str, schedule: str) -> None:
    """ReLU's mask fused into a gradient kernel: the kernel reads 1 byte more per gradient
    element (once here: everything fits in L2); ATen first writes the masked copy (read g and
    the mask, write the copy: one more kernel)."""
    from convcompiler.codegen import SPACES

    # dy [8, 64, 28, 28]: the weight gradient's, or the transposed conv's x (an input gradient)
    spec = dataclasses.replace(gpu_spec((8, 64, 28, 28), (64, 64, 3, 3), 1, 1), op=op)
    masked = dataclasses.replace(spec, input_mask=True)
    grad_elements = 8 * 64 * 28 * 28  # dy, or the transposed conv's x: the same size here
    kernel = next(SPACES[schedule].candidates(spec, device=H100_LIKE))
    plain, fused = predict(spec, kernel, H100_LIKE), predict(masked, kernel, H100_LIKE)
    assert fused.bytes - plain.bytes == grad_elements  # the bool mask, read once
    aten_plain, aten_masked = predict(spec, ATEN, H100_LIKE), predict(masked, ATEN, H100_LIKE)
    assert aten_masked.bytes - aten_plain.bytes == grad_elements * (2 + 2 + 1)
    assert aten_masked.launch_s > aten_plain.launch_s
