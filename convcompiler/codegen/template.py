"""Kernel sources as frozen values, and the few hooks every conv template shares.

A template is readable Triton/Python text with `${hook}` slots (string.Template). Hooks:

    header     the module docstring: what the region computes and which schedule runs it
    helpers    @triton.jit helpers shared by the conv templates (tile order, tile rows and
               columns, window taps: every lane's address inside its tensor)
    epilogue   code applied to the fp32 accumulator (bias, batch norm, activations,
               residual; see epilogue.py), then the store
    prologue   code applied to each loaded input tile (the input's batch norm and
               activation, spec.prologue; epilogue.py), and `prologue_operands`, the
               launcher's checks of that batch norm's parameters (gemm_1x1, im2win_implicit)
    constants  the spec's geometry and the schedule's parameters, as Python dicts
    prepare    the launcher's constraint checks, output-shape arithmetic and allocation
    finish     the launcher's last lines (the interpreter's bf16 rounding, the 1-D squeeze)

Kernels call only Triton's core builtins. `tl.zeros`, `tl.cdiv`, `tl.sum`, `tl.max` and the
other helpers of `triton.language.standard` are themselves `@triton.jit` functions, created
compiled-mode when Triton is imported; a kernel interpreted through the
`triton.knobs.runtime.interpret` switch cannot call them. Use `tl.full`, integer
arithmetic and `tl.reduce` with a local combine function instead.
"""

from __future__ import annotations

import hashlib
import string
import textwrap
from dataclasses import dataclass

from ..devices import Device
from ..schedule import InvalidSchedule, Schedule
from ..spec import PADDING_MODES, ConvSpec
from .epilogue import epilogue, prologue

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KernelSource:
    """The text of one generated module; `entry` names its launcher."""

    name: str  # readable stem: the region geometry plus the schedule name
    text: str
    schedule: Schedule
    spec_key: str
    kernels: tuple[str, ...]  # the @triton.jit kernels in the module, in launch order
    entry: str = "launch"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.sha256[:16]}.py"


def render(template: str, **hooks: str) -> str:
    """Fill a template's `${hook}` slots; a missing hook is an error, not an empty string."""
    return string.Template(template).substitute(hooks)


def indent(code: str, spaces: int = 4) -> str:
    return textwrap.indent(textwrap.dedent(code).strip("\n"), " " * spaces)


# ---- shared schedule checks ----------------------------------------------------------------
def check_row_tiling(spec: ConvSpec, s: Schedule) -> None:
    """M_TILES: image tiles need an NCHW output and put the batch on grid axis 2."""
    if s.get("M_TILES") == "image" and spec.output_layout != "nchw":
        raise InvalidSchedule("image tiles only make stores contiguous for an NCHW output")
    if s.get("M_TILES") == "image" and spec.hint(spec.batch) > 65535:
        raise InvalidSchedule("image tiles put the batch on grid axis 2 (at most 65535)")


def check_planar(spec: ConvSpec) -> None:
    """A 3-D conv (spec.depth) runs the templates whose taps walk the depth too:
    im2win_implicit, transposed_phase and wgrad_splitk."""
    if spec.depth:
        raise InvalidSchedule("a 3-D conv runs im2win_implicit, transposed_phase or "
                              "wgrad_splitk (their taps walk the depth)")


def check_ln_epilogue(spec: ConvSpec, s: Schedule) -> None:
    """A LayerNorm epilogue normalises each pixel over all its output channels, from the
    accumulator: one tile must hold every one of them."""
    if spec.epilogue.ln and s["BLOCK_N"] < spec.out_channels_per_group:
        raise InvalidSchedule(
            f"a LayerNorm epilogue needs all {spec.out_channels_per_group} output channels in "
            "one tile"
        )


