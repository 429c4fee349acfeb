"""Schedule selection for conv regions: one function, a fixed order.

    1. an explicit override: option cpu="aten" on CPU tensors, then option schedule=...
    2. the interim rule below (the cost-model issue replaces it with a cost model, a
       tuned-record cache and autotuning, in that order after the override)

The interim rule:
    * im2win_band when groups == 1, the window is larger than 1x1, the input is not
      channels_last, and the band fits in BAND_LIMIT_BYTES. On NCHW input the band turns
      every window into one contiguous run, so the GEMM loads need no gathers or bounds checks.
    * im2win_implicit otherwise: channels_last input (channels are already contiguous),
      1x1 kernels (the band would be a copy of x), grouped and depthwise convs.

Tiles: under Triton's interpreter (CPU tensors) the cost is per program and per op, not per
FLOP, so the tiles are as large as the problem allows. On a GPU: BLOCK_N follows the
channels per group, BLOCK_M x BLOCK_N = 8192, BLOCK_K = 32, 8 warps, 3 stages, which the
static report shows spill-free on sm_80 and sm_90 for every template. NCHW outputs use
image tiles (a tile stays in one image, so its stores are contiguous) once an image has at
least 64 output pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .codegen import SPACES
from .codegen.im2win_band import band_elements
from .config import Config
from .schedule import ATEN, InvalidSchedule, Param, Schedule
from .spec import ConvSpec

log = logging.getLogger(__name__)

BAND_LIMIT_BYTES = 256 * 2**20
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Choice:
    """The selected schedule, why it was chosen, and (for ATen) why no kernel runs."""

    schedule: Schedule
    why: str
    fallback_reason: str | None = None


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return max(lo, min(hi, p))


def default_params(spec: ConvSpec, name: str) -> dict[str, Param]:
    """The rule's tile parameters for schedule `name` on this spec."""
    m = spec.hint(spec.output_pixels)
    kg, cg = spec.out_channels_per_group, spec.in_channels_per_group
    flat = cg < 16
    reduce_len = spec.reduction if (flat or name == "im2win_band") else cg
    if spec.device == "cpu":
        block_m, block_n = _pow2_clamp(m, 16, 128), _pow2_clamp(kg, 16, 128)
        block_k, warps, stages = _pow2_clamp(reduce_len, 16, 128), 4, 1
    else:
        # Chosen with the static report (convcompiler.aot): BLOCK_K=32 and 8 warps keep
        # every template free of spills on sm_80 and sm_90, gathers included.
        block_n = _pow2_clamp(kg, 16, 128)
        block_m = 128 if block_n <= 64 else 64
        block_k, warps, stages = (16 if reduce_len <= 16 else 32), 8, 3
    image_tiles = spec.output_layout == "nchw" and spec.hint(spec.batch) <= 65535 and (
        spec.hint(spec.out_size[0]) * spec.hint(spec.out_size[1]) >= 64
    )
    params: dict[str, Param] = dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        M_TILES="image" if image_tiles else "batch", num_warps=warps, num_stages=stages,
    )
    if name == "im2win_implicit":
        params["REDUCTION"] = "flat" if flat else "tap"
    if name == "im2win_band":
        ho, wo = (spec.hint(s) for s in spec.out_size)
        wb = (wo - 1) * spec.stride[1] + (spec.kernel[1] - 1) * spec.dilation[1] + 1
        fill_c = _pow2_clamp(cg, 1, 64)
        params["FILL_C"] = fill_c
        params["FILL_W"] = min(_pow2_clamp(wb, 16, 128), max(16, 4096 // fill_c))
    return params


def make_schedule(spec: ConvSpec, name: str) -> Schedule:
    if name == "aten":
        return ATEN
    return SPACES[name].make(spec, **default_params(spec, name))


def _rule(spec: ConvSpec) -> tuple[str, str]:
    kh, kw = spec.kernel
    band_bytes = band_elements(spec) * _ITEMSIZE[spec.dtype]
    if spec.groups != 1:
        return "im2win_implicit", f"rule: groups={spec.groups}, windows read in place"
    if kh * kw == 1:
        return "im2win_implicit", "rule: 1x1 kernel, the band would only copy the input"
    if spec.input_layout == "nhwc":
        return "im2win_implicit", "rule: channels_last input, windows already contiguous in c"
    if band_bytes > BAND_LIMIT_BYTES:
        return "im2win_implicit", f"rule: band of {band_bytes / 2**20:.0f} MiB is over the limit"
    return "im2win_band", (
        f"rule: {kh}x{kw} window on {spec.input_layout} input, "
        f"band of {band_bytes / 2**20:.2f} MiB makes each window one contiguous run"
    )


def select_conv_schedule(spec: ConvSpec, config: Config) -> Choice:
    """Pick the schedule for one conv region (see the module docstring for the order)."""
    if spec.device == "cpu" and config.cpu == "aten":
        reason = "option cpu='aten': convolutions on CPU tensors run ATen"
        return Choice(ATEN, reason, fallback_reason=reason)
    if config.schedule == "aten":
        reason = "option schedule='aten'"
        return Choice(ATEN, reason, fallback_reason=reason)
    if config.schedule is not None:
        try:
            return Choice(make_schedule(spec, config.schedule), f"option schedule={config.schedule!r}")
        except InvalidSchedule as err:
            log.warning("schedule %r rejected for %s: %s", config.schedule, spec.describe(), err)
    name, why = _rule(spec)
    return Choice(make_schedule(spec, name), why)
