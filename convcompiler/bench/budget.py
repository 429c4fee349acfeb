"""Time budgets for the GPU command: one limit for the run, one allotment per part.

    budget = Budget(limit_s=480, parts={"correctness": 75, ...}, reserve_s=25)
    part = budget.start("correctness")     # a PartBudget
    for case in cases:
        if not part.admits(estimate_s):     # is there time for one more step?
            break                           # part.cut says why, for the report
        ...                                 # the step
        part.step_done()
    budget.finish(part)

The rules, on an injectable clock (tests use a fake one):

  * the run's deadline is its start + `limit_s`; the last `reserve_s` are kept for writing
    the report, so no part may run into them;
  * a part's deadline is the earlier of its start + its allotment and the run's deadline
    minus the reserve: a part never gets more than its allotment, and a late part gets less;
  * a step is admitted only when its estimated cost fits before the part's deadline. The
    estimate is the caller's, else the slowest step of this part so far (0 before the first:
    a part always tries one step when it has any time left);
  * a part whose deadline has passed, or that declines a step, is cut: `cut` says after
    how many steps and why.

Cooperative checks cannot stop a step that hangs (a kernel that never returns). The command
runs each part in a subprocess and kills it at the part's deadline plus `grace_s`, which is
less than the reserve, so no part can push the run past its limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

Clock = Callable[[], float]


@dataclass
class PartBudget:
    name: str
    allotment_s: float
    started: float
    deadline: float
    clock: Clock
    steps: int = 0
    slowest_step_s: float = 0.0
    cut: str | None = None
    ended: float | None = None
    _step_started: float | None = field(default=None, repr=False)

    def remaining(self) -> float:
        return max(0.0, self.deadline - self.clock())

    def admits(self, estimate_s: float | None = None) -> bool:
        """True when one more step of `estimate_s` (default: the slowest so far) fits."""
        if self.cut is not None:
            return False
        estimate = self.slowest_step_s if estimate_s is None else estimate_s
        left = self.deadline - self.clock()
        if left <= 0 or estimate > left:
            self.cut = (
                f"cut short after {self.steps} step(s): the next needs ~{estimate:.1f} s, "
                f"{max(left, 0.0):.1f} s of the part's {self.allotment_s:.0f} s were left"
            )
            return False
        self._step_started = self.clock()
        return True

    def step_done(self) -> float:
        """Record the step admitted last; returns its duration."""
        now = self.clock()
        seconds = now - (self._step_started if self._step_started is not None else now)
        self._step_started = None
        self.steps += 1
        self.slowest_step_s = max(self.slowest_step_s, seconds)
        return seconds

    @property
    def elapsed_s(self) -> float:
        return (self.ended if self.ended is not None else self.clock()) - self.started

    @classmethod
    def for_seconds(cls, name: str, seconds: float, clock: Clock = time.monotonic) -> PartBudget:
        """A part's budget inside its subprocess: `seconds` from now, as the command granted."""
        now = clock()
        return cls(name, seconds, now, now + seconds, clock)


class Budget:
    def __init__(
        self,
        limit_s: float,
        parts: dict[str, float],
        *,
        reserve_s: float = 25.0,
        grace_s: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if grace_s >= reserve_s:
            raise ValueError("the kill grace must be shorter than the reserve for the report")
        if sum(parts.values()) + reserve_s > limit_s * (1 + 1e-9):  # scaled budgets: rounding
            raise ValueError(
                f"allotments {sum(parts.values()):.0f} s + reserve {reserve_s:.0f} s exceed the "
                f"limit {limit_s:.0f} s"
            )
        self.limit_s, self.parts, self.reserve_s, self.grace_s = limit_s, parts, reserve_s, grace_s
        self.clock = clock
        self.started = clock()
        self.deadline = self.started + limit_s
        self.finished: list[PartBudget] = []

    def start(self, name: str) -> PartBudget:
        now = self.clock()
        allotment = self.parts[name]
        deadline = min(now + allotment, self.deadline - self.reserve_s)
        part = PartBudget(name, allotment, now, max(now, deadline), self.clock)
        if deadline <= now:
            part.cut = "skipped: the run's time is spent (the reserve is kept for the report)"
        return part

    def kill_after_s(self, part: PartBudget) -> float:
        """Seconds from now after which the part's subprocess is killed."""
        return part.remaining() + self.grace_s

    def finish(self, part: PartBudget) -> None:
        part.ended = self.clock()
        self.finished.append(part)

    def elapsed_s(self) -> float:
        return self.clock() - self.started
