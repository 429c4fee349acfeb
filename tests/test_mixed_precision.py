"""Mixed precision as users run it, and the packed-weight cache that once broke it (issue 25).

Under `torch.autocast` a conv's weight reaches the op as a cast copy in one of Inductor's
buffers, which Inductor reuses for the next layer of the same shape: a pack cached by the
tensor's identity served one layer's weight to another. Each model here is compared with
float64 eager, within twice eager autocast's own error.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import FAST, inductor_kernels, kernel_launches, rel_error
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import convcompiler
from convcompiler.bench.gpu_autocast import NETS, AutocastCase, build
from convcompiler.runtime import packing

FLOOR = 1e-3  # the tolerance is never below this


def autocast_run(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, **compile_kwargs):
    """(eager autocast's error, compiled autocast's error, report): both against float64."""
    torch._dynamo.reset()
    convcompiler.counters.reset()
    packing.clear()
    compile_kwargs.setdefault("options", FAST)
    compiled = torch.compile(model, backend="im2win", **compile_kwargs)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        with torch.autocast("cpu", dtype=dtype):
            eager = model(x)
            out = compiled(x)
    assert out.dtype == eager.dtype and out.shape == eager.shape
    return rel_error(eager, ref), rel_error(out, ref), convcompiler.last_report()


def assert_within_eager(eager_err: float, err: float, what: str) -> None:
    tol = max(2 * eager_err, FLOOR)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} (eager autocast {eager_err:.3g})"


# ---- small nets of repeated identical layers -------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("net", NETS)
def test_repeated_identical_layers_under_autocast(net: str, dtype: torch.dtype) -> None:
    model = build(AutocastCase(id=net, variant=net, net=net))
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    x = torch.randn(2, 24, 19, 19)
    eager_err, err, report = autocast_run(model, x, dtype)
    assert_within_eager(eager_err, err, f"{net} {dtype}")
    # an inverted residual's depthwise conv runs inside its project conv (test_dw_prologue.py)
    regions = convs - convcompiler.counters["match.dw_prologue"]
    assert regions == convs - 2 * (net == "inverted_residual"), str(report)
    assert len(report.kernels()) == regions and not report.fallbacks(), str(report)
    assert kernel_launches() == regions, convcompiler.counters
    # every weight the kernels read was computed by the graph (the cast): none went through
    # the per-tensor pack cache
    assert convcompiler.counters["pack.packed"] == 0 and convcompiler.counters["pack.reused"] == 0
    assert not packing.SERVED


def test_the_cast_and_the_pack_of_a_weight_are_one_inductor_kernel(tmp_path) -> None:
    """Under autocast each weight's cast and its im2win pack are fused by Inductor: one
    kernel per conv (the first also casts the input and the bias), none for the pack alone."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
    ).eval()
    options = {"debug_dir": str(tmp_path), **FAST}
    compiled = torch.compile(model, backend="im2win", options=options)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(torch.randn(1, 16, 9, 9))
    kernels = inductor_kernels(tmp_path)
    assert len(kernels) == 2 and all("_to_copy" in k for k in kernels), kernels
    assert kernel_launches() == 2 and convcompiler.counters["pack.packed"] == 0


def test_weight_standardised_convs_in_float32_never_use_the_pack_cache() -> None:
    model = build(AutocastCase(id="std", variant="std", net="standardized"))
    x = torch.randn(2, 24, 17, 13)
    packing.clear()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        compiled = torch.compile(model, backend="im2win", options=FAST)
        for _ in range(2):
            assert rel_error(compiled(x), ref) <= 1e-4
    assert kernel_launches() == 4
    assert not packing.SERVED


# ---- the pack cache: parameters only, each reuse for its own parameter ------------------------
def _twin_convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
    ).eval()


