"""Parts c (Swin-T window attention per stage; NA and ViT-B in gpu_attention.py) and d (end to
end) of the GPU command.

Part c, per Swin-T stage at 224 x 224, batch 32, fp16: q, k, v as strided views of one qkv
projection, the relative-position bias [heads, N, N] and, in shifted stages, the 0/-100
mask [windows, N, N]. The fused kernel against the ATen sequence (eager), that sequence
under Inductor, and FlexAttention (compiled) with the same bias and mask as a score_mod.
Every variant's output is checked against a float64 reference.

Part d, per model (resnet50, convnext_tiny, swin_t; fp16, batch 32, random weights): eager,
im2win, Inductor default, im2win without block fusion (convnext_tiny and swin_t) and, if the
budget allows, Inductor max-autotune; the compile
time, the do_bench median per batch, the ratio to eager, the peak memory of one call and
the output's difference to eager. Variants go across models first (eager and im2win of all
three before Inductor), so a cut loses the least.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

import torch

from ..devices import Device
from ..runtime.reference import run_attention
from .budget import PartBudget
from .gpu_cases import NETWORKS, AttentionCase, plan
from .gpu_native import load_kernel
from .gpu_speed import bench_ms

BATCH = 32


def stage_case(stage, batch: int = BATCH) -> AttentionCase:
    windows = (stage.resolution // 7) ** 2
    return AttentionCase(
        f"{stage.name} b{batch} float16",
        stage.name,
        images=batch,
        windows=windows,
        heads=stage.heads,
        tokens=49,
        head_dim=stage.dim // stage.heads,
        dtype="float16",
        bias=True,
        mask=stage.shift > 0,
        output="bhnd",
    )


def attention_inputs(case: AttentionCase, device: str) -> tuple:
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, case.dtype)
    b, h, n, d = case.batch, case.heads, case.tokens, case.head_dim
    qkv = torch.randn(b, n, 3, h, d, generator=gen, device=device).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    bias = torch.randn(h, n, n, generator=gen, device=device).to(dtype)
    mask = None
    if case.mask:
        pick = torch.rand(case.windows, n, n, generator=gen, device=device) < 0.3
        mask = torch.where(pick, -100.0, 0.0).to(dtype)
    return q, k, v, bias, mask


def flex_variant(spec, bias, mask, compiled: bool = True):
    """FlexAttention with the same terms: score_mod adds bias[h] and mask[b mod windows]."""
    from torch.nn.attention.flex_attention import flex_attention

    windows = mask.shape[0] if mask is not None else 1

    def score_mod(score, b, h, q_idx, kv_idx):
        score = score + bias[h, q_idx, kv_idx]
        if mask is not None:
            score = score + mask[b % windows, q_idx, kv_idx]
        return score

    flex = torch.compile(flex_attention) if compiled else flex_attention

    def run(q, k, v):
        return flex(q, k, v, score_mod=score_mod, scale=spec.scale)

    return run


def time_stage(case: AttentionCase, device: Device, warm: bool = False) -> dict:
    """Part c for one stage; `warm` compiles and runs each variant once, timing nothing."""
    spec, [schedule] = plan(case, device)
    q, k, v, bias, mask = attention_inputs(case, "cuda")
    ref = run_attention(
        spec, *(t.double() if t is not None else None for t in (q, k, v, bias, mask))
    )
    fused = load_kernel(spec, schedule)
    torch._dynamo.reset()
    inductor = torch.compile(lambda q, k, v: run_attention(spec, q, k, v, bias, mask))
    variants = {
        "eager": lambda: run_attention(spec, q, k, v, bias, mask),
        "inductor": lambda: inductor(q, k, v),
        "flex_attention": (lambda f=flex_variant(spec, bias, mask): f(q, k, v)),
        "im2win": lambda: fused(q, k, v, bias, mask),
    }
    return timed_variants(case.id, schedule.describe(), variants, ref, warm)


def timed_variants(case_id: str, schedule: str, variants: dict, ref, warm: bool, **extra) -> dict:
    """Part c's row: each variant run once against the float64 `ref` (compiling the compiled
    ones), then timed unless `warm`; a variant that raises is listed, not fatal."""
    row = {"case": case_id, "status": "ok", "schedule": schedule, "ms": {}, "rel_err": {}, **extra}
    for name, run in variants.items():
        try:
            out = run()  # compiles the compiled variants
            row["rel_err"][name] = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            if not warm:
                row["ms"][name] = bench_ms(run)
        except Exception as err:  # e.g. FlexAttention refusing a shape: listed, not fatal
            row.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
    if "eager" in row["ms"]:
        row["vs_eager"] = {k: row["ms"]["eager"] / v for k, v in row["ms"].items()}
    if row["rel_err"].get("im2win", 1.0) > 1e-2 or "errors" in row:
        row["status"] = "mismatch" if "im2win" in row["rel_err"] else "error"
    elif warm:
        row["status"] = "compiled"
    return row


def time_attention(case, device: Device, warm: bool = False) -> dict:
    """Part c for one case: a Swin-T stage, or NA / ViT-B (bench/gpu_attention.py)."""
    from .gpu_attention import GlobalCase, time_case

    if isinstance(case, GlobalCase):
        return time_case(case, device, warm)
    return time_stage(case, device, warm)


# ---- part d ----------------------------------------------------------------------------------
# im2win-direct: option launch="inductor" (Inductor's wrapper launches the kernels itself;
# not yet measured on a GPU, so after the variants that decide the comparison)
# eager-autocast / im2win-autocast: the float32 model under torch.autocast(float16), as most
# users run inference; im2win-autocast is compared with eager-autocast
# im2win-blocks-off: option blocks=False, what block fusion gains (convnext_tiny and swin_t:
# resnet50 has no block)
VARIANT_ORDER = (
    "eager",
    "im2win",
    "inductor",
    "im2win-blocks-off",
    "eager-autocast",
    "im2win-autocast",
    "im2win-direct",
    "inductor-max-autotune",
)


@dataclass(frozen=True)
class ModelCase:
    id: str
    variant: str  # the sharding unit: one compile per warm worker
    model: str
    kind: str  # a VARIANT_ORDER entry, or "plan" (the dry run)


def model_cases(planned_only: bool = False) -> list[ModelCase]:
    """Variants across models first (eager and im2win of all three before Inductor), so a cut
    loses the least; the dry run plans each model once."""
    if planned_only:
        return [ModelCase(name, name, name, "plan") for name in NETWORKS]
    return [
        ModelCase(f"{name} {kind}", f"{name} {kind}", name, kind)
        for kind in VARIANT_ORDER
        for name in NETWORKS
        if not (kind == "im2win-blocks-off" and name == "resnet50")
    ]


def _model(name: str, dtype: torch.dtype = torch.float16):
    from ..inspection.models import load_model

    torch.manual_seed(0)  # the same random weights for every variant
    return load_model(f"torchvision:{name}").to("cuda", dtype)


def time_model(case: ModelCase, reference: dict, warm: bool = False) -> dict:
    """Part d for one model and variant; `warm` compiles and runs it once, timing nothing."""
    import convcompiler

    name, variant = case.model, case.kind
    autocast = variant.endswith("-autocast")
    module = _model(name, torch.float32 if autocast else torch.float16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(BATCH, 3, 224, 224, generator=gen, device="cuda")
    x = x if autocast else x.to(torch.float16)
    torch._dynamo.reset()
    convcompiler.counters.reset()
    run = {
        "eager": module,
        "im2win": torch.compile(module, backend="im2win"),
        "inductor": torch.compile(module),
        "eager-autocast": module,
        "im2win-autocast": torch.compile(module, backend="im2win"),
        "im2win-direct": torch.compile(module, backend="im2win", options={"launch": "inductor"}),
        "im2win-blocks-off": torch.compile(module, backend="im2win", options={"blocks": False}),
        "inductor-max-autotune": torch.compile(module, mode="max-autotune-no-cudagraphs"),
    }[variant]
    row = {"case": case.id, "model": name, "variant": variant, "status": "ok"}
    amp = torch.autocast("cuda", dtype=torch.float16, enabled=autocast)
    with torch.no_grad(), amp:
        start = time.perf_counter()
        out = run(x)
        torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - start
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run(x)
        torch.cuda.synchronize()
        row["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        if warm:
            return {"case": case.id, "status": "compiled", "warm_first_call_s": row["first_call_s"]}
        row["ms"] = bench_ms(lambda: run(x))
    key = f"{name} autocast" if autocast else name
    if variant.startswith("eager"):
        reference[key] = (out.float(), row["ms"])
    elif key in reference:
        ref, eager_ms = reference[key]
        row["rel_diff_vs_eager"] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        row["eager_over_variant"] = eager_ms / row["ms"]
    if variant.startswith("im2win"):
        report = convcompiler.last_report()
        counted = "inline." if variant == "im2win-direct" else "launch."
        launches = [v for k, v in convcompiler.counters.items() if k.startswith(counted)]
        row["kernel_launches"] = sum(launches)
        row["regions"] = len(report.regions) if report else 0
        regions = report.regions if report else []
        row["fallbacks"] = [f"{r.name}: {r.fallback_reason}" for r in regions if r.fallback_reason]
        if row["kernel_launches"] == 0:
            row["status"] = "error"
            row["error"] = "no generated kernel ran: the backend fell back everywhere"
    return row


def run_end_to_end(part: PartBudget, cases: list[ModelCase], emit) -> None:
    reference: dict = {}
    for case in cases:
        if not part.admits():  # estimate: the slowest variant so far
            return
        emit(guarded(case.id, lambda c=case: time_model(c, reference)))
        part.step_done()


def guarded(case_id: str, fn) -> dict:
    try:
        return fn()
    except Exception as err:  # one failing case is reported, the part goes on
        return {
            "case": case_id,
            "status": "error",
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(limit=4)[-1500:],
        }


# ---- dry run ---------------------------------------------------------------------------------
def plan_model(case: ModelCase, checker, target: str = "h200") -> dict:
    """Trace the model at fp16, batch 32, plan every region for `target` through the real
    backend and compile each kernel for sm_90; the model is never run."""
    from ..inspection.models import load_model

    module = load_model(f"torchvision:{case.model}").to(torch.float16)
    x = torch.empty(BATCH, 3, 224, 224, dtype=torch.float16)
    return plan_module(case.model, module, x, checker, target)


def plan_module(case_id: str, module, x, checker, target: str = "h200") -> dict:
    """Trace `module` on `x` (under whatever autocast is active), plan every region for
    `target` through the real backend and compile each kernel for sm_90; the module is never
    run (a stub returns empty outputs of the traced shapes)."""
    from ..frontend.backend import im2win
    from ..inspection.report import next_compile_id, reports_since

    def plan_only(gm, example_inputs):
        # as on the GPU, the static check refuses a spilling pick and the next one is taken
        options = {"cpu": "plan", "target": target, "cache": False}
        im2win(gm, example_inputs, options=options)
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        values = [o.meta["example_value"] if isinstance(o, torch.fx.Node) else o for o in outputs]

        def stub(*args):
            return [
                torch.empty_strided(v.shape, v.stride(), dtype=v.dtype)
                if isinstance(v, torch.Tensor)
                else v
                for v in values
            ]

        return stub

    torch._dynamo.reset()
    first = next_compile_id()
    with torch.no_grad():
        torch.compile(module, backend=plan_only)(x)
    reports = reports_since(first)
    kernels = []
    for report in reports:
        for source, spec in report.generated:
            kernels += checker.check_source(source, spec)
    regions = [r for report in reports for r in report.regions]
    problems = [f"{k['kernel']}: {p}" for k in kernels for p in k["problems"]]
    return {
        "case": case_id,
        "status": "problem" if problems else "planned",
        "graphs": len(reports),
        "regions": len(regions),
        "fallbacks": [f"{r.name}: {r.fallback_reason}" for r in regions if r.schedule == "aten"],
        "kernels": kernels,
        "problems": problems,
    }
