"""Schedules: the algorithm and tile parameters chosen for one region, as a frozen value.

A schedule space is declared next to its kernel template (see `codegen/`):

    SPACE = schedule_space("im2win_implicit", BLOCK_M=(16, 32, 64, 128), ...)(check)

`check(spec, schedule, device)` raises `InvalidSchedule` with a reason for combinations the
kernel cannot run; the tuner and the cost model skip those. `device` is the GPU the
schedule is planned for, whose limits (registers, shared memory) apply; None means Triton's
interpreter, which has none.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Union

from .devices import Device
from .spec import ConvSpec

Param = Union[int, str]


class InvalidSchedule(ValueError):
    """A schedule (or parameter combination) this spec cannot run; the message says why."""


@dataclass(frozen=True)
class Schedule:
    """An algorithm name plus sorted (name, value) parameters."""

    name: str
    params: tuple[tuple[str, Param], ...] = ()

    def __getitem__(self, key: str) -> Param:
        for name, value in self.params:
            if name == key:
                return value
        raise KeyError(f"schedule {self.name!r} has no parameter {key!r}")

    def get(self, key: str, default: Param | None = None) -> Param | None:
        return dict(self.params).get(key, default)

    def as_dict(self) -> dict[str, Param]:
        return dict(self.params)

    def to_json(self) -> dict:
        """{"name": ..., "params": [[name, value], ...]}: how records and peers store it."""
        return {"name": self.name, "params": [list(p) for p in self.params]}

    def describe(self) -> str:
        inner = " ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.name}({inner})" if inner else self.name

    def key(self) -> str:
        return self.describe()


ATEN = Schedule("aten")

CheckFn = Callable[[ConvSpec, Schedule, "Device | None"], None]


@dataclass(frozen=True)
class ScheduleSpace:
    """The tile-parameter space of one kernel template, and its validity check."""

    name: str
    choices: tuple[tuple[str, tuple[Param, ...]], ...]
    check: CheckFn

    def make(self, spec: ConvSpec, *, device: Device | None = None, **params: Param) -> Schedule:
        """A validated schedule; raises InvalidSchedule with the reason otherwise."""
        names = dict(self.choices)
        unknown = sorted(set(params) - set(names))
        missing = sorted(set(names) - set(params))
        if unknown or missing:
            raise InvalidSchedule(
                f"{self.name}: unknown parameters {unknown}, missing parameters {missing}"
            )
        for name, value in params.items():
            if value not in names[name]:
                raise InvalidSchedule(f"{self.name}: {name}={value!r} not in {names[name]}")
        schedule = Schedule(self.name, tuple(sorted(params.items())))
        self.check(spec, schedule, device)
        return schedule

    def candidates(
        self, spec: ConvSpec, *, device: Device | None = None, **fixed: Param
    ) -> Iterator[Schedule]:
        """Every valid schedule of this space for `spec` on `device`, `fixed` pinned."""
        names = [name for name, _ in self.choices]
        grid = [(fixed[name],) if name in fixed else values for name, values in self.choices]
        for values in itertools.product(*grid):
            try:
                yield self.make(spec, device=device, **dict(zip(names, values)))
            except InvalidSchedule:
                continue


def schedule_space(name: str, **choices: tuple[Param, ...]) -> Callable[[CheckFn], ScheduleSpace]:
    """Decorator: turn a check function into the ScheduleSpace `name` with these choices."""

    def wrap(check: CheckFn) -> ScheduleSpace:
        return ScheduleSpace(name, tuple((k, tuple(v)) for k, v in choices.items()), check)

    return wrap
