"""Schedule `gemm_1x1`: a 1x1 convolution (padding 0, any stride) as a plain GEMM.

Per group g: Y[m, k] = sum_c X[m, c] * W[k, c] with m the output pixels. With
`spec.input_scale` the input arrives as x * s, s [N, C, 1, 1] (squeeze-and-excitation's
per-image channel scale before a project conv): each x tile is multiplied by s as it is
loaded, so the scaled copy is never written. With `spec.prologue` it arrives as
act(batch_norm(x)) (pre-activation: DenseNet's BN -> ReLU -> conv 1x1), applied to each x
tile as it is loaded (epilogue.py's prologue hook), so the normalised copy is never
written. With `spec.windows` (Swin's qkv) x is an image and the rows are its window
tokens, rolled (_window_row), so neither the partition nor the roll is ever copied; with
`spec.out_windows` (Swin's proj) the output rows are stored at their pixels of the
residual's image, and the residual added there (the window reverse, roll and add). There
are no
taps and no padding, so a pixel's address needs no bounds checks; when the input is
contiguous NCHW, the stride is 1 and tiles stay inside one image, pixel p of image n is
simply x[n, c] + p, and Triton can see that the A tile is contiguous along the pixels.
"""

from __future__ import annotations

from ..devices import Device
from ..schedule import InvalidSchedule, Schedule, schedule_space
from ..spec import ConvSpec
from . import template as T

KERNELS = ("conv_gemm_1x1",)  # the @triton.jit kernels launch() calls, in order
LAUNCH_KEYS = ("num_warps", "num_stages")
TILING_KEYS = ("M_TILES",)


@schedule_space(
    "gemm_1x1",
    BLOCK_M=(16, 32, 64, 128),
    BLOCK_N=(16, 32, 64, 128),
    BLOCK_K=(16, 32, 64, 128),
    GROUP_M=(8,),
    M_TILES=("image", "batch"),
    num_warps=(4, 8),
    num_stages=(2, 3, 4),
)
def SPACE(spec: ConvSpec, s: Schedule, device: Device | None) -> None:
    T.check_planar(spec)
    T.check_ln_epilogue(spec, s)
    if spec.prologue.dw:
        raise InvalidSchedule("a depthwise prologue is dw_gemm's")
    if spec.pool_sums:
        raise InvalidSchedule("only direct_depthwise writes pooled sums")
    if spec.kernel != (1, 1):
        raise InvalidSchedule(f"gemm_1x1 needs a 1x1 kernel, not {spec.kernel[0]}x{spec.kernel[1]}")
    if spec.padding != (0, 0):
        raise InvalidSchedule("gemm_1x1 needs padding 0")
    if device is not None and spec.dtype == "float32":
        # a full budget (32 fp32 accumulators per thread) spilled 8 bytes on Triton 3.6
        # (sm_90: ResNet-50's 1x1 convs to 2048 channels, 32x128 tiles on 4 warps)
        if s["BLOCK_M"] * s["BLOCK_N"] // (32 * s["num_warps"]) >= 32:
            raise InvalidSchedule("float32 GEMM tile at the full accumulator budget")
    T.check_gemm_tiles(spec, s, device)


