"""Schedule `window_attention`: one fused kernel for Swin-style window attention.

One program computes BLOCK_M query rows of one (window, head) pair:

    s = scale * q @ k^T  [x logit_scale[h]]  + bias[h] + mask[b mod windows] + general[b, h]
    out = softmax(s) @ v

q, k and v are read straight from the projection's output through their strides (no
layout copies); the keys are visited BLOCK_N at a time with an online softmax in fp32, so no
N x N score tensor ever exists in memory; rows and columns past N (49 is not a power of two)
are masked. The output is written in the layout the next projection reads: [B, N, H*D]
("bnc") or [B, H, N, D] ("bhnd"). With `cosine` (SwinV2), q and k rows are L2-normalised
in the kernel. The keys may be fewer or more than the queries (pooled keys and values), v's
head dim may differ from q's and k's, head dims below 16 are padded to 16 in registers, and
an operand stored transposed ([.., D, N], LeViT's k) is read with its strides swapped.
"""

from __future__ import annotations

import inspect

from .. import score_terms
from ..devices import Device
from ..schedule import InvalidSchedule, Schedule, schedule_space
from ..spec import MAX_HEAD_DIM, AttentionSpec
from . import template as T
from .attention_parts import LAYOUT_CONSTANTS, OPERANDS, OUTPUT_VIEW, SCORES

KERNELS = ("window_attention",)
# the host-side helpers each kernel's source carries (score_terms.py's functions, verbatim)
SCORE_TERMS = "\n\n\n".join(
    inspect.getsource(getattr(score_terms, name)).rstrip()
    for name in ("per_head", "per_window", "_distinct", "tiles_of", "visible_pairs", "key_tiles",
                 "tile_lists")
)
LAUNCH_KEYS = ("num_warps", "num_stages")
# Head dims over 256 (padded to 512): Triton's shared memory for the kernel measured at about
# (num_stages - 1) k and v tiles plus 20-40 KiB (static report, sm_80 and sm_90)
WIDE_SHARED_EXTRA = 40 * 1024


def padded_dim(dim: int) -> int:
    """A head dim as the kernel's tiles hold it: a power of two, at least tl.dot's 16 (the
    padding is masked on load, never read from memory)."""
    return max(16, 1 << (dim - 1).bit_length())


