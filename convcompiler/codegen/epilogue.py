"""The epilogue hook: what a conv kernel does to its fp32 accumulator before the store;
and the prologue hook: what it does to each input tile as it loads it.

    conv bias -> batch norm (running statistics) -> activation -> [* layer scale]
        -> + residual -> activation
    (or conv bias -> activation -> batch norm -> ...: spec.epilogue.bn_after_act)
    prologue: batch norm (running statistics) or LayerNorm -> activation, on the input

Batch norm is folded from the live parameters inside the kernel, per output channel:

    scale = gamma * rsqrt(running_var + eps)        (gamma = 1 without affine)
    acc   = acc * scale + (beta - running_mean * scale)

so a compiled model stays correct when its parameters or statistics change. Activations
are written with core Triton builtins only (no tl.sigmoid: see template.py).
"""

from __future__ import annotations

from ..spec import Activation, ConvSpec


def _clamp(v: str, lo: str | None, hi: str | None) -> str:
    """min(max(v, lo), hi) that keeps NaN, as torch.clamp does: tl.maximum and tl.minimum
    return the other operand for NaN on a GPU, so the bounds are applied with tl.where."""
    if lo is not None:
        v = f"tl.where({v} < {lo}, {lo}, {v})"
    if hi is not None:
        v = f"tl.where({v} > {hi}, {hi}, {v})"
    return v


def activation_code(act: Activation, v: str = "acc") -> str:
    """The fp32 expression of `act` applied to `v`. NaN and +-Inf come out as eager's
    (float64) do: NaN stays NaN, relu(-inf) = 0, silu(-inf) = hardswish(-inf) = NaN, ..."""
    if act.name == "relu":
        return _clamp(v, "0.0", None)
    if act.name == "hardtanh":
        lo, hi = act.args
        return _clamp(v, repr(lo), repr(hi))
    if act.name == "silu":
        return f"{v} / (1.0 + tl.exp(-{v}))"
    if act.name == "sigmoid":
        return f"1.0 / (1.0 + tl.exp(-{v}))"
    if act.name == "gelu":
        return f"0.5 * {v} * (1.0 + tl.erf({v} * 0.7071067811865476))"
    if act.name == "gelu_tanh":  # tanh(z) = 2 / (1 + exp(-2z)) - 1
        z = f"(0.7978845608028654 * ({v} + 0.044715 * {v} * {v} * {v}))"
        return f"0.5 * {v} * (2.0 / (1.0 + tl.exp(-2.0 * {z})))"
    if act.name == "hardswish":
        return f"{v} * {_clamp(f'{v} + 3.0', '0.0', '6.0')} / 6.0"
    if act.name == "hardsigmoid":
        return f"{_clamp(f'{v} + 3.0', '0.0', '6.0')} / 6.0"
    if act.name == "leaky_relu":
        (slope,) = act.args
        return f"tl.where({v} > 0.0, {v}, {v} * {slope!r})"
    raise ValueError(f"no epilogue code for activation {act.name!r}")


def prologue(spec: ConvSpec) -> str:
    """The @triton.jit helper `_prologue(a, a_mask, x_ptr, c, pw_ptr, pb_ptr, pm_ptr, pv_ptr,
    row_mean, row_rstd, WIDEN)` that turns a loaded input tile `a` [rows, channels `c`] into
    what the conv multiplies (spec.prologue: a batch norm with running statistics, or a
    LayerNorm over the channels with the rows' `row_mean` and `row_rstd` [rows, 1], then
    the activation); for a spec without one, it returns `a`.

    `c` holds channels inside the tensor on every lane, masked ones included; the norm's
    pointers (weight, bias; a BN's running mean and var) are offset to the group. A GPU
    kernel computes in fp32 and rounds the norm's output and the activation's to the input's
    dtype (x_ptr's), as eager's separate ops do; the interpreter (WIDEN) computes in fp64.
    Lanes outside `a_mask` become 0, as the conv's zero padding of the normalised tensor is."""
    p = spec.prologue
    lines = ["@triton.jit",
             "def _prologue(a, a_mask, x_ptr, c, pw_ptr, pb_ptr, pm_ptr, pv_ptr, row_mean,"
             " row_rstd,",
             "              WIDEN: tl.constexpr):"]
    if not p.name():
        return "\n".join(lines + ["    return a  # this conv reads its input as it is"])

    def param(ptr: str) -> str:
        return f"tl.load({ptr} + c).to(v.dtype)"

    body = [f"# the input's {p.name()}, as eager's separate ops round it",
            "v = a.to(tl.float64) if WIDEN else a.to(tl.float32)"]
    affine = (p.bn or p.ln) == "affine"
    if p.bn:
        body.append(f"scale = tl.rsqrt({param('pv_ptr')} + {p.eps!r})")
        if affine:
            body.append(f"scale = scale * {param('pw_ptr')}")
        body.append(f"v = (v - {param('pm_ptr')}[None, :]) * scale[None, :]")
    if p.ln:
        body.append("v = (v - row_mean.to(v.dtype)) * row_rstd.to(v.dtype)")
        if affine:
            body.append(f"v = v * {param('pw_ptr')}[None, :]")
    if affine:
        body.append(f"v = v + {param('pb_ptr')}[None, :]")
    body += ["if not WIDEN:", "    v = v.to(x_ptr.dtype.element_ty).to(tl.float32)"]
    if p.act:
        body.append(f"v = {activation_code(p.act, 'v')}")
    body.append("a = tl.where(a_mask, v, 0.0)")
    body += ["if not WIDEN:", "    a = a.to(x_ptr.dtype.element_ty)", "return a"]
    return "\n".join(lines + ["    " + line for line in body])


