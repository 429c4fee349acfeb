"""The persistent tuning cache: decisions, never code, in one SQLite file.

    <cache root>/tuning.sqlite3      (CONVCOMPILER_CACHE_DIR; folder 0700, files 0600)

Tables:
    records      key -> JSON value: the key's parts, the spec, the schedule and its
                 parameters, the candidates tried with predicted and measured times, origin
                 ("tuned" or "model"), the name and SHA-256 of the source it renders, when
    calibration  (device, spec) -> predicted and measured ATen seconds
    reports      key -> JSON value: the region rows of one compile, restored when Inductor's
                 caches serve that compile (frontend/session.py)
    meta         the file's format and generation

No kernel source is stored: a decision's source is rendered again by the installed templates
and used only if it hashes to the recorded SHA-256 (stored.py `from_record`). Values are
JSON, never pickle, and every value read back is checked against its schema
(cache_values.py): a malformed one is a counted miss. Opening, corruption and disk faults
are cache_db.py's: a corrupt file is rebuilt, a disk that cannot hold it leaves this process
with an in-memory cache. `export_json` / `import_json` ship decisions to another machine or
a teammate; an import carries decisions only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import secrets
import sqlite3
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..counters import counters
from ..files import write_private
from . import cache_values as values
from .cache_db import in_memory, is_corrupt, move_aside, open_db

if TYPE_CHECKING:  # torch and triton stay unimported: `convcompiler cache` starts fast
    from ..devices import Device

log = logging.getLogger(__name__)

CACHE_VERSION = 2
EXPORT_FORMAT = "convcompiler-tuning-cache"
GENERATION = values.Text("[0-9a-f]{32}")
T = TypeVar("T")

# What a decision is computed from, besides its key's other parts: the templates, the
# schedule spaces, the cost models, the device table and the selection code.
DECISION_SOURCES = (
    "codegen/*.py",
    "schedule.py",
    "selection/cost*.py",  # the roofline and its conv backward, attention and block models
    "selection/fusion.py",
    "devices.py",
    "selection/select.py",
    "selection/tuning.py",
)


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
    """SHA-256 over the sources a decision is computed from (DECISION_SOURCES): the kernel
    templates, schedule spaces, cost models, device table and selection."""
    return files_hash(*DECISION_SOURCES)


def key_of(parts: dict[str, Any]) -> str:
    """The record key of a decision's key parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def record_key(
    kind: str, spec_key: str, device: Device, config_fields: dict[str, Any], benchmarker: str
) -> tuple[str, dict[str, Any]]:
    """The cache key of one region's decision, and the parts it hashes.

    An entry is used only when every part matches; changing any of these invalidates it:
      * the region kind ("conv") and its spec key: shapes (symbols included), layouts,
        dtype, stride, padding, dilation, groups, bias, precision, tensor device;
      * the planning device's name and compute capability (the planning target);
      * torch.__version__ and triton.__version__;
      * the SHA-256 of the sources decisions are computed from (`templates_hash`);
      * every Config field that changes the schedule or the generated code
        (`Config.codegen_fields`: cpu, schedule, target, verify, top_k);
      * the benchmarker that measured the candidates ("do_bench", "fake", or "none");
      * CACHE_VERSION, bumped when the record format changes.
    Two inputs are checked on the value instead: a model record is used only under the ATen
    calibration it was ranked with, and only by a compile that does not tune (a tuned record
    serves every compile); see select.py.
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
    return key_of(parts), parts


class TuningCache:
    """One SQLite database. Safe to share between processes; corrupt files are rebuilt, and
    a disk that fails leaves this process with an in-memory copy (cache_db.py)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn, self.on_disk = open_db(self.path)

    def _guard(self, what: str, fn: Callable[[], T], default: T) -> T:
        """Run a query. A corrupt file is rebuilt once and the query retried; a failing disk
        moves this process to memory and retries there; never an exception."""
        try:
            return fn()
        except sqlite3.Error as err:
            if not self.on_disk:
                log.warning("tuning cache %s failed in memory (%s); skipping", what, err)
                return default
            if is_corrupt(err):
                self._conn.close()
                with contextlib.suppress(OSError):  # then open_db finds it corrupt again
                    move_aside(self.path, err)
                self._conn, self.on_disk = open_db(self.path)
            else:
                old = self._conn
                self._conn, self.on_disk = in_memory(self.path, err, source=old), False
                old.close()
        try:
            return fn()
        except sqlite3.Error as err:
            log.warning("tuning cache %s failed twice (%s); skipping", what, err)
            return default

    def _query(self, what: str, sql: str, args: tuple = (), default: Any = None) -> Any:
        return self._guard(what, lambda: self._conn.execute(sql, args).fetchall(), default)

    def close(self) -> None:
        self._conn.close()

    # ---- records ------------------------------------------------------------------------
    def get(self, key: str, parts: dict[str, Any]) -> dict[str, Any] | None:
        """The well-formed record stored under `key` whose recorded key parts are exactly
        `parts`, or None (a miss; a malformed record is also counted as cache.invalid).
        The caller counts the hit once it has used the record."""
        rows = self._query("get", "SELECT value FROM records WHERE key = ?", (key,), [])
        value = values.load(rows[0][0], values.RECORD, "record") if rows else None
        if value is not None and value["key_parts"] != parts:
            log.warning(
                "tuning cache record %s was written for other key parts; ignoring it", key[:12]
            )
            value = None
        if value is None:
            counters["cache.miss"] += 1
        return value

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store one decision (a record of the RECORD schema)."""
        text = json.dumps(value, sort_keys=True)
        self._guard(
            "put",
            lambda: self._conn.execute(
                "INSERT OR REPLACE INTO records (key, value, created) VALUES (?, ?, ?)",
                (key, text, time.time()),
            ),
            None,
        )
        counters["cache.store"] += 1

    def records(self) -> list[tuple[str, dict[str, Any], float]]:
        """Every well-formed record, oldest first (malformed ones are counted, not listed)."""
        rows = self._query(
            "records", "SELECT key, value, created FROM records ORDER BY created", (), []
        )
        found = []
        for key, text, created in rows:
            value = values.load(text, values.RECORD, "record")
            if value is not None and isinstance(key, str):
                found.append((key, value, created if isinstance(created, float) else 0.0))
        return found

    # ---- reports ------------------------------------------------------------------------
    def get_report(self, key: str) -> dict[str, Any] | None:
        """The stored report of the compile `key` (REPORT schema), or None."""
        rows = self._query("get_report", "SELECT value FROM reports WHERE key = ?", (key,), [])
        return values.load(rows[0][0], values.REPORT, "report") if rows else None

    def put_report(self, key: str, value: dict[str, Any]) -> None:
        text = json.dumps(value, sort_keys=True)
        self._query(
            "put_report",
            "INSERT OR REPLACE INTO reports (key, value, created) VALUES (?, ?, ?)",
            (key, text, time.time()),
        )

    def tuned_digest(self) -> str:
        """SHA-256 over every tuned record and every calibration measurement: the state of
        the cache that cost-model decisions do not determine on their own."""
        rows = self._query("tuned_digest", "SELECT key, value FROM records ORDER BY key", (), [])
        calibration = self._query(
            "tuned_digest",
            "SELECT device, spec, predicted, measured FROM calibration ORDER BY device, spec",
            (),
            [],
        )
        digest = hashlib.sha256()
        for key, value in rows:
            if isinstance(key, str) and _is_tuned(value):
                digest.update(key.encode() + b"\0" + value.encode() + b"\0")
        digest.update(repr(calibration).encode())
        return digest.hexdigest()

    # ---- ATen calibration ---------------------------------------------------------------
    def add_calibration(
        self, device: str, spec_key: str, predicted: float, measured: float
    ) -> None:
        self._query(
            "calibration",
            "INSERT OR REPLACE INTO calibration VALUES (?, ?, ?, ?)",
            (device, spec_key, predicted, measured),
        )

    def calibration(self, device: str) -> float:
        """Median measured/predicted of ATen on `device` (1.0 with no measurements)."""
        rows = self._query(
            "calibration",
            "SELECT predicted, measured FROM calibration WHERE device = ?",
            (device,),
            [],
        )
        ratios = []
        for row in rows:
            pair = values.checked(list(row), values.Fixed(float, float), "calibration row")
            if pair is not None and pair[0] > 0 and pair[1] > 0:
                ratios.append(pair[1] / pair[0])
        return statistics.median(ratios) if ratios else 1.0

    # ---- management ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        def count(table: str) -> int:
            rows = self._query("stats", f"SELECT COUNT(*) FROM {table}", (), [(0,)])
            return rows[0][0]

        return {
            "path": str(self.path) if self.on_disk else f"{self.path} (unusable: in memory)",
            "bytes": self.path.stat().st_size if self.on_disk and self.path.exists() else 0,
            "records": count("records"),
            "calibration": count("calibration"),
            "reports": count("reports"),
        }

    def clear(self) -> None:
        def wipe() -> None:
            for table in ("records", "calibration", "reports"):
                self._conn.execute(f"DELETE FROM {table}")
            self._conn.execute("DELETE FROM meta WHERE key = 'generation'")

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
            value = row.fetchone()[0]
            if values.checked(value, GENERATION, "generation") is None:
                value = secrets.token_hex(16)
                self._conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (value,))
            return value

        return self._guard("generation", get_or_make, "unavailable")

    def rows(self, table: str) -> list[tuple[Any, Any]]:
        """(key, stored value) of every row of `records` or `reports`, unchecked (verify)."""
        assert table in ("records", "reports")
        return self._query(table, f"SELECT key, value FROM {table} ORDER BY created", (), [])

    def integrity(self) -> list[str]:
        """SQLite's integrity check of the file: ["ok"] when sound."""
        rows = self._query("integrity", "PRAGMA integrity_check", (), [("not checked",)])
        return [str(row[0]) for row in rows]

    # ---- sharing ------------------------------------------------------------------------
    def export_json(self, path: Path) -> int:
        """Write every decision to a JSON file (mode 0600); returns the number of records."""
        payload = {
            "format": EXPORT_FORMAT,
            "version": CACHE_VERSION,
            "records": [{"key": k, "value": v, "created": c} for k, v, c in self.records()],
        }
        write_private(Path(path), json.dumps(payload, indent=1, sort_keys=True))
        return len(payload["records"])

    def import_json(self, path: Path) -> int:
        """Merge the decisions of an exported file. Only records are read (anything else in
        the file is ignored); a record that is malformed or whose key is not the hash of its
        key parts is skipped and counted (cache.invalid). Returns the number imported."""
        try:
            payload = json.loads(Path(path).read_text(errors="replace"))
        except RecursionError:
            payload = None
        if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{path} is not a {EXPORT_FORMAT} export")
        if payload.get("version") != CACHE_VERSION or not isinstance(payload.get("records"), list):
            raise ValueError(f"{path} is not a version-{CACHE_VERSION} {EXPORT_FORMAT} export")
        imported = 0
        for item in payload["records"]:
            item = values.checked(item, values.EXPORTED, "imported record")
            if item is None:
                continue
            if key_of(item["value"]["key_parts"]) != item["key"]:
                values.invalid("imported record", "its key is not the hash of its key parts")
                continue
            self.put(item["key"], item["value"])
            imported += 1
        return imported


def _is_tuned(text: object) -> bool:
    """Whether stored record text is a tuned decision (anything malformed is not)."""
    if not isinstance(text, str):
        return False
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and value.get("origin") == "tuned"


def default_path() -> Path:
    from ..config import cache_root

    return cache_root() / "tuning.sqlite3"


_OPEN: dict[Path, TuningCache] = {}


def open_cache(path: Path | None = None) -> TuningCache:
    """The process-wide cache object for `path` (default: the per-user cache file)."""
    path = Path(path) if path is not None else default_path()
    cache = _OPEN.get(path)
    if cache is None or (cache.on_disk and not cache.path.exists()):
        cache = _OPEN[path] = TuningCache(path)
    return cache
