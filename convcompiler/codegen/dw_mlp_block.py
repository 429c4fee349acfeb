"""Schedule `dw_mlp_block`: ConvNeXt's whole block in one kernel, neither the depthwise conv's
output nor the MLP's hidden ever in memory.

    y = [x +] [gamma *] mlp(n(permute(dwconv(x), [0, 2, 3, 1])))      (spec_block.MlpSpec
                                                                      with a dw_kernel)

One program owns BLOCK_M pixels of the [N, H, W] grid and every channel (BLOCK_C, the next
power of two of C, and BLOCK_N of CO = C). It first computes the depthwise conv of its pixels
over all channels in registers, tap by tap (each tap one masked load of x at the shifted
pixels: the halo rows are re-read from L1/L2, not from memory), adds the conv's bias and
rounds it as eager rounds the conv's output. Then the LayerNorm over the channels, from that
register tile (mean, then centred squares, in fp32), rounded as eager rounds the norm. That
[BLOCK_M, BLOCK_C] tile is the first GEMM's whole operand: the program walks the hidden
features BLOCK_H at a time, h = act(a @ W1[j]^T + b1[j]), acc += h @ W2[:, j]^T, as
mlp_block does, and stores acc once (bias, layer scale and the residual, x at the same pixel,
in the epilogue).

Because every program covers all channels, the conv and the norm run once per pixel; the
cost is registers: the schedule space keeps the operand tile, the accumulator and the
hidden chunk within the per-thread budget, so only narrow blocks (ConvNeXt's first stages)
qualify, and the cost model weighs this kernel against the conv and the MLP block run apart.

Pixels past the grid wrap back inside it (`% M`), channels past C wrap to channel 0, and a
tap outside the image is clamped to its edge before it becomes an address (masked to zero):
every lane's address stays inside its tensor.
"""

from __future__ import annotations

from ..devices import Device
from ..schedule import InvalidSchedule, Schedule, schedule_space
from ..spec_block import MlpSpec
from . import template as T
from .mlp_block import template_fields

KERNELS = ("dw_mlp_block",)


def _pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


