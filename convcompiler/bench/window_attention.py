"""Suite `window-attention`: the attention of each Swin-T stage (224 x 224 input, window 7).

Bytes, on any machine, computed from shapes (not measured):
  * fused: what the fused kernel reads and writes: q, k and v through their strides, the
    pre-gathered bias [heads, N, N], the mask [nW, N, N] in shifted blocks, the output;
  * ATen: the tensors the unfused sequence materialises. The torchvision block is traced
    with fake tensors, the attention region is matched exactly as the backend matches it,
    and the output bytes of every op in it that is not a view are summed (the q scale, the
    k^T and v copies, the scores, bias add, mask add, softmax, second bmm, transpose copy).
    The bias gather from the table runs ATen in both, so neither side counts it.

On a GPU, also times: the whole torchvision ShiftedWindowAttention block (roll, partition,
qkv, attention, proj, reverse) under eager, Inductor and im2win in one run (do_bench
median), with ratios.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ..passes.attention_pattern import find_attention
from ..passes.match_attention import attention_spec, is_attention_candidate
from ..selection.cost_attention import fused_bytes
from .common import VIEWS, mib, time_gpu

# the optional flags this suite reads; the others are refused (bench/__main__.py)
FLAGS = frozenset({"batch", "dtype", "json"})

VARIANTS = ("eager", "inductor", "im2win")


@dataclass(frozen=True)
class Stage:
    name: str
    resolution: int  # tokens per side at 224 x 224
    dim: int
    heads: int
    shift: int  # 0 in the last stage: no shift, no mask


SWIN_T = (
    Stage("stage1", 56, 96, 3, 3),
    Stage("stage2", 28, 192, 6, 3),
    Stage("stage3", 14, 384, 12, 3),
    Stage("stage4", 7, 768, 24, 0),
)


def block(stage: Stage, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    module = ShiftedWindowAttention(stage.dim, [7, 7], [stage.shift] * 2, stage.heads)
    return module.eval().to(device=device, dtype=dtype)


def stage_bytes(stage: Stage, batch: int, dtype: torch.dtype) -> dict:
    """Fused and ATen bytes for one stage's attention, from the traced shapes."""
    module = block(stage, dtype, "cpu")
    x = torch.empty(batch, stage.resolution, stage.resolution, stage.dim, dtype=dtype)
    with torch.no_grad():
        gm = make_fx(module, tracing_mode="fake", _allow_non_fake_inputs=True)(x)
    node = next(n for n in gm.graph.nodes if is_attention_candidate(n))
    match = find_attention(node)
    spec = attention_spec(match)
    ops = [
        n
        for n in match.interior + [match.final]
        if n.op == "call_function" and n.target.__name__.split(".")[0] not in VIEWS
    ]
    aten = sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in ops)
    fused = fused_bytes(spec, spec.batch)
    return {
        "stage": stage.name,
        "spec": spec.describe(),
        "aten_ops": [str(o.target).removeprefix("aten.") for o in ops],
        "aten_materialised_bytes": aten,
        "fused_bytes": fused,
        "ratio": aten / fused,
    }


def run_gpu(stage: Stage, batch: int, dtype: torch.dtype) -> dict:
    module = block(stage, dtype, "cuda")
    x = torch.randn(batch, stage.resolution, stage.resolution, stage.dim, device="cuda")
    times = {v: time_gpu(module, (x.to(dtype),), v) for v in VARIANTS}
    eager = times["eager"].median_ms
    return {v: {"ms": t.median_ms, "vs_eager": eager / t.median_ms} for v, t in times.items()}


def main(args) -> int:
    dtype = getattr(torch, args.dtype)
    batch = args.batch or 32
    gpu = torch.cuda.is_available()
    where = torch.cuda.get_device_name() if gpu else "no GPU: no speed is measured or claimed"
    print(f"window-attention: Swin-T stages at 224x224, batch {batch}, {args.dtype}; {where}")
    print(
        "bytes computed from shapes: fused = q, k, v read + bias + mask (once: re-reads hit L2) "
        "+ output written; "
        "ATen = outputs of the non-view ops of the matched attention (traced)"
    )
    print(
        f"{'stage':7} {'ATen ops':>8} {'ATen MiB':>9} {'fused MiB':>9} {'ATen/fused':>10}"
        + ("  " + "  ".join(f"{v:>17}" for v in VARIANTS) if gpu else "")
    )
    rows = []
    for stage in SWIN_T:
        row = stage_bytes(stage, batch, dtype)
        line = (
            f"{stage.name:7} {len(row['aten_ops']):8d} {mib(row['aten_materialised_bytes']):>9} "
            f"{mib(row['fused_bytes']):>9} {row['ratio']:10.2f}"
        )
        if gpu:
            row["times"] = run_gpu(stage, batch, dtype)
            line += "  " + "  ".join(
                f"{t['ms']:8.3f}ms x{t['vs_eager']:5.2f}" for t in row["times"].values()
            )
        print(line)
        rows.append(row)
    for row in rows:
        print(f"{row['stage']}: {row['spec']}; ATen ops: {' '.join(row['aten_ops'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0
