"""The GPU command's two outputs: `gpu_report.json` (checked against gpu_report.schema.json)
and `gpu_report.md`, whose sections are, in order:

    # convcompiler GPU report       the command, the mode, the time used against the limit
    ## Machine                      versions, GPU, planning device
    ## Summary                      one line per part: budget, time, status, cases, headline
    ## a. Native correctness ... ## GPU tests      one section per part (MARKDOWN_SECTIONS)
    ## Problems                     mismatches, errors, static-check problems, cut parts
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

SCHEMA = Path(__file__).with_name("gpu_report.schema.json")
TITLES = {
    "correctness": "a. Native correctness",
    "layer_speed": "b. Per-layer speed",
    "window_attention": "c. Attention",
    "end_to_end": "d. End to end",
    "autotune": "e. Autotuning calibration",
    "gpu_tests": "GPU tests",
}
MARKDOWN_SECTIONS = ("Machine", "Summary", *TITLES.values(), "Problems")
_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "number": (int, float),
    "integer": int,
    "boolean": bool,
    "null": type(None),
}


def validate(value, schema: dict | None = None, path: str = "$") -> list[str]:
    """Where `value` breaks the schema (the subset the schema file uses); [] when it fits."""
    schema = json.loads(SCHEMA.read_text()) if schema is None else schema
    errors = []
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        fits = any(
            isinstance(value, _TYPES[t])
            and not (t in ("number", "integer") and value is True)
            and not (t in ("number", "integer") and value is False)
            for t in names
        )
        if not fits:
            return [f"{path}: {type(value).__name__} is not {' or '.join(names)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        errors.append(f"{path}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
        errors += [f"{path}: missing {k!r}" for k in schema.get("required", ()) if k not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += validate(value[key], sub, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


# ---- summaries ------------------------------------------------------------------------------
def _median(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def summarize(name: str, rows: list[dict]) -> dict:
    summary: dict = {"status": dict(Counter(r.get("status", "?") for r in rows))}
    kernels = [k for r in rows for k in r.get("kernels", ())]
    if kernels:
        summary["kernels_compiled"] = sum(k["compiled"] for k in kernels)
        summary["kernels_with_problems"] = sum(bool(k["problems"]) for k in kernels)
    if name == "correctness":
        families = Counter(r["case"].split()[1] for r in rows if len(r["case"].split()) > 1)
        summary["families"] = dict(families)
        errs = [r["rel_err"] for r in rows if "rel_err" in r]
        summary["worst_rel_err"] = max(errs) if errs else None
    if name == "layer_speed":
        for group in ("float16 b32", "float32 b32", "float16 b1", "float32 b1"):
            dtype, batch = group.split()
            ratios = [
                r["cudnn_over_im2win"]
                for r in rows
                if "cudnn_over_im2win" in r and f" {batch} {dtype}" in r["case"]
            ]
            summary[f"median cudnn/im2win {group}"] = _median(ratios)
    if name == "autotune":
        from .gpu_speed import calibration_summary

        summary.update(calibration_summary(rows))
    return summary


def problems_of(part: dict) -> list[str]:
    found = [f"{part['name']}: {note}" for note in part["notes"] if part["status"] != "complete"]
    for row in part["rows"]:
        status = row.get("status")
        if status in ("mismatch", "error", "failed", "problem"):
            detail = row.get("error") or "; ".join(row.get("problems", ())) or ""
            if status == "mismatch":
                detail = f"rel_err {row.get('rel_err')} > tolerance {row.get('tolerance')}"
            found.append(f"{part['name']}: {row['case']}: {status}: {detail}"[:400])
    return found


# ---- markdown ---------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return "-" if v is None else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "/") for c in row) + " |" for row in rows]
    return lines


COLUMNS = {
    "correctness": ["case", "status", "schedule", "rel_err", "eager_rel_err", "tolerance"],
    "layer_speed": [
        "case",
        "status",
        "chosen",
        "ms",
        "tflops",
        "peak_fraction",
        "cudnn_over_im2win",
        "inductor_max_autotune_ms",
    ],  # fmt: skip
    "window_attention": ["case", "status", "ms", "vs_eager", "rel_err"],
    "end_to_end": [
        "case",
        "status",
        "ms",
        "eager_over_variant",
        "peak_mem_mb",
        "first_call_s",
        "rel_diff_vs_eager",
        "fallbacks",
    ],  # fmt: skip
    "autotune": ["case", "status", "model_first", "measured_winner", "first_error", "regret"],
    "gpu_tests": ["case", "status", "seconds", "message"],
}
DRY_COLUMNS = ["case", "status", "schedule", "kernels", "problems"]


def _cell(row: dict, column: str):
    value = row.get(column)
    if column == "kernels" and value is not None:
        return "; ".join(
            f"{k['kernel']} REG {k['registers']} spill {k['spill_bytes']} tc {k['tensor_core_ops']}"
            for k in value
        )
    if column == "problems" and value is not None:
        return "; ".join(value)
    return value


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# convcompiler GPU report",
        "",
        f"`{report['command']}`: {report['mode']}, started {report['started_at']}, "
        f"{report['elapsed_s']:.0f} s of the {report['limit_s']:.0f} s limit"
        f"{'' if report['complete'] else ' (INCOMPLETE)'}.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {_fmt(v)}" for k, v in m.items()],
        "",
        "## Summary",
        "",
        *_table(
            ["part", "budget s", "time s", "status", "done / planned", "summary"],
            [
                [
                    p["title"],
                    p["budget_s"],
                    p["elapsed_s"],
                    p["status"],
                    f"{p['done']} / {_fmt(p['planned'])}",
                    p["summary"],
                ]  # fmt: skip
                for p in report["parts"]
            ],
        ),
    ]
    for part in report["parts"]:
        columns = DRY_COLUMNS if report["mode"] == "dry-run" else COLUMNS[part["name"]]
        lines += ["", f"## {part['title']}", ""]
        lines += [f"- {note}" for note in part["notes"]]
        lines += [""] if part["notes"] else []
        lines += _table(columns, [[_cell(r, c) for c in columns] for r in part["rows"]])
    lines += ["", "## Problems", ""]
    lines += [f"- {p}" for p in report["problems"]] or ["None."]
    return "\n".join(lines) + "\n"