def check_gemm_tiles(spec: ConvSpec, s: Schedule, device: Device | None) -> None:
    """Row tiling, plus the GPU budgets of the tl.dot templates (none for the interpreter).

    Per thread: the fp32 accumulator <= 32 values and each operand tile <= 16 elements
    (their addresses live in registers too). Derived from the static sm_80/sm_90 report
    (convcompiler.inspection.aot): configurations beyond these budgets spilled on at least one
    of the ResNet, AlexNet or depthwise shapes. The pipelined operand tiles must fit the device's
    shared memory."""
    check_row_tiling(spec, s)
    if device is None:
        return
    threads = 32 * s["num_warps"]
    bm, bn, bk = s["BLOCK_M"], s["BLOCK_N"], s["BLOCK_K"]
    if bm * bn // threads > 32:
        raise InvalidSchedule(
            f"{bm}x{bn} accumulator: {bm * bn // threads} values per thread (> 32)"
        )
    if max(bm * bk, bk * bn) // threads > 16:
        raise InvalidSchedule(f"operand tiles {bm}x{bk} and {bk}x{bn}: over 16 values per thread")
    e = spec.epilogue
    if e.bn_after_act and e.residual and bm * bn // threads == 32:
        # spilled 56 bytes on sm_90 (gemm_1x1, float16, 64x128 batch tiles on 8 warps): the
        # late BN's scale and shift live beside the residual's addresses
        raise InvalidSchedule("act -> BN -> add at the full accumulator budget")
    if e.scale and e.residual and bm * bn // threads == 32:
        # spilled 8 bytes on sm_90 (gemm_1x1, bfloat16, 128x64 batch tiles on 8 warps; 64x128
        # reached 255 registers): the layer scale's values live beside the residual's addresses
        raise InvalidSchedule("* layer scale -> add at the full accumulator budget")
    smem = s["num_stages"] * (bm * bk + bk * bn) * ITEMSIZE[spec.dtype]
    if smem > device.smem_per_block:
        raise InvalidSchedule(
            f"{smem} B of pipelined tiles > {device.smem_per_block} B shared memory"
        )


# A conv launcher's parameters: (x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, residual,
# mask, x_scale, x_bn_weight, x_bn_bias, x_bn_mean, x_bn_var, layer_scale); only gemm_1x1
# takes the last (spec.epilogue.scale).
LAYER_SCALE_AT = 14


def with_layer_scale(operands: tuple, layer_scale: object) -> tuple:
    """A conv launcher's positional operands with the layer scale in its place."""
    return (*operands, *[None] * (LAYER_SCALE_AT - len(operands)), layer_scale)


def with_depthwise(operands: tuple, dw_weight: object, dw_bias: object) -> tuple:
    """... with a depthwise prologue's weight and bias after the layer scale (dw_gemm's
    16th and 17th parameters; spec.prologue.dw)."""
    return (*operands, *[None] * (LAYER_SCALE_AT + 1 - len(operands)), dw_weight, dw_bias)


# ---- hook: header ------------------------------------------------------------------------
def header(spec: ConvSpec, schedule: Schedule, summary: str) -> str:
    params = "\n".join(f"    {k} = {v!r}" for k, v in schedule.params)
    return (
        f'"""Generated by convcompiler: {summary}\n\n'
        f"region   : {spec.describe()}\n"
        f"geometry : {spec.geometry()}\n"
        f"schedule : {schedule.name}\n{params}\n\n"
        "Do not edit: the backend loads this file only when its content hash matches.\n"
        '"""'
    )


