"""Opening the tuning cache's SQLite file, and what a broken or hostile disk does to it.

A connection ends up in one of three places:

    on disk      the file opened, its quick check passed, the schema is there
    rebuilt      the file was corrupt (not a database, malformed, failed quick_check):
                 it is moved to `<name>.corrupt-<pid>-<time>` (the newest KEEP_CORRUPT are
                 kept) and an empty one is made in its place
    in memory    the disk cannot hold it: the folder is not this user's alone, read-only,
                 full or missing (a file in its place), or the file cannot be opened or is
                 locked. Whatever the file holds is copied into memory when it can still be
                 read; this process then keeps its decisions there. A healthy file is never
                 renamed. One warning names the path and CONVCOMPILER_CACHE_DIR.

The file, its -wal and its -shm are 0600: the file is created 0600 before SQLite opens it,
so SQLite creates the other two with the same mode, and they are checked after each open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path

from ..counters import counters
from ..files import UnsafeDirectory, private_dir, unusable

log = logging.getLogger(__name__)

KEEP_CORRUPT = 3
SUFFIXES = ("", "-wal", "-shm")
IN_MEMORY = "this process keeps its tuning decisions in memory"

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS reports (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS calibration (
    device TEXT NOT NULL, spec TEXT NOT NULL, predicted REAL NOT NULL, measured REAL NOT NULL,
    PRIMARY KEY (device, spec));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
COLUMNS = {
    "records": ["key", "value", "created"],
    "reports": ["key", "value", "created"],
    "calibration": ["device", "spec", "predicted", "measured"],
    "meta": ["key", "value"],
}
# The layout of the tables and of the values in them. A file of an older format (format 1
# also stored kernel sources) keeps nothing: its records could never be used again.
FORMAT = "2"


class Corrupt(sqlite3.DatabaseError):
    """The file is not a sound database: moved aside and rebuilt."""


def is_corrupt(err: BaseException) -> bool:
    """Whether a SQLite error says the file itself is damaged (not the disk around it)."""
    if isinstance(err, Corrupt):
        return True
    name = getattr(err, "sqlite_errorname", None)
    if name is not None:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    text = str(err)
    return "malformed" in text or "not a database" in text


def connect(path: Path) -> sqlite3.Connection:
    """Open the file at `path` in WAL mode, check it, and make sure the schema is there.
    Raises Corrupt, another sqlite3.Error, or OSError."""
    private_dir(path.parent)
    if not path.exists():
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 60000")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.debug("tuning cache %s runs in %s journal mode", path, mode)
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise Corrupt(f"quick_check: {check}")
        conn.executescript(SCHEMA)
        check_columns(conn)
        upgrade(conn)
        private_files(path)
    except BaseException:
        conn.close()
        raise
    return conn


def check_columns(conn: sqlite3.Connection) -> None:
    """Raise Corrupt unless every table has exactly the columns this version writes."""
    for table, columns in COLUMNS.items():
        found = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
        if found != columns:
            raise Corrupt(f"table {table} has columns {found}, not {columns}")


def upgrade(conn: sqlite3.Connection) -> None:
    """Empty a database of an older format (drop what it stored) and mark it FORMAT."""

    def current() -> bool:
        row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        return row is not None and row[0] == FORMAT

    if current():
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not current():  # another process may have upgraded it meanwhile
            conn.execute("DROP TABLE IF EXISTS sources")
            for table in ("records", "reports"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("DELETE FROM meta WHERE key = 'generation'")
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('format', ?)", (FORMAT,))
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def private_files(path: Path) -> None:
    """Mode 0600 for the database and whichever of its -wal and -shm exist."""
    for suffix in SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(str(path) + suffix, 0o600)


def open_db(path: Path) -> tuple[sqlite3.Connection, bool]:
    """A connection for the cache at `path`, and whether it is on disk (module docstring)."""
    try:
        return connect(path), True
    except sqlite3.Error as err:
        if not is_corrupt(err):
            return in_memory(path, err), False
        corrupt = err
    except UnsafeDirectory as err:  # not this user's alone: nothing in it is read
        return in_memory(path, err, copy=False), False
    except OSError as err:
        return in_memory(path, err.strerror or err), False
    try:
        move_aside(path, corrupt)
        return connect(path), True
    except (sqlite3.Error, OSError) as err:
        return in_memory(path, err), False


def in_memory(
    path: Path, reason: object, source: sqlite3.Connection | None = None, copy: bool = True
) -> sqlite3.Connection:
    """An in-memory database holding what `source` (or the file at `path`, read only) still
    gives, unless `copy` is False, after one warning (files.unusable)."""
    unusable(path, reason, IN_MEMORY)
    memory = sqlite3.connect(":memory:", isolation_level=None)
    for copy_from in _readers(path, source) if copy else ():
        try:
            with copy_from() as conn:
                conn.backup(memory)
            break
        except (sqlite3.Error, OSError) as err:
            log.debug("tuning cache %s: no copy (%s)", path, err)
            memory.close()
            memory = sqlite3.connect(":memory:", isolation_level=None)
    memory.executescript(SCHEMA)
    return memory


def _readers(path: Path, source: sqlite3.Connection | None):
    """Ways to read what is stored: the open connection, then the file read-only, then the
    file as immutable (a read-only mount, where SQLite cannot make the -shm)."""
    if source is not None:
        yield lambda: contextlib.nullcontext(source)
    if path.is_file():
        uri = Path(os.path.abspath(path)).as_uri()
        for flags in ("mode=ro", "mode=ro&immutable=1"):
            yield lambda flags=flags: contextlib.closing(
                sqlite3.connect(f"{uri}?{flags}", uri=True, timeout=1)
            )


def move_aside(path: Path, err: BaseException) -> None:
    """Rename a corrupt database (and its -wal and -shm) out of the way; keep the newest
    KEEP_CORRUPT such copies."""
    aside = path.with_name(f"{path.name}.corrupt-{os.getpid()}-{int(time.time())}")
    log.warning(
        "tuning cache %s is unreadable (%s); moving it to %s and rebuilding", path, err, aside.name
    )
    counters["cache.rebuilt"] += 1
    for suffix in SUFFIXES:
        src = Path(str(path) + suffix)
        if src.exists():
            os.replace(src, Path(str(aside) + suffix))
    cap_corrupt(path)


def cap_corrupt(path: Path, keep: int = KEEP_CORRUPT) -> None:
    """Delete all but the newest `keep` `<name>.corrupt-*` copies of `path`."""
    copies = [
        p
        for p in path.parent.glob(f"{path.name}.corrupt-*")
        if not p.name.endswith(("-wal", "-shm"))
    ]
    copies.sort(key=_moved_at, reverse=True)
    for old in copies[keep:]:
        for suffix in SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(old) + suffix)


def _moved_at(path: Path) -> tuple[int, float]:
    """When a corrupt copy was moved aside: the time in its name, then its mtime."""
    stamp = path.name.rsplit("-", 1)[-1]
    return (int(stamp) if stamp.isdigit() else 0, path.stat().st_mtime)
