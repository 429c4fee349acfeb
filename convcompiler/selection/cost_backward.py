"""The cost model for the conv's backward kernels (see cost.py for the roofline it shares):
transposed convolutions (a conv's input gradient is one) and weight gradients.

Transposed convolutions.
Useful work: every input pixel times the whole kernel, 2*N*H*W*C*(K/groups)*KH*KW FLOPs.
`transposed_phase` runs one GEMM per stride phase: ceil(HO/SH)*ceil(WO/SW) rows each (the
largest phase sizes the grid, smaller ones leave tiles idle), reduced over the phase's live
taps, at most ceil(KH/SH)*ceil(KW/SW) of them. It reads x once per column tile and the weight
once per row tile (through L2 when they fit), and writes the output once.
ATen (cuDNN's dgrad kernels) is the same roofline with the forward conv's efficiency prior.

Weight gradients. The useful work is the forward conv's, 2*N*HO*WO*K*(C/groups)*KH*KW.
`wgrad_splitk` runs one GEMM per tap, [K/groups x C/groups] reduced over the pixels, split
SPLIT ways: dy is read once per input-channel tile and tap, x once per output-channel tile
and tap (through L2 when they fit); with SPLIT > 1 the fp32 partial sums are written and read
back once more, by a second kernel. ATen (cuDNN's wgrad) is the forward conv's roofline.
"""

from __future__ import annotations

from ..schedule import Schedule
from ..spec import ConvSpec
from .cost import (
    _ITEMSIZE,
    ATEN_EFFICIENCY,
    MEMORY_EFFICIENCY,
    _cdiv,
    _max,
    _reread,
    conv_class,
    math_kind,
)
from .devices import Device

PHASE_EFFICIENCY = 0.40  # gathered rows (stride-phase addresses), as the implicit NCHW GEMM