# ---- hook: constants ---------------------------------------------------------------------
def constants(spec: ConvSpec, schedule: Schedule, **groups: tuple[str, ...]) -> str:
    """Python constants for the launcher: the geometry, and the schedule's parameters split
    into the dicts named in `groups` (e.g. LAUNCH=("num_warps", "num_stages")); the rest are
    the GEMM kernel's meta-parameters, META."""
    geometry = dict(
        KH=spec.kernel[0],
        KW=spec.kernel[1],
        SH=spec.stride[0],
        SW=spec.stride[1],
        PH=spec.padding[0],
        PW=spec.padding[1],
        DH=spec.dilation[0],
        DW=spec.dilation[1],
    )
    d = spec.depth  # a 3-D conv's depth axis: its kernel, stride, padding and dilation
    depth = dict(KD=d.kernel, SD=d.stride, PD=d.padding, DD=d.dilation) if d else None
    grouped = {
        name: {k: v for k, v in schedule.params if k in keys} for name, keys in groups.items()
    }
    taken = {k for keys in groups.values() for k in keys}
    meta = {k: v for k, v in schedule.params if k not in taken}
    lines = [
        f"NDIM = {spec.ndim}",
        f"GROUPS = {spec.groups}",
        f"DTYPE = torch.{spec.dtype}",
        f"HAS_BIAS = {spec.has_bias}",
        f"BATCH_NORM = {spec.epilogue.bn is not None}",
        f"BN_AFFINE = {spec.epilogue.bn == 'affine'}",
        f"LN_AFFINE = {spec.epilogue.ln == 'affine'}  # a LayerNorm epilogue's weight and bias",
        f"RESIDUAL = {spec.epilogue.residual}",
        f"OUT_CHANNELS_LAST = {spec.output_layout == 'nhwc'}",
        f"PRECISION = {spec.precision!r}",
        "INDEX_LIMIT = 2**31  # tensors this large get 64-bit offsets",
        f"GEOMETRY = {geometry!r}",
        f"DEPTH = {depth!r}  # a 3-D conv's depth axis (NDIM 3), else None",
        f"DEPTH_PAD_END = {d.padding_end if d else 0}  # its padding after the last slice",
        f"DEPTH_ARGS = {dict(DEPTH3=d is not None, **(depth or dict(KD=1, SD=1, PD=0, DD=1)))!r}"
        "  # the kernels' depth constexprs (2-D: one slice)",
        f"META = {meta!r}",
    ]
    if spec.transposed:
        padding = (d.output_padding, *spec.output_padding) if d else spec.output_padding
        lines.insert(-2, f"OUTPUT_PADDING = {padding!r}  # ([depth,] rows, columns)")
    if spec.op != "conv":  # the backward kernels: whether the gradient comes with its mask
        lines.insert(-2, f"INPUT_MASK = {spec.input_mask}")
    # the input's and the output's rows as window tokens of an image (spec.windows,
    # spec.out_windows; gemm_1x1's)
    for name, w in (("WINDOWS", spec.windows), ("OUT_WINDOWS", spec.out_windows)):
        value = (*w.size, *w.shift) if w else None
        lines.insert(-2, f"{name} = {value!r}  # (WH, WW, shift_h, shift_w) or None")
    if spec.op == "conv":  # _window_tap's PAD_MODE: the padding mode's index in PADDING_MODES
        mode = PADDING_MODES.index(spec.padding_mode)
        lines.insert(-2, f"PAD_MODE = {mode}  # {spec.padding_mode}")
    lines += [f"{name} = {values!r}" for name, values in grouped.items()]
    return "\n".join(lines)


# ---- hook: launch and meta-parameters (the attention and block templates) ----------------
def split_params(schedule: Schedule, launch_keys: tuple[str, ...]) -> tuple[str, str]:
    """The schedule's parameters as two dict literals: the kernel's meta-parameters, and the
    launch options named in `launch_keys` (num_warps, num_stages)."""
    params = dict(schedule.params)
    meta = {k: v for k, v in params.items() if k not in launch_keys}
    return repr(meta), repr({k: v for k, v in params.items() if k in launch_keys})


# ---- hook: wrapped indices (the attention and block templates) ----------------------------
WRAPPED_BLOCK = """@triton.jit
def _block(start, SIZE: tl.constexpr, BLOCK: tl.constexpr):
    # BLOCK indices from `start` and which are < SIZE (49 tokens, head_dim 24 in a 32-wide
    # block); those past SIZE wrap to 0, 1, ... so that their addresses stay in bounds.
    offs = start + tl.arange(0, BLOCK)
    ok = offs < SIZE
    if SIZE % BLOCK != 0:
        offs = offs % SIZE
    return offs, ok"""


