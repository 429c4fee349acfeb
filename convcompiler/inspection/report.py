"""The record of a compile: one row per region, for users and tests.

report = convcompiler.last_report()
print(report)                      # a table
[r.fallback_reason for r in report]

One backend call makes one report. Dynamo's DDP optimizer splits a graph at DDP's bucket
boundaries and calls the backend once per piece, so a DDP-wrapped model makes several
reports for one Dynamo graph: they share `graph` (Dynamo's compile id, "0/0") and are
numbered by `piece`; `last_reports()` returns all of them.
"""

from __future__ import annotations

import collections
import json
import threading
import weakref
from dataclasses import asdict, dataclass, field

from ..config import Config

# the schedule of a block region the cost model (or a guard) left to its layers, which are
# regions of their own (or the host's ops); its `why` says why
PER_LAYER = "per layer"


@dataclass(frozen=True)
class RegionRecord:
    """What happened to one region."""

    name: str
    # "conv", "conv_bn", "conv_wgrad", "linear", "window_attention", "mlp_block", "batch_norm"
    kind: str
    stage: str  # "forward", "inference" or "backward"
    spec: str  # readable shapes and parameters
    schedule: str  # schedule name ("im2win_band", "im2win_implicit", "aten")
    params: str  # the schedule's parameters
    kernel_path: str | None  # the generated source file, or None when ATen runs the region
    fallback_reason: str | None  # None when a generated kernel runs the region
    why: str  # why this schedule (or this fallback)
    epilogue: str = ""  # what the kernel fuses after the conv, e.g. "bn+add+relu"
    # conv_bn: "deploy", "tune" or "train"; backward convs: "grad_input" or "grad_weight"
    mode: str | None = None
    # "guard", "override", "cache", "tuned", "model", "peer" (under torch.distributed: the
    # decision another rank made, see selection/agreement.py), or "restored" (Inductor's
    # caches served the compile; the row is the stored report of the compile that built it)
    origin: str = "guard"
    predicted_us: float | None = None  # the cost model's time for the chosen schedule
    flops: float | None = None  # useful FLOPs of the region (at the size hints)
    bytes_moved: float | None = None  # bytes the chosen schedule moves, per the cost model
    cost: str | None = None  # the predicted time as a function of the dynamic sizes
    candidates: tuple = ()  # CandidateRow(schedule, predicted_s, measured_s) per candidate
    valid_for: str | None = None  # the dynamic-size range the choice holds for
    # an attention whose constant mask hides key tiles: the fraction of key tiles its kernel
    # visits (the GPU plan's tiles: `plan_key_tiles`; those that ran: `key_tiles`)
    key_tiles: float | None = None
    plan_key_tiles: float | None = None


