"""A fleet's shared tuning decisions on Redis: a second level under the local SQLite cache.

    CONVCOMPILER_REMOTE_CACHE=redis://host:port/db     (or the option remote_cache=...)

The remote holds exactly what the local cache holds for a decision: the same key
(`cache.record_key`) and the same JSON value, schedule and parameters, never code. A local
miss asks the remote; a remote hit is checked like a local one and then fills the local
cache; a new decision is written to both.

A remote never fails a compile. Every operation has short timeouts; a server that is down,
slow or answers garbage counts a miss (`remote.error` or `remote.invalid`) and is logged
once. After a connection or timeout error the remote is off for the rest of the process,
so a dead server costs one timeout, not one per region. The `redis` client is optional
(`pip install convcompiler[redis]`); without it the remote is off with one warning.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any
from urllib.parse import urlparse

from ..counters import counters

log = logging.getLogger(__name__)

ENV = "CONVCOMPILER_REMOTE_CACHE"
PREFIX = "convcompiler:decision:v1:"
TIMEOUT_S = 0.5  # connect and per-command; a tuning decision is worth less than a stall
MAX_VALUE_BYTES = 1 << 20  # a decision is a few KiB; anything larger is garbage


class RemoteCache:
    """Get and put decisions by key on one Redis database."""

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client = None
        self._off: str | None = None  # why the remote is off for this process
        self._logged: set[str] = set()

    def _warn_once(self, kind: str, message: str, *args: Any) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning(message, *args)

    def _connect(self):
        if self._off is not None:
            return None
        if self._client is None:
            try:
                import redis
            except ImportError:
                self._disable("the redis client is not installed (pip install redis)")
                return None
            self._client = redis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                retry_on_timeout=False,
            )
        return self._client

    def _disable(self, reason: str) -> None:
        self._off = reason
        counters["remote.off"] += 1
        self._warn_once("off", "remote tuning cache %s is off: %s", self.url, reason)

    def _failed(self, err: Exception) -> None:
        """A connection, timeout or protocol error: count it, and stop asking."""
        counters["remote.error"] += 1
        self._disable(f"{type(err).__name__}: {err}")

    @property
    def available(self) -> bool:
        return self._off is None

    def get(self, key: str) -> dict[str, Any] | None:
        """The decision stored under `key`, or None (absent, unreachable or malformed)."""
        client = self._connect()
        if client is None:
            return None
        try:
            raw = client.get(PREFIX + key)
        except Exception as err:  # redis raises its own ConnectionError/TimeoutError family
            self._failed(err)
            return None
        if raw is None:
            counters["remote.miss"] += 1
            return None
        value = _decode(raw)
        if value is None:
            counters["remote.invalid"] += 1
            self._warn_once(
                "invalid", "remote tuning cache %s: a malformed value; ignored", self.url
            )
            return None
        counters["remote.hit"] += 1
        return value

    def put(self, key: str, value: dict[str, Any]) -> None:
        client = self._connect()
        if client is None:
            return
        try:
            client.set(PREFIX + key, json.dumps(value, sort_keys=True))
        except Exception as err:
            self._failed(err)
            return
        counters["remote.store"] += 1


def _decode(raw: object) -> dict[str, Any] | None:
    """A JSON object, or None for anything else (bytes that are not UTF-8 JSON, a list, a
    number, deep nesting, something huge)."""
    if not isinstance(raw, (bytes, str)) or len(raw) > MAX_VALUE_BYTES:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def check_url(url: str) -> str:
    """`url` if it names a Redis database; ValueError otherwise (a typo fails the option,
    not every later compile)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss", "unix") or not (parsed.hostname or parsed.path):
        raise ValueError(f"remote_cache must be a redis://host:port/db URL, got {url!r}")
    return url


_OPEN: dict[str, RemoteCache] = {}


def open_remote(url: str | None = None) -> RemoteCache | None:
    """The process-wide remote for `url` (default: $CONVCOMPILER_REMOTE_CACHE), or None."""
    url = url or os.environ.get(ENV) or None
    if url is None:
        return None
    if url not in _OPEN:
        _OPEN[url] = RemoteCache(check_url(url))
    return _OPEN[url]
