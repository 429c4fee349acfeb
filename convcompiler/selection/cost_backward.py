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

A masked gradient (spec.input_mask: where(mask, 0, g) fused in): the kernel reads the 1-byte
mask wherever it reads g. ATen reads the masked copy, which one more kernel writes from g and
the mask first (read g and the mask, write the copy).
"""

from __future__ import annotations

from ..devices import Device
from ..schedule import Schedule
from ..spec import ConvSpec
from .cost import (
    ATEN_EFFICIENCY,
    MEMORY_EFFICIENCY,
    _cdiv,
    _max,
    _reread,
    _Sizes,
    conv_class,
    last_wave,
    math_kind,
)

PHASE_EFFICIENCY = 0.40  # gathered rows (stride-phase addresses), as the implicit NCHW GEMM


def _live_taps(spec: ConvSpec) -> int:
    """The most taps one phase runs: ceil(KH/SH) * ceil(KW/SW) at dilation 1 (a dilation
    sharing a factor with the stride leaves some phases with none and others with more);
    a 3-D conv's slices ceil(KD/SD) depth taps each, times that."""
    (kh, kw), (sh, sw) = spec.kernel, spec.stride
    d = spec.depth
    return -(-kh // sh) * -(-kw // sw) * (-(-d.kernel // d.stride) if d else 1)


def _masked(grad_bytes, z: _Sizes, spec: ConvSpec, schedule: Schedule, rereads, device: Device):
    """(extra traffic, extra launches) of a masked gradient of `grad_bytes` (see above)."""
    if not spec.input_mask:
        return 0, 0
    mask_bytes = grad_bytes / z.e
    if schedule.name == "aten":
        return 2 * grad_bytes + mask_bytes, 1
    return _reread(mask_bytes, rereads, device), 0


def _roofline(padded, eff, kind, traffic, launches, device: Device) -> tuple:
    """(seconds, compute, memory, launch): the roofline cost.py's `_time` applies."""
    compute = padded / (device.peak(kind) * eff)
    memory = traffic / (device.bandwidth * MEMORY_EFFICIENCY)
    launch = launches * device.launch_us * 1e-6
    return _max(compute, memory) + launch, compute, memory, launch


def transposed_time(spec: ConvSpec, schedule: Schedule, device: Device, symbolic: bool):
    """(seconds, compute, memory, launch, useful flops, padded flops, bytes, workspace, ctas)."""
    z = _Sizes(spec, symbolic)
    sh, sw = spec.stride
    flops = 2 * z.n * z.h * z.w * z.c * z.kg * z.kh * z.kw
    x_bytes, y_bytes = z.n * z.c * z.h * z.w * z.e, z.n * z.k * z.ho * z.wo * z.e
    w_bytes = z.c * z.kg * z.kh * z.kw * z.e
    if schedule.name == "aten":
        eff = ATEN_EFFICIENCY[conv_class(spec)]
        padded, traffic, ctas, x_uses = flops, x_bytes + w_bytes + y_bytes, 1, 1
    else:
        s = schedule.as_dict()
        rows = z.n * z.slices * _cdiv(z.rows, sh) * _cdiv(z.wo, sw)  # every depth slice
        tiles_m, tiles_n = _cdiv(rows, s["BLOCK_M"]), _cdiv(z.kg, s["BLOCK_N"])
        reduce = _live_taps(spec) * _cdiv(z.cg, s["BLOCK_K"]) * s["BLOCK_K"]
        phases = sh * sw
        ctas = tiles_m * tiles_n * z.g * phases
        padded = 2 * ctas * s["BLOCK_M"] * s["BLOCK_N"] * reduce
        padded = last_wave(padded, ctas, s["num_warps"], device)
        eff = PHASE_EFFICIENCY
        x_uses = tiles_n * phases
        traffic = (
            _reread(x_bytes, x_uses, device) + _reread(w_bytes, tiles_m, device) + y_bytes
        )
    e = spec.epilogue
    extra, launches = _masked(x_bytes, z, spec, schedule, x_uses, device)
    traffic, launches = traffic + extra, launches + 1
    if schedule.name == "aten":
        ops = [bool(e.bn), e.act is not None, e.residual, e.post_act is not None]
        traffic += (2 * ops[0] + 2 * ops[1] + 3 * ops[2] + 2 * ops[3]) * y_bytes
        launches += sum(ops)
    elif e.residual:
        traffic += y_bytes
    times = _roofline(padded, eff, math_kind(spec, schedule), traffic, launches, device)
    return (*times, flops, padded, traffic, 0, ctas)


def wgrad_time(spec: ConvSpec, schedule: Schedule, device: Device, symbolic: bool):
    """(seconds, compute, memory, launch, useful flops, padded flops, bytes, workspace, ctas)."""
    z = _Sizes(spec, symbolic)
    taps = z.kh * z.kw
    flops = 2 * z.m * z.k * z.cg * taps
    x_bytes, dy_bytes = z.n * z.c * z.h * z.w * z.e, z.m * z.k * z.e
    dw_bytes = z.k * z.cg * taps * z.e
    launches, workspace = 1, 0
    if schedule.name == "aten":
        eff = ATEN_EFFICIENCY[conv_class(spec)]
        padded, traffic, ctas, dy_uses = flops, x_bytes + dy_bytes + dw_bytes, 1, 1
    else:
        s = schedule.as_dict()
        tiles_m, tiles_n = _cdiv(z.kg, s["BLOCK_M"]), _cdiv(z.cg, s["BLOCK_N"])
        dy_uses = tiles_n * taps
        split = s["SPLIT"]
        steps = _cdiv(_cdiv(z.m, s["BLOCK_K"]), split) * split * s["BLOCK_K"]
        ctas = tiles_m * tiles_n * z.g * taps * split
        padded = 2 * tiles_m * tiles_n * z.g * taps * s["BLOCK_M"] * s["BLOCK_N"] * steps
        padded = last_wave(padded, ctas, s["num_warps"], device)
        eff = PHASE_EFFICIENCY
        traffic = (
            _reread(dy_bytes, dy_uses, device)
            + _reread(x_bytes, tiles_m * taps, device)
            + dw_bytes
        )
        if split > 1:
            workspace = split * z.k * z.cg * taps * 4
            traffic, launches = traffic + 2 * workspace, 2
    extra, launches_extra = _masked(dy_bytes, z, spec, schedule, dy_uses, device)
    traffic, launches = traffic + extra, launches + launches_extra
    times = _roofline(padded, eff, math_kind(spec, schedule), traffic, launches, device)
    return (*times, flops, padded, traffic, workspace, ctas)


def wgrad_steps(spec: ConvSpec, schedule: Schedule) -> int:
    """Programs x loop trips, what Triton's interpreter pays for."""
    s = schedule.as_dict()
    pixels = spec.hint(spec.output_pixels)
    programs = _cdiv(spec.out_channels_per_group, s["BLOCK_M"])
    programs *= _cdiv(spec.in_channels_per_group, s["BLOCK_N"])
    taps = spec.kernel[0] * spec.kernel[1] * (spec.depth.kernel if spec.depth else 1)
    programs *= spec.groups * taps * s["SPLIT"]
    return programs * _cdiv(_cdiv(pixels, s["BLOCK_K"]), s["SPLIT"])


def transposed_steps(spec: ConvSpec, schedule: Schedule) -> int:
    """Programs x live loop trips, what Triton's interpreter pays for."""
    s = schedule.as_dict()
    n, (ho, wo) = spec.hint(spec.batch), (spec.hint(v) for v in spec.out_size)
    (sh, sw) = spec.stride
    rows = n * _cdiv(ho, sh) * _cdiv(wo, sw) * (spec.hint(spec.depth.out) if spec.depth else 1)
    programs = _cdiv(rows, s["BLOCK_M"]) * _cdiv(spec.out_channels_per_group, s["BLOCK_N"])
    programs *= spec.groups * sh * sw
    return programs * _live_taps(spec) * _cdiv(spec.in_channels_per_group, s["BLOCK_K"])
