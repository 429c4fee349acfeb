"""Norms around a single conv or linear that no epilogue could take before (issue 22's
family 4, and a transformer's LayerNorm before a linear):

- pre-activation, `BN -> act -> conv` (DenseNet, DPN, PreAct ResNet): the conv's kernel
  (gemm_1x1 for a 1x1 conv, im2win_implicit's tap order for a kxk one) normalises each input
  tile as it loads it (spec.prologue), so the normalised copy is never written;
- `conv -> act -> BN` (ConvMixer, RepViT): the BN is applied after the activation in the
  conv's epilogue (spec.epilogue.bn_after_act);
- `LayerNorm -> linear` when the linear alone reads the norm (a transformer's qkv or fc1
  linear that runs per layer): gemm_1x1 computes each row's statistics and normalises the
  tokens as it loads them (spec.prologue.ln), so the normalised tokens are never written.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from address_check import address_check
from helpers import (
    FAST,
    assert_close,
    assert_nan_and_close,
    compiled_and_float64,
    float64_copy,
    gradients_match_float64,
    kernel_launches,
    lowered_ops,
    run_compiled,
)

import convcompiler
from convcompiler.bench import gpu_native
from convcompiler.codegen import SPACES
from convcompiler.frontend.kernels import conv_spec_of
from convcompiler.runtime.reference import run_aten
from convcompiler.spec import Activation, Prologue

PRE = "bn+relu(x)"  # how the report's spec shows the prologue


def _bn(c: int, affine: bool = True) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, affine=affine)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return bn


class DenseLayer(nn.Module):
    """torchvision's DenseNet layer: conv3x3(relu(bn2(conv1x1(relu(bn1(cat(a, b)))))))."""

    def __init__(self, c: int = 21, k: int = 13, act: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1, self.act = _bn(c), act if act is not None else nn.ReLU()
        self.conv1 = nn.Conv2d(c, k, 1, bias=False)
        self.bn2, self.conv2 = _bn(k), nn.Conv2d(k, 5, 3, padding=1, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.act(self.bn1(torch.cat([a, b], 1))))
        return self.conv2(torch.relu(self.bn2(y)))


def _inputs(dtype: torch.dtype, n: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(n, 8, 5, 7, generator=gen).to(dtype),
            torch.randn(n, 13, 5, 7, generator=gen).to(dtype)]


def _prologue_region(report) -> object:
    """The one region whose spec shows a prologue, "...(x)"."""
    (region,) = [r for r in report if "(x)" in r.spec]
    return region


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_densenet_s_bn_relu_runs_inside_the_1x1_conv(dtype, tmp_path) -> None:
    torch.manual_seed(0)
    model = DenseLayer().eval().to(dtype)
    a, b = _inputs(dtype)
    if dtype == torch.float16:
        a, b = (t.to(memory_format=torch.channels_last) for t in (a, b))
    out, ref, report = compiled_and_float64(model, [a, b], {"debug_dir": str(tmp_path)})
    assert_close(out, ref, dtype)
    first = _prologue_region(report)
    assert PRE in first.spec and first.schedule == "gemm_1x1", str(report)
    assert first.fallback_reason is None and not report.fallbacks(), str(report)
    assert kernel_launches() == 2  # the two convs; the cat is Inductor's
    ops = lowered_ops(tmp_path)
    assert ops["_native_batch_norm_legit_no_training"] == 0 and ops["relu"] == 0, ops


@pytest.mark.parametrize("act", [nn.Hardswish(), nn.Identity(), nn.SiLU()])
def test_other_prologues(act) -> None:
    """No activation, and other activations. (A BN without affine reaches the post-grad
    graph decomposed, so Inductor fuses it; the address test runs that prologue.)"""
    torch.manual_seed(1)
    model = DenseLayer(act=act).eval()
    a, b = _inputs(torch.float32)
    out, ref, report = compiled_and_float64(model, [a, b])
    assert_close(out, ref, torch.float32)
    region = _prologue_region(report)
    name = Prologue(bn="affine", act=None if isinstance(act, nn.Identity) else _act(act)).name()
    assert f"{name}(x)" in region.spec and region.schedule == "gemm_1x1", str(report)


def _act(module: nn.Module) -> Activation:
    return Activation({nn.Hardswish: "hardswish", nn.SiLU: "silu"}[type(module)])


def test_nan_and_inf_reach_only_their_pixel() -> None:
    """-inf normalises to -inf and ReLU makes it 0 (finite everywhere, as eager); NaN stays
    in its own pixel's outputs."""
    torch.manual_seed(2)
    model = DenseLayer().eval()
    model.conv2 = nn.Identity()
    a, b = _inputs(torch.float32)
    a[0, 1, 2, 3], a[1, 4, 0, 0], b[1, 2, 4, 6] = float("nan"), float("-inf"), float("inf")
    with torch.no_grad():
        ref = float64_copy(model)(a.double(), b.double())
        out, _ = run_compiled(model, [a, b], options=FAST)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert out[0, :, 2, 3].isnan().all() and out.isnan().sum() == 13
    finite = ref.isfinite()
    assert_close(out[finite], ref[finite], torch.float32)


def test_dynamic_batch_and_an_empty_one() -> None:
    torch.manual_seed(4)
    model = DenseLayer().eval()
    compiled = torch.compile(model, backend="im2win", options=FAST, dynamic=True)
    for n in (3, 1):
        a, b = _inputs(torch.float32, n)
        with torch.no_grad():
            ref = float64_copy(model)(a.double(), b.double())
            convcompiler.counters.reset()
            out = compiled(a, b)
        assert_close(out, ref, torch.float32)
        assert kernel_launches() == 2
    assert PRE in _prologue_region(convcompiler.last_report()).spec
    a, b = _inputs(torch.float32, 0)
    with torch.no_grad():
        out, report = run_compiled(model, [a, b], options=FAST)
    assert out.shape == (0, 5, 5, 7)
    reasons = [r.fallback_reason for r in report if r.spec.startswith("[0,21")]
    assert reasons and all(r.startswith("zero-size") for r in reasons), str(report)


def test_option_blocks_off_leaves_the_bn_to_inductor() -> None:
    model = DenseLayer().eval()
    a, b = _inputs(torch.float32)
    out, ref, report = compiled_and_float64(model, [a, b], {"blocks": False})
    assert_close(out, ref, torch.float32)
    (bn,) = report.fallbacks()
    assert bn.kind == "batch_norm" and "cannot normalise its input" in bn.fallback_reason
    assert not any(PRE in r.spec for r in report)


def test_a_small_torchvision_densenet() -> None:
    """torchvision's own DenseNet code (two dense blocks, a transition): every BN before a
    conv runs inside it; only the last BN (-> ReLU -> pool) is Inductor's, with its reason."""
    torch.manual_seed(5)
    model = torchvision.models.DenseNet(
        growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=7
    ).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 32, 32)
    out, ref, report = compiled_and_float64(model, [x])
    assert_close(out, ref, torch.float32)
    pre = [r for r in report if PRE in r.spec]
    assert len(pre) == 5 and all(r.schedule == "gemm_1x1" for r in pre), str(report)
    (last,) = report.fallbacks()
    assert last.kind == "batch_norm" and "nor feeding one" in last.fallback_reason


