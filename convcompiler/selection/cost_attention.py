"""The cost model for window attention (see cost.py for the roofline it shares).

ATen runs about nine kernels: layout copies of q, k^T and v, a bmm writing the N x N scores,
the bias add and the mask add (each reading and writing the scores), the softmax (read and
write), the second bmm (reading them again) and a transpose copy of the output. The fused
kernel reads q, k and v once (plus the bias and mask, which stay in L2) and writes the output;
its scores live in registers, tiled BLOCK_M x BLOCK_N with the rows and keys padded up.
"""

from __future__ import annotations

from ..schedule import Schedule
from ..spec import AttentionSpec
from .cost import MEMORY_EFFICIENCY, _cdiv, _max, matmul_math
from .devices import Device

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
FUSED_EFFICIENCY = 0.45  # small tiles and an exp per score: well below GEMM efficiency
ATEN_EFFICIENCY = 0.50
ATEN_KERNELS = 9


def fused_bytes(spec: AttentionSpec, batch) -> int:
    """What the fused kernel reads and writes: q, k, v and the output once, the bias and the
    mask once (their re-reads by other programs hit L2)."""
    h, n, nk, e = spec.heads, spec.tokens, spec.keys, ITEMSIZE[spec.dtype]
    terms = (spec.bias * h + spec.mask * spec.windows) * n * nk * e
    rows = n * spec.head_dim + nk * spec.head_dim + nk * spec.value_dim + n * spec.value_dim
    return batch * h * rows * e + terms


def attention_time(spec: AttentionSpec, schedule: Schedule, device: Device, symbolic: bool):
    """(seconds, compute, memory, launch, useful flops, padded flops, bytes, workspace, ctas)."""
    b = spec.batch if symbolic else spec.hint(spec.batch)
    h, n, nk, e = spec.heads, spec.tokens, spec.keys, ITEMSIZE[spec.dtype]
    d, dv = spec.head_dim, spec.value_dim
    flops = 2 * b * h * n * nk * (d + dv)
    qkvo = b * h * (n * d + nk * d + nk * dv + n * dv) * e
    peak = device.peak(matmul_math(spec))
    if schedule.name == "aten":
        scores = b * h * n * nk * e
        passes = 1 + 2 * (spec.bias + spec.mask + spec.general) + 2 + 1  # bmm, adds, softmax, bmm
        traffic = 2 * qkvo + passes * scores  # q, k, v and the output each copied once more
        padded, launches, ctas, eff = flops, ATEN_KERNELS, 1, ATEN_EFFICIENCY
    else:
        bm, bn = schedule["BLOCK_M"], schedule["BLOCK_N"]
        dp, dvp = (max(16, 1 << (x - 1).bit_length()) for x in (d, dv))
        rows, keys = _cdiv(n, bm) * bm, _cdiv(nk, bn) * bn
        padded = 2 * b * h * rows * keys * (dp + dvp)
        traffic = fused_bytes(spec, b)
        ctas = _cdiv(n, bm) * b * h
        launches, eff = 1, FUSED_EFFICIENCY
        slots = device.sms * (2 if schedule["num_warps"] <= 4 else 1)
        padded = padded * (_cdiv(ctas, slots) * slots) / _max(ctas, 1)
    compute = padded / (peak * eff)
    memory = traffic / (device.bandwidth * MEMORY_EFFICIENCY)
    launch = launches * device.launch_us * 1e-6
    return _max(compute, memory) + launch, compute, memory, launch, flops, padded, traffic, 0, ctas


def attention_steps(spec: AttentionSpec, schedule: Schedule) -> int:
    """Programs x key blocks: what Triton's interpreter pays for."""
    b = spec.hint(spec.batch)
    return (
        _cdiv(spec.tokens, schedule["BLOCK_M"])
        * b
        * spec.heads
        * _cdiv(spec.keys, schedule["BLOCK_N"])
    )
