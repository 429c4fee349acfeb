"""No lane of a generated kernel forms an address outside its tensor, masked lanes included.

Every template family runs through Triton's interpreter under tests/address_check.py, which
checks each lane of each load and store against the storage it was derived from: on sm_90 /
sm_100 a masked load may be pipelined into an unpredicated cp.async that issues the address
of every lane (PyTorch PR 186440). The geometries put lanes in the padding halo (padding,
stride, dilation), past the last pixel and channel (odd sizes, partial tiles), in other groups
(groups, depthwise multipliers) and in both layouts; each output is also checked against eager.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from address_check import AddressViolation, address_check, checked_addresses_fixture  # noqa: F401
from helpers import assert_close

import convcompiler
from convcompiler.bench import gpu_cases, gpu_native
from convcompiler.codegen import SPACES
from convcompiler.config import Config
from convcompiler.devices import DEVICES
from convcompiler.frontend.kernels import attention_spec_of, choose, conv_kernel, conv_spec_of
from convcompiler.runtime.loader import interpret_mode
from convcompiler.runtime.reference import run_aten, run_attention
from convcompiler.spec import Activation, Epilogue

# ---- the check itself catches a planted out-of-bounds masked load -------------------------
with interpret_mode(True):

    @triton.jit
    def _shifted_copy(
        x_ptr, y_ptr, n, SHIFT: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr
    ):
        i = tl.arange(0, BLOCK)
        src = i - SHIFT  # lanes 0 .. SHIFT-1 read before x: masked, but an address all the same
        ok = (src >= 0) & (src < n)
        if CLAMP:
            src = tl.where(ok, src, 0)
        v = tl.load(x_ptr + src, mask=ok, other=0.0)
        tl.store(y_ptr + i, v, mask=i < n)


def test_check_catches_a_planted_masked_load_before_the_tensor() -> None:
    x, y = torch.arange(16.0), torch.empty(16)
    with pytest.raises(AddressViolation) as caught:
        with address_check() as check:
            _shifted_copy[(1,)](x, y, 16, SHIFT=3, CLAMP=False, BLOCK=16)
    [site] = check.violations.values()  # the load, 3 lanes (12 B) before x; not the store
    assert (site.kernel, site.op, site.below, site.above) == ("_shifted_copy", "load", 12, 0)
    assert not site.unmasked and "tl.load(x_ptr + src" in site.source
    assert f"_shifted_copy load at {Path(__file__).name}:{site.line}" in str(caught.value)
    assert "12 B (3 elements) before" in str(caught.value)
    assert torch.equal(y[3:], x[:13]) and torch.equal(y[:3], torch.zeros(3))  # masks honoured

    with address_check() as check:  # the same kernel with its offsets clamped is clean
        _shifted_copy[(1,)](x, y, 16, SHIFT=3, CLAMP=True, BLOCK=16)
    assert check.accesses == 2 and check.kernels == {"_shifted_copy"}


def test_check_catches_masked_lanes_past_the_end_and_restores_the_interpreter() -> None:
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.create_masked_load
    x, y = torch.arange(10.0), torch.empty(10)
    with pytest.raises(AddressViolation):
        with address_check() as check:  # lanes 10 .. 15 of the store (the load is clamped)
            _shifted_copy[(1,)](x, y, 10, SHIFT=0, CLAMP=True, BLOCK=16)
    extents = [(v.op, v.below, v.above, v.unmasked) for v in check.violations.values()]
    assert extents == [("store", 0, 24, False)]
    assert interpreter.InterpreterBuilder.create_masked_load is real


def test_the_fixture_checks_what_the_test_runs(checked_addresses) -> None:
    x, y = torch.arange(16.0), torch.empty(16)
    _shifted_copy[(1,)](x, y, 16, SHIFT=3, CLAMP=True, BLOCK=16)
    assert checked_addresses.accesses == 2 and not checked_addresses.violations


# ---- convolutions: every template, padding / stride / dilation / groups / layouts ----------
CONVS = {
    # name: (x shape, weight shape, stride, padding, dilation, groups, channels_last)
    "pad1_3x3": ((2, 5, 7, 9), (6, 5, 3, 3), 1, 1, 1, 1, False),
    "asym_s23_p21_d21": ((1, 4, 11, 10), (7, 4, 3, 5), (2, 3), (2, 1), (2, 1), 1, False),
    "groups3_s2_nhwc": ((2, 6, 8, 7), (9, 2, 3, 3), 2, 1, 1, 3, True),
    "valid_5x5": ((1, 3, 9, 8), (5, 3, 5, 5), 1, 0, 1, 1, False),
    "depthwise_x2_s2": ((1, 4, 9, 8), (8, 1, 3, 3), 2, 1, 1, 4, False),
    "depthwise_d2_nhwc": ((2, 5, 7, 9), (5, 1, 3, 3), 1, 2, 2, 5, True),
    "pointwise": ((2, 7, 5, 6), (5, 7, 1, 1), 1, 0, 1, 1, False),
    "pointwise_s2_nhwc": ((2, 7, 5, 6), (5, 7, 1, 1), 2, 0, 1, 1, True),
    "conv1d_pad": ((2, 5, 13), (4, 5, 3), 1, 1, 1, 1, False),
}
# template (with REDUCTION) -> the small tiles that leave partial tiles everywhere
TILES = {
    "im2win_implicit:tap": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, REDUCTION="tap"),
    "im2win_implicit:flat": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, REDUCTION="flat"),
    "im2win_band": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, FILL_W=16, FILL_C=4),
    "direct_depthwise": dict(BLOCK_M=16, BLOCK_C=8),
    "gemm_1x1": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16),
}


def conv_cases() -> list:
    cases = []
    for name, (_, ws, _, padding, _, groups, nhwc) in CONVS.items():
        pointwise = ws[2:] in ((1, 1), (1,)) and padding == 0
        if pointwise:
            templates = ("gemm_1x1", "im2win_implicit:tap")
        else:
            templates = ("im2win_implicit:tap", "im2win_implicit:flat", "im2win_band")
            templates += ("direct_depthwise",) if ws[1] == 1 else ()
        tilings = ("batch",) if nhwc else ("image", "batch")
        cases += [
            pytest.param(name, template, tiling, id=f"{name}-{template}-{tiling}")
            for template in templates
            for tiling in tilings
        ]
    return cases


def tensors(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    xs, ws, stride, padding, dilation, groups, nhwc = CONVS[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=gen).to(dtype)
    w = torch.randn(ws, generator=gen).to(dtype)
    b = torch.randn(ws[0], generator=gen).to(dtype)
    if nhwc:
        x = x.to(memory_format=torch.channels_last)
    return x, w, b, (stride, padding, dilation), groups


def schedule(spec, template: str, tiling: str):
    name, _, _ = template.partition(":")
    params = choose(spec, Config(cache=False, schedule=name)).schedule.as_dict()
    params.update(TILES[template], M_TILES=tiling)
    return SPACES[name].make(spec, **params)


@pytest.mark.parametrize("name,template,tiling", conv_cases())
def test_conv_addresses(name: str, template: str, tiling: str) -> None:
    x, w, b, args, groups = tensors(name)
    spec = conv_spec_of(x, w, b, *args, groups)
    call = conv_kernel(x, w, b, *args, groups, schedule=schedule(spec, template, tiling))
    with address_check() as check:
        y = call(x, w, b)
    assert_close(y, run_aten(spec, x.double(), w.double(), b.double()), x.dtype, call.path.name)
    assert check.accesses > 0 and check.kernels


# ---- the epilogues: bias, batch norm, activations, residual, in every template -------------
EPILOGUE = Epilogue(bn="affine", act=Activation("silu"), residual=True, post_act=Activation("relu"))
EPILOGUE_CASES = [
    ("pad1_3x3", "im2win_implicit:tap", torch.float16),
    ("groups3_s2_nhwc", "im2win_implicit:flat", torch.bfloat16),
    ("asym_s23_p21_d21", "im2win_band", torch.float32),
    ("depthwise_d2_nhwc", "direct_depthwise", torch.float16),
    ("pointwise", "gemm_1x1", torch.bfloat16),
    ("pointwise_s2_nhwc", "gemm_1x1", torch.float32),
]


@pytest.mark.parametrize("name,template,dtype", EPILOGUE_CASES)
def test_epilogue_addresses(name: str, template: str, dtype) -> None:
    x, w, b, args, groups = tensors(name, dtype, seed=1)
    spec = conv_spec_of(x, w, b, *args, groups, EPILOGUE)
    tiling = "batch" if CONVS[name][-1] else "image"
    call = conv_kernel(
        x, w, b, *args, groups, schedule=schedule(spec, template, tiling), epilogue=EPILOGUE
    )
    gen = torch.Generator().manual_seed(2)
    k = w.shape[0]
    bn = [torch.randn(k, generator=gen) for _ in range(3)] + [torch.rand(k, generator=gen) + 0.5]
    plain = dataclasses.replace(spec, epilogue=Epilogue())
    out = run_aten(plain, x.double(), w.double(), b.double())  # the residual's shape
    residual = (
        torch.randn(out.shape, generator=gen)
        .to(dtype)
        .contiguous(
            memory_format=torch.channels_last if CONVS[name][-1] else torch.contiguous_format
        )
    )
    operands = (x, w, b, *bn, residual)
    with address_check() as check:
        y = call(*operands)
    ref = run_aten(spec, *[t.double() for t in operands])
    assert_close(y, ref, dtype, call.path.name)
    assert check.accesses > 0 and check.kernels


# ---- window attention: bias, mask, cosine + logit scale, both output layouts --------------
ATTENTION_CASES = [
    # (batch, heads, tokens, head_dim, bias, mask, output, cosine)
    (4, 2, 49, 24, True, True, "bnc", False),
    (2, 3, 25, 16, True, False, "bhnd", False),
    (2, 1, 20, 40, False, True, "bhnd", True),
]


@pytest.mark.parametrize("b,heads,n,d,bias,mask,output,cosine", ATTENTION_CASES)
def test_window_attention_addresses(b, heads, n, d, bias, mask, output, cosine) -> None:
    gen = torch.Generator().manual_seed(n)
    qkv = torch.randn(b, n, 3, heads, d, generator=gen).permute(2, 0, 3, 1, 4)  # strided views
    q, k, v = qkv[0], qkv[1], qkv[2]
    bias_t = torch.randn(heads, n, n, generator=gen) if bias else None
    mask_t = torch.where(torch.rand(2, n, n, generator=gen) < 0.3, -100.0, 0.0) if mask else None
    spec = attention_spec_of(q, k, v, bias_t, mask_t, output=output)
    scale_t = None
    if cosine:  # SwinV2: L2-normalised q and k, a per-head logit scale
        spec = dataclasses.replace(spec, cosine=True, logit_scale=True)
        scale_t = torch.rand(heads, 1, 1, generator=gen) + 1.0
    sched = SPACES["window_attention"].make(spec, BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    launch = gpu_native.load_kernel(spec, sched)
    with address_check() as check:
        y = launch(q, k, v, bias_t, mask_t, None, scale_t)
    ref = run_attention(
        spec, *[t if t is None else t.double() for t in (q, k, v, bias_t, mask_t, None, scale_t)]
    )
    assert_close(y, ref, torch.float32)
    assert check.kernels == {"window_attention"} and check.accesses > 0


@pytest.mark.parametrize("n,nk,d,dv", [(20, 7, 4, 40), (9, 37, 24, 8), (5, 6, 300, 272)])
def test_attention_addresses_of_other_layouts(n, nk, d, dv) -> None:
    """Pooled keys (Nk != N), a head dim padded to the tile (4 -> 16; a wide 300 -> 512),
    v's head dim unlike q's, k stored [B, H, D, Nk] (LeViT) and a boolean select: every
    lane's address stays inside its tensor."""
    gen = torch.Generator().manual_seed(nk)
    b, heads = 2, 3
    q = torch.randn(b, n, heads, d, generator=gen).transpose(1, 2)
    kt = torch.randn(b, heads, d, nk, generator=gen)  # stored transposed
    v = torch.randn(b, nk, heads, dv, generator=gen).transpose(1, 2)
    bias_t = torch.randn(heads, n, nk, generator=gen)
    spec = attention_spec_of(q, kt.transpose(-2, -1), v, bias_t, output="bnc")
    assert (spec.keys, spec.head_dim, spec.value_dim) == (nk, d, dv)
    select = torch.rand(1, heads, n, nk, generator=gen) < 0.3  # masked_fill(select, -1e4)
    spec = dataclasses.replace(spec, transposed=("k",), select="drop", fill=-1e4)
    sched = SPACES["window_attention"].make(spec, BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    launch = gpu_native.load_kernel(spec, sched)
    with address_check() as check:
        y = launch(q, kt, v, bias_t, None, None, None, select)
    ref = run_attention(spec, q.double(), kt.double(), v.double(), bias_t.double(),
                        select=select)
    assert y.shape == (b, n, heads * dv)
    assert_close(y, ref, torch.float32)
    assert check.kernels == {"window_attention"} and check.accesses > 0
    with pytest.raises(ValueError, match="expected"):  # k as [B, H, Nk, D]: not as stored
        launch(q, kt.transpose(-2, -1).contiguous(), v, bias_t, None, None, None, select)


def test_sparse_attention_addresses() -> None:
    """The kernel that visits a constant mask's key tiles (its loop bound and tile indices
    read from memory): 44 tokens of a 2-D neighborhood mask, tiles of 16, a head dim of 24."""
    from convcompiler.bench.gpu_attention import neighborhood_mask
    from convcompiler.score_terms import tile_fractions, visible_pairs

    gen = torch.Generator().manual_seed(44)
    b, heads, n, d = 2, 2, 44, 24
    q, k, v = torch.randn(b, n, 3, heads, d, generator=gen).permute(2, 0, 3, 1, 4)
    select = neighborhood_mask((11, 4), 3)[None, None]
    spec = attention_spec_of(q, k, v, None, None, output="bhnd")
    fractions = tile_fractions(visible_pairs(None, None, None, select, True, float("-inf")), b)
    spec = dataclasses.replace(spec, select="keep", key_tiles=fractions)
    assert spec.visited(16, 16) < 1.0
    sched = SPACES["window_attention"].make(spec, BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    launch = gpu_native.load_kernel(spec, sched)
    with address_check() as check:
        y = launch(q, k, v, None, None, None, None, select)
    ref = run_attention(spec, q.double(), k.double(), v.double(), select=select)
    assert_close(y, ref, torch.float32)
    assert check.kernels == {"window_attention"} and check.accesses > 0


def test_attention_backward_addresses() -> None:
    """Both backward kernels (the bias gradient's atomics included), 20 tokens and a head dim
    of 24 in tiles of 16, q, k, v strided views, a bias and a per-window mask."""
    gen = torch.Generator().manual_seed(20)
    b, heads, n, d = 4, 2, 20, 24
    q, k, v = torch.randn(b, n, 3, heads, d, generator=gen).permute(2, 0, 3, 1, 4)
    bias = torch.randn(heads, n, n, generator=gen)
    mask = torch.where(torch.rand(2, n, n, generator=gen) < 0.3, -100.0, 0.0)
    spec = dataclasses.replace(attention_spec_of(q, k, v, bias, mask, output="bhnd"), grad=True)
    sched = SPACES["attention_backward"].make(spec, BLOCK_M=16, BLOCK_N=16, num_warps=4,
                                              num_stages=2)  # fmt: skip
    launch = gpu_native.load_kernel(spec, sched)
    dout = torch.randn(b, heads, n, d, generator=gen)
    with address_check() as check:
        dq, dk, dv, dbias = launch(q, k, v, dout, bias, mask, bias_grad=True)
    leaves = [t.double().requires_grad_() for t in (q, k, v, bias)]
    run_attention(spec, *leaves, mask.double()).backward(dout.double())
    for got, leaf in zip((dq, dk, dv, dbias), leaves):
        assert_close(got, leaf.grad, torch.float32)
    assert check.kernels == {"attention_dq", "attention_dkdv"} and check.accesses > 0


# ---- part a of the GPU command: each family x dtype x layout, shrunk ----------------------
def part_a_cases() -> list:
    """The first case of each family and layout: fp16 for NCHW (bnc), bf16 for NHWC (bhnd)."""
    wanted = {"nchw": "float16", "nhwc": "bfloat16", "bnc": "float16", "bhnd": "bfloat16"}
    seen = {}
    for case in gpu_cases.correctness_cases():
        if not case.id.startswith("a"):  # the layer cases (conv1 b2 ...) are not random
            continue
        _, family, dtype, layout = case.id.split()
        if wanted.get(layout) == dtype and (family, layout) not in seen:
            seen[family, layout] = case
    return [pytest.param(case, id=" ".join(key)) for key, case in seen.items()]


def tiny(case):
    """One image, sides of at most 10 (or the least the window needs): the interpreter is slow."""
    if isinstance(case, gpu_cases.AttentionCase):
        return dataclasses.replace(case, images=1)
    need = [(k - 1) * d + 1 - 2 * p for k, d, p in zip(case.kernel, case.dilation, case.padding)]
    size = tuple(max(min(s, 10), n) for s, n in zip(case.size, need))
    return dataclasses.replace(case, batch=1, size=size)


@pytest.mark.parametrize("case", part_a_cases())
def test_part_a_addresses(case) -> None:
    with address_check() as check:
        row = gpu_native.check_case(tiny(case), DEVICES["h200"])
    assert row["status"] == "ok", row
    assert check.accesses > 0 and check.kernels


# ---- a linear with a fused epilogue, through torch.compile -------------------------------
def test_linear_epilogue_addresses() -> None:
    torch.manual_seed(0)
    fc = torch.nn.Linear(13, 21).eval()
    model = torch.nn.Sequential(fc, torch.nn.GELU())
    x = torch.randn(1, 5, 3, 13)
    convcompiler.counters.reset()
    with torch.no_grad(), address_check() as check:
        y = torch.compile(model, backend="im2win")(x)
    with torch.no_grad():
        ref = model.double()(x.double())
    assert_close(y, ref, torch.float32)
    assert convcompiler.counters["launch.linear"] == 1
    assert check.kernels == {"conv_gemm_1x1"} and check.accesses > 0


def test_linear_layer_scale_addresses() -> None:
    """ConvNeXt's fc2 form: tokens -> permute to the image -> * gamma [C, 1, 1] -> + x, 21
    output channels (a partial tile): the layer scale is read at wrapped channel offsets."""

    class Fc2(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(13, 21)
            self.gamma = torch.nn.Parameter(torch.rand(21, 1, 1) + 0.5)

        def forward(self, t, x):
            return x + self.gamma * self.fc(t).permute(0, 3, 1, 2)

    torch.manual_seed(1)
    model = Fc2().eval()
    t, x = torch.randn(1, 5, 3, 13), torch.randn(1, 21, 5, 3)
    convcompiler.counters.reset()
    with torch.no_grad(), address_check() as check:
        y = torch.compile(model, backend="im2win")(t, x)
    with torch.no_grad():
        ref = model.double()(t.double(), x.double())
    assert_close(y, ref, torch.float32)
    assert convcompiler.counters["launch.linear"] == 1
    assert check.kernels == {"conv_gemm_1x1"} and check.accesses > 0


# ---- an MLP block: partial tiles of tokens, input, hidden and output features ---------------
@pytest.mark.parametrize(
    "scale,residual,norm,gated", [(True, True, "affine", False), (False, False, None, True)]
)
def test_mlp_block_addresses(scale, residual, norm, gated) -> None:
    from convcompiler.runtime.reference import run_mlp
    from convcompiler.spec_block import MlpSpec

    gen = torch.Generator().manual_seed(5)
    m, c, h, co = 30, 13, 37, 11  # none a multiple of the 16-wide tiles
    spec = MlpSpec(m, c, h, co, Activation("silu"), True, True, scale, residual, "float32",
                   "cpu", "ieee", norm=norm, gated=gated)
    sched = SPACES["mlp_block"].make(spec, BLOCK_M=16, BLOCK_N=16, BLOCK_H=16, BLOCK_K=16,
                                     num_warps=4, num_stages=2)
    x = torch.randn(m, 2 * c, generator=gen)[:, :c]  # rows with a stride of their own
    operands = (x, torch.randn(h, c, generator=gen), torch.randn(h, generator=gen),
                torch.randn(co, h, generator=gen), torch.randn(co, generator=gen),
                torch.rand(co, generator=gen) if scale else None,
                torch.randn(m, co, generator=gen) if residual else None)
    if norm == "affine":  # the LayerNorm's weight and bias
        operands += (torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen))
    if gated:  # the up projection, after the (absent) norm's vectors
        operands += (None, None, torch.randn(h, c, generator=gen), torch.randn(h, generator=gen))
    launch = gpu_native.load_kernel(spec, sched)
    with address_check() as check:
        y = launch(*operands)
    ref = run_mlp(spec, *[t if t is None else t.double() for t in operands])
    assert_close(y, ref, torch.float32)
    assert check.kernels == {"mlp_block"} and check.accesses > 0


# ---- ConvNeXt's whole block: taps in the halo, pixel and channel tails ---------------------
def test_dw_mlp_block_addresses() -> None:
    """A 5 x 7 image, C = 13 in a 16-wide channel tile, 2 images x 35 pixels in 16-pixel
    tiles (the last partial), hidden 37 in 16-wide chunks: every tap in the 3-pixel halo is
    clamped before it becomes an address, and tails wrap inside their tensors."""
    from convcompiler.runtime.reference import run_mlp
    from convcompiler.spec_block import MlpSpec

    gen = torch.Generator().manual_seed(6)
    n, c, h, w, hid = 2, 13, 5, 7, 37
    spec = MlpSpec(n * h * w, c, hid, c, Activation("gelu"), True, True, True, True, "float32",
                   "cpu", "ieee", norm="affine", channels_first=True, dw_kernel=(7, 7),
                   dw_padding=(3, 3), dw_bias=True, image=(h, w))
    sched = SPACES["dw_mlp_block"].make(spec, BLOCK_M=16, BLOCK_H=16, num_warps=4, num_stages=2)
    x = torch.randn(n, c, h, w + 3, generator=gen)[..., 1:w + 1]  # strided rows
    operands = (x, torch.randn(hid, c, generator=gen) / 4, torch.randn(hid, generator=gen),
                torch.randn(c, hid, generator=gen) / 6, torch.randn(c, generator=gen),
                torch.rand(c, generator=gen) + 0.5, None, torch.rand(c, generator=gen) + 0.5,
                torch.randn(c, generator=gen), None, None,
                torch.randn(c, 1, 7, 7, generator=gen) / 7, torch.randn(c, generator=gen))
    launch = gpu_native.load_kernel(spec, sched)
    with address_check() as check:
        y = launch(*operands)
    ref = run_mlp(spec, *[t if t is None else t.double() for t in operands])
    assert_close(y, ref, torch.float32)
    assert check.kernels == {"dw_mlp_block"} and check.accesses > 0
