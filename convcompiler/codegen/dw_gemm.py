"""Schedule `dw_gemm`: a depthwise conv, its batch norm and activation, and the 1x1 conv
that alone reads them, as one GEMM (the inverted residual's tail: MobileNetV2/V3,
EfficientNet, MnasNet; spec.prologue.dw):

    y = epilogue(conv1x1(act(bn(dwconv(x, wd) [+ bd])), W) [+ b])

The 1x1 conv's input, the depthwise conv's output [pixels, C], is never written. Each
program owns BLOCK_M output pixels x BLOCK_N output channels, and for each slice of BLOCK_K
channels it computes its operand tile from the taps: KH*KW loads of x at each pixel's
shifted (strided) window, times the channels' weights, plus the conv's bias, rounded to the
input's dtype as eager's conv output is; then the batch norm and the activation
(epilogue.py's prologue hook, rounded as eager's ops round them); then acc += A @ W[c, k].
Neighbouring pixels share their halo rows, re-read from L1/L2 rather than from memory. When
the output has more than BLOCK_N channels, each column tile computes the conv again (the
cost model counts the recompute and the re-reads).

Every lane's address stays inside its tensor: pixel rows and channels past the end wrap
(_tile_rows, _tile_cols, the channel tail), and a tap in the zero padding is clamped to the
image's edge before it becomes a pointer (_window_tap), masked to zero.
"""

from __future__ import annotations

from ..devices import Device
from ..schedule import InvalidSchedule, Schedule, schedule_space
from ..spec import ConvSpec
from . import template as T

KERNELS = ("conv_dw_gemm",)
LAUNCH_KEYS = ("num_warps", "num_stages")
TILING_KEYS = ("M_TILES",)


@schedule_space(
    "dw_gemm",
    BLOCK_M=(16, 32, 64, 128),
    BLOCK_N=(16, 32, 64, 128),
    BLOCK_K=(16, 32, 64),
    GROUP_M=(8,),
    M_TILES=("image", "batch"),
    num_warps=(4, 8),
    num_stages=(1,),
)
def SPACE(spec: ConvSpec, s: Schedule, device: Device | None) -> None:
    T.check_planar(spec)
    if spec.prologue.dw is None:
        raise InvalidSchedule("dw_gemm computes a depthwise prologue: this conv has none")
    if spec.epilogue.scale or spec.epilogue.ln or spec.windows:
        raise InvalidSchedule("dw_gemm's epilogue has no layer scale and no LayerNorm")
    T.check_gemm_tiles(spec, s, device)
    if device is None:
        return
    if s["BLOCK_M"] * s["BLOCK_K"] // (32 * s["num_warps"]) > 8:
        # sm_80 and sm_90 (Triton 3.8, fp16): a 128x16 tile on 4 warps (16 values a thread)
        # took 167 to 248 registers, 128x32 on 8 warps 249 to 255; 128x16 on 8 warps 128
        raise InvalidSchedule("the depthwise tile: over 8 values per thread")
    if spec.dtype == "float32" and s["BLOCK_M"] * s["BLOCK_N"] // (32 * s["num_warps"]) >= 32:
        raise InvalidSchedule("float32 GEMM tile at the full accumulator budget")


