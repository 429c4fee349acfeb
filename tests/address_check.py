"""Every lane's address inside its tensor, masked lanes included: a check on Triton's interpreter.

On a GPU a masked `tl.load` may still issue its addresses: on sm_90 / sm_100 Triton can
pipeline it into an unpredicated `cp.async`, so a masked-out lane with a negative offset (the
padding halo above the first output row, say) reads ~16 GiB before the tensor once the offset
is widened unsigned, and the kernel faults or reads garbage (PyTorch PR 186440). Triton's
interpreter honours masks, so numerics tests cannot see it. While installed, this check wraps
the interpreter's memory builders and, for every load, store and atomic of every kernel it
launches, requires that all lanes' byte ranges [addr, addr + itemsize), masked ones included,
lie in the storage of one tensor argument: the one holding the unmasked lanes.

    with address_check() as check:      # raises AddressViolation at exit if any lane was out
        y = call(x, w, b)
    assert check.accesses > 0

or the `checked_addresses` fixture (see checked_addresses_fixture). Ranges are whole storages
(untyped_storage: data_ptr, nbytes), so strided views and views of one projection (q, k, v)
may read anywhere in the memory they share. Tensor-descriptor (TMA) loads are not wrapped:
the hardware bounds-checks their boxes, and no template uses them.
"""

from __future__ import annotations

import contextlib
import linecache
import sys
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pytest
from triton.runtime import interpreter as interp


class AddressViolation(AssertionError):
    """Some lane of some generated kernel formed an address outside its tensor."""


@dataclass
class Violation:
    """One load/store site that formed out-of-bounds addresses, aggregated over launches."""

    kernel: str
    file: str
    line: int
    op: str
    itemsize: int
    count: int = 0  # accesses (one per program and call) with lanes outside
    below: int = 0  # the furthest lane before the storage's start, in bytes
    above: int = 0  # the furthest lane byte past the storage's end, in bytes
    unmasked: bool = False  # an active lane was outside: wrong on any device
    source: str = ""

    def describe(self) -> str:
        extent = []
        if self.below:
            extent.append(f"{self.below} B ({self.below // self.itemsize} elements) before")
        if self.above:
            extent.append(f"{self.above} B ({-(-self.above // self.itemsize)} elements) past")
        lanes = "ACTIVE lanes" if self.unmasked else "masked lanes"
        return (
            f"{self.kernel} {self.op} at {self.file}:{self.line} ({self.count} accesses): "
            f"{lanes} up to {' and '.join(extent)} the tensor\n        {self.source}"
        )


@dataclass
class _Launch:
    kernel: str
    file: str
    ranges: list[tuple[int, int]] = field(default_factory=list)


