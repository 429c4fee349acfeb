"""Schedule `attention_backward`: the fused backward of window attention, FlashAttention-2 style.

With S = scale * q @ k^T (+ the terms) as the forward computes it, P = softmax(S) and O = P @ v,
from the output's gradient dO:

    dv = P^T @ dO        dP = dO @ v^T        dS = P * (dP - rowsum(dO * O))
    dq = scale * dS @ k  dk = scale * dS^T @ q  dbias[h] = sum over the batch of dS

Two kernels, neither of which ever holds an N x Nk matrix in memory:
  * `attention_dq`, per query tile: one pass over the keys recomputes each row's logsumexp
    and delta = rowsum(P * dP) (= rowsum(dO * O), without reading O), a second one
    accumulates dq; it stores the logsumexp and delta for the other kernel;
  * `attention_dkdv`, per key tile: one pass over the queries accumulates dk and dv, and
    adds dS into the bias gradient (fp32 atomics: the windows of all images share it).
Nothing is saved by the forward but what it saved before (q, k, v and the terms): the
logsumexp is recomputed. The terms (bias, per-window mask, general, select, logit scale)
are applied exactly as the forward applies them (window_attention's shared _scores).
Cosine attention (SwinV2) is not supported here: its normalisation has a gradient of its own.
"""

from __future__ import annotations

from ..devices import Device
from ..schedule import InvalidSchedule, Schedule, schedule_space
from ..score_terms import TILE_SIZES
from ..spec import AttentionSpec
from . import template as T
from .window_attention import hooks, padded_dim

KERNELS = ("attention_dq", "attention_dkdv")


@schedule_space(
    "attention_backward",
    BLOCK_M=TILE_SIZES,
    BLOCK_N=TILE_SIZES,
    num_warps=(2, 4, 8),
    num_stages=(1, 2, 3),
)
def SPACE(spec: AttentionSpec, s: Schedule, device: Device | None) -> None:
    if spec.cosine:
        raise InvalidSchedule("cosine attention's backward (its row normalisation) is ATen's")
    if device is None:
        return
    # register budgets as the forward's: dkdv holds dk and dv tiles [BLOCK_N, D] and the
    # score, probability and gradient tiles [BLOCK_M, BLOCK_N]
    d = padded_dim(spec.head_dim) + padded_dim(spec.value_dim)
    threads = 32 * s["num_warps"]
    if s["BLOCK_M"] * s["BLOCK_N"] // threads > 16:
        raise InvalidSchedule("more than 16 score values per thread")
    if max(s["BLOCK_M"], s["BLOCK_N"]) * d // threads > 16:  # 32 spilled dk, dv on sm_80
        raise InvalidSchedule("more than 16 accumulator values per thread")
    if spec.dtype == "float32" and max(s["BLOCK_M"], s["BLOCK_N"]) > 32:
        raise InvalidSchedule("float32 tiles over 32 spill")


