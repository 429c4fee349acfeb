"""One resettable counter object for matches, fallbacks, kernel generation and launches.

Keys are dotted names, for example:

    match.conv       a conv region was matched and will run a generated kernel
    fallback.conv    a conv ran ATen; the reason is in the report
    codegen.conv     a kernel source was rendered
    launch.conv      a generated conv kernel was launched at run time
    launch.window_attention   a fused window-attention kernel was launched
    match.linear     a linear with an activation or residual add became a 1x1-conv region
    launch.linear    ... and its kernel (epilogue fused) was launched
    shape_constant.built      a shape-only subgraph (Swin's shift mask) was evaluated
    tune.region      a region was autotuned (tune.benchmark: each candidate timed)
    agree.decided    under torch.distributed, this rank decided a region for every rank
    agree.received   ... and took another rank's decision (agree.failed: it could not)
    remote.hit       a decision came from the Redis remote cache (remote.miss, remote.store,
                     remote.invalid: malformed there, remote.error: unreachable or too slow)

Tests reset it with `counters.reset()` and assert on the numbers, the way Inductor's
`torch._dynamo.utils.counters` is used.
"""

from __future__ import annotations

import collections


class Counters(collections.Counter):
    """A `collections.Counter` with a `reset()`; missing keys read as 0."""

    def reset(self) -> None:
        self.clear()

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v}" for k, v in sorted(self.items()))
        return f"Counters({items})"


counters = Counters()
