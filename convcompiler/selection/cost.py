"""The analytic cost model: predict(spec, schedule, device) -> Prediction.

    time = max(compute, memory) + launches * device.launch_us

compute  padded FLOPs (tiles rounded up: M, N and the reduction) over the device's peak for
         the math the schedule uses (tensor cores: tf32/fp16/bf16; CUDA cores: fp32), times
         an efficiency prior per schedule, divided by the wave efficiency (the last wave of
         CTAs leaves SMs idle).
memory   bytes moved over bandwidth: input, weight and output once; the band workspace
         written and read; the filter repack when the weight is not already in im2win
         order; re-reads of an operand that does not fit in half of L2, once per tile that
         needs it (at most).
depthwise prologue (spec.prologue.dw, dw_gemm): the depthwise conv's input replaces x, read
         once per column tile, and its taps run on CUDA cores as often; under ATen the conv
         is one more kernel that reads its input and writes x.
ATen     the same roofline with cuDNN efficiency priors per conv class, times a calibration
         factor measured on the device (median measured/predicted of tuned ATen timings,
         stored in the tuning cache), when there is one.

Sizes may be sympy expressions (dynamic shapes): `predict(...).seconds` is then a symbolic
function of them, and `.at_hint` its value at the size hints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Union

import sympy

from ..devices import Device
from ..schedule import Schedule
from ..spec import AttentionSpec, ConvSpec
from ..spec_block import MlpSpec

Num = Union[int, float, sympy.Expr]

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
MEMORY_EFFICIENCY = 0.8

# Efficiency priors: fraction of peak FLOP/s the schedule's main loop reaches.
GEMM_EFFICIENCY = {
    "gemm_1x1": 0.75,  # contiguous operands, no taps
    "im2win_band": 0.70,  # contiguous window runs, no bounds checks
    "im2win_implicit": 0.60,  # contiguous channels (channels_last input)
    "dw_gemm": 0.60,  # its operand tiles come from registers (the depthwise taps)
}
PACKING_SCHEDULES = ("im2win_band", "im2win_implicit", "gemm_1x1")  # read the im2win-order filter
GATHER_EFFICIENCY = 0.40  # im2win_implicit on NCHW input, or the flat reduction: gathers
DIRECT_EFFICIENCY = 0.50  # direct_depthwise, CUDA-core FMAs
ATEN_EFFICIENCY = {"depthwise": 0.35, "stem": 0.35, "pointwise": 0.80, "general": 0.70}


@dataclass(frozen=True)
class Prediction:
    schedule: Schedule
    seconds: Num  # symbolic in the dynamic sizes
    at_hint: float  # seconds at the size hints
    compute_s: float
    memory_s: float
    launch_s: float
    flops: float  # useful FLOPs
    padded_flops: float
    bytes: float
    workspace_bytes: float
    math: str  # "tf32", "fp16", "bf16" or "fp32"
    ctas: int  # programs launched by the main kernel (1 for ATen)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def summary(self) -> str:
        # a sparse attention computes less than its useful (dense) FLOPs: no waste
        waste = max(0.0, 1 - self.flops / self.padded_flops) if self.padded_flops else 0.0
        return (
            f"{self.at_hint * 1e6:.1f} us ({self.bound}-bound:"
            f" compute {self.compute_s * 1e6:.1f} us on {self.math},"
            f" memory {self.memory_s * 1e6:.1f} us, {self.bytes / 2**20:.1f} MiB moved,"
            f" workspace {self.workspace_bytes / 2**20:.1f} MiB, tile waste {waste:.0%})"
        )


# ---- arithmetic that works on ints and on sympy expressions ----------------------------
def _cdiv(a: Num, b: int) -> Num:
    if isinstance(a, sympy.Basic):
        return sympy.ceiling(a / b)
    return -(-a // b)


def _max(a: Num, b: Num) -> Num:
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Max(a, b)
    return max(a, b)


def _min(a: Num, b: Num) -> Num:
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Min(a, b)
    return min(a, b)


def math_kind(spec: ConvSpec, schedule: Schedule) -> str:
    if schedule.name == "direct_depthwise" or (
        spec.dtype == "float32" and spec.precision == "ieee"
    ):
        return "fp32"
    return {"float32": "tf32", "float16": "fp16", "bfloat16": "bf16"}[spec.dtype]


def matmul_math(spec: AttentionSpec | MlpSpec) -> str:
    """The math of a region made of matmuls (attention, blocks): torch's matmul precision
    decides float32's, as for a linear."""
    if spec.dtype == "float32":
        return "tf32" if spec.precision == "tf32" else "fp32"
    return {"float16": "fp16", "bfloat16": "bf16"}[spec.dtype]


