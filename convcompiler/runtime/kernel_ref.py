"""A reference to one generated kernel, as the argument of an `im2win.*` op.

The op in a compiled graph carries what the kernel was generated from, not its code:

    KernelRef(kind, spec, schedule, sha256, weight).encode()  ->  a JSON string

Whoever runs the graph (this process, or a later one that got the graph from Inductor's
caches) renders the source again from the installed templates and uses it only if it hashes
to `sha256`. Nothing stored is executed: a graph built by another version of the templates
fails the check with KernelIntegrityError instead of running something else.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from ..codegen import SPACES, KernelSource, render_region, spec_kind
from ..schedule import InvalidSchedule, Schedule
from ..spec import AttentionSpec, ConvSpec, SpecError, spec_from_json, spec_to_json
from .loader import KernelIntegrityError

REF_VERSION = 2
REGION_KINDS = (
    "conv", "conv_bn", "conv_wgrad", "linear", "window_attention", "attention_backward",
    "mlp_block",
)

# How a conv's weight reaches its kernel (runtime/packing.py):
#   "as_is":  the op hands it to the launcher as it comes (already in the order the kernel
#             reads, or not a conv);
#   "graph":  graph ops packed it into im2win order (Inductor fuses them with whatever
#             computes the weight);
#   "cached": the op packs it once and reuses the pack while the tensor is unchanged; only
#             for a parameter or buffer that reaches the op straight from a graph input.
WEIGHT_HANDLING = ("as_is", "graph", "cached")


@dataclass(frozen=True)
class KernelRef:
    """Which kernel an op runs: its region kind (for counters), spec and schedule, the hash
    of the source they render to, and how a conv's weight reaches the kernel (one of
    WEIGHT_HANDLING)."""

    kind: str
    spec: ConvSpec | AttentionSpec
    schedule: Schedule
    sha256: str
    weight: str = "as_is"

    def __post_init__(self) -> None:
        if self.weight not in WEIGHT_HANDLING:
            raise SpecError(f"weight handling {self.weight!r} is not one of {WEIGHT_HANDLING}")

    @classmethod
    def of(cls, kind: str, source: KernelSource, spec, weight: str = "as_is") -> "KernelRef":
        return cls(kind, spec, source.schedule, source.sha256, weight)

    @property
    def packed(self) -> bool:
        """Whether graph ops packed the weight before the op."""
        return self.weight == "graph"

    def encode(self) -> str:
        return json.dumps(
            {
                "v": REF_VERSION,
                "kind": self.kind,
                "spec": spec_to_json(self.spec),
                "schedule": [self.schedule.name, [list(p) for p in self.schedule.params]],
                "sha256": self.sha256,
                "weight": self.weight,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    def source(self) -> KernelSource:
        """The kernel source, rendered again; refused unless it hashes to `sha256`."""
        source = render_region(self.spec, self.schedule)
        if source.sha256 != self.sha256:
            raise KernelIntegrityError(
                f"kernel {source.name}: the installed templates render a source with hash "
                f"{source.sha256[:16]}, not {self.sha256[:16]}; recompile (a compiled graph "
                "from another convcompiler version is never run)"
            )
        return source

    @property
    def label(self) -> str:
        return f"{self.spec.geometry()}_{self.schedule.name}_{self.sha256[:16]}"


def _schedule(data: object, spec) -> Schedule:
    if not (isinstance(data, list) and len(data) == 2 and isinstance(data[1], list)):
        raise SpecError(f"schedule {data!r} is not [name, params]")
    name, params = data
    if not isinstance(name, str) or name not in SPACES or name not in _kind_space_names(spec):
        raise SpecError(f"schedule {name!r} is not a template of this spec")
    if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in params):
        raise SpecError(f"schedule parameters {params!r} are not [[name, value], ...]")
    try:
        return SPACES[name].make(spec, device=None, **dict(params))
    except (InvalidSchedule, TypeError) as err:
        raise SpecError(f"schedule {name}: {err}") from err


def _kind_space_names(spec) -> tuple[str, ...]:
    from ..codegen import kind_spaces

    return tuple(kind_spaces(spec))


@functools.lru_cache(maxsize=4096)
def decode(text: str) -> KernelRef:
    """The KernelRef an op argument names; raises SpecError for anything malformed."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise SpecError(f"kernel reference is not JSON: {err}") from err
    if not isinstance(data, dict) or data.get("v") != REF_VERSION:
        raise SpecError("kernel reference of an unknown version")
    if set(data) != {"v", "kind", "spec", "schedule", "sha256", "weight"}:
        raise SpecError(f"kernel reference fields {sorted(data)}")
    spec = spec_from_json(data["spec"])
    kind = data["kind"]
    expected = spec_kind(spec)
    whole = ("window_attention", "attention_backward", "mlp_block")  # their spec's family
    if kind not in REGION_KINDS or (kind in whole or expected in whole) and kind != expected:
        raise SpecError(f"kernel kind {kind!r} does not fit a {type(spec).__name__}")
    sha = data["sha256"]
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise SpecError("kernel hash is not a SHA-256")
    # the constructor refuses an unknown weight handling (SpecError)
    return KernelRef(kind, spec, _schedule(data["schedule"], spec), sha, data["weight"])
