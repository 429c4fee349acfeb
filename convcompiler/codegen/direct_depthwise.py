"""Schedule `direct_depthwise`: a depthwise convolution computed directly, without a GEMM.

One input channel per group, so each output is a KH*KW dot product: too short for tensor
cores, which would waste at least 15/16 of every MMA. A tile is BLOCK_M output pixels x
BLOCK_C output channels; for each tap it loads the shifted input tile and one weight per
channel, and accumulates in fp32 on the CUDA cores. Output channel k reads input channel
k // KG (KG output channels per input channel: the depth multiplier).

With `spec.pool_sums` (image tiles only) each program also stores its tile's share of each
channel's mean over the image, sum(y over its pixels) / (HO*WO), into `pool` [N, K, .., T]
(T tiles per image; runtime/ops.py's pool_shape). A global average pool of y
(squeeze-and-excitation's) is then the sum of those T values, and never reads y again.
"""

from __future__ import annotations

from ..devices import Device
from ..schedule import InvalidSchedule, Schedule, schedule_space
from ..spec import ConvSpec
from . import template as T

KERNELS = ("conv_depthwise_direct",)  # the @triton.jit kernels launch() calls, in order
LAUNCH_KEYS = ("num_warps", "num_stages")
TILING_KEYS = ("M_TILES",)


@schedule_space(
    "direct_depthwise",
    BLOCK_M=(16, 32, 64, 128),
    BLOCK_C=(8, 16, 32, 64, 128),
    GROUP_M=(8,),
    M_TILES=("image", "batch"),
    num_warps=(2, 4, 8),
    num_stages=(1, 2),
)
def SPACE(spec: ConvSpec, s: Schedule, device: Device | None) -> None:
    T.check_planar(spec)
    if spec.epilogue.scale:
        raise InvalidSchedule("only gemm_1x1 applies a layer scale")
    if spec.pool_sums and s["M_TILES"] != "image":
        raise InvalidSchedule("pooled sums need image tiles (a tile's pixels in one image)")
    if spec.transforms_input:
        raise InvalidSchedule("only gemm_1x1 transforms its input (scale, BN, act) as it loads it")
    if spec.in_channels_per_group != 1:
        raise InvalidSchedule("direct_depthwise needs one input channel per group")
    T.check_row_tiling(spec, s)
    if device is None:
        return
    # Each accumulator comes with a gathered input element and its address per tap: beyond
    # 16 per thread the static report showed spills on sm_80/sm_90 (NCHW, 3x3 and 7x7).
    per_thread = s["BLOCK_M"] * s["BLOCK_C"] // (32 * s["num_warps"])
    if per_thread > 16:
        raise InvalidSchedule(f"{per_thread} accumulators per thread (> 16)")


