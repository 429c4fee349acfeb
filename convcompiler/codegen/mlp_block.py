"""Schedule `mlp_block`: a whole transformer MLP in one kernel, its hidden never in memory.

    y = [r +] [gamma *] (act(n(x) @ W1^T [+ b1]) @ W2^T [+ b2])     (spec_block.MlpSpec)

One program owns BLOCK_M tokens and BLOCK_N output features. It walks the hidden features
BLOCK_H at a time: a chunk h = act(x @ W1[j]^T + b1[j]) is computed in registers (a GEMM
over C, BLOCK_K input features at a time; a gated MLP also computes u = x @ W3[j]^T + b3[j]
from the same x tiles, and h = act(...) * u), then multiplied into the output at once:
acc += h @ W2[:, j]^T. Only acc is stored. When CO > BLOCK_N, each column tile of the
output computes the hidden again (the cost model prices that recompute against the bytes
the hidden's round trip would move).

With a LayerNorm prologue n (`norm`), the program first computes its rows' mean and rstd in
fp32 (two passes over its x rows: the mean, then the centred squares, as eager does), and the
first GEMM normalises each x tile as it loads it: (x - mean) * rstd [* w + b], rounded to the
operands' type as eager rounds the norm's output. The normalised tokens are never written.

Rows past M, hidden features past H and output features past CO wrap back inside their
tensors (`% size`) and are masked out, as in the conv templates: every lane's address stays
inside its tensor. A hidden feature past H is zeroed after the activation, so an Inf or NaN
token never leaks into the output through a padded lane.
"""

from __future__ import annotations

from ..devices import Device
from ..schedule import InvalidSchedule, Schedule, schedule_space
from ..spec_block import MlpSpec
from . import template as T
from .epilogue import activation_code

KERNELS = ("mlp_block",)

# The launchers' check of a per-feature vector (this template's and dw_mlp_block's)
VECTOR_HELPER = '''def _vector(t, size, name):
    """A per-feature vector as one contiguous run of `size` values (None stays None)."""
    if t is None:
        return None
    if tuple(t.shape) != (size,) or t.dtype != DTYPE:
        raise ValueError(f"{name}: {t.dtype} {tuple(t.shape)}, expected {DTYPE} ({size},)")
    return t if t.is_contiguous() else t.contiguous()
'''
LAUNCH_KEYS = ("num_warps", "num_stages")


@schedule_space(
    "mlp_block",
    BLOCK_M=(16, 32, 64, 128),
    BLOCK_N=(16, 32, 64, 128, 256, 512),
    BLOCK_H=(16, 32, 64, 128),
    BLOCK_K=(16, 32, 64, 128),
    num_warps=(4, 8),
    num_stages=(2, 3, 4),
)
def SPACE(spec: MlpSpec, s: Schedule, device: Device | None) -> None:
    if spec.depthwise:
        raise InvalidSchedule("a depthwise conv before the MLP: dw_mlp_block's")
    bm, bn, bh, bk = s["BLOCK_M"], s["BLOCK_N"], s["BLOCK_H"], s["BLOCK_K"]
    if bn >= 2 * max(16, spec.out_features) or bh >= 2 * max(16, spec.hidden):
        raise InvalidSchedule("a tile twice as wide as the features it covers")
    if bk >= 2 * max(16, spec.in_features):
        raise InvalidSchedule("a reduction step twice as long as C")
    if device is None:
        return
    # Per thread: the output accumulator and the hidden chunk are both live across the
    # hidden loop. Budgets from the static sm_90/sm_80 report (fp16, Swin's widths): 96
    # values compiled to <= 238 registers without spills, 128 hit the 255 cap; float32
    # (no tensor cores under "ieee") spilled on sm_80 at 64 and compiled at 40.
    threads = 32 * s["num_warps"]
    hidden = (1 + spec.gated) * bm * bh  # a gated block's up projection is live too
    live = (bm * bn + hidden) // threads
    if live > (40 if spec.dtype == "float32" else 96):
        raise InvalidSchedule(f"accumulators {bm}x{bn} + {hidden // bh}x{bh}: {live} per thread")
    if max(bm * bk, bk * bh, bh * bn) // threads > 32:
        raise InvalidSchedule("an operand tile over 32 values per thread")
    e = T.ITEMSIZE[spec.dtype]
    smem = s["num_stages"] * (bm * bk + (1 + spec.gated) * bk * bh) * e + (bm * bh + bh * bn) * e
    if smem > device.smem_per_block:
        raise InvalidSchedule(f"{smem} B of tiles > {device.smem_per_block} B shared memory")


