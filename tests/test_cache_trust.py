"""Nothing from a cache runs unless this installation generated it (issue 15).

A stored kernel, a stored decision, a stored report or an export file is tampered with as
an attacker would: a payload appended and every stored hash of it rewritten. The next
compile, in a new process, never runs the payload and its output is correct. Every JSON
value in the database replaced by `[]`, `null` or `{}` is a counted miss, and every part of
a decision's key is in the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sqlite3
import stat
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from cache_procs import compile_in_new_process, private_env
from helpers import compile_matches_eager, run_compiled

import convcompiler
from convcompiler.devices import lookup
from convcompiler.inspection.cli import main
from convcompiler.selection import cache_values
from convcompiler.selection.cache import TuningCache, key_of, open_cache, record_key

PAYLOAD = "\nopen({marker!r}, 'w').write('payload ran')\n"


def _rewrite_hashes(text: str, renamed: dict[str, str]) -> str:
    """Every old SHA-256 (and its 16-character prefix in a file name) replaced by the new."""
    for old, new in renamed.items():
        text = text.replace(old, new).replace(old[:16], new[:16])
    return text


def test_payload_in_stored_kernels_with_every_hash_rewritten_never_runs(
    tmp_path, monkeypatch, capsys
) -> None:
    env = private_env(tmp_path)
    compile_in_new_process(env)
    root = tmp_path / "cache"
    marker = tmp_path / "marker"
    renamed = {}
    for path in sorted((root / "kernels").glob("*.py")):
        text = path.read_text() + PAYLOAD.format(marker=str(marker))
        old = hashlib.sha256(path.read_bytes()).hexdigest()
        new = hashlib.sha256(text.encode()).hexdigest()
        renamed[old] = new
        (path.parent / path.name.replace(old[:16], new[:16])).write_text(text)
        path.write_text(text)  # and under its old name, which its hash no longer matches
    assert len(renamed) == 2
    db = sqlite3.connect(root / "tuning.sqlite3")
    with db:
        for table in ("records", "reports"):
            rows = db.execute(f"SELECT key, value FROM {table}").fetchall()
            assert rows, table
            for key, value in rows:
                changed = _rewrite_hashes(value, renamed)
                assert changed != value, (table, value)
                db.execute(f"UPDATE {table} SET value = ? WHERE key = ?", (changed, key))
    db.close()
    counters = compile_in_new_process(env, "both").counters
    assert not marker.exists(), "a payload in a stored kernel ran"
    assert counters["inductor_cache.served"] == 1  # the stored report: its hashes fail
    assert counters["cache.invalid"] >= 3  # that report, then both records
    assert counters["codegen.conv"] == 2 and counters["launch.conv"] == 4
    assert counters["kernel_file.rewritten"] == 2  # the files under their old names
    # `cache verify` finds what was changed (the compile above stored fresh records, so
    # change one again)
    monkeypatch.setenv("CONVCOMPILER_CACHE_DIR", str(root))
    cache = open_cache()
    key, value, _ = cache.records()[0]
    value["source"]["sha256"] = next(iter(renamed.values()))
    cache.put(key, value)
    assert main(["cache", "verify"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_payload_in_an_export_is_never_run(tmp_path, monkeypatch, capsys) -> None:
    """A crafted export: a kernel source with a payload and its hash, records naming it, and
    a record whose kernel name climbs out of the kernel folder. Imported into an empty
    cache, none of it is stored as code and the next compile runs none of it."""
    env = private_env(tmp_path)
    compile_in_new_process(env)
    exported = tmp_path / "shared.json"
    monkeypatch.setenv("CONVCOMPILER_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["cache", "export", str(exported)]) == 0
    marker = tmp_path / "marker"
    payload = json.loads(exported.read_text())
    sources = []
    for path in sorted((tmp_path / "cache" / "kernels").glob("*.py")):
        text = path.read_text() + PAYLOAD.format(marker=str(marker))
        sha = hashlib.sha256(text.encode()).hexdigest()
        sources.append({"sha256": sha, "name": path.stem.rsplit("_", 1)[0], "text": text})
    for item, source in zip(payload["records"], sources):
        item["value"]["source"] = {"sha256": source["sha256"], "name": source["name"]}
    climbing = json.loads(json.dumps(payload["records"][0]))
    climbing["value"]["source"]["name"] = "../../../../elsewhere/x"
    payload["records"].append(climbing)
    payload["sources"] = sources  # what format 1 shipped; an import reads records only
    exported.write_text(json.dumps(payload))

    empty = tmp_path / "empty"
    monkeypatch.setenv("CONVCOMPILER_CACHE_DIR", str(empty))
    convcompiler.counters.reset()
    assert main(["cache", "import", str(exported)]) == 0
    assert "imported 2 records" in capsys.readouterr().out
    assert convcompiler.counters["cache.invalid"] == 1  # the climbing name
    data = b"".join(p.read_bytes() for p in empty.glob("tuning.sqlite3*"))
    assert b"payload ran" not in data and b"@triton.jit" not in data

    env["CONVCOMPILER_CACHE_DIR"] = str(empty)
    counters = compile_in_new_process(env, "both").counters
    assert not marker.exists(), "a payload in an imported export ran"
    assert not (tmp_path / "elsewhere").exists()
    assert counters["cache.invalid"] >= 2  # the two records naming payload hashes
    assert counters["codegen.conv"] >= 2


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()


def compile_and_check(x: torch.Tensor) -> convcompiler.Report:
    """Compiled == float64 eager, and both generated kernels launched."""
    return compile_matches_eager(small_model(), x, launches=2)


REPLACEMENTS = {
    "[]": "[]",
    "null": "null",
    "{}": "{}",
    "deep": "[" * 100_000 + "]" * 100_000,
    "huge int": "1" * 5000,
    "wrong types": json.dumps({"schedule": {"name": 3, "params": {}}, "origin": []}),
}


@pytest.mark.parametrize("replacement", list(REPLACEMENTS))
def test_every_stored_json_value_replaced_is_a_counted_miss(cache_dir, replacement) -> None:
    x = torch.randn(1, 3, 8, 8)
    compile_and_check(x)
    cache = open_cache()
    text = REPLACEMENTS[replacement]
    with cache._conn:
        for table in ("records", "reports"):
            assert cache._conn.execute(f"UPDATE {table} SET value = ?", (text,)).rowcount
    compile_and_check(x)  # Inductor serves the graph; the stored report is malformed
    assert convcompiler.counters["inductor_cache.served"] == 1
    assert convcompiler.counters["cache.invalid"] == 1
    with torch._inductor.config.patch(force_disable_caches=True):
        report = compile_and_check(x)  # the records are read, and are malformed
    assert convcompiler.counters["cache.invalid"] == 2 and convcompiler.counters["cache.hit"] == 0
    assert [r.origin for r in report] == ["model", "model"]
    with cache._conn:
        cache._conn.execute("UPDATE meta SET value = ?", (text,))
        cache._conn.execute("INSERT INTO calibration VALUES ('h100', 'spec', ?, ?)", (text, text))
    compile_and_check(x)
    assert convcompiler.counters["cache.invalid"] >= 2  # the generation and calibration


def test_unknown_schedule_and_bad_params_are_misses(cache_dir) -> None:
    x = torch.randn(1, 3, 8, 8)
    compile_and_check(x)
    cache = open_cache()
    bad = [
        {"name": "nope", "params": []},
        {"name": "im2win_implicit", "params": [["BLOCK_M", 3]]},
        {"name": "im2win_implicit", "params": [["spec", 1]]},
    ]
    for schedule in bad:
        with cache._conn:
            for key, value, _ in cache.records():
                value["schedule"] = schedule
                cache._conn.execute(
                    "UPDATE records SET value = ? WHERE key = ?", (json.dumps(value), key)
                )
        with torch._inductor.config.patch(force_disable_caches=True):
            compile_and_check(x)
        assert convcompiler.counters["cache.invalid"] == 2, schedule
        assert convcompiler.counters["cache.hit"] == 0


def test_stored_values_written_by_this_version_match_their_schemas(cache_dir, capsys) -> None:
    """What the backend writes passes its own checks (or every warm compile would miss),
    and the report schema names RegionRecord's fields exactly."""
    x = torch.randn(1, 3, 8, 8)
    compile_and_check(x)
    cache = open_cache()
    records = cache.rows("records")
    assert len(records) == 2
    for key, text in records:
        value = json.loads(text)
        assert cache_values.problem(value, cache_values.RECORD) is None
        assert key_of(value["key_parts"]) == key
    for _, text in cache.rows("reports"):
        assert cache_values.problem(json.loads(text), cache_values.REPORT) is None
    fields = {f.name for f in dataclasses.fields(convcompiler.RegionRecord)}
    assert set(cache_values.REGION_ROW) == fields
    assert convcompiler.counters["cache.invalid"] == 0
    # `cache list` shows both decisions; `cache verify` regenerates both and the report
    assert main(["cache", "list"]) == 0
    listing = capsys.readouterr().out
    assert "2 decisions" in listing and "im2win" in listing and "gemm_1x1" in listing
    assert main(["cache", "verify"]) == 0
    assert capsys.readouterr().out.splitlines()[-3:] == [
        "records: 2 ok",
        "reports: 1 ok",
        "integrity: ok",
    ]


