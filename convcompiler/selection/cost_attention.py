"""The cost model for attention regions (see cost.py for the roofline it shares).

ATen runs about nine kernels: layout copies of q, k^T and v, a bmm writing the N x N scores,
the bias add and the mask add (each reading and writing the scores), the softmax (read and
write), the second bmm (reading them again) and a transpose copy of the output. The fused
kernel reads q, k and v once (plus the bias and mask, which stay in L2) and writes the output;
its scores live in registers, tiled BLOCK_M x BLOCK_N with the rows and keys padded up.
When the graph calls SDPA, "aten" is that one call instead (sdpa_backend). When it writes
the softmax itself, the "sdpa" schedule (codegen/attention_sdpa.py) is one SDPA call on the
terms summed into an attn_mask, plus the kernels that sum them and that give NaN where the
graph's softmax does (sdpa_time). Neither side is
charged the K/V re-reads of other query tiles (they hit L2 for window sizes; for long
sequences both re-read alike).

A constant mask that hides whole key tiles (spec.key_tiles) cuts the fused kernel's work to
the fraction of key tiles its tiles visit; the tile lists cost a few small kernels per call
that read q, k, v and the masking terms once more (score_terms.tile_lists). SDPA with the same
mask computes every score.
"""

from __future__ import annotations

from ..codegen.window_attention import padded_dim
from ..devices import Device
from ..schedule import Schedule
from ..spec import AttentionSpec
from .cost import MEMORY_EFFICIENCY, _cdiv, _max, matmul_math

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
FUSED_EFFICIENCY = 0.45  # small tiles and an exp per score: well below GEMM efficiency
ATEN_EFFICIENCY = 0.50
ATEN_KERNELS = 9
TILE_LIST_KERNELS = 4  # finiteness of q, k, v; the terms' tiles; the counts; the sort
# When the graph itself calls SDPA, its ATen path is one SDPA kernel: FlashAttention-2 (or
# cuDNN) without an additive mask in half precision, the memory-efficient kernel otherwise.
# Assumed fractions of the tensor-core peak, not measured here (no GPU in this sandbox):
# public FlashAttention-2 figures on an H100 run at about 35-50% of it for head dims 64-128.
SDPA_EFFICIENCY = {"flash": 0.50, "memory-efficient": 0.35}


def sdpa_backend(spec: AttentionSpec, device: Device) -> str | None:
    """The SDPA backend the graph's own SDPA call would take on `device`, or None when the
    graph does not call SDPA (its ATen path is then about nine kernels)."""
    return backend_for(spec, device) if spec.sdpa else None


def backend_for(spec: AttentionSpec, device: Device) -> str:
    """The backend an SDPA call on this attention's operands and terms takes on `device`."""
    terms = spec.bias or spec.mask or spec.general or spec.logit_scale or spec.cosine
    same_dims = spec.head_dim == spec.value_dim and spec.head_dim % 8 == 0
    if spec.dtype != "float32" and not terms and same_dims and device.capability >= (8, 0):
        return "flash"
    return "memory-efficient"


def aten_path(spec: AttentionSpec, device: Device) -> str:
    """What "aten" runs for this attention, as the report names it."""
    if spec.grad:
        return "ATen's backward: the gradient bmms and the softmax backward"
    backend = sdpa_backend(spec, device)
    return f"SDPA's {backend} backend" if backend else f"ATen's {ATEN_KERNELS} kernels"


def sdpa_time(spec: AttentionSpec, device: Device, b) -> tuple:
    """The "sdpa" schedule: (traffic, launches, efficiency). SDPA reads q, k, v and writes
    the output once. The terms are read and summed into one attn_mask in q's dtype: a bias
    alone stays [1, H, N, Nk] (SDPA's re-reads per batch hit L2), with a mask or a general
    term it is [B, H, N, Nk], written once and read by SDPA. Unless the graph's softmax is
    SDPA's, three more kernels read q, k and the attn_mask and rewrite the output (the NaN
    rows)."""
    h, n, nk, e = spec.heads, spec.tokens, spec.keys, ITEMSIZE[spec.dtype]
    d, dv = spec.head_dim, spec.value_dim
    qkvo = b * h * (n * d + nk * d + nk * dv + n * dv) * e
    terms = spec.bias + spec.mask + spec.general
    per_batch = spec.mask or spec.general
    built = (b if per_batch else 1) * h * n * nk * e if terms else 0
    read = (spec.bias * h + spec.mask * spec.windows + spec.general * b * h) * n * nk * e
    traffic = qkvo + read + 2 * built
    launches = 1 + bool(terms)
    if not spec.safe_softmax:
        traffic += b * h * (n * d + nk * d + 2 * n * dv) * e + built
        launches += 3
    return traffic, launches, SDPA_EFFICIENCY[backend_for(spec, device)]


def fused_bytes(spec: AttentionSpec, batch) -> int:
    """What the fused kernel reads and writes: q, k, v and the output once, the bias and the
    mask once (their re-reads by other programs hit L2)."""
    h, n, nk, e = spec.heads, spec.tokens, spec.keys, ITEMSIZE[spec.dtype]
    terms = (spec.bias * h + spec.mask * spec.windows) * n * nk * e
    rows = n * spec.head_dim + nk * spec.head_dim + nk * spec.value_dim + n * spec.value_dim
    return batch * h * rows * e + terms


