"""Run a call with room on CPython's frame stack, so that a hot loop of small calls never
straddles the edge of a frame chunk.

CPython (3.11 and 3.12) keeps a thread's Python frames in chunks of 16 KiB and frees a chunk
as soon as the first frame in it returns. A loop that calls a function whose frame lands just
across a chunk's edge therefore maps and unmaps a chunk on every call. Triton's interpreter
makes millions of small calls per launch, so where a launch begins near an edge (which
depends only on how deep the caller's stack happens to be) it runs about three times slower,
most of it in the kernel's page-fault and mmap code. Measured here: resnet18's compiled
training step at 32 px under pytest, 190 s at the depth pytest gave it and 60 s with the
launch run as below.

`with_headroom(fn, *args)` calls `fn` from one frame of 4096 locals (32 KiB): it never fits
in what is left of a 16 KiB chunk, so CPython opens a fresh 64 KiB chunk for it, and every
frame the call makes fits after it in the same chunk. The chunk is mapped once per call.
"""

from __future__ import annotations

from typing import Any, Callable

_LOCALS = 4096  # 32 KiB of frame: more than a whole standard chunk


def _build() -> Callable[..., Any]:
    # The only way to declare that many locals is to write them; the text is built here from
    # constants, never read from anywhere.
    names = " = ".join(f"_{i}" for i in range(_LOCALS))
    text = f"def with_headroom(fn, *args):\n    {names} = None\n    return fn(*args)\n"
    namespace: dict[str, Any] = {}
    exec(compile(text, __file__ + ":with_headroom", "exec"), namespace)  # noqa: S102
    return namespace["with_headroom"]


with_headroom = _build()
with_headroom.__doc__ = "Call fn(*args) from a frame that starts a fresh frame-stack chunk."