TEMPLATE = '''${header}
import math

import torch
import triton
import triton.language as tl

TOKENS = ${tokens}  # queries
KEY_TOKENS = ${key_tokens}  # keys and values
HEADS = ${heads}
HEAD_DIM = ${head_dim}  # q and k
HEAD_DIM_P2 = ${head_dim_p2}
V_HEAD_DIM = ${v_head_dim}  # v and the output
V_HEAD_DIM_P2 = ${v_head_dim_p2}
TRANSPOSED = ${transposed}  # operands stored [.., D, N]: read with their last two strides swapped
HEADS_AXIS = ${heads_axis}  # 5-D operands: their heads dim (the other two leading dims: the batch)
DTYPE = torch.${dtype}
SCALE = ${scale}
MASK_REPEAT = ${mask_repeat}  # the mask is added this many times
SELECT = ${select}  # a boolean mask applied last: "keep" (True keeps), "drop" (True fills)
FILL = ${fill}
PRECISION = ${precision}
INDEX_LIMIT = 2**31  # tensors this large get 64-bit offsets
META = ${meta}
LAUNCH = ${launch}

_add = tl.standard._sum_combine
_max = tl.standard._elementwise_max


# Every lane's address stays inside its tensor, masked lanes included (see window_attention).
${wrapped_block}


${scores}


@triton.jit
def attention_dq(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr,
    bias_ptr, mask_ptr, general_ptr, ls_ptr, sel_ptr,
    H, N: tl.constexpr, NK: tl.constexpr, NW,
    # strides: q, k, v, dO, dq as (b, h, n, d); the terms as in the forward
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    sgqb, sgqh, sgqn, sgqd,
    sbh, sbi, sbj, smw, smi, smj, sgb, sgh, sgi, sgj, ssb, ssh, ssi, ssj,
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
    V_HEAD_DIM: tl.constexpr, DV: tl.constexpr, MASK_REPEAT: tl.constexpr,
    KEEP: tl.constexpr, FILL: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # ---- 1. the tile: BLOCK_M query rows of batch b, head h; their dO rows ----
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if INT64:
        b = b.to(tl.int64)
    offs_m, m_ok = _block(pid_m * BLOCK_M, N, BLOCK_M)
    offs_d, d_ok = _block(0, HEAD_DIM, D)
    offs_e, e_ok = _block(0, V_HEAD_DIM, DV)
    if WIDEN:
        work = tl.float64
    else:
        work = tl.float32
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_e[None, :] * sdd,
                 mask=m_ok[:, None] & e_ok[None, :], other=0.0)
    if WIDEN:
        q = q.to(tl.float64)
        do = do.to(tl.float64)
    k_bh = k_ptr + b * skb + h * skh
    v_bh = v_ptr + b * svb + h * svh
    bias_h = None
    mask_w = None
    general_bh = None
    sel_bh = None
    logit_scale = None
    if bias_ptr is not None:
        bias_h = bias_ptr + h * sbh
    if mask_ptr is not None:
        mask_w = mask_ptr + (b % NW) * smw
    if general_ptr is not None:
        general_bh = general_ptr + b * sgb + h * sgh
    if sel_ptr is not None:
        sel_bh = sel_ptr + b * ssb + h * ssh
    if ls_ptr is not None:
        logit_scale = tl.load(ls_ptr + h).to(work)

    # ---- 2. each row's logsumexp and delta = rowsum(P * dP), online over the keys ----
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=work)
    l_i = tl.full((BLOCK_M,), 0.0, dtype=work)
    d_i = tl.full((BLOCK_M,), 0.0, dtype=work)
    for n0 in range(0, NK, BLOCK_N):
        offs_n, n_ok = _block(n0, NK, BLOCK_N)
        k = tl.load(k_bh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_bh + offs_n[:, None] * svn + offs_e[None, :] * svd,
                    mask=n_ok[:, None] & e_ok[None, :], other=0.0)
        if WIDEN:
            k = k.to(tl.float64)
            v = v.to(tl.float64)
        s = _scores(q, k, offs_m, m_ok, offs_n, n_ok, bias_h, mask_w, general_bh, sel_bh,
                    logit_scale, sbi, sbj, smi, smj, sgi, sgj, ssi, ssj,
                    SCALE, MASK_REPEAT, KEEP, FILL, PRECISION, WIDEN)
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_shift[:, None])
        alpha = tl.exp(m_i - m_shift)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(work)
        l_i = l_i * alpha + tl.reduce(p, 1, _add)
        d_i = d_i * alpha + tl.reduce(p * dp, 1, _add)
        m_i = m_new
    # a row that sees no key: P = 0, so no gradient (lse = +inf makes every P 0 below)
    seen = l_i > 0.0
    lse = tl.where(seen, tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_i), float("inf"))
    delta = tl.where(seen, d_i / l_i, 0.0)
    rows = bh * N + offs_m
    tl.store(lse_ptr + rows, lse.to(lse_ptr.dtype.element_ty), mask=m_ok)
    tl.store(delta_ptr + rows, delta.to(delta_ptr.dtype.element_ty), mask=m_ok)

    # ---- 3. dq = scale * dS @ k, dS = P * (dP - delta) ----
    dq = tl.full((BLOCK_M, D), 0.0, dtype=work)
    for n0 in range(0, NK, BLOCK_N):
        offs_n, n_ok = _block(n0, NK, BLOCK_N)
        k = tl.load(k_bh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_bh + offs_n[:, None] * svn + offs_e[None, :] * svd,
                    mask=n_ok[:, None] & e_ok[None, :], other=0.0)
        if WIDEN:
            k = k.to(tl.float64)
            v = v.to(tl.float64)
        s = _scores(q, k, offs_m, m_ok, offs_n, n_ok, bias_h, mask_w, general_bh, sel_bh,
                    logit_scale, sbi, sbj, smi, smj, sgi, sgj, ssi, ssj,
                    SCALE, MASK_REPEAT, KEEP, FILL, PRECISION, WIDEN)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(work)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION).to(work)
    dq = dq * SCALE
    if logit_scale is not None:
        dq = dq * logit_scale
    tl.store(dq_ptr + b * sgqb + h * sgqh + offs_m[:, None] * sgqn + offs_d[None, :] * sgqd,
             dq.to(dq_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def attention_dkdv(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, dbias_ptr, lse_ptr, delta_ptr,
    bias_ptr, mask_ptr, general_ptr, ls_ptr, sel_ptr,
    H, N: tl.constexpr, NK: tl.constexpr, NW,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    sgkb, sgkh, sgkn, sgkd, sgvb, sgvh, sgvn, sgvd,
    sbh, sbi, sbj, smw, smi, smj, sgb, sgh, sgi, sgj, ssb, ssh, ssi, ssj,
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
    V_HEAD_DIM: tl.constexpr, DV: tl.constexpr, MASK_REPEAT: tl.constexpr,
    KEEP: tl.constexpr, FILL: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # ---- 1. the tile: BLOCK_N keys (and values) of batch b, head h ----
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if INT64:
        b = b.to(tl.int64)
    offs_n, n_ok = _block(pid_n * BLOCK_N, NK, BLOCK_N)
    offs_d, d_ok = _block(0, HEAD_DIM, D)
    offs_e, e_ok = _block(0, V_HEAD_DIM, DV)
    if WIDEN:
        work = tl.float64
    else:
        work = tl.float32
    k = tl.load(k_ptr + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(v_ptr + b * svb + h * svh + offs_n[:, None] * svn + offs_e[None, :] * svd,
                mask=n_ok[:, None] & e_ok[None, :], other=0.0)
    if WIDEN:
        k = k.to(tl.float64)
        v = v.to(tl.float64)
    q_bh = q_ptr + b * sqb + h * sqh
    do_bh = do_ptr + b * sdb + h * sdh
    bias_h = None
    mask_w = None
    general_bh = None
    sel_bh = None
    logit_scale = None
    if bias_ptr is not None:
        bias_h = bias_ptr + h * sbh
    if mask_ptr is not None:
        mask_w = mask_ptr + (b % NW) * smw
    if general_ptr is not None:
        general_bh = general_ptr + b * sgb + h * sgh
    if sel_ptr is not None:
        sel_bh = sel_ptr + b * ssb + h * ssh
    if ls_ptr is not None:
        logit_scale = tl.load(ls_ptr + h).to(work)

    # ---- 2. over the query tiles: dv += P^T dO, dk += dS^T q, dbias += dS ----
    dk = tl.full((BLOCK_N, D), 0.0, dtype=work)
    dv = tl.full((BLOCK_N, DV), 0.0, dtype=work)
    for m0 in range(0, N, BLOCK_M):
        offs_m, m_ok = _block(m0, N, BLOCK_M)
        q = tl.load(q_bh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_bh + offs_m[:, None] * sdn + offs_e[None, :] * sdd,
                     mask=m_ok[:, None] & e_ok[None, :], other=0.0)
        if WIDEN:
            q = q.to(tl.float64)
            do = do.to(tl.float64)
        rows = bh * N + offs_m
        lse = tl.load(lse_ptr + rows, mask=m_ok, other=float("inf")).to(work)
        delta = tl.load(delta_ptr + rows, mask=m_ok, other=0.0).to(work)
        s = _scores(q, k, offs_m, m_ok, offs_n, n_ok, bias_h, mask_w, general_bh, sel_bh,
                    logit_scale, sbi, sbj, smi, smj, sgi, sgj, ssi, ssj,
                    SCALE, MASK_REPEAT, KEEP, FILL, PRECISION, WIDEN)
        p = tl.where(m_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION).to(work)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(work)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION).to(work)
        if dbias_ptr is not None:  # the bias gradient, summed over the batch
            pair = m_ok[:, None] & n_ok[None, :]
            tl.atomic_add(dbias_ptr + h * N * NK + offs_m[:, None] * NK + offs_n[None, :],
                          ds.to(dbias_ptr.dtype.element_ty), mask=pair)
    dk = dk * SCALE
    if logit_scale is not None:
        dk = dk * logit_scale
    tl.store(dk_ptr + b * sgkb + h * sgkh + offs_n[:, None] * sgkn + offs_d[None, :] * sgkd,
             dk.to(dk_ptr.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(dv_ptr + b * sgvb + h * sgvh + offs_n[:, None] * sgvn + offs_e[None, :] * sgvd,
             dv.to(dv_ptr.dtype.element_ty), mask=n_ok[:, None] & e_ok[None, :])


# ---- the score terms as the kernels index them (convcompiler/score_terms.py) ----
${score_terms}


${operands}


def launch(q, k, v, dout, bias=None, mask=None, general=None, logit_scale=None, select=None,
           bias_grad=False):
    """(dq, dk, dv, the bias gradient in the bias's shape, or None): the gradients, as contiguous
    [B, H, N|Nk, D] tensors, of an attention whose output's gradient is `dout` (its
    [B, H, N, Dv] view); the operands and terms as the forward's launch takes them."""
    # ---- 1. check constraints; view the operands and terms as the kernels index them ----
    q, k, v = _qkv(q, k, v)
    B = q.shape[0]
    if dout.dim() != 4 or tuple(dout.shape) != (B, HEADS, TOKENS, V_HEAD_DIM):
        raise ValueError(f"dout {tuple(dout.shape)}: expected [{B}, {HEADS}, {TOKENS}, "
                         f"{V_HEAD_DIM}]")
    dout = dout.to(DTYPE)
    given = bias  # the bias gradient comes back in its shape (summed where it broadcasts)
    bias, mask, general, logit_scale, select, NW, term_strides = _terms(
        B, bias, mask, general, logit_scale, select)

    # ---- 2. allocate the gradients and the per-row statistics ----
    # Under Triton's interpreter (CPU) the kernels work in fp64, and bf16 gradients are
    # stored in fp32 for torch to round (the interpreter truncates fp32 -> bf16).
    widen = q.device.type == "cpu"
    store = torch.float32 if widen and DTYPE == torch.bfloat16 else DTYPE
    dq = torch.empty(B, HEADS, TOKENS, HEAD_DIM, device=q.device, dtype=store)
    dk = torch.empty(B, HEADS, KEY_TOKENS, HEAD_DIM, device=q.device, dtype=store)
    dv = torch.empty(B, HEADS, KEY_TOKENS, V_HEAD_DIM, device=q.device, dtype=store)
    stats = torch.float64 if widen else torch.float32
    lse = torch.empty(B * HEADS * TOKENS, device=q.device, dtype=stats)
    delta = torch.empty_like(lse)
    dbias = None
    if bias_grad and bias is not None:
        dbias = torch.zeros(HEADS, TOKENS, KEY_TOKENS, device=q.device, dtype=stats)
    if q.numel() == 0 or k.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
    else:
        int64 = max(t.numel() for t in (q, k, v, dout)) >= INDEX_LIMIT
        common = dict(
            SCALE=SCALE, HEAD_DIM=HEAD_DIM, D=HEAD_DIM_P2, V_HEAD_DIM=V_HEAD_DIM,
            DV=V_HEAD_DIM_P2, MASK_REPEAT=MASK_REPEAT, KEEP=SELECT == "keep", FILL=FILL,
            PRECISION=PRECISION, WIDEN=widen, INT64=int64, **META, **LAUNCH,
        )
        strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())

        # ---- 3. launch: dq (and the row statistics), then dk and dv ----
        grid = (triton.cdiv(TOKENS, META["BLOCK_M"]), B * HEADS)
        attention_dq[grid](
            q, k, v, dout, dq, lse, delta, bias, mask, general, logit_scale, select,
            HEADS, TOKENS, KEY_TOKENS, NW, *strides, *dq.stride(), *term_strides, **common)
        grid = (triton.cdiv(KEY_TOKENS, META["BLOCK_N"]), B * HEADS)
        attention_dkdv[grid](
            q, k, v, dout, dk, dv, dbias, lse, delta, bias, mask, general, logit_scale,
            select, HEADS, TOKENS, KEY_TOKENS, NW, *strides, *dk.stride(), *dv.stride(),
            *term_strides, **common)
    grads = tuple(g.to(DTYPE) for g in (dq, dk, dv))
    if dbias is not None:
        lead = (1,) * max(given.dim() - 3, 0)
        dbias = dbias.view(*lead, *dbias.shape).sum_to_size(given.shape).to(given.dtype)
    return (*grads, dbias)
'''


def render(spec: AttentionSpec, schedule: Schedule) -> T.KernelSource:
    text = T.render(TEMPLATE, **hooks(spec, schedule, "fused window attention backward"))
    return T.KernelSource(f"{spec.geometry()}_{schedule.name}", text, schedule, spec.key(), KERNELS)