def backward_time(spec: AttentionSpec, schedule: Schedule, device: Device, symbolic: bool):
    """attention_time for the backward (spec.grad). ATen's: the four gradient bmms (dP, dv,
    dq, dk) and the softmax backward's passes over the N x Nk scores (dP written; dP * P,
    its row sum and the fma read and write them; the bias's batch sum; the two bmms read
    dS), about ten kernels with dO's layout copy. The fused kernels' matmuls: the dq kernel
    q k^T and dO v^T in two passes and dS k; the dk/dv kernel q k^T, P^T dO, dO v^T and
    dS^T q; they read q, k, v and dO twice and write dq, dk, dv once."""
    b = spec.batch if symbolic else spec.hint(spec.batch)
    h, n, nk, e = spec.heads, spec.tokens, spec.keys, ITEMSIZE[spec.dtype]
    d, dv = spec.head_dim, spec.value_dim
    flops = 2 * b * h * n * nk * (2 * d + 2 * dv)
    qkvo = b * h * (n * d + nk * d + nk * dv + n * dv) * e
    peak = device.peak(matmul_math(spec))
    if schedule.name == "aten":
        scores = b * h * n * nk * e
        traffic = 2 * qkvo + 12 * scores
        padded, launches, ctas, eff = flops, 10, 1, ATEN_EFFICIENCY
    else:
        bm, bn = schedule["BLOCK_M"], schedule["BLOCK_N"]
        dp, dvp = padded_dim(d), padded_dim(dv)
        rows, keys = _cdiv(n, bm) * bm, _cdiv(nk, bn) * bn
        padded = 2 * b * h * rows * keys * (5 * dp + 4 * dvp)
        traffic = 2 * qkvo + qkvo + fused_bytes(spec, 0) * 2
        ctas = (_cdiv(n, bm) + _cdiv(nk, bn)) * b * h
        launches, eff = 2, FUSED_EFFICIENCY
    compute = padded / (peak * eff)
    memory = traffic / (device.bandwidth * MEMORY_EFFICIENCY)
    launch = launches * device.launch_us * 1e-6
    return _max(compute, memory) + launch, compute, memory, launch, flops, padded, traffic, 0, ctas


def attention_time(spec: AttentionSpec, schedule: Schedule, device: Device, symbolic: bool):
    """(seconds, compute, memory, launch, useful flops, padded flops, bytes, workspace, ctas)."""
    if spec.grad:
        return backward_time(spec, schedule, device, symbolic)
    b = spec.batch if symbolic else spec.hint(spec.batch)
    h, n, nk, e = spec.heads, spec.tokens, spec.keys, ITEMSIZE[spec.dtype]
    d, dv = spec.head_dim, spec.value_dim
    flops = 2 * b * h * n * nk * (d + dv)
    qkvo = b * h * (n * d + nk * d + nk * dv + n * dv) * e
    peak = device.peak(matmul_math(spec))
    backend = sdpa_backend(spec, device) if schedule.name == "aten" else None
    if schedule.name == "sdpa":  # the softmax-written graph rewritten as one SDPA call
        traffic, launches, eff = sdpa_time(spec, device, b)
        padded, ctas = flops, 1
    elif backend is not None:  # one SDPA kernel: q, k, v, the output and the summed terms once
        summed = spec.bias + spec.mask + spec.general > 1  # one more kernel adds them up
        terms = (spec.bias + spec.mask + spec.general) * b * h * n * nk * e
        traffic = qkvo + terms * (2 if summed else 1)
        launches = 1 + summed
        padded, ctas, eff = flops, 1, SDPA_EFFICIENCY[backend]
    elif schedule.name == "aten":
        scores = b * h * n * nk * e
        passes = 1 + 2 * (spec.bias + spec.mask + spec.general) + 2 + 1  # bmm, adds, softmax, bmm
        traffic = 2 * qkvo + passes * scores  # q, k, v and the output each copied once more
        padded, launches, ctas, eff = flops, ATEN_KERNELS, 1, ATEN_EFFICIENCY
    else:
        bm, bn = schedule["BLOCK_M"], schedule["BLOCK_N"]
        dp, dvp = padded_dim(d), padded_dim(dv)
        rows, keys = _cdiv(n, bm) * bm, _cdiv(nk, bn) * bn
        padded = 2 * b * h * rows * keys * (dp + dvp) * spec.visited(bm, bn)
        traffic = fused_bytes(spec, b)
        ctas = _cdiv(n, bm) * b * h
        launches, eff = 1, FUSED_EFFICIENCY
        if spec.key_tiles:  # the per-call tile lists: q, k, v and the terms read once more
            masks = fused_bytes(spec, 0) + (spec.general + bool(spec.select)) * n * nk * e
            traffic += qkvo - b * h * n * dv * e + masks
            launches += TILE_LIST_KERNELS
        slots = device.sms * (2 if schedule["num_warps"] <= 4 else 1)
        padded = padded * (_cdiv(ctas, slots) * slots) / _max(ctas, 1)
    compute = padded / (peak * eff)
    memory = traffic / (device.bandwidth * MEMORY_EFFICIENCY)
    launch = launches * device.launch_us * 1e-6
    return _max(compute, memory) + launch, compute, memory, launch, flops, padded, traffic, 0, ctas


def attention_steps(spec: AttentionSpec, schedule: Schedule) -> int:
    """Programs x key blocks visited: what Triton's interpreter pays for (the backward's two
    kernels: the query tiles' and the key tiles' programs, each over the other)."""
    b = spec.hint(spec.batch)
    bm, bn = schedule["BLOCK_M"], schedule["BLOCK_N"]
    if spec.grad:
        return 3 * _cdiv(spec.tokens, bm) * _cdiv(spec.keys, bn) * b * spec.heads
    programs = _cdiv(spec.tokens, bm) * b * spec.heads
    return max(1, round(programs * _cdiv(spec.keys, bn) * spec.visited(bm, bn)))