TEMPLATE = """${header}
import torch
import triton
import triton.language as tl

${constants}
DW = ${dw}  # the depthwise conv the kernel computes its input from (spec.prologue.dw)
${prologue_constants}
${helpers}

${prologue}


@triton.jit
def _dw_tile(x_img, hi0, wi0, m_ok, c, c_ok, H, W, sxc, sxh, sxw, wd_ptr, bd_ptr,
             KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
             WIDEN: tl.constexpr):
    # The depthwise conv's output [pixels, channels c], tap by tap: x at the tap's pixel of
    # each window times the channel's weight; a tap in the zero padding adds nothing.
    d = _zeros(BLOCK_M, BLOCK_K, WIDEN)
    for t in range(KH * KW):  # a loop, not unrolled: one tap's pointers live at a time
        tap, inside = _window_tap(x_img, hi0, wi0, m_ok, t // KW, t % KW, H, W, sxh, sxw, PH,
                                  PW, 1, 1)
        v = tl.load(tap[:, None] + (c * sxc)[None, :], mask=inside[:, None] & c_ok[None, :],
                    other=0.0)
        k = tl.load(wd_ptr + c * (KH * KW) + t)
        d += v.to(d.dtype) * k.to(d.dtype)[None, :]
    if HAS_BIAS:
        d += tl.load(bd_ptr + c).to(d.dtype)[None, :]
    return d


@triton.jit
def _channel_step(acc, x_ptr, x_img, hi0, wi0, m_ok, c, c_ok, H, W, sxc, sxh, sxw, wd_ptr,
                  bd_ptr, w_ptr, w_col, k_ok, pw_ptr, pb_ptr, pm_ptr, pv_ptr,
                  KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                  WIDEN: tl.constexpr, PRECISION: tl.constexpr):
    # acc[m, k] += act(bn(dwconv(x)))[m, c] * w[k, c] over one slice of channels c
    d = _dw_tile(x_img, hi0, wi0, m_ok, c, c_ok, H, W, sxc, sxh, sxw, wd_ptr, bd_ptr, KH, KW,
                 PH, PW, HAS_BIAS, BLOCK_M, BLOCK_K, WIDEN)
    if not WIDEN:
        d = d.to(x_ptr.dtype.element_ty)  # eager's conv output
    a = _prologue(d, m_ok[:, None] & c_ok[None, :], x_ptr, c, pw_ptr, pb_ptr, pm_ptr, pv_ptr,
                  0.0, 1.0, WIDEN)
    b = tl.load(w_ptr + w_col[None, :] + c[:, None], mask=c_ok[:, None] & k_ok[None, :],
                other=0.0)
    return _mma(a, b, acc, WIDEN, PRECISION)


@triton.jit
def conv_dw_gemm(
    # pointers: the depthwise conv's input, the 1x1 conv's packed weight [K, C], the output
    x_ptr, w_ptr, y_ptr,
    # epilogue operands (None when unused): conv bias, batch norm, residual; the depthwise
    # output's batch norm (weight, bias, running mean and var); the depthwise weight and bias
    b_ptr, bnw_ptr, bnb_ptr, mean_ptr, var_ptr, r_ptr, pw_ptr, pb_ptr, pm_ptr, pv_ptr,
    wd_ptr, bd_ptr,
    # sizes: x [N, C, H, W], the output [N, KG, HO, WO] (the depthwise conv's output size)
    N, H, W, HO, WO, C: tl.constexpr, KG: tl.constexpr,
    # strides
    sxn, sxc, sxh, sxw, syn, syk, syh, syw, srn, src, srh, srw,
    # the depthwise conv's geometry (baked from the spec)
    DKH: tl.constexpr, DKW: tl.constexpr, DSH: tl.constexpr, DSW: tl.constexpr,
    DPH: tl.constexpr, DPW: tl.constexpr, HAS_DW_BIAS: tl.constexpr,
    # meta-parameters
    PRECISION: tl.constexpr, WIDEN: tl.constexpr, INT64: tl.constexpr,
    IMAGE_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---- 1. the tile: BLOCK_M output pixels x BLOCK_N output channels ----
    offs_m, m_ok, n, ho, wo, pid_n = _tile_rows(
        N, HO, WO, KG, IMAGE_TILES, INT64, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k, k_ok = _tile_cols(pid_n, 0, KG, BLOCK_N)

    # ---- 2. each pixel's depthwise window starts at (ho*SH - PH, wo*SW - PW) of image n ----
    x_img = x_ptr + n * sxn
    hi0 = ho * DSH - DPH
    wi0 = wo * DSW - DPW
    w_col = offs_k * C
    if INT64:
        w_col = offs_k.to(tl.int64) * C
    offs_c = tl.arange(0, BLOCK_K)

    # ---- 3. reduction over the channels: whole slices, then the partial last one (its
    # channels past C wrap, masked) ----
    acc = _zeros(BLOCK_M, BLOCK_N, WIDEN)
    for c0 in range(0, C - C % BLOCK_K, BLOCK_K):
        acc = _channel_step(acc, x_ptr, x_img, hi0, wi0, m_ok, c0 + offs_c, offs_c < BLOCK_K, H,
                            W, sxc, sxh, sxw, wd_ptr, bd_ptr, w_ptr, w_col, k_ok, pw_ptr, pb_ptr,
                            pm_ptr, pv_ptr, DKH, DKW, DPH, DPW, HAS_DW_BIAS, BLOCK_M, BLOCK_K,
                            WIDEN, PRECISION)
    if C % BLOCK_K != 0:
        c = C - C % BLOCK_K + offs_c
        c_ok = c < C
        acc = _channel_step(acc, x_ptr, x_img, hi0, wi0, m_ok, c % C, c_ok, H, W, sxc, sxh, sxw,
                            wd_ptr, bd_ptr, w_ptr, w_col, k_ok, pw_ptr, pb_ptr, pm_ptr, pv_ptr,
                            DKH, DKW, DPH, DPW, HAS_DW_BIAS, BLOCK_M, BLOCK_K, WIDEN, PRECISION)

${epilogue}


def launch(x, weight, bias=None, bn_weight=None, bn_bias=None, bn_mean=None, bn_var=None,
           residual=None, mask=None, x_scale=None, x_bn_weight=None, x_bn_bias=None,
           x_bn_mean=None, x_bn_var=None, layer_scale=None, dw_weight=None, dw_bias=None):
${prepare}
${prologue_operands}
    # ---- 3. launch on the GEMM grid ----
    int64 = max(x.numel(), y.numel(), weight.numel()) >= INDEX_LIMIT
    conv_dw_gemm[grid](
        x, w_packed, out, *epilogue_operands, *pre_norm, dw_weight,
        dw_weight if dw_bias is None else dw_bias,
        N, H, W, HO, WO, C, K,
        *x.stride(), *out.stride(), *residual_strides,
        DKH=DW["KH"], DKW=DW["KW"], DSH=DW["SH"], DSW=DW["SW"], DPH=DW["PH"], DPW=DW["PW"],
        HAS_DW_BIAS=DW["BIAS"], PRECISION=PRECISION, WIDEN=widen, INT64=int64,
        IMAGE_TILES=image, **META, **LAUNCH)
${finish}"""

