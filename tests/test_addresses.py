"""The address check itself (tests/address_check.py): it catches a planted out-of-bounds
masked load, reports masked lanes past the end, and leaves the interpreter as it found it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from address_check import AddressViolation, address_check, checked_addresses_fixture  # noqa: F401

from convcompiler.runtime.loader import interpret_mode

# ---- the check itself catches a planted out-of-bounds masked load -------------------------
with interpret_mode(True):

    @triton.jit
    def _shifted_copy(
        x_ptr, y_ptr, n, SHIFT: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr
    ):
        i = tl.arange(0, BLOCK)
        src = i - SHIFT  # lanes 0 .. SHIFT-1 read before x: masked, but an address all the same
        ok = (src >= 0) & (src < n)
        if CLAMP:
            src = tl.where(ok, src, 0)
        v = tl.load(x_ptr + src, mask=ok, other=0.0)
        tl.store(y_ptr + i, v, mask=i < n)


def test_check_catches_a_planted_masked_load_before_the_tensor() -> None:
    x, y = torch.arange(16.0), torch.empty(16)
    with pytest.raises(AddressViolation) as caught:
        with address_check() as check:
            _shifted_copy[(1,)](x, y, 16, SHIFT=3, CLAMP=False, BLOCK=16)
    [site] = check.violations.values()  # the load, 3 lanes (12 B) before x; not the store
    assert (site.kernel, site.op, site.below, site.above) == ("_shifted_copy", "load", 12, 0)
    assert not site.unmasked and "tl.load(x_ptr + src" in site.source
    assert f"_shifted_copy load at {Path(__file__).name}:{site.line}" in str(caught.value)
    assert "12 B (3 elements) before" in str(caught.value)
    assert torch.equal(y[3:], x[:13]) and torch.equal(y[:3], torch.zeros(3))  # masks honoured

    with address_check() as check:  # the same kernel with its offsets clamped is clean
        _shifted_copy[(1,)](x, y, 16, SHIFT=3, CLAMP=True, BLOCK=16)
    assert check.accesses == 2 and check.kernels == {"_shifted_copy"}


def test_check_catches_masked_lanes_past_the_end_and_restores_the_interpreter() -> None:
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.create_masked_load
    x, y = torch.arange(10.0), torch.empty(10)
    with pytest.raises(AddressViolation):
        with address_check() as check:  # lanes 10 .. 15 of the store (the load is clamped)
            _shifted_copy[(1,)](x, y, 10, SHIFT=0, CLAMP=True, BLOCK=16)
    extents = [(v.op, v.below, v.above, v.unmasked) for v in check.violations.values()]
    assert extents == [("store", 0, 24, False)]
    assert interpreter.InterpreterBuilder.create_masked_load is real


def test_the_fixture_checks_what_the_test_runs(checked_addresses) -> None:
    x, y = torch.arange(16.0), torch.empty(16)
    _shifted_copy[(1,)](x, y, 16, SHIFT=3, CLAMP=True, BLOCK=16)
    assert checked_addresses.accesses == 2 and not checked_addresses.violations