def _key_args() -> dict:
    return {
        "kind": "conv",
        "spec_key": "ConvSpec(in_channels=3)",
        "device": lookup("h100"),
        "config_fields": {"cpu": "interpret", "schedule": None, "target": None},
        "benchmarker": "none",
    }


def _changed_parts(parts: dict) -> dict[str, dict]:
    """For each key part, a copy of `parts` with only that part changed."""
    other = {
        "version": parts["version"] + 1,
        "kind": "window_attention",
        "spec": parts["spec"] + "x",
        "device": "a100",
        "capability": [8, 0],
        "torch": "0.0.0",
        "triton": "0.0.0",
        "templates": "0" * 64,
        "config": {**parts["config"], "verify": False},
        "benchmarker": "fake",
    }
    assert set(other) == set(parts), "a new key part needs a case here"
    return {name: {**parts, name: value} for name, value in other.items()}


def _record(parts: dict) -> dict:
    """A well-formed ATen decision for `parts`."""
    return {
        "key_parts": parts,
        "spec": {},
        "schedule": {"name": "aten", "params": []},
        "plan": None,
        "origin": "model",
        "why": "test",
        "candidates": [],
        "valid_for": None,
        "rejected": [],
        "source": None,
        "calibration": 1.0,
        "created": "now",
    }