@dataclass
class Report:
    """The regions of one backend compile (one Dynamo graph, or one piece of it), in order."""

    compile_id: int
    config: Config
    graph: str | None = None  # Dynamo's compile id of the graph ("0/0"), when Dynamo called
    piece: int = 0  # which backend call for that graph: DDP's optimizer compiles pieces
    group: int = field(default=-1, repr=False)  # reports of one Dynamo compile share it
    regions: list[RegionRecord] = field(default_factory=list)
    devices: dict[str, str] = field(default_factory=dict)  # tensor device -> planning device
    compile_seconds: float | None = None  # backend time: the host compile, passes, lowering
    host: str = "inductor"  # what compiled everything outside the regions
    generated: list = field(default_factory=list, repr=False)  # (KernelSource, spec) pairs
    recomputed: list[str] = field(default_factory=list)  # stems the backward recomputes

    def __iter__(self):
        return iter(list(self.regions))

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, index: int) -> RegionRecord:
        return self.regions[index]

    def kernels(self) -> list[RegionRecord]:
        return [r for r in self.regions if r.fallback_reason is None and r.schedule != PER_LAYER]

    def per_layer(self) -> list[RegionRecord]:
        """Blocks left per layer: their layers are regions (or the host's ops) of their own."""
        return [r for r in self.regions if r.schedule == PER_LAYER]

    def fallbacks(self) -> list[RegionRecord]:
        return [r for r in self.regions if r.fallback_reason is not None]

    def generated_kernels(self) -> list[RegionRecord]:
        """Regions with a generated kernel file (run here or, with cpu='plan', only planned)."""
        return [r for r in self.regions if r.kernel_path is not None]

    def pieces(self) -> int:
        """How many backend calls (pieces) this report's Dynamo graph has had so far."""
        return len(pieces_of(self))

    def to_json(self) -> str:
        return json.dumps(
            {
                "compile_id": self.compile_id,
                "graph": self.graph,
                "piece": self.piece,
                "devices": self.devices,
                "regions": [asdict(r) for r in self.regions],
                "recomputed": self.recomputed,
            },
            indent=2,
        )

    def __str__(self) -> str:
        head = (
            "region",
            "kind",
            "stage",
            "spec",
            "schedule",
            "predicted",
            "kernel / fallback reason",
        )
        rows = [
            (
                r.name,
                r.kind,
                r.stage,
                r.spec,
                r.schedule,
                f"{r.predicted_us:.1f} us" if r.predicted_us is not None else "-",
                r.kernel_path.rsplit("/", 1)[-1]
                if r.kernel_path
                else r.why if r.schedule == PER_LAYER else f"ATen: {r.fallback_reason}",
            )
            for r in self.regions
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        planned = "; ".join(f"{k} tensors planned for {v}" for k, v in self.devices.items())
        planned_only = len(self.generated_kernels()) - len(self.kernels())
        counts = f"{len(self.kernels())} kernels"
        if planned_only:  # cpu="plan": a kernel was planned and written; ATen runs it here
            counts += f", {planned_only} planned kernels (written for the GPU, ATen runs here)"
        counts += f", {len(self.fallbacks()) - planned_only} fallbacks"
        if self.per_layer():
            counts += f", {len(self.per_layer())} blocks per layer"
        pieces = self.pieces()
        split = f" (graph {self.graph}, piece {self.piece + 1} of {pieces})" if pieces > 1 else ""
        lines = [
            f"convcompiler compile {self.compile_id}{split}: {counts}"
            + (f"; {planned}" if planned else "")
        ]
        for row in (head, *rows):
            lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
        lines.extend(f"recompute: {line}" for line in self.recomputed)
        return "\n".join(lines)

    def explain(self) -> str:
        """Per region: why the winner won, and every candidate's predicted (and measured) time."""
        out = []
        for r in self.regions:
            out.append(f"{r.name} [{r.stage}] {r.spec}")
            out.append(f"  -> {r.schedule} ({r.origin}): {r.why}")
            if r.fallback_reason and r.fallback_reason != r.why:
                out.append(f"  runs here: {r.fallback_reason}")
            if r.cost:
                out.append(f"  cost: {r.cost}")
            if r.valid_for:
                out.append(f"  choice holds for {r.valid_for}")
            rows = _collapse_ties(r.candidates)
            if len(rows) > 1:
                (best, _), (second, _) = rows[0], rows[1]
                out.append(
                    f"  won by {_time(second) / _time(best):.2f}x: {_name(best)} "
                    f"{_time(best) * 1e6:.1f} us against {_name(second)} "
                    f"{_time(second) * 1e6:.1f} us"
                )
            for c, ties in rows:
                measured = f"  measured {c.measured_s * 1e6:9.1f} us" if c.measured_s else ""
                more = f"  (+{ties} tile variants, the same time)" if ties else ""
                out.append(
                    f"     {c.predicted_s * 1e6:9.1f} us predicted{measured}  {c.schedule}{more}"
                )
        return "\n".join(out)


def _name(candidate) -> str:
    return candidate.schedule.split("(")[0]


def _time(candidate) -> float:
    return candidate.measured_s or candidate.predicted_s


def _collapse_ties(candidates) -> list[tuple]:
    """(candidate, how many more) per run of unmeasured candidates of one schedule with the
    same predicted time: tile variants the cost model cannot tell apart are one row."""
    rows: list[list] = []
    for c in candidates:
        last = rows[-1][0] if rows else None
        tied = (
            last is not None
            and not c.measured_s
            and not last.measured_s
            and _name(c) == _name(last)
            and abs(c.predicted_s - last.predicted_s) <= 1e-3 * last.predicted_s
        )
        if tied:
            rows[-1][1] += 1
        else:
            rows.append([c, 0])
    return [tuple(row) for row in rows]


_lock = threading.Lock()
_history: collections.deque[Report] = collections.deque(maxlen=256)
_next_id = 0


_last_context: weakref.ref | None = None  # the Dynamo compile the newest report belongs to


def new_report(config: Config, context: object | None = None) -> Report:
    """Start the record of a new compile; it becomes `last_report()`. `context` is Dynamo's
    CompileContext of the graph being compiled: backend calls made within one (the pieces
    of a graph DDP's optimizer split) share `graph` and `group` and count `piece` up."""
    global _next_id, _last_context
    with _lock:
        last = _history[-1] if _history else None
        same = context is not None and _last_context is not None and _last_context() is context
        if same and last is not None:
            graph, group, piece = last.graph, last.group, last.piece + 1
        else:
            compile_id = getattr(context, "compile_id", None)
            graph = str(compile_id) if compile_id is not None else None
            group, piece = _next_id, 0
        _last_context = weakref.ref(context) if context is not None else None
        report = Report(_next_id, config, graph=graph, piece=piece, group=group)
        _next_id += 1
        _history.append(report)
    return report


def last_report() -> Report | None:
    """The most recent compile's regions (None before the first compile). Under DDP that is
    only the last piece of the graph: `last_reports()` has every piece."""
    return _history[-1] if _history else None


def last_reports() -> list[Report]:
    """Every report of the most recent Dynamo graph, piece by piece (one report when the
    graph was not split, [] before the first compile)."""
    return pieces_of(_history[-1]) if _history else []


def pieces_of(report: Report) -> list[Report]:
    """The reports of `report`'s Dynamo graph (the pieces DDP's optimizer compiled), in order."""
    if report.group < 0:  # not made by new_report
        return [report]
    return [r for r in _history if r.group == report.group] or [report]


def reports_since(compile_id: int) -> list[Report]:
    """Every recorded compile with an id >= `compile_id` (a model with graph breaks makes
    one compile per graph); the newest 256 are kept."""
    return [r for r in _history if r.compile_id >= compile_id]


def next_compile_id() -> int:
    return _next_id