@schedule_space(
    "window_attention",
    BLOCK_M=score_terms.TILE_SIZES,
    BLOCK_N=score_terms.TILE_SIZES,
    num_warps=(2, 4, 8),
    num_stages=(1, 2, 3),
)
def SPACE(spec: AttentionSpec, s: Schedule, device: Device | None) -> None:
    for name, dim in (("head_dim", spec.head_dim), ("v_head_dim", spec.value_dim)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise InvalidSchedule(f"{name} {dim} outside 1..{MAX_HEAD_DIM}")
    if device is None:
        return
    # Budgets from the static sm_80/sm_90 report: beyond them the score tile, its bias and
    # mask loads and the accumulator spilled (fp32 key tiles of 64 spilled on sm_80).
    d = max(padded_dim(spec.head_dim), padded_dim(spec.value_dim))
    threads = 32 * s["num_warps"]
    if s["BLOCK_M"] * s["BLOCK_N"] // threads > 16:
        raise InvalidSchedule("more than 16 score values per thread")
    if s["BLOCK_M"] * d // threads > 32:
        raise InvalidSchedule("more than 32 accumulator values per thread")
    if spec.dtype == "float32" and s["BLOCK_N"] > 32:
        raise InvalidSchedule("float32 key tiles over 32 spill on sm_80")
    if d > 256 and spec.dtype != "float32" and s["BLOCK_N"] < 32:
        raise InvalidSchedule("wide half-precision heads: 16-key tiles spilled on sm_90")
    if d > 256:  # wide heads: the pipelined k and v tiles dominate shared memory
        kv = padded_dim(spec.head_dim) + padded_dim(spec.value_dim)
        tiles = (max(s["num_stages"], 2) - 1) * s["BLOCK_N"] * kv * T.ITEMSIZE[spec.dtype]
        if tiles + WIDE_SHARED_EXTRA > device.smem_per_block:
            raise InvalidSchedule(f"about {tiles + WIDE_SHARED_EXTRA} B of shared memory")


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
${layout_constants}
COSINE = ${cosine}
MASK_REPEAT = ${mask_repeat}  # the mask is added this many times
SAFE_SOFTMAX = ${safe_softmax}  # a row of all -inf scores gives 0 (SDPA), not NaN
SELECT = ${select}  # a boolean mask applied last: "keep" (True keeps), "drop" (True fills)
FILL = ${fill}
SPARSE = ${sparse}  # a constant mask hides whole key tiles: visit only the others
OUTPUT = ${output}
PRECISION = ${precision}
INDEX_LIMIT = 2**31  # tensors this large get 64-bit offsets
META = ${meta}
LAUNCH = ${launch}


# Row reductions combine with Triton's own sum and max functions: Triton's interpreter
# recognises them and reduces with NumPy, where a combine function of ours would run
# element by element in Python (95% of a CPU run of swin_t).
_add = tl.standard._sum_combine
_max = tl.standard._elementwise_max


@triton.jit
def _unit_rows(x):
    # L2-normalise each row (F.normalize, eps 1e-12)
    norm = tl.sqrt(tl.reduce(x * x, 1, _add))
    return x / tl.maximum(norm, 1e-12)[:, None]


# Every lane's address stays inside its tensor, masked lanes included: on sm_90 / sm_100 Triton
# may pipeline a masked tl.load into cp.async, which issues the address of every lane, so an
# index past the window's tokens or the head's dims would read outside q, k, v, the bias or
# the mask (PyTorch PR 186440). _block wraps such indices back inside; the masks still keep
# the lanes out of the result. (Wrapping, `i % size`, keeps the index's contiguity where
# the mask allows it, so loads still vectorise; tl.where(ok, i, 0) would not.)
${wrapped_block}


${scores}


@triton.jit
def _key_tile(n0, q, m_i, l_i, acc, offs_m, m_ok, offs_d, d_ok, offs_e, e_ok,
              k_bh, v_bh, bias_h, mask_w, general_bh, sel_bh, logit_scale,
              skn, skd, svn, svd, sbi, sbj, smi, smj, sgi, sgj, ssi, ssj,
              NK: tl.constexpr, SCALE: tl.constexpr, COSINE: tl.constexpr,
              MASK_REPEAT: tl.constexpr, KEEP: tl.constexpr, FILL: tl.constexpr,
              PRECISION: tl.constexpr, WIDEN: tl.constexpr, BLOCK_N: tl.constexpr):
    # one key tile of the online softmax: the keys n0 .. n0 + BLOCK_N, their scores with
    # every term, and (m_i, l_i, acc) updated
    work = acc.dtype
    offs_n, n_ok = _block(n0, NK, BLOCK_N)
    k = tl.load(k_bh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if WIDEN:
        k = k.to(tl.float64)
    if COSINE:
        k = _unit_rows(k.to(work)).to(k.dtype)
    s = _scores(q, k, offs_m, m_ok, offs_n, n_ok, bias_h, mask_w, general_bh, sel_bh,
                logit_scale, sbi, sbj, smi, smj, sgi, sgj, ssi, ssj,
                SCALE, MASK_REPEAT, KEEP, FILL, PRECISION, WIDEN)
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _max))
    # a row whose keys so far are all masked with -inf has m_new = -inf: shift by 0
    # instead, so exp gives 0 rather than exp(-inf - -inf) = NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_shift[:, None])
    alpha = tl.exp(m_i - m_shift)
    l_i = l_i * alpha + tl.reduce(p, 1, _add)
    v = tl.load(v_bh + offs_n[:, None] * svn + offs_e[None, :] * svd,
                mask=n_ok[:, None] & e_ok[None, :], other=0.0)
    if WIDEN:
        v = v.to(tl.float64)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(work)
    m_i = m_new
    return m_i, l_i, acc


