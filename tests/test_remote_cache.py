"""The Redis remote under the tuning cache: a real server, and the faults a fleet meets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import assert_close, float64_copy, run_compiled
from redis_server import SilentServer

from convcompiler.counters import counters
from convcompiler.selection.remote import PREFIX, RemoteCache, check_url, open_remote

DECISION = {"schedule": {"name": "gemm_1x1", "params": [["BLOCK_M", 64]]}, "origin": "tuned"}


def test_a_decision_round_trips_and_a_missing_key_is_a_miss(redis_server) -> None:
    remote = RemoteCache(redis_server.url)
    assert remote.get("k1") is None and counters["remote.miss"] == 1
    remote.put("k1", DECISION)
    assert RemoteCache(redis_server.url).get("k1") == DECISION
    assert counters["remote.hit"] == 1 and counters["remote.store"] == 1


GARBAGE = {
    "not utf-8": b"\xff\xfe",
    "a list": b"[]",
    "null": b"null",
    "a number": b"42",
    "deep nesting": b"[" * 100_000,
    "huge": b"x" * (2 << 20),
}


@pytest.mark.parametrize("raw", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_is_a_counted_miss(redis_server, raw: bytes) -> None:
    redis_server.client().set(PREFIX + "k", raw)
    remote = RemoteCache(redis_server.url)
    assert remote.get("k") is None
    assert counters["remote.invalid"] == 1 and remote.available


def test_a_killed_server_costs_one_timeout_then_nothing(redis_server) -> None:
    remote = RemoteCache(redis_server.url)
    remote.put("k", DECISION)
    redis_server.stop()
    start = time.perf_counter()
    assert remote.get("k") is None
    assert remote.get("k2") is None and remote.put("k3", DECISION) is None
    assert time.perf_counter() - start < 5
    assert counters["remote.error"] == 1 and not remote.available


def test_a_server_that_never_answers_times_out(silent_server) -> None:
    remote = RemoteCache(silent_server.url, timeout_s=0.3)
    start = time.perf_counter()
    assert remote.get("k") is None
    assert remote.get("k") is None  # off now: no second wait
    assert time.perf_counter() - start < 2
    assert counters["remote.error"] == 1


def test_urls_are_checked_and_the_environment_opts_in(monkeypatch) -> None:
    with pytest.raises(ValueError, match="redis://"):
        check_url("http://example.com")
    monkeypatch.delenv("CONVCOMPILER_REMOTE_CACHE", raising=False)
    assert open_remote() is None
    monkeypatch.setenv("CONVCOMPILER_REMOTE_CACHE", "redis://127.0.0.1:1/0")
    assert open_remote().url == "redis://127.0.0.1:1/0"


# ---- the remote under the backend ---------------------------------------------------------
FLEET = textwrap.dedent(
    """
    import json, sys, torch, torchvision
    import convcompiler
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    # decisions are what travels: no static check, no C++ for the rest of the graph
    options = {"autotune": True, "benchmarker": "fake", "verify": False, "host": "aten"}
    with torch.no_grad():
        out = torch.compile(model, backend="im2win", options=options)(x)
        ref = model.double()(x.double())
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    c = convcompiler.counters
    print(json.dumps({
        "err": err,
        "origins": [r.origin for r in convcompiler.last_report()],
        "kernels": [r.kernel_path for r in convcompiler.last_report()],
        "benchmarks": c["tune.benchmark"], "remote_hits": c["remote.hit"],
        "launches": c["launch.conv_bn"], "out": out.flatten()[:50].tolist(),
    }))
    """
)


def _fleet_process(url: str, cache: Path) -> dict:
    env = dict(os.environ, CONVCOMPILER_CACHE_DIR=str(cache), CONVCOMPILER_REMOTE_CACHE=url)
    done = subprocess.run(
        [sys.executable, "-c", FLEET], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_machine_takes_every_decision_from_the_remote(redis_server, tmp_path) -> None:
    """Process A tunes resnet18 (fake benchmarker); process B, with an empty local cache and
    the same Redis, measures nothing and takes every decision from the remote."""
    a = _fleet_process(redis_server.url, tmp_path / "a")
    assert a["benchmarks"] > 0 and a["launches"] == 20 and a["err"] <= 1e-4, a
    assert set(a["origins"]) == {"tuned", "cache"}, a["origins"]  # repeated layers: cache
    b = _fleet_process(redis_server.url, tmp_path / "b")
    assert b["benchmarks"] == 0, b
    assert set(b["origins"]) == {"remote"}, b["origins"]
    assert b["remote_hits"] == len(set(a["kernels"])), b  # one fetch per distinct layer
    assert b["launches"] == 20 and b["err"] <= 1e-4, b
    assert [Path(p).name for p in b["kernels"]] == [Path(p).name for p in a["kernels"]]
    assert b["out"] == a["out"]
    # B's hits filled its local cache: a third run there needs neither tuning nor Redis
    redis_server.stop()
    c = _fleet_process(redis_server.url, tmp_path / "b")
    assert c["benchmarks"] == 0 and set(c["origins"]) == {"cache"}, c


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 1)).eval()


def _compile_with(url: str, cache: Path, monkeypatch) -> tuple[torch.Tensor, list[str]]:
    monkeypatch.setenv("CONVCOMPILER_CACHE_DIR", str(cache))
    torch._dynamo.reset()
    counters.reset()
    model, x = _small_net(), torch.randn(1, 3, 7, 9)
    options = {"autotune": True, "benchmarker": "fake", "remote_cache": url}
    out, report = run_compiled(model, [x], options=options)
    assert_close(out, float64_copy(model)(x.double()), torch.float32)
    assert counters["launch.conv"] == 2, counters  # the kernels ran, whatever the remote did
    return out, [r.origin for r in report]


@pytest.mark.parametrize("fault", ["killed", "garbage", "silent"])
def test_a_faulty_remote_never_fails_a_compile(fault, redis_server, tmp_path, monkeypatch):
    _compile_with(redis_server.url, tmp_path / "a", monkeypatch)
    url = redis_server.url
    if fault == "killed":
        redis_server.stop()
    elif fault == "garbage":
        client = redis_server.client()
        for key in client.keys(PREFIX + "*"):
            client.set(key, b'{"schedule": "rm -rf /", "key_parts": []}')
    else:
        silent = SilentServer()
        url = silent.url
    start = time.perf_counter()
    _, origins = _compile_with(url, tmp_path / "b", monkeypatch)
    elapsed = time.perf_counter() - start
    assert "remote" not in origins and set(origins) == {"tuned"}, origins
    if fault == "garbage":
        assert counters["remote.invalid"] == 2, counters
    else:
        assert counters["remote.error"] == 1, counters  # one timeout, then the remote is off
    assert elapsed < 120, elapsed
