"""Suite `compile-cache`: cold versus warm compile of a torchvision model, each in a new process.

Cold: empty convcompiler, Inductor and Triton caches. Warm: the convcompiler and Inductor
caches the cold run left, a fresh Triton cache again. On a warm compile Inductor's FX-graph
and AOT-autograd caches serve the compiled graph, the hooks do not run, convcompiler restores
the report and renders each kernel once to check its hash (`kernel.regenerated`; `codegen`
counts kernels rendered for a new decision and must be 0). Each run times:

    first call   the first call of the compiled model: compile, then the graph's first run
    steady       the second call (the graph's run alone)
    compile      the first call minus the time the compiled graph itself ran inside it:
                 Dynamo tracing plus the backend (Inductor with the passes, lowering with
                 selection, static checks, code generation and kernel loading; on a warm
                 run Inductor's caches skip all but the kernel loading)
    backend      the backend's own part of compile (report.compile_seconds)
    1st-run      the graph's first run minus its steady run: per-process setup that no
                 compile cache removes (on CPU, Triton's interpreter rewriting each
                 @triton.jit function; on a GPU, Triton's JIT, which Triton's own cache serves)

The warm/cold ratio is reported for compile and backend, and for first call minus steady
(compile plus first-run setup).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

# the optional flags this suite reads; the others are refused (bench/__main__.py)
FLAGS = frozenset({"input", "json", "model", "options"})

CHILD = textwrap.dedent(
    """
    import json, sys, time, torch, torchvision
    import convcompiler
    from convcompiler.frontend.backend import im2win
    from convcompiler.inspection.models import load_model
    name, shape = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
    options = json.loads(sys.argv[3])
    runs = []  # seconds of each run of a compiled graph

    def backend(gm, example_inputs):  # the im2win backend, its graphs' runs timed
        compiled_graph = im2win(gm, example_inputs, options=options)

        def run(*args):
            t0 = time.perf_counter()
            try:
                return compiled_graph(*args)
            finally:
                runs.append(time.perf_counter() - t0)

        run._boxed_call = getattr(compiled_graph, "_boxed_call", False)
        return run

    torch.manual_seed(0)
    model = load_model(name)
    x = torch.randn(*shape)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        t0 = time.perf_counter(); compiled(x); first = time.perf_counter() - t0
        first_runs = sum(runs); runs.clear()
        t0 = time.perf_counter(); compiled(x); steady = time.perf_counter() - t0
        steady_runs = sum(runs)
    report = convcompiler.last_report()
    c = convcompiler.counters
    print(json.dumps(dict(first=first, steady=steady, compile=first - first_runs,
        setup=first_runs - steady_runs, backend=report.compile_seconds,
        kernels=len(report.kernels()), codegen=c["codegen.conv"], verify=c["verify.conv"],
        hits=c["cache.hit"], served=c["inductor_cache.served"], regenerated=c["kernel.regenerated"],
        benchmarks=c["tune.benchmark"])))
    """
)


def run_child(model: str, shape: str, options: dict, cache_dir: str) -> dict:
    env = dict(
        os.environ,
        CONVCOMPILER_CACHE_DIR=cache_dir,
        TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_dir, "inductor"),
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
    # CPU tensors: the generated kernels (interpreted), so that there is codegen to cache
    options.setdefault("cpu", "interpret")
    cache_dir = tempfile.mkdtemp(prefix="convcompiler-bench-")
    print(f"compile-cache: {args.model} input {args.input}, options {options}")
    print(f"machine: {os.cpu_count()} CPUs; no timing here is a GPU speed claim")
    runs = {"cold": run_child(args.model, args.input, options, cache_dir)}
    runs["warm"] = run_child(args.model, args.input, options, cache_dir)
    head = (
        f"{'run':5} {'first call':>11} {'steady':>8} {'compile':>8} {'backend':>8} "
        f"{'1st-run':>8}  counters"
    )
    print(head)
    for name, r in runs.items():
        print(
            f"{name:5} {r['first']:10.2f}s {r['steady']:7.2f}s {r['compile']:7.2f}s "
            f"{r['backend']:7.2f}s {r['setup']:7.2f}s  kernels={r['kernels']} "
            f"codegen={r['codegen']} static-checks={r['verify']} cache-hits={r['hits']} "
            f"inductor-served={r['served']} regenerated={r['regenerated']} "
            f"benchmarks={r['benchmarks']}"
        )
    cold, warm = runs["cold"], runs["warm"]
    ratio_compile = warm["compile"] / cold["compile"]
    ratio_backend = warm["backend"] / cold["backend"]
    ratio_first = (warm["first"] - warm["steady"]) / (cold["first"] - cold["steady"])
    print(
        f"warm/cold: compile {ratio_compile:.2f}x, backend {ratio_backend:.2f}x "
        f"(first call minus steady, i.e. with the first-run setup: {ratio_first:.2f}x)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "runs": runs,
                    "warm_over_cold_compile": ratio_compile,
                    "warm_over_cold_backend": ratio_backend,
                    "warm_over_cold_first_minus_steady": ratio_first,
                },
                f,
                indent=2,
            )
    return 0
