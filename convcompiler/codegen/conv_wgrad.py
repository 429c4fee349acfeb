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

A 3-D conv (spec.depth) adds the depth tap kd to the taps (grid axis 1) and the output depth
slice to the pixels: p runs over (n, do, ho, wo), and x's slice do*SD - PD + kd*DD is read
(zeros outside it) as the rows and columns are.
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
    if spec.op != "conv_wgrad":
        raise InvalidSchedule("wgrad_splitk computes weight gradients only")
    taps = spec.kernel[0] * spec.kernel[1] * (spec.depth.kernel if spec.depth else 1)
    if spec.groups * taps > 65535:
        raise InvalidSchedule("groups x taps exceed grid axis 1 (65535)")
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
    # pointers: dy [N, K, (DO,) HO, WO], x [N, C, (D,) H, W], dw (or the split workspace),
    # dy's mask
    dy_ptr, x_ptr, dw_ptr, dym_ptr,
    # sizes; CG and KG are fixed by the spec (tails known); CHUNKS: reduction steps per split
    # (a constant loop bound: Triton 3.6's interpreter cannot loop to a runtime argument);
    # D and DO: a 3-D conv's input and output depth (1 in 2-D)
    N, H, W, HO, WO, D, DO, CHUNKS: tl.constexpr, CG: tl.constexpr, KG: tl.constexpr,
    # strides; dw's: [split, K, C/groups, (KD,) KH, KW]; the depth's are 0 in 2-D
    syn, syk, syd, syh, syw, sxn, sxc, sxd, sxh, sxw, sds, sdk, sdc, sdd, sdh, sdw,
    smn, smk, smd, smh, smw,
    # conv geometry (baked from the spec); the depth axis's with DEPTH3 (else 1, 1, 0, 1)
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    DEPTH3: tl.constexpr, KD: tl.constexpr, SD: tl.constexpr, PD: tl.constexpr,
    DD: tl.constexpr,
    # meta-parameters
    PRECISION: tl.constexpr, WIDEN: tl.constexpr, INT64: tl.constexpr, SPLIT: tl.constexpr,
    MASK_LIKE_DY: tl.constexpr,  # dy's mask has dy's strides: it reuses dy's offsets
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # ---- 1. the tile: BLOCK_M output x BLOCK_N input channels of group g, at tap (kh, kw) ----
    g = tl.program_id(1) // (KD * KH * KW)
    tap = tl.program_id(1) - g * (KD * KH * KW)
    kd = tap // (KH * KW)  # the depth tap (0 in 2-D)
    kh = (tap - kd * (KH * KW)) // KW
    kw = tap - kd * (KH * KW) - kh * KW
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
    P = N * DO * HO * WO
    for i in range(0, CHUNKS):
        p = (split + i * SPLIT) * BLOCK_K + offs_r
        p_ok = p < P
        p = p % P  # pixels past the end wrap (p_ok masks them)
        wo = p % WO
        ho = (p // WO) % HO
        n = p // (WO * HO)
        if DEPTH3:  # p runs over (n, do, ho, wo)
            do = n % DO
            n = n // DO
        if INT64:
            n = n.to(tl.int64)
        dy_pix = n * syn + ho * syh + wo * syw
        m_pix = n * smn + ho * smh + wo * smw
        x_img, x_ok = n * sxn, p_ok
        if DEPTH3:  # x's slice do*SD - PD + kd*DD (zeros outside the depth)
            dy_pix += do * syd
            m_pix += do * smd
            x_img, x_ok = _window_tap(x_img, do * SD - PD, do * 0, p_ok, kd, 0, D, 1, sxd, 0,
                                      PD, 0, DD, 1)
        dy_off = dy_col[:, None] + dy_pix[None, :]
        live = k_ok[:, None] & p_ok[None, :]
        if dym_ptr is not None:  # dy = where(mask, 0, g): a masked g is not even loaded
            m_off = dy_off
            if not MASK_LIKE_DY:
                m_off = ((g * KG + offs_k) * smk)[:, None] + m_pix[None, :]
            live = live & (tl.load(dym_ptr + m_off, mask=live, other=1) == 0)
        a = tl.load(dy_ptr + dy_off, mask=live, other=0.0)
        x_row, row_ok = _window_tap(x_img, ho * SH - PH, wo * SW - PW, x_ok, kh, kw, H, W,
                                    sxh, sxw, PH, PW, DH, DW)
        b = tl.load(x_ptr + x_row[:, None] + x_col[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, WIDEN, PRECISION)

    # ---- 3. store this split's sum (its own slice: no atomics, a fixed order) ----
    dw_off = (split * sds + kd * sdd + kh * sdh + kw * sdw
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
    N, C, *spatial = x.shape
    D, H, W = spatial if NDIM == 3 else (1, *spatial)
    g = GEOMETRY
    HO = (H + 2 * g["PH"] - g["DH"] * (g["KH"] - 1) - 1) // g["SH"] + 1
    WO = (W + 2 * g["PW"] - g["DW"] * (g["KW"] - 1) - 1) // g["SW"] + 1
    d = DEPTH_ARGS
    DO = (D + d["PD"] + DEPTH_PAD_END - d["DD"] * (d["KD"] - 1) - 1) // d["SD"] + 1
    K = dy.shape[1]
    out_spatial = (DO, HO, WO) if NDIM == 3 else (HO, WO)
    if (dy.shape != (N, K, *out_spatial) or C % GROUPS or K % GROUPS
            or K != OUT_CHANNELS):
        raise ValueError(f"gradient {tuple(dy.shape)} does not fit input {tuple(x.shape)} "
                         f"(groups={GROUPS}, expected {OUT_CHANNELS} channels)")
    CG, KG = C // GROUPS, K // GROUPS
    masked = dy
${check_mask}
    # ---- 2. allocate dw in eager's memory format, and the split workspace ----
    taps = (d["KD"], g["KH"], g["KW"]) if NDIM == 3 else (g["KH"], g["KW"])
    fmt = torch.contiguous_format
    if WEIGHT_CHANNELS_LAST:
        fmt = torch.channels_last_3d if NDIM == 3 else torch.channels_last
    dw = torch.empty((K, CG, *taps), device=x.device, dtype=x.dtype, memory_format=fmt)
${with_depth}
    if N * DO * HO * WO == 0:  # no pixel: the sum is empty
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
    chunks = triton.cdiv(triton.cdiv(N * DO * HO * WO, META["BLOCK_K"]), split)
    grid = (triton.cdiv(KG, META["BLOCK_M"]) * triton.cdiv(CG, META["BLOCK_N"]),
            GROUPS * d["KD"] * g["KH"] * g["KW"], split)

    # ---- 3. launch, then add the splits in order ----
    int64 = max(x.numel(), dy.numel()) >= INDEX_LIMIT
    conv_wgrad_splitk[grid](
        dy, x, out, mask, N, H, W, HO, WO, D, DO, chunks, CG, KG,
        *with_depth(dy.stride()), *with_depth(x.stride()), *with_depth(strides),
        *with_depth(mask.stride() if mask is not None else dy.stride()),
        **GEOMETRY, **DEPTH_ARGS, PRECISION=PRECISION, WIDEN=widen, INT64=int64,
        MASK_LIKE_DY=mask_like,
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
        with_depth=T.WITH_DEPTH,
    )
    return T.KernelSource(
        f"{spec.geometry()}_{schedule.name}", text, schedule, spec.key(), KERNELS
    )