TEMPLATE = '''${header}
import torch
import triton
import triton.language as tl

C = ${c}
HID = ${hid}
CO = ${co}
DTYPE = torch.${dtype}
HAS_B1 = ${has_b1}
HAS_B2 = ${has_b2}
HAS_SCALE = ${has_scale}
RESIDUAL = ${residual}
CHANNELS_FIRST = ${channels_first}  # output and residual as [N, CO, *spatial] views
NORM = ${norm}  # a LayerNorm prologue: None, "plain" or "affine"
GATED = ${gated}  # the hidden is act(x W1^T + b1) * (x W3^T + b3)
NORM_EPS = ${norm_eps}
PRECISION = ${precision}
INDEX_LIMIT = 2**31  # tensors this large get 64-bit offsets
META = ${meta}
LAUNCH = ${launch}
${helpers}

${wrapped_block}


@triton.jit
def _activation(hid):
    return ${act}


${row_stats}


@triton.jit
def _normalised(a, offs_c, c_ok, mean, rstd, nw_ptr, nb_ptr, AFFINE: tl.constexpr,
                WIDEN: tl.constexpr):
    # one x tile through the LayerNorm, then in the operands' type (eager rounds the norm)
    n = (a.to(mean.dtype) - mean) * rstd
    if AFFINE:
        n = n * tl.load(nw_ptr + offs_c, mask=c_ok, other=0.0).to(n.dtype)[None, :]
        n = n + tl.load(nb_ptr + offs_c, mask=c_ok, other=0.0).to(n.dtype)[None, :]
    n = tl.where(c_ok[None, :], n, 0.0)
    if WIDEN:
        return n
    return n.to(a.dtype)


@triton.jit
def mlp_block(
    # pointers: tokens, the two weights, the output; the optional vectors and residual
    x_ptr, w1_ptr, w2_ptr, y_ptr, b1_ptr, b2_ptr, s_ptr, r_ptr, nw_ptr, nb_ptr, w3_ptr, b3_ptr,
    # sizes: M = B x P tokens (may vary); the features are fixed by the spec
    M, P, C: tl.constexpr, HID: tl.constexpr, CO: tl.constexpr,
    # x, the residual and the output as [B, P, features] through their strides (w1 is
    # [HID, C] and w2 [CO, HID], contiguous)
    sxb, sxp, sxc, srb, srp, src, syb, syp, syc,
    # meta-parameters
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_SCALE: tl.constexpr,
    RESIDUAL: tl.constexpr, NORM: tl.constexpr, NORM_AFFINE: tl.constexpr, GATED: tl.constexpr,
    NORM_EPS: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # ---- 1. the tile: BLOCK_M tokens x BLOCK_N output features ----
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_m = offs_m % M
    if INT64:
        offs_m = offs_m.to(tl.int64)
    offs_n, n_ok = _block(tl.program_id(1) * BLOCK_N, CO, BLOCK_N)
    b_idx = offs_m // P
    p_idx = offs_m % P
    x_rows = x_ptr + (b_idx * sxb + p_idx * sxp)[:, None]
    if NORM:  # the LayerNorm prologue's row statistics
        mean, rstd = _row_stats(x_rows, sxc, m_ok, NORM_EPS, C, BLOCK_M, BLOCK_K, WIDEN)

    # ---- 2. the hidden features, BLOCK_H at a time: acc += act(x @ W1[j]^T + b1[j]) @ W2[:, j]^T
    acc = _zeros(BLOCK_M, BLOCK_N, WIDEN)
    for h0 in range(0, HID, BLOCK_H):
        offs_h, h_ok = _block(h0, HID, BLOCK_H)
        # 2a. the chunk's pre-activation, over the input features
        hid = _zeros(BLOCK_M, BLOCK_H, WIDEN)
        up = hid  # the gated MLP's second projection
        for c0 in range(0, C, BLOCK_K):
            offs_c, c_ok = _block(c0, C, BLOCK_K)
            a = tl.load(x_rows + (offs_c * sxc)[None, :], mask=m_ok[:, None] & c_ok[None, :],
                        other=0.0)
            if NORM:
                a = _normalised(a, offs_c, c_ok, mean, rstd, nw_ptr, nb_ptr, NORM_AFFINE, WIDEN)
            b = tl.load(w1_ptr + offs_h[None, :] * C + offs_c[:, None],
                        mask=c_ok[:, None] & h_ok[None, :], other=0.0)
            hid = _mma(a, b, hid, WIDEN, PRECISION)
            if GATED:
                b = tl.load(w3_ptr + offs_h[None, :] * C + offs_c[:, None],
                            mask=c_ok[:, None] & h_ok[None, :], other=0.0)
                up = _mma(a, b, up, WIDEN, PRECISION)
        # 2b. bias and activation in fp32 (times the up projection when gated); padded hidden
        # lanes become exact zeros
        if HAS_B1:
            hid += tl.load(b1_ptr + offs_h, mask=h_ok, other=0.0).to(hid.dtype)[None, :]
        hid = _activation(hid)
        if GATED:
            if HAS_B1:
                up += tl.load(b3_ptr + offs_h, mask=h_ok, other=0.0).to(up.dtype)[None, :]
            hid = hid * up
        hid = tl.where(h_ok[None, :], hid, 0.0)
        # 2c. into the output, the hidden rounded to the operands' type as eager rounds it
        w2 = tl.load(w2_ptr + offs_n[None, :] * HID + offs_h[:, None],
                     mask=h_ok[:, None] & n_ok[None, :], other=0.0)
        if not WIDEN:
            hid = hid.to(w2.dtype)
        acc = _mma(hid, w2, acc, WIDEN, PRECISION)

    # ---- 3. epilogue: bias, layer scale, residual; one store ----
    if HAS_B2:
        acc += tl.load(b2_ptr + offs_n, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    if HAS_SCALE:
        acc *= tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if RESIDUAL:
        r = tl.load(r_ptr + (b_idx * srb + p_idx * srp)[:, None] + (offs_n * src)[None, :],
                    mask=out_ok, other=0.0)
        acc += r.to(acc.dtype)
    tl.store(y_ptr + (b_idx * syb + p_idx * syp)[:, None] + (offs_n * syc)[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=out_ok)


${vector_helper}

def _merged(sizes, strides):
    """The stride of dims that merge into one (a view), or None."""
    for i in range(len(sizes) - 1):
        if sizes[i] != 1 and sizes[i + 1] != 1 and strides[i] != strides[i + 1] * sizes[i + 1]:
            return None
    inner = [st for size, st in zip(sizes, strides) if size != 1]
    return inner[-1] if inner else 0


def _tokens(t):
    """[*L, F] tokens as (B, P, strides (b, p, f)): the leading dims split where each side
    merges into one strided dim (a permuted NCHW tensor is [N, H*W]); a copy when none does."""
    lead, strides = list(t.shape[:-1]), list(t.stride()[:-1])
    for k in range(len(lead) + 1):
        sb, sp = _merged(lead[:k], strides[:k]), _merged(lead[k:], strides[k:])
        if sb is not None and sp is not None:
            b, p = torch.Size(lead[:k]).numel(), torch.Size(lead[k:]).numel()
            return t, b, p, (sb, sp, t.stride(-1))
    return _tokens(t.contiguous())


def launch(x, w1, b1=None, w2=None, b2=None, scale=None, residual=None, norm_weight=None,
           norm_bias=None, w3=None, b3=None):
    # ---- 1. check constraints ----
    if w2 is None or x.dim() < 1 or x.shape[-1] != C:
        raise ValueError(f"expected tokens [..., {C}] and both weights, got x {tuple(x.shape)}")
    if tuple(w1.shape) != (HID, C) or tuple(w2.shape) != (CO, HID):
        raise ValueError(f"weights {tuple(w1.shape)} and {tuple(w2.shape)} do not fit this "
                         f"kernel ({HID}, {C}) and ({CO}, {HID})")
    if x.dtype != DTYPE or w1.dtype != DTYPE or w2.dtype != DTYPE:
        raise TypeError(f"kernel built for {DTYPE}, got {x.dtype}, {w1.dtype}, {w2.dtype}")
    for name, given, built in (("a first bias", b1, HAS_B1), ("a second bias", b2, HAS_B2),
                               ("a layer scale", scale, HAS_SCALE),
                               ("a residual", residual, RESIDUAL),
                               ("a norm weight", norm_weight, NORM == "affine"),
                               ("a norm bias", norm_bias, NORM == "affine"),
                               ("an up projection", w3, GATED),
                               ("an up projection's bias", b3, GATED and HAS_B1)):
        if (given is not None) != built:
            raise ValueError(f"kernel built {'with' if built else 'without'} {name}")
    scale = scale.reshape(-1) if scale is not None and scale.numel() == CO else scale
    b1, b2, scale = _vector(b1, HID, "b1"), _vector(b2, CO, "b2"), _vector(scale, CO, "scale")
    norm_weight, norm_bias = _vector(norm_weight, C, "norm weight"), _vector(norm_bias, C,
                                                                            "norm bias")
    if w3 is not None and (tuple(w3.shape) != (HID, C) or w3.dtype != DTYPE):
        raise ValueError(f"up projection {w3.dtype} {tuple(w3.shape)}, expected ({HID}, {C})")
    b3 = _vector(b3, HID, "b3")
    w1, w2 = (w if w.is_contiguous() else w.contiguous() for w in (w1, w2))
    w3 = w3 if w3 is None or w3.is_contiguous() else w3.contiguous()

    # ---- 2. allocate the output: the tokens' leading dims, CO features, contiguous; with
    # CHANNELS_FIRST returned as [N, CO, *spatial] (a permuted view), as the residual comes
    y = torch.empty((*x.shape[:-1], CO), device=x.device, dtype=x.dtype)
    to_first = (0, y.dim() - 1, *range(1, y.dim() - 1))
    to_last = (0, *range(2, y.dim()), 1)
    result = y.permute(to_first) if CHANNELS_FIRST else y
    if residual is not None:
        if residual.shape != result.shape or residual.dtype != DTYPE:
            raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} != output "
                             f"{DTYPE} {tuple(result.shape)}")
        residual = residual.permute(to_last) if CHANNELS_FIRST else residual
    if y.numel() == 0:
        return result
    x, B, P, x_strides = _tokens(x)
    r_strides = (0, 0, 0)
    if residual is not None:
        residual, _, _, r_strides = _tokens(residual)
    # Under Triton's interpreter (CPU) the kernel works in fp64, and a bf16 result is stored
    # in fp32 for torch to round (the interpreter truncates fp32 -> bf16).
    widen = x.device.type == "cpu"
    out = y
    if widen and x.dtype == torch.bfloat16:
        out = torch.empty_like(y, dtype=torch.float32)
    M = B * P
    tensors = (x, w1, w2, out) + ((residual,) if residual is not None else ())
    int64 = max(t.numel() for t in tensors) >= INDEX_LIMIT

    # ---- 3. launch: (token tiles, output-feature tiles) ----
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(CO, meta["BLOCK_N"]))
    mlp_block[grid](
        x, w1, w2, out, b1, b2, scale, residual, norm_weight, norm_bias, w3, b3,
        M, P, C, HID, CO, *x_strides, *r_strides, P * CO, CO, 1,
        HAS_B1=HAS_B1, HAS_B2=HAS_B2, HAS_SCALE=HAS_SCALE, RESIDUAL=RESIDUAL,
        NORM=NORM is not None, NORM_AFFINE=NORM == "affine", NORM_EPS=NORM_EPS, GATED=GATED,
        PRECISION=PRECISION, WIDEN=widen, INT64=int64, **META, **LAUNCH)
    if out is not y:
        y.copy_(out)
    return result
'''


