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

With `spec.prologue` (the tap order only) the input arrives as act(batch_norm(x))
(pre-activation: PreAct ResNet's BN -> ReLU -> conv 3x3), or as layer_norm(x) over the
channels (ConvNeXt's LayerNorm2d before its downsampling 2x2 stride-2 conv): each loaded tile
is normalised in registers, its padding left zero as the conv's zero padding of the
normalised tensor is. A LayerNorm's statistics belong to the input pixel a tap reads, so with
one the reduction runs tap by tap: each tap's rows' mean and rstd first (two passes over
their channels, as gemm_1x1's rows), then its channel slices.
"""

from __future__ import annotations

from ..devices import Device
from ..schedule import InvalidSchedule, Schedule, schedule_space
from ..spec import ConvSpec
from . import template as T

KERNELS = ("conv_im2win_implicit",)  # the @triton.jit kernels launch() calls, in order
LAUNCH_KEYS = ("num_warps", "num_stages")
TILING_KEYS = ("M_TILES",)


@schedule_space(
    "im2win_implicit",
    BLOCK_M=(16, 32, 64, 128),
    BLOCK_N=(16, 32, 64, 128),
    BLOCK_K=(16, 32, 64, 128),
    GROUP_M=(8,),
    M_TILES=("image", "batch"),
    REDUCTION=("tap", "flat"),
    num_warps=(4, 8),
    num_stages=(2, 3, 4),
)
def SPACE(spec: ConvSpec, s: Schedule, device: Device | None) -> None:
    if spec.epilogue.scale:
        raise InvalidSchedule("only gemm_1x1 applies a layer scale")
    if spec.pool_sums:
        raise InvalidSchedule("only direct_depthwise writes pooled sums")
    if spec.input_scale:
        raise InvalidSchedule("only gemm_1x1 scales its input as it loads it")
    T.check_ln_epilogue(spec, s)
    if spec.prologue.dw or spec.windows or spec.out_windows:
        raise InvalidSchedule("a depthwise prologue is dw_gemm's, window rows gemm_1x1's")
    if spec.prologue.name() and s["REDUCTION"] != "tap":
        raise InvalidSchedule("the input's prologue needs the tap reduction (one channel run)")
    if spec.prologue.ln and spec.dtype == "float32" and s["num_warps"] > 4:
        # the taps' statistics loops at 8 warps spilled 8 bytes in float32 on sm_80 and sm_90
        # (static report: ConvNeXt's downsampling at 64 px, tiles 16 x 128)
        raise InvalidSchedule("a float32 LayerNorm prologue runs on 4 warps")
    if spec.depth and (s["REDUCTION"] != "tap" or spec.prologue.name()):
        raise InvalidSchedule("a 3-D conv runs the tap reduction, without an input prologue")
    if spec.depth and (s["BLOCK_M"], s["BLOCK_N"], s["num_warps"]) == (16, 128, 8):
        # static report, triton 3.6: r3d_18's 1x1x1 stride-2 conv + BN spilled 8 bytes on sm_80
        raise InvalidSchedule("a 3-D conv's 16 x 128 tile on 8 warps spilled on sm_80")
    if s["REDUCTION"] == "flat" and spec.padding_mode != "zeros":
        raise InvalidSchedule("the flat reduction's window offsets are linear: no padding mode")
    if s["REDUCTION"] == "tap" and spec.in_channels_per_group < 16 and s["BLOCK_K"] > 16:
        raise InvalidSchedule("tap reduction with < 16 channels per group wastes BLOCK_K > 16")
    if device is not None and s["REDUCTION"] == "flat" and s["num_warps"] < 8:
        # the flat reduction's per-element window arithmetic spilled with 4 warps on sm_80
        # (static report, MobileNetV2 depthwise 3x3 shapes)
        raise InvalidSchedule("flat reduction needs 8 warps on a GPU")
    T.check_gemm_tiles(spec, s, device)


TEMPLATE = """${header}
import torch
import triton
import triton.language as tl

${constants}
${prologue_constants}
${helpers}

${prologue}

${wrapped_block}


${row_stats}


@triton.jit
def _tap_step(acc, x_base, a_row, row_ok, w_ptr, w_col, k_ok, tap, c, sxc, pw_ptr, pb_ptr,
              pm_ptr, pv_ptr, row_mean, row_rstd, CG: tl.constexpr, BLOCK_K: tl.constexpr,
              PRE: tl.constexpr, WIDEN: tl.constexpr, PRECISION: tl.constexpr):
    # acc[m, k] += x[tap's pixel of m, c] * w[k, tap, c] over one slice of BLOCK_K input
    # channels c (a slice past CG wraps, its lanes masked: see the note over _tile_rows)
    c_ok = c < CG
    if CG % BLOCK_K != 0:
        c = c % CG
    a_mask = row_ok[:, None] & c_ok[None, :]
    a = tl.load(x_base + a_row[:, None] + (c * sxc)[None, :], mask=a_mask, other=0.0)
    if PRE:
        a = _prologue(a, a_mask, x_base, c, pw_ptr, pb_ptr, pm_ptr, pv_ptr, row_mean, row_rstd,
                      WIDEN)
    b = tl.load(w_ptr + w_col[None, :] + (tap * CG + c)[:, None],
                mask=c_ok[:, None] & k_ok[None, :], other=0.0)
    return _mma(a, b, acc, WIDEN, PRECISION)


@triton.jit
def _flat_window(x_row, hi0, wi0, m_ok, r, r_ok, H, W, sxc, sxh, sxw, CG: tl.constexpr,
                 KH: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr,
                 DW: tl.constexpr):
    # Element r = (kx, ky, c) of each pixel's window: its offset in x (x_row: the window's
    # origin) and whether it reads the image rather than the zero padding. With padding, an
    # offset in the halo is clamped to 0 (see the note over _tile_rows): one select on the
    # offset tile, as cheap here as clamping the rows and columns.
    c = r % CG
    ky = (r // CG) % KH
    kx = r // (CG * KH)
    hi = hi0[:, None] + (ky * DH)[None, :]
    wi = wi0[:, None] + (kx * DW)[None, :]
    ok = m_ok[:, None] & r_ok[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    off = x_row[:, None] + (c * sxc + ky * DH * sxh + kx * DW * sxw)[None, :]
    if PH > 0 or PW > 0:
        off = tl.where(ok, off, 0)
    return off, ok


@triton.jit
def conv_im2win_implicit(
    # pointers
    x_ptr, w_ptr, y_ptr,
    # epilogue operands (None when unused): conv bias, batch norm, residual; the input's
    # batch norm (the prologue)
    b_ptr, bnw_ptr, bnb_ptr, mean_ptr, var_ptr, r_ptr, pw_ptr, pb_ptr, pm_ptr, pv_ptr,
    # sizes; CG, KG and R are fixed by the spec (constant loop bounds, tails known). A 3-D
    # conv's output is seen as [N, K, DO*HO, WO]: HO counts its (depth, row) pairs, HR the
    # rows of one depth slice, D the input's depth
    N, H, W, HO, WO, D, HR, CG: tl.constexpr, KG: tl.constexpr, R: tl.constexpr,
    # strides (w_ptr is the packed filter: [K, KW, KH, (KD,) CG] contiguous); sxd: x's depth
    sxn, sxc, sxd, sxh, sxw, syn, syk, syh, syw, srn, src, srh, srw,
    # conv geometry (baked from the spec); the depth axis's with DEPTH3 (else 1, 1, 0, 1)
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    DEPTH3: tl.constexpr, KD: tl.constexpr, SD: tl.constexpr, PD: tl.constexpr,
    DD: tl.constexpr,
    PAD_MODE: tl.constexpr,  # the padding: 0 zeros, 1 reflect, 2 replicate, 3 circular
    PRE_BN: tl.constexpr, PRE_LN: tl.constexpr, PRE_EPS: tl.constexpr,
    # meta-parameters
    REDUCTION: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr, INT64: tl.constexpr,
    IMAGE_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---- 1. the tile: BLOCK_M output pixels x BLOCK_N output channels of group g ----
    g = tl.program_id(1)
    offs_m, m_ok, n, ho, wo, pid_n = _tile_rows(
        N, HO, WO, KG, IMAGE_TILES, INT64, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k, k_ok = _tile_cols(pid_n, g, KG, BLOCK_N)

    # ---- 2. where each pixel's window starts in the (virtual) im2win band ----
    if DEPTH3:  # the tile's rows run over (output depth, output row) pairs
        do = ho // HR
        ho = ho - do * HR
        di0 = do * SD - PD
    hi0 = ho * SH - PH
    wi0 = wo * SW - PW
    x_base = x_ptr + g * CG * sxc
    x_img = n * sxn
    x_row = x_img + hi0 * sxh + wi0 * sxw
    w_col = offs_k * R
    if INT64:
        w_col = offs_k.to(tl.int64) * R
    offs_r = tl.arange(0, BLOCK_K)
    if PRE_BN or PRE_LN:  # the prologue's per-channel parameters, from this group's first
        pw_ptr, pb_ptr = pw_ptr + g * CG, pb_ptr + g * CG
        pm_ptr, pv_ptr = pm_ptr + g * CG, pv_ptr + g * CG

    # ---- 3. reduction over the window: acc[m, k] += band[m, r] * w[k, r] ----
    # (reduction steps past R or CG wrap, the mask keeping them out: see _tile_rows' note)
    acc = _zeros(BLOCK_M, BLOCK_N, WIDEN)
    if REDUCTION == "flat":
        for r0 in range(0, R, BLOCK_K):
            r = r0 + offs_r
            r_ok = r < R
            if R % BLOCK_K != 0:
                r = r % R
            a_off, a_ok = _flat_window(x_row, hi0, wi0, m_ok, r, r_ok, H, W, sxc, sxh, sxw,
                                       CG, KH, PH, PW, DH, DW)
            a = tl.load(x_base + a_off, mask=a_ok, other=0.0)
            b = tl.load(w_ptr + w_col[None, :] + r[:, None],
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, WIDEN, PRECISION)
    elif PRE_LN:
        # tap by tap: the rows' LayerNorm statistics over the channels of the pixel the tap
        # reads (a tap in the padding: statistics of zeros, its lanes masked to 0 anyway)
        for tap in range(0, KW * KH):
            kx = tap // KH
            ky = tap - kx * KH
            a_row, row_ok = _window_tap(x_img, hi0, wi0, m_ok, ky, kx, H, W, sxh, sxw,
                                        PH, PW, DH, DW, PAD_MODE)
            row_mean, row_rstd = _row_stats(x_base + a_row[:, None], sxc, row_ok, PRE_EPS, CG,
                                            BLOCK_M, BLOCK_K, WIDEN)
            for c0 in range(0, CG, BLOCK_K):
                acc = _tap_step(acc, x_base, a_row, row_ok, w_ptr, w_col, k_ok, tap,
                                c0 + offs_r, sxc, pw_ptr, pb_ptr, pm_ptr, pv_ptr, row_mean,
                                row_rstd, CG, BLOCK_K, True, WIDEN, PRECISION)
    else:
        # taps (kx, ky[, kz]) in the packed filter's order; a 3-D conv's depth tap first picks
        # the input's slice (its padding mapped as the rows' and columns'), then the 2-D tap.
        # (loop bounds are written out from constexprs: Triton 3.6's interpreter turns every
        # assigned name into a tensor, which range() cannot take)
        c_steps = (CG + BLOCK_K - 1) // BLOCK_K
        for it in range(0, KW * KH * KD * ((CG + BLOCK_K - 1) // BLOCK_K)):
            tap = it // c_steps
            c = (it - tap * c_steps) * BLOCK_K + offs_r
            pair = tap // KD  # (kx, ky)'s index
            kx = pair // KH
            ky = pair - kx * KH
            x_tap, tap_ok = x_img, m_ok
            if DEPTH3:
                x_tap, tap_ok = _window_tap(x_img, di0, di0 * 0, m_ok, tap - pair * KD, 0, D,
                                            1, sxd, 0, PD, 0, DD, 1, PAD_MODE)
            a_row, row_ok = _window_tap(x_tap, hi0, wi0, tap_ok, ky, kx, H, W, sxh, sxw,
                                        PH, PW, DH, DW, PAD_MODE)
            acc = _tap_step(acc, x_base, a_row, row_ok, w_ptr, w_col, k_ok, tap, c, sxc,
                            pw_ptr, pb_ptr, pm_ptr, pv_ptr, 0.0, 1.0, CG, BLOCK_K, PRE_BN,
                            WIDEN, PRECISION)

${epilogue}


def launch(x, weight, bias=None, bn_weight=None, bn_bias=None, bn_mean=None, bn_var=None,
           residual=None, mask=None, x_scale=None, x_bn_weight=None, x_bn_bias=None,
           x_bn_mean=None, x_bn_var=None):
    if mask is not None or x_scale is not None:
        raise ValueError("this kernel reads neither a gradient mask nor an input scale")
${prepare}
${prologue_operands}
    # ---- 3. launch on the GEMM grid ----
    int64 = max(x.numel(), y.numel(), weight.numel()) >= INDEX_LIMIT
    sxn, sxc, *sx_spatial = x.stride()
    sxd = sx_spatial.pop(0) if NDIM == 3 else 0
    conv_im2win_implicit[grid](
        x, w_packed, out, *epilogue_operands, *pre_norm,
        N, H, W, DO * HO, WO, D, HO, CG, KG, R,
        sxn, sxc, sxd, *sx_spatial, *out.stride(), *residual_strides,
        **GEOMETRY, **DEPTH_ARGS,
        PAD_MODE=PAD_MODE, PRE_BN=PRE_BN, PRE_LN=PRE_LN, PRE_EPS=PRE_EPS,
        PRECISION=PRECISION, WIDEN=widen, INT64=int64,
        IMAGE_TILES=image, **META, **LAUNCH)
${finish}"""


def render(spec: ConvSpec, schedule: Schedule) -> T.KernelSource:
    return T.render_module(
        TEMPLATE,
        spec,
        schedule,
        summary="convolution as an implicit im2win GEMM",
        kernels=KERNELS,
        groups=dict(LAUNCH=LAUNCH_KEYS, TILING=TILING_KEYS),
    )
