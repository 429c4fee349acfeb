"""Schedule `im2win_band`: materialise the NHWC im2win band, then a GEMM over it.

Kernel 1 (`im2win_band_fill`) writes, for every output row ho, the KH input rows its
windows touch, zero padding included:

    band[n, g, ho, wb, ky, c] = x_pad[n, g*CG + c, ho*SH + ky*DH, wb]     wb < WB

with WB = (WO-1)*SW + (KW-1)*DW + 1 <= W + 2*PW. Only the vertical overlap of windows is
duplicated (KH copies of a row), not the horizontal one as in im2col (KH*KW copies).

Kernel 2 (`conv_im2win_band_gemm`) is a GEMM whose A operand is a plain strided matrix:
the window of output (ho, wo) is one contiguous run of KW*KH*CG band values starting at
column wo*SW (KW runs of KH*CG values when DW > 1). The main loop needs no bounds checks on
the image: the band already holds the padding.
"""

from __future__ import annotations

from ..devices import Device
from ..schedule import InvalidSchedule, Schedule, schedule_space
from ..spec import ConvSpec
from . import template as T

KERNELS = (
    "im2win_band_fill",
    "conv_im2win_band_gemm",
)  # the @triton.jit kernels launch() calls, in order
LAUNCH_KEYS = ("num_warps", "num_stages")
TILING_KEYS = ("M_TILES",)
FILL_KEYS = ("FILL_W", "FILL_C")


@schedule_space(
    "im2win_band",
    BLOCK_M=(16, 32, 64, 128),
    BLOCK_N=(16, 32, 64, 128),
    BLOCK_K=(16, 32, 64, 128),
    GROUP_M=(8,),
    M_TILES=("image", "batch"),
    FILL_W=(16, 32, 64, 128),
    FILL_C=(1, 2, 4, 8, 16, 32, 64),
    num_warps=(4, 8),
    num_stages=(2, 3, 4),
)
def SPACE(spec: ConvSpec, s: Schedule, device: Device | None) -> None:
    T.check_planar(spec)
    if spec.epilogue.scale:
        raise InvalidSchedule("only gemm_1x1 applies a layer scale")
    if spec.epilogue.ln:
        raise InvalidSchedule("a LayerNorm epilogue: gemm_1x1's and im2win_implicit's")
    if spec.pool_sums:
        raise InvalidSchedule("only direct_depthwise writes pooled sums")
    if spec.transforms_input or spec.out_windows:
        raise InvalidSchedule("only gemm_1x1 transforms its input (scale, BN, act) as it loads it"
                              " or stores window rows")
    if spec.padding_mode != "zeros":
        raise InvalidSchedule(f"the band fill pads with zeros, not {spec.padding_mode}")
    if s["FILL_W"] * s["FILL_C"] > 4096:
        raise InvalidSchedule("band fill tile larger than 4096 elements")
    T.check_gemm_tiles(spec, s, device)


