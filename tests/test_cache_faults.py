"""A broken or hostile disk degrades the cache, never the compile (issue 15).

Real faults, made in a private mount namespace (`unshare -m`; the suite runs as root, so
mode bits alone would not stop a write): a warm cache on a read-only mount, a read-only
$HOME, a full disk. And in this process: a file where the cache folder should be, a
database that cannot be opened, a root that is not this user's alone, corrupt files. Each
time the compile succeeds and is correct, one warning names the path and
CONVCOMPILER_CACHE_DIR, and a healthy database is never renamed.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from cache_procs import compile_in_new_process, need_unshare, private_env
from helpers import compile_matches_eager

import convcompiler
from convcompiler import files
from convcompiler.selection import cache as cache_module
from convcompiler.selection.cache import TuningCache, open_cache
from convcompiler.selection.cache_db import KEEP_CORRUPT, is_corrupt

ENV = "CONVCOMPILER_CACHE_DIR"


def _ro_bind(path: Path) -> str:
    return f"mount --bind {path} {path} && mount -o remount,bind,ro {path}"


def _one_warning(run, path: Path) -> None:
    found = run.warnings(ENV)
    assert len(found) == 1 and str(path) in found[0], run.stderr[-4000:]


def test_warm_cache_on_a_read_only_mount(tmp_path) -> None:
    need_unshare()
    env = private_env(tmp_path)
    root = tmp_path / "cache"
    compile_in_new_process(env)
    before = sorted(p.name for p in root.iterdir())
    run = compile_in_new_process(env, "both", mounts=_ro_bind(root))
    # Inductor serves the graph and the report is restored from a copy of the file; with
    # Inductor's caches off, every decision comes from that copy: nothing is made again.
    assert run.counters["inductor_cache.served"] == 1 and run.counters["cache.hit"] == 2
    assert run.counters["codegen.conv"] == 0 and run.counters["launch.conv"] == 4
    _one_warning(run, root / "tuning.sqlite3")
    assert sorted(p.name for p in root.iterdir()) == before  # nothing renamed or added


@pytest.mark.parametrize("cpu", ["aten", "interpret"])
def test_read_only_home(tmp_path, cpu) -> None:
    """No CONVCOMPILER_CACHE_DIR and a read-only $HOME: the default cache root cannot be
    made, Triton's own cache (for the static check) cannot be written."""
    need_unshare()
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    env = private_env(tmp_path)
    del env[ENV]
    env.pop("XDG_CACHE_HOME", None)
    env.pop("TRITON_CACHE_DIR", None)
    env.update(HOME=str(home), CONVCOMPILER_CPU=cpu)
    run = compile_in_new_process(env, mounts=_ro_bind(home))
    _one_warning(run, home / ".cache" / "convcompiler")
    if cpu == "interpret":
        assert run.counters["launch.conv"] == 2 and run.counters["verify.conv"] == 2
    assert not list(home.iterdir())


def test_full_disk(tmp_path) -> None:
    """A warm cache on a disk with no space left, and a compile that needs new decisions
    and kernel files: it runs from memory; the healthy database keeps its name."""
    need_unshare()
    env = private_env(tmp_path)
    warm = tmp_path / "cache"
    compile_in_new_process(env)
    full = tmp_path / "full"
    full.mkdir(mode=0o700)
    env[ENV] = str(full)
    mounts = (
        f"mount -t tmpfs -o size=1m,mode=0700 tmpfs {full} "
        f"&& cp -a {warm}/tuning.sqlite3* {warm}/kernels {full}/ "
        f"&& (dd if=/dev/zero of={full}/filler bs=4k 2>/dev/null || true) "
        f"&& ls {full} > {tmp_path}/before"
    )
    listing = f" && ls {full} > {tmp_path}/after"
    run = compile_in_new_process(env, "both", channels=5, mounts=mounts + listing)
    assert run.counters["launch.conv"] == 4 and run.counters["cache.degraded"] >= 1
    _one_warning(run, full)
    after = (tmp_path / "after").read_text().split()
    assert "tuning.sqlite3" in after and not [n for n in after if "corrupt" in n], after


def _check_compile(channels: int = 4) -> convcompiler.Report:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU()).eval()
    return compile_matches_eager(model, torch.randn(1, 3, 8, 8), launches=1)


@pytest.fixture
def fresh(monkeypatch):
    """No open caches and no warnings given yet in this process."""
    monkeypatch.setattr(cache_module, "_OPEN", {})
    monkeypatch.setattr(files, "_warned", set())


def _degraded(caplog, path: Path) -> None:
    """One warning names `path` and CONVCOMPILER_CACHE_DIR (later ones are INFO)."""
    found = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and ENV in r.getMessage()
    ]
    assert len(found) == 1 and str(path) in found[0], found


def test_a_file_where_the_cache_folder_should_be(tmp_path, monkeypatch, caplog, fresh) -> None:
    root = tmp_path / "root"
    root.write_text("not a folder")
    monkeypatch.setenv(ENV, str(root))
    with caplog.at_level(logging.INFO, logger="convcompiler"):
        report = _check_compile()
        _check_compile()
    _degraded(caplog, root / "tuning.sqlite3")
    assert root.read_text() == "not a folder"
    assert not Path(report[0].kernel_path).exists()  # the kernel ran from memory


def test_a_database_that_cannot_be_opened(tmp_path, monkeypatch, caplog, fresh) -> None:
    monkeypatch.setenv(ENV, str(tmp_path))
    (tmp_path / "tuning.sqlite3").mkdir()
    with caplog.at_level(logging.INFO, logger="convcompiler"):
        _check_compile()
    _degraded(caplog, tmp_path / "tuning.sqlite3")
    assert (tmp_path / "tuning.sqlite3").is_dir()  # not renamed
    assert not list(tmp_path.glob("*corrupt*"))


