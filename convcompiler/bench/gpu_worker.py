"""One stage of one part of the GPU command, in its own process.

    python -m convcompiler.bench.gpu_worker PART --stage plan|warm|run --seconds S
        --out FILE.jsonl [--shard I/K]

Stages:
    plan  (the dry run) plan each case for the h200 and compile its kernels for sm_90
    warm  (GPU) compile each case once (Triton's JIT, Inductor, our backend), so the timing
          process finds every compile in the on-disk caches; for part a, the whole check
    run   (GPU) time every case in this one process, within the budget

plan and warm take their share of the part's cases (--shard I/K: whole variants, dealt
round-robin). One JSON line per case is appended to FILE as it finishes, so whatever was
done survives a kill at the deadline, then a last line {"end": ...} with the steps done and
why the stage stopped. The command (bench/gpu.py) starts these; run one by hand to debug.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .budget import PartBudget

PARTS = ("correctness", "layer_speed", "window_attention", "end_to_end", "autotune")


def planning_device(dry_run: bool):
    from ..devices import DEVICES, device_for

    if dry_run:
        return DEVICES["h200"]  # the GPU machine's device, from the table
    return device_for(None, "cuda")[0]


def part_cases(part: str, dry_run: bool) -> list:
    """Every case of a part, in order (each has `id` and `variant`)."""
    from . import gpu_autocast, gpu_blocks, gpu_cases, gpu_models, gpu_speed

    if part == "correctness":
        blocks = gpu_blocks.block_cases()
        return gpu_cases.correctness_cases() + blocks + gpu_autocast.autocast_cases()
    if part == "layer_speed":
        return gpu_cases.layer_cases()
    if part == "autotune":
        return gpu_speed.autotune_cases()
    if part == "window_attention":
        from . import gpu_attention
        from .window_attention import SWIN_T

        return [gpu_models.stage_case(stage) for stage in SWIN_T] + gpu_attention.cases()
    return gpu_models.model_cases(planned_only=dry_run)


def shard(cases: list, index: int, count: int) -> list:
    """Cases of one variant stay together (they share kernels); variants dealt round-robin."""
    variants = list(dict.fromkeys(c.variant for c in cases))
    mine = {v for i, v in enumerate(variants) if i % count == index}
    return [c for c in cases if c.variant in mine]


def run_cases(part: PartBudget, cases: list, step, emit) -> None:
    for case in cases:
        if not part.admits():
            return
        emit(step(case))
        part.step_done()


def plan_step(name: str):
    """The dry run's step for one case of part `name`."""
    from .gpu_models import guarded, plan_model
    from .gpu_native import StaticChecker, dry_run_case

    device = planning_device(True)
    checker = StaticChecker()
    if name == "window_attention":  # part c compares against FlexAttention: it must import
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    # a case whose planning or compiling raises is an error row; the worker goes on
    if name == "end_to_end":
        return lambda case: guarded(case.id, lambda: plan_model(case, checker))
    if name == "window_attention":
        from .gpu_attention import GlobalCase, dry_run

        def plan_attention(case):
            if isinstance(case, GlobalCase):
                return dry_run(case, device, checker)
            return dry_run_case(case, device, checker)

        return lambda case: guarded(case.id, lambda: plan_attention(case))
    top = 3 if name == "autotune" else 1
    best = name == "layer_speed"  # part b also times the best kernel when ATen is the choice
    return lambda case: guarded(
        case.id, lambda: dry_run_case(case, device, checker, top, best_kernel=best)
    )


def warm_step(name: str):
    from . import gpu_models, gpu_native, gpu_speed

    device = planning_device(False)
    if name == "correctness":
        return lambda case: gpu_native.check_case(case, device)
    if name == "window_attention":
        return lambda case: gpu_models.guarded(
            case.id, lambda: gpu_models.time_attention(case, device, warm=True)
        )
    if name == "end_to_end":
        return lambda case: gpu_models.guarded(
            case.id, lambda: gpu_models.time_model(case, {}, warm=True)
        )
    top = gpu_speed.TOP if name == "autotune" else 1
    return lambda case: gpu_speed.guarded_warm(case, device, top)


def run_all(name: str, part: PartBudget, cases: list, emit) -> None:
    from . import gpu_models, gpu_speed

    device = planning_device(False)
    if name == "layer_speed":
        gpu_speed.run_layer_speed(part, cases, device, emit)
    elif name == "autotune":
        run_cases(part, cases, lambda c: gpu_speed.guarded_calibrate(c, device), emit)
    elif name == "window_attention":
        step = lambda c: gpu_models.guarded(c.id, lambda: gpu_models.time_attention(c, device))  # noqa: E731
        run_cases(part, cases, step, emit)
    elif name == "end_to_end":
        gpu_models.run_end_to_end(part, cases, emit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convcompiler.bench.gpu_worker")
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--stage", choices=("plan", "warm", "run"), required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard", default="0/1")
    args = parser.parse_args(argv)
    budget = PartBudget.for_seconds(args.part, args.seconds)
    out = Path(args.out)

    def emit(record: dict) -> None:
        with out.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    started = time.monotonic()
    index, count = (int(v) for v in args.shard.split("/"))
    cases = part_cases(args.part, dry_run=args.stage == "plan")
    if args.stage == "run":
        run_all(args.part, budget, cases, emit)
    else:
        cases = shard(cases, index, count)
        step = plan_step(args.part) if args.stage == "plan" else warm_step(args.part)
        run_cases(budget, cases, step, emit)
    emit(
        {
            "end": True,
            "steps": budget.steps,
            "planned": len(cases),
            "cut": budget.cut,
            "seconds": time.monotonic() - started,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