def derived(spec: ConvSpec) -> dict[str, int]:
    """The band-fill tile, from the spec: all channels of a group (up to 64) by enough
    columns to make ~4096 elements per program."""
    wo = spec.hint(spec.out_size[1])
    wb = (wo - 1) * spec.stride[1] + (spec.kernel[1] - 1) * spec.dilation[1] + 1
    fill_c = min(64, 1 << max(0, spec.in_channels_per_group - 1).bit_length())
    fill_w = max(16, min(128, 1 << max(0, wb - 1).bit_length(), 4096 // fill_c))
    return {"FILL_C": fill_c, "FILL_W": fill_w}


def band_elements(spec: ConvSpec) -> int:
    """Workspace size in elements at the size hints: N * C * HO * WB * KH."""
    ho, wo = (spec.hint(s) for s in spec.out_size)
    wb = (wo - 1) * spec.stride[1] + (spec.kernel[1] - 1) * spec.dilation[1] + 1
    return spec.hint(spec.batch) * spec.in_channels * ho * wb * spec.kernel[0]


TEMPLATE = """${header}
import torch
import triton
import triton.language as tl

${constants}
${helpers}

@triton.jit
def _band_columns(wb, c, WB, W, CG, PW: tl.constexpr):
    # The fill's border: band column wb < WB holds input column wi = wb - PW, zero padding
    # outside 0 <= wi < W, for channels c < CG. Columns and channels past the end wrap and a
    # column in the padding is clamped to the image's edge (see the note over _tile_rows);
    # the masks say which lanes are real: (col_ok, c_ok) to store, inside (the image) to load.
    col_ok = wb < WB
    c_ok = c < CG
    wb = wb % WB
    c = c % CG
    wi = wb - PW
    inside = col_ok & (wi >= 0) & (wi < W)
    if PW > 0:
        wi = tl.minimum(tl.maximum(wi, 0), W - 1)
    return wb, wi, c, col_ok, c_ok, inside


@triton.jit
def _band_row(ho, ky, H, SH: tl.constexpr, PH: tl.constexpr, DH: tl.constexpr):
    # Band row (ho, ky) holds input row hi, zero padding outside 0 <= hi < H (clamped to the
    # image's edge).
    hi = ho * SH - PH + ky * DH
    ok = (hi >= 0) & (hi < H)
    if PH > 0:
        hi = tl.minimum(tl.maximum(hi, 0), H - 1)
    return hi, ok


@triton.jit
def im2win_band_fill(
    # pointers
    x_ptr, band_ptr,
    # sizes
    H, W, HO, WB, CG, G,
    # strides of x
    sxn, sxc, sxh, sxw,
    # conv geometry (baked from the spec)
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    # meta-parameters
    INT64: tl.constexpr, FILL_W: tl.constexpr, FILL_C: tl.constexpr,
):
    # ---- one program: band row (n, g, ho), FILL_W columns x FILL_C channels, all KH taps ----
    row = tl.program_id(0)
    ho = row % HO
    g = (row // HO) % G
    n = row // (HO * G)
    if INT64:
        n = n.to(tl.int64)
        row = row.to(tl.int64)
    wb, wi, c, col_ok, c_ok, inside_w = _band_columns(
        tl.program_id(1) * FILL_W + tl.arange(0, FILL_W),
        tl.program_id(2) * FILL_C + tl.arange(0, FILL_C), WB, W, CG, PW)
    src = n * sxn + (wi * sxw)[:, None] + ((g * CG + c) * sxc)[None, :]
    for ky in range(KH):
        hi, h_ok = _band_row(ho, ky, H, SH, PH, DH)
        ok = inside_w[:, None] & c_ok[None, :] & h_ok
        v = tl.load(x_ptr + src + hi * sxh, mask=ok, other=0.0)
        dst = ((row * WB + wb) * KH + ky)[:, None] * CG + c[None, :]
        tl.store(band_ptr + dst, v, mask=col_ok[:, None] & c_ok[None, :])


@triton.jit
def conv_im2win_band_gemm(
    # pointers
    band_ptr, w_ptr, y_ptr,
    # epilogue operands (None when unused): conv bias, batch norm, residual
    b_ptr, bnw_ptr, bnb_ptr, mean_ptr, var_ptr, r_ptr,
    # sizes; CG and KG are fixed by the spec (constant loop bounds, tails known)
    N, HO, WO, WB, CG: tl.constexpr, KG: tl.constexpr, G,
    # strides of the output and the residual (w_ptr: the packed filter [K, KW, KH, CG])
    syn, syk, syh, syw, srn, src, srh, srw,
    # conv geometry (baked from the spec)
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    # meta-parameters
    PRECISION: tl.constexpr, WIDEN: tl.constexpr, INT64: tl.constexpr,
    IMAGE_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---- 1. the tile: BLOCK_M output pixels x BLOCK_N output channels of group g ----
    g = tl.program_id(1)
    offs_m, m_ok, n, ho, wo, pid_n = _tile_rows(
        N, HO, WO, KG, IMAGE_TILES, INT64, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k, k_ok = _tile_cols(pid_n, g, KG, BLOCK_N)

    # ---- 2. each pixel's window: band row (n, g, ho) from column wo*SW, KH*CG per column ----
    RUN = KH * CG
    R = KW * RUN
    a_row = (((n * G + g) * HO + ho) * WB + wo * SW) * RUN
    w_col = offs_k * R
    if INT64:
        w_col = offs_k.to(tl.int64) * R
    offs_r = tl.arange(0, BLOCK_K)

    # ---- 3. reduction: acc[m, k] += band[window(m) + r] * w_packed[k, r] ----
    acc = _zeros(BLOCK_M, BLOCK_N, WIDEN)
    for r0 in range(0, KW * KH * CG, BLOCK_K):  # R, written out: see im2win_implicit
        r = r0 + offs_r
        r_ok = r < R
        if (KW * KH * CG) % BLOCK_K != 0:  # steps past R wrap (see the note over _tile_rows)
            r = r % R
        if DW == 1:
            a_col = r  # the whole window is one contiguous run
        else:
            a_col = r + (r // RUN) * (DW - 1) * RUN  # KW runs of KH*CG values
        a = tl.load(band_ptr + a_row[:, None] + a_col[None, :],
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(w_ptr + w_col[None, :] + r[:, None],
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, WIDEN, PRECISION)

${epilogue}


def launch(x, weight, bias=None, bn_weight=None, bn_bias=None, bn_mean=None, bn_var=None,
           residual=None):
${prepare}
    # ---- 3a. materialise the im2win band [N, G, HO, WB, KH, CG] ----
    WB = (WO - 1) * g["SW"] + (g["KW"] - 1) * g["DW"] + 1
    band = torch.empty(N * GROUPS * HO * WB * KH * CG, device=x.device, dtype=x.dtype)
    int64 = max(x.numel(), y.numel(), weight.numel(), band.numel()) >= INDEX_LIMIT
    fill_grid = (N * GROUPS * HO, triton.cdiv(WB, FILL["FILL_W"]),
                 triton.cdiv(CG, FILL["FILL_C"]))
    im2win_band_fill[fill_grid](
        x, band, H, W, HO, WB, CG, GROUPS, *x.stride(), **GEOMETRY, INT64=int64, **FILL)

    # ---- 3b. GEMM over the band, on the GEMM grid ----
    conv_im2win_band_gemm[grid](
        band, w_packed, out, *epilogue_operands,
        N, HO, WO, WB, CG, KG, GROUPS,
        *out.stride(), *residual_strides,
        **GEOMETRY, PRECISION=PRECISION, WIDEN=widen, INT64=int64,
        IMAGE_TILES=image, **META, **LAUNCH)
${finish}"""


def render(spec: ConvSpec, schedule: Schedule) -> T.KernelSource:
    return T.render_module(
        TEMPLATE,
        spec,
        schedule,
        summary="convolution as a GEMM over a materialised im2win band",
        kernels=KERNELS,
        groups=dict(LAUNCH=LAUNCH_KEYS, TILING=TILING_KEYS, FILL=FILL_KEYS),
    )
