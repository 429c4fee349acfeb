"""The guard of state_guard.py (autouse in conftest.py) catches a planted leak, names the test
and the entry, and puts the state back; and it knows every piece of convcompiler's
process-wide state."""

from __future__ import annotations

import ast
import importlib
import os
import sqlite3
import textwrap
from pathlib import Path

import pytest
import state_guard
import torch

import convcompiler

TESTS = Path(__file__).resolve().parent
PACKAGE = Path(convcompiler.__file__).resolve().parent


def _hide_kernel_profile() -> None:
    # what pytest >= 9.2's undo of monkeypatch.setattr(config.cpp, ...) does
    delattr(torch._inductor.config.cpp, "enable_kernel_profile")


def _set_dynamo_recompile_limit() -> None:
    torch._dynamo.config.recompile_limit = torch._dynamo.config.recompile_limit + 1


def _set_functorch_cache() -> None:
    torch._functorch.config.enable_autograd_cache = not torch._functorch.config.enable_autograd_cache


def _set_default_dtype() -> None:
    torch.set_default_dtype(torch.float64)


def _set_environment() -> None:
    os.environ["CONVCOMPILER_PLANTED"] = "1"


def _drop_environment() -> None:
    del os.environ["CONVCOMPILER_CPU"]  # conftest.py sets it


PLANTED = [
    (_hide_kernel_profile, "torch._inductor.config.cpp.enable_kernel_profile is hidden"),
    (_set_dynamo_recompile_limit, "torch._dynamo.config.recompile_limit: "),
    (_set_functorch_cache, "torch._functorch.config.enable_autograd_cache: "),
    (_set_default_dtype, "torch.get_default_dtype(): torch.float32 -> torch.float64"),
    (_set_environment, "os.environ['CONVCOMPILER_PLANTED']: '<unset>' -> '1'"),
    (_drop_environment, "os.environ['CONVCOMPILER_CPU']: 'interpret' -> '<unset>'"),
]


@pytest.mark.parametrize("plant,line", PLANTED, ids=[p.__name__ for p, _ in PLANTED])
def test_a_planted_leak_is_named_and_put_back(plant, line: str) -> None:
    before = state_guard.take()
    try:
        plant()
        after = state_guard.take()
        found = state_guard.leaks(before, after)
        assert len(found) == 1 and found[0].startswith(line), found
    finally:
        state_guard.restore(before, state_guard.take())
    assert state_guard.leaks(before, state_guard.take()) == []
    assert torch._inductor.config.cpp.enable_kernel_profile is False  # readable again


def test_nothing_changed_is_no_leak() -> None:
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        inside = state_guard.take()
    before = state_guard.take()
    assert state_guard.leaks(before, state_guard.take()) == []
    assert state_guard.leaks(inside, before) == [
        "torch._inductor.config.cpp.enable_kernel_profile: True -> False"
    ]


def test_once_only_state_is_put_back_and_opened_caches_are_closed(tmp_path) -> None:
    from convcompiler.files import _warned
    from convcompiler.selection import agreement, cache

    before = state_guard.package_state()
    _warned.add("a planted warning")
    agreement._off = "a planted reason"
    opened = cache.open_cache(tmp_path / "tuning.sqlite3")
    state_guard.reset_package_state(before)
    assert "a planted warning" not in _warned and agreement._off is None
    assert tmp_path / "tuning.sqlite3" not in cache._OPEN
    with pytest.raises(sqlite3.ProgrammingError):  # closed
        opened._conn.execute("SELECT 1")


