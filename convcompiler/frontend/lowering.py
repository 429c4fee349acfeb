"""Lowering: region -> schedule -> kernel source -> `im2win.*` op node in the aten graph.

This is where passes (regions) meet codegen (sources), selection (cost model, tuning cache,
autotuning) and the runtime (ops, loading); neither passes nor codegen imports the other.

A runnable region's nodes are replaced by one call of its op (runtime/ops.py) whose last
argument names the kernel (runtime/kernel_ref.py). The op's fake value must have exactly
the sizes and strides of the node it replaces, or the region falls back with that reason.
A conv weight that the GEMM schedules read in im2win order (KernelRef.weight) is packed

* by the op itself, cached per tensor (runtime/packing.py), only when the weight is a
  parameter or buffer that reaches the op straight from a graph input, in inference;
* otherwise by visible graph ops: in training and under CUDA graphs (`pack_in_graph`), and
  for any weight the graph computes (autocast's cast, Tune mode's W * c, weight
  standardisation), which Inductor fuses with the ops that compute it. Such a weight lives in
  one of Inductor's buffers, which it reuses for other tensors and writes through raw
  pointers, so no identity, address or version counter can tell two of them apart.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import time
from typing import Callable

import torch
import torch.fx
from tqdm.auto import tqdm

from ..codegen import KernelSource, render_conv, spec_kind
from ..config import Config
from ..counters import counters
from ..devices import device_for
from ..inspection.report import PER_LAYER, RegionRecord, Report
from ..passes import Region
from ..passes.meta import layout_mismatch
from ..passes.meta import run_on_fakes as meta_value
from ..runtime import keep_source, load_source, ops
from ..runtime.kernel_ref import KernelRef
from ..runtime.packing import is_packed
from ..runtime.packing import order as packing_order
from ..runtime.reference import run_aten, run_attention, run_mlp
from ..schedule import Schedule
from ..selection.agreement import agreement_for
from ..selection.cache import open_cache
from ..selection.cost import PACKING_SCHEDULES, Prediction, filter_repack_free
from ..selection.fusion import select_fusion
from ..selection.remote import open_remote
from ..selection.select import Choice, SelectionContext, select_block, select_conv_schedule
from ..selection.tuning import benchmarker
from ..spec import AttentionSpec, ConvSpec, spec_to_json
from ..spec_block import MlpSpec
from .attention_backward import replace_attention_backward
from .operands import region_operands

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning about an option that cannot take effect, once per process."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _key_tiles(spec: AttentionSpec, choice: Choice, ran: bool) -> dict[str, float]:
    """RegionRecord.key_tiles and plan_key_tiles of a sparse attention's choice."""
    fields = {}
    plan = choice.prediction.schedule if choice.prediction else choice.schedule
    if plan.name != "aten":
        fields["plan_key_tiles"] = spec.visited(plan["BLOCK_M"], plan["BLOCK_N"])
    if ran and choice.schedule.name != "aten":
        fields["key_tiles"] = spec.visited(choice.schedule["BLOCK_M"], choice.schedule["BLOCK_N"])
    return fields