# A LayerNorm's row statistics, read by the kernels that apply one in their loads (mlp_block's
# prologue, gemm_1x1's spec.prologue.ln); needs _block (WRAPPED_BLOCK) and _zeros (HELPERS).
ROW_STATS = """# Row sums reduce with Triton's own combine function: the interpreter
# recognises it and reduces with NumPy (see codegen/window_attention.py).
_add = tl.standard._sum_combine


@triton.jit
def _row_stats(x_rows, sxc, m_ok, EPS: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr, WIDEN: tl.constexpr):
    # LayerNorm's statistics of each row over its C features: the mean, then the mean of the
    # centred squares (not E[x^2] - mean^2, which cancels), in fp32 (fp64 interpreted)
    total = _zeros(BLOCK_M, 1, WIDEN)
    for c0 in range(0, C, BLOCK_K):
        offs_c, c_ok = _block(c0, C, BLOCK_K)
        a = tl.load(x_rows + (offs_c * sxc)[None, :], mask=m_ok[:, None] & c_ok[None, :],
                    other=0.0)
        total += tl.reduce(a.to(total.dtype), 1, _add, keep_dims=True)
    mean = total / C
    total = _zeros(BLOCK_M, 1, WIDEN)
    for c0 in range(0, C, BLOCK_K):
        offs_c, c_ok = _block(c0, C, BLOCK_K)
        a = tl.load(x_rows + (offs_c * sxc)[None, :], mask=m_ok[:, None] & c_ok[None, :],
                    other=0.0)
        centred = tl.where(c_ok[None, :], a.to(total.dtype) - mean, 0.0)
        total += tl.reduce(centred * centred, 1, _add, keep_dims=True)
    return mean, 1.0 / tl.sqrt(total / C + EPS)
"""


