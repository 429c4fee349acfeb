"""The values selection hands on: a candidate row, a choice, and the context selection
reads (built once per compile by the lowering)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..codegen import KernelSource, spec_kind
from ..config import Config
from ..devices import Device
from ..schedule import Schedule
from ..spec import AttentionSpec, ConvSpec
from ..spec_block import MlpSpec
from .cache import TuningCache, record_key
from .cost import Prediction
from .tuning import Benchmarker

if TYPE_CHECKING:
    from .agreement import Agreement
    from .remote import RemoteCache

Spec = ConvSpec | AttentionSpec | MlpSpec


@dataclass(frozen=True)
class CandidateRow:
    """One candidate as the report shows it."""

    schedule: str
    predicted_s: float
    measured_s: float | None = None


@dataclass(frozen=True)
class Choice:
    schedule: Schedule
    origin: str  # "override", "cache", "tuned", "model" or "peer" (another rank's)
    why: str
    fallback_reason: str | None = None
    prediction: Prediction | None = None
    candidates: tuple[CandidateRow, ...] = ()
    valid_for: str | None = None
    source: KernelSource | None = None  # a cached decision's source, rendered and checked
    rejected: tuple[str, ...] = ()  # candidates the static check refused, with the reason


@dataclass
class SelectionContext:
    """What selection needs beyond the spec; built once per compile by the lowering."""

    config: Config
    device: Device
    device_reason: str
    cache: TuningCache | None = None
    bench: Benchmarker | None = None
    make_runner: Callable[[Spec, Prediction], Callable[[], object]] | None = None
    calibration: float = 1.0
    # verify(spec, schedule) -> problems ([] when the kernel fits the planning device)
    verify: Callable[[Spec, Schedule], list[str]] | None = None
    # under torch.distributed: one rank decides each region for all (selection/agreement.py)
    agreement: Agreement | None = None
    # a fleet's decisions on Redis, under the local cache (selection/remote.py), and the
    # keys this compile took from it (a later region with the same key reports "remote" too)
    remote: RemoteCache | None = None
    from_remote: set[str] = field(default_factory=set)
    keys: dict[str, tuple[str, dict]] = field(default_factory=dict)

    def key(self, spec: Spec) -> tuple[str, dict]:
        if spec.key() not in self.keys:
            fields = {name: getattr(self.config, name) for name in self.config.codegen_fields}
            bench = self.bench.name if self.bench is not None else "none"
            self.keys[spec.key()] = record_key(
                spec_kind(spec), spec.key(), self.device, fields, bench
            )
        return self.keys[spec.key()]