class AddressCheck:
    """Records every access of the kernels launched while installed, and the violations."""

    def __init__(self) -> None:
        self.violations: dict[tuple[str, str, int, str], Violation] = {}
        self.accesses = 0  # loads, stores and atomics checked
        self.kernels: set[str] = set()  # the kernels launched
        self._launches: list[_Launch] = []

    # ---- what a launch may touch ----
    def _enter(self, executor) -> None:
        code = executor.fn.__code__
        self._launches.append(_Launch(executor.fn.__name__, code.co_filename))
        self.kernels.add(executor.fn.__name__)

    def _add_ranges(self, args: list, kwargs: dict) -> None:
        launch = self._launches[-1]
        for arg in [*args, *kwargs.values()]:
            for tensor in _tensors(arg):
                storage = tensor.untyped_storage()
                start, size = storage.data_ptr(), storage.nbytes()
                if size and (start, start + size) not in launch.ranges:
                    launch.ranges.append((start, start + size))

    # ---- one access ----
    def _check(self, op: str, ptrs, mask) -> None:
        if not self._launches:
            return  # a kernel called directly, not launched on a grid: nothing to compare with
        launch = self._launches[-1]
        self.accesses += 1
        addrs = np.asarray(ptrs.data, dtype=np.uint64).ravel()
        if mask is None:
            active = np.ones(addrs.shape, dtype=bool)
        else:
            active = np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape).ravel()
        itemsize = interp._get_np_dtype(ptrs.get_element_ty()).itemsize
        lo, hi = _derived_from(launch.ranges, addrs, active)
        # each lane's signed distance from the storage's start: a wrapped address stays negative
        rel = (addrs - np.uint64(lo)).view(np.int64)
        outside = (rel < 0) | (rel + itemsize > hi - lo)
        if not outside.any():
            return
        below, above = max(0, -int(rel.min())), max(0, int(rel.max()) + itemsize - (hi - lo))
        line = _kernel_line(launch.file)
        key = (launch.kernel, launch.file, line, op)
        v = self.violations.get(key)
        if v is None:
            source = linecache.getline(launch.file, line).strip()
            v = self.violations[key] = Violation(
                launch.kernel, launch.file.rsplit("/", 1)[-1], line, op, itemsize, source=source
            )
        v.count += 1
        v.below, v.above = max(v.below, below), max(v.above, above)
        v.unmasked |= bool((outside & active).any())

    def report(self) -> str:
        return "\n".join("  " + v.describe() for v in self.violations.values())

    def assert_clean(self) -> None:
        if self.violations:
            raise AddressViolation(
                f"{len(self.violations)} load/store sites formed addresses outside their "
                "tensor: bring masked offsets inside it before forming the pointer (see the "
                "note in convcompiler/codegen/template.py):\n" + self.report()
            )

    # ---- installing the wrappers ----
    @contextlib.contextmanager
    def installed(self) -> Iterator[AddressCheck]:
        check = self
        builder, executor = interp.InterpreterBuilder, interp.GridExecutor
        saved = {
            (builder, name): getattr(builder, name)
            for name in (
                "create_masked_load",
                "create_masked_store",
                "create_atomic_rmw",
                "create_atomic_cas",
            )
        }
        saved.update({(executor, n): getattr(executor, n) for n in ("__call__", "_init_args_hst")})
        real = {name: fn for (_, name), fn in saved.items()}

        def masked_load(self, ptrs, mask, *args):
            check._check("load", ptrs, mask)
            return real["create_masked_load"](self, ptrs, mask, *args)

        def masked_store(self, ptrs, value, mask, *args):
            check._check("store", ptrs, mask)
            return real["create_masked_store"](self, ptrs, value, mask, *args)

        def atomic_rmw(self, op, ptr, val, mask, *args):
            check._check("atomic", ptr, mask)
            return real["create_atomic_rmw"](self, op, ptr, val, mask, *args)

        def atomic_cas(self, ptr, *args):
            check._check("atomic", ptr, None)
            return real["create_atomic_cas"](self, ptr, *args)

        def call(self, *args, **kwargs):
            check._enter(self)
            try:
                return real["__call__"](self, *args, **kwargs)
            finally:
                check._launches.pop()

        def init_args(self, *args):
            args_hst, kwargs_hst = real["_init_args_hst"](self, *args)
            check._add_ranges(args_hst, kwargs_hst)  # the host copies the kernel addresses
            return args_hst, kwargs_hst

        wrappers = {
            "create_masked_load": masked_load,
            "create_masked_store": masked_store,
            "create_atomic_rmw": atomic_rmw,
            "create_atomic_cas": atomic_cas,
            "__call__": call,
            "_init_args_hst": init_args,
        }
        for owner, name in saved:
            setattr(owner, name, wrappers[name])
        try:
            yield self
        finally:
            for (owner, name), fn in saved.items():
                setattr(owner, name, fn)


def _tensors(arg) -> Iterator:
    if isinstance(arg, tuple):
        for a in arg:
            yield from _tensors(a)
    elif isinstance(arg, interp.TensorDescriptor):
        yield from _tensors(arg.base)
    elif hasattr(arg, "data_ptr"):
        yield interp._unwrap_tensor(arg)


def _derived_from(ranges: list[tuple[int, int]], addrs: np.ndarray, active: np.ndarray):
    """The storage the access belongs to: the one holding its active lanes (or, with every
    lane masked, the most lanes, else the nearest); a pseudo-range when there is none."""
    lanes = addrs[active] if active.any() else addrs
    lo, hi = int(lanes.min()), int(lanes.max())
    for start, end in ranges:
        if start <= lo and hi < end:
            return start, end
    if not active.any() and ranges:
        inside = [int(((addrs >= s) & (addrs < e)).sum()) for s, e in ranges]
        if max(inside):
            return ranges[inside.index(max(inside))]
        return min(ranges, key=lambda r: min(abs(lo - r[0]), abs(hi - r[1])))
    # active lanes in no argument (or across two): report against the nearest one below
    below = [r for r in ranges if r[0] <= lo] or ranges or [(lo, lo)]
    return max(below, key=lambda r: r[0])


def _kernel_line(kernel_file: str) -> int:
    """The line of the kernel's source that issued the access (the innermost frame there)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename == kernel_file:
            return frame.f_lineno
        frame = frame.f_back
    return 0


@contextlib.contextmanager
def address_check() -> Iterator[AddressCheck]:
    """Check every kernel launched inside; raise AddressViolation at exit if a lane was out."""
    check = AddressCheck()
    with check.installed():
        yield check
    check.assert_clean()


@pytest.fixture(name="checked_addresses")
def checked_addresses_fixture() -> Iterator[AddressCheck]:
    """`checked_addresses`: the test's kernels under the address check; the test fails if a
    lane was out. Import it into a test module (`from address_check import
    checked_addresses_fixture`) and name `checked_addresses` among the test's parameters."""
    with address_check() as check:
        yield check