def _load(ptr: str, other: str = "0.0") -> str:
    return f"tl.load({ptr} + offs_k, mask=k_ok, other={other}).to(acc.dtype)"


STORE = """
# ---- 5. store in eager's memory format ----
y_off = ${offsets}
tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])
"""


def _offsets(spec: ConvSpec, s: str) -> str:
    """Where each output (or residual, `s` "y" or "r") element of the tile lives: the tile's
    pixels, or with spec.out_windows each window row's pixel of the output image
    (gemm_1x1's kernel names the image's size and windows)."""
    strides = {"y": "syn, syk, syh, syw", "r": "srn, src, srh, srw"}[s]
    if spec.out_windows:
        return (f"_window_offsets(offs_m, offs_k, N, HO, WO, YH, YW, {strides}, OWIN_H, OWIN_W, "
                "OSHIFT_H, OSHIFT_W, INT64)")
    return f"_tile_offsets(offs_m, offs_k, N, HO, WO, {strides}, IMAGE_TILES, INT64)"


def _layer_norm(kind: str, eps: float) -> list[str]:
    """A LayerNorm over each pixel's output channels (spec.epilogue.ln): the tile holds all
    KG of them (the templates' spaces see to it), so its rows' statistics come from registers,
    the mean first, then the centred squares, as eager; the conv's output is rounded to the
    output's dtype first, as eager's conv writes it. Its weight and bias are the batch norm's
    operands (bnw_ptr, bnb_ptr); lanes past KG are left out of both sums."""
    lines = [
        "# the LayerNorm over the channels, from the conv's output as eager rounds it",
        "if not WIDEN:",
        "    acc = acc.to(y_ptr.dtype.element_ty).to(acc.dtype)",
        "ln_mean = tl.reduce(tl.where(k_ok[None, :], acc, 0.0), 1, _add, keep_dims=True) / KG",
        "centred = tl.where(k_ok[None, :], acc - ln_mean, 0.0)",
        "ln_var = tl.reduce(centred * centred, 1, _add, keep_dims=True) / KG",
        f"acc = centred / tl.sqrt(ln_var + {eps!r})",
    ]
    if kind == "affine":
        lines.append(f"acc = acc * {_load('bnw_ptr')}[None, :] + {_load('bnb_ptr')}[None, :]")
    return lines


def epilogue(spec: ConvSpec) -> str:
    """Kernel code run on `acc` [BLOCK_M, BLOCK_N], then the store (4-space indented).

    In scope: `acc`, `offs_m`, `m_ok`, `offs_k` (global output channels), `k_ok`, the
    epilogue pointers (`b_ptr`, `bnw_ptr`, `bnb_ptr`, `mean_ptr`, `var_ptr`, `r_ptr`; `ls_ptr`,
    the layer scale, in gemm_1x1 only: the other templates refuse spec.epilogue.scale) and
    the output and residual strides. `offs_m` and `offs_k` come from the tile helpers
    (template.py: _tile_rows, _tile_cols), which keep them inside the output on every lane,
    masked ones included, so every load and store here forms in-bounds addresses.
    """
    e = spec.epilogue
    steps = (["bias"] if spec.has_bias else []) + ([e.name()] if e.name() else [])
    lines = [f"# ---- 4. epilogue: {' + '.join(steps) if steps else 'none'} ----"]
    if spec.has_bias:
        lines.append(f"acc += {_load('b_ptr')}[None, :]")
    if e.ln:
        lines += _layer_norm(e.ln, e.ln_eps)
    bn = []
    if e.bn:
        bn.append(f"scale = tl.rsqrt({_load('var_ptr', '1.0')} + {e.bn_eps!r})")
        bn.append(f"mean = {_load('mean_ptr')}")
        if e.bn == "affine":
            bn.append(f"scale = scale * {_load('bnw_ptr')}")
            bn.append(f"shift = {_load('bnb_ptr')} - mean * scale")
        else:
            bn.append("shift = -mean * scale")
        bn.append("acc = acc * scale[None, :] + shift[None, :]")
    act = [f"acc = {activation_code(e.act)}"] if e.act else []
    lines += act + bn if e.bn_after_act else bn + act
    if e.scale:  # the layer scale, per output channel
        lines.append(f"acc = acc * {_load('ls_ptr')}[None, :]")
    if e.residual:
        lines.append(f"r_off = {_offsets(spec, 'r')}")
        lines.append("r_mask = m_ok[:, None] & k_ok[None, :]")
        lines.append("acc += tl.load(r_ptr + r_off, mask=r_mask, other=0.0).to(acc.dtype)")
    if e.post_act:
        lines.append(f"acc = {activation_code(e.post_act)}")
    body = "\n".join(lines) + "\n" + STORE.replace("${offsets}", _offsets(spec, "y"))
    return "\n".join("    " + line if line else "" for line in body.strip("\n").split("\n"))
