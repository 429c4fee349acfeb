"""Conv weights in im2win order, packed once and reused while the weight is unchanged.

The GEMM schedules read the filter as `w_packed[k, kx, ky, c]` (a window's weights are one
contiguous run). A launcher is handed `weight` as a [K, C/G, KH, KW] tensor and reads
`weight.permute(0, 3, 2, 1)`, copying it only when that is not contiguous. Two ways keep
the copy out of the steady state (the lowering picks one: KernelRef.weight):

* graph ops ("graph"): the lowering puts the pack in the graph (permute, clone, permute
  back), where Inductor fuses it with whatever computes the weight: autocast's cast, Tune
  mode's `W * c`, weight standardisation. Training graphs and CUDA graphs always do this;
* `packed_view(weight)` below ("cached"): only for a module's parameter or buffer that
  reaches the op straight from a graph input, in inference. It caches the packed copy per
  weight tensor and reuses it while the tensor is the same object, at the same address and
  the same version counter (`Tensor._version`, bumped by every in-place write: an optimizer
  step, `load_state_dict`, `weight.mul_(2)` under no_grad). A changed weight is packed
  again; a freed one drops its entry.

A weight the graph computes must never come here: it lives in one of Inductor's buffers,
which Inductor reuses for other tensors of the same size and writes through raw pointers,
so the same object at the same address with the same version can hold another layer's
weight (issue 25: efficientnet_b0 under autocast).

`SERVED` records the last packs and reuses (which tensor each served), so that tests can
prove that no pack is ever served for a different weight.
"""

from __future__ import annotations

import collections
import threading
import weakref
from dataclasses import dataclass

import torch

from ..counters import counters

_lock = threading.RLock()  # a weakref callback may fire while it is held


@dataclass
class _Entry:
    ref: weakref.ref
    version: int
    data_ptr: int
    meta: tuple
    view: torch.Tensor


_PACKS: dict[int, _Entry] = {}


@dataclass(frozen=True)
class Served:
    """One call of `packed_view` that packed ("packed") or reused ("reused") a pack."""

    event: str
    tensor_id: int  # id() of the weight tensor the pack was served for
    data_ptr: int
    version: int


SERVED: collections.deque[Served] = collections.deque(maxlen=4096)


def order(ndim: int) -> list[int]:
    """The permutation that puts a conv weight in im2win order: [K, KW, KH, C/G] for a 2-D
    conv's [K, C/G, KH, KW], [K, KW, C/G] for a 1-D conv's [K, C/G, KW], [K, KW, KH, KD, C/G]
    for a 3-D conv's (it is its own inverse)."""
    return [0, *range(ndim - 1, 0, -1)]


def is_packed(weight: torch.Tensor) -> bool:
    """True when the weight is already stored in im2win order (no copy needed)."""
    return weight.dim() not in (3, 4, 5) or weight.permute(order(weight.dim())).is_contiguous()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A view, shaped like `weight`, of a fresh copy of it in im2win order."""
    perm = order(weight.dim())
    with torch.no_grad():
        return weight.permute(perm).contiguous().permute(perm)


def _forget(key: int) -> None:
    with _lock:
        _PACKS.pop(key, None)


def packed_view(weight: torch.Tensor) -> torch.Tensor:
    """`weight` itself when already in im2win order, else its cached packed view."""
    if is_packed(weight):
        return weight
    if weight.is_inference():  # inference tensors keep no version counter: pack every call
        counters["pack.untracked"] += 1
        return pack(weight)
    key = id(weight)
    meta = (tuple(weight.shape), weight.stride(), weight.dtype, weight.device)
    with _lock:
        entry = _PACKS.get(key)
    if (
        entry is not None
        and entry.ref() is weight
        and entry.version == weight._version
        and entry.data_ptr == weight.data_ptr()
        and entry.meta == meta
    ):
        counters["pack.reused"] += 1
        SERVED.append(Served("reused", key, entry.data_ptr, entry.version))
        return entry.view
    view = pack(weight)
    ref = weakref.ref(weight, lambda _, key=key: _forget(key))
    with _lock:
        _PACKS[key] = _Entry(ref, weight._version, weight.data_ptr(), meta, view)
    counters["pack.packed"] += 1
    SERVED.append(Served("packed", key, weight.data_ptr(), weight._version))
    return view


def clear() -> None:
    with _lock:
        _PACKS.clear()
        SERVED.clear()
