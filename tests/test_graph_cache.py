"""The whole-graph inference cache (graph_cache.py): hits, and everything that must miss."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
import torch.nn as nn
from helpers import assert_close, float64_copy

import convcompiler
from convcompiler.selection.cache import open_cache


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))))


def compile_run(model: nn.Module, x: torch.Tensor, **options) -> torch.Tensor:
    torch._dynamo.reset()
    convcompiler.counters.reset()
    with torch.no_grad():
        return torch.compile(model, backend="im2win", options=options)(x)


def test_warm_compile_runs_the_stored_graph(cache_dir) -> None:
    model, x = Net().eval(), torch.randn(2, 3, 11, 13)
    cold = compile_run(model, x)
    assert convcompiler.counters["graph_cache.store"] == 1
    cold_report = convcompiler.last_report()
    warm = compile_run(model, x)
    c = convcompiler.counters
    assert c["graph_cache.hit"] == 1 and c["pass.match_conv"] == 0 and c["codegen.conv"] == 0
    assert c["launch.conv_bn"] == 1 and c["launch.conv"] == 1  # the kernels ran, not ATen
    report = convcompiler.last_report()
    assert [(r.name, r.kind, r.kernel_path) for r in report] == [
        (r.name, r.kind, r.kernel_path) for r in cold_report
    ]
    assert all(r.origin == "cache" and r.fallback_reason is None for r in report)
    assert torch.equal(cold, warm)
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
    assert_close(warm, ref, torch.float32)


def test_live_parameters_are_used_on_a_hit(cache_dir) -> None:
    model, x = Net().eval(), torch.randn(1, 3, 9, 9)
    compile_run(model, x)
    with torch.no_grad():
        model.bn.running_var.mul_(3.0)
        model.head.weight.add_(0.5)
    warm = compile_run(model, x)
    assert convcompiler.counters["graph_cache.hit"] == 1
    with torch.no_grad():
        assert_close(warm, float64_copy(model)(x.double()), torch.float32)


def test_other_shape_or_options_miss(cache_dir) -> None:
    model = Net().eval()
    compile_run(model, torch.randn(1, 3, 9, 9))
    compile_run(model, torch.randn(1, 3, 9, 10))
    assert convcompiler.counters["graph_cache.hit"] == 0
    compile_run(model, torch.randn(1, 3, 9, 9), target="l4")
    assert convcompiler.counters["graph_cache.hit"] == 0
    old = torch.backends.cudnn.allow_tf32
    try:  # the float32 precision the kernels are planned with
        torch.backends.cudnn.allow_tf32 = not old
        compile_run(model, torch.randn(1, 3, 9, 9))
        assert convcompiler.counters["graph_cache.hit"] == 0
    finally:
        torch.backends.cudnn.allow_tf32 = old
    compile_run(model, torch.randn(1, 3, 9, 9))
    assert convcompiler.counters["graph_cache.hit"] == 1


def test_altered_stored_code_is_not_executed(cache_dir, caplog) -> None:
    model, x = Net().eval(), torch.randn(1, 3, 9, 9)
    compile_run(model, x)
    conn = sqlite3.connect(open_cache().path)
    with conn:
        (key, text), *_ = conn.execute("SELECT key, value FROM graphs").fetchall()
        value = json.loads(text)
        value["code"] = value["code"].replace("return", "raise SystemExit('tampered'); return")
        conn.execute("UPDATE graphs SET value = ? WHERE key = ?", (json.dumps(value), key))
    conn.close()
    compile_run(model, x)
    assert convcompiler.counters["graph_cache.hit"] == 0
    assert convcompiler.counters["graph_cache.store"] == 1  # compiled again and re-stored
    assert any("does not match its hash" in r.getMessage() for r in caplog.records)


def test_a_changed_region_record_invalidates_the_graph(cache_dir) -> None:
    model, x = Net().eval(), torch.randn(1, 3, 9, 9)
    compile_run(model, x)
    cache = open_cache()
    (key, record, _), *_ = cache.records()
    record["source"]["sha256"] = "0" * 64  # re-tuned to another kernel since
    with cache._conn:
        cache._conn.execute("UPDATE records SET value = ? WHERE key = ?", (json.dumps(record), key))
    compile_run(model, x)
    assert convcompiler.counters["graph_cache.hit"] == 0
    with cache._conn:
        cache._conn.execute("DELETE FROM records")
    compile_run(model, x)
    assert convcompiler.counters["graph_cache.hit"] == 0
    assert convcompiler.counters["codegen.conv"] == 2


class Mutates(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return super().forward(x)


class Aliases(Net):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x), x.view(-1)


@pytest.mark.parametrize("case", ["mutation", "alias", "plan", "debug", "no_cache", "autocast"])
def test_compiles_that_are_not_stored(cache_dir, tmp_path, case: str) -> None:
    model = {"mutation": Mutates, "alias": Aliases}.get(case, Net)().eval()
    options = {
        "plan": {"cpu": "plan"},
        "debug": {"debug_dir": str(tmp_path / "dump")},
        "no_cache": {"cache": False},
    }.get(case, {})
    for _ in range(2):
        x = torch.randn(1, 3, 9, 9)
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                compile_run(model, x, **options)
        else:
            compile_run(model, x, **options)
        assert convcompiler.counters["graph_cache.store"] == 0, case
        assert convcompiler.counters["graph_cache.hit"] == 0, case


def test_training_and_dynamic_shapes_are_not_stored(cache_dir) -> None:
    model, x = Net().eval(), torch.randn(2, 3, 9, 9)
    for _ in range(2):
        torch._dynamo.reset()
        torch.compile(model, backend="im2win")(x).sum().backward()
        assert convcompiler.counters["graph_cache.store"] == 0
    for batch in (2, 3):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend="im2win", dynamic=True)(torch.randn(batch, 3, 9, 9))
    assert convcompiler.counters["graph_cache.store"] == 0
    assert convcompiler.counters["graph_cache.hit"] == 0
