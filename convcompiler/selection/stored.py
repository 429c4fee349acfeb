"""Stored decisions: the local tuning cache first, then the fleet's remote cache, each
record checked against its schema and key parts, its schedule rebuilt through its
template's space and its kernel rendered again; nothing stored is executed."""

from __future__ import annotations

import dataclasses
from typing import Iterator

from ..codegen import kind_spaces, render_region
from ..counters import counters
from ..schedule import ATEN, InvalidSchedule, Schedule
from .cache_values import RECORD, checked, invalid
from .choice import CandidateRow, Choice, SelectionContext, Spec
from .cost import predict


def stored_schedule(data: dict, spec: Spec) -> Schedule:
    """A stored schedule rebuilt through its template's space (InvalidSchedule otherwise)."""
    if data["name"] == "aten" and not data["params"]:
        return ATEN
    space = kind_spaces(spec).get(data["name"])
    if space is None:
        raise InvalidSchedule(f"{data['name']!r} is not a template of this region")
    return space.make(spec, device=None, **dict(data["params"]))


def from_record(record: dict, spec: Spec, ctx: SelectionContext) -> Choice | None:
    """A cached decision, used only if it still holds (None: a miss):

    * a model record only under the ATen calibration it was ranked with;
    * its schedule (and plan) must be valid schedules of this region's templates;
    * a kernel's source is rendered again by the installed templates and must hash to the
      recorded SHA-256. Nothing stored is executed: the rendering is what runs.

    `record` has the cache_values.RECORD shape (TuningCache.get checked it)."""
    if record["origin"] == "model" and record["calibration"] != ctx.calibration:
        return None
    try:
        schedule = stored_schedule(record["schedule"], spec)
        planned = stored_schedule(record["plan"] or record["schedule"], spec)
    except (InvalidSchedule, TypeError) as err:
        invalid("record", f"its schedule: {err}")
        return None
    source = None
    if schedule.name != "aten":
        source = render_region(spec, schedule)
        stored = record["source"]
        if stored is None or stored["sha256"] != source.sha256:
            invalid("record", "its source hash is not what the installed templates render")
            return None
    counters["cache.hit"] += 1
    return Choice(
        schedule,
        "cache",
        f"cached {record['origin']} record: {record['why']}",
        fallback_reason=("cached decision: ATen is fastest" if schedule.name == "aten" else None),
        prediction=predict(spec, planned, ctx.device, ctx.calibration),
        candidates=tuple(CandidateRow(**row) for row in record["candidates"]),
        valid_for=record["valid_for"],
        source=source,
    )


def _records(key: str, parts: dict, ctx: SelectionContext) -> Iterator[tuple[str, dict]]:
    """The stored decisions for `key`, nearest first: ("local", record), then ("remote",
    record). The remote is asked only when the local one is missing or cannot be used, and
    its value is checked against the same schema and key parts as a local record."""
    if ctx.cache is not None:
        record = ctx.cache.get(key, parts)
        if record is not None:
            yield "local", record
    if ctx.remote is not None:
        value = ctx.remote.get(key)
        record = checked(value, RECORD, "remote record") if value else None
        if value is not None and (record is None or record["key_parts"] != parts):
            counters["remote.invalid"] += 1
        elif record is not None:
            yield "remote", record


def stored_decision(
    key: str, parts: dict, spec: Spec, ctx: SelectionContext, *, tuning: bool
) -> Choice | None:
    """Step 3 of selection: a stored decision that still holds, or None. A tuned record is
    always used; a cost-model one only while this compile does not tune. A remote hit fills
    the local cache and reports origin "remote" (so does a later region with its key)."""
    for where, record in _records(key, parts, ctx):
        usable = record["origin"] == "tuned" or not tuning
        choice = from_record(record, spec, ctx) if usable else None
        if choice is None:
            counters["cache.miss"] += 1
            continue
        if where == "remote":
            ctx.from_remote.add(key)
            if ctx.cache is not None:
                ctx.cache.put(key, record)  # a remote hit fills the local cache
        if key in ctx.from_remote:
            why = f"remote {record['origin']} record: {record['why']}"
            choice = dataclasses.replace(choice, origin="remote", why=why)
        return choice
    return None
