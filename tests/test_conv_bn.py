"""ConvBN: BN folded into the conv kernel (deploy), Tune mode, train-mode BN, fused epilogues."""

from __future__ import annotations

import copy
import random
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from helpers import (
    FAST,
    GRADIENTS,
    assert_close,
    float64_copy,
    kernel_launches,
    lowered_ops,
    rel_error,
)
from torchvision.ops import SqueezeExcitation

import convcompiler
from convcompiler.bench.transfer import saved_bytes
from convcompiler.frontend.kernels import conv_kernel, conv_spec_of
from convcompiler.runtime.reference import run_aten
from convcompiler.spec import Activation, Epilogue

ACTS = [
    Activation("relu"),
    Activation("hardtanh", (0.0, 6.0)),
    Activation("silu"),
    Activation("gelu"),
    Activation("gelu_tanh"),
    Activation("hardswish"),
    Activation("leaky_relu", (0.1,)),
    Activation("sigmoid"),
    Activation("hardsigmoid"),
]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding them matters."""
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            n = mod.num_features
            mod.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
            mod.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            if mod.affine:
                mod.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.data.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model


# ---- kernel level: every epilogue, through Triton's interpreter ------------------------------
@pytest.mark.parametrize("index", range(48))
def test_random_fused_epilogue(index: int) -> None:
    rng = random.Random(7000 + index)
    dtype = rng.choice((torch.float32, torch.float32, torch.float16, torch.bfloat16))
    ndim = rng.choice((1, 2, 2))
    groups = rng.choice((1, 1, 2))
    c, k = groups * rng.randint(1, 6), groups * rng.randint(1, 7)
    ks = rng.choice((1, 3, 5))
    gen = torch.Generator().manual_seed(index)
    shape = (rng.randint(1, 2), c) + (
        (rng.randint(ks, 13), rng.randint(ks, 12)) if ndim == 2 else (rng.randint(ks, 30),)
    )
    x = torch.randn(shape, generator=gen).to(dtype)
    w = torch.randn((k, c // groups) + (ks,) * ndim, generator=gen).to(dtype)
    if ndim == 2 and rng.random() < 0.3:
        x = x.to(memory_format=torch.channels_last)
    b = torch.randn(k, generator=gen).to(dtype) if rng.random() < 0.5 else None
    bn = rng.choice((None, "affine", "plain"))
    epilogue = Epilogue(
        bn=bn,
        bn_eps=rng.choice((1e-5, 1e-3)),
        act=rng.choice(ACTS + [None]),
        residual=rng.random() < 0.5,
        post_act=rng.choice(ACTS + [None, None]),
    )
    if not epilogue.residual:
        epilogue = Epilogue(bn=epilogue.bn, bn_eps=epilogue.bn_eps, act=epilogue.act)
    stats = (
        [torch.rand(k, generator=gen) * 0.4 - 0.2, torch.rand(k, generator=gen) + 0.5]
        if bn
        else [None, None]
    )
    affine = (
        [torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen) * 0.2]
        if bn == "affine"
        else [None, None]
    )
    args = (1, ks // 2, 1, groups)
    out_shape = (
        F.conv1d(x.float(), w.float(), None, *args).shape
        if ndim == 1
        else F.conv2d(x.float(), w.float(), None, *args).shape
    )
    residual = torch.randn(out_shape, generator=gen).to(dtype) if epilogue.residual else None
    spec = conv_spec_of(x, w, b, *args, epilogue=epilogue)
    # cycle the schedules; one that cannot run the spec is replaced by the model's choice
    name = ("im2win_implicit", "im2win_band", "gemm_1x1", "direct_depthwise")[index % 4]
    call = conv_kernel(x, w, b, *args, schedule=name, epilogue=epilogue)
    operands = (x, w, b, *affine, *stats, residual)
    y = call(*operands)
    ref = run_aten(spec, *[t.double() if t is not None else None for t in operands])
    assert_close(y, ref, dtype, f"{spec.describe()} via {call.path.name}")


# ---- deploy: inference with BN folded into the conv kernel ----------------------------------
@pytest.mark.slow
def test_resnet50_deploy_folds_every_bn_and_every_residual(tmp_path) -> None:
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet50().eval())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        options = {"debug_dir": str(tmp_path), **FAST}
        out = torch.compile(model, backend="im2win", options=options)(x)
        ref = float64_copy(model)(x.double())
    assert_close(out, ref, torch.float32)
    report = convcompiler.last_report()
    assert len(report) == 53 and all(r.kind == "conv_bn" and r.mode == "deploy" for r in report)
    assert all(r.epilogue.startswith("bn") and r.fallback_reason is None for r in report)
    epilogues = Counter(r.epilogue for r in report)
    assert epilogues["bn+add+relu"] == 16, epilogues
    assert convcompiler.counters["launch.conv_bn"] == 53
    ops = lowered_ops(tmp_path)
    for op in ("_native_batch_norm_legit_no_training", "add", "relu", "convolution"):
        assert ops[op] == 0, ops


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, act",
    [("mobilenet_v2", "relu6"), ("mobilenet_v3_small", "hardswish"), ("efficientnet_b0", "silu")],
)
def test_mobile_nets_fuse_every_conv_bn_chain(tmp_path, name: str, act: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)().eval())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        options = {"debug_dir": str(tmp_path), **FAST}
        out = torch.compile(model, backend="im2win", options=options)(x)
        ref = float64_copy(model)(x.double())
    assert_close(out, ref, torch.float32)
    report = convcompiler.last_report()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    conv_bn = [r for r in report if r.kind == "conv_bn"]
    # an inverted residual without SE runs its depthwise conv and BN inside the project conv
    # (test_dw_prologue.py): that region holds two BNs
    fused = [r for r in conv_bn if r.schedule == "dw_gemm"]
    n_se = sum(isinstance(m, SqueezeExcitation) for m in model.modules())
    assert len(fused) == convcompiler.counters["match.dw_prologue"]
    assert len(fused) == {"mobilenet_v2": 17, "mobilenet_v3_small": 2}.get(name, 0), str(report)
    assert len(conv_bn) + len(fused) == n_bn and all(r.fallback_reason is None for r in report)
    assert any(f"bn+{act}" == r.epilogue for r in conv_bn)
    assert lowered_ops(tmp_path)["_native_batch_norm_legit_no_training"] == 0
    assert kernel_launches() == len(report)
    # every squeeze-and-excitation pools its depthwise conv's tiles (test_se_scale.py)
    assert sum("+pool sums" in r.spec for r in report) == n_se
    assert sum("x*scale[n,c]" in r.spec for r in report) == n_se


def test_patterns_no_bias_no_affine_eps_and_conv1d() -> None:
    torch.manual_seed(0)
    model = randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, bias=False),
            nn.BatchNorm2d(8, affine=False, eps=1e-3),
            nn.ReLU6(),
            nn.Conv2d(8, 6, 3, padding=1),
            nn.BatchNorm2d(6, eps=0.01),
            nn.LeakyReLU(0.2),
        ).eval()
    )
    x = torch.randn(2, 3, 11, 10)
    with torch.no_grad():
        out = torch.compile(model, backend="im2win", options=FAST)(x)
    assert_close(out, float64_copy(model)(x.double()), torch.float32)
    report = convcompiler.last_report()
    assert [r.epilogue for r in report] == ["bn+relu6", "bn+leaky_relu"]
    torch._dynamo.reset()
    model1d = randomize_bn(
        nn.Sequential(nn.Conv1d(4, 6, 5, padding=2), nn.BatchNorm1d(6), nn.SiLU()).eval()
    )
    x1 = torch.randn(3, 4, 29)
    with torch.no_grad():
        out = torch.compile(model1d, backend="im2win")(x1)
    assert_close(out, float64_copy(model1d)(x1.double()), torch.float32)
    assert [r.epilogue for r in convcompiler.last_report()] == ["bn+silu"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_inference(dtype) -> None:
    torch.manual_seed(0)
    model = randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 8, 1),
            nn.BatchNorm2d(8),
        ).eval()
    )
    x = torch.randn(2, 3, 12, 11)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = torch.compile(model, backend="im2win", options=FAST)(x)
    assert out.dtype == dtype
    assert_close(out, float64_copy(model)(x.double()), dtype)
    report = convcompiler.last_report()
    assert [r.epilogue for r in report] == ["bn+relu", "bn"] and kernel_launches() == 2


@pytest.mark.parametrize("blocks", [True, False])
def test_bn_before_conv(blocks) -> None:
    """DenseNet's order: BN -> ReLU -> conv. The conv normalises its input as it loads it
    (test_bn_prologue.py); with blocks=False the BN falls back to Inductor, with its reason."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 5, 3)).eval())
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        out = torch.compile(model, backend="im2win", options={**FAST, "blocks": blocks})(x)
    assert_close(out, float64_copy(model)(x.double()), torch.float32)
    report = convcompiler.last_report()
    kinds = {r.kind: r for r in report}
    assert kinds["conv"].fallback_reason is None
    assert ("bn+relu(x)" in kinds["conv"].spec) == blocks
    if not blocks:
        assert "cannot normalise its input" in kinds["batch_norm"].fallback_reason
    else:
        assert "batch_norm" not in kinds


