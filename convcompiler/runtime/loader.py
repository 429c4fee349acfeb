"""Write generated sources to the kernel directory and load them only after a hash check.

Files are named `<region geometry>_<schedule>_<sha256[:16]>.py`. Loading reads the file
back, checks its SHA-256 against the expected one, and executes exactly the bytes it
checked. A file altered on disk is never executed: it is rewritten from the rendered
source and checked again.

A kernel folder that cannot be written (not this user's alone, read-only, full, a file in
its place) does not stop a compile: the rendered source, whose hash was checked, is
executed from memory under the name its file would have, after one warning
(files.unusable) naming the folder and CONVCOMPILER_CACHE_DIR.

On CPU tensors kernels run through Triton's interpreter. `@triton.jit` decides interpreted
or compiled when it wraps a function, so a module is executed once per mode, with
`triton.knobs.runtime.interpret` set accordingly; both kinds can live in one process.
"""

from __future__ import annotations

import contextlib
import linecache
import logging
import types
from pathlib import Path
from typing import Iterator

import triton

from ..codegen import KernelSource
from ..counters import counters
from ..files import cache_subdir, safe_name, sha256_of, unusable, write_private

log = logging.getLogger(__name__)

_MODULES: dict[tuple[str, bool], types.ModuleType] = {}


class KernelIntegrityError(RuntimeError):
    """A kernel file's content does not match the hash it is expected to have."""


def write_source(source: KernelSource, directory: Path) -> Path:
    """Make `directory/source.filename` hold exactly `source.text`; returns the path.
    Raises OSError (UnsafeDirectory included) when the folder cannot hold it."""
    path = cache_subdir(Path(directory)) / safe_name(source.filename)
    if path.exists():
        if sha256_of(path.read_bytes()) == source.sha256:
            counters["kernel_file.reused"] += 1
            return path
        log.warning("kernel file %s does not match its hash; rewriting it", path)
        counters["kernel_file.rewritten"] += 1
    write_private(path, source.text)
    counters["kernel_file.written"] += 1
    return path


def keep_source(source: KernelSource, directory: Path) -> Path:
    """Write a kernel file for inspection (cpu="plan", or a launcher traced into the graph);
    a folder that cannot hold it is reported once and the file's would-be path returned."""
    try:
        return write_source(source, directory)
    except OSError as err:
        unusable(Path(directory), err.strerror or err, "kernel files are not written")
        return Path(directory) / safe_name(source.filename)


@contextlib.contextmanager
def interpret_mode(on: bool) -> Iterator[None]:
    # Setting a knob also sets its environment variable (TRITON_INTERPRET); the knobs' own
    # scope puts both back as they were, unset included.
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = on
        yield


def exec_module(text: str, path: Path, *, interpret: bool) -> types.ModuleType:
    """Execute checked module text as a fresh module whose source lives at `path`."""
    filename = str(path)
    # inspect.getsource (used by @triton.jit) reads from linecache: give it the checked text.
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    module = types.ModuleType(f"convcompiler_kernels.{path.stem}")
    module.__file__ = filename
    code = compile(text, filename, "exec")
    with interpret_mode(interpret):
        exec(code, module.__dict__)
    return module


def load_verified(path: Path, sha256: str, *, interpret: bool) -> types.ModuleType:
    """Execute the module at `path` if, and only if, its bytes hash to `sha256`."""
    cached = _MODULES.get((sha256, interpret))
    if cached is not None:
        return cached
    data = path.read_bytes()
    if sha256_of(data) != sha256:
        raise KernelIntegrityError(f"{path} does not hash to {sha256[:16]}; refusing to load it")
    module = exec_module(data.decode(), path, interpret=interpret)
    _MODULES[(sha256, interpret)] = module
    counters["kernel_module.loaded"] += 1
    return module


def load_source(
    source: KernelSource, directory: Path, *, interpret: bool
) -> tuple[types.ModuleType, Path]:
    """Write (if needed), verify and load a generated module; returns it and its file (the
    name it would have, when the folder cannot be written: module docstring)."""
    try:
        path = write_source(source, directory)
        try:
            return load_verified(path, source.sha256, interpret=interpret), path
        except KernelIntegrityError:
            # Changed between the write and the read: rewrite once, then trust only the check.
            path = write_source(source, directory)
            return load_verified(path, source.sha256, interpret=interpret), path
    except OSError as err:
        path = Path(directory) / safe_name(source.filename)
        unusable(Path(directory), err.strerror or err, "kernels run from memory, no file")
        return load_text(source, path, interpret=interpret), path


def load_text(source: KernelSource, path: Path, *, interpret: bool) -> types.ModuleType:
    """Execute a rendered source (its hash is its text's) whose file could not be written;
    `path` is the name tracebacks and Triton's source lookup see."""
    cached = _MODULES.get((source.sha256, interpret))
    if cached is None:
        cached = _MODULES[(source.sha256, interpret)] = exec_module(
            source.text, path, interpret=interpret
        )
        counters["kernel_module.loaded"] += 1
    return cached
