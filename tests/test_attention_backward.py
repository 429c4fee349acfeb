"""The fused attention backward (codegen/attention_backward.py). Called directly: dq, dk, dv
and the bias gradient against float64 autograd through the same attention, for Swin's window
attention (bias and shifted-window mask), pooled keys with a boolean select and a general
term, a key stored transposed, 3-D operands, and half precision; its kernels pass the sm_90 /
sm_80 static check. In training graphs (passes/match_attention_backward.py): the backward
region runs it, gradients match float64, nothing more is saved, and a term whose gradient is
read keeps the host's backward; a torchvision swin_t training step runs it for all 12.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import assert_close

from convcompiler.bench.gpu_native import load_kernel
from convcompiler.codegen import SPACES
from convcompiler.runtime.reference import canonical_operand
from convcompiler.spec import AttentionSpec

TILES = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)  # several tiles per row


def spec_for(b, h, n, d, dtype="float32", **fields) -> AttentionSpec:
    base = dict(
        batch=b, heads=h, tokens=n, head_dim=d, dtype=dtype, scale=d**-0.5, cosine=False,
        logit_scale=False, bias=False, mask=False, windows=1, general=False, output="bhnd",
        device="cpu", precision="ieee", grad=True,
    )  # fmt: skip
    return AttentionSpec(**{**base, **fields})


def reference(spec, q, k, v, bias=None, mask=None, general=None, select=None):
    """The attention in float64 ATen ops, as the kernel's operands describe it."""
    q, k, v = (canonical_operand(spec, name, t) for name, t in (("q", q), ("k", k), ("v", v)))
    b, h, n, nk = q.shape[0], spec.heads, spec.tokens, spec.keys
    s = (q * spec.scale) @ k.transpose(-2, -1)
    if bias is not None:
        s = s + bias
    if mask is not None:
        nw = mask.shape[0]
        s = (s.view(b // nw, nw, h, n, nk) + mask[None, :, None]).view(b, h, n, nk)
    if general is not None:
        s = s + general
    if select is not None:
        s = s.masked_fill(~select, float("-inf"))
    return s.softmax(-1) @ v


def check(spec, q, k, v, terms: dict, dtype=torch.float32) -> None:
    launch = load_kernel(spec, SPACES["attention_backward"].make(spec, device=None, **TILES))
    ref_out_shape = (canonical_operand(spec, "q", q).shape[0], spec.heads, spec.tokens,
                     spec.value_dim)  # fmt: skip
    dout = torch.randn(ref_out_shape).to(dtype)
    dq, dk, dv, dbias = launch(q, k, v, dout, **terms, bias_grad="bias" in terms)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    bias = terms.get("bias")
    if bias is not None:
        bias = bias.detach().double().requires_grad_()
    others = {name: t.double() if t.is_floating_point() else t
              for name, t in terms.items() if name != "bias"}  # fmt: skip
    reference(spec, *leaves, bias=bias, **others).backward(dout.double())
    for name, got, leaf in zip("qkv", (dq, dk, dv), leaves):
        want = canonical_operand(spec, name, leaf.grad)
        assert got.dtype == dtype
        assert_close(got, want, dtype, f"d{name}")
    if bias is not None:
        assert_close(dbias, bias.grad, dtype, "dbias")


def test_swin_window_attention_backward() -> None:
    """Two images of three windows, q, k, v strided views of one qkv projection, a per-head
    bias and a 0 / -100 shifted-window mask."""
    torch.manual_seed(0)
    b, h, n, d = 6, 2, 20, 16
    q, k, v = torch.randn(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    bias = torch.randn(h, n, n)
    mask = torch.where(torch.rand(3, n, n) < 0.3, -100.0, 0.0)
    spec = spec_for(b, h, n, d, bias=True, mask=True, windows=3)
    check(spec, q, k, v, {"bias": bias, "mask": mask})


def test_pooled_keys_with_a_select_and_a_general_term() -> None:
    """9 keys for 20 queries, a value head dim of 24, a boolean select (a row that sees no
    key has no gradient) and a per-batch additive term."""
    torch.manual_seed(1)
    b, h, n, nk, d = 3, 2, 20, 9, 16
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, nk, d), torch.randn(b, h, nk, 24)
    select = torch.rand(b, 1, n, nk) < 0.6
    select[0, 0, 3] = False  # a row with every key hidden
    general = torch.randn(b, 1, n, nk)
    spec = spec_for(b, h, n, d, key_tokens=nk, v_head_dim=24, select="keep", general=True,
                    safe_softmax=True)  # fmt: skip
    launch = load_kernel(spec, SPACES["attention_backward"].make(spec, device=None, **TILES))
    dout = torch.randn(b, h, n, 24)
    dq, dk, dv, _ = launch(q, k, v, dout, general=general, select=select)
    assert dq[0, :, 3].eq(0).all()  # the hidden row
    keep = select.clone()
    keep[0, 0, 3] = True  # the reference's softmax would give NaN there: compare the rest
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = reference(spec, *leaves, general=general.double(), select=keep)
    weight = torch.ones(b, h, n, 1, dtype=torch.float64)
    weight[0, :, 3] = 0.0  # that row's output gradient removed from the reference
    out.backward(dout.double() * weight)
    for name, got, leaf in zip("qkv", (dq, dk, dv), leaves):
        assert_close(got, leaf.grad, torch.float32, f"d{name}")


def test_a_key_stored_transposed_and_3d_operands() -> None:
    torch.manual_seed(2)
    b, h, n, d = 2, 3, 20, 8
    q, kt, v = torch.randn(b, h, n, d), torch.randn(b, h, d, n), torch.randn(b, h, n, 16)
    spec = spec_for(b, h, n, d, v_head_dim=16, transposed=("k",), bias=True)
    check(spec, q, kt, v, {"bias": torch.randn(1, h, n, n)})
    q3, k3, v3 = (torch.randn(6, n, d) for _ in range(3))
    check(spec_for(6, 1, n, d), q3, k3, v3, {})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype) -> None:
    torch.manual_seed(3)
    b, h, n, d = 4, 2, 20, 16
    q, k, v = (t.to(dtype) for t in torch.randn(b, n, 3, h, d).permute(2, 0, 3, 1, 4))
    bias = torch.randn(h, n, n).to(dtype)
    mask = torch.where(torch.rand(2, n, n) < 0.3, -100.0, 0.0).to(dtype)
    spec = spec_for(b, h, n, d, str(dtype).removeprefix("torch."), bias=True, mask=True,
                    windows=2)  # fmt: skip
    check(spec, q, k, v, {"bias": bias, "mask": mask}, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_backward_kernels_pass_the_static_check(dtype) -> None:
    """Swin-T's first stage (49 tokens, 3 heads of 32, 64 windows per image, batch 32) as an
    H100 plan would tile it: both kernels compile for sm_90 and sm_80 with no spills and
    tensor-core instructions, for the cost model's pick and every square tile shape the
    space allows at 4 warps."""
    from convcompiler.codegen import render_region
    from convcompiler.devices import lookup
    from convcompiler.inspection.aot import static_report
    from convcompiler.selection.cost import rank
    from convcompiler.selection.select import model_candidates

    spec = dataclasses.replace(
        spec_for(32 * 64, 3, 49, 32, dtype, bias=True, mask=True, windows=64), device="cuda"
    )
    h100 = lookup("h100")
    ranked = rank(spec, model_candidates(spec, h100, include_aten=True), h100)
    assert ranked[0].schedule.name == "attention_backward", ranked[0].summary()
    space = SPACES["attention_backward"]
    tiles = [ranked[0].schedule] + [
        s for s in space.candidates(spec, device=h100, num_warps=4, num_stages=2)
        if s["BLOCK_M"] == s["BLOCK_N"]
    ]  # fmt: skip
    for schedule in tiles:
        stats = static_report(render_region(spec, schedule), spec, ("sm_90", "sm_80"))
        assert {st.kernel for st in stats} == {"attention_dq", "attention_dkdv"}
        assert all(st.ok for st in stats), [(st.kernel, st.arch, st.problems()) for st in stats]
        assert all(st.tensor_core_ops > 0 for st in stats), stats


# ---- in training graphs: the backward region ----------------------------------------------
def _backward_regions(report) -> list:
    return [r for r in report.regions if r.kind == "attention_backward"]


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_trains_through_the_fused_backward(shifted) -> None:
    """The original Swin code (q scaled before the matmul, the bias gathered from a table, the
    shift mask on a per-window view): the backward graph's gradient of the attention is one
    kernel launch, and every gradient (the table's included) matches float64 eager."""
    from attention_modules import MicrosoftWindowAttention
    from helpers import gradients_match_float64

    import convcompiler

    torch.manual_seed(4)
    model = MicrosoftWindowAttention(16, 4, 2).train()
    x = torch.randn(6, 16, 16)
    if shifted:
        mask = torch.where(torch.rand(3, 16, 16) < 0.3, -100.0, 0.0)

        class Shifted(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = model

            def forward(self, x):
                return self.attn(x, mask)

        model = Shifted().train()
    convcompiler.counters.reset()
    gradients_match_float64(model, x)
    (region,) = _backward_regions(convcompiler.last_report())
    assert region.fallback_reason is None and region.schedule == "attention_backward", region
    assert convcompiler.counters["launch.attention_backward"] == 1
    assert convcompiler.counters["launch.window_attention"] == 1


def test_a_term_whose_gradient_is_read_keeps_the_hosts_backward() -> None:
    """MViTv2's relative position terms are computed from q: dS also flows into their
    gradient, which the kernel does not give, so the backward region falls back, saying so."""
    from helpers import gradients_match_float64
    from test_attention_layouts import MViTv2Attention

    import convcompiler

    torch.manual_seed(5)
    convcompiler.counters.reset()
    gradients_match_float64(MViTv2Attention().train(), torch.randn(2, 24, 16))
    (region,) = _backward_regions(convcompiler.last_report())
    assert "also read by" in region.fallback_reason, region
    assert convcompiler.counters["launch.attention_backward"] == 0


def test_the_fused_backward_saves_nothing_more(monkeypatch) -> None:
    """What the forward graph saves for the backward (its outputs beyond the result) is the
    same with the fused backward as with the host's: the logsumexp is recomputed."""
    from attention_modules import MicrosoftWindowAttention

    import convcompiler
    from convcompiler.frontend import session

    saved = []
    original = session.CompileSession.post_grad

    def record(self, gm, *args, **kwargs):
        if self.stage_of(gm) == "forward":
            (out,) = [n for n in gm.graph.nodes if n.op == "output"]
            values = [a.meta["val"] for a in out.args[0] if isinstance(a, torch.fx.Node)]
            saved.append(sum(v.numel() * v.element_size() for v in values[1:]))
        return original(self, gm, *args, **kwargs)

    monkeypatch.setattr(session.CompileSession, "post_grad", record)
    launches = []
    for passes in (session.POST_GRAD_PASSES, session.POST_GRAD_PASSES[:-1]):
        monkeypatch.setattr(session, "POST_GRAD_PASSES", passes)
        torch._dynamo.reset()
        convcompiler.counters.reset()
        torch.manual_seed(6)
        model = MicrosoftWindowAttention(16, 4, 2).train()
        x = torch.randn(6, 16, 16, requires_grad=True)
        with torch._inductor.config.patch(force_disable_caches=True):
            torch.compile(model, backend="im2win", options={"verify": False})(x).sum().backward()
        launches.append(convcompiler.counters["launch.attention_backward"])
    assert launches == [1, 0]
    assert len(saved) == 2 and saved[0] == saved[1] > 0, saved


@pytest.mark.slow
def test_swin_t_training_step_runs_every_attention_backward_fused() -> None:
    """torchvision swin_t (stochastic depth off), one image of 64 x 64, one backward: every
    gradient matches float64 eager, and all 12 attentions run the fused kernel both ways."""
    import copy

    import torchvision
    from helpers import FAST, rel_error

    import convcompiler

    torch.manual_seed(0)
    model = torchvision.models.swin_t().train()
    for module in model.modules():
        if isinstance(module, torchvision.ops.StochasticDepth):
            module.p = 0.0
    reference = copy.deepcopy(model).double()
    x = torch.randn(1, 3, 64, 64)
    x_ref = x.double().requires_grad_()
    reference(x_ref).square().sum().backward()
    x.requires_grad_()
    convcompiler.counters.reset()
    torch.compile(model, backend="im2win", options=FAST)(x).square().sum().backward()
    report = convcompiler.last_report()
    backward = _backward_regions(report)
    assert len(backward) == 12 and all(r.fallback_reason is None for r in backward), str(report)
    assert convcompiler.counters["launch.attention_backward"] == 12
    assert convcompiler.counters["launch.window_attention"] == 12
    assert rel_error(x.grad, x_ref.grad) <= 1e-4
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        assert rel_error(p.grad, p_ref.grad) <= 1e-4, name
