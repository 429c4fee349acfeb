"""Test setup: a private cache dir per test session, a clean Dynamo/counter state per test,
and a guard that fails a test which leaves global state changed (state_guard.py)."""

from __future__ import annotations

import os

# Inductor's CPU kernels without vectorization: the same fusion and the same kernels, at
# about half the compile time (CPU speed is never measured here). Subprocesses inherit the
# environment variable; this process is set below.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
# The suite verifies the generated kernels: on CPU tensors they run through Triton's
# interpreter (the default, cpu="aten", would run the host compiler's code instead).
os.environ.setdefault("CONVCOMPILER_CPU", "interpret")
# One Triton cache for the whole suite (the static check's AOT compiles): without it every
# test with its own CONVCOMPILER_CACHE_DIR would compile its kernels cold, under that root.
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

pytest_plugins = ["pytester"]  # test_state_guard.py runs the guard in a pytest of its own

torch._inductor.config.cpp.vec_isa_ok = False


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("convcompiler-cache")
    old = os.environ.get("CONVCOMPILER_CACHE_DIR")
    os.environ["CONVCOMPILER_CACHE_DIR"] = str(root)
    yield root
    if old is None:
        os.environ.pop("CONVCOMPILER_CACHE_DIR", None)
    else:
        os.environ["CONVCOMPILER_CACHE_DIR"] = old


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private, empty convcompiler cache root for one test."""
    monkeypatch.setenv("CONVCOMPILER_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(autouse=True)
def _fresh_state():
    import convcompiler

    torch._dynamo.reset()
    convcompiler.counters.reset()
    yield
    torch._dynamo.reset()


def pytest_configure(config: pytest.Config) -> None:
    """Under `-n N` (xdist's default `--dist load`), work stealing: a worker whose queue runs
    dry takes half of the longest other queue, instead of idling while the last few
    whole-model tests run. A `--dist` given on the command line is kept."""
    args = config.invocation_params.args
    explicit = any(str(a) == "--dist" or str(a).startswith("--dist=") for a in args)
    if getattr(config.option, "dist", None) == "load" and not explicit:
        config.option.dist = "worksteal"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """After pytest-randomly's shuffle (its hook wraps this one): on an xdist worker, deal the
    whole-model tests (marker `slow`, minutes each on 2 cores) round-robin to the fronts of
    the N equal runs that work stealing first hands the N workers, so every worker starts
    with its share of them and the run ends on short tests. Each worker reorders the same
    shuffled list the same way, as xdist requires."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    if workers < 2 or len(items) < 2 * workers:
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    rest = [item for item in items if item.get_closest_marker("slow") is None]
    sizes, left = [], len(items)
    for k in range(workers):  # the runs worksteal's first schedule sends: pending // nodes left
        sizes.append(left // (workers - k))
        left -= sizes[-1]
    ordered: list[pytest.Item] = []
    for k, size in enumerate(sizes):
        mine = slow[k::workers]
        fill = max(0, size - len(mine))
        ordered += mine + rest[:fill]
        rest = rest[fill:]
    ordered += rest
    items[:] = ordered


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """Name the seed of a shuffled run (pytest-randomly's header line is hidden under -q)."""
    if config.pluginmanager.hasplugin("randomly") and config.getoption("randomly_reorganize"):
        seed = config.getoption("randomly_seed")
        terminalreporter.write_line(
            f"shuffled with --randomly-seed={seed} (replay: python -m pytest -p no:xdist -q "
            f"--randomly-seed={seed}; no shuffle: -p no:randomly)"
        )


from redis_server import redis_server, silent_server  # noqa: E402, F401 (fixtures)
from state_guard import global_state_guard  # noqa: E402, F401 (autouse fixture)