# ---- hook: helpers -----------------------------------------------------------------------
HELPERS = """
@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M consecutive row tiles sweep the columns together, so the
    # weight tiles they share are still in L2 when the next row tile needs them.
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit
def _zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIDEN: tl.constexpr):
    # The accumulator: fp32 on a GPU; fp64 under Triton's interpreter (WIDEN).
    if WIDEN:
        return tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float64)
    return tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)


@triton.jit
def _mma(a, b, acc, WIDEN: tl.constexpr, PRECISION: tl.constexpr):
    # acc += a @ b: on a GPU on tensor cores with fp32 accumulation. Under Triton's
    # interpreter (WIDEN) the operands are widened to fp64 after the load: the interpreter
    # multiplies bf16 bit patterns, and fp64 makes a CPU run as close to exact as it gets.
    # (out_dtype names the fp64 accumulator: Triton 3.6 checks it against a float32 default.)
    if WIDEN:
        return tl.dot(a.to(tl.float64), b.to(tl.float64), acc, input_precision=PRECISION,
                      out_dtype=tl.float64)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# ---- addresses stay inside their tensors, masked lanes included ----
# On sm_90 / sm_100 Triton may pipeline a masked tl.load into cp.async, which issues every
# lane's address, masked or not: a lane in the padding halo (a negative offset) or past the
# end of a tensor then faults or reads garbage (PyTorch PR 186440). So each masked index is
# brought inside its tensor before it becomes a pointer, by the helper that computes it:
#   tails (rows, channels or reduction steps past the end) wrap, `i % size`: the compiler
#     sees `i` exactly as contiguous as the mask `i < size` is uniform, so loads and stores
#     vectorise as before (`tl.where(mask, i, 0)` would make every lane look scattered);
#     rows of batch tiles only need their image index capped at N - 1;
#   a row or column in the padding halo is clamped to the image's edge, only on an axis
#     that has padding (_window_tap; the flat reduction clamps its offset tile instead).
# The masks select the same lanes as before, so the results are unchanged; sm_90 compiles
# of the GPU command's part a kept every load's and store's vector width, with no spills.
# tests/test_addresses.py checks every lane of every load and store on the interpreter.
@triton.jit
def _tile_rows(N, HO, WO, KG, IMAGE_TILES: tl.constexpr, INT64: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # The tile's rows are output pixels, its columns output channels of one group.
    # IMAGE_TILES keeps a tile inside image n = program_id(2): the rows of an NCHW output
    # tile are then one contiguous run of pixels. Otherwise rows run over the whole batch.
    # Rows past M (m_ok masks them) stay inside the tensors: ho and wo wrap anyway; in image
    # tiles offs_m wraps too (it addresses pixels directly), in batch tiles n stops at N - 1.
    if IMAGE_TILES:
        M = HO * WO
    else:
        M = N * HO * WO
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, KG, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    wo = offs_m % WO
    ho = (offs_m // WO) % HO
    if IMAGE_TILES:
        n = tl.program_id(2)
        offs_m = offs_m % M
    else:
        n = tl.minimum(offs_m // (WO * HO), N - 1)
    if INT64:
        n = n.to(tl.int64)
    return offs_m, m_ok, n, ho, wo, pid_n


@triton.jit
def _tile_cols(pid_n, g, KG: tl.constexpr, BLOCK_N: tl.constexpr):
    # The tile's columns: BLOCK_N output channels of group g, which has KG; those past KG
    # wrap to channels of the group (k_ok masks them). Returns the global channels and k_ok.
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_n < KG
    if KG % BLOCK_N != 0:
        offs_n = offs_n % KG
    return g * KG + offs_n, k_ok


@triton.jit
def _window_tap(x_img, hi0, wi0, m_ok, ky, kx, H, W, sxh, sxw,
                PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                PAD_MODE: tl.constexpr = 0):
    # Tap (ky, kx) of each pixel's window: its offset in x (x_img: the image's) and whether
    # it reads the image rather than the zero padding. A row or column in the padding is
    # clamped to the image's edge; an axis without padding needs no clamp (its windows fit).
    # PAD_MODE 1 (reflect), 2 (replicate) and 3 (circular) fill the padding from the image
    # instead: the row or column is mirrored about the edge (without repeating it), clamped
    # to it, or wrapped around, and every tap reads the image.
    hi = hi0 + ky * DH
    wi = wi0 + kx * DW
    if PAD_MODE == 0:
        inside = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    else:
        inside = m_ok
        if PAD_MODE == 1:  # reflect: -1 -> 1, H -> H - 2 (F.pad needs padding < the size)
            hi = tl.where(hi < 0, -hi, hi)
            hi = tl.where(hi >= H, 2 * (H - 1) - hi, hi)
            wi = tl.where(wi < 0, -wi, wi)
            wi = tl.where(wi >= W, 2 * (W - 1) - wi, wi)
        if PAD_MODE == 3:  # circular: -1 -> H - 1, H -> 0 (F.pad needs padding <= the size)
            hi = tl.where(hi < 0, hi + H, hi)
            hi = tl.where(hi >= H, hi - H, hi)
            wi = tl.where(wi < 0, wi + W, wi)
            wi = tl.where(wi >= W, wi - W, wi)
    if PH > 0:
        hi = tl.minimum(tl.maximum(hi, 0), H - 1)
    if PW > 0:
        wi = tl.minimum(tl.maximum(wi, 0), W - 1)
    return x_img + hi * sxh + wi * sxw, inside


@triton.jit
def _window_row(n, t, H, W, sxn, sxh, sxw, WH: tl.constexpr, WW: tl.constexpr,
                SHIFT_H: tl.constexpr, SHIFT_W: tl.constexpr):
    # Token t of window n (spec.windows, spec.out_windows): its pixel of the H x W image,
    # rolled by -shift, as an offset; inside the image on every lane (n < the windows,
    # t < WH*WW, and the modulo)
    across = W // WW
    per_image = (H // WH) * across
    b = n // per_image
    r = n - b * per_image
    h = ((r // across) * WH + t // WW + SHIFT_H) % H
    w = ((r % across) * WW + t % WW + SHIFT_W) % W
    return b * sxn + h * sxh + w * sxw


@triton.jit
def _window_offsets(offs_m, offs_k, N, HO, WO, YH, YW, sn, sk, sh, sw, WH: tl.constexpr,
                    WW: tl.constexpr, SHIFT_H: tl.constexpr, SHIFT_W: tl.constexpr,
                    INT64: tl.constexpr):
    # Where output row m, channel k lives when the rows are window tokens stored at their
    # pixels of a YH x YW image (spec.out_windows; batch tiles): inside it on every lane
    n = tl.minimum(offs_m // (WO * HO), N - 1)
    if INT64:
        n = n.to(tl.int64)
    pixel = _window_row(n, offs_m % WO, YH, YW, sn, sh, sw, WH, WW, SHIFT_H, SHIFT_W)
    return pixel[:, None] + offs_k[None, :] * sk


@triton.jit
def _tile_offsets(offs_m, offs_k, N, HO, WO, sn, sk, sh, sw, IMAGE_TILES: tl.constexpr,
                  INT64: tl.constexpr):
    # Where output pixel m, channel k lives in a tensor with strides (sn, sk, sh, sw); inside
    # it on every lane, as offs_m and offs_k come from _tile_rows and _tile_cols.
    if IMAGE_TILES:
        # contiguous NCHW: pixel p = ho*WO + wo of image n sits at t[n, k] + p
        n = tl.program_id(2)
        if INT64:
            n = n.to(tl.int64)
        return n * sn + offs_m[:, None] + offs_k[None, :] * sk
    wo = offs_m % WO
    ho = (offs_m // WO) % HO
    n = tl.minimum(offs_m // (WO * HO), N - 1)
    if INT64:
        n = n.to(tl.int64)
    return (n * sn + ho * sh + wo * sw)[:, None] + offs_k[None, :] * sk
"""