# ---- Tune mode: transfer learning with frozen BN --------------------------------------------
@pytest.mark.slow
def test_tune_mode_resnet50_gradients_match_eager() -> None:
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet50().eval())
    reference = float64_copy(model)
    x = torch.randn(2, 3, 64, 64)
    # backward="aten": the conv backward's own kernels are checked on resnets in
    # test_conv_backward.py (and with Tune mode on a small net in test_recompute.py); here
    # the interpreter would spend minutes on 106 backward kernels that test nothing new.
    # host="aten": Tune mode is a rewrite before the host compiler sees the graph, which
    # test_recompute.py compiles through Inductor; a cold C++ compile here adds nothing
    options = {"backward": "aten", "host": "aten", **FAST}
    torch.compile(model, backend="im2win", options=options)(x).square().sum().backward()
    reference(x.double()).square().sum().backward()
    report = convcompiler.last_report()
    assert all(r.mode == "tune" and r.kind == "conv_bn" for r in report)
    forward = [r for r in report if r.stage == "forward"]
    assert len(forward) == 53 and Counter(r.epilogue for r in forward)["bn+add+relu"] == 16
    # the backward recomputes the 7x7 stem (conv + relu + max-pool) instead of saving it
    (stem,) = [r for r in report if r.stage == "backward" and r.mode not in GRADIENTS]
    assert "7x7" in stem.spec and stem.fallback_reason is None and len(report.recomputed) == 1
    assert convcompiler.counters["launch.conv_bn"] == 54
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"grad of {name}")
    for mod, ref_mod in zip(model.modules(), reference.modules()):
        if isinstance(mod, nn.BatchNorm2d):  # eval BN never updates its statistics
            assert torch.equal(mod.running_mean.double(), ref_mod.running_mean)


