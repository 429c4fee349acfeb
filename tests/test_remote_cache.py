"""The Redis remote under the tuning cache: a real server, and the faults a fleet meets."""

from __future__ import annotations

import time

import pytest

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