def _math(spec, schedule: Schedule) -> str:
    if isinstance(spec, (AttentionSpec, MlpSpec)):
        return matmul_math(spec)
    return math_kind(spec, schedule)


def conv_class(spec: ConvSpec) -> str:
    if spec.is_depthwise:
        return "depthwise"
    if spec.in_channels_per_group <= 4:
        return "stem"
    if spec.kernel == (1, 1):
        return "pointwise"
    return "general"


def filter_repack_free(spec: ConvSpec) -> bool:
    """True when the weight is already in im2win order ([K, KW, KH, (KD,) C/G] contiguous).

    Decided from the strides alone (no tensor is made: this runs under aot_autograd's fake
    mode, where even a meta tensor op costs milliseconds)."""
    k, c = spec.out_channels, spec.in_channels_per_group
    kh, kw = spec.kernel
    kd = spec.depth.kernel if spec.depth else 1  # a 3-D conv's [K, C, KD, KH, KW]
    if spec.weight_layout == "nhwc":  # channels_last: [K, C, (KD,) KH, KW] with C innermost
        strides = {"k": kd * kh * kw * c, "c": 1, "kd": kh * kw * c, "kh": kw * c, "kw": c}
    else:
        strides = {"k": c * kd * kh * kw, "c": kd * kh * kw, "kd": kh * kw, "kh": kw, "kw": 1}
    expected = 1  # walk [K, KW, KH, (KD,) C] from the innermost dim; size-1 dims never matter
    for dim, size in (("c", c), ("kd", kd), ("kh", kh), ("kw", kw), ("k", k)):
        if size != 1 and strides[dim] != expected:
            return False
        expected *= size
    return True


class _Sizes:
    """The spec's sizes, symbolic (as recorded) or at the hints."""

    def __init__(self, spec: ConvSpec, symbolic: bool) -> None:
        val = (lambda s: s) if symbolic else spec.hint
        self.val = val
        self.n = val(spec.batch)
        self.h, self.w = (val(s) for s in spec.in_size)
        self.ho, self.wo = (val(s) for s in spec.out_size)
        self.c, self.k, self.g = spec.in_channels, spec.out_channels, spec.groups
        self.cg, self.kg = spec.in_channels_per_group, spec.out_channels_per_group
        self.kh, self.kw = spec.kernel
        # a 3-D conv's output depth slices, and each slice's rows (1 and ho in 2-D)
        self.slices, self.rows = (val(spec.depth.out) if spec.depth else 1), self.ho
        if spec.depth:  # a 3-D conv: its depth folds into the rows (traffic and FLOPs)
            self.h, self.ho = self.h * val(spec.depth.size), self.ho * val(spec.depth.out)
            self.kh *= spec.depth.kernel
        self.p = self.ho * self.wo
        self.m = self.n * self.p
        self.e = _ITEMSIZE[spec.dtype]


def _depthwise(spec: ConvSpec, z: _Sizes) -> tuple[Num, Num, int]:
    """(its input's bytes, its FLOPs, its taps) of the depthwise conv a spec.prologue.dw
    kernel computes its input from; zeros without one."""
    dw = spec.prologue.dw
    if dw is None:
        return 0, 0, 0
    taps = dw.kernel[0] * dw.kernel[1]
    h, w = (z.val(s) for s in dw.image)
    return z.n * z.c * h * w * z.e, 2 * z.m * z.c * taps, taps


def last_wave(padded: Num, ctas: Num, num_warps: int, device: Device) -> Num:
    """Padded FLOPs counting the SMs the last wave of CTAs leaves idle."""
    slots = device.sms * (2 if num_warps <= 4 else 1)
    return padded * (_cdiv(ctas, slots) * slots) / _max(ctas, 1)


def _reread(operand_bytes: Num, uses: Num, device: Device) -> Num:
    """DRAM traffic of an operand used by `uses` tiles: once if it fits in half of L2."""
    return operand_bytes * _min(uses, _max(1, operand_bytes / (device.l2_bytes / 2)))


