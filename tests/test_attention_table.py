"""The attention matcher proves what it fuses: every SDPA argument and every bias or mask
shape is computed exactly by the kernel, or refused at match time with the reason.

Each row compiles one attention, compares it with float64 eager, and asserts either that
the region ran the fused kernel or that it fell back with the expected reason. Rows also
cover eager's edges: NaN and Inf in q, k, v and the masks, rows masked entirely with -inf
(softmax gives NaN, SDPA and _safe_softmax give 0), and zero-size batches and token dims.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, run_compiled
from torch.fx.experimental.proxy_tensor import make_fx

import convcompiler
from convcompiler.passes.attention_pattern import NoMatch, find_attention
from convcompiler.passes.match_attention import is_attention_candidate

B, H, N, D = 2, 2, 20, 16
FAST = {"verify": False}  # the static sm_90 check adds nothing to numerics
sdpa = F.scaled_dot_product_attention


def hand(q, k, v, add=None, scale=None, dim=-1):
    """softmax(scale * q @ k^T + add, dim) @ v, written out."""
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if add is not None:
        s = s + add
    return s.softmax(dim) @ v


def masked_fill_causal(q, k, v):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    causal = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=q.device).triu(1)
    return s.masked_fill(causal, float("-inf")).softmax(-1) @ v


def scaled_after_add(q, k, v, m):
    return (((q @ k.transpose(-2, -1)) + m) * 0.25).softmax(-1) @ v


def per_head_factor(q, k, v, t):
    return ((q @ k.transpose(-2, -1)) * t).softmax(-1) @ v


def gqa_by_hand(q, k, v):
    """Grouped-query attention written with repeat_interleave: k and v become H heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    return hand(q, k, v)


def rand(*shape):
    return torch.randn(*shape)


def bool_mask():
    m = torch.rand(N, N) > 0.3
    m[3] = False  # a row that sees no key: SDPA gives 0 there
    return m