def _live_taps(spec: ConvSpec) -> int:
    """The most taps one phase runs: ceil(KH/SH) * ceil(KW/SW) at dilation 1 (a dilation
    sharing a factor with the stride leaves some phases with none and others with more)."""
    (kh, kw), (sh, sw) = spec.kernel, spec.stride
    return -(-kh // sh) * -(-kw // sw)


def transposed_time(spec: ConvSpec, schedule: Schedule, device: Device, symbolic: bool):
    """(seconds, compute, memory, launch, useful flops, padded flops, bytes, workspace, ctas)."""
    val = (lambda s: s) if symbolic else spec.hint
    n = val(spec.batch)
    h, w = (val(s) for s in spec.in_size)
    ho, wo = (val(s) for s in spec.out_size)
    c, k, g = spec.in_channels, spec.out_channels, spec.groups
    cg, kg = spec.in_channels_per_group, spec.out_channels_per_group
    (kh, kw), (sh, sw) = spec.kernel, spec.stride
    e = _ITEMSIZE[spec.dtype]
    kind = math_kind(spec, schedule)
    flops = 2 * n * h * w * c * kg * kh * kw
    x_bytes, y_bytes, w_bytes = n * c * h * w * e, n * k * ho * wo * e, c * kg * kh * kw * e
    if schedule.name == "aten":
        eff = ATEN_EFFICIENCY[conv_class(spec)]
        padded, traffic, ctas = flops, x_bytes + w_bytes + y_bytes, 1
    else:
        s = schedule.as_dict()
        rows = n * _cdiv(ho, sh) * _cdiv(wo, sw)
        tiles_m, tiles_n = _cdiv(rows, s["BLOCK_M"]), _cdiv(kg, s["BLOCK_N"])
        reduce = _live_taps(spec) * _cdiv(cg, s["BLOCK_K"]) * s["BLOCK_K"]
        phases = sh * sw
        ctas = tiles_m * tiles_n * g * phases
        padded = 2 * ctas * s["BLOCK_M"] * s["BLOCK_N"] * reduce
        slots = device.sms * (2 if s["num_warps"] <= 4 else 1)
        padded = padded * (_cdiv(ctas, slots) * slots) / _max(ctas, 1)
        eff = PHASE_EFFICIENCY
        traffic = (
            _reread(x_bytes, tiles_n * phases, device)
            + _reread(w_bytes, tiles_m, device)
            + y_bytes
        )
    e_ = spec.epilogue
    launches = 1
    if schedule.name == "aten":
        ops = [bool(e_.bn), e_.act is not None, e_.residual, e_.post_act is not None]
        traffic += (2 * ops[0] + 2 * ops[1] + 3 * ops[2] + 2 * ops[3]) * y_bytes
        launches += sum(ops)
    elif e_.residual:
        traffic += y_bytes
    compute = padded / (device.peak(kind) * eff)
    memory = traffic / (device.bandwidth * MEMORY_EFFICIENCY)
    launch = launches * device.launch_us * 1e-6
    return _max(compute, memory) + launch, compute, memory, launch, flops, padded, traffic, 0, ctas


def wgrad_time(spec: ConvSpec, schedule: Schedule, device: Device, symbolic: bool):
    """(seconds, compute, memory, launch, useful flops, padded flops, bytes, workspace, ctas)."""
    val = (lambda s: s) if symbolic else spec.hint
    n = val(spec.batch)
    h, w = (val(s) for s in spec.in_size)
    ho, wo = (val(s) for s in spec.out_size)
    c, k, g = spec.in_channels, spec.out_channels, spec.groups
    cg, kg = spec.in_channels_per_group, spec.out_channels_per_group
    taps = spec.kernel[0] * spec.kernel[1]
    e = _ITEMSIZE[spec.dtype]
    kind = math_kind(spec, schedule)
    pixels = n * ho * wo
    flops = 2 * pixels * k * cg * taps
    x_bytes, dy_bytes, dw_bytes = n * c * h * w * e, pixels * k * e, k * cg * taps * e
    launches, workspace = 1, 0
    if schedule.name == "aten":
        eff = ATEN_EFFICIENCY[conv_class(spec)]
        padded, traffic, ctas = flops, x_bytes + dy_bytes + dw_bytes, 1
    else:
        s = schedule.as_dict()
        tiles_m, tiles_n = _cdiv(kg, s["BLOCK_M"]), _cdiv(cg, s["BLOCK_N"])
        split = s["SPLIT"]
        steps = _cdiv(_cdiv(pixels, s["BLOCK_K"]), split) * split * s["BLOCK_K"]
        ctas = tiles_m * tiles_n * g * taps * split
        padded = 2 * tiles_m * tiles_n * g * taps * s["BLOCK_M"] * s["BLOCK_N"] * steps
        slots = device.sms * (2 if s["num_warps"] <= 4 else 1)
        padded = padded * (_cdiv(ctas, slots) * slots) / _max(ctas, 1)
        eff = PHASE_EFFICIENCY
        traffic = (
            _reread(dy_bytes, tiles_n * taps, device)
            + _reread(x_bytes, tiles_m * taps, device)
            + dw_bytes
        )
        if split > 1:
            workspace = split * k * cg * taps * 4
            traffic, launches = traffic + 2 * workspace, 2
    compute = padded / (device.peak(kind) * eff)
    memory = traffic / (device.bandwidth * MEMORY_EFFICIENCY)
    launch = launches * device.launch_us * 1e-6
    total = _max(compute, memory) + launch
    return total, compute, memory, launch, flops, padded, traffic, workspace, ctas


def wgrad_steps(spec: ConvSpec, schedule: Schedule) -> int:
    """Programs x loop trips, what Triton's interpreter pays for."""
    s = schedule.as_dict()
    pixels = spec.hint(spec.output_pixels)
    programs = _cdiv(spec.out_channels_per_group, s["BLOCK_M"])
    programs *= _cdiv(spec.in_channels_per_group, s["BLOCK_N"])
    programs *= spec.groups * spec.kernel[0] * spec.kernel[1] * s["SPLIT"]
    return programs * _cdiv(_cdiv(pixels, s["BLOCK_K"]), s["SPLIT"])


def transposed_steps(spec: ConvSpec, schedule: Schedule) -> int:
    """Programs x live loop trips, what Triton's interpreter pays for."""
    s = schedule.as_dict()
    n, (ho, wo) = spec.hint(spec.batch), (spec.hint(v) for v in spec.out_size)
    (sh, sw) = spec.stride
    rows = n * _cdiv(ho, sh) * _cdiv(wo, sw)
    programs = _cdiv(rows, s["BLOCK_M"]) * _cdiv(spec.out_channels_per_group, s["BLOCK_N"])
    programs *= spec.groups * sh * sw
    return programs * _live_taps(spec) * _cdiv(spec.in_channels_per_group, s["BLOCK_K"])
