"""Suites `resnet50`, `swin_t`, `convnext_tiny`: whole torchvision models.

On a GPU: eager, Inductor, Inductor max-autotune and im2win, side by side in one run (the
do_bench median of a forward pass, its ratio to eager, peak memory).
On CPU: no timing. The model is planned for the target GPU (cpu="plan"); per conv region,
the workspace of the planned schedule and of the band against im2col, and the static report
of each distinct kernel.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..inspection.aot import static_report
from ..inspection.cli import compile_model
from ..spec import ConvSpec
from .common import VARIANTS, im2col_bytes, mib, time_gpu, workspace_bytes

# the optional flags this suite reads; the others are refused (bench/__main__.py)
FLAGS = frozenset({"batch", "dtype", "input", "json", "model", "options", "target"})

SUITES = {
    "resnet50": ("torchvision:resnet50", "8,3,224,224"),
    "swin_t": ("torchvision:swin_t", "8,3,224,224"),
    "convnext_tiny": ("torchvision:convnext_tiny", "8,3,224,224"),
}


def run_gpu(model: str, shape: str, dtype: str) -> dict:
    from ..inspection.models import load_model, make_input

    module = load_model(model).to("cuda", getattr(torch, dtype))
    x = make_input(shape, dtype).to("cuda")
    times = {v: time_gpu(module, (x,), v) for v in VARIANTS}
    eager = times["eager"].median_ms
    print(f"{'variant':22} {'median ms':>10} {'vs eager':>9} {'peak MiB':>9}")
    for v, t in times.items():
        print(f"{v:22} {t.median_ms:10.3f} {eager / t.median_ms:8.2f}x {t.peak_mem_mb:9.1f}")
    return {v: t.__dict__ for v, t in times.items()}


def run_cpu(model: str, shape: str, dtype: str, target: str | None, extra: dict) -> dict:
    options = {**extra, "cpu": "plan", **({"target": target} if target else {})}
    reports = compile_model(model, shape, dtype, options)
    print("no GPU: workspace per conv region (MiB) and the static sm_90 report; no timing")
    print(f"{'region':8} {'plan':16} {'im2col':>8} {'band':>8} {'planned':>8}  spec")
    rows, seen, stats = [], set(), []
    for report in reports:
        specs = {source.name: (source, spec) for source, spec in report.generated}
        for region in report.regions:
            spec = None
            if region.kernel_path is not None:
                stem = Path(region.kernel_path).stem.rsplit("_", 1)[0]
                source, spec = specs[stem]
                if source.sha256 not in seen:
                    seen.add(source.sha256)
                    stats.extend(static_report(source, spec, ("sm_90",)))
            conv = isinstance(spec, ConvSpec)  # attention regions have no conv workspace
            col = im2col_bytes(spec) if conv else 0
            band = workspace_bytes(spec, "im2win_band") if conv else 0
            planned = workspace_bytes(spec, region.schedule) if conv else 0
            rows.append(
                {
                    "region": region.name,
                    "schedule": region.schedule,
                    "im2col_bytes": col,
                    "band_bytes": band,
                    "planned_bytes": planned,
                }
            )
            print(
                f"{region.name:8} {region.schedule:16} {mib(col):>8} {mib(band):>8} "
                f"{mib(planned):>8}  {region.spec}"
            )
    bad = [st for st in stats if not st.ok]
    print(f"static report: {len(stats)} kernels compiled for sm_90, {len(bad)} with problems")
    return {"regions": rows, "static": [st.__dict__ for st in stats]}


def main(args) -> int:
    model, shape = SUITES[args.suite]
    if args.model_given:
        model = args.model if ":" in args.model else f"torchvision:{args.model}"
    shape = args.input if args.input_given else shape
    if args.batch:
        shape = ",".join([str(args.batch), *shape.split(",")[1:]])
    extra = json.loads(args.options)
    if torch.cuda.is_available():
        print(f"{args.suite} {shape} {args.dtype} on {torch.cuda.get_device_name()}")
        result = run_gpu(model, shape, args.dtype)
    else:
        print(f"{args.suite} {shape} {args.dtype}: no GPU, so no speed is measured or claimed")
        result = run_cpu(model, shape, args.dtype, args.target, extra)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0
