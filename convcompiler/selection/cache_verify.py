"""`convcompiler cache verify`: the file's integrity, and every stored decision regenerated.

For each record: its value must have the RECORD shape, its key must be the hash of its key
parts, and its spec must be the one the key names. A record made by this installation
(same cache version, torch, triton and template hashes) is then regenerated: its schedule
rebuilt through its template's space and its kernel rendered by the installed templates,
which must hash to the recorded SHA-256. A record made by another installation can never
be used here (its key does not match) and is listed as such, not regenerated. Each stored
report must have the REPORT shape and every kernel reference in it must render to its
hash (a report stored by other templates is listed as such).

Imports torch (through the templates) when it runs; `convcompiler cache list` does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton

from ..codegen import KernelSource, render_region, spec_kind
from ..runtime.kernel_ref import decode
from ..runtime.loader import KernelIntegrityError
from ..schedule import InvalidSchedule
from ..spec import SpecError, spec_from_json
from . import cache_values as values
from .cache import CACHE_VERSION, TuningCache, key_of, templates_hash
from .stored import stored_schedule

OK, OTHER, MALFORMED, MISMATCH = "ok", "another installation", "malformed", "MISMATCH"


@dataclass(frozen=True)
class Finding:
    table: str
    key: str
    status: str  # OK, OTHER, MALFORMED or MISMATCH
    detail: str = ""


def regenerate(value: dict[str, Any]) -> KernelSource | None:
    """The source a well-formed record's decision renders to now (None for ATen); raises
    SpecError or InvalidSchedule when the record does not describe a region's kernel."""
    spec = spec_from_json(value["spec"])
    schedule = stored_schedule(value["schedule"], spec)
    return None if schedule.name == "aten" else render_region(spec, schedule)


def _this_installation(parts: dict[str, Any]) -> bool:
    return (
        parts["version"] == CACHE_VERSION
        and parts["torch"] == torch.__version__
        and parts["triton"] == triton.__version__
        and parts["templates"] == templates_hash()
    )


def check_record(key: object, text: object) -> Finding:
    """One record (module docstring)."""
    label = key[:12] if isinstance(key, str) else repr(key)[:12]
    value = values.load(text, values.RECORD, "record")
    if value is None:
        return Finding("records", label, MALFORMED, "not a well-formed decision")
    parts = value["key_parts"]
    if key_of(parts) != key:
        return Finding("records", label, MALFORMED, "its key is not the hash of its key parts")
    if not _this_installation(parts):
        return Finding("records", label, OTHER, f"torch {parts['torch']}")
    try:
        spec = spec_from_json(value["spec"])
        if spec.key() != parts["spec"] or spec_kind(spec) != parts["kind"]:
            return Finding("records", label, MISMATCH, "its spec is not the one its key names")
        source = regenerate(value)
    except (SpecError, InvalidSchedule, TypeError) as err:
        return Finding("records", label, MALFORMED, str(err))
    stored = value["source"]
    if source is None:
        ok = stored is None
        return Finding("records", label, OK if ok else MISMATCH, "aten")
    if stored is None or stored["sha256"] != source.sha256:
        return Finding("records", label, MISMATCH, f"{source.name} renders to {source.sha256[:16]}")
    return Finding("records", label, OK, source.filename)


def check_report(key: object, text: object) -> Finding:
    label = key[:20] if isinstance(key, str) else repr(key)[:20]
    value = values.load(text, values.REPORT, "report")
    if value is None:
        return Finding("reports", label, MALFORMED, "not a well-formed report")
    if value["templates"] != templates_hash():
        return Finding("reports", label, OTHER, "other templates")
    for ref_text, _ in value["kernels"]:
        try:
            decode(ref_text).source()
        except SpecError as err:
            return Finding("reports", label, MALFORMED, str(err))
        except KernelIntegrityError as err:
            return Finding("reports", label, MISMATCH, str(err))
    return Finding("reports", label, OK, f"{len(value['kernels'])} kernels")


def verify(cache: TuningCache) -> tuple[list[str], list[Finding]]:
    """(SQLite's integrity check, a finding per record and report)."""
    findings = [check_record(k, v) for k, v in cache.rows("records")]
    findings += [check_report(k, v) for k, v in cache.rows("reports")]
    return cache.integrity(), findings
