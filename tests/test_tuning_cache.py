"""Selection order, autotuning with the fake benchmarker, and the persistent tuning cache."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import triton
from helpers import assert_close, check_model, float64_copy, run_compiled

import convcompiler
from convcompiler.selection.cache import TuningCache, open_cache
from convcompiler.selection.cache_verify import regenerate

FAKE_TUNING = {"autotune": True, "benchmarker": "fake"}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_target_option_plans_for_that_gpu_on_cpu(cache_dir) -> None:
    x = torch.randn(1, 3, 12, 11)
    report = check_model(small_model(), [x], expect_kernels=2, options={"target": "h100"})
    assert "h100 (target='h100')" in report.devices["cpu"]
    assert "planned for h100" in str(report)
    h100 = [r.predicted_us for r in report]
    torch._dynamo.reset()
    report = check_model(small_model(), [x], expect_kernels=2, options={"target": "l4"})
    assert "l4 (target='l4')" in report.devices["cpu"]
    assert [r.predicted_us for r in report] != h100


@pytest.mark.parametrize("first,second", [("plan", "interpret"), ("interpret", "plan")])
def test_planned_and_interpreted_decisions_do_not_share_keys(cache_dir, first, second) -> None:
    """cpu="plan" keeps the GPU's tiles, cpu="interpret" re-picks them for the interpreter:
    in either order, neither reuses the other's decisions (the interpreter once ran the GPU
    tiles at about 20x the time per call)."""
    x = torch.randn(1, 3, 12, 11)
    run_compiled(small_model(), [x], options={"cpu": first})
    convcompiler.counters.reset()
    torch._dynamo.reset()
    _, report = run_compiled(small_model(), [x], options={"cpu": second})
    assert convcompiler.counters["cache.hit"] == 0
    assert [r.origin for r in report] == ["model", "model"]
    torch._dynamo.reset()
    _, report = run_compiled(small_model(), [x], options={"cpu": second})
    assert {r.origin for r in report} <= {"cache", "restored"}  # its own decisions are reused


def test_unknown_target_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="known targets"):
        convcompiler.Config(target="tpu")


def test_autotune_with_the_fake_benchmarker_then_reuse(cache_dir) -> None:
    x = torch.randn(2, 3, 12, 11)
    report = check_model(small_model(), [x], expect_kernels=2, options=FAKE_TUNING)
    assert convcompiler.counters["tune.benchmark"] > 0
    assert all(r.origin == "tuned" for r in report)
    assert any(c.measured_s for r in report for c in r.candidates)
    assert "measured" in report.explain()
    torch._dynamo.reset()
    report = check_model(small_model(), [x], expect_kernels=2, options=FAKE_TUNING)
    assert convcompiler.counters["tune.benchmark"] == 0
    assert convcompiler.counters["codegen.conv"] == 0
    assert all(r.origin == "cache" for r in report)


def test_max_autotune_mode_turns_tuning_on(cache_dir, caplog, monkeypatch) -> None:
    """torch.compile takes mode or options, not both; on CPU do_bench cannot run, so the
    backend warns once that the option cannot take effect and uses the cost model."""
    from convcompiler.frontend import lowering

    monkeypatch.setattr(lowering, "_warned", set())
    with caplog.at_level("WARNING", logger="convcompiler"), torch.no_grad():
        for size in (9, 10):
            torch.compile(small_model(), backend="im2win", mode="max-autotune")(
                torch.randn(1, 3, size, size)
            )
            assert convcompiler.last_report().config.autotune is True
    warnings = [r for r in caplog.records if "autotuning needs a GPU" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    assert convcompiler.counters["tune.benchmark"] == 0


REUSE = textwrap.dedent(
    """
    import sys, numpy as np, torch, torchvision, convcompiler
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = torch.compile(model, backend="im2win",
                            options={"autotune": True, "benchmarker": "fake"})(x)
    np.save(sys.argv[1], out.numpy())
    c = convcompiler.counters
    print("COUNTERS", c["tune.benchmark"], c["codegen.conv"], c["launch.conv_bn"],
          len(convcompiler.last_report().kernels()), c["cache.hit"])
    """
)


def run_python(code: str, *args: str, env: dict | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_reuse_across_processes(tmp_path) -> None:
    env = dict(os.environ, CONVCOMPILER_CACHE_DIR=str(tmp_path / "cache"))
    first = run_python(REUSE, str(tmp_path / "a.npy"), env=env).split("COUNTERS")[1].split()
    second = run_python(REUSE, str(tmp_path / "b.npy"), env=env).split("COUNTERS")[1].split()
    bench1, codegen1, launches1, kernels1, hits1 = map(int, first)
    bench2, codegen2, launches2, kernels2, hits2 = map(int, second)
    assert bench1 > 0 and codegen1 > 0 and kernels1 == 20 and hits1 < 20
    # The tuned records changed the hooks' uuid, so Inductor compiles again; every
    # decision comes from the tuning cache: no benchmark, no new kernel source.
    assert bench2 == 0 and codegen2 == 0 and hits2 == 20, second
    assert launches2 == kernels2 == 20
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.resnet18().eval().double()
    with torch.no_grad():
        ref = model(torch.randn(1, 3, 64, 64).double())
    assert_close(torch.from_numpy(a), ref, torch.float32)
    assert np.array_equal(a, b)


def fill_cache(x: torch.Tensor) -> TuningCache:
    check_model(small_model(), [x], expect_kernels=2)
    return open_cache()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_database_is_rebuilt(cache_dir, damage: str, caplog) -> None:
    x = torch.randn(1, 3, 10, 10)
    cache = fill_cache(x)
    path = cache.path
    cache.close()
    data = path.read_bytes()
    for suffix in ("-wal", "-shm"):
        if os.path.exists(str(path) + suffix):
            os.remove(str(path) + suffix)
    if damage == "garbage":
        path.write_bytes(os.urandom(len(data) or 8192))
    else:
        path.write_bytes(data[: len(data) // 2])
    from convcompiler.selection import cache as cache_module

    cache_module._OPEN.clear()
    torch._dynamo.reset()
    convcompiler.counters.reset()
    check_model(small_model(), [x], expect_kernels=2)
    assert convcompiler.counters["cache.rebuilt"] == 1
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert open_cache().stats()["records"] == 2


CONCURRENT = textwrap.dedent(
    """
    import sys, torch, torch.nn as nn, convcompiler
    c = int(sys.argv[1])
    torch.manual_seed(c)
    model = nn.Sequential(nn.Conv2d(3, 4 + c, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4 + c, 5 + c, 3), nn.Conv2d(5 + c, 6, 1)).eval()
    x = torch.randn(1, 3, 11, 9)
    with torch.no_grad():
        out = torch.compile(model, backend="im2win", options={"autotune": True,
                            "benchmarker": "fake"})(x)
        ref = model.double()(x.double())
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4
    print("OK", convcompiler.counters["launch.conv"])
    """
)


@pytest.mark.slow
def test_four_processes_at_once(tmp_path) -> None:
    env = dict(os.environ, CONVCOMPILER_CACHE_DIR=str(tmp_path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(i % 2)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and "OK 3" in out, out + err
    cache = TuningCache(tmp_path / "tuning.sqlite3")
    records = cache.records()
    assert len(records) == 6  # 3 convs x 2 distinct models
    for key, value, _ in records:
        assert {"schedule", "origin", "candidates", "source", "key_parts"} <= set(value)
        assert regenerate(value).sha256 == value["source"]["sha256"]
    reports = [json.loads(v) for (v,) in cache._conn.execute("SELECT value FROM reports")]
    assert len(reports) == 2  # one stored report per model, complete
    for report in reports:
        assert len(report["regions"]) == 3 and len(report["kernels"]) == 3


# Inductor's own caches would serve the repeated compiles; this test is about records.
@torch._inductor.config.patch(force_disable_caches=True)
def test_entries_from_another_triton_or_device_are_not_used(cache_dir, monkeypatch, caplog) -> None:
    x = torch.randn(1, 3, 10, 10)
    fill_cache(x)
    torch._dynamo.reset()
    convcompiler.counters.reset()
    with monkeypatch.context() as patched:
        patched.setattr(triton, "__version__", "0.0.0-other")
        check_model(small_model(), [x], expect_kernels=2)
    assert convcompiler.counters["cache.hit"] == 0 and convcompiler.counters["codegen.conv"] == 2
    # A record whose stored key parts name another device is ignored even under its key.
    cache = open_cache()
    with cache._conn:
        for key, value, _ in cache.records():
            value["key_parts"]["device"] = "a100"
            cache._conn.execute(
                "UPDATE records SET value = ? WHERE key = ?", (json.dumps(value), key)
            )
    torch._dynamo.reset()
    convcompiler.counters.reset()
    check_model(small_model(), [x], expect_kernels=2)
    assert convcompiler.counters["cache.hit"] == 0
    assert any("other key parts" in r.getMessage() for r in caplog.records)


def test_key_hashes_cover_the_template_and_package_sources() -> None:
    """A template edit must invalidate cached records and graphs: the hashes read the files."""
    from pathlib import Path

    from convcompiler.selection.cache import files_hash, templates_hash

    empty = hashlib.sha256().hexdigest()
    package = Path(convcompiler.__file__).parent
    templates = sorted(package.glob("codegen/*.py"))
    assert len(templates) >= 6
    digest = hashlib.sha256()
    for path in templates:
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    assert files_hash("codegen/*.py") == digest.hexdigest()
    assert templates_hash() not in (empty, files_hash("codegen/*.py"))  # + the cost model
    assert files_hash("**/*.py") != empty


def test_altered_kernel_file_is_regenerated_on_a_warm_compile(cache_dir) -> None:
    x = torch.randn(1, 3, 10, 10)
    _, report = run_compiled(small_model(), [x])
    path = report[0].kernel_path
    with open(path, "a") as f:
        f.write("\nraise SystemExit('tampered kernel executed')\n")
    from convcompiler.runtime import loader

    loader._MODULES.clear()
    torch._dynamo.reset()
    convcompiler.counters.reset()
    check_model(small_model(), [x], expect_kernels=2)
    assert convcompiler.counters["kernel_file.rewritten"] == 1
    assert convcompiler.counters["codegen.conv"] == 0  # the cached, verified source was used
    assert "tampered" not in open(path).read()


def test_a_record_naming_another_source_is_a_miss(cache_dir) -> None:
    """The cache stores no source text; a record whose source hash is not what the installed
    templates render is a counted miss, and the decision is made again."""
    x = torch.randn(1, 3, 10, 10)
    cache = fill_cache(x)
    with cache._conn:
        for key, value, _ in cache.records():
            value["source"]["sha256"] = hashlib.sha256(b"other").hexdigest()
            cache._conn.execute(
                "UPDATE records SET value = ? WHERE key = ?", (json.dumps(value), key)
            )
    torch._dynamo.reset()
    convcompiler.counters.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        check_model(small_model(), [x], expect_kernels=2)
    assert convcompiler.counters["codegen.conv"] == 2
    assert convcompiler.counters["cache.invalid"] == 2 and convcompiler.counters["cache.hit"] == 0


def test_export_and_import(cache_dir, tmp_path) -> None:
    x = torch.randn(1, 3, 10, 10)
    cache = fill_cache(x)
    assert stat.S_IMODE(os.stat(cache.path.parent).st_mode) == 0o700
    exported = tmp_path / "tuned.json"
    assert cache.export_json(exported) == 2
    cache.clear()
    assert cache.stats()["records"] == 0
    assert cache.import_json(exported) == 2
    torch._dynamo.reset()
    convcompiler.counters.reset()
    check_model(small_model(), [x], expect_kernels=2)
    assert convcompiler.counters["codegen.conv"] == 0 and convcompiler.counters["cache.hit"] == 2
    # A shipped record whose key is not the hash of its key parts is rejected.
    payload = json.loads(exported.read_text())
    payload["records"][0]["key"] = hashlib.sha256(b"other").hexdigest()
    exported.write_text(json.dumps(payload))
    cache.clear()
    assert cache.import_json(exported) == 1


def test_cache_values_are_json_not_pickle(cache_dir) -> None:
    cache = fill_cache(torch.randn(1, 3, 10, 10))
    conn = sqlite3.connect(cache.path)
    for (value,) in conn.execute("SELECT value FROM records"):
        json.loads(value)
    conn.close()


def test_dynamic_batch_reports_the_symbolic_cost(cache_dir) -> None:
    model = small_model()
    compiled = torch.compile(model, backend="im2win", dynamic=True)
    reference = float64_copy(model)
    with torch.no_grad():
        for n in (2, 3, 5):
            x = torch.randn(n, 3, 13, 11)
            assert_close(compiled(x), reference(x.double()), torch.float32, f"batch {n}")
    report = convcompiler.last_report()
    assert len(report.kernels()) == 2 and convcompiler.counters["launch.conv"] >= 2 * 3
    for region in report.kernels():
        assert region.cost is not None and "s" in region.cost, region
        assert region.valid_for is not None and "<=" in region.valid_for
    assert "cost:" in report.explain()
