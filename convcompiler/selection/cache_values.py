"""What a value read back from the tuning cache, or from an import file, must look like.

Every stored JSON value is parsed by `load` against one of the schemas below, written out
as plain data:

    str, int, float, bool, list, dict, None
                            that type (int and float never accept a bool; a float is
                            finite and may be written as an int)
    (a, b)                  any one of a and b
    {"key": schema, ...}    an object with exactly these keys
    [schema]                a list whose items all match
    Fixed(a, b), OneOf(..), Map(..), Text(regex), Name()   see the classes

Anything else (`[]`, `null`, a missing key, a string where a number goes, nesting too deep
for the parser) is a miss: `invalid` counts it (`cache.invalid`) and logs it once per kind
of value and process. Nothing here raises on a stored value. What a schema cannot say (a
schedule the templates do not know, a source hash the templates do not render) is checked
where the value is used (stored.py `from_record`), with the same outcome.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from ..counters import counters
from ..files import safe_name

log = logging.getLogger(__name__)
_logged: set[str] = set()


class Fixed:
    """A list of exactly these items, e.g. a [name, value] pair."""

    def __init__(self, *items: object) -> None:
        self.items = items

    def problem(self, value: object, where: str) -> str | None:
        if not isinstance(value, list) or len(value) != len(self.items):
            return f"{where} is not a list of {len(self.items)}"
        for i, (item, schema) in enumerate(zip(value, self.items)):
            found = problem(item, schema, f"{where}[{i}]")
            if found:
                return found
        return None


class OneOf:
    """One of these exact values."""

    def __init__(self, *values: object) -> None:
        self.values = values

    def problem(self, value: object, where: str) -> str | None:
        ok = any(type(value) is type(v) and value == v for v in self.values)
        return None if ok else f"{where} is not one of {list(self.values)}"


class Map:
    """An object with any keys, every key a string and every value of one schema."""

    def __init__(self, values: object) -> None:
        self.values = values

    def problem(self, value: object, where: str) -> str | None:
        if not isinstance(value, dict):
            return f"{where} is not an object"
        for key, item in value.items():
            found = problem(item, self.values, f"{where}.{key}")
            if found:
                return found
        return None


class Text:
    """A string matching a regular expression in full."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def problem(self, value: object, where: str) -> str | None:
        ok = isinstance(value, str) and self.pattern.fullmatch(value) is not None
        return None if ok else f"{where} is not of the form {self.pattern.pattern}"


class Name:
    """A name that may become one path component (files.safe_name)."""

    def problem(self, value: object, where: str) -> str | None:
        try:
            safe_name(value)
        except ValueError:
            return f"{where} is not a safe file name"
        return None


def problem(value: object, schema: object, where: str = "value") -> str | None:
    """Why `value` does not match `schema` (module docstring), or None."""
    if schema is None:
        return None if value is None else f"{where} is not null"
    if schema is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{where} is not an integer"
    if schema is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok and math.isfinite(value) else f"{where} is not a finite number"
    if isinstance(schema, type):  # str, bool, list, dict
        return None if isinstance(value, schema) else f"{where} is not a {schema.__name__}"
    if isinstance(schema, tuple):
        found = [problem(value, s, where) for s in schema]
        return None if None in found else " and ".join(found)
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{where} is not an object"
        if set(value) != set(schema):
            return f"{where} has keys {sorted(value)[:8]}, not {sorted(schema)}"
        for key, sub in schema.items():
            found = problem(value[key], sub, f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where} is not a list"
        for i, item in enumerate(value):
            found = problem(item, schema[0], f"{where}[{i}]")
            if found:
                return found
        return None
    return schema.problem(value, where)


JSON = (str, int, float, bool, None, list, dict)  # any JSON value
SHA256 = Text(r"[0-9a-f]{64}")
SCHEDULE = {"name": str, "params": [Fixed(str, (int, str))]}
CANDIDATE = {"schedule": str, "predicted_s": float, "measured_s": (float, None)}

# One decision (lowering.remember): everything in it is data. `source` names the kernel the
# schedule renders to and its SHA-256, checked against a fresh rendering before use.
KEY_PARTS = {  # cache.record_key
    "version": int,
    "kind": str,
    "spec": str,
    "device": str,
    "capability": [int],
    "torch": str,
    "triton": str,
    "templates": SHA256,
    "config": Map(JSON),
    "benchmarker": str,
}
RECORD = {
    "key_parts": KEY_PARTS,
    "spec": Map(JSON),
    "schedule": SCHEDULE,
    "plan": (SCHEDULE, None),
    "origin": OneOf("tuned", "model"),
    "why": str,
    "candidates": [CANDIDATE],
    "valid_for": (str, None),
    "rejected": [str],
    "source": ({"sha256": SHA256, "name": Name()}, None),
    "calibration": float,
    "created": str,
}

# One region row of a stored report (inspection/report.py RegionRecord, field for field).
REGION_ROW = {
    "name": str,
    "kind": str,
    "stage": str,
    "spec": str,
    "schedule": str,
    "params": str,
    "kernel_path": (str, None),
    "fallback_reason": (str, None),
    "why": str,
    "epilogue": str,
    "mode": (str, None),
    "origin": str,
    "predicted_us": (float, None),
    "flops": (float, None),
    "bytes_moved": (float, None),
    "cost": (str, None),
    "candidates": [CANDIDATE],
    "valid_for": (str, None),
    "key_tiles": (float, None),
    "plan_key_tiles": (float, None),
}

# The report of one compile (frontend/session.py): rows, devices, and the kernel references
# the compiled graph calls, each with whether it runs interpreted.
REPORT = {
    "version": OneOf(2),
    "templates": SHA256,  # cache.templates_hash() of the installation that stored it
    "regions": [REGION_ROW],
    "devices": Map(str),
    "recomputed": [str],
    "kernels": [Fixed(str, bool)],
}

# One record of an export file.
EXPORTED = {"key": SHA256, "value": RECORD, "created": float}


def invalid(what: str, reason: str) -> None:
    """Count a malformed stored value as a miss; log the first of each kind per process."""
    counters["cache.invalid"] += 1
    if what in _logged:
        log.debug("tuning cache: malformed %s (%s)", what, reason)
        return
    _logged.add(what)
    log.warning(
        "tuning cache: a malformed %s is ignored and counts as a miss (%s); later ones are "
        "counted in convcompiler.counters['cache.invalid']",
        what,
        reason,
    )


def checked(value: object, schema: object, what: str) -> Any | None:
    """`value` if it matches `schema`; otherwise None, counted by `invalid`."""
    found = problem(value, schema, what)
    if found is not None:
        invalid(what, found)
        return None
    return value


def load(text: object, schema: object, what: str) -> Any | None:
    """The stored JSON text `text` parsed and checked against `schema`, or None (counted)."""
    if not isinstance(text, str):
        invalid(what, f"a stored {type(text).__name__}, not JSON text")
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        invalid(what, f"not JSON: {str(err)[:80]}")
        return None
    return checked(value, schema, what)