TEMPLATE = """${header}
import torch
import triton
import triton.language as tl

${constants}
POOL = ${pool}  # the kernel also writes the pooled sums (see the module docstring)
${helpers}

@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def conv_depthwise_direct(
    # pointers
    x_ptr, w_ptr, y_ptr,
    # epilogue operands (None when unused): conv bias, batch norm, residual; the pooled sums
    b_ptr, bnw_ptr, bnb_ptr, mean_ptr, var_ptr, r_ptr, p_ptr,
    # sizes; K is fixed by the spec (its tail is known)
    N, H, W, HO, WO, K: tl.constexpr, KG,
    # strides (the weight is read as it is: no repacking)
    sxn, sxc, sxh, sxw, swk, swh, sww, syn, syk, syh, syw, srn, src, srh, srw, spn, spk, spt,
    # conv geometry (baked from the spec)
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    PAD_MODE: tl.constexpr,  # the padding: 0 zeros, 1 reflect, 2 replicate, 3 circular
    POOL_SUMS: tl.constexpr,
    # meta-parameters
    WIDEN: tl.constexpr, INT64: tl.constexpr, IMAGE_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---- 1. the tile: BLOCK_M output pixels x BLOCK_C output channels ----
    offs_m, m_ok, n, ho, wo, pid_c = _tile_rows(
        N, HO, WO, K, IMAGE_TILES, INT64, BLOCK_M, BLOCK_C, GROUP_M)
    offs_k, k_ok = _tile_cols(pid_c, 0, K, BLOCK_C)
    x_col = (offs_k // KG) * sxc  # the one input channel of each output channel
    w_col = offs_k * swk

    # ---- 2. each pixel's window origin ----
    hi0 = ho * SH - PH
    wi0 = wo * SW - PW
    x_img = n * sxn

    # ---- 3. taps: acc[m, k] += x[n, k // KG, hi, wi] * w[k, 0, ky, kx], fp32 on CUDA cores ----
    acc = _zeros(BLOCK_M, BLOCK_C, WIDEN)
    for tap in range(0, KW * KH):
        kx = tap // KH
        ky = tap - kx * KH
        x_row, row_ok = _window_tap(x_img, hi0, wi0, m_ok, ky, kx, H, W, sxh, sxw,
                                    PH, PW, DH, DW, PAD_MODE)
        a = tl.load(x_ptr + x_row[:, None] + x_col[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + w_col + ky * swh + kx * sww, mask=k_ok, other=0.0)
        acc += a.to(acc.dtype) * b.to(acc.dtype)[None, :]

${epilogue}

    if POOL_SUMS:
        # ---- 6. this tile's share of each channel's mean over the image: the stored
        # values (the interpreter's fp64 ones), rows past the image left out ----
        pid_p, _ = _tile_ids(tl.program_id(0), HO * WO, K, BLOCK_M, BLOCK_C, GROUP_M)
        if WIDEN:
            v = acc
        else:
            v = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        v = tl.where(m_ok[:, None], v, 0.0)
        part = tl.reduce(v, 0, _add) / (HO * WO)
        tl.store(p_ptr + n * spn + offs_k * spk + pid_p * spt, part.to(tl.float32), mask=k_ok)


def launch(x, weight, bias=None, bn_weight=None, bn_bias=None, bn_mean=None, bn_var=None,
           residual=None, pool=None):
    if (pool is not None) != POOL:
        raise ValueError(f"kernel built {'with' if POOL else 'without'} pooled sums")
${prepare}
    # ---- 3. launch: (pixel tiles x channel tiles, 1, images when tiles stay in one) ----
    int64 = max(x.numel(), y.numel(), weight.numel()) >= INDEX_LIMIT
    direct_grid = lambda meta: (
        triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_C"]), 1,
        N if image else 1)
    pool_strides = (0, 0, 0)
    if pool is not None:
        tiles = triton.cdiv(HO * WO, META["BLOCK_M"])
        if (pool.dtype != torch.float32 or pool.shape[:2] != (N, K) or pool.shape[-1] != tiles
                or pool.numel() != N * K * tiles or not image):
            raise ValueError(f"pooled sums {pool.dtype} {tuple(pool.shape)} do not fit "
                             f"({N}, {K}, ..., {tiles}) float32 on image tiles")
        pool_strides = (pool.stride(0), pool.stride(1), pool.stride(-1))
    conv_depthwise_direct[direct_grid](
        x, weight, out, *epilogue_operands, pool,
        N, H, W, HO, WO, K, KG,
        *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
        *out.stride(), *residual_strides, *pool_strides,
        **GEOMETRY, PAD_MODE=PAD_MODE, POOL_SUMS=POOL, WIDEN=widen, INT64=int64, IMAGE_TILES=image,
        **META, **LAUNCH)
${finish}"""


def render(spec: ConvSpec, schedule: Schedule) -> T.KernelSource:
    return T.render_module(
        TEMPLATE.replace("${pool}", str(spec.pool_sums)),
        spec,
        schedule,
        summary="depthwise convolution, computed directly",
        kernels=KERNELS,
        groups=dict(LAUNCH=LAUNCH_KEYS, TILING=TILING_KEYS),
    )