# The launcher's checks: the usual operands, then the depthwise conv's weight and bias, and
# the output size from the depthwise conv's geometry.
PREPARE = (
    T.CHECK_OPERANDS
    + """    if mask is not None or x_scale is not None or layer_scale is not None:
        raise ValueError("dw_gemm takes no gradient mask, input scale or layer scale")
    K, CG, KH, KW = weight.shape
    if (KH, KW) != (1, 1) or CG != C:
        raise ValueError(f"weight {tuple(weight.shape)} is not a 1x1 conv of the input's {C} "
                         "channels")
    if dw_weight is None or tuple(dw_weight.shape) != (C, 1, DW["KH"], DW["KW"]):
        raise ValueError(f"depthwise weight {None if dw_weight is None else tuple(dw_weight.shape)}"
                         f", expected ({C}, 1, {DW['KH']}, {DW['KW']})")
    if (dw_bias is not None) != DW["BIAS"]:
        raise ValueError(f"kernel built {'with' if DW['BIAS'] else 'without'} a depthwise bias")
    if dw_weight.dtype != DTYPE or (dw_bias is not None and dw_bias.dtype != DTYPE):
        raise TypeError(f"kernel built for {DTYPE}: the depthwise conv's are {dw_weight.dtype}")
    if dw_bias is not None and tuple(dw_bias.shape) != (C,):
        raise ValueError(f"depthwise bias {tuple(dw_bias.shape)}, expected ({C},)")
    dw_weight = dw_weight.contiguous()
    dw_bias = None if dw_bias is None else dw_bias.contiguous()
    HO = (H + 2 * DW["PH"] - DW["KH"]) // DW["SH"] + 1
    WO = (W + 2 * DW["PW"] - DW["KW"]) // DW["SW"] + 1
    KG = K
"""
    + T.PER_CHANNEL_VECTORS
    + """    M = N * HO * WO
    w_packed = weight.reshape(K, C)  # [K, C, 1, 1] in either memory format: [K, C] rows
    if not w_packed.is_contiguous():
        w_packed = w_packed.contiguous()

"""
    + T.ALLOCATE_OUTPUT
    + T.GEMM_GRID
)


def render(spec: ConvSpec, schedule: Schedule) -> T.KernelSource:
    dw = spec.prologue.dw
    constants = dict(
        KH=dw.kernel[0], KW=dw.kernel[1], SH=dw.stride[0], SW=dw.stride[1],
        PH=dw.padding[0], PW=dw.padding[1], BIAS=dw.bias,
    )
    return T.render_module(
        TEMPLATE.replace("${dw}", repr(constants)),
        spec,
        schedule,
        summary="depthwise conv, its BN and activation, and a 1x1 conv as one GEMM",
        kernels=KERNELS,
        groups=dict(LAUNCH=LAUNCH_KEYS, TILING=TILING_KEYS),
        prepare=PREPARE,
    )
