"""Schedule `transposed_phase`: a transposed convolution split by stride phase.

A transposed conv scatters each input pixel through the whole kernel:

    y[n, k, ih*SH - PH + kh*DH, iw*SW - PW + kw*DW] += x[n, c, ih, iw] * w[c, k, kh, kw]

Read from the output's side, tap kh reaches output row oh from input row
ih = (oh + PH - kh*DH) / SH, only where that division is exact. Whether it is depends on the
row's phase oh % SH alone, so the output splits into SH*SW phases (grid axis 2). In phase
(rh, rw) every row and column has the same taps, and the others are skipped outright: no zero
is inserted into x and no dead tap is multiplied. Per phase and group this is a GEMM,
M = N * ceil((HO - rh)/SH) * ceil((WO - rw)/SW) output pixels, N = K/groups output channels,
reduced over (live tap, c), BLOCK_K channels at a time. The weight is read through its
strides as it is ([C, K/groups, KH, KW], any layout): no repacking.

The epilogue (bias, batch norm, activations, residual) is the forward kernels': the phase's
pixels are addressed as a [N, K, ceil(HO/SH), ceil(WO/SW)] tensor, strided by (SH, SW)
from (rh, rw).

A 3-D transposed conv (spec.depth) gives each output depth slice `do` its own programs (grid
axis 1 runs over (group, slice)): its depth taps kd are live iff (do + PD - kd*DD) / SD is
exact and inside x's depth, the same test for the whole slice, so dead taps are skipped as
the rows' and columns' are, and the slice is a 2-D phase problem of its own.

As a conv's input gradient, x may come with a mask (spec.input_mask: x = where(mask, 0, g),
the backward of the ReLU after the forward conv): the kernel loads the bool mask first and
loads g only where it is False (0 elsewhere), so the masked gradient is never written out.
"""

from __future__ import annotations

from ..devices import Device
from ..schedule import InvalidSchedule, Schedule, schedule_space
from ..spec import ConvSpec
from . import template as T

KERNELS = ("conv_transpose_phase",)  # the @triton.jit kernels launch() calls, in order
LAUNCH_KEYS = ("num_warps", "num_stages")


@schedule_space(
    "transposed_phase",
    BLOCK_M=(16, 32, 64, 128),
    BLOCK_N=(16, 32, 64, 128),
    BLOCK_K=(16, 32, 64),
    GROUP_M=(8,),
    num_warps=(4, 8),
    num_stages=(2, 3),
)
def SPACE(spec: ConvSpec, s: Schedule, device: Device | None) -> None:
    if spec.epilogue.scale:
        raise InvalidSchedule("only gemm_1x1 applies a layer scale")
    if not spec.transposed:
        raise InvalidSchedule("transposed_phase runs transposed convolutions only")
    if spec.groups * (spec.hint(spec.depth.out) if spec.depth else 1) > 65535:
        raise InvalidSchedule("groups x output depth slices exceed grid axis 1 (65535)")
    if spec.depth and s["BLOCK_M"] * s["BLOCK_N"] <= 32 * s["num_warps"]:
        # static report, triton 3.6: r3d_18's 3x3x3 grad_input with a 16 x 16 tile on 8 warps
        # (one value per thread) spilled 8 bytes on sm_90
        raise InvalidSchedule("a 3-D transposed conv's tile needs > 1 value per thread")
    if spec.in_channels_per_group < 16 and s["BLOCK_K"] > 16:
        raise InvalidSchedule("< 16 input channels per group waste BLOCK_K > 16")
    if spec.out_channels_per_group <= 16 and s["BLOCK_N"] > 16:
        raise InvalidSchedule("<= 16 output channels per group waste BLOCK_N > 16")
    T.check_gemm_tiles(spec, s, device)