def test_every_key_part_changes_the_key_and_is_a_miss(tmp_path) -> None:
    cache = TuningCache(tmp_path / "tuning.sqlite3")
    key, parts = record_key(**_key_args())
    cache.put(key, _record(parts))
    assert cache.get(key, parts) is not None
    for name, changed in _changed_parts(parts).items():
        assert key_of(changed) != key, name
        assert cache.get(key_of(changed), changed) is None, name  # nothing under its key
        assert cache.get(key, changed) is None, name  # nor under the old one
    assert record_key(**_key_args()) == (key, parts)  # and the key is deterministic


CODEGEN_CHANGES = {
    "cpu": "plan",
    "schedule": "im2win_band",
    "target": "a100",
    "verify": False,
    "top_k": 7,
}


@pytest.mark.parametrize("field", list(CODEGEN_CHANGES))
def test_every_codegen_field_is_a_key_part(field) -> None:
    """Each Config field that changes decisions (the CPU mode and the planning target
    included) changes the key of a spec's decision."""
    from convcompiler.selection.select import SelectionContext

    assert set(CODEGEN_CHANGES) == set(convcompiler.Config.codegen_fields)
    changes = CODEGEN_CHANGES

    base = convcompiler.Config(cpu="interpret")
    other = base.replace(**{field: changes[field]})
    assert getattr(other, field) != getattr(base, field)
    spec = _spec()
    keys = [
        SelectionContext(config, lookup("h100"), "test").key(spec)[0] for config in (base, other)
    ]
    assert keys[0] != keys[1]


