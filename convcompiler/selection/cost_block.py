"""The cost model for block regions (see cost.py for the roofline it shares).

An MLP block (spec_block.MlpSpec) has two candidates:

    per layer   what runs when the block is not fused (the "aten" schedule of the region):
                a LayerNorm prologue is a kernel that reads x and writes its normalised copy;
                then two GEMMs, each a roofline of its own. The first writes the hidden
                [M, H] (its activation fused in its epilogue), the second reads it back and
                applies the residual add; a layer scale is one more pointwise kernel that
                reads and writes the output. So the hidden makes one round trip to memory.
                A gated MLP adds the up projection's GEMM (writing a second hidden) and the
                kernel that multiplies the two (reading both, writing one).
    mlp_block   one kernel: x, the weights, the residual and the output once, the hidden
                and the normalised tokens never (the norm's statistics re-read the tile's x
                rows, from L1/L2). Each of the CO / BLOCK_N output-column tiles computes the
                first GEMM again (its FLOPs are padded and multiplied accordingly), and re-reads its
                x rows (from L2 when they fit).
    dw_mlp_block  ConvNeXt's block (a spec with a depthwise conv): one kernel reads the image
                once (the halo rows of each pixel tile re-read from L1/L2; the residual is
                the same pixels, read again from L1/L2), the weights once per pixel tile, and
                writes the output; the conv (on CUDA cores, at the fp32 peak) and the two
                GEMMs run one after the other in each program. Its per-layer candidate adds
                the conv's kernel (read x, write its output) before the MLP's; whether the
                conv alone should stay apart, with the MLP fused, is select_block's call.
"""

from __future__ import annotations

from ..devices import Device
from ..schedule import ATEN, Schedule
from ..spec_block import MlpSpec
from .cost import _ITEMSIZE as ITEMSIZE
from .cost import MEMORY_EFFICIENCY, _cdiv, _max, _reread, last_wave, matmul_math, predict

FUSED_EFFICIENCY = 0.60  # two chained dots and an activation per hidden chunk
# On sm_90 Triton issues wgmma only for tiles of at least 64 rows; narrower ones run the
# sm_80 mma.sync, at about half the rate (the static report counts which one a kernel uses)
NARROW_ROWS = 64
MMA_SYNC_ON_SM90 = 0.5
GEMM_EFFICIENCY = 0.75  # each per-layer GEMM (as gemm_1x1)


def _per_layer(spec: MlpSpec, m, device: Device):
    """(seconds, compute, memory, launches, bytes) of the two GEMMs and the scale's kernel."""
    c, h, co, e = spec.in_features, spec.hidden, spec.out_features, ITEMSIZE[spec.dtype]
    peak = device.peak(matmul_math(spec)) * GEMM_EFFICIENCY
    bandwidth = device.bandwidth * MEMORY_EFFICIENCY
    x, hidden, y = m * c * e, m * h * e, m * co * e
    first = (2 * m * c * h, x + h * c * e + hidden)
    second = (2 * m * h * co, hidden + co * h * e + y + (y if spec.residual else 0))
    kernels = [first, second]
    if spec.gated:  # the up projection, and the product of the two hiddens
        kernels[1:1] = [first, (0, 3 * hidden)]
    if spec.norm is not None:  # read x, write the normalised tokens
        kernels.insert(0, (0, 2 * x))
    if spec.scale:  # layer scale: read the GEMM's output, write the scaled one
        kernels.append((0, 2 * y))
    conv = []
    if spec.depthwise:  # the conv (on CUDA cores): read the image, write the tokens
        conv = [(_dw_flops(spec, m) / device.peak("fp32"), 2 * x + c * _taps(spec) * e)]
    steps = [(f / peak, b) for f, b in kernels] + conv
    seconds = sum(_max(t, b / bandwidth) for t, b in steps)
    compute = sum(t for t, _ in steps)
    kernels += conv
    traffic = sum(b for _, b in kernels)
    return seconds, compute, traffic / bandwidth, len(kernels), traffic


def _taps(spec: MlpSpec) -> int:
    return spec.dw_kernel[0] * spec.dw_kernel[1] if spec.depthwise else 0


def _dw_flops(spec: MlpSpec, m) -> int:
    return 2 * m * spec.in_features * _taps(spec)


def _pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


def dw_block_time(spec: MlpSpec, schedule: Schedule, device: Device, symbolic: bool):
    """mlp_time of the dw_mlp_block schedule (see the module docstring)."""
    m = spec.tokens if symbolic else spec.hint(spec.tokens)
    c, h, co, e = spec.in_features, spec.hidden, spec.out_features, ITEMSIZE[spec.dtype]
    s = schedule.as_dict()
    bm, bh = s["BLOCK_M"], s["BLOCK_H"]
    ctas = _cdiv(m, bm)
    hp = _cdiv(h, bh) * bh
    padded = last_wave(2 * ctas * bm * hp * (_pow2(c) + _pow2(co)), ctas, s["num_warps"], device)
    flops = 2 * m * h * (c + co)
    weights = (h * c + co * h + c * _taps(spec)) * e
    vectors = ((spec.has_bias1 * h) + (spec.has_bias2 + spec.scale) * co + spec.dw_bias * c) * e
    vectors += 2 * c * e if spec.norm == "affine" else 0
    traffic = m * c * e + _reread(weights, ctas, device) + m * co * e + vectors
    eff = FUSED_EFFICIENCY
    if device.capability >= (9, 0) and bm < NARROW_ROWS and matmul_math(spec) != "fp32":
        eff *= MMA_SYNC_ON_SM90
    conv = _dw_flops(spec, m) / device.peak("fp32")
    compute = padded / (device.peak(matmul_math(spec)) * eff) + conv
    memory = traffic / (device.bandwidth * MEMORY_EFFICIENCY)
    launch = device.launch_us * 1e-6
    total = flops + _dw_flops(spec, m)
    return _max(compute, memory) + launch, compute, memory, launch, total, padded, traffic, 0, ctas