@triton.jit
def window_attention(
    # q, k, v: [B, H, N, D] views; o: the output; the additive terms (None when absent);
    # counts [B, H, tq] and order [B, H, tq, tk]: the key tiles each query tile visits
    q_ptr, k_ptr, v_ptr, o_ptr, bias_ptr, mask_ptr, general_ptr, ls_ptr, sel_ptr,
    counts_ptr, order_ptr,
    # sizes; N and NK (the queries' and the keys' tokens) are fixed by the spec, so the key
    # loop has constant bounds
    H, N: tl.constexpr, NK: tl.constexpr, NW,
    # strides: q, k, v, o as (b, h, n, d); bias (h, i, j); mask (w, i, j); general (b, h, i, j)
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    sbh, sbi, sbj, smw, smi, smj, sgb, sgh, sgi, sgj, ssb, ssh, ssi, ssj,
    # meta-parameters
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
    V_HEAD_DIM: tl.constexpr, DV: tl.constexpr, COSINE: tl.constexpr,
    MASK_REPEAT: tl.constexpr, SAFE_SOFTMAX: tl.constexpr, KEEP: tl.constexpr,
    FILL: tl.constexpr,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # ---- 1. the tile: BLOCK_M query rows of window-batch b, head h ----
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
    if WIDEN:
        q = q.to(tl.float64)
    if COSINE:
        q = _unit_rows(q.to(work)).to(q.dtype)

    # ---- 2. keys BLOCK_N at a time, online softmax in fp32 ----
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=work)
    l_i = tl.full((BLOCK_M,), 0.0, dtype=work)
    acc = tl.full((BLOCK_M, DV), 0.0, dtype=work)
    # the operands at this (b, h); the key tile adds its rows and columns
    k_bh = k_ptr + b * skb + h * skh
    v_bh = v_ptr + b * svb + h * svh
    bias_h = None
    mask_w = None
    general_bh = None
    sel_bh = None
    logit_scale = None
    if bias_ptr is not None:  # relative position bias[h, i, j]
        bias_h = bias_ptr + h * sbh
    if mask_ptr is not None:  # shifted-window mask[b mod NW, i, j]
        mask_w = mask_ptr + (b % NW) * smw
    if general_ptr is not None:  # any other additive mask[b, h, i, j]
        general_bh = general_ptr + b * sgb + h * sgh
    if sel_ptr is not None:  # a boolean mask[b, h, i, j], applied last
        sel_bh = sel_ptr + b * ssb + h * ssh
    if ls_ptr is not None:  # per-head logit scale (SwinV2)
        logit_scale = tl.load(ls_ptr + h).to(work)
    KEY_TILES: tl.constexpr = (NK + BLOCK_N - 1) // BLOCK_N
    if counts_ptr is None:
        for n0 in range(0, NK, BLOCK_N):
            m_i, l_i, acc = _key_tile(
                n0, q, m_i, l_i, acc, offs_m, m_ok, offs_d, d_ok, offs_e, e_ok,
                k_bh, v_bh, bias_h, mask_w, general_bh, sel_bh, logit_scale,
                skn, skd, svn, svd, sbi, sbj, smi, smj, sgi, sgj, ssi, ssj,
                NK, SCALE, COSINE, MASK_REPEAT, KEEP, FILL, PRECISION, WIDEN, BLOCK_N)
    else:  # a constant mask: only the key tiles this query tile sees, in ascending order
        tile = (b * H + h) * ((N + BLOCK_M - 1) // BLOCK_M) + pid_m
        trips = tl.load(counts_ptr + tile)
        if WIDEN:  # Triton's interpreter (3.6 takes no loaded loop bound): every slot
            for i in range(0, KEY_TILES):
                if i < trips:
                    n0 = tl.load(order_ptr + tile * KEY_TILES + i) * BLOCK_N
                    m_i, l_i, acc = _key_tile(
                        n0, q, m_i, l_i, acc, offs_m, m_ok, offs_d, d_ok, offs_e, e_ok,
                        k_bh, v_bh, bias_h, mask_w, general_bh, sel_bh, logit_scale,
                        skn, skd, svn, svd, sbi, sbj, smi, smj, sgi, sgj, ssi, ssj,
                        NK, SCALE, COSINE, MASK_REPEAT, KEEP, FILL, PRECISION, WIDEN, BLOCK_N)
        else:
            for i in range(0, trips):
                n0 = tl.load(order_ptr + tile * KEY_TILES + i) * BLOCK_N
                m_i, l_i, acc = _key_tile(
                    n0, q, m_i, l_i, acc, offs_m, m_ok, offs_d, d_ok, offs_e, e_ok,
                    k_bh, v_bh, bias_h, mask_w, general_bh, sel_bh, logit_scale,
                    skn, skd, svn, svd, sbi, sbj, smi, smj, sgi, sgj, ssi, ssj,
                    NK, SCALE, COSINE, MASK_REPEAT, KEEP, FILL, PRECISION, WIDEN, BLOCK_N)

    # ---- 3. normalise and store in the layout the projection reads ----
    out = acc / l_i[:, None]
    if SAFE_SOFTMAX:  # every key masked with -inf: 0 rather than 0 / 0
        out = tl.where(l_i[:, None] == 0.0, 0.0, out)
    o_off = b * sob + h * soh + offs_m[:, None] * son + offs_e[None, :] * sod
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & e_ok[None, :])