TEMPLATE = """${header}
import torch
import triton
import triton.language as tl

${constants}
INPUT_SCALE = ${input_scale}  # the input arrives as x * s[n, c] (see the module docstring)
LAYER_SCALE = ${layer_scale}  # a [K] layer scale multiplies the output before the residual
${prologue_constants}
${helpers}

${prologue}

${wrapped_block}


${row_stats}


@triton.jit
def _channel_step(acc, x_base, x_row, w_ptr, w_col, c, a_mask, b_mask, sxc, s_rows, ssc,
                  pw_ptr, pb_ptr, pm_ptr, pv_ptr, row_mean, row_rstd, PRE: tl.constexpr,
                  X_SCALE: tl.constexpr, WIDEN: tl.constexpr, PRECISION: tl.constexpr):
    # acc[m, k] += x[m, c] * w[k, c] over one slice of BLOCK_K input channels c; with
    # X_SCALE, x[m, c] * s[n(m), c] first (s_rows: each row's image's scales), rounded to the
    # operands' type as eager's mul rounds it
    a = tl.load(x_base + x_row[:, None] + (c * sxc)[None, :], mask=a_mask, other=0.0)
    if X_SCALE:
        s = tl.load(s_rows + (c * ssc)[None, :], mask=a_mask, other=0.0)
        if WIDEN:
            a = a.to(tl.float64) * s.to(tl.float64)
        else:
            a = (a.to(tl.float32) * s.to(tl.float32)).to(s.dtype)
    if PRE:
        a = _prologue(a, a_mask, x_base, c, pw_ptr, pb_ptr, pm_ptr, pv_ptr, row_mean, row_rstd,
                      WIDEN)
    b = tl.load(w_ptr + w_col[None, :] + c[:, None], mask=b_mask, other=0.0)
    return _mma(a, b, acc, WIDEN, PRECISION)


@triton.jit
def conv_gemm_1x1(
    # pointers
    x_ptr, w_ptr, y_ptr,
    # epilogue operands (None when unused): conv bias, batch norm, residual; the input scale;
    # the input's batch norm (the prologue); the layer scale
    b_ptr, bnw_ptr, bnb_ptr, mean_ptr, var_ptr, r_ptr, s_ptr, pw_ptr, pb_ptr, pm_ptr, pv_ptr,
    ls_ptr,
    # sizes; CG and KG are fixed by the spec (constant loop bounds, tails known)
    N, H, W, HO, WO, CG: tl.constexpr, KG: tl.constexpr,
    # strides (w_ptr is the packed filter: [K, CG] contiguous)
    sxn, sxc, sxh, sxw, syn, syk, syh, syw, srn, src, srh, srw, ssn, ssc,
    # conv geometry (baked from the spec)
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    # window rows (spec.windows: the input's; spec.out_windows: the output's, stored in a
    # YH x YW image): window size and shift, 0 when unused
    WIN_H: tl.constexpr, WIN_W: tl.constexpr, SHIFT_H: tl.constexpr, SHIFT_W: tl.constexpr,
    YH, YW, OWIN_H: tl.constexpr, OWIN_W: tl.constexpr, OSHIFT_H: tl.constexpr,
    OSHIFT_W: tl.constexpr,
    # meta-parameters
    PIXELS_FLAT: tl.constexpr, X_SCALE: tl.constexpr, PRE_BN: tl.constexpr,
    PRE_LN: tl.constexpr, PRE_EPS: tl.constexpr, PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
    INT64: tl.constexpr, IMAGE_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---- 1. the tile: BLOCK_M output pixels x BLOCK_N output channels of group g ----
    g = tl.program_id(1)
    offs_m, m_ok, n, ho, wo, pid_n = _tile_rows(
        N, HO, WO, KG, IMAGE_TILES, INT64, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k, k_ok = _tile_cols(pid_n, g, KG, BLOCK_N)

    # ---- 2. each output pixel reads one input pixel: (ho*SH, wo*SW) ----
    if WIN_H > 0:  # window tokens (spec.windows): x is the image, H x W its size
        x_row = _window_row(n, wo, H, W, sxn, sxh, sxw, WIN_H, WIN_W, SHIFT_H, SHIFT_W)
    elif PIXELS_FLAT:
        x_row = n * sxn + offs_m  # contiguous NCHW, stride 1, one image per tile
    else:
        x_row = n * sxn + (ho * SH) * sxh + (wo * SW) * sxw
    x_base = x_ptr + g * CG * sxc
    w_col = offs_k * CG
    if INT64:
        w_col = offs_k.to(tl.int64) * CG
    offs_c = tl.arange(0, BLOCK_K)
    s_rows = x_base  # each row's image's input scales (read only with X_SCALE)
    if X_SCALE:
        if IMAGE_TILES:
            s_rows = s_ptr + n * ssn + g * CG * ssc
        else:
            s_rows = s_ptr + (n * ssn)[:, None] + g * CG * ssc
    if PRE_BN or PRE_LN:  # the prologue's per-channel parameters, from the group's first
        pw_ptr, pb_ptr = pw_ptr + g * CG, pb_ptr + g * CG
        pm_ptr, pv_ptr = pm_ptr + g * CG, pv_ptr + g * CG
    row_mean = 0.0
    row_rstd = 1.0
    if PRE_LN:  # the LayerNorm's statistics of each row (pixel) over its channels
        row_mean, row_rstd = _row_stats(x_base + x_row[:, None], sxc, m_ok, PRE_EPS, CG,
                                        BLOCK_M, BLOCK_K, WIDEN)

    # ---- 3. reduction over the input channels: acc[m, k] += x[m, c] * w[k, c] ----
    # Whole slices of BLOCK_K channels, then the partial last one on its own: its channels
    # past CG wrap (masked; see the note over _tile_rows), and the loop's addresses stay
    # affine in c0 (wrapping inside the loop cost up to 60 registers on sm_90).
    acc = _zeros(BLOCK_M, BLOCK_N, WIDEN)
    for c0 in range(0, CG - CG % BLOCK_K, BLOCK_K):
        acc = _channel_step(acc, x_base, x_row, w_ptr, w_col, c0 + offs_c, m_ok[:, None],
                            k_ok[None, :], sxc, s_rows, ssc, pw_ptr, pb_ptr, pm_ptr, pv_ptr,
                            row_mean, row_rstd, PRE_BN or PRE_LN, X_SCALE, WIDEN, PRECISION)
    if CG % BLOCK_K != 0:
        c = CG - CG % BLOCK_K + offs_c
        c_ok = c < CG
        acc = _channel_step(acc, x_base, x_row, w_ptr, w_col, c % CG,
                            m_ok[:, None] & c_ok[None, :], c_ok[:, None] & k_ok[None, :], sxc,
                            s_rows, ssc, pw_ptr, pb_ptr, pm_ptr, pv_ptr, row_mean, row_rstd,
                            PRE_BN or PRE_LN, X_SCALE, WIDEN, PRECISION)

${epilogue}


def launch(x, weight, bias=None, bn_weight=None, bn_bias=None, bn_mean=None, bn_var=None,
           residual=None, mask=None, x_scale=None, x_bn_weight=None, x_bn_bias=None,
           x_bn_mean=None, x_bn_var=None, layer_scale=None):
    if mask is not None:
        raise ValueError("a forward conv has no gradient mask")
    if (layer_scale is not None) != LAYER_SCALE:
        raise ValueError(f"kernel built {'with' if LAYER_SCALE else 'without'} a layer scale")
    if layer_scale is not None:  # [K] (or [K, 1, 1]: any view of K values)
        if layer_scale.numel() != weight.shape[0] or layer_scale.dtype != x.dtype:
            raise ValueError(f"layer scale {layer_scale.dtype} {tuple(layer_scale.shape)} does "
                             f"not fit {weight.shape[0]} output channels of {x.dtype}")
        layer_scale = layer_scale.reshape(-1).contiguous()
    if (x_scale is not None) != INPUT_SCALE:
        raise ValueError(f"kernel built {'with' if INPUT_SCALE else 'without'} an input scale")
${prepare}
${prologue_operands}
    # The input scale s [N, C, 1, 1] (or [N, C, 1]), any strides, read as s[n, c]
    s_strides = (0, 0)
    if x_scale is not None:
        if x_scale.dtype != x.dtype or tuple(x_scale.shape[:2]) != (N, C) or x_scale.numel() != N * C:
            raise ValueError(f"input scale {x_scale.dtype} {tuple(x_scale.shape)} does not fit "
                             f"the input {x.dtype} {tuple(x.shape)}")
        s_strides = x_scale.stride()[:2]
    # ---- 3. launch on the GEMM grid ----
    int64 = max(x.numel(), y.numel(), weight.numel()) >= INDEX_LIMIT
    flat = (image and g["SH"] == 1 and g["SW"] == 1 and x.stride(3) == 1
            and x.stride(2) == W and not WINDOWS)
    win, out_win = WINDOWS or (0, 0, 0, 0), OUT_WINDOWS or (0, 0, 0, 0)
    conv_gemm_1x1[grid](
        x, w_packed, out, *epilogue_operands, x_scale, *pre_norm, layer_scale,
        N, H, W, HO, WO, CG, KG,
        *x.stride(), *out.stride(), *residual_strides, *s_strides,
        **GEOMETRY, WIN_H=win[0], WIN_W=win[1], SHIFT_H=win[2], SHIFT_W=win[3], YH=YH, YW=YW,
        OWIN_H=out_win[0], OWIN_W=out_win[1], OSHIFT_H=out_win[2], OSHIFT_W=out_win[3],
        PIXELS_FLAT=flat, X_SCALE=INPUT_SCALE, PRE_BN=PRE_BN, PRE_LN=PRE_LN,
        PRE_EPS=PRE_EPS, PRECISION=PRECISION,
        WIDEN=widen,
        INT64=int64,
        IMAGE_TILES=image, **META, **LAUNCH)
${finish}"""


def render(spec: ConvSpec, schedule: Schedule) -> T.KernelSource:
    template = TEMPLATE.replace("${input_scale}", str(spec.input_scale))
    template = template.replace("${layer_scale}", str(spec.epilogue.scale))
    return T.render_module(
        template,
        spec,
        schedule,
        summary="1x1 convolution as a plain GEMM",
        kernels=KERNELS,
        groups=dict(LAUNCH=LAUNCH_KEYS, TILING=TILING_KEYS),
    )