# ---- the whole module --------------------------------------------------------------------
def render_module(
    template: str,
    spec: ConvSpec,
    schedule: Schedule,
    *,
    summary: str,
    kernels: tuple[str, ...],
    groups: dict[str, tuple[str, ...]],
    prepare: str | None = None,
) -> KernelSource:
    """Fill every hook of a conv template; `groups` splits the schedule's parameters into
    the launcher's dicts (see `constants`); `prepare` replaces the forward conv's PREPARE."""
    text = render(
        template,
        header=header(spec, schedule, summary),
        constants=constants(spec, schedule, **groups),
        helpers=HELPERS,
        epilogue=epilogue(spec),
        prologue=prologue(spec),
        prologue_operands=PROLOGUE_OPERANDS.strip("\n"),
        prologue_constants=prologue_constants(spec),
        wrapped_block=WRAPPED_BLOCK,
        row_stats=ROW_STATS,
        prepare=(PREPARE if prepare is None else prepare).strip("\n"),
        finish=FINISH.strip("\n"),
    )
    return KernelSource(f"{spec.geometry()}_{schedule.name}", text, schedule, spec.key(), kernels)


# ---- hook: prepare -----------------------------------------------------------------------
# The launcher's preparation, in pieces the conv templates share (codegen/conv_transpose.py
# puts its own weight shape and grid between them).
CHECK_OPERANDS = """
    # ---- 1. check constraints ----
    if x.dim() != NDIM + 2 or weight.dim() != NDIM + 2:
        raise ValueError(f"expected {NDIM + 2}-D input and weight, got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if x.dtype != DTYPE or weight.dtype != DTYPE:
        raise TypeError(f"kernel built for {DTYPE}, got {x.dtype} and {weight.dtype}")
    for name, given, built in (("a bias", bias, HAS_BIAS), ("batch norm", bn_mean, BATCH_NORM),
                               ("a residual", residual, RESIDUAL)):
        if (given is not None) != built:
            raise ValueError(f"kernel built {'with' if built else 'without'} {name}")
    if BATCH_NORM and (bn_var is None or (bn_weight is not None) != BN_AFFINE
                       or (bn_bias is not None) != BN_AFFINE):
        raise ValueError("batch norm needs running mean and var, plus weight and bias iff affine")
    if not BATCH_NORM and ((bn_weight is not None) != LN_AFFINE
                           or (bn_bias is not None) != LN_AFFINE):
        raise ValueError(f"kernel built {'with' if LN_AFFINE else 'without'} a LayerNorm's "
                         "weight and bias (in the batch norm's places)")
    if NDIM == 1:  # a 1-D conv runs as a 2-D conv over a 1-row image
        x, weight = x.unsqueeze(2), weight.unsqueeze(2)
    D = DO = 1  # a 3-D conv's input and output depth
    if NDIM == 3:
        N, C, D, H, W = x.shape
    else:
        N, C, H, W = x.shape
"""
PER_CHANNEL_VECTORS = """    # The epilogue reads each per-channel vector (conv bias, batch-norm parameters) as one
    # contiguous run of K values: a strided or broadcast (expanded) vector is copied first.
    vectors = (bias, bn_weight, bn_bias, bn_mean, bn_var)
    for t in vectors:
        if t is not None and tuple(t.shape) != (K,):
            raise ValueError(f"per-channel vector of shape {tuple(t.shape)}, expected ({K},)")
    bias, bn_weight, bn_bias, bn_mean, bn_var = (
        t if t is None or t.is_contiguous() else t.contiguous() for t in vectors)
"""
# The input's norm (spec.prologue), after PREPARE: checked, and handed to the kernel as four
# [C] runs (weight, bias, a BN's running mean and var); those the kernel never reads (a
# LayerNorm's statistics, no affine) stand in as another run, or x.
PROLOGUE_OPERANDS = """
    pre_norm = (x_bn_weight, x_bn_bias, x_bn_mean, x_bn_var)
    names = ("a weight", "a bias", "a running mean", "a running var")
    for t, built, name in zip(pre_norm, (PRE_AFFINE, PRE_AFFINE, PRE_BN, PRE_BN), names):
        if (t is not None) != built:
            raise ValueError(f"kernel built {'with' if built else 'without'} {name} for the "
                             "input's norm")
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"the input's norm parameter {tuple(t.shape)} is not ({C},)")
    given = [t if t.is_contiguous() else t.contiguous() for t in pre_norm if t is not None]
    pre_norm = tuple(t if t is not None else (given[0] if given else x) for t in pre_norm)
"""


