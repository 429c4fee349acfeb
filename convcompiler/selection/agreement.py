"""Rank agreement: under torch.distributed, one rank decides each region and every rank runs
its decision.

Every rank of a DDP or FSDP job compiles the same graphs and would choose each region's
schedule by itself: with autotuning, N ranks tune every region N times, and they can pick
different kernels for the same layer (timings are noisy; their tuning caches differ), which
makes runs differ between ranks. Instead, past the explicit overrides (select.py, step 2):

    the first rank to reach a region claims it     store.add("claim/<key>", 1) == 1
      -> decides as usual: its tuning cache, else tuning, else the cost model
      -> publishes the decision                    store.set("decision/<key>", JSON)
    every other rank waits for that decision       store.wait(["decision/<key>"], timeout)
      -> runs it (origin "peer"); it neither reads its own tuning cache nor tunes, and
         keeps the decision in its tuning cache, so whichever rank claims the region in a
         later job finds it there

`<key>` is the region's tuning-cache key (cache.record_key: the spec, the planning device,
torch and triton versions, the templates and the codegen options), so only ranks that would
make the same decision share one. Decisions travel through the process group's key-value
store (the TCPStore that init_process_group or torchrun set up), not through collectives:
a read is addressed by its key, so it is never matched with another rank's different call,
whatever Inductor's caches or the tuning caches serve on each rank, ranks that compile
different graphs never wait for each other, and DDP's own collectives never interleave with
it. A rank only waits for a claim someone else holds, and a claim is published before its
rank waits for anything, so ranks cannot wait on each other in a cycle.

Agreement never makes a compile fail. If the store cannot be used, or a decision does not
arrive within option `rank_timeout` seconds (the claiming rank died or hangs), the rank logs
one warning, decides by itself, and stops agreeing for the rest of the process. Not
distributed, world size 1, or rank_timeout=0: no agreement and no store traffic.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

from ..config import Config
from ..counters import counters
from ..schedule import Schedule
from .choice import CandidateRow, Choice, SelectionContext, Spec
from .cost import predict

log = logging.getLogger(__name__)

PREFIX = "convcompiler/"
_off: str | None = None  # why agreement stopped in this process (logged once)


def turn_off(reason: str) -> None:
    """Stop agreeing for the rest of the process; the first reason is logged as a warning."""
    global _off
    counters["agree.failed"] += 1
    if _off is None:
        _off = reason
        log.warning(
            "convcompiler: ranks no longer agree on schedules in this process (%s); "
            "each rank now decides by itself",
            reason,
        )


def agreement_for(config: Config) -> Agreement | None:
    """The agreement for one compile, or None when there is nobody to agree with."""
    if config.rank_timeout <= 0 or _off is not None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        if world < 2:
            return None
        from torch.distributed import distributed_c10d

        store = dist.PrefixStore(PREFIX, distributed_c10d._get_default_store())
    except (RuntimeError, ValueError, AttributeError) as err:
        turn_off(f"the process group's store cannot be used: {type(err).__name__}: {err}")
        return None
    return Agreement(store, rank, world, float(config.rank_timeout))


@dataclass
class Agreement:
    """One compile's view of the job: the store, this rank and how long to wait."""

    store: Any  # a torch.distributed Store
    rank: int
    world: int
    timeout_s: float

    def agree(
        self, key: str, spec: Spec, ctx: SelectionContext, decide: Callable[[], Choice]
    ) -> Choice:
        """The decision for the region `key`: this rank's own when it claims the region
        first (published for the others), else the claiming rank's."""
        if _off is not None:
            return decide()
        try:
            claimed = self.store.add(f"claim/{key}", 1) == 1
        except (RuntimeError, ValueError) as err:  # DistError is a RuntimeError
            turn_off(f"claiming a region failed: {type(err).__name__}: {err}")
            return decide()
        if claimed:
            try:
                choice = decide()
            except BaseException as err:  # tell the waiting ranks, then fail as usual
                self._publish(key, {"rank": self.rank, "error": f"{type(err).__name__}: {err}"})
                raise
            self._publish(key, encode(choice, self.rank))
            counters["agree.decided"] += 1
            return choice
        payload = self._receive(key)
        if payload is None:
            return decide()
        if "error" in payload:
            log.warning(
                "rank %s could not decide %s (%s); deciding here",
                payload.get("rank"),
                spec.describe(),
                payload["error"],
            )
            return decide()
        try:
            choice = decode(payload, spec, ctx, self.rank)
        except (KeyError, TypeError, ValueError) as err:
            log.warning("a malformed decision for %s (%s); deciding here", spec.describe(), err)
            counters["agree.invalid"] += 1
            return decide()
        counters["agree.received" if choice.origin == "peer" else "agree.reused"] += 1
        return choice

    def _publish(self, key: str, payload: dict) -> None:
        try:
            self.store.set(f"decision/{key}", json.dumps(payload))
        except (RuntimeError, ValueError) as err:
            turn_off(f"publishing a decision failed: {type(err).__name__}: {err}")

    def _receive(self, key: str) -> dict | None:
        name = f"decision/{key}"
        try:
            self.store.wait([name], datetime.timedelta(seconds=self.timeout_s))
            return json.loads(self.store.get(name))
        except dist.DistStoreError as err:
            turn_off(
                f"no decision arrived within rank_timeout={self.timeout_s:g} s from the rank "
                f"that claimed the region ({err})"
            )
        except (RuntimeError, ValueError) as err:
            turn_off(f"reading a decision failed: {type(err).__name__}: {err}")
        return None


# ---- the decision as JSON ----------------------------------------------------------------------
def _schedule(value: dict) -> Schedule:
    return Schedule(value["name"], tuple((k, v) for k, v in value["params"]))


def encode(choice: Choice, rank: int) -> dict:
    """What the other ranks need to run the same kernel and report why (never code)."""
    plan = choice.prediction.schedule if choice.prediction is not None else choice.schedule
    return {
        "rank": rank,
        "schedule": choice.schedule.to_json(),
        "plan": plan.to_json(),  # the GPU plan, before tiles were re-picked for the CPU
        "origin": choice.origin,
        "why": choice.why,
        "fallback_reason": choice.fallback_reason,
        "candidates": [row.__dict__ for row in choice.candidates],
        "valid_for": choice.valid_for,
        "rejected": list(choice.rejected),
    }


def decode(payload: dict, spec: Spec, ctx: SelectionContext, rank: int) -> Choice:
    """The Choice a payload describes, as this rank reports it: "peer" when another rank
    decided, "cache" when it is this rank's own decision from earlier in the job."""
    sender = int(payload["rank"])
    if sender == rank:
        origin, why = "cache", f"this rank's decision earlier in this job ({payload['origin']})"
    else:
        origin, why = "peer", f"rank {sender}'s decision ({payload['origin']})"
    fallback = payload["fallback_reason"]
    return Choice(
        _schedule(payload["schedule"]),
        origin,
        f"{why}: {payload['why']}",
        fallback_reason=f"{why}: {fallback}" if fallback else None,
        prediction=predict(spec, _schedule(payload["plan"]), ctx.device, ctx.calibration),
        candidates=tuple(CandidateRow(**row) for row in payload["candidates"]),
        valid_for=payload["valid_for"],
        rejected=tuple(payload["rejected"]),
    )