TEMPLATE = """${header}
import torch
import triton
import triton.language as tl

${constants}
${helpers}

@triton.jit
def _plane_taps(acc, x_ptr, xm_ptr, w_ptr, x_img, xm_img, w_col, k_ok, jh, jw, m_ok, rh, rw,
                H, W, sxc, sxh, sxw, smc, smh, smw, swc, swh, sww, CG: tl.constexpr,
                KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                MASK_LIKE_X: tl.constexpr, WIDEN: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_K: tl.constexpr):
    # The phase's live (kh, kw) taps of one plane of x (x_img, xm_img: its offsets; w_col:
    # the weight's at that plane), BLOCK_K channels at a time.
    # (the loop bound is written out from constexprs: Triton 3.6's interpreter turns every
    # assigned name into a tensor, which range() cannot take)
    offs_r = tl.arange(0, BLOCK_K)
    c_steps = (CG + BLOCK_K - 1) // BLOCK_K
    for it in range(0, KH * KW * ((CG + BLOCK_K - 1) // BLOCK_K)):
        tap = it // c_steps
        kh = tap // KW
        kw = tap - kh * KW
        # tap (kh, kw) reaches this phase iff both divisions below are exact (the same for
        # every pixel of the phase); the quotients are exact, so C's and Python's agree
        th = rh + PH - kh * DH
        tw = rw + PW - kw * DW
        if (th % SH == 0) & (tw % SW == 0):
            c = (it - tap * c_steps) * BLOCK_K + offs_r
            a_row, row_ok = _window_tap(x_img, jh + th // SH, jw + tw // SW, m_ok, 0, 0,
                                        H, W, sxh, sxw, 1, 1, 1, 1)
            c_ok = c < CG
            if CG % BLOCK_K != 0:
                c = c % CG
            a_off = a_row[:, None] + (c * sxc)[None, :]
            live = row_ok[:, None] & c_ok[None, :]
            if xm_ptr is not None:  # x = where(mask, 0, g): a masked g is not even loaded
                m_off = a_off
                if not MASK_LIKE_X:
                    m_row, _ = _window_tap(xm_img, jh + th // SH, jw + tw // SW, m_ok, 0, 0,
                                           H, W, smh, smw, 1, 1, 1, 1)
                    m_off = m_row[:, None] + (c * smc)[None, :]
                live = live & (tl.load(xm_ptr + m_off, mask=live, other=1) == 0)
            a = tl.load(x_ptr + a_off, mask=live, other=0.0)
            b = tl.load(w_ptr + w_col[None, :] + (c * swc + kh * swh + kw * sww)[:, None],
                        mask=c_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, WIDEN, PRECISION)
    return acc


@triton.jit
def conv_transpose_phase(
    # pointers
    x_ptr, w_ptr, y_ptr,
    # epilogue operands (None when unused): conv bias, batch norm, residual; x's mask
    b_ptr, bnw_ptr, bnb_ptr, mean_ptr, var_ptr, r_ptr, xm_ptr,
    # sizes; CG and KG are fixed by the spec (constant loop bounds, tails known). A 3-D
    # conv's output (and residual) is seen as [N, K, DO*HO, WO]; D is x's depth
    N, H, W, HO, WO, D, DO, CG: tl.constexpr, KG: tl.constexpr,
    # strides (the weight is read as it is: [C, K/groups, (KD,) KH, KW]); the depth's are 0
    # for a 2-D conv
    sxn, sxc, sxd, sxh, sxw, swc, swk, swd, swh, sww, syn, syk, syh, syw, srn, src, srh, srw,
    smn, smc, smd, smh, smw,
    # conv geometry (baked from the spec); the depth axis's with DEPTH3 (else 1, 1, 0, 1)
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    DEPTH3: tl.constexpr, KD: tl.constexpr, SD: tl.constexpr, PD: tl.constexpr,
    DD: tl.constexpr,
    # meta-parameters
    PRECISION: tl.constexpr, WIDEN: tl.constexpr, INT64: tl.constexpr,
    MASK_LIKE_X: tl.constexpr,  # x's mask has x's strides: it reuses x's offsets
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---- 1. the phase: output rows rh, rh + SH, ... and columns rw, rw + SW, ... ----
    g = tl.program_id(1)
    if DEPTH3:  # (group, output depth slice): the slice's rows start at do * HO
        do = g % DO
        g = g // DO
        if INT64:
            do = do.to(tl.int64)
        y_ptr += do * HO * syh
        if r_ptr is not None:
            r_ptr += do * HO * srh
    rh = tl.program_id(2) // SW
    rw = tl.program_id(2) % SW
    JH = (HO - rh + SH - 1) // SH
    JW = (WO - rw + SW - 1) // SW
    # The grid is sized for phase (0, 0), the largest: a later phase may have fewer tiles.
    M = N * JH * JW
    if tl.program_id(0) >= ((M + BLOCK_M - 1) // BLOCK_M) * ((KG + BLOCK_N - 1) // BLOCK_N):
        return
    # The phase's pixels, as the epilogue's store addresses them: a [N, K, JH, JW] view.
    y_ptr += rh * syh + rw * syw
    syh *= SH
    syw *= SW
    if r_ptr is not None:
        r_ptr += rh * srh + rw * srw
        srh *= SH
        srw *= SW
    HO = JH
    WO = JW

    # ---- 2. the tile: BLOCK_M of the phase's pixels x BLOCK_N output channels of group g ----
    # (_tile_rows: rows past M keep in-bounds indices, the mask m_ok keeping them out)
    offs_m, m_ok, n, jh, jw, pid_n = _tile_rows(
        N, JH, JW, KG, False, INT64, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k, k_ok = _tile_cols(pid_n, g, KG, BLOCK_N)
    x_img = n * sxn + g * CG * sxc
    xm_img = n * smn + g * CG * smc
    w_col = (offs_k - g * KG) * swk + g * CG * swc

    # ---- 3. reduction over the phase's live taps: acc[m, k] += x[m, c] * w[c, k] ----
    acc = _zeros(BLOCK_M, BLOCK_N, WIDEN)
    for kd in range(0, KD):  # one plane of x per depth tap (a 2-D conv: the one plane)
        x_kd, xm_kd, w_kd, plane_live = x_img, xm_img, w_col, True
        if DEPTH3:
            # depth tap kd reaches this slice iff (do + PD - kd*DD) / SD is exact and inside
            # x's depth (the same for the whole slice): a dead one skips its plane outright
            td = do + PD - kd * DD
            plane_live = (td % SD == 0) & (td >= 0) & (td < D * SD)
            x_kd, xm_kd = x_img + (td // SD) * sxd, xm_img + (td // SD) * smd
            w_kd = w_col + kd * swd
        if plane_live:
            acc = _plane_taps(acc, x_ptr, xm_ptr, w_ptr, x_kd, xm_kd, w_kd, k_ok, jh, jw, m_ok,
                              rh, rw, H, W, sxc, sxh, sxw, smc, smh, smw, swc, swh, sww, CG,
                              KH, KW, SH, SW, PH, PW, DH, DW, MASK_LIKE_X, WIDEN, PRECISION,
                              BLOCK_K)

    IMAGE_TILES: tl.constexpr = False
${epilogue}


def launch(x, weight, bias=None, bn_weight=None, bn_bias=None, bn_mean=None, bn_var=None,
           residual=None, mask=None):
${prepare}
    # ---- 3. launch: one GEMM per (phase, group), the largest phase sizing the grid ----
    int64 = max(x.numel(), y.numel(), weight.numel()) >= INDEX_LIMIT
    conv_transpose_phase[grid](
        x, weight, out, *epilogue_operands, mask,
        N, H, W, HO, WO, D, DO, CG, KG,
        *with_depth(x.stride()), *with_depth(weight.stride()), *out.stride(),
        *residual_strides, *with_depth(mask.stride() if mask is not None else x.stride()),
        **GEOMETRY, **DEPTH_ARGS, PRECISION=PRECISION, WIDEN=widen, INT64=int64,
        MASK_LIKE_X=mask_like, **META, **LAUNCH)
${finish}"""