def prologue_constants(spec: ConvSpec) -> str:
    """The launcher's and kernel's view of spec.prologue's norm."""
    p = spec.prologue
    return "\n".join([
        f"PRE_BN = {p.bn is not None}  # the input arrives as [act](batch_norm(x))",
        f"PRE_LN = {p.ln is not None}  # ... as [act](layer_norm(x)) over the channels",
        f"PRE_AFFINE = {(p.bn or p.ln) == 'affine'}  # the norm has a weight and a bias",
        f"PRE_EPS = {p.eps!r}",
    ])


# The gradient operand of a backward kernel may come as where(mask, 0, g) (a ReLU's backward):
# the kernel reads g and the bool mask (any strides) and never sees the materialised product.
# The launcher names its gradient operand `masked` before this check.
CHECK_MASK = """    if (mask is not None) != INPUT_MASK:
        raise ValueError(f"kernel built {'with' if INPUT_MASK else 'without'} a gradient mask")
    mask_strides = (0, 0, 0, 0)
    if mask is not None:
        mask = mask.unsqueeze(2) if NDIM == 1 else mask
        if mask.dtype != torch.bool or mask.shape != masked.shape:
            raise ValueError(f"gradient mask {mask.dtype} {tuple(mask.shape)} does not fit the "
                             f"gradient {tuple(masked.shape)}")
        mask_strides = mask.stride()
    # the usual case: the mask is laid out as the gradient, and reuses its offsets
    mask_like = mask is not None and mask.stride() == masked.stride()
"""
ALLOCATE_OUTPUT = """    # ---- 2. allocate the output in the memory format eager produces ----
    fmt = torch.channels_last if OUT_CHANNELS_LAST else torch.contiguous_format
    YH = YW = 0
    if NDIM == 2 and OUT_WINDOWS:  # window rows stored at their pixels of the residual's
        # [B, H, W, K] image (gemm_1x1): the output is that image, seen as [B, K, H, W]
        if residual is None or residual.dim() != 4 or residual.shape[-1] != K:
            raise ValueError("output window rows need the [B, H, W, K] residual image")
        YB, YH, YW = residual.shape[:3]
        OWH, OWW = OUT_WINDOWS[:2]
        if YH % OWH or YW % OWW or YB * (YH // OWH) * (YW // OWW) != N:
            raise ValueError(f"residual {tuple(residual.shape)} is not the image of {N} "
                             f"{OWH}x{OWW} windows")
        residual = residual.permute(0, 3, 1, 2)
        y = torch.empty((YB, YH, YW, K), device=x.device, dtype=x.dtype).permute(0, 3, 1, 2)
    elif NDIM == 3:  # [N, K, DO, HO, WO] (y5), seen by the kernel as [N, K, DO*HO, WO] (a view)
        fmt = torch.channels_last_3d if OUT_CHANNELS_LAST else torch.contiguous_format
        y5 = torch.empty((N, K, DO, HO, WO), device=x.device, dtype=x.dtype, memory_format=fmt)
        y = y5.flatten(2, 3)
    else:
        y = torch.empty((N, K, HO, WO), device=x.device, dtype=x.dtype, memory_format=fmt)
    if y.numel() == 0:
        return y.squeeze(2) if NDIM == 1 else y5 if NDIM == 3 else y
    # Under Triton's interpreter (CPU tensors) the kernel accumulates in fp64; it also
    # truncates when it casts to bf16, so a bf16 result is stored in fp32 and torch rounds it.
    widen = x.device.type == "cpu"
    out = torch.empty_like(y, dtype=torch.float32) if widen and x.dtype == torch.bfloat16 else y
"""
# The GEMM grid, the residual and the epilogue's operands (after ALLOCATE_OUTPUT)
GEMM_GRID = (
    """    # The GEMM grid: (pixel tiles x channel tiles, groups, images when tiles stay in one).
    image = TILING["M_TILES"] == "image"
    rows = DO * HO * WO if image else M
    grid = lambda meta: (
        triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(KG, meta["BLOCK_N"]), GROUPS,
        N if image else 1)
    # The epilogue's operands; image tiles address the residual like the contiguous output.
    residual_strides = (0, 0, 0, 0)
    if residual is not None:
        residual = residual.unsqueeze(2) if NDIM == 1 else residual
        if NDIM == 3:  # as the output: [N, K, DO*HO, WO] (copied when that is no view)
            residual = residual.reshape(N, K, DO * HO, WO) if residual.dim() == 5 else residual
        if residual.shape != y.shape:
            raise ValueError(f"residual {tuple(residual.shape)} != output {tuple(y.shape)}")
        if image and residual.stride() != y.stride():
            residual = residual.contiguous()
        residual_strides = residual.stride()
    epilogue_operands = (bias, bn_weight, bn_bias, bn_mean, bn_var, residual)
"""
)
PREPARE = (
    CHECK_OPERANDS
    + """    K, CG, KH, KW = (*weight.shape[:2], *weight.shape[-2:])
    KD = weight.shape[2] if NDIM == 3 else 1
    if ((KH, KW) != (GEOMETRY["KH"], GEOMETRY["KW"]) or C != CG * GROUPS or K % GROUPS
            or (NDIM == 3 and KD != DEPTH["KD"])):
        raise ValueError(f"input {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit "
                         f"this kernel (groups={GROUPS}, kernel={KH}x{KW})")
    g = GEOMETRY
    HO = (H + 2 * g["PH"] - g["DH"] * (g["KH"] - 1) - 1) // g["SH"] + 1
    WO = (W + 2 * g["PW"] - g["DW"] * (g["KW"] - 1) - 1) // g["SW"] + 1
    if NDIM == 3:
        DO = (D + DEPTH["PD"] + DEPTH_PAD_END - DEPTH["DD"] * (KD - 1) - 1) // DEPTH["SD"] + 1
    KG = K // GROUPS
    if NDIM == 2 and WINDOWS:  # x is the image: N windows of 1 x WH*WW tokens (gemm_1x1)
        if H % WINDOWS[0] or W % WINDOWS[1]:
            raise ValueError(f"image {H}x{W} is not whole {WINDOWS[0]}x{WINDOWS[1]} windows")
        N, HO, WO = N * (H // WINDOWS[0]) * (W // WINDOWS[1]), 1, WINDOWS[0] * WINDOWS[1]
"""
    + PER_CHANNEL_VECTORS
    + """    M = N * DO * HO * WO
    R = KW * KH * KD * CG
    # The im2win filter order: w_packed[k, kx, ky, (kz,) c], so a window's weights are one run.
    w_packed = weight.permute(0, *range(weight.dim() - 1, 0, -1))
    if not w_packed.is_contiguous():
        w_packed = w_packed.contiguous()

"""
    + ALLOCATE_OUTPUT
    + GEMM_GRID
)

# ---- hook: finish ------------------------------------------------------------------------
# A 3-D conv kernel's strides have a depth entry before the rows' (0 for a 2-D conv), the
# launcher's helper to pass a tensor's strides so (after PREPARE's shapes are known)
WITH_DEPTH = """
    def with_depth(strides):  # (..., c, [d,] h, w) -> (..., c, d, h, w), d's stride 0 in 2-D
        return tuple(strides) if NDIM == 3 else (*strides[:-2], 0, *strides[-2:])
"""

FINISH = """
    if out is not y:
        y.copy_(out)
    if NDIM == 2 and OUT_WINDOWS:  # the [B, H, W, K] image
        return y.permute(0, 2, 3, 1)
    return y.squeeze(2) if NDIM == 1 else y5 if NDIM == 3 else y
"""
