"""One compile of one Dynamo graph: its Config, report, facts and lowering, and the hooks'
entry points (pre-grad, partitioner, post-grad), whichever host drives them.

The session's `uuid` is what Inductor's FX-graph and AOT-autograd caches key our hooks on.
It changes with anything that changes what the hooks produce:

    * every convcompiler source file (templates, passes, cost model, selection);
    * every Config field;
    * the tuning cache's tuned records and calibration (`TuningCache.tuned_digest`), the only
      decisions that the code and Config do not determine, and the cache's generation (a
      token renewed when it is created or cleared: Inductor never serves a compile whose
      report this cache cannot restore);
    * the precision flags the passes read (cuDNN and matmul TF32), the torch.compile mode,
      the CUDA device names, torch and triton versions.

When Inductor serves a compile from its caches, no hook runs; the region rows are then
restored from the report this session's key stored (data only, checked against
cache_values.REPORT), and the kernels they name are rendered again and hash-checked
(`ops.preload`), so the first call does no setup. A report that does not hold is a miss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx
import triton
from torch._guards import CompileContext

from ..config import Config
from ..counters import counters
from ..inspection.debug import dump_dir_for, dump_lowered, finish_dump
from ..inspection.report import RegionRecord, new_report
from ..passes import POST_GRAD_PASSES, PRE_GRAD_PASSES, PassContext, restore_linears, run_passes
from ..passes.recompute import (
    tag_attention_intermediates,
    tag_block_intermediates,
    tag_cheap_stems,
    tag_prologues,
    tag_weight_transforms,
)
from ..runtime import ops
from ..runtime.kernel_ref import decode
from ..runtime.loader import KernelIntegrityError
from ..selection.cache import files_hash, templates_hash
from ..selection.cache_values import invalid
from ..selection.select import CandidateRow
from ..spec import SpecError
from .lowering import Lowering

log = logging.getLogger(__name__)

REPORT_VERSION = 2


def precision_flags() -> dict[str, Any]:
    """The global flags the passes read to pick a float32 kernel's precision."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    return {
        "cudnn_allow_tf32": _legacy(lambda: torch.backends.cudnn.allow_tf32),
        "cudnn_conv_fp32_precision": getattr(conv, "fp32_precision", None),
        "matmul_allow_tf32": _legacy(lambda: torch.backends.cuda.matmul.allow_tf32),
        "matmul_fp32_precision": getattr(torch.backends.cuda.matmul, "fp32_precision", None),
    }


def _legacy(read: Any) -> bool | None:
    """A legacy allow_tf32 flag, or None where torch refuses to read it (the new
    fp32_precision API was used: that flag then decides, and is recorded beside it)."""
    try:
        return read()
    except RuntimeError:
        return None