class Lowering:
    """Lowers the regions of one compile; holds the per-compile selection contexts."""

    def __init__(self, config: Config, report: Report, *, pack_in_graph: bool = False) -> None:
        self.config = config
        self.report = report
        self.pack_in_graph = pack_in_graph
        self.cache = open_cache() if config.cache else None
        self.remote = open_remote(config.remote_cache) if config.cache else None
        self._contexts: dict[str, SelectionContext] = {}
        self._parameters: frozenset[str] = frozenset()  # of the graph being lowered
        self._planned: dict[MlpSpec, Choice] = {}  # block choices made while matching
        self._fusions: dict[tuple, tuple[str | None, str]] = {}  # conv fusions, likewise

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
                    _warn_once(
                        "autotune=True cannot take effect: autotuning needs a GPU (or "
                        "benchmarker='fake'); using the cost model's choices"
                    )
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
                agreement=agreement_for(self.config),
                remote=self.remote,
            )
            self.report.devices[spec.device] = f"{device.name} ({reason})"
        return self._contexts[spec.device]

    def _runner(self, spec: ConvSpec, pred: Prediction) -> Callable[[], object]:
        """A closure that runs one candidate on random inputs of the spec's shapes (GPU)."""
        from ..inspection.aot import meta_inputs

        operands = tuple(
            None if t is None
            else torch.rand(t.shape, device="cuda") < 0.5 if t.dtype == torch.bool
            else torch.randn_like(t, device="cuda")
            for t in meta_inputs(spec)
        )
        if pred.schedule.name == "aten":
            if isinstance(spec, AttentionSpec):
                return lambda: run_attention(spec, *operands)
            if isinstance(spec, MlpSpec):
                return lambda: run_mlp(spec, *operands)
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
        try:
            stats = static_report(render_conv(spec, schedule), spec, (arch,))
        except Exception as err:  # a check that cannot run keeps the kernel off, not the compile
            return [f"the static check failed: {type(err).__name__}: {err}"]
        return [f"{st.kernel}: {p}" for st in stats for p in st.problems()]

    def plan_block(self, spec: MlpSpec) -> str | None:
        """For the block matcher: None when the block runs as one kernel, else why its layers
        run one by one (selection.select.select_block); the choice is kept for lowering."""
        if spec not in self._planned:
            self._planned[spec] = select_block(spec, self.context(spec))
        return self._planned[spec].fallback_reason

    def plan_fusion(
        self, fused: ConvSpec, parts: tuple[ConvSpec, ...]
    ) -> tuple[str | None, str]:
        """For the conv matcher: (None when the conv `fused` runs as one kernel, else why its
        layers `parts` run apart; a note comparing the two) (selection.fusion)."""
        if (fused, parts) not in self._fusions:
            self._fusions[fused, parts] = select_fusion(fused, parts, self.context(fused))
        return self._fusions[fused, parts]

    # ---- sources ---------------------------------------------------------------------------
    def source_for(self, spec: ConvSpec, choice: Choice) -> KernelSource:
        """The kernel source of a choice, always rendered by the installed templates (a cached
        decision's was rendered and checked against its recorded hash by selection)."""
        if choice.source is not None:
            return choice.source
        counters[f"codegen.{spec_kind(spec)}"] += 1
        return render_conv(spec, choice.schedule)

    def remember(
        self, spec: ConvSpec, ctx: SelectionContext, choice: Choice, source: KernelSource | None
    ) -> None:
        """Store a new tuned or model decision in the tuning cache: data only (the schedule,
        the spec it is for and the hash of the source it renders; selection/cache_values.py
        RECORD), never the source. Another rank's decision is kept too, as a tuned record when
        it measured its candidates: any rank that claims the region in a later job finds it
        (selection/agreement.py)."""
        origin = choice.origin
        if origin == "peer":
            origin = "tuned" if any(row.measured_s for row in choice.candidates) else "model"
        if self.cache is None or origin not in ("tuned", "model"):
            return
        key, parts = ctx.key(spec)
        value = {
            "key_parts": parts,
            "spec": spec_to_json(spec),
            "calibration": ctx.calibration,
            "schedule": choice.schedule.to_json(),
            "plan": choice.prediction.schedule.to_json() if choice.prediction else None,
            "origin": origin,
            "why": choice.why,
            "candidates": [row.__dict__ for row in choice.candidates],
            "valid_for": choice.valid_for,
            "rejected": list(choice.rejected),
            "source": None if source is None else {"sha256": source.sha256, "name": source.name},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.cache.put(key, value)
        if self.remote is not None and choice.origin in ("tuned", "model"):
            self.remote.put(key, value)  # the fleet's copy (not one that came from a peer)
        if choice.origin == "tuned":
            aten = next(
                (r for r in choice.candidates if r.schedule == "aten" and r.measured_s), None
            )
            if aten is not None:
                self.cache.add_calibration(
                    ctx.device.name, spec.key(), aten.predicted_s, aten.measured_s
                )

    # ---- the graph rewrite ------------------------------------------------------------------
    def _record(self, region: Region, choice: Choice | None, **fields) -> None:
        pred = choice.prediction if choice else None
        if region.note:  # what the matcher tried first (a ConvNeXt block not whole)
            fields["why"] = "; ".join(filter(None, (fields.get("why"), region.note)))
        if isinstance(region.spec, AttentionSpec) and region.spec.key_tiles and choice:
            fields.update(_key_tiles(region.spec, choice, ran=fields.get("fallback_reason") is None))
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
        self,
        gm: torch.fx.GraphModule,
        regions: list[Region],
        parameters: frozenset[str] = frozenset(),
    ) -> dict[str, bool]:
        """Replace each runnable region's nodes by its op; returns {encoded KernelRef:
        interpreted} for every kernel the rewritten graph calls. `parameters` names the
        placeholders that are a module's parameters or buffers
        (session.parameter_placeholders)."""
        nodes = {node.name: node for node in gm.graph.nodes}
        self._parameters = parameters
        kernels: dict[str, bool] = {}
        # a progress bar on a terminal when there are many regions (selection, rendering and
        # static checks take about a second each); none in logs, CI or tests (disable=None)
        progress = tqdm(
            regions,
            desc="convcompiler: regions",
            unit="region",
            leave=False,
            disable=None if len(regions) >= 8 else True,
        )
        for region in progress:
            if region.fallback_reason is not None:
                # a block's guard leaves it per layer: its layers are regions of their own
                per_layer = region.kind == "mlp_block"
                self._record(
                    region,
                    None,
                    schedule=PER_LAYER if per_layer else "aten",
                    params="",
                    kernel_path=None,
                    fallback_reason=None if per_layer else region.fallback_reason,
                    why=region.fallback_reason if per_layer else "pattern guard",
                )
                continue
            spec = region.spec
            ctx = self.context(spec)
            choice = self._planned.get(spec) or select_conv_schedule(spec, ctx)
            if choice.fallback_reason is not None:
                counters[f"fallback.{region.kind}"] += 1
                self.remember(spec, ctx, choice, None)
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
            self.report.generated.append((source, spec))
            reason = None
            if spec.device == "cpu" and self.config.cpu == "plan":
                path = keep_source(source, self.config.kernel_path)
                reason = "option cpu='plan': kernel generated for the target; ATen runs on CPU"
                counters[f"fallback.{region.kind}"] += 1
            elif self._direct(spec):
                path = keep_source(source, self.config.kernel_path)
                reason = self._inline_launch(gm, nodes, region, source)
                if reason is not None:  # trace what could not be inlined as an op instead
                    log.info("%s: launched through its op (%s)", region.name, reason)
                    path, reason = self._as_op(gm, nodes, region, spec, choice, source, kernels)
            else:
                path, reason = self._as_op(gm, nodes, region, spec, choice, source, kernels)
            log.debug("%s: %s -> %s (%s)", region.name, spec.describe(), path, choice.why)
            self._record(
                region,
                choice,
                schedule=choice.schedule.name if path is not None else "aten",
                params=" ".join(f"{k}={v}" for k, v in choice.schedule.params),
                kernel_path=str(path) if path is not None else None,
                fallback_reason=reason,
                why=choice.why,
            )
        gm.graph.eliminate_dead_code()  # the rest of each fused chain
        gm.graph.lint()
        gm.recompile()
        return kernels

    def _as_op(self, gm, nodes, region, spec, choice, source, kernels):
        """Replace the region by its `im2win.*` op; (kernel file or None, fallback reason)."""
        interpret = spec.device == "cpu"
        weight = self._weight_handling(spec, choice.schedule, nodes, region)
        ref = KernelRef.of(region.kind, source, spec, weight=weight)
        path = ops.preload(ref, self.config.kernel_path, interpret=interpret)
        if region.kind == "attention_backward":  # several outputs, each where its target was
            reason = replace_attention_backward(gm, nodes, region, ref)
        else:
            reason = self._replace(gm, nodes, region, ref)
        if reason is None:
            kernels[ref.encode()] = interpret
            return path, None
        counters[f"fallback.{region.kind}"] += 1
        return None, reason

    def _direct(self, spec) -> bool:
        """Whether Inductor's wrapper launches this region's kernels (runtime/direct.py)."""
        return (
            self.config.launch == "inductor"
            and spec.device == "cuda"
            and not spec.is_dynamic
            and not getattr(spec, "pool_sums", False)  # two outputs: its op returns both
            and not getattr(spec, "grad", False)  # four: the attention backward's
        )

    def _inline_launch(self, gm, nodes, region: Region, source: KernelSource) -> str | None:
        """Trace the launcher into the graph in the region's place; None, or why not."""
        from ..runtime.direct import inline, trace_launch

        last = nodes[region.nodes[-1]]
        operands = list(region_operands(nodes, region))
        values = [o.meta["val"] if isinstance(o, torch.fx.Node) else None for o in operands]
        try:
            from torch._guards import detect_fake_mode

            mode = detect_fake_mode([v for v in values if v is not None])
            with mode if mode is not None else contextlib.nullcontext():
                traced = trace_launch(source, values)
            out, added = inline(gm.graph, traced, operands, last)
        except Exception as err:  # a launcher that cannot be traced keeps its op
            return f"tracing its launcher failed: {type(err).__name__}: {err}"
        reason = layout_mismatch(out.meta.get("val"), last.meta.get("val"))
        if reason is not None:
            for node in reversed(added):
                gm.graph.erase_node(node)
            return reason
        last.replace_all_uses_with(out)
        gm.graph.erase_node(last)
        counters[f"inline.{region.kind}"] += 1
        return None

    def _weight_handling(self, spec, schedule: Schedule, nodes: dict, region: Region) -> str:
        """How this conv's weight reaches its kernel (KernelRef.weight; module docstring)."""
        if not isinstance(spec, ConvSpec) or schedule.name not in READS_PACKED:
            return "as_is"  # window attention
        if filter_repack_free(spec):
            return "as_is"
        weight = nodes[dict(region.roles)["conv"]].args[1]
        if self.pack_in_graph or weight.op != "placeholder" or weight.name not in self._parameters:
            return "graph"
        return "cached"

    def _replace(
        self, gm: torch.fx.GraphModule, nodes: dict, region: Region, ref: KernelRef
    ) -> str | None:
        """Put the region's op where its last node was; None, or why it could not."""
        graph = gm.graph
        last = nodes[region.nodes[-1]]
        operands = list(region_operands(nodes, region))
        added: list[torch.fx.Node] = []
        with graph.inserting_before(last):
            if ref.packed:
                weight = operands[1]
                perm = packing_order(weight.meta["val"].dim())
                for target, args, kwargs in (
                    (aten.permute.default, (perm,), {}),
                    (aten.clone.default, (), {"memory_format": torch.contiguous_format}),
                    (aten.permute.default, (perm,), {}),
                ):
                    weight = graph.call_function(target, (weight, *args), kwargs)
                    added.append(weight)
                operands[1] = packed = weight
            pooled = getattr(ref.spec, "pool_sums", False)
            op = ops.OPS["conv_pool" if pooled else region.kind]
            unused = [None] * (len(op._schema.arguments) - 1 - len(operands))  # no mask
            new = graph.call_function(op, (*operands, *unused, ref.encode()))
            added.append(new)
            mean = None
            if pooled:  # (y, its pooled sums): the pool (role "pool") sums their T values
                pool = nodes[dict(region.roles)["pool"]]
                sums = graph.call_function(operator.getitem, (new, 1))
                mean = graph.call_function(aten.sum.dim_IntList, (sums, [-1], True))
                new = graph.call_function(operator.getitem, (new, 0))
                added += [sums, mean, new]
                if pool.meta["val"].dtype != torch.float32:
                    to = torch.ops.prims.convert_element_type.default
                    mean = graph.call_function(to, (mean, pool.meta["val"].dtype))
                    added.append(mean)
        try:
            for node in added:
                node.meta["val"] = meta_value(node)
        except Exception as err:  # a fake implementation that cannot run is a fallback
            reason = f"the op's fake implementation failed: {type(err).__name__}: {err}"
        else:
            reason = layout_mismatch(new.meta["val"], last.meta.get("val"))
            if ref.packed and reason is None and not is_packed(packed.meta["val"]):
                reason = "the packed weight is not in im2win order"
        if reason is not None:
            for node in reversed(added):
                graph.erase_node(node)
            return reason
        for key in ("stack_trace", "nn_module_stack", "from_node", "seq_nr"):
            if key in last.meta:
                new.meta[key] = last.meta[key]
        last.replace_all_uses_with(new)
        graph.erase_node(last)
        if mean is not None:  # the pool now reads the sums
            pool.replace_all_uses_with(mean)
            graph.erase_node(pool)
        return None


aten = torch.ops.aten
# Schedules whose launcher wants the filter in im2win order (and copies it on every call when
# it is not): the GEMM schedules, and direct_depthwise, whose launcher shares their preparation.
READS_PACKED = (*PACKING_SCHEDULES, "direct_depthwise")


def _epilogue_name(region: Region) -> str:
    """The fused epilogue as the report shows it; in Tune mode BN is folded into the weights."""
    name = region.spec.epilogue.name() if isinstance(region.spec, ConvSpec) else ""
    if region.mode == "tune":
        return "+".join(["bn"] + ([name] if name else []))
    return name