def _warm_root(root: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV, str(root))
    _check_compile()
    # closed now, not whenever the garbage collector gets to it: SQLite removes its -wal and
    # -shm files when the last connection closes, which must not happen in the middle of a
    # test that compares the root's files before and after
    for cache in cache_module._OPEN.values():
        cache.close()
    cache_module._OPEN.clear()


@pytest.mark.parametrize("how", ["0777", "symlink to 0777", "group-writable", "other owner"])
def test_a_root_that_is_not_this_users_alone_is_refused(
    tmp_path, monkeypatch, caplog, fresh, how
) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    _warm_root(root, monkeypatch)
    files._warned.clear()
    used = root
    if how == "0777":
        root.chmod(0o777)
    elif how == "group-writable":
        root.chmod(0o770)
    elif how == "symlink to 0777":
        root.chmod(0o777)
        used = tmp_path / "link"
        used.symlink_to(root)
    else:
        os.chown(root, 65534, 65534)
    monkeypatch.setenv(ENV, str(used))
    before = sorted(p.name for p in root.rglob("*"))
    with caplog.at_level(logging.INFO, logger="convcompiler"):
        _check_compile()
    # refused: nothing in it is read (the warm decision is made again) or written
    assert convcompiler.counters["cache.hit"] == 0 and convcompiler.counters["codegen.conv"] == 1
    assert sorted(p.name for p in root.rglob("*")) == before
    _degraded(caplog, used / "tuning.sqlite3")
    assert open_cache().on_disk is False


def test_corrupt_copies_are_capped(cache_dir, caplog) -> None:
    path = cache_dir / "tuning.sqlite3"
    old = int(time.time()) - 1000
    for i in range(5):
        (cache_dir / f"tuning.sqlite3.corrupt-1-{old + i}").write_bytes(b"old")
    path.write_bytes(os.urandom(8192))
    cache = TuningCache(path)
    assert cache.on_disk and cache.stats()["records"] == 0
    copies = sorted(p.name for p in cache_dir.glob("tuning.sqlite3.corrupt-*"))
    assert len(copies) == KEEP_CORRUPT, copies
    assert f"tuning.sqlite3.corrupt-1-{old + 4}" in copies  # the newest old ones stay
    assert any(str(os.getpid()) in name for name in copies)  # and the one just moved


def test_a_database_with_other_tables_is_rebuilt(cache_dir) -> None:
    path = cache_dir / "tuning.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE records (key TEXT, other TEXT)")
    conn.commit()
    conn.close()
    cache = TuningCache(path)
    assert cache.on_disk and convcompiler.counters["cache.rebuilt"] == 1
    cache.put("k", {"x": 1})
    assert len(cache.rows("records")) == 1


def test_an_older_format_database_keeps_no_records_and_no_sources(cache_dir) -> None:
    path = cache_dir / "tuning.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE records (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL);
        CREATE TABLE sources (sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, text TEXT NOT NULL);
        INSERT INTO records VALUES ('k', '{}', 0);
        INSERT INTO sources VALUES ('s', 'n', 'import os');
        """
    )
    conn.commit()
    conn.close()
    cache = TuningCache(path)
    assert cache.stats()["records"] == 0
    tables = {r[0] for r in cache._conn.execute("SELECT name FROM sqlite_master")}
    assert "sources" not in tables


def test_only_a_damaged_file_counts_as_corrupt(tmp_path) -> None:
    """Disk faults are never mistaken for corruption (that would rename a healthy file)."""
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(os.urandom(8192))
    with pytest.raises(sqlite3.DatabaseError) as err:
        sqlite3.connect(garbage).execute("PRAGMA quick_check").fetchall()
    assert is_corrupt(err.value)
    with pytest.raises(sqlite3.OperationalError) as err:
        sqlite3.connect(":memory:").execute("SELECT * FROM missing")
    assert not is_corrupt(err.value)
    for text in ("database is locked", "database or disk is full", "unable to open database"):
        assert not is_corrupt(sqlite3.OperationalError(text))
    for text in ("file is not a database", "database disk image is malformed"):
        assert is_corrupt(sqlite3.DatabaseError(text))


class _FailingWrites:
    """A connection whose writes fail as a disk would (everything else is the real one)."""

    def __init__(self, conn: sqlite3.Connection, error: str) -> None:
        self.conn, self.error = conn, error

    def execute(self, sql: str, *args):
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE", "BEGIN")):
            raise sqlite3.OperationalError(self.error)
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.conn, name)


@pytest.mark.parametrize(
    "error",
    [
        "database or disk is full",
        "database is locked",
        "attempt to write a readonly database",
        "disk I/O error",
    ],
)
def test_a_disk_that_fails_after_opening_moves_the_cache_to_memory(
    cache_dir, caplog, fresh, error
) -> None:
    path = cache_dir / "tuning.sqlite3"
    cache = open_cache()
    cache.put("old", {"kept": True})
    cache._conn = _FailingWrites(cache._conn, error)
    with caplog.at_level(logging.INFO, logger="convcompiler"):
        cache.put("new", {"kept": True})  # fails on disk, then succeeds in memory
    assert not cache.on_disk
    assert {key for key, _ in cache.rows("records")} == {"old", "new"}
    _degraded(caplog, path)
    assert path.is_file() and not list(cache_dir.glob("*corrupt*"))  # never renamed
    assert convcompiler.counters["cache.rebuilt"] == 0