PREPARE = (  # the forward conv's checks and allocation (template.py) around its own shapes
    T.CHECK_OPERANDS
    + """    C_W, KG, KH, KW = (*weight.shape[:2], *weight.shape[-2:])
    KD = weight.shape[2] if NDIM == 3 else 1
    if ((KH, KW) != (GEOMETRY["KH"], GEOMETRY["KW"]) or C != C_W or C % GROUPS
            or (NDIM == 3 and KD != DEPTH["KD"])):
        raise ValueError(f"input {tuple(x.shape)} and transposed weight {tuple(weight.shape)} "
                         f"do not fit this kernel (groups={GROUPS}, kernel={KH}x{KW})")
    g = GEOMETRY
    HO = (H - 1) * g["SH"] - 2 * g["PH"] + g["DH"] * (KH - 1) + OUTPUT_PADDING[-2] + 1
    WO = (W - 1) * g["SW"] - 2 * g["PW"] + g["DW"] * (KW - 1) + OUTPUT_PADDING[-1] + 1
    if NDIM == 3:  # OUTPUT_PADDING: (depth, rows, columns)
        d = DEPTH
        DO = (D - 1) * d["SD"] - 2 * d["PD"] + d["DD"] * (KD - 1) + OUTPUT_PADDING[0] + 1
"""
    + T.WITH_DEPTH
    + """
    K, CG = KG * GROUPS, C // GROUPS
    masked = x
"""
    + T.CHECK_MASK
    + T.PER_CHANNEL_VECTORS
    + "\n"
    + T.ALLOCATE_OUTPUT
    + """    rows = N * triton.cdiv(HO, g["SH"]) * triton.cdiv(WO, g["SW"])
    grid = lambda meta: (
        triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(KG, meta["BLOCK_N"]), GROUPS * DO,
        g["SH"] * g["SW"])
    residual_strides = (0, 0, 0, 0)
    if residual is not None:
        residual = residual.unsqueeze(2) if NDIM == 1 else residual
        if NDIM == 3:  # as the output: [N, K, DO*HO, WO] (copied when that is no view)
            residual = residual.reshape(N, K, DO * HO, WO) if residual.dim() == 5 else residual
        if residual.shape != y.shape:
            raise ValueError(f"residual {tuple(residual.shape)} != output {tuple(y.shape)}")
        residual_strides = residual.stride()
    epilogue_operands = (bias, bn_weight, bn_bias, bn_mean, bn_var, residual)
"""
)


def render(spec: ConvSpec, schedule: Schedule) -> T.KernelSource:
    return T.render_module(
        TEMPLATE,
        spec,
        schedule,
        summary="transposed convolution, one GEMM per stride phase",
        kernels=KERNELS,
        groups=dict(LAUNCH=LAUNCH_KEYS),
        prepare=PREPARE,
    )