def _spec():
    from convcompiler.frontend.kernels import conv_spec_of

    return conv_spec_of(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, 1, 1)


def test_a_model_record_under_another_calibration_is_a_miss(cache_dir, monkeypatch) -> None:
    x = torch.randn(1, 3, 8, 8)
    compile_and_check(x)
    from convcompiler.selection.cache import TuningCache as Cache

    monkeypatch.setattr(Cache, "calibration", lambda self, device: 1.5)
    with torch._inductor.config.patch(force_disable_caches=True):
        report = compile_and_check(x)
    assert convcompiler.counters["cache.hit"] == 0
    assert [r.origin for r in report] == ["model", "model"]


MODEL_FILE = """
import torch.nn as nn

def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))
"""


@pytest.mark.parametrize("first", ["explain", "run"])
def test_explain_and_a_cpu_run_reuse_nothing_of_each_other(cache_dir, first, capsys) -> None:
    """`convcompiler explain` plans (cpu="plan") and a CPU run interprets: in either order,
    the second one reuses no decision, report or compiled graph of the first."""
    model_file = cache_dir / "net.py"
    model_file.write_text(MODEL_FILE)
    x = torch.randn(1, 3, 8, 8)

    def explain() -> None:
        torch._dynamo.reset()
        assert main(["explain", f"{model_file}:make", "--input", "1,3,8,8"]) == 0
        assert "planned kernels" in capsys.readouterr().out

    def cpu_run() -> None:
        compile_and_check(x)

    steps = [explain, cpu_run] if first == "explain" else [cpu_run, explain]
    steps[0]()
    convcompiler.counters.reset()
    steps[1]()
    counters = convcompiler.counters
    assert counters["cache.hit"] == 0 and counters["inductor_cache.served"] == 0, counters
    assert counters["codegen.conv"] == 2, counters


def test_nothing_under_the_root_or_in_an_export_is_readable_by_others(
    cache_dir, monkeypatch
) -> None:
    """After a compile (kernels, tuning cache, Triton's cache of the static check), an
    export, and a debug dump: no group or other permission bit anywhere."""
    monkeypatch.delenv("TRITON_CACHE_DIR")  # the suite shares one; a user's root holds it
    x = torch.randn(1, 3, 8, 8)
    compile_and_check(x)
    exported = cache_dir / "export.json"
    assert main(["cache", "export", str(exported)]) == 0
    torch._dynamo.reset()
    run_compiled(small_model(), [x], options={"debug_dir": str(cache_dir / "dump")})
    paths = list(cache_dir.rglob("*"))
    names = {p.name for p in paths}
    assert "export.json" in names
    assert any(n.endswith("-wal") for n in names) and any(n.endswith("-shm") for n in names)
    assert any(p.parent.name == "triton" for p in paths), "no Triton cache under the root"
    assert any("output_code" in n for n in names), "no Inductor trace in the dump"
    loose = [f"{p} {stat.S_IMODE(p.lstat().st_mode):o}" for p in paths if _loose(p)]
    assert not loose, loose


def _loose(path: Path) -> bool:
    return not path.is_symlink() and bool(path.lstat().st_mode & 0o077)


def test_stored_names_never_become_paths() -> None:
    from convcompiler.files import safe_name

    for bad in ("../x", "../../../../elsewhere/x", "a/b", ".hidden", "", "x" * 201, None, ["x"]):
        with pytest.raises(ValueError):
            safe_name(bad)
    name = "conv2d_k3x3_s1x1_p1x1_d1x1_g1_float32_nchw_to_nchw_im2win_band_d6967e1ad0b96e84.py"
    assert safe_name(name) == name
    assert re.fullmatch(r"[\w.-]+", name)
