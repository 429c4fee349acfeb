"""Private files and content hashes: the two things every cache writer needs.

Kept free of torch and triton so that `convcompiler cache ...` starts without them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) readable by this user only (mode 0700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
