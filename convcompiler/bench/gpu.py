"""`python -m convcompiler.bench gpu --out DIR [--dry-run]`: the prepared GPU check.

On a GPU it runs, each part in its own subprocess and within its own time budget:

    a correctness       every kernel family x dtype x layout (the transposed conv and the
                        weight gradient included), 150+ random configurations and the 12
                        im2win layers, against cuDNN / eager and float64 (parallel)
    b layer_speed       the 12 im2win layers and ResNet-50's distinct convs, batch 1 and 32,
                        fp16 and fp32 (TF32), then ResNet-50's grad_weight and grad_input
                        (batch 32, fp16): the kernel against cuDNN, then Inductor
                        max-autotune (forward convs) while time allows
    c window_attention  Swin-T's four stages: fused kernel, eager, Inductor, FlexAttention;
                        neighborhood attention (56 x 56, kernel 7: the kernel skipping
                        empty key tiles) against SDPA with the mask and FlexAttention's
                        BlockMask; ViT-B's attention against SDPA; Swin-T's attention
                        backward (the fused kernels) against eager autograd's
    d end_to_end        resnet50, convnext_tiny, swin_t (fp16, batch 32): eager, im2win,
                        Inductor, im2win with blocks=False, Inductor max-autotune if it fits
    e autotune          the model's top candidates measured: the cost model's calibration
    gpu_tests           pytest -m gpu (tests/test_gpu.py)

and writes DIR/gpu_report.json and DIR/gpu_report.md (worker logs in DIR/logs/). With
--dry-run (no GPU needed) it builds every part's cases, plans them for the h200 and compiles
every kernel for sm_90 (no spills, shared memory fits, tensor cores where expected), and
collects the GPU tests; it exits 1 when anything is cut or has a problem.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import gpu_report
from .budget import Budget, PartBudget
from .gpu_cases import NETWORKS

ORDER = ("correctness", "layer_speed", "window_attention", "end_to_end", "autotune", "gpu_tests")
# Seconds per part. GPU: 480 s (8 minutes) start to end; dry run: under 5 minutes on 2 CPUs.
GPU_BUDGETS = {
    "correctness": 75,
    "layer_speed": 85,
    "window_attention": 60,
    "end_to_end": 130,
    "autotune": 35,
    "gpu_tests": 60,
}
DRY_BUDGETS = {  # measured here (2 CPUs): a 60 s, b 30 s, c 1 s, d 30 s, e 10 s, tests 5 s
    "correctness": 85,
    "layer_speed": 55,
    "window_attention": 25,
    "end_to_end": 60,
    "autotune": 35,
    "gpu_tests": 15,
}
LIMITS = {"gpu": (480.0, 30.0, 10.0), "dry-run": (290.0, 15.0, 10.0)}  # limit, reserve, grace
WARM_SHARE = 0.4  # of a timed part's time, for compiling in parallel before the timing
ROOT = Path(__file__).resolve().parents[2]  # the checkout: PYTHONPATH for the workers


def scaled_budgets(mode: str, limit: float | None = None) -> tuple[float, float, float, dict]:
    """(limit, reserve, grace, budgets) of a mode; with `limit`, everything scaled to it."""
    default, reserve, grace = LIMITS[mode]
    budgets = DRY_BUDGETS if mode == "dry-run" else GPU_BUDGETS
    if not limit:
        return default, reserve, grace, dict(budgets)
    scale = limit / default
    reserve *= scale
    return limit, reserve, min(grace, reserve / 2), {k: v * scale for k, v in budgets.items()}


def machine(dry_run: bool) -> dict:
    import torch
    import triton

    try:
        import torchvision

        vision = torchvision.__version__
    except ImportError:
        vision = None
    gpu = torch.cuda.is_available()
    from .gpu_worker import planning_device

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "torchvision": vision,
        "gpu": torch.cuda.get_device_name() if gpu else None,
        "capability": "sm_%d%d" % torch.cuda.get_device_capability() if gpu else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if gpu else None,
        "planning_device": planning_device(dry_run or not gpu).full_name,
        "cpus": os.cpu_count() or 1,
    }


def _spawn(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # killed as a group: Inductor's compile workers too
    )


def _fork(argv: list[str], log: Path) -> multiprocessing.Process:
    """The dry run's workers: forked from this process, which has imported torch and the
    bench modules already (a fresh interpreter per worker costs ~5 CPU-seconds). Never on a
    GPU run: CUDA does not survive a fork."""
    proc = multiprocessing.get_context("fork").Process(target=_forked, args=(argv, str(log)))
    proc.start()
    return proc


def _forked(argv: list[str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from .gpu_worker import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait(procs: list, kill_at: float) -> list[int]:
    """Wait for all; kill whatever still runs at `kill_at` (a subprocess with its process
    group); returns the indices killed."""
    killed = []
    for i, proc in enumerate(procs):
        left = max(0.0, kill_at - time.monotonic())
        if isinstance(proc, subprocess.Popen):
            try:
                proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed.append(i)
        else:
            proc.join(left)
            if proc.is_alive():
                proc.kill()
                proc.join()
                killed.append(i)
    return killed


def _exit_code(proc) -> int | None:
    return proc.returncode if isinstance(proc, subprocess.Popen) else proc.exitcode


def _worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    return env


def run_stage(name, part, budget, out, *, stage, shards, seconds, notes, records):
    """One stage of a part in `shards` worker processes; their records into `records`."""
    kill_at = time.monotonic() + min(seconds + budget.grace_s, budget.kill_after_s(part))
    procs, files = [], []
    for i in range(shards):
        jsonl = out / "logs" / f"{name}-{stage}-{i}.jsonl"
        jsonl.unlink(missing_ok=True)
        argv = [name, "--stage", stage, "--seconds", f"{seconds:.1f}"]
        argv += ["--shard", f"{i}/{shards}", "--out", str(jsonl)]
        log = out / "logs" / f"{name}-{stage}-{i}.log"
        if stage == "plan":
            procs.append(_fork(argv, log))
        else:
            args = [sys.executable, "-m", "convcompiler.bench.gpu_worker", *argv]
            procs.append(_spawn(args, log, _worker_env()))
        files.append(jsonl)
    killed = _wait(procs, kill_at)
    planned = 0
    for i, (proc, jsonl) in enumerate(zip(procs, files)):
        lines = [json.loads(x) for x in jsonl.read_text().splitlines()] if jsonl.exists() else []
        end = next((x for x in lines if x.get("end")), None)
        for rec in lines:
            if not rec.get("end"):
                records.setdefault(rec["case"], {}).update(rec)
        planned += (end or {}).get("planned") or 0
        where = f"{stage} worker {i}/{shards}"
        if i in killed:
            notes.append(f"{where} killed at the part's deadline")
        elif end is None:
            tail = (out / "logs" / f"{name}-{stage}-{i}.log").read_text()[-600:]
            notes.append(f"{where} exited {_exit_code(proc)} without finishing: {tail}")
        elif end.get("cut"):
            notes.append(f"{where}: {end['cut']}")
    return planned


def run_tests(part: PartBudget, budget: Budget, out: Path, dry_run: bool, notes: list) -> list:
    tests = ROOT / "tests" / "test_gpu.py"
    if not tests.exists():
        notes.append(f"{tests} is not in this checkout")
        return []
    junit = out / "logs" / "gpu_tests.xml"
    args = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", str(tests)]
    args += ["--collect-only", "-q"] if dry_run else ["-v", "--junitxml", str(junit)]
    log = out / "logs" / "gpu_tests.log"
    if _wait([_spawn(args, log, _worker_env())], time.monotonic() + budget.kill_after_s(part)):
        notes.append("pytest killed at the part's deadline")
    if dry_run:
        ids = [x for x in log.read_text().splitlines() if "::" in x]
        if not ids:
            notes.append(f"no GPU test collected: {log.read_text()[-600:]}")
        return [{"case": x.strip(), "status": "collected"} for x in ids]
    if not junit.exists():  # killed: pytest -v printed each outcome as it went
        notes.append("pytest wrote no JUnit file; outcomes read from its log")
        return [
            {"case": case, "status": outcome.lower(), "seconds": 0.0, "message": ""}
            for case, outcome in re.findall(
                r"^(\S+::\S+) (PASSED|FAILED|SKIPPED)", log.read_text(), flags=re.M
            )
        ]
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        status = "failed" if bad is not None else "skipped" if skipped is not None else "passed"
        detail = bad if bad is not None else skipped
        rows.append(
            {
                "case": f"{case.get('classname')}::{case.get('name')}",
                "status": status,
                "seconds": float(case.get("time", 0)),
                "message": (detail.get("message") or "")[:300] if detail is not None else "",
            }
        )
    return rows


def run_part(name: str, budget: Budget, out: Path, dry_run: bool, workers: int) -> dict:
    part = budget.start(name)
    notes: list[str] = []
    records: dict[str, dict] = {}
    planned = None
    if part.cut:
        notes.append(part.cut)
    elif name == "gpu_tests":
        rows = run_tests(part, budget, out, dry_run, notes)
        records = {r["case"]: r for r in rows}
        planned = len(rows)
    else:
        common = dict(notes=notes, records=records)
        if dry_run:
            shards = len(NETWORKS) if name == "end_to_end" else workers  # one model each
            planned = run_stage(name, part, budget, out, stage="plan", shards=shards,
                                seconds=part.remaining(), **common)  # fmt: skip
        elif name == "correctness":  # the check is its own warm-up: all of it in parallel
            planned = run_stage(name, part, budget, out, stage="warm", shards=workers,
                                seconds=part.remaining(), **common)  # fmt: skip
        else:  # compile in parallel, then time in one process
            planned = run_stage(name, part, budget, out, stage="warm", shards=workers,
                                seconds=part.remaining() * WARM_SHARE, **common)  # fmt: skip
            run_stage(name, part, budget, out, stage="run", shards=1,
                      seconds=part.remaining(), **common)  # fmt: skip
    budget.finish(part)
    rows = list(records.values())
    # a worker that died midway lost the rest of its cases: not complete, and its log's
    # tail (in the note) is listed among the problems
    crashed = any("without finishing" in n for n in notes)
    failed = bool(notes) and (not rows or crashed)
    cut = any("killed" in n or "cut short" in n or "skipped" in n for n in notes)
    status = "skipped" if part.cut else "failed" if failed else "cut" if cut else "complete"
    return {
        "name": name,
        "title": gpu_report.TITLES[name],
        "budget_s": float(budget.parts[name]),
        "elapsed_s": part.elapsed_s,
        "status": status,
        "planned": planned,
        "done": len(rows),
        "notes": notes,
        "summary": gpu_report.summarize(name, rows),
        "rows": rows,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convcompiler.bench gpu")
    parser.add_argument("--out", required=True, help="directory for the report")
    parser.add_argument("--dry-run", action="store_true", help="plan and compile, no GPU")
    parser.add_argument("--parts", default=",".join(ORDER), help="a comma-separated subset")
    parser.add_argument("--workers", type=int, help="parallel worker processes")
    parser.add_argument(
        "--limit", type=float, help="the run's limit in seconds (every budget scales with it)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    dry_run = args.dry_run or False
    if not dry_run and not torch.cuda.is_available():
        parser.error("no GPU here: use --dry-run")
    mode = "dry-run" if dry_run else "gpu"
    limit, reserve, grace, budgets = scaled_budgets(mode, args.limit)
    if dry_run:  # the forked workers start with these imported
        import torchvision  # noqa: F401

        from . import gpu_cases, gpu_models, gpu_native, gpu_speed, gpu_worker  # noqa: F401
    budget = Budget(limit, budgets, reserve_s=reserve, grace_s=grace)
    cpus = os.cpu_count() or 1
    workers = args.workers or (min(2, cpus) if dry_run else max(1, min(8, cpus // 2)))
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    parts = []
    for name in [p for p in ORDER if p in args.parts.split(",")]:
        print(f"[{budget.elapsed_s():5.0f} s] {name} ({budgets[name]} s) ...", flush=True)
        parts.append(run_part(name, budget, out, dry_run, workers))
        print(f"[{budget.elapsed_s():5.0f} s] {name}: {parts[-1]['status']}, "
              f"{parts[-1]['done']} rows", flush=True)  # fmt: skip
    report = {
        "format": "convcompiler-gpu-report/1",
        "mode": mode,
        "command": "python -m convcompiler.bench gpu " + " ".join(argv or sys.argv[1:]),
        "started_at": started,
        "limit_s": limit,
        "elapsed_s": budget.elapsed_s(),
        "complete": all(p["status"] == "complete" for p in parts),
        "machine": machine(dry_run),
        "parts": parts,
        "problems": [x for p in parts for x in gpu_report.problems_of(p)],
    }
    report["problems"] += [f"report: {e}" for e in gpu_report.validate(report)]
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_report.md").write_text(gpu_report.markdown(report))
    print(f"wrote {out / 'gpu_report.json'} and {out / 'gpu_report.md'} "
          f"({report['elapsed_s']:.0f} s; {len(report['problems'])} problems)")  # fmt: skip
    return 0 if report["complete"] and not report["problems"] else 1
