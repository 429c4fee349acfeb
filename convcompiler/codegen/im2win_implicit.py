"""Schedule `im2win_implicit`: a conv as a GEMM over the im2win band, band never stored.

The im2win band of an output row `ho` holds the KH input rows its windows touch:

    band[n, ho, wb, ky, c] = x_pad[n, c, ho*SH + ky*DH, wb]

and the window of output (ho, wo) is the band's columns wb = wo*SW + kx*DW. This kernel
computes those band addresses inside its loads, straight from x, so it needs no workspace.
GEMM view, per group g: M = N*HO*WO output pixels, N = K/groups output channels, reduction
over (kx, ky, c) of the window.

Two reduction orders (parameter REDUCTION):
    "tap"   for each of the KH*KW taps, BLOCK_K channels at a time (channels >= 16)
    "flat"  (kx, ky, c) packed into one index, so a 3-channel 11x11 window fills the tiles
"""

from __future__ import annotations

from ..schedule import InvalidSchedule, Schedule, schedule_space
from ..spec import ConvSpec
from . import template as T

LAUNCH_KEYS = ("num_warps", "num_stages")


@schedule_space(
    "im2win_implicit",
    BLOCK_M=(16, 32, 64, 128),
    BLOCK_N=(16, 32, 64, 128),
    BLOCK_K=(16, 32, 64, 128),
    GROUP_M=(8,),
    REDUCTION=("tap", "flat"),
    num_warps=(2, 4, 8),
    num_stages=(1, 2, 3, 4),
)
def SPACE(spec: ConvSpec, s: Schedule) -> None:
    if s["REDUCTION"] == "tap" and spec.in_channels_per_group < 16 and s["BLOCK_K"] > 16:
        raise InvalidSchedule("tap reduction with < 16 channels per group wastes BLOCK_K > 16")
    if spec.device == "cuda":
        acc_regs = s["BLOCK_M"] * s["BLOCK_N"] // (32 * s["num_warps"])
        if acc_regs > 64:
            raise InvalidSchedule(f"{acc_regs} fp32 accumulator registers per thread (> 64)")


TEMPLATE = '''${header}
import torch
import triton
import triton.language as tl

${constants}
${helpers}

@triton.jit
def conv_im2win_implicit(
    # pointers
    x_ptr, w_ptr, b_ptr, y_ptr,
    # sizes
    N, H, W, HO, WO, CG, KG,
    # strides
    sxn, sxc, sxh, sxw, swk, swc, swh, sww, syn, syk, syh, syw,
    # conv geometry (baked from the spec)
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    # meta-parameters
    REDUCTION: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---- 1. the tile: BLOCK_M output pixels x BLOCK_N output channels of group g ----
    g = tl.program_id(1)
    M = N * HO * WO
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, KG, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = g * KG + offs_n
    m_ok = offs_m < M
    k_ok = offs_n < KG

    # ---- 2. where each pixel's window starts in the (virtual) im2win band ----
    wo = offs_m % WO
    ho = (offs_m // WO) % HO
    n = offs_m // (WO * HO)
    if INT64:
        n = n.to(tl.int64)
    hi0 = ho * SH - PH
    wi0 = wo * SW - PW
    x_base = x_ptr + g * CG * sxc
    x_row = n * sxn + hi0 * sxh + wi0 * sxw
    w_col = offs_k * swk
    offs_r = tl.arange(0, BLOCK_K)

    # ---- 3. reduction over the window: acc[m, k] += band[m, r] * w[k, r] ----
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    if REDUCTION == "flat":
        R = KW * KH * CG
        for r0 in range(0, R, BLOCK_K):
            r = r0 + offs_r
            c = r % CG
            ky = (r // CG) % KH
            kx = r // (CG * KH)
            hi = hi0[:, None] + (ky * DH)[None, :]
            wi = wi0[:, None] + (kx * DW)[None, :]
            a_ok = m_ok[:, None] & (r < R)[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            a_off = x_row[:, None] + (c * sxc + ky * DH * sxh + kx * DW * sxw)[None, :]
            a = tl.load(x_base + a_off, mask=a_ok, other=0.0)
            b_off = w_col[None, :] + (c * swc + ky * swh + kx * sww)[:, None]
            b = tl.load(w_ptr + b_off, mask=(r < R)[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        c_steps = (CG + BLOCK_K - 1) // BLOCK_K
        for it in range(0, KW * KH * c_steps):
            tap = it // c_steps
            c = (it - tap * c_steps) * BLOCK_K + offs_r
            kx = tap // KH
            ky = tap - kx * KH
            hi = hi0 + ky * DH
            wi = wi0 + kx * DW
            row_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            c_ok = c < CG
            a_off = (x_row + ky * DH * sxh + kx * DW * sxw)[:, None] + (c * sxc)[None, :]
            a = tl.load(x_base + a_off, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            b_off = w_col[None, :] + (c * swc)[:, None] + (ky * swh + kx * sww)
            b = tl.load(w_ptr + b_off, mask=c_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

${epilogue}

    # ---- 5. store in eager's memory format ----
    _store_tile(y_ptr, acc, offs_m, offs_k, k_ok, M, HO, WO, syn, syk, syh, syw, INT64)


def launch(x, weight, bias=None):
${prepare}
    # ---- 3. launch: one program per (pixel tile, channel tile), one grid row per group ----
    int64 = max(x.numel(), y.numel(), weight.numel()) >= 2**31
    grid = lambda meta: (
        triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(KG, meta["BLOCK_N"]), GROUPS)
    conv_im2win_implicit[grid](
        x, weight, bias, y,
        N, H, W, HO, WO, CG, KG,
        *x.stride(), *weight.stride(), *y.stride(),
        **GEOMETRY, PRECISION=PRECISION, UPCAST=upcast, INT64=int64, **META, **LAUNCH)
    return y.squeeze(2) if NDIM == 1 else y
'''


def render(spec: ConvSpec, schedule: Schedule) -> T.KernelSource:
    text = T.render(
        TEMPLATE,
        header=T.header(spec, schedule, "convolution as an implicit im2win GEMM"),
        constants=T.constants(spec, schedule, LAUNCH_KEYS),
        helpers=T.HELPERS,
        epilogue=T.epilogue(spec),
        prepare=T.PREPARE.strip("\n"),
    )
    return T.KernelSource(
        name=f"{spec.geometry()}_{schedule.name}",
        text=text,
        schedule=schedule,
        spec_key=spec.key(),
        kernels=("conv_im2win_implicit",),
    )
