"""Suite `compile-cache`: cold versus warm compile of a torchvision model, each in a new process.

Cold: an empty convcompiler cache and an empty Triton cache. Warm: the cache the cold run
left, a fresh Triton cache again (so only convcompiler's cache differs). Each run reports
the first call (compile + run), a steady call (run only), their difference (compile), and
the backend's own time (aot_autograd, passes, lowering with selection, static checks,
code generation and kernel loading).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent(
    """
    import json, sys, time, torch, torchvision
    import convcompiler
    name, shape = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
    options = json.loads(sys.argv[3])
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(*shape)
    compiled = torch.compile(model, backend="im2win", options=options)
    with torch.no_grad():
        t0 = time.perf_counter(); compiled(x); first = time.perf_counter() - t0
        t0 = time.perf_counter(); compiled(x); steady = time.perf_counter() - t0
    report = convcompiler.last_report()
    c = convcompiler.counters
    print(json.dumps(dict(first=first, steady=steady, backend=report.compile_seconds,
        kernels=len(report.kernels()), codegen=c["codegen.conv"], verify=c["verify.conv"],
        hits=c["cache.hit"], benchmarks=c["tune.benchmark"])))
    """
)


def run_child(model: str, shape: str, options: dict, cache_dir: str) -> dict:
    env = dict(
        os.environ,
        CONVCOMPILER_CACHE_DIR=cache_dir,
        TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="triton-cache-"),
    )
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, shape, json.dumps(options)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args) -> int:
    options = json.loads(args.options)
    cache_dir = tempfile.mkdtemp(prefix="convcompiler-bench-")
    print(f"compile-cache: {args.model} input {args.input}, options {options}")
    print(f"machine: {os.cpu_count()} CPUs; no timing here is a GPU speed claim")
    runs = {"cold": run_child(args.model, args.input, options, cache_dir)}
    runs["warm"] = run_child(args.model, args.input, options, cache_dir)
    head = f"{'run':5} {'first call':>11} {'steady':>8} {'compile':>8} {'backend':>8}  counters"
    print(head)
    for name, r in runs.items():
        compile_s = r["first"] - r["steady"]
        print(
            f"{name:5} {r['first']:10.2f}s {r['steady']:7.2f}s {compile_s:7.2f}s "
            f"{r['backend']:7.2f}s  kernels={r['kernels']} codegen={r['codegen']} "
            f"static-checks={r['verify']} cache-hits={r['hits']} benchmarks={r['benchmarks']}"
        )
    cold, warm = runs["cold"], runs["warm"]
    ratio_compile = (warm["first"] - warm["steady"]) / (cold["first"] - cold["steady"])
    ratio_backend = warm["backend"] / cold["backend"]
    print(f"warm/cold: compile {ratio_compile:.2f}x, backend {ratio_backend:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "runs": runs,
                    "warm_over_cold_compile": ratio_compile,
                    "warm_over_cold_backend": ratio_backend,
                },
                f,
                indent=2,
            )
    return 0
