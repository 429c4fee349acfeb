"""Schedule `wgrad_splitk`: a conv's weight gradient as one GEMM per tap, split over pixels.

    dw[k, c, kh, kw] = sum over (n, oh, ow) of dy[n, k, oh, ow] * x[n, c, hi, wi]
    hi = oh*SH - PH + kh*DH,  wi = ow*SW - PW + kw*DW   (0 outside the image: the padding)

Per tap (kh, kw) and group this is a GEMM, M = K/groups output channels, N = C/groups input
channels, reduced over the N*HO*WO output pixels: a long reduction with a small result, so
the pixels are split over SPLIT programs (grid axis 2) that each own an interleaved share of
the BLOCK_P chunks. Each program writes its partial sum (fp32) to its own slice of a
workspace [SPLIT, K, C/groups, KH, KW]; the launcher adds the slices in a fixed order, so the
result is the same on every run (no atomics). With SPLIT = 1 the kernel writes dw directly.
x is read through the window's addresses like the forward implicit GEMM (no im2col buffer),
dy and dw through their strides. dy may come with a mask (spec.input_mask: dy =
where(mask, 0, g), the backward of a ReLU after the conv): the kernel loads the bool mask
first and g only where it is False (0 elsewhere), so the masked gradient is never written.
"""

from __future__ import annotations

from ..devices import Device
from ..schedule import InvalidSchedule, Schedule, schedule_space
from ..spec import ConvSpec
from . import template as T

KERNELS = ("conv_wgrad_splitk",)  # the @triton.jit kernels launch() calls, in order
LAUNCH_KEYS = ("num_warps", "num_stages")


@schedule_space(
    "wgrad_splitk",
    BLOCK_M=(16, 32, 64, 128),  # output channels of dw
    BLOCK_N=(16, 32, 64, 128),  # input channels of dw
    BLOCK_K=(16, 32, 64),  # pixels per reduction step
    SPLIT=(1, 2, 4, 8, 16, 32, 64),
    num_warps=(4, 8),
    num_stages=(2, 3),
)
def SPACE(spec: ConvSpec, s: Schedule, device: Device | None) -> None:
    T.check_planar(spec)
    if spec.op != "conv_wgrad":
        raise InvalidSchedule("wgrad_splitk computes weight gradients only")
    if spec.out_channels_per_group <= 16 and s["BLOCK_M"] > 16:
        raise InvalidSchedule("<= 16 output channels per group waste BLOCK_M > 16")
    if spec.in_channels_per_group <= 16 and s["BLOCK_N"] > 16:
        raise InvalidSchedule("<= 16 input channels per group waste BLOCK_N > 16")
    pixels = spec.hint(spec.output_pixels)
    if s["SPLIT"] > 1 and pixels < s["SPLIT"] * s["BLOCK_K"]:
        raise InvalidSchedule(f"{pixels} pixels leave some of {s['SPLIT']} splits nothing to add")
    T.check_gemm_tiles(spec, s, device)


