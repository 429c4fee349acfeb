"""Compiles in a new process, for the cache tests: what a later run of a user's script sees.

`compile_in_new_process(env, ...)` runs COMPILE with `env` (optionally inside `unshare -m`
after a few mount commands, to give it a read-only or full disk) and returns what it printed.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Compiles a small conv net on CPU tensors (the suite's cpu="interpret", or $CONVCOMPILER_CPU)
# with `channels` output channels, compares it with float64 eager and prints the counters.
# With "both", it compiles once more with Inductor's caches off, so that the tuning cache's
# records are read as well as the stored report.
COMPILE = textwrap.dedent(
    """
    import json, sys, torch, torch.nn as nn, convcompiler

    def run(channels):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, 4, 1)
        ).eval()
        x = torch.randn(1, 3, 8, 8)
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(model, backend="im2win")(x)
            ref = model.double()(x.double())
        return ((out.double() - ref).abs().max() / ref.abs().max()).item()

    mode, channels = sys.argv[1], int(sys.argv[2])
    errors = [run(channels)]
    if mode == "both":
        with torch._inductor.config.patch(force_disable_caches=True):
            errors.append(run(channels))
    print("RESULT " + json.dumps({"errors": errors, "counters": dict(convcompiler.counters)}))
    """
)


def private_env(tmp_path: Path) -> dict:
    """A fresh cache root and a private Inductor cache folder shared by this test's
    processes (so Inductor can serve the second process, as it would a user)."""
    inductor = tmp_path / "inductor"
    inductor.mkdir(mode=0o700, exist_ok=True)
    return dict(
        os.environ,
        CONVCOMPILER_CACHE_DIR=str(tmp_path / "cache"),
        TORCHINDUCTOR_CACHE_DIR=str(inductor),
    )


class Run:
    def __init__(self, result: dict, stdout: str, stderr: str) -> None:
        self.counters = collections.Counter(result["counters"])
        self.errors = result["errors"]
        self.stdout, self.stderr = stdout, stderr

    def warnings(self, text: str) -> list[str]:
        """Warning lines of the log (TORCH_LOGS format: `W<date> ...`) that contain `text`."""
        return [ln for ln in self.stderr.splitlines() if re.match(r"W\d{4} ", ln) and text in ln]


def compile_in_new_process(
    env: dict, mode: str = "once", channels: int = 4, mounts: str | None = None
) -> Run:
    """Run COMPILE; with `mounts`, inside a private mount namespace after those commands."""
    argv = [sys.executable, "-c", COMPILE, mode, str(channels)]
    if mounts is not None:
        script = f'{mounts} && exec "$0" "$@"'
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, *argv]
    env = {**env, "TORCH_LOGS": "+convcompiler"}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-6000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert all(err < 1e-4 for err in result["errors"]), result
    return Run(result, out.stdout, out.stderr)


def need_unshare() -> None:
    """Skip unless this process may make a private mount namespace (root, or CAP_SYS_ADMIN)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs `unshare` (util-linux) to mount a read-only or full disk")
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount in a private namespace here: {probe.stderr.strip()}")