@pytest.mark.parametrize("tiling, bn", [("image", "affine"), ("batch", "plain")])
def test_prologue_addresses(tiling, bn) -> None:
    """Every lane of the BN parameters' loads stays inside them, in image and batch tiles,
    with rows and channels past the last (odd sizes); masked channels add nothing even
    where the normalised value of 0 is not 0."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 21, 5, 3, generator=gen)
    if tiling == "batch":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(13, 21, 1, 1, generator=gen)
    params = [torch.randn(21, generator=gen), torch.randn(21, generator=gen) + 3,
              torch.randn(21, generator=gen), torch.rand(21, generator=gen) + 0.5]
    act = Activation("silu") if bn == "affine" else None
    spec = dataclasses.replace(conv_spec_of(x, w), prologue=Prologue(bn=bn, act=act))
    if bn == "plain":
        params[:2] = [None, None]
    schedule = SPACES["gemm_1x1"].make(spec, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8,
                                       M_TILES=tiling, num_warps=4, num_stages=2)
    launch = gpu_native.load_kernel(spec, schedule)
    with address_check() as check:
        y = launch(x, w, None, None, None, None, None, None, None, None, *params)
    wide = [t.double() if t is not None else None for t in params]
    assert_close(y, run_aten(spec, x.double(), w.double(), None, *[None] * 4, None, None, None,
                             *wide), torch.float32)
    assert check.kernels == {"conv_gemm_1x1"} and check.accesses > 0


class PreActBlock(nn.Module):
    """PreAct ResNet's basic block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + x."""

    def __init__(self, c: int = 20) -> None:
        super().__init__()
        self.bn1, self.bn2 = _bn(c), _bn(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x)))))) + x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preact_s_bn_relu_runs_inside_the_3x3_conv(dtype) -> None:
    """The zero padding stays zero (relu(bn(0)) is not), and NaN stays in its windows."""
    torch.manual_seed(8)
    model = PreActBlock().eval().to(dtype)
    x = torch.randn(2, 20, 9, 7).to(dtype)
    x[0, 3, 0, 0] = float("nan")
    out, ref, report = compiled_and_float64(model, [x])
    assert_nan_and_close(out, ref, dtype)
    assert out.isnan().any()
    region = _prologue_region(report)
    assert "3x3 p1x1 bn+relu(x)" in region.spec and region.schedule == "im2win_implicit"
    assert kernel_launches() == 2 and not report.fallbacks(), str(report)