@pytest.mark.slow
def test_tune_mode_saves_no_more_than_eager_at_small_size() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(2, 3, 64, 64)
    eager = saved_bytes(lambda: model(x).sum())
    compiled = torch.compile(model, backend="im2win", options={"cpu": "aten"})
    tuned = saved_bytes(lambda: compiled(x).sum())
    assert tuned <= eager, (tuned / 2**20, eager / 2**20)
    assert all(r.mode == "tune" for r in convcompiler.last_report())


def test_tune_mode_does_not_save_the_folded_weight(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()).eval()
    compiled = torch.compile(
        model, backend="im2win", options={"cpu": "aten", "debug_dir": str(tmp_path)}
    )
    compiled(torch.randn(2, 3, 8, 8)).sum().backward()
    (compile_dir,) = list(tmp_path.iterdir())
    (lowered,) = (compile_dir / "forward").glob("*_lowered.py")
    forward = lowered.read_text()
    returned = forward.split("return (")[-1]
    assert "mul" not in returned, returned  # W * c is recomputed in backward, not saved


# ---- train-mode BN ---------------------------------------------------------------------------
@pytest.mark.slow
def test_train_mode_resnet18_three_steps_match_eager() -> None:
    """Parameters, running stats and num_batches_tracked after each of 3 SGD steps.

    Against float64 eager, as close as eager fp32 is (or within 1e-4). ReLU and max-pool make
    the fp32 gradients of an untrained net jump when a value within rounding of a threshold
    (a ReLU's 0, a near-tie in a pooling window) rounds the other way, and eager fp32 is not
    immune: at 8x3x64x64 its conv1 gradient is 3% off float64 at the first step. Inductor
    computes train-mode BN with its own formula, so the compiled model's roundings differ
    from eager's and so do its jumps (at that size, 3e-3 on layer1.0.bn1.bias; the same
    graph on the ATen host: 1e-6). Such near-ties grow with the number of pooling windows
    and activations; this input (4x3x40x40) has none for eager, float64 or the compiled
    model, so every difference left is a real one."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    eager32, eager64 = copy.deepcopy(model), float64_copy(model)
    nets = {
        # (the backward's kernels: see test_conv_backward.py's resnet18 SGD step)
        "compiled": torch.compile(model, backend="im2win", options={"backward": "aten", **FAST}),
        "eager32": eager32,
        "eager64": eager64,
    }
    params = {"compiled": model, "eager32": eager32, "eager64": eager64}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in params.items()}
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(4, 3, 40, 40, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        for key, net in nets.items():
            opts[key].zero_grad()
            F.cross_entropy(net(x.double() if key == "eager64" else x), y).backward()
            opts[key].step()
        named = [dict(params[k].named_parameters()) | dict(params[k].named_buffers()) for k in nets]
        for name, ref in named[2].items():
            ours, eager = named[0][name], named[1][name]
            if name.endswith("num_batches_tracked"):
                assert int(ours) == int(eager) == int(ref) == step + 1
                continue
            ours_err, eager_err = rel_error(ours, ref), rel_error(eager, ref)
            assert ours_err <= max(1e-4, 2 * eager_err), (step, name, ours_err, eager_err)
    report = convcompiler.last_report()
    assert all(r.kind == "conv_bn" and r.mode == "train" for r in report if r.stage == "forward")
    # recomputed for BN's backward
    (stem,) = [r for r in report if r.stage == "backward" and r.mode not in GRADIENTS]
    assert stem.kind == "conv_bn" and stem.mode == "train" and "7x7" in stem.spec
    assert stem.fallback_reason is None
    assert convcompiler.counters["launch.conv_bn"] > 0