@schedule_space(
    "dw_mlp_block",
    BLOCK_M=(16, 32, 64, 128),
    BLOCK_H=(16, 32, 64),
    num_warps=(4, 8),
    num_stages=(1, 2, 3),
)
def SPACE(spec: MlpSpec, s: Schedule, device: Device | None) -> None:
    if not spec.depthwise:
        raise InvalidSchedule("no depthwise conv: the block is mlp_block's")
    bm, bh = s["BLOCK_M"], s["BLOCK_H"]
    if bh >= 2 * max(16, spec.hidden):
        raise InvalidSchedule("a hidden chunk twice as wide as the hidden")
    bc, e = _pow2(spec.in_features), T.ITEMSIZE[spec.dtype]
    if bc > 128:  # sm_90 spilled 1.3 KB at C = 192 with 64 x 8 warps, 150 B with 32 x 8
        raise InvalidSchedule(f"every channel in registers: C = {spec.in_features} > 128")
    if device is None:
        return
    if spec.dtype == "float32" and (spec.precision == "ieee" or bc > 64):
        # Triton 3.6 (the GPU's stack) compiled float32 C = 96 to 180-255 registers on sm_90
        # at 16 x 128 over 8 warps, with TF32 or without, some shapes spilling 32 B
        raise InvalidSchedule("float32: TF32 tensor cores and C <= 64 only")
    # Per thread, live across the hidden loop: the accumulator [BLOCK_M, BLOCK_N], the
    # hidden chunk and the normalised operand tile [BLOCK_M, BLOCK_C] (two 16-bit values a
    # register); mlp_block's budgets (96 values, 40 in float32). On sm_80 the operand tile is
    # held once per warp of its rows' mma fragments: from the static report (fp16, C = 96),
    # 32 x 128 over 8 warps compiled without spills, 64 x 128 over 8 warps spilled 152 B.
    threads = 32 * s["num_warps"]
    live = (bm * bc + bm * bh + bm * bc * e // 4) // threads
    if live > (40 if spec.dtype == "float32" else 96):
        raise InvalidSchedule(f"accumulator, hidden chunk and operand tile: {live} per thread")
    if device.capability < (9, 0) and bm * bc // threads > 16:
        raise InvalidSchedule(f"sm_80: the operand tile {bm}x{bc}, over 16 values per thread")
    if max(bc * bh, bh * bc) // threads > 64:
        raise InvalidSchedule("a weight tile over 64 values per thread")
    smem = s["num_stages"] * 2 * bc * bh * e + bm * (bc + bh) * e
    if smem > device.smem_per_block:
        raise InvalidSchedule(f"{smem} B of tiles > {device.smem_per_block} B shared memory")


TEMPLATE = '''${header}
import torch
import triton
import triton.language as tl

C = ${c}
HID = ${hid}
CO = ${co}
KH, KW = ${kernel}  # the depthwise conv's kernel and zero padding (stride 1)
PH, PW = ${padding}
H, W = ${image}  # the image's spatial size
DTYPE = torch.${dtype}
HAS_DW_BIAS = ${dw_bias}
HAS_B1 = ${has_b1}
HAS_B2 = ${has_b2}
HAS_SCALE = ${has_scale}
RESIDUAL = ${residual}  # x itself, at the same pixel
NORM = ${norm}  # the LayerNorm: None, "plain" or "affine"
NORM_EPS = ${norm_eps}
PRECISION = ${precision}
BLOCK_C = ${block_c}  # every channel in one tile
BLOCK_N = ${block_n}
INDEX_LIMIT = 2**31  # tensors this large get 64-bit offsets
META = ${meta}
LAUNCH = ${launch}
${helpers}

${wrapped_block}

# Row sums reduce with Triton's own combine function (see template.ROW_STATS)
_add = tl.standard._sum_combine


@triton.jit
def _activation(hid):
    return ${act}


@triton.jit
def dw_mlp_block(
    # pointers: the image, the conv's weight [C, 1, KH, KW] and bias, the MLP's weights, the
    # output; the optional vectors
    x_ptr, wd_ptr, bd_ptr, w1_ptr, w2_ptr, y_ptr, b1_ptr, b2_ptr, s_ptr, nw_ptr, nb_ptr,
    # sizes: N images (may vary) of H x W pixels
    N, H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, HID: tl.constexpr,
    CO: tl.constexpr,
    # x and the output [N, C, H, W] through their strides
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_DW_BIAS: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    HAS_SCALE: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr,
    NORM_AFFINE: tl.constexpr, NORM_EPS: tl.constexpr, PRECISION: tl.constexpr,
    WIDEN: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # ---- 1. the tile: BLOCK_M pixels, every channel ----
    M = N * (H * W)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_m = offs_m % M
    if INT64:
        offs_m = offs_m.to(tl.int64)
    n_idx = offs_m // (H * W)
    h_idx = (offs_m // W) % H
    w_idx = offs_m % W
    offs_c, c_ok = _block(0, C, BLOCK_C)
    x_pix = x_ptr + (n_idx * sxn)[:, None] + (offs_c * sxc)[None, :]

    # ---- 2. the depthwise conv, tap by tap; rounded as eager rounds the conv's output ----
    d = _zeros(BLOCK_M, BLOCK_C, WIDEN)
    for i in tl.static_range(KH):
        hh = h_idx + (i - PH)
        h_in = (hh >= 0) & (hh < H)
        hh = tl.where(h_in, hh, 0)  # a halo row clamped to the image before the address
        for j in tl.static_range(KW):
            ww = w_idx + (j - PW)
            w_in = (ww >= 0) & (ww < W)
            ww = tl.where(w_in, ww, 0)
            ok = m_ok & h_in & w_in
            v = tl.load(x_pix + (hh * sxh + ww * sxw)[:, None], mask=ok[:, None] & c_ok[None, :],
                        other=0.0)
            k = tl.load(wd_ptr + offs_c * (KH * KW) + (i * KW + j), mask=c_ok, other=0.0)
            d += v.to(d.dtype) * k.to(d.dtype)[None, :]
    if HAS_DW_BIAS:
        d += tl.load(bd_ptr + offs_c, mask=c_ok, other=0.0).to(d.dtype)[None, :]
    if not WIDEN:
        d = d.to(x_ptr.dtype.element_ty).to(tl.float32)

    # ---- 3. the LayerNorm over the channels, from registers ----
    d = tl.where(c_ok[None, :], d, 0.0)
    a = d
    if NORM:
        mean = tl.reduce(d, 1, _add, keep_dims=True) / C
        centred = tl.where(c_ok[None, :], d - mean, 0.0)
        var = tl.reduce(centred * centred, 1, _add, keep_dims=True) / C
        a = centred * (1.0 / tl.sqrt(var + NORM_EPS))
        if NORM_AFFINE:
            a = a * tl.load(nw_ptr + offs_c, mask=c_ok, other=0.0).to(a.dtype)[None, :]
            a = a + tl.load(nb_ptr + offs_c, mask=c_ok, other=0.0).to(a.dtype)[None, :]
        a = tl.where(c_ok[None, :], a, 0.0)
    if not WIDEN:
        a = a.to(x_ptr.dtype.element_ty)

    # ---- 4. the hidden features, BLOCK_H at a time: acc += act(a @ W1[j]^T + b1[j]) @ W2[:, j]^T
    offs_n, n_ok = _block(0, CO, BLOCK_N)
    acc = _zeros(BLOCK_M, BLOCK_N, WIDEN)
    for h0 in range(0, HID, BLOCK_H):
        offs_h, h_ok = _block(h0, HID, BLOCK_H)
        b = tl.load(w1_ptr + offs_h[None, :] * C + offs_c[:, None],
                    mask=c_ok[:, None] & h_ok[None, :], other=0.0)
        hid = _mma(a, b, _zeros(BLOCK_M, BLOCK_H, WIDEN), WIDEN, PRECISION)
        if HAS_B1:
            hid += tl.load(b1_ptr + offs_h, mask=h_ok, other=0.0).to(hid.dtype)[None, :]
        hid = tl.where(h_ok[None, :], _activation(hid), 0.0)
        w2 = tl.load(w2_ptr + offs_n[None, :] * HID + offs_h[:, None],
                     mask=h_ok[:, None] & n_ok[None, :], other=0.0)
        if not WIDEN:
            hid = hid.to(w2.dtype)
        acc = _mma(hid, w2, acc, WIDEN, PRECISION)

    # ---- 5. epilogue: bias, layer scale, residual (x at the pixel); one store ----
    if HAS_B2:
        acc += tl.load(b2_ptr + offs_n, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    if HAS_SCALE:
        acc *= tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    pix = n_idx * sxn + h_idx * sxh + w_idx * sxw
    if RESIDUAL:
        r = tl.load(x_ptr + pix[:, None] + (offs_n * sxc)[None, :], mask=out_ok, other=0.0)
        acc += r.to(acc.dtype)
    y_off = (n_idx * syn + h_idx * syh + w_idx * syw)[:, None] + (offs_n * syc)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


${vector_helper}

def launch(x, w1, b1=None, w2=None, b2=None, scale=None, residual=None, norm_weight=None,
           norm_bias=None, w3=None, b3=None, dw_weight=None, dw_bias=None):
    # ---- 1. check constraints ----
    if x.dim() != 4 or tuple(x.shape[1:]) != (C, H, W) or w2 is None or dw_weight is None:
        raise ValueError(f"expected an [N, {C}, {H}, {W}] image, both weights and the conv's, "
                         f"got x {tuple(x.shape)}")
    if tuple(w1.shape) != (HID, C) or tuple(w2.shape) != (CO, HID):
        raise ValueError(f"weights {tuple(w1.shape)} and {tuple(w2.shape)} do not fit this "
                         f"kernel ({HID}, {C}) and ({CO}, {HID})")
    if tuple(dw_weight.shape) != (C, 1, KH, KW):
        raise ValueError(f"depthwise weight {tuple(dw_weight.shape)}, expected "
                         f"({C}, 1, {KH}, {KW})")
    if any(t.dtype != DTYPE for t in (x, w1, w2, dw_weight)):
        raise TypeError(f"kernel built for {DTYPE}, got {x.dtype}, {w1.dtype}, {w2.dtype}, "
                        f"{dw_weight.dtype}")
    if residual is not None:
        raise ValueError("this kernel adds x itself as the residual (RESIDUAL): pass None")
    for name, given, built in (("a conv bias", dw_bias, HAS_DW_BIAS),
                               ("a first bias", b1, HAS_B1), ("a second bias", b2, HAS_B2),
                               ("a layer scale", scale, HAS_SCALE),
                               ("a norm weight", norm_weight, NORM == "affine"),
                               ("a norm bias", norm_bias, NORM == "affine"),
                               ("an up projection", w3, False)):
        if (given is not None) != built:
            raise ValueError(f"kernel built {'with' if built else 'without'} {name}")
    dw_bias, b1, b2 = _vector(dw_bias, C, "dw bias"), _vector(b1, HID, "b1"), _vector(b2, CO, "b2")
    scale = scale.reshape(-1) if scale is not None and scale.numel() == CO else scale  # [CO, 1, 1]
    scale = _vector(scale, CO, "scale")
    norm_weight = _vector(norm_weight, C, "norm weight")
    norm_bias = _vector(norm_bias, C, "norm bias")
    w1, w2, dw_weight = (w.contiguous() for w in (w1, w2, dw_weight))

    # ---- 2. allocate the output: [N, H, W, CO] contiguous, returned as [N, CO, H, W] ----
    y = torch.empty((x.shape[0], H, W, CO), device=x.device, dtype=x.dtype)
    result = y.permute(0, 3, 1, 2)
    if y.numel() == 0:
        return result
    # Under Triton's interpreter (CPU) the kernel works in fp64, and a bf16 result is stored
    # in fp32 for torch to round (the interpreter truncates fp32 -> bf16).
    widen = x.device.type == "cpu"
    out = y
    if widen and x.dtype == torch.bfloat16:
        out = torch.empty_like(y, dtype=torch.float32)
    int64 = max(x.numel(), y.numel()) >= INDEX_LIMIT
    N = x.shape[0]

    # ---- 3. launch: one program per BLOCK_M pixels ----
    grid = lambda meta: (triton.cdiv(N * H * W, meta["BLOCK_M"]),)
    dw_mlp_block[grid](
        x, dw_weight, dw_bias, w1, w2, out, b1, b2, scale, norm_weight, norm_bias,
        N, H, W, C, HID, CO, *x.stride(), H * W * CO, 1, W * CO, CO,
        KH=KH, KW=KW, PH=PH, PW=PW, HAS_DW_BIAS=HAS_DW_BIAS, HAS_B1=HAS_B1, HAS_B2=HAS_B2,
        HAS_SCALE=HAS_SCALE, RESIDUAL=RESIDUAL, NORM=NORM is not None,
        NORM_AFFINE=NORM == "affine", NORM_EPS=NORM_EPS, PRECISION=PRECISION, WIDEN=widen,
        INT64=int64, BLOCK_C=BLOCK_C, BLOCK_N=BLOCK_N, **META, **LAUNCH)
    if out is not y:
        y.copy_(out)
    return result
'''


def render(spec: MlpSpec, schedule: Schedule) -> T.KernelSource:
    summary = "ConvNeXt's block (depthwise conv, LayerNorm, MLP)"
    text = T.render(
        TEMPLATE,
        **template_fields(spec, schedule, summary),
        kernel=", ".join(map(str, spec.dw_kernel)),
        padding=", ".join(map(str, spec.dw_padding)),
        image=", ".join(map(str, spec.image)),
        dw_bias=str(spec.dw_bias),
        block_c=str(_pow2(spec.in_features)),
        block_n=str(_pow2(spec.out_features)),
    )
    return T.KernelSource(f"{spec.geometry()}_{schedule.name}", text, schedule, spec.key(), KERNELS)
