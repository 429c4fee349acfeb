"""Attention layouts beyond Swin's: keys stored transposed, a value head dim unlike q's, tiny
head dims, and pooled keys and values (Nk != N). Each module is written as its model writes
it, compiled, checked against float64 eager, and the attention must run the fused kernel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_close, compiled_and_float64, float64_copy, gradients_match_float64

import convcompiler


class LeViTAttention(nn.Module):
    """timm's LeViT attention: one qkv linear split into q, k (both key_dim wide) and a wider
    v; k is permuted straight to [B, H, D, N] and multiplied without a transpose; a learned
    per-head bias over the token pairs."""

    def __init__(self, dim=24, key_dim=4, heads=3, attn_ratio=2, tokens=20) -> None:
        super().__init__()
        self.heads, self.key_dim, self.val_dim = heads, key_dim, attn_ratio * key_dim
        self.scale = key_dim**-0.5
        self.qkv = nn.Linear(dim, heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Linear(heads * self.val_dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, 2 * self.key_dim + self.val_dim).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3
        )
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        attn = (q @ k * self.scale + self.bias).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.val_dim))


class SpatialReductionAttention(nn.Module):
    """PVT's attention: keys and values from the image pooled by a strided conv (Nk < N)."""

    def __init__(self, dim=32, heads=2, sr=2) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.sr = nn.Conv2d(dim, dim, sr, sr)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, hw=(6, 10)):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)
        pooled = self.sr(x.transpose(1, 2).reshape(b, c, *hw)).flatten(2).transpose(1, 2)
        kv = self.kv(self.norm(pooled)).reshape(b, pooled.shape[1], 2, self.heads, c // self.heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TorchMHA(nn.Module):
    """nn.MultiheadAttention as ViT (torchvision) calls it: sequence-first inside, so SDPA's
    output is [B, H, N, D] stored [N, B, H, D]: the kernel writes the permuted result."""

    def __init__(self, dim=32, heads=2, batch_first=True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class MViTv2Attention(nn.Module):
    """MViTv2's pooling attention (timm): keys and values pooled by a strided depthwise conv,
    and a decomposed relative position bias added on the scores viewed as [B, H, qh, qw, kh,
    kw]: rel_h = q . Rh[qy - ky] and rel_w = q . Rw[qx - kx], written back by a slice
    assignment covering all of the scores."""

    def __init__(self, dim=16, heads=2, q_size=(4, 6), stride=2) -> None:
        super().__init__()
        self.heads, self.q_size = heads, q_size
        self.k_size = tuple(s // stride for s in q_size)
        d = dim // heads
        self.scale = d**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.pool = nn.Conv2d(d, d, 3, stride, 1, groups=d, bias=False)
        self.proj = nn.Linear(dim, dim)
        size = 2 * max(max(q_size), max(self.k_size)) - 1
        self.rel_pos_h = nn.Parameter(torch.randn(size, d) * 0.5)
        self.rel_pos_w = nn.Parameter(torch.randn(size, d) * 0.5)

    def _distance(self, q_len, k_len, device):
        q_ratio, k_ratio = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
        qi = torch.arange(q_len, device=device)[:, None] * q_ratio
        ki = torch.arange(k_len, device=device)[None, :] * k_ratio
        return (qi - ki + (k_len - 1) * k_ratio).long()

    def forward(self, x):
        b, n, c = x.shape
        (qh, qw), (kh, kw), d = self.q_size, self.k_size, c // self.heads
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d).permute(2, 0, 3, 1, 4)

        def pooled(t):
            t = self.pool(t.reshape(b * self.heads, qh, qw, d).permute(0, 3, 1, 2))
            return t.flatten(2).transpose(1, 2).reshape(b, self.heads, kh * kw, d)

        k, v = pooled(k), pooled(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        rh = self.rel_pos_h[self._distance(qh, kh, x.device)]
        rw = self.rel_pos_w[self._distance(qw, kw, x.device)]
        r_q = q.reshape(b, self.heads, qh, qw, d)
        rel_h = torch.einsum("byhwc,hkc->byhwk", r_q, rh)
        rel_w = torch.einsum("byhwc,wkc->byhwk", r_q, rw)
        attn[:, :, :, :] = (
            attn.view(b, -1, qh, qw, kh, kw) + rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)
        ).view(b, -1, qh * qw, kh * kw)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _fused(report) -> list:
    regions = [r for r in report.regions if r.kind == "window_attention"]
    assert regions and all(r.fallback_reason is None for r in regions), str(report)
    return regions


LAYOUTS = {
    # name: (module, input shape, what the region's spec shows)
    "levit_k_as_stored": (LeViTAttention, (2, 20, 24), ("k^T stored", "head_dim=4 v_head_dim=8")),
    "pooled_keys": (SpatialReductionAttention, (2, 60, 32), ("N=60 Nk=15",)),
    "mvitv2_rel_pos": (MViTv2Attention, (2, 24, 16), ("N=24 Nk=6", "attn_mask=")),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_fuses_in_each_dtype(name, dtype) -> None:
    make, shape, shown = LAYOUTS[name]
    torch.manual_seed(len(name))
    model = make().eval().to(dtype)
    out, ref, report = compiled_and_float64(model, [torch.randn(*shape).to(dtype)])
    (region,) = _fused(report)
    assert all(text in region.spec for text in shown), region.spec
    assert convcompiler.counters["launch.window_attention"] == 1
    assert_close(out, ref, dtype)


def test_nan_and_inf_in_a_transposed_key() -> None:
    """A NaN in one token's input reaches every row of its image (through its key); +Inf in
    the bias gives NaN in that query row of every image (inf - inf in the softmax), -Inf
    only hides one key: as in eager."""
    torch.manual_seed(5)
    model = LeViTAttention().eval()
    with torch.no_grad():
        model.bias[1, 5, 2] = float("inf")
        model.bias[0, 3, 4] = float("-inf")
    x = torch.randn(3, 20, 24)
    x[0, 3, 1] = float("nan")
    out, ref, report = compiled_and_float64(model, [x])
    _fused(report)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[0].isnan().all() and out[1:, 5].isnan().all() and out[1:, 3].isfinite().all()
    finite = ref.isfinite()
    assert_close(out.double()[finite], ref[finite], torch.float32)


def test_dynamic_and_empty_batch_with_pooled_keys() -> None:
    torch.manual_seed(6)
    model = SpatialReductionAttention().eval()
    reference = float64_copy(model)
    compiled = torch.compile(model, backend="im2win", options={"verify": False})
    with torch.no_grad():
        for batch in (3, 2):
            x = torch.randn(batch, 60, 32)
            torch._dynamo.mark_dynamic(x, 0)
            assert_close(compiled(x), reference(x.double()), torch.float32)
        (region,) = _fused(convcompiler.last_report())
        assert convcompiler.counters["launch.window_attention"] == 2 and "batch=s" in region.spec
        assert compiled(torch.randn(0, 60, 32)).shape == (0, 60, 32)  # eager's empty result


def test_levit_attention_trains() -> None:
    """The forward runs the fused kernel; the backward recomputes in ATen (the k read as
    stored, the wider v): every gradient matches float64 eager."""
    torch.manual_seed(7)
    gradients_match_float64(LeViTAttention().train(), torch.randn(2, 20, 24))
    assert convcompiler.counters["launch.window_attention"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_writes_its_sequence_first_output(dtype, batch_first) -> None:
    torch.manual_seed(8)
    model = TorchMHA(batch_first=batch_first).eval().to(dtype)
    x = torch.randn(2, 17, 32).to(dtype)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    out, ref, report = compiled_and_float64(model, [x])
    (region,) = _fused(report)
    assert "out=n,b,h,d" in region.spec, region.spec
    assert convcompiler.counters["launch.window_attention"] == 1
    assert_close(out, ref, dtype)


class FiveDimAttention(nn.Module):
    """q, k and v with two batch dims and the heads: torchvision MaxViT's einsum over
    [B, G, H, P, D] with a per-head bias (heads third), or timm NesT's SDPA over
    [B, H, T, N, D] whose output is read back as [B, T, N, D * H] (heads second)."""

    def __init__(self, style: str, dim=32, heads=2, tokens=9) -> None:
        super().__init__()
        self.style, self.heads = style, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if style == "maxvit":
            self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))

    def forward(self, x):
        b, g, n, c = x.shape
        h, d = self.heads, c // self.heads
        if self.style == "maxvit":
            q, k, v = (t.reshape(b, g, n, h, d).permute(0, 1, 3, 2, 4)
                       for t in self.qkv(x).chunk(3, dim=-1))  # fmt: skip
            s = torch.einsum("bghid,bghjd->bghij", q, k * d**-0.5) + self.bias
            out = torch.einsum("bghij,bghjd->bghid", s.softmax(-1), v)
            return out.permute(0, 1, 3, 2, 4).reshape(b, g, n, c)
        qkv = self.qkv(x).reshape(b, g, n, 3, h, d).permute(3, 0, 4, 1, 2, 5)
        out = F.scaled_dot_product_attention(*qkv.unbind(0))
        return out.permute(0, 2, 3, 4, 1).reshape(b, g, n, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("style,out", [("maxvit", "out=b,t,n,hd"), ("nest", "out=b,t,n,dh")])
def test_five_dim_operands_view_as_one_batch(style, out, dtype) -> None:
    torch.manual_seed(10)
    model = FiveDimAttention(style).eval().to(dtype)
    x = torch.randn(2, 3, 9, 32).to(dtype)
    y, ref, report = compiled_and_float64(model, [x])
    (region,) = _fused(report)
    assert out in region.spec and "batch=6" in region.spec, region.spec
    assert ("bias=[heads,N,N]" in region.spec) == (style == "maxvit")
    assert convcompiler.counters["launch.window_attention"] == 1
    assert_close(y, ref, dtype)


def test_five_dim_operands_with_a_dynamic_batch_and_training() -> None:
    torch.manual_seed(11)
    model = FiveDimAttention("maxvit").eval()
    reference = float64_copy(model)
    compiled = torch.compile(model, backend="im2win", options={"verify": False})
    with torch.no_grad():
        for batch in (3, 2):
            x = torch.randn(batch, 3, 9, 32)
            torch._dynamo.mark_dynamic(x, 0)
            assert_close(compiled(x), reference(x.double()), torch.float32)
    (region,) = _fused(convcompiler.last_report())
    assert "batch=3*s" in region.spec.replace(" ", "") or "batch=s" in region.spec, region.spec
    assert convcompiler.counters["launch.window_attention"] == 2
    for style in ("maxvit", "nest"):  # the forward runs the kernel, the backward ATen
        convcompiler.counters.reset()
        gradients_match_float64(FiveDimAttention(style).train(), torch.randn(2, 3, 9, 32))
        assert convcompiler.counters["launch.window_attention"] == 1


def test_layout_fields_round_trip_and_bad_layouts_are_refused() -> None:
    import dataclasses

    from convcompiler.spec import AttentionSpec, SpecError, spec_from_json, spec_to_json

    spec = AttentionSpec(
        batch=12, heads=2, tokens=9, head_dim=4, dtype="float32", scale=0.5, cosine=False,
        logit_scale=False, bias=False, mask=False, windows=1, general=False,
        output="b,t,n,dh", device="cpu", precision="ieee", key_tokens=5, v_head_dim=8,
        transposed=("k",), sdpa=True, heads_axis=1, batch_split=3, out_dtype="float16",
    )
    assert spec_from_json(spec_to_json(spec)) == spec
    assert "N=9 Nk=5" in spec.describe() and "float32 -> float16 out=b,t,n,dh" in spec.describe()
    for output in ("bhn", "bhnd,", "bthnd", "bhdnd", "t,b,n,hd", "b,n,t,hd"):
        data = spec_to_json(dataclasses.replace(spec, output=output))
        with pytest.raises(SpecError, match="output"):
            spec_from_json(data)
    data = spec_to_json(spec)
    data["transposed"] = ["k", "q"]
    with pytest.raises(SpecError, match="transposed"):
        spec_from_json(data)


def _example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "neighborhood_attention.py"
    spec = importlib.util.spec_from_file_location("neighborhood_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("written", ["sdpa", "masked_fill"])
def test_neighborhood_attention_from_the_example_fuses(written) -> None:
    """examples/neighborhood_attention.py's NA (NATTEN's clamped windows) as SDPA with a
    constant boolean mask, and as masked_fill(~mask, -inf) before a softmax (the select
    operand): both fused and equal to float64 eager."""
    example = _example()
    mask = example.neighborhood_mask(7, 9, 3)
    assert mask.sum(1).eq(9).all() and mask[0].nonzero().flatten().tolist()[:3] == [0, 1, 2]
    torch.manual_seed(12)

    class MaskedFill(example.NeighborhoodAttention2d):
        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
            s = (q @ k.transpose(-2, -1) * (c // 2) ** -0.5).masked_fill(~self.mask, -torch.inf)
            return self.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))

    cls = MaskedFill if written == "masked_fill" else example.NeighborhoodAttention2d
    model = cls(16, 2, 7, 9, 3).eval()
    x = torch.randn(2, 63, 16)
    out, ref, report = compiled_and_float64(model, [x])
    (region,) = _fused(report)
    if written == "masked_fill":
        assert "drop=[..,N,Nk] bool" in region.spec, region.spec
    assert convcompiler.counters["launch.window_attention"] == 1
    assert_close(out, ref, torch.float32)


def test_mvitv2_attention_trains() -> None:
    """The decomposed relative position terms (rel_h, rel_w, from q) summed into one term
    before the fused forward; the backward recomputes in ATen: gradients match float64."""
    torch.manual_seed(8)
    gradients_match_float64(MViTv2Attention().train(), torch.randn(2, 24, 16))
    assert convcompiler.counters["launch.window_attention"] == 1
