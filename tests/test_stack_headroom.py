"""Interpreted launches run with room on CPython's frame stack (runtime/stack_headroom.py).

Counted in page faults, not time: a loop of calls that straddles a frame chunk's edge maps a
fresh chunk, and so faults a page, on every call.
"""

from __future__ import annotations

import resource

import pytest
import torch

from convcompiler.runtime import kernel_call
from convcompiler.runtime.stack_headroom import with_headroom

CALLS = 5000


def _leaf(a: int, b: int) -> int:
    return a + b


def _hot_loop() -> int:
    total = 0
    for i in range(CALLS):
        total = _leaf(total, i)
    return total


def _at_depth(depth: int, fn, *args):
    return fn(*args) if depth == 0 else _at_depth(depth - 1, fn, *args)


def _worst_faults(run) -> int:
    """The most page faults one hot loop took, over every stack depth from 0 to 300 (16 KiB
    of small frames is about 150 of them)."""
    worst = 0
    for depth in range(300):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        _at_depth(depth, run)
        worst = max(worst, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return worst


def test_a_hot_loop_under_headroom_never_maps_a_chunk_per_call():
    assert with_headroom(_leaf, 2, 3) == 5
    assert _worst_faults(lambda: with_headroom(_hot_loop)) < CALLS // 10
    plain = _worst_faults(_hot_loop)
    if plain < CALLS:
        pytest.skip(f"this CPython keeps its frame chunks ({plain} faults at worst without)")


def test_cpu_launches_go_through_the_headroom(monkeypatch):
    seen = []
    monkeypatch.setattr(kernel_call, "with_headroom", lambda fn, *a: seen.append(a) or fn(*a))
    x = torch.ones(2)
    assert kernel_call.launch_on_device(lambda t: t + 1, (x,)).tolist() == [2.0, 2.0]
    assert len(seen) == 1 and seen[0][0] is x