def test_implicit_prologue_addresses() -> None:
    """im2win_implicit with a prologue: every lane in bounds (halo rows, channels past the
    last), padding zero after the BN."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 21, 6, 5, generator=gen)
    w = torch.randn(11, 21, 3, 3, generator=gen)
    params = [torch.randn(21, generator=gen), torch.randn(21, generator=gen) + 3,
              torch.randn(21, generator=gen), torch.rand(21, generator=gen) + 0.5]
    spec = dataclasses.replace(conv_spec_of(x, w, padding=1),
                               prologue=Prologue(bn="affine", act=Activation("relu")))
    schedule = SPACES["im2win_implicit"].make(
        spec, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, M_TILES="batch", REDUCTION="tap",
        num_warps=4, num_stages=2)
    launch = gpu_native.load_kernel(spec, schedule)
    with address_check() as check:
        y = launch(x, w, None, None, None, None, None, None, None, None, *params)
    ref = run_aten(spec, x.double(), w.double(), None, *[None] * 7, *[t.double() for t in params])
    assert_close(y, ref, torch.float32)
    assert check.kernels == {"conv_im2win_implicit"} and check.accesses > 0


def _convmixer(c: int = 12) -> nn.Module:
    class Residual(nn.Module):
        def __init__(self, f: nn.Module) -> None:
            super().__init__()
            self.f = f

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.f(x) + x

    return nn.Sequential(
        nn.Conv2d(3, c, 3, stride=2), nn.GELU(), _bn(c),
        Residual(nn.Sequential(nn.Conv2d(c, c, 5, groups=c, padding=2), nn.GELU(), _bn(c))),
        nn.Conv2d(c, c, 1), nn.GELU(), _bn(c),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_convmixer_s_conv_act_bn_is_one_kernel_each(dtype) -> None:
    torch.manual_seed(7)
    model = _convmixer().eval().to(dtype)
    x = torch.randn(2, 3, 17, 15).to(dtype)
    x[1, 0, 3, 3] = float("nan")
    out, ref, report = compiled_and_float64(model, [x])
    assert_nan_and_close(out, ref, dtype)
    assert out.isnan().any()
    names = sorted(r.spec.split(" +")[-1].split()[0] for r in report)
    assert names == ["gelu+bn", "gelu+bn", "gelu+bn+add"], str(report)
    assert kernel_launches() == 3 and not report.fallbacks()


def test_frozen_bn_trains_through_the_prologue() -> None:
    """Fine-tuning with frozen (eval-mode) BNs: the backward recomputes BN -> ReLU from the
    BN's input (recompute.tag_prologues), so the forward's conv still normalises as it loads,
    saves less than the layers one by one, and every gradient matches float64 eager."""
    from test_block_mlp import saved_bytes

    saved = {}
    for blocks in (True, False):
        torch.manual_seed(11)
        model = DenseLayer().eval()
        reference = float64_copy(model)
        a, b = (t.requires_grad_() for t in _inputs(torch.float32))
        compiled = torch.compile(model, backend="im2win", options={**FAST, "blocks": blocks})
        convcompiler.counters.reset()
        out, saved[blocks] = saved_bytes(compiled, model, a, b)
        out.square().sum().backward()
        a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
        reference(a64, b64).square().sum().backward()
        assert_close(a.grad, a64.grad, torch.float32, "a grad")
        assert_close(b.grad, b64.grad, torch.float32, "b grad")
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert_close(p.grad, q.grad, torch.float32, f"{name} grad")
        forward = [r for r in convcompiler.last_report() if r.stage == "forward"]
        assert any(PRE in r.spec for r in forward) == blocks, str(convcompiler.last_report())
        torch._dynamo.reset()
    assert saved[True] < saved[False], saved


# ---- LayerNorm -> linear ------------------------------------------------------------------
class NormLinear(nn.Module):
    """ViT's attention input and a lone fc1: qkv(norm1(x)) and gelu(fc1(norm2(x)))."""

    def __init__(self, c: int = 24, affine: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=affine)
        self.norm2 = nn.LayerNorm(c, eps=1e-6, elementwise_affine=affine)
        self.qkv, self.fc1 = nn.Linear(c, 3 * c), nn.Linear(c, 40)
        if affine:
            with torch.no_grad():
                for norm in (self.norm1, self.norm2):
                    norm.weight.uniform_(0.5, 1.5)
                    norm.bias.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.qkv(self.norm1(x)), F.gelu(self.fc1(self.norm2(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer_norm_runs_inside_the_linear_it_feeds(dtype, tmp_path) -> None:
    torch.manual_seed(12)
    model = NormLinear().eval().to(dtype)
    x = (torch.randn(2, 13, 24) * 2 + 0.5).to(dtype)  # a mean and a scale the norm removes
    out, ref, report = compiled_and_float64(model, [x], {"debug_dir": str(tmp_path)})
    for y, r in zip(out, ref):
        assert_close(y, r, dtype)
    linears = [r for r in report if r.kind == "linear"]
    assert len(linears) == 2 and all("1x1 ln(x)" in r.spec for r in linears), str(report)
    assert kernel_launches() == 2 and not report.fallbacks()
    assert lowered_ops(tmp_path)["var_mean"] == 0  # no norm left for Inductor


def test_layer_norm_without_affine_and_option_blocks_off() -> None:
    torch.manual_seed(13)
    model = NormLinear(affine=False).eval()
    x = torch.randn(3, 7, 24)
    out, ref, report = compiled_and_float64(model, [x])
    for y, r in zip(out, ref):
        assert_close(y, r, torch.float32)
    assert sum("ln(x)" in r.spec for r in report) == 2, str(report)
    out, ref, report = compiled_and_float64(model, [x], {"blocks": False})
    for y, r in zip(out, ref):
        assert_close(y, r, torch.float32)
    assert not any("ln(x)" in r.spec for r in report)


def test_a_token_s_nan_stays_in_its_row_and_dynamic_tokens() -> None:
    torch.manual_seed(14)
    model = NormLinear().eval()
    x = torch.randn(2, 9, 24)
    x[1, 4, 7] = float("nan")
    out, ref, _ = compiled_and_float64(model, [x])
    for y, r in zip(out, ref):
        assert_nan_and_close(y, r, torch.float32)
        assert y[1, 4].isnan().all()
    compiled = torch.compile(model, backend="im2win", options=FAST, dynamic=True)
    for n in (5, 11):
        x = torch.randn(2, n, 24)
        with torch.no_grad():
            for y, r in zip(compiled(x), float64_copy(model)(x.double())):
                assert_close(y, r, torch.float32)
    assert sum("ln(x)" in r.spec for r in convcompiler.last_report()) == 2


def test_a_trained_layer_norm_stays_outside() -> None:
    """In training the linear's weight gradient needs the normalised tokens, so they are
    saved and the norm stays Inductor's; gradients match."""
    torch.manual_seed(15)
    model = NormLinear().train()
    gradients_match_float64(model, torch.randn(2, 5, 24))
    assert not any("ln(x)" in r.spec for r in convcompiler.last_report())


@pytest.mark.parametrize("tiling", ["image", "batch"])
def test_layer_norm_prologue_addresses(tiling) -> None:
    """The row statistics' loads and the normalised tiles stay inside x and the vectors
    (pixels and channels past the last); their result is F.layer_norm's over the channels."""
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(3, 21, 5, 3, generator=gen) * 3 + 1
    if tiling == "batch":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(13, 21, 1, 1, generator=gen)
    vectors = [torch.randn(21, generator=gen), torch.randn(21, generator=gen)]
    spec = dataclasses.replace(conv_spec_of(x, w), prologue=Prologue(ln="affine", eps=1e-6))
    schedule = SPACES["gemm_1x1"].make(spec, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8,
                                       M_TILES=tiling, num_warps=4, num_stages=2)
    launch = gpu_native.load_kernel(spec, schedule)
    with address_check() as check:
        y = launch(x, w, None, None, None, None, None, None, None, None, *vectors)
    ref = run_aten(spec, x.double(), w.double(), None, *[None] * 7,
                   *[v.double() for v in vectors])
    assert_close(y, ref, torch.float32)
    assert check.kernels == {"conv_gemm_1x1"} and check.accesses > 0


def test_vit_s_qkv_reads_its_layer_norm_through_the_batch_first_transpose() -> None:
    """torchvision's ViT encoder block: MultiheadAttention(batch_first) transposes the norm's
    output and copies it before the qkv projection; the linear reads the norm's input
    through that permutation instead, and the copy and the norm are never made."""
    from torchvision.models.vision_transformer import EncoderBlock

    torch.manual_seed(17)
    model = EncoderBlock(2, 16, 32, 0.0, 0.0).eval()
    with torch.no_grad():
        nn.init.uniform_(model.ln_1.weight, 0.5, 1.5)
        nn.init.uniform_(model.ln_1.bias, -0.5, 0.5)
    x = torch.randn(2, 5, 16) * 2 + 1
    out, ref, report = compiled_and_float64(model, [x])
    assert_close(out, ref, torch.float32)
    # the qkv projection (16 -> 48); torch 2.11's graph also leaves the MLP per layer
    (qkv,) = [r for r in report if r.kind == "linear" and "-> [5,48,1,2]" in r.spec]
    assert "1x1 ln(x) float32" in qkv.spec and qkv.schedule == "gemm_1x1", str(report)
    assert "_strided_to_nhwc_pre_ln_" in qkv.kernel_path  # the permuted tokens, in place
