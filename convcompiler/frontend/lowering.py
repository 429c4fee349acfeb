"""Lowering: region -> schedule -> kernel source -> loaded kernel -> rewritten graph node.

This is where passes (regions) meet codegen (sources) and selection (cost model, tuning
cache, autotuning); neither side imports the other.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
import torch.fx

from ..codegen import TEMPLATES, KernelSource, render_conv, spec_kind
from ..config import Config
from ..counters import counters
from ..inspection.report import RegionRecord, Report
from ..passes import Region
from ..runtime import KernelCall, interpreter_notice, load_source, write_source
from ..runtime.reference import run_aten, run_attention
from ..schedule import Schedule
from ..selection.cache import CachedSource, open_cache
from ..selection.cost import Prediction
from ..selection.devices import device_for
from ..selection.select import Choice, SelectionContext, select_conv_schedule
from ..selection.tuning import benchmarker
from ..spec import AttentionSpec, ConvSpec

log = logging.getLogger(__name__)


class Lowering:
    """Lowers the regions of one compile; holds the per-compile selection contexts."""

    def __init__(self, config: Config, report: Report) -> None:
        self.config = config
        self.report = report
        self.cache = open_cache() if config.cache else None
        self._contexts: dict[str, SelectionContext] = {}
        # (key, key parts, source sha256) of each cache record this compile's decisions are in
        self.record_keys: list[tuple[str, dict, str | None]] = []

    # ---- selection context per tensor device ----------------------------------------------
    def context(self, spec: ConvSpec) -> SelectionContext:
        if spec.device not in self._contexts:
            device, reason = device_for(self.config.target, spec.device)
            gpu = spec.device == "cuda"
            bench = None
            if self.config.autotune:
                if gpu or self.config.benchmarker == "fake":
                    bench = benchmarker(self.config.benchmarker)
                else:
                    log.info("autotuning needs a GPU (or benchmarker='fake'); using the cost model")
            calibration = self.cache.calibration(device.name) if self.cache else 1.0
            verify = (
                (lambda s, sched, arch=device.arch: self._verify(s, sched, arch))
                if self.config.verify
                else None
            )
            self._contexts[spec.device] = SelectionContext(
                self.config,
                device,
                reason,
                self.cache,
                bench,
                self._runner if gpu else None,
                calibration,
                verify=verify,
            )
            self.report.devices[spec.device] = f"{device.name} ({reason})"
        return self._contexts[spec.device]

    def _runner(self, spec: ConvSpec, pred: Prediction) -> Callable[[], object]:
        """A closure that runs one candidate on random inputs of the spec's shapes (GPU)."""
        from ..inspection.aot import meta_inputs

        operands = tuple(
            None if t is None else torch.randn_like(t, device="cuda") for t in meta_inputs(spec)
        )
        if pred.schedule.name == "aten":
            if isinstance(spec, AttentionSpec):
                return lambda: run_attention(spec, *operands)
            return lambda: run_aten(spec, *operands)
        module, _ = load_source(
            render_conv(spec, pred.schedule), self.config.kernel_path, interpret=False
        )
        return lambda: module.launch(*operands)

    @staticmethod
    def _verify(spec: ConvSpec, schedule: Schedule, arch: str) -> list[str]:
        """Compile the schedule's kernel for `arch` (no GPU needed): what keeps it off."""
        from ..inspection.aot import static_report

        counters[f"verify.{spec_kind(spec)}"] += 1
        stats = static_report(render_conv(spec, schedule), spec, (arch,))
        return [f"{st.kernel}: {p}" for st in stats for p in st.problems()]

    # ---- sources ---------------------------------------------------------------------------
    def source_for(self, spec: ConvSpec, choice: Choice) -> KernelSource:
        if choice.source is not None:
            template = TEMPLATES[choice.schedule.name]
            return KernelSource(
                choice.source.name,
                choice.source.text,
                choice.schedule,
                spec.key(),
                template.KERNELS,
            )
        counters[f"codegen.{spec_kind(spec)}"] += 1
        return render_conv(spec, choice.schedule)

    def remember(
        self, spec: ConvSpec, ctx: SelectionContext, choice: Choice, source: KernelSource | None
    ) -> None:
        """Store a new tuned or model decision (and its source) in the tuning cache."""
        if self.cache is None or choice.origin not in ("tuned", "model"):
            return
        key, parts = ctx.key(spec)
        value = {
            "key_parts": parts,
            "schedule": _as_json(choice.schedule),
            "plan": _as_json(choice.prediction.schedule) if choice.prediction else None,
            "origin": choice.origin,
            "why": choice.why,
            "candidates": [row.__dict__ for row in choice.candidates],
            "valid_for": choice.valid_for,
            "rejected": list(choice.rejected),
            "source": None if source is None else {"sha256": source.sha256, "name": source.name},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        cached = None if source is None else CachedSource(source.sha256, source.name, source.text)
        self.cache.put(key, value, cached)
        if choice.origin == "tuned":
            aten = next(
                (r for r in choice.candidates if r.schedule == "aten" and r.measured_s), None
            )
            if aten is not None:
                self.cache.add_calibration(
                    ctx.device.name, spec.key(), aten.predicted_s, aten.measured_s
                )

    def _note_record(
        self, spec: ConvSpec, ctx: SelectionContext, choice: Choice, source: KernelSource | None
    ) -> None:
        """Note the cache record this decision is stored under, and the source it names."""
        if self.cache is not None and choice.origin in ("cache", "tuned", "model"):
            key, parts = ctx.key(spec)
            self.record_keys.append((key, parts, source.sha256 if source else None))

    # ---- the graph rewrite ------------------------------------------------------------------
    def _record(self, region: Region, choice: Choice | None, **fields) -> None:
        pred = choice.prediction if choice else None
        self.report.regions.append(
            RegionRecord(
                name=region.name,
                kind=region.kind,
                epilogue=_epilogue_name(region),
                mode=region.mode,
                stage=region.stage,
                spec=region.summary,
                origin=choice.origin if choice else "guard",
                predicted_us=pred.at_hint * 1e6 if pred else None,
                flops=pred.flops if pred else None,
                bytes_moved=pred.bytes if pred else None,
                cost=(f"{pred.seconds} s" if pred is not None and region.spec.is_dynamic else None),
                candidates=choice.candidates if choice else (),
                valid_for=choice.valid_for if choice else None,
                **fields,
            )
        )

    def lower_regions(
        self, gm: torch.fx.GraphModule, regions: list[Region]
    ) -> torch.fx.GraphModule:
        """Replace each runnable region's nodes by a call to its generated kernel."""
        nodes = {node.name: node for node in gm.graph.nodes}
        for region in regions:
            if region.fallback_reason is not None:
                self._record(
                    region,
                    None,
                    schedule="aten",
                    params="",
                    kernel_path=None,
                    fallback_reason=region.fallback_reason,
                    why="pattern guard",
                )
                continue
            spec = region.spec
            ctx = self.context(spec)
            choice = select_conv_schedule(spec, ctx)
            if choice.fallback_reason is not None:
                counters[f"fallback.{region.kind}"] += 1
                self.remember(spec, ctx, choice, None)
                self._note_record(spec, ctx, choice, None)
                self._record(
                    region,
                    choice,
                    schedule="aten",
                    params="",
                    kernel_path=None,
                    fallback_reason=choice.fallback_reason,
                    why=choice.why,
                )
                continue
            source = self.source_for(spec, choice)
            if choice.source is None:
                self.remember(spec, ctx, choice, source)
            self._note_record(spec, ctx, choice, source)
            self.report.generated.append((source, spec))
            reason = None
            if spec.device == "cpu" and self.config.cpu == "plan":
                path = write_source(source, self.config.kernel_path)
                reason = "option cpu='plan': kernel generated for the target; ATen runs on CPU"
                counters[f"fallback.{region.kind}"] += 1
            else:
                interpret = spec.device == "cpu"
                if interpret:
                    interpreter_notice()
                directory = self.config.kernel_path
                module, path = load_source(source, directory, interpret=interpret)
                call = KernelCall(region.kind, region.name, getattr(module, source.entry), path)
                self._replace(gm, nodes[region.nodes[-1]], call, _operands(nodes, region))
            log.debug("%s: %s -> %s (%s)", region.name, spec.describe(), path.name, choice.why)
            self._record(
                region,
                choice,
                schedule=choice.schedule.name,
                params=" ".join(f"{k}={v}" for k, v in choice.schedule.params),
                kernel_path=str(path),
                fallback_reason=reason,
                why=choice.why,
            )
        gm.graph.eliminate_dead_code()  # the rest of each fused chain
        gm.graph.lint()
        gm.recompile()
        return gm

    @staticmethod
    def _replace(
        gm: torch.fx.GraphModule, node: torch.fx.Node, call: KernelCall, operands: tuple
    ) -> None:
        """Put `call(*operands)` where `node` (the chain's last node) was."""
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(call, operands)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _epilogue_name(region: Region) -> str:
    """The fused epilogue as the report shows it; in Tune mode BN is folded into the weights."""
    name = region.spec.epilogue.name() if isinstance(region.spec, ConvSpec) else ""
    if region.mode == "tune":
        return "+".join(["bn"] + ([name] if name else []))
    return name


def _as_json(schedule: Schedule) -> dict:
    return {"name": schedule.name, "params": [list(p) for p in schedule.params]}


ATTENTION_OPERANDS = ("q", "k", "v", "bias", "mask", "general", "logit_scale")


def _operands(nodes: dict[str, torch.fx.Node], region: Region) -> tuple:
    """The kernel's arguments, read from the live graph (an earlier region may have replaced
    an operand's producer). A conv chain: (x, weight, bias, bn_weight, bn_bias, bn_mean,
    bn_var, residual); window attention: (q, k, v, bias, mask, general, logit_scale)."""
    roles = dict(region.roles)
    if region.kind == "window_attention":
        return tuple(nodes[roles[r]] if r in roles else None for r in ATTENTION_OPERANDS)
    x, weight, bias = nodes[roles["conv"]].args[:3]
    bn = nodes[roles["bn"]].args[1:5] if "bn" in roles else (None,) * 4
    residual = None
    if "add" in roles:
        names = [name for _, name in region.roles]
        before = names[names.index(roles["add"]) - 1]
        a, b = nodes[roles["add"]].args
        residual = b if a.name == before else a
    return (x, weight, bias, *bn, residual)