def template_fields(spec: MlpSpec, schedule: Schedule, summary: str) -> dict[str, str]:
    """The hooks an MLP block's templates share (this one's and dw_mlp_block's)."""
    meta, launch = T.split_params(schedule, LAUNCH_KEYS)
    return dict(
        header=T.header(spec, schedule, summary),
        c=str(spec.in_features),
        hid=str(spec.hidden),
        co=str(spec.out_features),
        dtype=spec.dtype,
        has_b1=str(spec.has_bias1),
        has_b2=str(spec.has_bias2),
        has_scale=str(spec.scale),
        residual=str(spec.residual),
        precision=repr(spec.precision),
        norm=repr(spec.norm),
        norm_eps=repr(float(spec.norm_eps)),
        meta=meta,
        launch=launch,
        wrapped_block=T.WRAPPED_BLOCK,
        helpers=T.HELPERS,
        vector_helper=VECTOR_HELPER,
        act=activation_code(spec.act, "hid"),
    )


def render(spec: MlpSpec, schedule: Schedule) -> T.KernelSource:
    text = T.render(
        TEMPLATE,
        **template_fields(spec, schedule, "a transformer MLP block in one kernel"),
        channels_first=str(spec.channels_first),
        gated=str(spec.gated),
        row_stats=T.ROW_STATS,
    )
    return T.KernelSource(f"{spec.geometry()}_{schedule.name}", text, schedule, spec.key(), KERNELS)
