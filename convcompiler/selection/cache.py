"""The persistent tuning cache: decisions and kernel sources in one SQLite file.

    <cache root>/tuning.sqlite3      (CONVCOMPILER_CACHE_DIR; directory mode 0700)

Tables:
    records      key -> JSON value: schedule, parameters, candidates tried with predicted
                 and measured times, origin ("tuned" or "model"), source hash, when
    sources      sha256 -> generated module text (checked against its hash when read)
    calibration  (device, spec) -> predicted and measured ATen seconds
    reports      key -> JSON value: the region rows of one compile, restored when Inductor's
                 caches serve that compile (frontend/session.py); data only, never code

Values are JSON, never pickle. A record and its source are written in one transaction, so
an entry is complete or absent. A database that is truncated or not a database at all is
moved aside with a warning and rebuilt empty. `export_json` / `import_json` ship a tuned
cache to another machine or a teammate.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..counters import counters
from ..files import private_dir, sha256_of

if TYPE_CHECKING:  # torch and triton stay unimported: `convcompiler cache` starts fast
    from .devices import Device

log = logging.getLogger(__name__)

CACHE_VERSION = 1
EXPORT_FORMAT = "convcompiler-tuning-cache"
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reports (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS calibration (
    device TEXT NOT NULL, spec TEXT NOT NULL, predicted REAL NOT NULL, measured REAL NOT NULL,
    PRIMARY KEY (device, spec));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@functools.lru_cache(maxsize=None)
def files_hash(*names: str) -> str:
    """SHA-256 over convcompiler source files (glob patterns relative to the package root,
    convcompiler/), read once per process."""
    root = Path(__file__).parent.parent  # this file is convcompiler/selection/cache.py
    digest = hashlib.sha256()
    for path in sorted(p for name in names for p in root.glob(name)):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def templates_hash() -> str:
    """SHA-256 over the kernel template sources (convcompiler/codegen/*.py) and the cost model."""
    return files_hash("codegen/*.py", "selection/cost.py", "selection/cost_attention.py")


def record_key(
    kind: str, spec_key: str, device: Device, config_fields: dict[str, Any], benchmarker: str
) -> tuple[str, dict[str, Any]]:
    """The cache key of one region's decision, and the parts it hashes.

    An entry is used only when every part matches; changing any of these invalidates it:
      * the region kind ("conv") and its spec key: shapes (symbols included), layouts,
        dtype, stride, padding, dilation, groups, bias, precision;
      * the planning device's name and compute capability;
      * torch.__version__ and triton.__version__;
      * the SHA-256 of the kernel template sources and the cost model (`templates_hash`);
      * every Config field that changes generated code (`Config.codegen_fields`);
      * the benchmarker that measured the candidates ("do_bench", or "fake" in tests);
      * CACHE_VERSION, bumped when the record format changes.
    """
    import torch
    import triton

    parts = {
        "version": CACHE_VERSION,
        "kind": kind,
        "spec": spec_key,
        "device": device.name,
        "capability": list(device.capability),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "templates": templates_hash(),
        "config": config_fields,
        "benchmarker": benchmarker,
    }
    text = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), parts


@dataclass(frozen=True)
class CachedSource:
    sha256: str
    name: str
    text: str


class TuningCache:
    """One SQLite database. Safe to share between processes; corrupt files are rebuilt."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        private_dir(self.path.parent)
        self._conn = self._open()

    # ---- opening and recovering ---------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 60000")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            log.debug("tuning cache %s runs in %s journal mode", self.path, mode)
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            conn.close()
            raise sqlite3.DatabaseError(f"quick_check: {check}")
        conn.executescript(_SCHEMA)
        return conn

    def _open(self) -> sqlite3.Connection:
        try:
            conn = self._connect()
        except sqlite3.DatabaseError as err:
            self._move_aside(err)
            conn = self._connect()
        os.chmod(self.path, 0o600)
        return conn

    def _move_aside(self, err: Exception) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{os.getpid()}-{int(time.time())}")
        log.warning(
            "tuning cache %s is unreadable (%s); moving it to %s and rebuilding",
            self.path,
            err,
            aside.name,
        )
        counters["cache.rebuilt"] += 1
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(aside) + suffix))

    def _guard(self, what: str, fn: Callable[[], T], default: T) -> T:
        """Run a query; on a corrupt database rebuild it once and retry."""
        try:
            return fn()
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
                raise
            self._conn.close()
            self._move_aside(err)
            self._conn = self._open()
            try:
                return fn()
            except sqlite3.DatabaseError:
                log.warning("tuning cache %s failed twice; skipping", what)
                return default

    def close(self) -> None:
        self._conn.close()

    # ---- records ------------------------------------------------------------------------
    def get(self, key: str, parts: dict[str, Any]) -> dict[str, Any] | None:
        """The record stored under `key`, if its recorded key parts are exactly `parts`."""
        row = self._guard(
            "get",
            lambda: self._conn.execute(
                "SELECT value FROM records WHERE key = ?", (key,)
            ).fetchone(),
            None,
        )
        if row is None:
            counters["cache.miss"] += 1
            return None
        try:
            value = json.loads(row[0])
        except json.JSONDecodeError:
            log.warning("tuning cache record %s is not JSON; ignoring it", key[:12])
            counters["cache.miss"] += 1
            return None
        if value.get("key_parts") != parts:
            log.warning(
                "tuning cache record %s was written for other key parts; ignoring it", key[:12]
            )
            counters["cache.miss"] += 1
            return None
        counters["cache.hit"] += 1
        return value

    def put(self, key: str, value: dict[str, Any], source: CachedSource | None) -> None:
        """Store a record (and the source it names) atomically."""
        text = json.dumps(value, sort_keys=True)

        def write() -> None:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if source is not None:
                    self._conn.execute(
                        "INSERT OR REPLACE INTO sources (sha256, name, text) VALUES (?, ?, ?)",
                        (source.sha256, source.name, source.text),
                    )
                self._conn.execute(
                    "INSERT OR REPLACE INTO records (key, value, created) VALUES (?, ?, ?)",
                    (key, text, time.time()),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

        self._guard("put", write, None)
        counters["cache.store"] += 1

    def get_report(self, key: str) -> dict[str, Any] | None:
        """The stored report of the compile `key`, or None."""
        row = self._guard(
            "get_report",
            lambda: self._conn.execute(
                "SELECT value FROM reports WHERE key = ?", (key,)
            ).fetchone(),
            None,
        )
        try:
            value = json.loads(row[0]) if row is not None else None
        except (json.JSONDecodeError, RecursionError):
            value = None
        return value if isinstance(value, dict) else None

    def put_report(self, key: str, value: dict[str, Any]) -> None:
        text = json.dumps(value, sort_keys=True)
        self._guard(
            "put_report",
            lambda: self._conn.execute(
                "INSERT OR REPLACE INTO reports (key, value, created) VALUES (?, ?, ?)",
                (key, text, time.time()),
            ),
            None,
        )

    def tuned_digest(self) -> str:
        """SHA-256 over every tuned record and every calibration measurement: the state of
        the cache that cost-model decisions do not determine on their own."""
        rows = self._guard(
            "tuned_digest",
            lambda: self._conn.execute("SELECT key, value FROM records ORDER BY key").fetchall(),
            [],
        )
        calibration = self._guard(
            "tuned_digest",
            lambda: self._conn.execute(
                "SELECT device, spec, predicted, measured FROM calibration ORDER BY device, spec"
            ).fetchall(),
            [],
        )
        digest = hashlib.sha256()
        for key, value in rows:
            try:
                tuned = json.loads(value).get("origin") == "tuned"
            except (json.JSONDecodeError, RecursionError, AttributeError):
                continue
            if tuned:
                digest.update(key.encode() + b"\0" + value.encode() + b"\0")
        digest.update(json.dumps(calibration).encode())
        return digest.hexdigest()

    def source(self, sha256: str) -> CachedSource | None:
        """A stored kernel source, only if its text still hashes to `sha256`."""
        row = self._guard(
            "source",
            lambda: self._conn.execute(
                "SELECT name, text FROM sources WHERE sha256 = ?", (sha256,)
            ).fetchone(),
            None,
        )
        if row is None:
            return None
        if sha256_of(row[1].encode()) != sha256:
            log.warning("cached kernel source %s does not match its hash; ignoring it", sha256[:16])
            return None
        return CachedSource(sha256, row[0], row[1])

    def source_names(self) -> dict[str, str]:
        """sha256 -> module name of every stored source."""
        rows = self._guard(
            "sources",
            lambda: self._conn.execute("SELECT sha256, name FROM sources").fetchall(),
            [],
        )
        return dict(rows)

    # ---- ATen calibration ---------------------------------------------------------------
    def add_calibration(
        self, device: str, spec_key: str, predicted: float, measured: float
    ) -> None:
        self._guard(
            "calibration",
            lambda: self._conn.execute(
                "INSERT OR REPLACE INTO calibration VALUES (?, ?, ?, ?)",
                (device, spec_key, predicted, measured),
            ),
            None,
        )

    def calibration(self, device: str) -> float:
        """Median measured/predicted of ATen on `device` (1.0 with no measurements)."""
        rows = self._guard(
            "calibration",
            lambda: self._conn.execute(
                "SELECT predicted, measured FROM calibration WHERE device = ?", (device,)
            ).fetchall(),
            [],
        )
        ratios = [m / p for p, m in rows if p > 0 and m > 0]
        return statistics.median(ratios) if ratios else 1.0

    # ---- management ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        def count(table: str) -> int:
            return self._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

        return {
            "path": str(self.path),
            "bytes": self.path.stat().st_size if self.path.exists() else 0,
            "records": self._guard("stats", lambda: count("records"), 0),
            "sources": self._guard("stats", lambda: count("sources"), 0),
            "calibration": self._guard("stats", lambda: count("calibration"), 0),
            "reports": self._guard("stats", lambda: count("reports"), 0),
        }

    def clear(self) -> None:
        def wipe() -> None:
            for table in ("records", "sources", "calibration", "reports", "meta"):
                self._conn.execute(f"DELETE FROM {table}")

        self._guard("clear", wipe, None)

    def generation(self) -> str:
        """A random token made when this database was created or last cleared. It is part of
        every compile's hook uuid, so Inductor's caches never serve a compile whose report
        this database cannot restore (another cache root, or a cleared cache)."""

        def get_or_make() -> str:
            self._conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', ?)",
                (secrets.token_hex(16),),
            )
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'generation'")
            return row.fetchone()[0]

        return self._guard("generation", get_or_make, "unavailable")

    def records(self) -> list[tuple[str, dict[str, Any], float]]:
        rows = self._guard(
            "records",
            lambda: self._conn.execute(
                "SELECT key, value, created FROM records ORDER BY created"
            ).fetchall(),
            [],
        )
        return [(k, json.loads(v), c) for k, v, c in rows]

    def export_json(self, path: Path) -> int:
        """Write every record and source to a JSON file; returns the number of records."""
        sources = self._conn.execute("SELECT sha256, name, text FROM sources").fetchall()
        payload = {
            "format": EXPORT_FORMAT,
            "version": CACHE_VERSION,
            "records": [{"key": k, "value": v, "created": c} for k, v, c in self.records()],
            "sources": [{"sha256": s, "name": n, "text": t} for s, n, t in sources],
        }
        Path(path).write_text(json.dumps(payload, indent=1, sort_keys=True))
        return len(payload["records"])

    def import_json(self, path: Path) -> int:
        """Merge an exported file; sources that do not match their hash are rejected, and so
        are records whose source is missing. Returns the number of records imported."""
        payload = json.loads(Path(path).read_text())
        if payload.get("format") != EXPORT_FORMAT or payload.get("version") != CACHE_VERSION:
            raise ValueError(f"{path} is not a version-{CACHE_VERSION} {EXPORT_FORMAT} export")
        sources = {}
        for item in payload["sources"]:
            if sha256_of(item["text"].encode()) != item["sha256"]:
                log.warning("import: source %s does not match its hash; rejected", item["name"])
                continue
            sources[item["sha256"]] = CachedSource(item["sha256"], item["name"], item["text"])
        imported = 0
        for item in payload["records"]:
            value = item["value"]
            sha = (value.get("source") or {}).get("sha256")
            if sha is not None and sha not in sources and self.source(sha) is None:
                log.warning("import: record %s names a missing source; rejected", item["key"][:12])
                continue
            self.put(item["key"], value, sources.get(sha) if sha else None)
            imported += 1
        return imported


def default_path() -> Path:
    from ..config import cache_root

    return cache_root() / "tuning.sqlite3"


_OPEN: dict[Path, TuningCache] = {}


def open_cache(path: Path | None = None) -> TuningCache:
    """The process-wide cache object for `path` (default: the per-user cache file)."""
    path = Path(path) if path is not None else default_path()
    cache = _OPEN.get(path)
    if cache is None or not cache.path.exists():
        cache = _OPEN[path] = TuningCache(path)
    return cache
