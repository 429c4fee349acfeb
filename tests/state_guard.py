"""The suite's guard against global state one test leaves behind for the next.

conftest.py runs `global_state_guard` around every test. It takes a snapshot before and
after the test and fails the test (an error at its teardown, naming the test and each
entry) when one of these changed:

* every torch config module loaded (Inductor's, Dynamo's, functorch's, ...): each entry's
  value, and whether an entry is *hidden*. Torch's config modules answer `delattr` by hiding
  the entry, and pytest >= 9.2 undoes `monkeypatch.setattr` on an attribute that is not in
  the target's `__dict__` by deleting it, so a monkeypatched config entry stays hidden and
  every later Inductor compile in the process raises AttributeError. Change torch's
  configuration only through `torch._inductor.config.patch(...)` and its Dynamo and
  functorch twins;
* torch's and Triton's process-wide flags (`FLAGS`);
* the environment variables.

The guard then restores what changed, so the tests after the failing one run as they would
have. convcompiler's own process-wide state is put back without failing, because a test may
legitimately change it (trigger a once-per-process warning, open a cache):

* `ONCE`: the warned-once sets and flags are restored, so every test starts as a fresh
  process would, and an expected warning is never swallowed by an earlier test;
* `OPENED`: tuning caches and remote caches opened during the test are closed and forgotten;
* `ENV_READ`: caches of values read from the environment are cleared;
* the counters are reset before every test (`_fresh_state` in conftest.py).

`KEPT` names the package's other module-level state and why it may outlive a test;
test_state_guard.py checks that every module-level variable of the package that a test
could change is in one of these lists.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import triton
from torch.utils._config_module import ConfigModule

# ---- what is watched and failed on ------------------------------------------------------


def _attr(obj: Any, name: str) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    return (lambda: getattr(obj, name)), (lambda value: setattr(obj, name, value))


FLAGS: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "torch.get_default_dtype()": (torch.get_default_dtype, torch.set_default_dtype),
    "torch.is_grad_enabled()": (torch.is_grad_enabled, torch.set_grad_enabled),
    "torch.are_deterministic_algorithms_enabled()": (
        torch.are_deterministic_algorithms_enabled,
        torch.use_deterministic_algorithms,
    ),
    "torch.get_float32_matmul_precision()": (
        torch.get_float32_matmul_precision,
        torch.set_float32_matmul_precision,
    ),
    "torch.get_num_threads()": (torch.get_num_threads, torch.set_num_threads),
    "torch.backends.cudnn.enabled": _attr(torch.backends.cudnn, "enabled"),
    "torch.backends.cudnn.allow_tf32": _attr(torch.backends.cudnn, "allow_tf32"),
    "torch.backends.cudnn.conv.fp32_precision": _attr(torch.backends.cudnn.conv, "fp32_precision"),
    "torch.backends.cuda.matmul.allow_tf32": _attr(torch.backends.cuda.matmul, "allow_tf32"),
    "torch.backends.cuda.matmul.fp32_precision": _attr(
        torch.backends.cuda.matmul, "fp32_precision"
    ),
    "triton.knobs.runtime.interpret": _attr(triton.knobs.runtime, "interpret"),
    "triton.knobs.cache.dir": _attr(triton.knobs.cache, "dir"),
}

# ---- convcompiler's process-wide state: restored, not failed ----------------------------

# warned-once sets and flags: (module, variable)
ONCE = (
    ("convcompiler.files", "_warned"),
    ("convcompiler.frontend.backend", "_warned_no_compiler"),
    ("convcompiler.frontend.backend", "_cpu_notice_given"),
    ("convcompiler.frontend.inductor", "_warned_dirs"),
    ("convcompiler.frontend.lowering", "_warned"),
    ("convcompiler.runtime.kernel_call", "_interpreter_notice_given"),
    ("convcompiler.selection.agreement", "_off"),
    ("convcompiler.selection.cache_values", "_logged"),
)
# the process-wide cache objects, by path or URL: (module, dict)
OPENED = (
    ("convcompiler.selection.cache", "_OPEN"),
    ("convcompiler.selection.remote", "_OPEN"),
)
# functools caches of a value read from the environment: (module, function)
ENV_READ = (("convcompiler.frontend.backend", "cpp_compiler"),)
# module-level state that may outlive a test, and why
KEPT = {
    ("convcompiler.counters", "counters"): "reset before every test (_fresh_state)",
    ("convcompiler.frontend.inductor", "_LIVE"): "weak references to live compiles",
    ("convcompiler.frontend.inductor", "_anchored"): "built from torch's tables only",
    ("convcompiler.frontend.inductor", "_redecompose_pass"): "built from torch's tables only",
    ("convcompiler.frontend.inductor", "aten_host_decompositions"): "built from torch's tables",
    ("convcompiler.inspection.aot", "_fallback_cache"): "this process's private temp folder",
    ("convcompiler.inspection.report", "_history"): "the record of compiles, read after one",
    ("convcompiler.inspection.report", "_next_id"): "report ids only grow",
    ("convcompiler.inspection.report", "_last_context"): "a weak reference to a compile",
    ("convcompiler.runtime.kernel_ref", "decode"): "keyed by the reference's full text",
    ("convcompiler.runtime.loader", "_MODULES"): "keyed by the source's hash",
    ("convcompiler.runtime.ops", "_LAUNCHERS"): "keyed by the source's hash",
    ("convcompiler.runtime.packing", "_PACKS"): "checked against the weight's identity",
    ("convcompiler.runtime.packing", "SERVED"): "a record of the last packs; readers clear it",
    ("convcompiler.selection.cache", "files_hash"): "keyed by the files hashed",
}

_UNSET = "<unset>"
# Environment variables not watched: pytest's own, set for each phase of a test, and those
# torch sets for itself while it compiles (Inductor before it loads a C++ module, on importing
# its numerics checks, or around its compile workers and GPU toolchain).
UNWATCHED_ENV = {
    "PYTEST_CURRENT_TEST",
    "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
    "CUBLAS_WORKSPACE_CONFIG",
    "KMP_DUPLICATE_LIB_OK",
    "TORCH_WARM_POOL",
    "TRITON_PTXAS_PATH",
    "TRITON_LIBDEVICE_PATH",
    "CUDA_HOME",
}


@dataclass(frozen=True)
class Snapshot:
    """What a test must leave as it found it."""

    config: dict[tuple[str, str], Any]  # (config module, entry) -> value
    hidden: frozenset[tuple[str, str]]  # entries a delattr hid
    flags: dict[str, Any]  # FLAGS name -> value
    env: dict[str, str]


def config_modules() -> dict[str, ConfigModule]:
    """Every torch config module imported so far (Inductor's, Dynamo's, functorch's, ...)."""
    return {
        name: module
        for name, module in list(sys.modules.items())
        if isinstance(module, ConfigModule)
    }


def take() -> Snapshot:
    config: dict[tuple[str, str], Any] = {}
    hidden = set()
    for name, module in config_modules().items():
        # get_config_copy() reads a hidden entry as if it were there; `hide` says it is not
        config.update(((name, key), value) for key, value in module.get_config_copy().items())
        hidden.update((name, key) for key, entry in module._config.items() if entry.hide)
    flags = {name: get() for name, (get, _) in FLAGS.items()}
    env = {k: v for k, v in os.environ.items() if k not in UNWATCHED_ENV}
    return Snapshot(config, frozenset(hidden), flags, env)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # no plain truth value (a tensor, an array)
        return a is b


def _changed(before: dict, after: dict) -> list:
    keys = set(before) | set(after)
    return sorted(
        (k for k in keys if not _same(before.get(k, _UNSET), after.get(k, _UNSET))), key=str
    )


def _shared_config(before: Snapshot, after: Snapshot) -> tuple[dict, dict]:
    """The config entries of the modules both snapshots saw (a test may import one)."""
    shared = {module for module, _ in before.config} & {module for module, _ in after.config}
    return (
        {k: v for k, v in before.config.items() if k[0] in shared},
        {k: v for k, v in after.config.items() if k[0] in shared},
    )


def leaks(before: Snapshot, after: Snapshot) -> list[str]:
    """One line per entry that differs: `name: before -> after`, or `name is hidden`."""
    lines = [
        f"{module}.{key} is hidden: it was deleted from its config module (e.g. by the undo "
        "of a monkeypatch.setattr); change it with the module's config.patch(...)"
        for module, key in sorted(after.hidden - before.hidden)
    ]
    for what, old, new in (
        ("{0}.{1}", *_shared_config(before, after)),
        ("{0}", before.flags, after.flags),
        ("os.environ[{0!r}]", before.env, after.env),
    ):
        for key in _changed(old, new):
            name = what.format(*key) if isinstance(key, tuple) else what.format(key)
            lines.append(f"{name}: {old.get(key, _UNSET)!r} -> {new.get(key, _UNSET)!r}")
    return lines


def restore(before: Snapshot, after: Snapshot) -> None:
    """Put back every entry `leaks(before, after)` names."""
    modules = config_modules()
    changed = _changed(*_shared_config(before, after))
    for module, key in set(changed) | (after.hidden - before.hidden):
        # a hidden entry reads as its default in after.config; setting an entry un-hides it
        value = before.config.get((module, key), after.config.get((module, key), _UNSET))
        if module in modules and value is not _UNSET:
            setattr(modules[module], key, value)
    for name in _changed(before.flags, after.flags):
        FLAGS[name][1](before.flags[name])
    for key in _changed(before.env, after.env):
        if key in before.env:
            os.environ[key] = before.env[key]
        else:
            os.environ.pop(key, None)


# ---- convcompiler's state -----------------------------------------------------------------


def _variable(module: str, name: str) -> tuple[Any, Any]:
    mod = importlib.import_module(module)
    return mod, getattr(mod, name)


def package_state() -> dict[tuple[str, str], Any]:
    """Copies of the once-only flags and sets, and the opened caches' dicts."""
    state = {}
    for module, name in ONCE + OPENED:
        _, value = _variable(module, name)
        state[(module, name)] = value.copy() if isinstance(value, (set, dict)) else value
    return state


def reset_package_state(before: dict[tuple[str, str], Any]) -> None:
    """Restore `ONCE`, close and forget caches opened since `before`, clear `ENV_READ`."""
    for module, name in ONCE:
        mod, value = _variable(module, name)
        if isinstance(value, set):
            value.clear()
            value.update(before[(module, name)])  # in place: it is the object in use
        else:
            setattr(mod, name, before[(module, name)])
    for module, name in OPENED:
        _, opened = _variable(module, name)
        old = before[(module, name)]
        for key, cache in list(opened.items()):
            if old.get(key) is not cache:
                del opened[key]
                if hasattr(cache, "close"):
                    cache.close()
    for module, name in ENV_READ:
        _, function = _variable(module, name)
        function.cache_clear()


@pytest.fixture(autouse=True)
def global_state_guard(request: pytest.FixtureRequest):
    """Fail the test that leaves torch's configuration, torch's and Triton's flags or the
    environment changed; restore convcompiler's process-wide state after every test.

    An autouse fixture of conftest.py is set up before the fixtures a test requests
    (`monkeypatch`, `cache_dir`), so this teardown runs after theirs have undone what they
    changed."""
    before, package = take(), package_state()
    yield
    reset_package_state(package)
    after = take()
    found = leaks(before, after)
    if found:
        restore(before, after)
        pytest.fail(
            f"{request.node.nodeid} left global state changed behind it:\n  "
            + "\n  ".join(found),
            pytrace=False,
        )