# name: (function, inputs (callables: fresh tensors), None (fused) or the fallback reason)
ROWS = {
    "sdpa": (sdpa, lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)), None),
    "sdpa_causal": (
        lambda q, k, v: sdpa(q, k, v, is_causal=True),
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)),
        "is_causal=True",
    ),
    "sdpa_scale": (
        lambda q, k, v: sdpa(q, k, v, scale=0.3),
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)),
        None,
    ),
    "sdpa_bool_mask": (
        lambda q, k, v, m: sdpa(q, k, v, attn_mask=m),
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), bool_mask()),
        None,
    ),
    "sdpa_mask_NN": (
        lambda q, k, v, m: sdpa(q, k, v, attn_mask=m),
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), rand(N, N)),
        None,
    ),
    "sdpa_mask_HNN": (
        lambda q, k, v, m: sdpa(q, k, v, attn_mask=m),
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), rand(H, N, N)),
        None,
    ),
    "sdpa_mask_B1NN": (
        lambda q, k, v, m: sdpa(q, k, v, attn_mask=m),
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), rand(B, 1, N, N)),
        None,
    ),
    "sdpa_mask_1HNN": (
        lambda q, k, v, m: sdpa(q, k, v, attn_mask=m),
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), rand(1, H, N, N)),
        None,
    ),
    "sdpa_mask_BHNN": (
        lambda q, k, v, m: sdpa(q, k, v, attn_mask=m),
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, N)),
        None,
    ),
    "sdpa_mask_BH1N": (  # broadcast over the query rows
        lambda q, k, v, m: sdpa(q, k, v, attn_mask=m),
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), rand(B, H, 1, N)),
        None,
    ),
    "sdpa_cross_attention": (  # pooled keys and values: Nk != N
        sdpa,
        lambda: (rand(B, H, N, D), rand(B, H, 13, D), rand(B, H, 13, D)),
        None,
    ),
    "sdpa_cross_attention_mask": (
        lambda q, k, v, m: sdpa(q, k, v, attn_mask=m),
        lambda: (rand(B, H, N, D), rand(B, H, 37, D), rand(B, H, 37, D), rand(B, 1, N, 37)),
        None,
    ),
    "sdpa_gqa": (
        lambda q, k, v: sdpa(q, k, v, enable_gqa=True),
        lambda: (rand(B, 4, N, D), rand(B, 2, N, D), rand(B, 2, N, D)),
        "grouped-query",
    ),
    "sdpa_v_head_dim": (
        sdpa,
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, 24)),
        None,
    ),
    "sdpa_head_dim_4": (sdpa, lambda: (rand(B, H, N, 4), rand(B, H, N, 4), rand(B, H, N, 4)), None),
    # head dims over 256 are padded to 512 in registers (BLOCK_M 16, 8 warps); over 512 refused
    "sdpa_head_dim_300": (
        sdpa,
        lambda: (rand(1, 2, 5, 300), rand(1, 2, 7, 300), rand(1, 2, 7, 300)),
        None,
    ),
    "hand_head_dims_272_and_v_512": (
        hand,
        lambda: (rand(2, 1, 5, 272), rand(2, 1, 6, 272), rand(2, 1, 6, 512), rand(2, 1, 5, 6)),
        None,
    ),
    "sdpa_head_dim_600": (
        sdpa,
        lambda: (rand(1, 1, 5, 600), rand(1, 1, 5, 600), rand(1, 1, 5, 600)),
        "head_dim 600 over 512",
    ),
    "sdpa_3d": (sdpa, lambda: (rand(B, N, D), rand(B, N, D), rand(B, N, D)), None),  # H = 1
    "hand": (hand, lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)), None),
    "hand_mask_NN": (
        hand,
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), rand(N, N)),
        None,
    ),
    "hand_mask_B1NN": (
        hand,
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), rand(B, 1, N, N)),
        None,
    ),
    "hand_softmax_dim_-2": (
        lambda q, k, v: hand(q, k, v, dim=-2),
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)),
        "softmax over dim -2",
    ),
    "hand_masked_fill_causal": (  # the causal mask built in the graph: a select operand
        masked_fill_causal,
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)),
        None,
    ),
    "hand_masked_fill_finite": (  # HF's -10000 fill: a fully masked row is uniform
        lambda q, k, v, m: (q @ k.transpose(-2, -1)).masked_fill(m, -1e4).softmax(-1) @ v,
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), bool_mask()),
        None,
    ),
    "hand_where_keep_per_batch": (  # where(m, s, -inf), m [B, 1, N, N]
        lambda q, k, v, m: torch.where(m, q @ k.transpose(-2, -1), float("-inf"))
        .softmax(-1) @ v,
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D),
                 torch.rand(B, 1, N, N) > 0.2),
        None,
    ),
    "hand_masked_fill_then_scaled": (
        lambda q, k, v, m: ((q @ k.transpose(-2, -1)).masked_fill(m, -1e4) * 0.3).softmax(-1)
        @ v,
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), bool_mask()),
        "before another step",
    ),
    "hand_scaled_after_add": (
        scaled_after_add,
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), rand(N, N)),
        "scaled after an additive term",
    ),
    "hand_per_head_factor": (
        per_head_factor,
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), rand(H, 1, 1)),
        None,
    ),
    "hand_per_batch_factor": (
        per_head_factor,
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), rand(B, 1, 1, 1)),
        "varies over more than heads",
    ),
    "hand_cross_attention": (
        hand,
        lambda: (rand(B, H, N, D), rand(B, H, 13, D), rand(B, H, 13, D)),
        None,
    ),
    "hand_cross_attention_bias": (  # a per-head bias over the pooled keys
        hand,
        lambda: (rand(B, H, N, D), rand(B, H, 13, D), rand(B, H, 13, D), rand(H, N, 13)),
        None,
    ),
    "hand_key_stored_transposed": (  # LeViT: k stored [B, H, D, N], v wider than q and k
        lambda q, kt, v, bias: (q @ kt * 0.25 + bias).softmax(-1) @ v,
        lambda: (rand(B, H, N, 8), rand(B, H, 8, N), rand(B, H, N, 32), rand(H, N, N)),
        None,
    ),
    "hand_head_dims_differ": (
        hand,
        lambda: (rand(B, H, N, 4), rand(B, H, N, 4), rand(B, H, N, 40)),
        None,
    ),
    "hand_output_sequence_first": (  # [B, H, N, D] -> [N * B, H * D], contiguous
        lambda q, k, v: hand(q, k, v).permute(2, 0, 1, 3).reshape(N * B, H * D),
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)),
        None,
    ),
    "hand_output_heads_outermost": (  # [B, H, N, D] -> [H, B * N, D]
        lambda q, k, v: hand(q, k, v).transpose(0, 1).reshape(H, B * N, D),
        lambda: (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)),
        None,
    ),
    "hand_query_stored_transposed": (
        lambda qt, k, v: (qt.transpose(-2, -1) @ k.transpose(-2, -1)).softmax(-1) @ v,
        lambda: (rand(B, H, D, N), rand(B, H, N, D), rand(B, H, N, D)),
        None,
    ),
    # [B*H, N, D] operands (heads merged into the batch: torch 2.11's 3-D SDPA, fairseq-style
    # bmm attention): one head each
    "hand_3d": (hand, lambda: (rand(B * H, N, D), rand(B * H, N, D), rand(B * H, N, D)), None),
    "hand_3d_bias_NN": (
        hand,
        lambda: (rand(B * H, N, D), rand(B * H, 37, D), rand(B * H, 37, 24), rand(N, 37)),
        None,
    ),
    "hand_3d_output_sequence_first": (  # [B*H, N, D] -> [N, B*H, D]
        lambda q, k, v: hand(q, k, v).transpose(0, 1).contiguous(),
        lambda: (rand(B * H, N, D), rand(B * H, N, D), rand(B * H, N, D)),
        None,
    ),
    "hand_3d_noncontiguous": (  # [B*H, N, D] views of [N, B*H, D] storage
        hand,
        lambda: tuple(rand(N, B * H, D).transpose(0, 1) for _ in range(3)),
        None,
    ),
    "hand_3d_per_batch_mask": (
        hand,
        lambda: (rand(B * H, N, D), rand(B * H, N, D), rand(B * H, N, D), rand(B * H, N, N)),
        "flattened batch x heads",
    ),
    "hand_gqa": (
        gqa_by_hand,
        lambda: (rand(B, 4, N, D), rand(B, 2, N, D), rand(B, 2, N, D)),
        None,  # repeat_interleave materialises k and v with 4 heads: plain attention
    ),
}


