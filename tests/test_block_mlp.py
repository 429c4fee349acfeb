"""Block fusion, the transformer MLP: linear -> activation -> linear [-> layer scale]
[-> + residual] runs as one `mlp_block` kernel whose hidden never goes to memory
(passes/match_block.py, codegen/mlp_block.py), where the cost model prefers it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import (
    FAST,
    assert_close,
    compiled_and_float64,
    float64_copy,
    gradients_match_float64,
    kernel_launches,
    lowered_ops,
)

import convcompiler
from convcompiler.codegen import SPACES, render_region
from convcompiler.devices import lookup
from convcompiler.runtime.loader import load_source
from convcompiler.selection.cost import predict
from convcompiler.spec import Activation, spec_from_json, spec_to_json
from convcompiler.spec_block import MlpSpec


class Mlp(nn.Module):
    """x [+] [gamma *] fc2(act(fc1([norm](x)))) on [..., C] tokens (Swin's and ViT's MLP with
    its LayerNorm, ConvNeXt's with its layer scale); `norm`: None, "affine" or "plain"."""

    def __init__(self, c=13, hidden=37, out=None, act=F.gelu, bias=True, scale=False,
                 residual=True, norm=None) -> None:
        super().__init__()
        out = c if out is None else out
        self.norm = None
        if norm is not None:
            self.norm = nn.LayerNorm(c, eps=1e-6, elementwise_affine=norm == "affine")
            if norm == "affine":  # away from the initial ones and zeros
                nn.init.uniform_(self.norm.weight, 0.5, 1.5)
                nn.init.uniform_(self.norm.bias, -0.5, 0.5)
        self.fc1, self.fc2 = nn.Linear(c, hidden, bias=bias), nn.Linear(hidden, out, bias=bias)
        self.act, self.residual = act, residual
        self.gamma = nn.Parameter(torch.rand(out) + 0.5) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(x if self.norm is None else self.norm(x))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + y if self.residual else y


def blocks(report) -> list:
    return [r for r in report if r.kind == "mlp_block"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mlp_runs_as_one_kernel(dtype, tmp_path) -> None:
    """Swin's MLP half-block with a layer scale: x + gamma * fc2(gelu(fc1(norm(x))))."""
    torch.manual_seed(0)
    model = Mlp(scale=True, norm="affine").eval().to(dtype)
    x = (torch.randn(2, 5, 3, 13) * 2 + 3).to(dtype)  # rows with a mean to take out
    out, ref, report = compiled_and_float64(model, [x], {"debug_dir": str(tmp_path)})
    assert_close(out, ref, dtype)
    (row,) = blocks(report)
    assert row.schedule == "mlp_block" and row.fallback_reason is None, str(report)
    name = str(dtype)[6:]
    layers = "layer_norm -> 13 -> 37 gelu -> 13 +scale+add"
    assert row.spec == f"mlp [M=30] {layers} {name} (hidden on chip)"
    assert [r.kind for r in report] == ["mlp_block"], str(report)  # no per-layer regions
    assert "hidden on chip) against" in row.why and "MiB layer by layer" in row.why
    assert convcompiler.counters["launch.mlp_block"] == 1 == kernel_launches()
    ops = lowered_ops(tmp_path)
    assert not ops["addmm"] and not ops["mm"] and not ops["gelu"] and not ops["var_mean"], ops


@pytest.mark.parametrize(
    "act, bias, residual, norm, shape",
    [
        (F.relu, False, False, None, (14, 11)),  # 2-D tokens, no biases, nothing after fc2
        (F.silu, True, True, "plain", (2, 7, 11)),  # [B, N, C], a norm without parameters
        (lambda t: F.gelu(t, approximate="tanh"), True, False, "affine", (1, 3, 4, 11)),
    ],
)
def test_variants(act, bias, residual, norm, shape) -> None:
    torch.manual_seed(1)
    model = Mlp(c=11, hidden=19, act=act, bias=bias, residual=residual, norm=norm).eval()
    out, ref, report = compiled_and_float64(model, [torch.randn(shape)])
    assert_close(out, ref, torch.float32)
    (row,) = blocks(report)
    assert row.fallback_reason is None and convcompiler.counters["launch.mlp_block"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_convnext_block_is_one_kernel(dtype, tmp_path) -> None:
    """torchvision's CNBlock: dw 7x7 -> permute -> LayerNorm -> MLP -> permute back -> layer
    scale [C, 1, 1] -> + input, all in one dw_mlp_block kernel (the whole block: its conv's
    output and its hidden never in memory), which writes [N, C, H, W] in eager's
    channels-last strides, scaled and with the input added. A float32 block runs whole on
    TF32 tensor cores only (its registers), so that case allows TF32, as a user would."""
    from torchvision.models.convnext import CNBlock

    torch.manual_seed(8)
    model = CNBlock(16, 0.5, 0.0).eval()
    with torch.no_grad():
        model.layer_scale.uniform_(0.5, 1.5)
    model = model.to(dtype)
    x = torch.randn(2, 16, 5, 7).to(dtype)
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        if dtype == torch.float32:
            matmul.fp32_precision = "tf32"
        out, ref, report = compiled_and_float64(model, [x], {"debug_dir": str(tmp_path)})
    finally:
        matmul.fp32_precision = before
    assert_close(out, ref, dtype)  # the interpreter computes in float64, TF32 or not
    assert out.stride() == model(x).stride()
    (row,) = blocks(report)
    name = str(dtype)[6:]
    layers = "dwconv 7x7 -> layer_norm -> 16 -> 64 gelu -> 16 +scale+add"
    assert row.spec == f"mlp [M=70] {layers} {name} nchw (hidden on chip)"
    assert row.schedule == "dw_mlp_block" and "the whole block" in row.why, row.why
    assert [r.kind for r in report] == ["mlp_block"], str(report)  # the conv is inside
    assert kernel_launches() == 1 == convcompiler.counters["launch.mlp_block"]
    assert not lowered_ops(tmp_path), lowered_ops(tmp_path)  # not even a permute


def test_under_autocast_the_block_starts_after_the_float32_norm() -> None:
    """Autocast runs the LayerNorm in float32 and the linears in bfloat16: the block takes
    the converted norm output as its tokens, and the float32 residual add stays outside."""
    torch.manual_seed(9)
    model = Mlp(norm="affine").eval()
    x = torch.randn(2, 5, 13)
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
        convcompiler.counters.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.compile(model, backend="im2win", options=FAST)(x)
    assert_close(out.float(), ref, torch.bfloat16)
    (row,) = blocks(convcompiler.last_report())
    assert row.spec == "mlp [M=10] 13 -> 37 gelu -> 13 bfloat16 (hidden on chip)", row.spec
    assert convcompiler.counters["launch.mlp_block"] == 1


def test_a_broadcast_residual_stays_outside_the_block() -> None:
    """A residual that broadcasts ([1, N, C] added to [B, N, C]) is not read by the kernel:
    the block ends at the second linear and the add stays the host's, as eager computes it."""

    class Broadcast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = Mlp(residual=False)
            self.pos = nn.Parameter(torch.randn(1, 4, 13))

        def forward(self, x):
            return self.pos + self.mlp(x)

    torch.manual_seed(11)
    model = Broadcast().eval()
    out, ref, report = compiled_and_float64(model, [torch.randn(3, 4, 13)])
    assert_close(out, ref, torch.float32)
    (row,) = blocks(report)
    assert row.schedule == "mlp_block" and "+add" not in row.spec, row.spec
    assert convcompiler.counters["launch.mlp_block"] == 1


def test_a_different_output_width() -> None:
    """CO != C (a projection MLP): no residual, several output-column tiles."""
    torch.manual_seed(2)
    model = Mlp(c=9, hidden=33, out=40, residual=False).eval()
    out, ref, report = compiled_and_float64(model, [torch.randn(3, 9)])
    assert_close(out, ref, torch.float32)
    assert blocks(report)[0].schedule == "mlp_block"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_reach_only_their_rows(dtype) -> None:
    torch.manual_seed(3)
    model = Mlp(scale=True, norm="affine").eval().to(dtype)
    x = torch.randn(1, 4, 13).to(dtype)
    x[0, 1, 2], x[0, 3, 0] = float("nan"), float("inf")
    out, ref, _ = compiled_and_float64(model, [x])
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite()
    assert_close(out[finite], ref[finite], dtype)
    assert convcompiler.counters["launch.mlp_block"] == 1


def test_dynamic_tokens_and_an_empty_batch() -> None:
    """One compile for every batch (the spec's M is symbolic). An empty batch is a compile of
    its own (Dynamo specialises 0), whose block stays per layer with the zero-size reason."""
    torch.manual_seed(4)
    model = Mlp().eval()
    compiled = torch.compile(model, backend="im2win", options=FAST, dynamic=True)
    convcompiler.counters.reset()
    with torch.no_grad():
        for batch in (2, 5):
            x = torch.randn(batch, 6, 13)
            assert_close(compiled(x), float64_copy(model)(x.double()), torch.float32)
        (row,) = blocks(convcompiler.last_report())
        assert "M=s" in row.spec and row.fallback_reason is None, row.spec
        assert convcompiler.counters["launch.mlp_block"] == 2
        assert compiled(torch.randn(0, 6, 13)).shape == (0, 6, 13)
    report = convcompiler.last_report()
    assert len(blocks(report)) == 1, str(report)
    assert blocks(report)[0].schedule == "per layer"
    assert blocks(report)[0].why == "per layer: zero-size block: nothing to compute"


def test_blocks_false_keeps_the_layers_apart() -> None:
    torch.manual_seed(5)
    model = Mlp().eval()
    out, ref, report = compiled_and_float64(model, [torch.randn(2, 4, 13)], {"blocks": False})
    assert_close(out, ref, torch.float32)
    assert [(r.kind, r.epilogue) for r in report] == [("linear", "gelu"), ("linear", "add")]


def saved_bytes(fn, model, *args) -> tuple[torch.Tensor, int]:
    """fn(*args), and the bytes of the distinct storages autograd saved for the backward,
    the model's parameters left out."""
    from torch.autograd.graph import saved_tensors_hooks

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(seen.values())


def test_training_recomputes_the_inside_and_gradients_match() -> None:
    """In training the block still runs as one kernel: the backward recomputes the norm and
    the hidden from x and the weights (recompute.tag_block_intermediates), so the forward
    saves less than the layers one by one would, and every gradient matches float64 eager."""
    saved = {}
    for blocks in (True, False):
        torch.manual_seed(6)
        model = Mlp(scale=True, norm="affine").train()
        reference = float64_copy(model)
        x = torch.randn(2, 4, 13, requires_grad=True)
        compiled = torch.compile(model, backend="im2win", options={**FAST, "blocks": blocks})
        convcompiler.counters.reset()
        out, saved[blocks] = saved_bytes(compiled, model, x)
        out.square().sum().backward()
        x64 = x.detach().double().requires_grad_()
        reference(x64).square().sum().backward()
        assert_close(x.grad, x64.grad, torch.float32, "x grad")
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert_close(p.grad, q.grad, torch.float32, f"{name} grad")
        if blocks:
            forward = [r for r in convcompiler.last_report() if r.stage == "forward"]
            assert [(r.kind, r.schedule) for r in forward] == [("mlp_block", "mlp_block")]
            assert convcompiler.counters["launch.mlp_block"] == 1
        torch._dynamo.reset()
    # the layers save the norm's output and statistics, the hidden twice and fc2's output
    assert saved[True] < 0.3 * saved[False], saved


def test_convnext_block_trains() -> None:
    """CNBlock in training: the block (through both permutes, with its layer scale) runs as
    one kernel in the forward and every gradient, the depthwise conv's included, matches."""
    from torchvision.models.convnext import CNBlock

    torch.manual_seed(10)
    model = CNBlock(16, 0.5, 0.0).train()
    convcompiler.counters.reset()
    gradients_match_float64(model, torch.randn(2, 16, 5, 7))
    forward = [(r.kind, r.schedule) for r in convcompiler.last_report() if r.stage == "forward"]
    assert forward == [("mlp_block", "mlp_block"), ("conv", "direct_depthwise")], forward
    assert convcompiler.counters["launch.mlp_block"] == 1


def test_the_cost_model_keeps_a_wide_block_per_layer() -> None:
    """ViT-B's MLP (768 -> 3072 -> 768) at batch 32 is compute-bound: recomputing the first
    GEMM for each of the output's column tiles costs more than the hidden's round trip, so
    the plan is per layer; Swin-T's first stage (96 -> 384) saves the round trip and fuses."""
    h100 = lookup("h100")

    def best(spec):
        fused = min(
            predict(spec, s, h100, symbolic=False).at_hint
            for s in SPACES["mlp_block"].candidates(spec, device=h100, num_stages=3)
        )
        from convcompiler.schedule import ATEN

        return fused, predict(spec, ATEN, h100, symbolic=False).at_hint

    gelu = Activation("gelu")
    vit = MlpSpec(32 * 197, 768, 3072, 768, gelu, True, True, False, True, "float16", "cuda",
                  "ieee")
    swin = MlpSpec(32 * 3136, 96, 384, 96, gelu, True, True, False, True, "float16", "cuda",
                   "ieee")
    fused, per_layer = best(vit)
    assert fused > per_layer
    fused, per_layer = best(swin)
    assert fused < 0.8 * per_layer
    assert spec_from_json(spec_to_json(swin)) == swin


def test_a_wide_block_stays_two_linear_regions() -> None:
    """ViT-B's MLP at 2 x 197 tokens in float16, planned (cpu="plan"): per layer, with the
    cost model's comparison as the reason, and each linear its own region."""
    torch.manual_seed(7)
    model = Mlp(c=768, hidden=3072).eval().half()
    _, _, report = compiled_and_float64(model, [torch.randn(2, 197, 768).half()], {"cpu": "plan"})
    block, *layers = report
    assert block.kind == "mlp_block" and block.schedule == "per layer"
    assert block.why.startswith("per layer: one kernel "), block.why
    assert "MiB layer by layer" in block.why and "1 blocks per layer" in str(report)
    assert [(r.kind, r.epilogue, r.schedule) for r in layers] == [
        ("linear", "gelu", "gemm_1x1"),
        ("linear", "add", "gemm_1x1"),
    ]


def test_launcher_refuses_operands_it_was_not_built_for(tmp_path) -> None:
    spec = MlpSpec(6, 5, 7, 5, Activation("relu"), True, True, False, False, "float32", "cpu",
                   "ieee")
    schedule = SPACES["mlp_block"].make(spec, BLOCK_M=16, BLOCK_N=16, BLOCK_H=16, BLOCK_K=16,
                                        num_warps=4, num_stages=2)
    module, _ = load_source(render_region(spec, schedule), tmp_path, interpret=True)
    x, w1, b1 = torch.randn(6, 5), torch.randn(7, 5), torch.randn(7)
    w2, b2 = torch.randn(5, 7), torch.randn(5)
    with pytest.raises(ValueError, match="do not fit"):
        module.launch(x, w1.t(), b1, w2, b2)
    with pytest.raises(ValueError, match="without a residual"):
        module.launch(x, w1, b1, w2, b2, None, x)
    with pytest.raises(TypeError, match="built for torch.float32"):
        module.launch(x.half(), w1, b1, w2, b2)
    y = module.launch(x[:, None, :].expand(6, 2, 5)[:, 1], w1, b1, w2, b2)  # strided rows
    assert_close(y, F.linear(F.relu(F.linear(x, w1, b1)), w2, b2).double(), torch.float32)


# ---- gated MLPs: SwiGLU (timm), LLaMA's MLP -------------------------------------------------
class SwiGLU(nn.Module):
    """timm's SwiGLU half-block: x + fc2(silu(fc1_g(norm(x))) * fc1_x(norm(x))); `llama`:
    LLaMA's MLP, down(up(x) * silu(gate(x))), no biases, no norm, no residual."""

    def __init__(self, c=13, hidden=37, llama=False) -> None:
        super().__init__()
        self.llama, bias = llama, not llama
        self.norm = nn.LayerNorm(c, eps=1e-6)
        nn.init.uniform_(self.norm.weight, 0.5, 1.5)
        nn.init.uniform_(self.norm.bias, -0.5, 0.5)
        self.fc1_g, self.fc1_x = nn.Linear(c, hidden, bias=bias), nn.Linear(c, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, c, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.llama:
            return self.fc2(self.fc1_x(x) * F.silu(self.fc1_g(x)))
        y = self.norm(x)
        return x + self.fc2(F.silu(self.fc1_g(y)) * self.fc1_x(y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("llama", [False, True])
def test_gated_mlp_runs_as_one_kernel(dtype, llama, tmp_path) -> None:
    torch.manual_seed(20)
    model = SwiGLU(llama=llama).eval().to(dtype)
    x = (torch.randn(2, 7, 13) * 2 + 1).to(dtype)
    out, ref, report = compiled_and_float64(model, [x], {"debug_dir": str(tmp_path)})
    assert_close(out, ref, dtype)
    (row,) = blocks(report)
    layers = "13 -> 37 silu*up -> 13" if llama else "layer_norm -> 13 -> 37 silu*up -> 13 +add"
    assert row.spec == f"mlp [M=14] {layers} {str(dtype)[6:]} (hidden on chip)", str(report)
    assert [r.kind for r in report] == ["mlp_block"] and kernel_launches() == 1, str(report)
    ops = lowered_ops(tmp_path)
    assert not ops["addmm"] and not ops["mm"] and not ops["silu"] and not ops["mul"], ops


def test_gated_mlp_edges_nan_dynamic_and_empty() -> None:
    torch.manual_seed(21)
    model = SwiGLU().eval()
    x = torch.randn(2, 7, 13)
    x[1, 3, 5] = float("nan")
    out, ref, report = compiled_and_float64(model, [x])
    assert blocks(report)[0].fallback_reason is None
    assert torch.equal(out.isnan(), ref.isnan()) and out[1, 3].isnan().all()
    assert_close(out[~ref.isnan()], ref[~ref.isnan()], torch.float32)
    compiled = torch.compile(model, backend="im2win", options=FAST, dynamic=True)
    for n in (5, 9):
        x = torch.randn(3, n, 13)
        with torch.no_grad():
            assert_close(compiled(x), float64_copy(model)(x.double()), torch.float32)
    assert "silu*up" in blocks(convcompiler.last_report())[0].spec
    with torch.no_grad():
        empty = torch.compile(model, backend="im2win", options=FAST)(torch.randn(0, 4, 13))
    assert empty.shape == (0, 4, 13)


def test_gated_mlp_trains() -> None:
    """The forward runs the one kernel (the backward recomputes the hiddens); every gradient,
    the up projection's included, matches float64 eager."""
    torch.manual_seed(22)
    model = SwiGLU().train()
    convcompiler.counters.reset()
    gradients_match_float64(model, torch.randn(2, 5, 13))
    forward = [(r.kind, r.spec) for r in convcompiler.last_report() if r.stage == "forward"]
    assert len(forward) == 1 and "silu*up" in forward[0][1], forward
    assert convcompiler.counters["launch.mlp_block"] == 1
