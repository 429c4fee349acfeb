"""Autotuning: measure the cost model's best candidates and keep the fastest.

A benchmarker maps (candidate, run) to seconds:

    do_bench  runs `run` on the GPU with triton.testing.do_bench and returns the median
    fake      runs nothing; returns the cost model's prediction times a deterministic
              factor in [0.8, 1.2) drawn from the candidate's hash. For tests on CPU: it
              exercises the whole tune -> store -> reuse path.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from tqdm.auto import tqdm

from ..counters import counters
from .cost import Prediction

log = logging.getLogger(__name__)

BENCHMARKERS = ("do_bench", "fake")


class Benchmarker(Protocol):
    name: str

    def __call__(
        self, prediction: Prediction, spec_key: str, run: Callable[[], object]
    ) -> float: ...


class DoBench:
    """Median wall time of `run` on the GPU, in seconds."""

    name = "do_bench"

    def __call__(self, prediction: Prediction, spec_key: str, run: Callable[[], object]) -> float:
        from triton.testing import do_bench

        return do_bench(run, return_mode="median") * 1e-3


class FakeBench:
    """Deterministic stand-in for tests: no kernel runs."""

    name = "fake"

    def __call__(self, prediction: Prediction, spec_key: str, run: Callable[[], object]) -> float:
        digest = hashlib.sha256((spec_key + prediction.schedule.key()).encode()).digest()
        return prediction.at_hint * (0.8 + 0.4 * digest[0] / 256)


def benchmarker(name: str) -> Benchmarker:
    if name == "do_bench":
        return DoBench()
    if name == "fake":
        return FakeBench()
    raise ValueError(f"unknown benchmarker {name!r}; choose from {BENCHMARKERS}")


@dataclass(frozen=True)
class Measured:
    prediction: Prediction
    seconds: float


def autotune(
    candidates: Sequence[Prediction],
    spec_key: str,
    bench: Benchmarker,
    make_runner: Callable[[Prediction], Callable[[], object]],
    label: str,
) -> list[Measured]:
    """Benchmark every candidate (with a progress bar); fastest first. A candidate whose
    kernel fails to build or run is logged and skipped."""
    measured = []
    for pred in tqdm(candidates, desc=f"tuning {label}", unit="cand", leave=False):
        try:
            run = make_runner(pred) if bench.name != "fake" else (lambda: None)
            seconds = bench(pred, spec_key, run)
        except Exception as err:  # a candidate that cannot run is not a choice
            log.warning(
                "tuning %s: %s failed (%s: %s); skipped",
                label,
                pred.schedule.describe(),
                type(err).__name__,
                err,
            )
            continue
        counters["tune.benchmark"] += 1
        measured.append(Measured(pred, seconds))
    return sorted(measured, key=lambda m: m.seconds)