def test_parameters_are_packed_once_and_each_reuse_serves_its_own_parameter() -> None:
    model = _twin_convs()
    weights = {id(model[0].weight), id(model[2].weight)}
    x = torch.randn(2, 16, 15, 11)
    packing.clear()
    compiled = torch.compile(model, backend="im2win", options=FAST)
    with torch.no_grad():
        y = compiled(x)
        assert rel_error(y, copy.deepcopy(model).double()(x.double())) <= 1e-4
        assert convcompiler.counters["pack.packed"] == 2
        assert {s.tensor_id for s in packing.SERVED} == weights
        packing.SERVED.clear()
        compiled(x)  # a second forward: both packs reused, each for the parameter it was made of
        assert convcompiler.counters["pack.packed"] == 2
        assert convcompiler.counters["pack.reused"] == 2
        served = [s.tensor_id for s in packing.SERVED]
        assert all(s.event == "reused" for s in packing.SERVED)
        assert sorted(served) == sorted(weights)  # two reuses, two different parameters
        model[2].weight.mul_(-0.5)  # an in-place change bumps the version: packed again
        y = compiled(x)
    assert convcompiler.counters["pack.packed"] == 3
    assert rel_error(y, copy.deepcopy(model).double()(x.double())) <= 1e-4


def test_a_buffer_weight_is_cached_like_a_parameter() -> None:
    class FrozenConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.randn(8, 8, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.w, padding=1)

    torch.manual_seed(0)
    model = FrozenConv().eval()
    x = torch.randn(1, 8, 9, 7)
    compiled = torch.compile(model, backend="im2win", options=FAST)
    packing.clear()
    ref = F.conv2d(x.double(), model.w.double(), padding=1)
    with torch.no_grad():
        for _ in range(2):
            assert rel_error(compiled(x), ref) <= 1e-4
    assert convcompiler.counters["pack.packed"] == 1 and convcompiler.counters["pack.reused"] == 1
    assert {s.tensor_id for s in packing.SERVED} == {id(model.w)}


def test_a_weight_passed_as_an_input_is_packed_by_the_graph_on_every_call() -> None:
    """A weight that is a graph input but no parameter is not cached: a write that bumps no
    version counter (through NumPy) still reaches the kernel."""

    def conv(x, w):
        return F.relu(F.conv2d(x, w, padding=1))

    torch.manual_seed(0)
    x, w = torch.randn(1, 8, 9, 7), torch.randn(8, 8, 3, 3)
    compiled = torch.compile(conv, backend="im2win")
    with torch.no_grad():
        compiled(x, w)
        np.asarray(w.numpy())[:] = torch.randn(8, 8, 3, 3).numpy()
        version = w._version
        y = compiled(x, w)
    assert w._version == version
    assert rel_error(y, conv(x.double(), w.double())) <= 1e-4
    assert kernel_launches() == 2 and convcompiler.counters["pack.packed"] == 0


# ---- models, as users run them (small inputs, interpreter) ----------------------------------
def _swin() -> nn.Module:
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        num_classes=10,
    )  # fmt: skip


def _vit() -> nn.Module:
    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero
    return vit


def _convnext() -> nn.Module:
    """convnext_tiny's blocks (7x7 depthwise, LayerNorm, MLP, layer scale) at a quarter of its
    widths and depths: the full model takes minutes in the interpreter."""
    stages = [CNBlockConfig(24, 48, 2), CNBlockConfig(48, 96, 2), CNBlockConfig(96, None, 1)]
    return ConvNeXt(stages, num_classes=10)


MODELS = {
    "efficientnet_b0": torchvision.models.efficientnet_b0,
    "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
    "resnet50": torchvision.models.resnet50,
    "convnext": _convnext,
    "swin": _swin,
    "vit": _vit,
}
# Eager float16 autocast on CPU is itself off by about 1.0 on efficientnet_b0 and
# mobilenet_v3_large: nothing to compare against there. resnet50 in float16 matches too
# (0.98e-3 against eager's 1.14e-3) but is left to the bfloat16 run, for the suite's time.
FP16 = ("convnext", "swin", "vit")
CASES = [(name, torch.bfloat16) for name in MODELS] + [(name, torch.float16) for name in FP16]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES]
)  # fmt: skip
def test_models_under_autocast_match_float64(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(1, 3, 32, 32)
    eager_err, err, report = autocast_run(model, x, dtype)
    assert_within_eager(eager_err, err, f"{name} {dtype}")
    assert report.kernels(), str(report)
    assert kernel_launches() >= len(report.kernels()), convcompiler.counters
    assert not packing.SERVED  # under autocast every weight is the graph's cast