# ---- the score terms as the kernel indexes them (convcompiler/score_terms.py) ----
${score_terms}


${operands}


${output_view}


def launch(q, k, v, bias=None, mask=None, general=None, logit_scale=None, select=None):
    # ---- 1. check constraints; view the additive terms as the kernel indexes them ----
    q, k, v = _qkv(q, k, v)
    B = q.shape[0]
    bias, mask, general, logit_scale, select, NW, term_strides = _terms(
        B, bias, mask, general, logit_scale, select)

    # ---- 2. allocate the output in the layout the projection reads ----
    y, canonical = _output(B, q, OUT_DTYPE)
    if y.numel() == 0:
        return y
    # Under Triton's interpreter (CPU) the kernel works in fp64, and a bf16 result is stored
    # in fp32 for torch to round (the interpreter truncates fp32 -> bf16).
    widen = q.device.type == "cpu"
    if widen and y.dtype == torch.bfloat16:
        out, canonical = _output(B, q, torch.float32)
    else:
        out = y
    o_strides = canonical.stride()
    int64 = max(t.numel() for t in (q, k, v, out)) >= INDEX_LIMIT
    counts = order = None
    if SPARSE:  # the key tiles each query tile sees, from this call's terms
        visible = visible_pairs(bias, mask, general, select, SELECT == "keep", FILL)
        seen = key_tiles(visible, B, META["BLOCK_M"], META["BLOCK_N"])
        if seen is not None:
            counts, order = tile_lists(seen, q, k, v)

    # ---- 3. launch: (query-row blocks, window-batch x heads) ----
    grid = lambda meta: (triton.cdiv(TOKENS, meta["BLOCK_M"]), B * HEADS)
    window_attention[grid](
        q, k, v, out, bias, mask, general, logit_scale, select, counts, order,
        HEADS, TOKENS, KEY_TOKENS, NW,
        *q.stride(), *k.stride(), *v.stride(), *o_strides, *term_strides,
        SCALE=SCALE, HEAD_DIM=HEAD_DIM, D=HEAD_DIM_P2, V_HEAD_DIM=V_HEAD_DIM, DV=V_HEAD_DIM_P2,
        COSINE=COSINE, MASK_REPEAT=MASK_REPEAT,
        SAFE_SOFTMAX=SAFE_SOFTMAX, KEEP=SELECT == "keep", FILL=FILL, PRECISION=PRECISION,
        WIDEN=widen, INT64=int64, **META,
        **LAUNCH)
    if out is not y:
        y.copy_(out)
    return y
'''


def hooks(spec: AttentionSpec, schedule: Schedule, summary: str) -> dict[str, str]:
    """Every hook of the attention templates (this one and attention_backward's)."""
    meta, launch = T.split_params(schedule, LAUNCH_KEYS)
    layout = dict(
        transposed=repr(spec.transposed),
        heads_axis=str(spec.heads_axis),
        batch_split=str(spec.batch_split),
        dtype=spec.dtype,
        out_dtype=spec.out_dtype or spec.dtype,
        scale=repr(float(spec.scale)),
    )
    return dict(
        **layout,
        layout_constants=T.render(LAYOUT_CONSTANTS, **layout),
        header=T.header(spec, schedule, summary),
        tokens=str(spec.tokens),
        key_tokens=str(spec.keys),
        heads=str(spec.heads),
        head_dim=str(spec.head_dim),
        head_dim_p2=str(padded_dim(spec.head_dim)),
        v_head_dim=str(spec.value_dim),
        v_head_dim_p2=str(padded_dim(spec.value_dim)),
        cosine=str(spec.cosine),
        mask_repeat=repr(float(spec.mask_repeat)),
        safe_softmax=str(spec.safe_softmax),
        select=repr(spec.select),
        fill=f'float("{spec.fill}")' if abs(spec.fill) == float("inf") else repr(spec.fill),
        output=repr(spec.output),
        precision=repr(spec.precision),
        meta=meta,
        launch=launch,
        wrapped_block=T.WRAPPED_BLOCK,
        sparse=str(bool(spec.key_tiles)),
        score_terms=SCORE_TERMS,
        scores=SCORES,
        operands=OPERANDS,
        output_view=OUTPUT_VIEW,
    )


def render(spec: AttentionSpec, schedule: Schedule) -> T.KernelSource:
    text = T.render(TEMPLATE, **hooks(spec, schedule, "fused window multi-head self-attention"))
    return T.KernelSource(f"{spec.geometry()}_{schedule.name}", text, schedule, spec.key(), KERNELS)