INNER_TESTS = """
import os

import torch


def test_deletes_a_config_entry():
    # what pytest >= 9.2's undo of monkeypatch.setattr on a config module does
    delattr(torch._inductor.config.cpp, "enable_kernel_profile")


def test_leaves_an_environment_variable():
    os.environ["CONVCOMPILER_PLANTED"] = "1"


def test_assigns_a_dynamo_config_entry():
    torch._dynamo.config.recompile_limit = 3


def test_changes_state_the_proper_way(monkeypatch):
    monkeypatch.setenv("CONVCOMPILER_CPU", "plan")
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        assert torch._inductor.config.cpp.enable_kernel_profile is True
    from convcompiler.frontend import lowering

    lowering._warn_once("a once-per-process warning")


def test_the_next_test_finds_the_state_put_back():
    assert torch._inductor.config.cpp.enable_kernel_profile is False
    assert "CONVCOMPILER_PLANTED" not in os.environ
    assert torch._dynamo.config.recompile_limit != 3
    from convcompiler.frontend import lowering

    assert lowering._warned == set()
"""


def test_the_guard_fails_the_leaking_test_by_name(pytester: pytest.Pytester, monkeypatch) -> None:
    """A pytest session of five tests with the suite's guard: the three that leak error at
    teardown with their names and entries; the others pass, the last one finding a clean
    process."""
    root = PACKAGE.parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), str(TESTS)]))
    pytester.makeconftest("from state_guard import global_state_guard  # noqa: F401\n")
    pytester.makepyfile(test_inner=textwrap.dedent(INNER_TESTS))
    result = pytester.runpytest_subprocess(
        "-p", "no:randomly", "-p", "no:xdist", "-p", "no:cacheprovider", "-q"
    )
    result.assert_outcomes(passed=5, errors=3)
    result.stdout.fnmatch_lines_random(
        [
            "*test_inner.py::test_deletes_a_config_entry left global state changed*",
            "*torch._inductor.config.cpp.enable_kernel_profile is hidden*",
            "*test_inner.py::test_leaves_an_environment_variable left global state changed*",
            "*os.environ?'CONVCOMPILER_PLANTED'?: '<unset>' -> '1'*",
            "*test_inner.py::test_assigns_a_dynamo_config_entry left global state changed*",
            "*torch._dynamo.config.recompile_limit: * -> 3*",
        ]
    )
    assert "test_changes_state_the_proper_way left" not in result.stdout.str()


# ---- every piece of the package's process-wide state is known to the guard ---------------

_CONTAINERS = {"set", "dict", "list", "deque", "WeakValueDictionary", "WeakKeyDictionary"}
_CACHES = {"cache", "lru_cache"}


def _name(node: ast.expr) -> str:
    return ast.unparse(node).split("(")[0].split(".")[-1]


def _module_state(path: Path) -> set[str]:
    """Module-level variables that start empty (or a Counters()), variables a function
    declares `global`, and functions behind a functools cache."""
    tree = ast.parse(path.read_text())
    found = {n for node in ast.walk(tree) if isinstance(node, ast.Global) for n in node.names}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            value = node.value
            empty = isinstance(value, (ast.Dict, ast.Set, ast.List)) and not (
                getattr(value, "keys", None) or getattr(value, "elts", None)
            )
            made = isinstance(value, ast.Call) and _name(value.func) in _CONTAINERS | {"Counters"}
            if empty or made:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found.update(t.id for t in targets if isinstance(t, ast.Name))
        if isinstance(node, ast.FunctionDef):
            if any(_name(d) in _CACHES for d in node.decorator_list):
                found.add(node.name)
    return found


def test_every_process_wide_variable_is_restored_or_kept_with_a_reason() -> None:
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found.update((module.removesuffix(".__init__"), name) for name in _module_state(path))
    listed = [
        *state_guard.ONCE,
        *state_guard.OPENED,
        *state_guard.ENV_READ,
        *state_guard.KEPT,
    ]
    assert len(listed) == len(set(listed))
    unknown = sorted(found - set(listed))
    assert not unknown, f"add these to state_guard.ONCE, OPENED, ENV_READ or KEPT: {unknown}"
    for module, name in listed:
        assert hasattr(importlib.import_module(module), name), (module, name)
    assert not sorted(set(listed) - found), "listed but not found by the scan"