def check_row(fn, inputs, expected: str | None, dtype=torch.float32):
    """Compiled fn == float64 eager; fused with a launch, or a fallback with the reason."""
    ref = fn(*(t.double() if t.is_floating_point() else t for t in inputs))
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    y, report = run_compiled(fn, inputs, options=FAST)
    regions = [r for r in report.regions if r.kind == "window_attention"]
    assert len(regions) == 1, str(report)
    (region,) = regions
    if expected is None:
        assert region.fallback_reason is None and region.schedule == "window_attention", str(report)
        assert convcompiler.counters["launch.window_attention"] == 1
    else:
        assert region.fallback_reason is not None and expected in region.fallback_reason, (
            region.fallback_reason
        )
        assert convcompiler.counters["launch.window_attention"] == 0
    finite = ref.isfinite()
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    assert_close(y.double()[finite], ref[finite], dtype)
    return region


@pytest.mark.parametrize("name", list(ROWS))
def test_attention_row(name):
    torch.manual_seed(sum(map(ord, name)))
    fn, make, expected = ROWS[name]
    check_row(fn, make(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_rows_half_precision(dtype):
    torch.manual_seed(11)
    q, k, v = (rand(B, H, N, D) for _ in range(3))
    check_row(
        lambda q, k, v, m: sdpa(q, k, v, attn_mask=m), (q, k, v, rand(1, H, N, N)), None, dtype
    )
    torch._dynamo.reset()
    convcompiler.counters.reset()
    check_row(hand, (q, k, v, rand(B, 1, N, N)), None, dtype)
    torch._dynamo.reset()
    convcompiler.counters.reset()
    check_row(hand, (q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), rand(N, N)), None, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wide_heads_half_precision(dtype):
    """Head dims over 256 (q and k 320, v 384) with an additive mask, in half precision."""
    torch.manual_seed(12)
    q, k, v = rand(2, 2, 6, 320), rand(2, 2, 9, 320), rand(2, 2, 9, 384)
    check_row(hand, (q, k, v, rand(2, 1, 6, 9)), None, dtype)


@pytest.mark.parametrize(
    "argument,value,reason",
    [
        (3, 0.5, "dropout_p=0.5"),  # positional, as aten graphs pass them
        (4, True, "is_causal=True"),
        ("dropout_p", 0.25, "dropout_p=0.25"),  # keyword
        ("is_causal", True, "is_causal=True"),
        ("scale", 0.5, None),
    ],
)
def test_sdpa_arguments_are_read_from_the_schema(argument, value, reason):
    """Every SDPA argument is read by name from the op's schema, positional or keyword: a
    dropout or causal flag is refused at match time, never dropped; a scale is used."""
    q, k, v = (rand(B, H, N, D) for _ in range(3))
    gm = make_fx(lambda q, k, v: sdpa(q, k, v))(q, k, v)
    (node,) = [n for n in gm.graph.nodes if is_attention_candidate(n)]
    assert node.target is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    if isinstance(argument, int):
        args = list(node.args) + [0.0, False][len(node.args) - 3 :]
        args[argument] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, argument: value}
    if reason is None:
        assert find_attention(node).scale == value
    else:
        with pytest.raises(NoMatch, match=reason):
            find_attention(node)


def test_dropout_on_the_probabilities_is_refused():
    """SDPA's math path with dropout: the probabilities feed a random mask, not the matmul."""
    q, k, v = (rand(B, H, N, D) for _ in range(3))
    gm = make_fx(lambda q, k, v: sdpa(q, k, v, dropout_p=0.5))(q, k, v)
    (node,) = [n for n in gm.graph.nodes if is_attention_candidate(n)]
    with pytest.raises(NoMatch, match="probabilities are read by"):
        find_attention(node)


# ---- NaN, Inf and fully masked rows --------------------------------------------------------
def nonfinite_qkv():
    q, k, v = (rand(4, H, N, D) for _ in range(3))
    q[0, 0, 2, 3] = float("nan")
    q[3, 1, 7, 0] = -float("inf")
    k[1, 1, 4, 0] = float("inf")
    v[2, 0, 6, 1] = float("inf")
    bias = rand(H, N, N)
    mask = torch.zeros(2, N, N)
    mask[1, 3] = -float("inf")  # a row of window 1 sees no key
    mask[0, 5, :7] = -float("inf")
    return q, k, v, bias, mask


def swin_softmax(q, k, v, bias, mask):
    b, h, n, d = q.shape
    nw = mask.shape[0]
    s = (q * d**-0.5) @ k.transpose(-2, -1) + bias
    s = (s.view(b // nw, nw, h, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(b, h, n, n)
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, h * d)


def swin_sdpa(q, k, v, bias, mask):
    b, h, n, d = q.shape
    nw = mask.shape[0]
    m = bias + mask.unsqueeze(1).unsqueeze(0).expand(b // nw, nw, h, n, n).reshape(b, h, n, n)
    return sdpa(q, k, v, attn_mask=m).transpose(1, 2).reshape(b, n, h * d)


@pytest.mark.parametrize("fn", [swin_softmax, swin_sdpa], ids=["softmax", "sdpa"])
def test_nan_inf_and_fully_masked_rows_match_eager(fn):
    """NaN and Inf spread as in eager; a row masked entirely is NaN under softmax and 0
    under SDPA, in the fused kernel as in eager."""
    inputs = nonfinite_qkv()
    region = check_row(fn, inputs, None)
    assert "mask=[2,N,N] per window" in region.spec and "bias=[heads,N,N]" in region.spec
    y = torch.compile(fn, backend="im2win", options=FAST)(*inputs)
    row = y.view(4, N, H, D)[1, 3, 0]  # batch 1 is window 1; head 0 has no Inf in k
    assert row.isnan().all() if fn is swin_softmax else (row == 0).all()


@pytest.mark.parametrize("fn", [swin_softmax, swin_sdpa], ids=["softmax", "sdpa"])
@pytest.mark.parametrize("shape", [(0, H, N, D), (4, H, 0, D)], ids=["batch", "tokens"])
def test_zero_size_attention_gives_eagers_result(fn, shape):
    q, k, v = (torch.randn(shape) for _ in range(3))
    bias, mask = torch.randn(H, shape[2], shape[2]), torch.zeros(2, shape[2], shape[2])
    eager = fn(q, k, v, bias, mask)
    y, report = run_compiled(fn, [q, k, v, bias, mask], options=FAST)
    assert y.shape == eager.shape and y.numel() == 0
    # the softmax form stays and falls back with the reason; SDPA on empty tensors traces to
    # `zeros` on torch 2.14 (no attention left) and stays a call on 2.11 (the GPU machine's),
    # which falls back alike
    regions = [r for r in report.regions if r.kind == "window_attention"]
    assert len(regions) == 1 if fn is swin_softmax else len(regions) <= 1, str(report)
    assert all("zero-size" in r.fallback_reason for r in regions), str(report)
    assert convcompiler.counters["launch.window_attention"] == 0


def test_a_matcher_failure_falls_back_and_the_compile_goes_on(monkeypatch, caplog):
    """An unexpected error inside the matcher (a bug, not a NoMatch) leaves the attention to
    ATen with the error as its reason: the compile never fails for it."""
    import convcompiler.passes.match_attention as match_attention

    def broken(node, forward=None):
        raise KeyError("boom")

    monkeypatch.setattr(match_attention, "find_attention", broken)
    torch._dynamo.reset()
    n = 23  # a shape no other test compiles: Inductor's caches would skip the passes
    region = check_row(hand, (rand(B, H, n, D), rand(B, H, n, D), rand(B, H, n, D)),
                       "the attention matcher failed: KeyError")
    assert convcompiler.counters["match.attention_error"] == 1
    assert "the attention matcher failed" in caplog.text and region.schedule == "aten"


def test_the_select_puts_nan_and_inf_where_eager_does():
    """The causal mask as the kernel's select: a NaN key is seen only by the rows the mask
    lets see it; an Inf value row multiplies the masked rows' zero probability into NaN (and
    is Inf where seen), as eager's matmul does; an empty batch gives eager's empty result."""
    torch.manual_seed(13)
    q, k, v = (rand(B, H, N, D) for _ in range(3))
    k[0, 0, 5, 3] = float("nan")
    v[1, 1, 7, 0] = float("inf")
    region = check_row(masked_fill_causal, (q, k, v), None)
    assert "drop=[..,N,Nk] bool" in region.spec, region.spec
    out = masked_fill_causal(q, k, v)
    assert out[0, 0, :5].isfinite().all() and out[0, 0, 5:].isnan().all()
    assert out[1, 1, :7, 0].isnan().all() and out[1, 1, 7:, 0].isinf().all()
    empty = [t[:0] for t in (q, k, v)]
    y, _ = run_compiled(masked_fill_causal, empty, options=FAST)
    assert y.shape == (0, H, N, D)


def test_3d_operands_with_nan_and_an_empty_batch():
    """[B*H, N, D] operands: a NaN key reaches every row of its batch entry only, as in eager;
    an empty batch gives eager's empty result with the zero-size reason."""
    torch.manual_seed(14)
    q, k, v = (rand(B * H, N, D) for _ in range(3))
    k[1, 4, 0] = float("nan")
    region = check_row(hand, (q, k, v), None)
    assert "heads=1" in region.spec, region.spec
    assert hand(q, k, v)[1].isnan().all() and hand(q, k, v)[0].isfinite().all()
    torch._dynamo.reset()
    convcompiler.counters.reset()
    empty = [t[:0] for t in (q, k, v)]
    y, report = run_compiled(hand, empty, options=FAST)
    assert y.shape == (0, N, D)
    (region,) = [r for r in report.regions if r.kind == "window_attention"]
    assert "zero-size" in region.fallback_reason
