"""The GPU machine's software stack (torch 2.11.0, triton 3.6.0, torchvision 0.26.0), on
this CPU: scripts/check_gpu_stack.sh makes (once, then reuses) a virtualenv with that stack,
installs this checkout, and runs the quickstart, the static sm_90 gate on resnet18 and the
GPU command's dry run there."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from test_gpu_command import SUITE_LIMIT, check_dry_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_static_gate_and_dry_run_on_the_gpu_machines_stack(tmp_path) -> None:
    start = time.monotonic()
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_gpu_stack.sh"), str(tmp_path / "dry"), *SUITE_LIMIT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    log = done.stdout + done.stderr
    # the steps' output, then stderr without pip's notes on index locations it skips
    errors = "\n".join(line for line in done.stderr.splitlines() if "Location 'file:" not in line)
    assert done.returncode == 0, done.stdout[-3000:] + "\n" + errors[-3000:]
    assert "torch 2.11.0" in log and "triton 3.6.0" in log and "torchvision 0.26.0" in log
    assert (
        "max relative error vs float64 eager" in log and "generated conv kernels launched: 4" in log
    )
    assert re.search(r"\b15 kernels, 0 with problems", log), log[-3000:]
    steps = dict(re.findall(r"^== (.+): (\d+) s$", log, flags=re.M))
    dry_s = int(steps["GPU command dry run"])
    check_dry_run(tmp_path / "dry", dry_s)
    print(f"second stack: {steps} (total {time.monotonic() - start:.0f} s)")
