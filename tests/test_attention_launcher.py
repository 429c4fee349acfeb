"""The fused attention launcher reads each operand in the shape the matcher proved (bias,
per-window mask, general mask, logit scale, any broadcast), writes every output layout, and
agrees with the ATen reference the tuner times (runtime/reference.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import assert_close
from torch.fx.experimental.proxy_tensor import make_fx

from convcompiler.codegen import SPACES, render_region
from convcompiler.passes.attention_pattern import find_attention
from convcompiler.passes.match_attention import attention_spec, is_attention_candidate
from convcompiler.runtime import load_source
from convcompiler.runtime.reference import run_attention

B, H, N, D, NW = 4, 2, 12, 16, 2


def everything(q, k, v, bias, mask, general, logit):
    """Every operand at once: a per-head factor, a bias, the mask twice on the per-window
    view, a per-image general mask, and _safe_softmax (fully masked rows give 0)."""
    s = (q @ k.transpose(-2, -1)) * 0.3 * logit + bias
    s = s.view(B // NW, NW, H, N, N) + mask
    s = (s + mask).view(B, H, N, N) + general
    return torch.ops.aten._safe_softmax(s, -1) @ v


def operands():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    bias = torch.randn(1, H, 1, N, generator=gen)  # broadcast over the query rows
    mask = torch.zeros(1, NW, 1, N, N)
    mask[0, 1, 0, 3] = -float("inf")  # row 3 of window 1 sees no key
    general = torch.randn(B, 1, N, N, generator=gen)  # per image, broadcast over heads
    logit = torch.rand(H, 1, 1, generator=gen) + 0.5
    return q, k, v, bias, mask, general, logit


def traced_match(fn, args):
    """The match, its spec, and the value of every graph node on `args`."""
    gm = make_fx(fn)(*args)
    (node,) = [n for n in gm.graph.nodes if is_attention_candidate(n)]
    match = find_attention(node)
    values = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    Record(gm).run(*args)
    return match, attention_spec(match), values


@pytest.mark.parametrize("output", ["bhnd", "bnhd"])
def test_launcher_reads_every_operand_shape(output, tmp_path):
    args = operands()
    match, spec, values = traced_match(everything, args)
    assert spec.bias and spec.mask and spec.general and spec.logit_scale and spec.safe_softmax
    assert spec.mask_repeat == 2 and spec.windows == NW
    spec = dataclasses.replace(spec, output=output)
    schedule = SPACES["window_attention"].make(
        spec, BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2
    )
    module, _ = load_source(render_region(spec, schedule), tmp_path, interpret=True)
    ops = [None if n is None else values[n] for n in (match.q, match.k, match.v)]
    ops += [None if n is None else values[n] for n in (match.bias, match.mask, match.general)]
    ops.append(values[match.logit_scale])
    y = module.launch(*ops)
    ref = everything(*(t.double() for t in args))
    assert_close(y, ref, torch.float32)
    assert (y[1, :, 3] == 0).all()  # the fully masked row: 0, as _safe_softmax gives
    expected = ref.transpose(1, 2).contiguous().transpose(1, 2) if output == "bnhd" else ref
    assert y.stride() == expected.stride()
    reference = run_attention(spec, *ops)
    assert reference.stride() == y.stride()
    assert_close(reference, ref, torch.float32)
