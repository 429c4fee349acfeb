"""Private files: every folder the project makes is 0700, every file 0600, and a folder it
did not make is used only when it is this user's alone.

    private_dir(path)        create (0700) or check a folder; raises UnsafeDirectory
    cache_subdir(path)       the same, checking the cache root first when path is in it
    dir_problem(path)        why a folder cannot hold this user's cache, or None
    write_private(path, ..)  write a file atomically, mode 0600
    tighten(path)            drop group and other bits under a folder (a debug dump)
    safe_name(name)          a stored name that may become one path component
    unusable(path, reason)   one warning per cache root: it cannot be used, and why

A folder is refused when it is not owned by this user or group or others can write it
(a symlink is judged by its target). Kept free of torch and triton so that
`convcompiler cache ...` starts without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
import tempfile
from pathlib import Path

from .counters import counters

log = logging.getLogger(__name__)

ENV_VAR = "CONVCOMPILER_CACHE_DIR"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
_warned: set[str] = set()


class UnsafeDirectory(PermissionError):
    """A folder another user owns, or one that group or others can write."""


def dir_problem(path: Path) -> str | None:
    """Why `path` (resolved through symlinks) cannot hold this user's private files, or None
    when it is a folder this user owns that group and others cannot write. A missing path
    has no problem: it will be created."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) readable by this user only (mode 0700), or check that an
    existing one is this user's alone. Raises UnsafeDirectory, or the OSError of a disk
    that cannot hold it (read-only, full, a file in its place)."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    problem = dir_problem(path)
    if problem is not None:
        raise UnsafeDirectory(f"{path} {problem}")
    return path


def cache_subdir(path: Path) -> Path:
    """private_dir(path), and when `path` lies inside the cache root, the root is checked
    (and made) first: a folder in a root that is not this user's alone is never used."""
    from .config import cache_root

    root = cache_root()
    if root in Path(path).parents:
        private_dir(root)
    return private_dir(path)


def write_private(path: Path, data: bytes | str) -> Path:
    """Write `data` to `path` atomically (a temporary file in the same folder, then a
    rename), mode 0600 whatever the umask."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def tighten(path: Path) -> None:
    """Make every folder under `path` 0700 and every file 0600 (files other code wrote
    there, such as Inductor's trace in a debug dump)."""
    for top, dirs, files in os.walk(path):
        os.chmod(top, 0o700)
        for name in files:
            full = os.path.join(top, name)
            if not os.path.islink(full):
                os.chmod(full, 0o600)


def safe_name(name: object) -> str:
    """`name` if it can be one path component (letters, digits, `_`, `.`, `-`; no leading
    dot; at most 200 characters), else ValueError: a stored name never becomes a path
    unchecked."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{name!r} is not a safe file name")
    return name


def unusable(path: Path, reason: object, fallback: str) -> None:
    """Say that `path` cannot be used and what happens instead: a warning naming the path
    and CONVCOMPILER_CACHE_DIR once per cache root and process, INFO after that."""
    counters["cache.degraded"] += 1
    key = str(_root_of(Path(path)))
    message = (
        f"convcompiler: {path} cannot be used ({reason}); {fallback}. Set {ENV_VAR} to a "
        "folder you own that only you can write (it is created with mode 0700)"
    )
    if key in _warned:
        log.info("%s", message)
        return
    _warned.add(key)
    log.warning("%s", message)


def _root_of(path: Path) -> Path:
    from .config import cache_root

    root = cache_root()
    return root if path == root or root in path.parents else path


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