def _time(spec, schedule, device, symbolic):
    """(seconds, compute, memory, launch, useful flops, padded flops, bytes, workspace)."""
    z = _Sizes(spec, symbolic)
    s = schedule.as_dict()
    kind = math_kind(spec, schedule)
    peak = device.peak(kind)
    flops = 2 * z.m * z.k * z.cg * z.kh * z.kw
    x_bytes, y_bytes = z.n * z.c * z.h * z.w * z.e, z.m * z.k * z.e
    w_bytes = z.k * z.cg * z.kh * z.kw * z.e
    launches, workspace, ctas = 1, 0, 1
    dw_bytes, dw_flops, taps = _depthwise(spec, z)  # a depthwise prologue's conv
    dw_compute, dw_padded = 0, dw_flops

    if schedule.name == "aten":
        eff = ATEN_EFFICIENCY[conv_class(spec)]
        if spec.is_depthwise:
            peak = device.peak("fp32")
        padded = flops
        traffic = x_bytes + w_bytes + y_bytes
        if kind != "fp32" and spec.input_layout != "nhwc":
            # cuDNN's tensor-core kernels work in NHWC: an NCHW conv pays two transposes
            traffic, launches = traffic + 2 * x_bytes + 2 * y_bytes, launches + 2
        if spec.padding_mode != "zeros":
            # F.pad writes the padded copy (about x's size) and the conv reads it
            traffic, launches = traffic + 2 * x_bytes, launches + 1
        if spec.transforms_input:  # the mul (or BN and act) writes x' and the conv reads it
            traffic, launches = traffic + 2 * x_bytes, launches + 1
        if taps:  # the depthwise conv reads its input and writes x (cuDNN, CUDA cores)
            traffic, launches = traffic + dw_bytes + x_bytes, launches + 1
            dw_compute = dw_flops / (device.peak("fp32") * ATEN_EFFICIENCY["depthwise"])
        if spec.pool_sums:  # the pool reads y again
            traffic, launches = traffic + y_bytes, launches + 1
    else:
        image = s.get("M_TILES") == "image"
        rows = z.p if image else z.m
        bm = s["BLOCK_M"]
        bn = s.get("BLOCK_N", s.get("BLOCK_C"))
        tiles_m = _cdiv(rows, bm) * (z.n if image else 1)
        if schedule.name == "direct_depthwise":
            tiles_n, groups = _cdiv(z.k, bn), 1
            padded = 2 * tiles_m * bm * tiles_n * bn * z.kh * z.kw
            eff, a_bytes = DIRECT_EFFICIENCY, x_bytes
        else:
            tiles_n, groups, bk = _cdiv(z.kg, bn), z.g, s["BLOCK_K"]
            if schedule.name == "im2win_implicit" and s["REDUCTION"] == "tap":
                reduce = z.kh * z.kw * _cdiv(z.cg, bk) * bk
            else:
                reduce = _cdiv(z.cg * z.kh * z.kw, bk) * bk
            padded = 2 * tiles_m * bm * tiles_n * bn * groups * reduce
            eff = GEMM_EFFICIENCY[schedule.name]
            gathers = schedule.name == "im2win_implicit" and (
                spec.input_layout != "nhwc" or s["REDUCTION"] == "flat"
            )
            eff = GATHER_EFFICIENCY if gathers else eff
            a_bytes = x_bytes
            if taps:  # the depthwise conv's input instead, once per column tile, and the
                # taps on CUDA cores, as often (the halo rows re-read from L1/L2)
                a_bytes = dw_bytes
                dw_padded = 2 * tiles_m * bm * tiles_n * reduce * taps
                dw_compute = dw_padded / (device.peak("fp32") * DIRECT_EFFICIENCY)
            if schedule.name == "im2win_band":
                wb = (z.wo - 1) * spec.stride[1] + (z.kw - 1) * spec.dilation[1] + 1
                workspace = z.n * z.c * z.ho * wb * z.kh * z.e
                a_bytes, launches = workspace, 2
        ctas = tiles_m * tiles_n * groups
        padded = last_wave(padded, ctas, s["num_warps"], device)
        traffic = (
            _reread(a_bytes, tiles_n, device)
            + _reread(w_bytes, tiles_m, device)
            + y_bytes
            + (x_bytes + workspace if workspace else 0)
        )
        if taps:  # the depthwise weights (and bias), from L2 after the first tiles
            traffic += z.c * (taps + spec.prologue.dw.bias) * z.e
        if spec.pool_sums:  # each tile's share of the channel means, written and summed
            traffic += 2 * tiles_m * z.k * 4
        if spec.prologue.ln:  # the rows' statistics: two more passes over each tile's rows,
            # from L2 when x fits there (the GEMM's own pass brings them)
            traffic += 2 * (_reread(a_bytes, tiles_n, device) - a_bytes)
        if schedule.name in PACKING_SCHEDULES and not filter_repack_free(spec):
            traffic, launches = traffic + 2 * w_bytes, launches + 1

    e = spec.epilogue
    if schedule.name == "aten":
        # unfused: each epilogue op is its own kernel, reading and writing the output
        ops = [bool(e.bn or e.ln), e.act is not None, e.residual, e.post_act is not None]
        traffic += (2 * ops[0] + 2 * ops[1] + 3 * ops[2] + 2 * ops[3]) * y_bytes
        launches += sum(ops)
    elif e.residual:
        traffic += y_bytes  # the fused kernel reads the residual once
    compute = padded / (peak * eff) + dw_compute
    memory = traffic / (device.bandwidth * MEMORY_EFFICIENCY)
    launch = launches * device.launch_us * 1e-6
    return (
        _max(compute, memory) + launch,
        compute,
        memory,
        launch,
        flops + dw_flops,
        padded + dw_padded,
        traffic,
        workspace,
        ctas,
    )