def mlp_time(spec: MlpSpec, schedule: Schedule, device: Device, symbolic: bool):
    """(seconds, compute, memory, launch, useful flops, padded flops, bytes, workspace, ctas)."""
    m = spec.tokens if symbolic else spec.hint(spec.tokens)
    c, h, co, e = spec.in_features, spec.hidden, spec.out_features, ITEMSIZE[spec.dtype]
    flops = 2 * m * h * ((1 + spec.gated) * c + co)
    if schedule.name == "aten":
        seconds, compute, memory, launches, traffic = _per_layer(spec, m, device)
        launch = launches * device.launch_us * 1e-6
        flops += _dw_flops(spec, m)
        return seconds + launch, compute, memory, launch, flops, flops, traffic, 0, 1
    if schedule.name == "dw_mlp_block":
        return dw_block_time(spec, schedule, device, symbolic)
    s = schedule.as_dict()
    bm, bn, bh, bk = s["BLOCK_M"], s["BLOCK_N"], s["BLOCK_H"], s["BLOCK_K"]
    tiles_m, tiles_n = _cdiv(m, bm), _cdiv(co, bn)
    hp = _cdiv(h, bh) * bh
    padded = 2 * tiles_m * bm * tiles_n * hp * ((1 + spec.gated) * _cdiv(c, bk) * bk + bn)
    ctas = tiles_m * tiles_n
    padded = last_wave(padded, ctas, s["num_warps"], device)
    weights = ((1 + spec.gated) * h * c + co * h) * e
    vectors = ((1 + spec.gated) * spec.has_bias1 * h + (spec.has_bias2 + spec.scale) * co) * e
    vectors += 2 * c * e if spec.norm == "affine" else 0
    y = m * co * e
    traffic = (
        _reread(m * c * e, tiles_n, device)
        + _reread(weights, tiles_m, device)
        + y * (1 + spec.residual)
        + vectors
    )
    eff = FUSED_EFFICIENCY
    if device.capability >= (9, 0) and bm < NARROW_ROWS and matmul_math(spec) != "fp32":
        eff *= MMA_SYNC_ON_SM90
    compute = padded / (device.peak(matmul_math(spec)) * eff)
    memory = traffic / (device.bandwidth * MEMORY_EFFICIENCY)
    launch = device.launch_us * 1e-6
    return _max(compute, memory) + launch, compute, memory, launch, flops, padded, traffic, 0, ctas


def mlp_steps(spec: MlpSpec, schedule: Schedule) -> int:
    """Programs x loop trips: what Triton's interpreter pays for."""
    s = schedule.as_dict()
    if schedule.name == "dw_mlp_block":  # the taps, then the hidden loop
        return _cdiv(spec.hint(spec.tokens), s["BLOCK_M"]) * (
            _taps(spec) + _cdiv(spec.hidden, s["BLOCK_H"])
        )
    tiles = _cdiv(spec.hint(spec.tokens), s["BLOCK_M"]) * _cdiv(spec.out_features, s["BLOCK_N"])
    return tiles * _cdiv(spec.hidden, s["BLOCK_H"]) * (_cdiv(spec.in_features, s["BLOCK_K"]) + 1)


def block_note(spec: MlpSpec, fused: Schedule, device: Device, calibration: float = 1.0) -> str:
    """One kernel (schedule `fused`) against layer by layer: predicted time and bytes."""
    one = predict(spec, fused, device, calibration, symbolic=False)
    per = predict(spec, ATEN, device, calibration, symbolic=False)
    return (
        f"one kernel {one.at_hint * 1e6:.1f} us and {one.bytes / 2**20:.2f} MiB (the "
        f"[M, {spec.hidden}] hidden on chip) against {per.at_hint * 1e6:.1f} us and "
        f"{per.bytes / 2**20:.2f} MiB layer by layer"
    )


def dw_conv_apart(spec: MlpSpec, device: Device) -> tuple[float, float]:
    """(seconds, bytes) of a ConvNeXt block's depthwise conv run as a kernel of its own: it
    reads the image and writes the tokens the MLP then reads (a roofline, one launch)."""
    m, c, e = spec.hint(spec.tokens), spec.in_features, ITEMSIZE[spec.dtype]
    moved = 2 * m * c * e + c * (_taps(spec) + spec.dw_bias) * e
    compute = _dw_flops(spec, m) / device.peak("fp32")
    memory = moved / (device.bandwidth * MEMORY_EFFICIENCY)
    return _max(compute, memory) + device.launch_us * 1e-6, moved