def _cuda_names() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _input_meta(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return [
            [str(s) for s in value.shape],
            [str(s) for s in value.stride()],
            str(value.dtype),
            str(value.device),
            value.requires_grad,
        ]
    return str(value) if isinstance(value, (int, float, torch.SymInt)) else type(value).__name__


def parameter_placeholders(gm: torch.fx.GraphModule) -> frozenset[str]:
    """The placeholders of an aot graph that are a module's parameters or buffers: the
    inputs AOT autograd calls static (`fw_metadata.static_input_indices`, which Dynamo marks
    for every parameter and buffer of the modules it inlines). Empty when that is unknown,
    e.g. when the placeholders do not line up with the traced inputs one to one."""
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    meta = getattr(context, "fw_metadata", None) if context is not None else None
    if meta is None:
        return frozenset()
    placeholders = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    if len(placeholders) != len(meta.input_info):
        return frozenset()
    return frozenset(placeholders[i] for i in meta.static_input_indices)


def parameter_values(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> dict[str, torch.Tensor]:
    """{placeholder: its value now} for the parameters and buffers among an aot graph's
    placeholders (parameter_placeholders), read from the inputs Dynamo passed the backend;
    empty when those do not line up with the placeholders."""
    names = parameter_placeholders(gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if not names or len(placeholders) != len(example_inputs):
        return {}
    values = {}
    for node, value in zip(placeholders, example_inputs):
        fake = node.meta.get("val")
        if node.name not in names or not isinstance(value, torch.Tensor):
            continue
        if not isinstance(fake, torch.Tensor) or fake.shape != value.shape:
            return {}  # not the inputs these placeholders stand for
        values[node.name] = value
    return values


class CompileSession:
    """What one backend call shares between its hooks."""

    def __init__(
        self,
        config: Config,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        mode: str | None = None,
    ) -> None:
        self.config = config
        self.mode = mode
        self.example_inputs = example_inputs
        # the pieces of a graph that DDP's optimizer split are compiled in one CompileContext
        self.report = new_report(config, CompileContext.try_get())
        self.facts: dict[str, Any] = {}
        self.training = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
        )
        cudagraphs = mode in ("reduce-overhead", "max-autotune")
        self.lowering = Lowering(config, self.report, pack_in_graph=self.training or cudagraphs)
        self.dump_dir = dump_dir_for(config, self.report.compile_id)
        cache = self.lowering.cache
        parts = {
            "package": files_hash("**/*.py"),
            "config": {f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
            "tuned": cache.tuned_digest() if cache is not None else None,
            "cache": cache.generation() if cache is not None else None,
            "precision": precision_flags(),
            "mode": mode,
            "cuda": _cuda_names(),
            "torch": torch.__version__,
            "triton": triton.__version__,
        }
        self.uuid = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        graph = {
            "uuid": self.uuid,
            "code": gm.code,
            "inputs": [_input_meta(t) for t in example_inputs],
            "grad": torch.is_grad_enabled(),
        }
        text = json.dumps(graph, sort_keys=True)
        self.report_key = "report:" + hashlib.sha256(text.encode()).hexdigest()
        self.stages_lowered: list[str] = []
        self._kernels: dict[str, bool] = {}  # encoded KernelRef -> interpreted

    # ---- hooks ------------------------------------------------------------------------------
    def pre_grad(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        ctx = PassContext(self.config, "pre_grad", self.facts, dump_dir=self.dump_dir)
        return run_passes(PRE_GRAD_PASSES, gm, ctx)

    def tag_recompute(self, joint: torch.fx.GraphModule, num_fwd_outputs: int) -> None:
        """Weight transforms (Tune mode's W * c), cheap stems, the inside of window
        attentions and of blocks, and BN prologues are recomputed in the backward instead of
        saved by the forward."""
        tag_weight_transforms(joint)
        stems = tag_cheap_stems(joint, num_fwd_outputs, self.config.recompute_conv_macs)
        self.report.recomputed.extend(stems)
        tag_attention_intermediates(joint, num_fwd_outputs)
        if self.config.blocks:
            tag_block_intermediates(joint, num_fwd_outputs, self.lowering.plan_block)
            tag_prologues(joint, num_fwd_outputs)

    def stage_of(self, gm: torch.fx.GraphModule) -> str:
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        if any(name.startswith("tangents") for name in placeholders):
            return "backward"
        return "forward" if self.training else "inference"

    def post_grad(
        self,
        gm: torch.fx.GraphModule,
        redecompose: Callable[[torch.fx.Graph], int] | None = None,
    ) -> torch.fx.GraphModule:
        """Find the regions of one aten graph and replace them by `im2win.*` ops; anchors no
        region took are decomposed again (`redecompose`) for the host compiler."""
        stage = self.stage_of(gm)
        self.report.regions[:] = [
            r for r in self.report.regions if not (r.origin == "restored" and r.stage == stage)
        ]
        ctx = PassContext(
            self.config,
            stage,
            self.facts,
            dump_dir=self.dump_dir,
            host=self.report.host,
            plan_block=self.lowering.plan_block,
            plan_fusion=self.lowering.plan_fusion,
            constants=(parameter_values(gm, self.example_inputs)
                       if stage in ("forward", "inference") else {}),  # fmt: skip
        )
        gm = run_passes(POST_GRAD_PASSES, gm, ctx)
        parameters = parameter_placeholders(gm) if stage == "inference" else frozenset()
        lowered = self.lowering.lower_regions(gm, ctx.regions, parameters)
        self._kernels.update(lowered)
        restore_linears(gm)  # a linear that no kernel took is the host's matmul again
        if redecompose is not None:
            redecompose(gm.graph)
            gm.graph.eliminate_dead_code()
            gm.recompile()
        dump_lowered(gm, ctx, len(POST_GRAD_PASSES) + 1, self.report)
        self.stages_lowered.append(stage)
        self._store()
        return gm

    # ---- the report when Inductor's caches answer --------------------------------------------
    def _store(self) -> None:
        cache = self.lowering.cache
        if cache is None:
            return
        value = {
            "version": REPORT_VERSION,
            "templates": templates_hash(),
            "regions": [dataclasses.asdict(r) for r in self.report.regions],
            "devices": self.report.devices,
            "recomputed": self.report.recomputed,
            "kernels": sorted(self._kernels.items()),
        }
        cache.put_report(self.report_key, value)

    def finish(self) -> None:
        """After the host compiled the forward (or inference) graph: if no hook ran, the
        compile came from Inductor's caches; restore its rows and load its kernels."""
        if self.dump_dir is not None:
            finish_dump(self.dump_dir)
        if self.stages_lowered:
            return
        counters["inductor_cache.served"] += 1
        cache = self.lowering.cache
        value = cache.get_report(self.report_key) if cache is not None else None
        restored = self._restore(value) if value is not None else None
        if restored is None:
            log.info(
                "compile %d came from Inductor's caches; its regions were not recorded",
                self.report.compile_id,
            )
            return
        self.report.regions.extend(restored)
        self.report.devices.update(value["devices"])
        self.report.recomputed.extend(value["recomputed"])
        log.info(
            "compile %d came from Inductor's caches: %d regions restored, %d kernels loaded",
            self.report.compile_id,
            len(restored),
            len(value["kernels"]),
        )

    def _restore(self, value: dict) -> list[RegionRecord] | None:
        """The rows of a stored report (cache_values.REPORT shape), after loading the kernels
        it names: each is rendered again from its reference and hash-checked. A reference
        that does not decode, or a row naming a kernel file none of them is, makes the report
        a miss (cache.invalid)."""
        files: dict[str, Path] = {}
        for text, interpret in value["kernels"]:
            try:
                ref = decode(text)
            except SpecError as err:
                invalid("report", f"a kernel reference: {err}")
                return None
            try:
                path = ops.preload(ref, self.config.kernel_path, interpret=interpret)
            except KernelIntegrityError as err:
                log.warning("%s", err)
                continue
            counters["kernel.regenerated"] += 1
            files[path.name] = path
        rows = []
        for row in value["regions"]:
            if row["kernel_path"] is not None:
                path = files.get(Path(row["kernel_path"]).name)
                if path is None:
                    invalid("report", "a region names a kernel file it does not load")
                    return None
                row = {**row, "kernel_path": str(path)}  # this process's file, not the stored
            rows.append(_restored_row(row))
        return rows


def _restored_row(row: dict) -> RegionRecord:
    row = dict(row)
    row["candidates"] = tuple(CandidateRow(**c) for c in row["candidates"])
    row["why"] = f"restored from the report of an identical compile: {row['why']}"
    row["origin"] = "restored"
    return RegionRecord(**row)