TEMPLATE = """${header}
import torch
import triton
import triton.language as tl

${constants}
${helpers}

@triton.jit
def conv_wgrad_splitk(
    # pointers: dy [N, K, HO, WO], x [N, C, H, W], dw (or the split workspace), dy's mask
    dy_ptr, x_ptr, dw_ptr, dym_ptr,
    # sizes; CG and KG are fixed by the spec (tails known); CHUNKS: reduction steps per split
    # (a constant loop bound: Triton 3.6's interpreter cannot loop to a runtime argument)
    N, H, W, HO, WO, CHUNKS: tl.constexpr, CG: tl.constexpr, KG: tl.constexpr,
    # strides; dw's: [split, K, C/groups, KH, KW]
    syn, syk, syh, syw, sxn, sxc, sxh, sxw, sds, sdk, sdc, sdh, sdw, smn, smk, smh, smw,
    # conv geometry (baked from the spec)
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    # meta-parameters
    PRECISION: tl.constexpr, WIDEN: tl.constexpr, INT64: tl.constexpr, SPLIT: tl.constexpr,
    MASK_LIKE_DY: tl.constexpr,  # dy's mask has dy's strides: it reuses dy's offsets
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # ---- 1. the tile: BLOCK_M output x BLOCK_N input channels of group g, at tap (kh, kw) ----
    g = tl.program_id(1) // (KH * KW)
    tap = tl.program_id(1) - g * (KH * KW)
    kh = tap // KW
    kw = tap - kh * KW
    tiles_n = (CG + BLOCK_N - 1) // BLOCK_N
    offs_k = (tl.program_id(0) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < KG
    c_ok = offs_c < CG
    # channels past the group's wrap back into it (the masks keep them out)
    if KG % BLOCK_M != 0:
        offs_k = offs_k % KG
    if CG % BLOCK_N != 0:
        offs_c = offs_c % CG
    dy_col = (g * KG + offs_k) * syk
    x_col = (g * CG + offs_c) * sxc
    split = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_K)

    # ---- 2. reduction over this split's pixel chunks: acc[k, c] += dy[k, p] * x[p, c] ----
    acc = _zeros(BLOCK_M, BLOCK_N, WIDEN)
    P = N * HO * WO
    for i in range(0, CHUNKS):
        p = (split + i * SPLIT) * BLOCK_K + offs_r
        p_ok = p < P
        p = p % P  # pixels past the end wrap (p_ok masks them)
        wo = p % WO
        ho = (p // WO) % HO
        n = p // (WO * HO)
        if INT64:
            n = n.to(tl.int64)
        dy_off = dy_col[:, None] + (n * syn + ho * syh + wo * syw)[None, :]
        live = k_ok[:, None] & p_ok[None, :]
        if dym_ptr is not None:  # dy = where(mask, 0, g): a masked g is not even loaded
            m_off = dy_off
            if not MASK_LIKE_DY:
                m_off = (((g * KG + offs_k) * smk)[:, None]
                         + (n * smn + ho * smh + wo * smw)[None, :])
            live = live & (tl.load(dym_ptr + m_off, mask=live, other=1) == 0)
        a = tl.load(dy_ptr + dy_off, mask=live, other=0.0)
        x_row, row_ok = _window_tap(n * sxn, ho * SH - PH, wo * SW - PW, p_ok, kh, kw, H, W,
                                    sxh, sxw, PH, PW, DH, DW)
        b = tl.load(x_ptr + x_row[:, None] + x_col[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, WIDEN, PRECISION)

    # ---- 3. store this split's sum (its own slice: no atomics, a fixed order) ----
    dw_off = (split * sds + kh * sdh + kw * sdw
              + ((g * KG + offs_k) * sdk)[:, None] + (offs_c * sdc)[None, :])
    tl.store(dw_ptr + dw_off, acc.to(dw_ptr.dtype.element_ty),
             mask=k_ok[:, None] & c_ok[None, :])


def launch(dy, x, mask=None):
    # ---- 1. check constraints ----
    if x.dim() != NDIM + 2 or dy.dim() != NDIM + 2:
        raise ValueError(f"expected {NDIM + 2}-D input and gradient, got {tuple(x.shape)}, "
                         f"{tuple(dy.shape)}")
    if x.dtype != DTYPE or dy.dtype != DTYPE:
        raise TypeError(f"kernel built for {DTYPE}, got {x.dtype} and {dy.dtype}")
    if NDIM == 1:  # a 1-D conv runs as a 2-D conv over a 1-row image
        x, dy = x.unsqueeze(2), dy.unsqueeze(2)
    N, C, H, W = x.shape
    g = GEOMETRY
    HO = (H + 2 * g["PH"] - g["DH"] * (g["KH"] - 1) - 1) // g["SH"] + 1
    WO = (W + 2 * g["PW"] - g["DW"] * (g["KW"] - 1) - 1) // g["SW"] + 1
    K = dy.shape[1]
    if dy.shape != (N, K, HO, WO) or C % GROUPS or K % GROUPS or K != OUT_CHANNELS:
        raise ValueError(f"gradient {tuple(dy.shape)} does not fit input {tuple(x.shape)} "
                         f"(groups={GROUPS}, expected {OUT_CHANNELS} channels)")
    CG, KG = C // GROUPS, K // GROUPS
    masked = dy
${check_mask}
    # ---- 2. allocate dw in eager's memory format, and the split workspace ----
    fmt = torch.channels_last if WEIGHT_CHANNELS_LAST else torch.contiguous_format
    dw = torch.empty((K, CG, g["KH"], g["KW"]), device=x.device, dtype=x.dtype, memory_format=fmt)
    if N * HO * WO == 0:  # no pixel: the sum is empty
        dw.zero_()
        return dw.squeeze(2) if NDIM == 1 else dw
    # Under Triton's interpreter (CPU tensors) the kernel accumulates in fp64 (WIDEN).
    widen = x.device.type == "cpu"
    split = META["SPLIT"]
    if split > 1 or (widen and x.dtype == torch.bfloat16):
        out = torch.empty((split, *dw.shape), device=x.device, dtype=torch.float32)
        strides = out.stride()
    else:
        out = dw
        strides = (0, *dw.stride())
    chunks = triton.cdiv(triton.cdiv(N * HO * WO, META["BLOCK_K"]), split)
    grid = (triton.cdiv(KG, META["BLOCK_M"]) * triton.cdiv(CG, META["BLOCK_N"]),
            GROUPS * g["KH"] * g["KW"], split)

    # ---- 3. launch, then add the splits in order ----
    int64 = max(x.numel(), dy.numel()) >= INDEX_LIMIT
    conv_wgrad_splitk[grid](
        dy, x, out, mask, N, H, W, HO, WO, chunks, CG, KG,
        *dy.stride(), *x.stride(), *strides, *mask_strides,
        **GEOMETRY, PRECISION=PRECISION, WIDEN=widen, INT64=int64, MASK_LIKE_DY=mask_like,
        **META, **LAUNCH)
    if out is not dw:
        dw.copy_(out.sum(0))
    return dw.squeeze(2) if NDIM == 1 else dw
"""


def render(spec: ConvSpec, schedule: Schedule) -> T.KernelSource:
    text = T.render(
        TEMPLATE,
        header=T.header(spec, schedule, "a conv's weight gradient, split-K over the pixels"),
        constants=T.constants(spec, schedule, LAUNCH=LAUNCH_KEYS)
        + f"\nOUT_CHANNELS = {spec.out_channels}"
        + f"\nWEIGHT_CHANNELS_LAST = {spec.weight_layout == 'nhwc'}",
        helpers=T.HELPERS,
        check_mask=T.CHECK_MASK,
    )
    return T.KernelSource(
        f"{spec.geometry()}_{schedule.name}", text, schedule, spec.key(), KERNELS
    )