def predict(
    spec: ConvSpec | AttentionSpec | MlpSpec,
    schedule: Schedule,
    device: Device,
    calibration: float = 1.0,
    symbolic: bool = True,
) -> Prediction:
    """Predicted run time of `schedule` on `device`; `calibration` scales ATen estimates.

    With dynamic sizes and `symbolic`, `.seconds` is a sympy expression in them."""
    scale = calibration if schedule.name == "aten" else 1.0
    timer = _time
    if isinstance(spec, AttentionSpec):
        from .cost_attention import attention_time as timer
    elif isinstance(spec, MlpSpec):
        from .cost_block import mlp_time as timer
    elif spec.op == "conv_transpose":
        from .cost_backward import transposed_time as timer
    elif spec.op == "conv_wgrad":
        from .cost_backward import wgrad_time as timer
    total, compute, memory, launch, flops, padded, traffic, ws, ctas = timer(
        spec, schedule, device, False
    )
    seconds = total * scale
    if symbolic and spec.is_dynamic:
        seconds = timer(spec, schedule, device, True)[0] * scale
    return Prediction(
        schedule=schedule,
        seconds=seconds,
        at_hint=float(total) * scale,
        compute_s=float(compute) * scale,
        memory_s=float(memory) * scale,
        launch_s=float(launch),
        flops=float(flops),
        padded_flops=float(padded),
        bytes=float(traffic),
        workspace_bytes=float(ws),
        math=_math(spec, schedule),
        ctas=int(ctas),
    )


TIE = 0.02  # predictions within 2% of each other count as a tie


def rank(
    spec: ConvSpec, schedules: Iterable[Schedule], device: Device, calibration: float = 1.0
) -> list[Prediction]:
    """Predictions at the size hints, fastest first. Within 2% steps of the best time,
    fewer programs (bigger tiles) go first, then less padding."""
    preds = [predict(spec, s, device, calibration, symbolic=False) for s in schedules]
    if not preds:
        return []
    best = min(p.at_hint for p in preds) or 1e-12
    return sorted(
        preds, key=lambda p: (int((p.at_hint / best - 1) / TIE), p.ctas, p.padded_flops, p.at_hint)
    )


def interpreter_steps(spec: ConvSpec | AttentionSpec, schedule: Schedule) -> int:
    """Programs x loop trips: what Triton's interpreter pays for, roughly per step."""
    if isinstance(spec, AttentionSpec):
        from .cost_attention import attention_steps

        return attention_steps(spec, schedule)
    if isinstance(spec, MlpSpec):
        from .cost_block import mlp_steps

        return mlp_steps(spec, schedule)
    if spec.op != "conv":
        from .cost_backward import transposed_steps, wgrad_steps

        return (transposed_steps if spec.transposed else wgrad_steps)(spec, schedule)
    z = _Sizes(spec, symbolic=False)
    s = schedule.as_dict()
    rows = z.p if s.get("M_TILES") == "image" else z.m
    tiles_m = _cdiv(rows, s["BLOCK_M"]) * (z.n if s.get("M_TILES") == "image" else 1)
    if schedule.name == "direct_depthwise":
        return tiles_m * _cdiv(z.k, s["BLOCK_C"]) * z.kh * z.kw
    tiles = tiles_m * _cdiv(z.kg, s["BLOCK_N"]) * z.g
    if schedule.name == "im2win_implicit" and s["REDUCTION"] == "tap":
        trips = z.kh * z.kw * _cdiv(z.cg, s["BLOCK_K"])
    else:
        trips = _cdiv(z.cg * z.kh * z.kw, s["BLOCK_K"])
    steps = tiles * trips * (1 + _depthwise(spec, z)[2])  # each trip loads its taps first
    if schedule.name == "im2win_band":
        wb = (z.wo - 1) * spec.stride[1] + (z.kw - 1) * spec.dilation[1] + 1
        steps += z.n * z.g * z.ho * _cdiv(wb, s["FILL_W"]) * _cdiv(z.cg, s["FILL_C"]) * z.kh
    return steps
