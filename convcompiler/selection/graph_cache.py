"""Whole-graph cache for inference: a warm process skips aot_autograd, the passes and lowering.

The tuning cache (cache.py) makes a warm compile skip selection, static checks and code
generation per region; the per-graph work around it (aot_autograd's two traces, the passes,
the rewrite) stays. For an inference graph this module also stores the lowered graph's
Python code, with each generated kernel named by the SHA-256 of its source and each region
by its tuning-cache record. A later compile of the same Dynamo graph on the same inputs
checks every record and source again, loads the kernels (hash-checked, like every kernel)
and runs the stored code, which is also checked against its hash before it is executed.

Only a compile that is a plain function of its inputs is stored (`graph_key` returns None,
or `store` declines, otherwise): grad mode off or no input requiring grad, static shapes,
plain tensors, no module constants, autocast off, no input mutated, no output aliasing an
input or another output, cache on, no debug dump, cpu != "plan" (the `aot` and `explain`
commands read the generated sources from the report), and generated code whose every
global is a module, a float constant, a type it names, or a generated kernel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
from typing import Any, Callable, Sequence

import torch
import torch.fx
import triton

from ..codegen import KernelSource
from ..config import Config
from ..counters import counters
from ..inspection.report import RegionRecord, Report
from ..runtime import KernelCall, interpreter_notice, load_source
from ..schedule import Schedule
from .cache import TuningCache, files_hash
from .select import CandidateRow

log = logging.getLogger(__name__)

GRAPH_CACHE_VERSION = 1
_MODULES = ("torch", "math", "operator", "builtins", "torch.fx._pytree", "torch.utils._pytree")
_TYPES = {"NoneType": type(None), "device": torch.device}


def package_hash() -> str:
    """SHA-256 over every source file of convcompiler: any change to the backend is a miss."""
    return files_hash("**/*.py")


def graph_key(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: Config
) -> tuple[str, dict[str, Any]] | None:
    """The key of a Dynamo graph's inference compile, and the parts it hashes; None when the
    compile is not cached. An entry is used only when every part matches; changing any of
    these invalidates it: the Dynamo graph's code; each input's shape, stride, dtype, device
    and requires_grad; grad mode; the TF32 flags (`_precision_flags`); every Config field;
    the CUDA device name (CUDA inputs); torch.__version__ and triton.__version__; the
    convcompiler sources (`package_hash`); GRAPH_CACHE_VERSION. Each region's tuning-cache
    record is checked again on a hit."""
    if not config.cache or config.debug_dir is not None or config.cpu == "plan":
        return None
    autocast = any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
    if autocast or any(True for _ in gm.parameters()):
        return None
    if any(True for _ in gm.buffers()):
        return None
    if any(n.op in ("get_attr", "call_module") for n in gm.graph.nodes):
        return None  # the graph's code does not describe what these hold
    inputs = []
    for t in example_inputs:
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            return None
        if t.requires_grad and torch.is_grad_enabled():
            return None  # training: forward and backward graphs, not cached
        if any(isinstance(s, torch.SymInt) for s in (*t.shape, *t.stride())):
            return None
        shape, stride = list(t.shape), list(t.stride())
        inputs.append([shape, stride, str(t.dtype), str(t.device), t.requires_grad])
    cuda = sorted({t.device.index or 0 for t in example_inputs if t.device.type == "cuda"})
    parts = {
        "version": GRAPH_CACHE_VERSION,
        "graph": hashlib.sha256(gm.code.encode()).hexdigest(),
        "inputs": inputs,
        "grad": torch.is_grad_enabled(),
        "precision": _precision_flags(),
        "config": {f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
        "cuda": [torch.cuda.get_device_name(i) for i in cuda],
        "torch": torch.__version__,
        "triton": triton.__version__,
        "package": package_hash(),
    }
    text = json.dumps(parts, sort_keys=True)
    return "graph:" + hashlib.sha256(text.encode()).hexdigest(), parts


def _precision_flags() -> dict[str, Any]:
    """The global flags the passes read to pick a float32 kernel's precision."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    return {
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_conv_fp32_precision": getattr(conv, "fp32_precision", None),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def _plain_function(metadata: Any, gm: torch.fx.GraphModule, num_inputs: int) -> bool:
    """What aot_autograd's runtime wrapper would add around the graph: nothing here."""
    if metadata is None or metadata.tokens or metadata.num_intermediate_bases:
        return False
    if any(i.mutates_data or i.mutates_metadata for i in metadata.input_info):
        return False
    if any(o.output_type.name != "non_alias" for o in metadata.output_info):
        return False
    if any(n.op not in ("placeholder", "call_function", "output") for n in gm.graph.nodes):
        return False  # get_attr constants or submodules would need `self`
    return sum(n.op == "placeholder" for n in gm.graph.nodes) == num_inputs


def _describe(value: Any, kernels: dict[str, dict]) -> dict | None:
    if isinstance(value, KernelCall):
        kernel = kernels.get(value.path.name)
        return kernel and {**kernel, "kind": value.kind, "region": value.region}
    if isinstance(value, type(torch)) and value.__name__ in _MODULES:
        return {"module": value.__name__}
    if isinstance(value, float):
        return {"float": repr(value)}
    name = next((k for k, v in _TYPES.items() if v is value), None)
    return {"type": name} if name else None


def store(
    cache: TuningCache,
    key: tuple[str, dict[str, Any]],
    gm: torch.fx.GraphModule,
    report: Report,
    record_keys: list[tuple[str, dict, str | None]],
    num_inputs: int,
) -> bool:
    """Store the lowered inference graph `gm` under `key`; False when it is not cacheable."""
    from torch._guards import TracingContext

    tracing = TracingContext.try_get()
    if not _plain_function(tracing.fw_metadata if tracing else None, gm, num_inputs):
        return False
    kernels = {}
    for source, spec in report.generated:
        kernels[source.filename] = {
            "sha256": source.sha256,
            "name": source.name,
            "schedule": [source.schedule.name, [list(p) for p in source.schedule.params]],
            "spec_key": source.spec_key,
            "kernels": list(source.kernels),
            "entry": source.entry,
            "interpret": spec.device == "cpu",
        }
    code = gm.graph.python_code("self")
    names = {}
    for name, value in code.globals.items():
        names[name] = _describe(value, kernels)
        if names[name] is None:
            log.debug("graph cache: global %s (%r) cannot be stored", name, value)
            return False
    value = {
        "key_parts": key[1],
        "code": code.src,
        "code_sha256": hashlib.sha256(code.src.encode()).hexdigest(),
        "globals": names,
        "records": [list(k) for k in record_keys],
        "regions": [dataclasses.asdict(r) for r in report.regions],
        "devices": report.devices,
    }
    cache.put_graph(key[0], value)
    return True


def load(
    cache: TuningCache, key: tuple[str, dict[str, Any]], report: Report, config: Config
) -> Callable | None:
    """The stored graph as a callable, or None (miss, stale record, altered source or code)."""
    value = cache.get_graph(*key)
    if value is None:
        return None
    if hashlib.sha256(value["code"].encode()).hexdigest() != value["code_sha256"]:
        log.warning("graph cache entry %s does not match its hash; recompiling", key[0][:18])
        return None
    for record_key, parts, sha256 in value["records"]:
        record = cache.get(record_key, parts)
        if record is None or (record.get("source") or {}).get("sha256") != sha256:
            return None  # a region's decision is gone or changed: compile it again
    namespace: dict[str, Any] = {}
    for name, item in value["globals"].items():
        if "module" in item:
            if item["module"] not in _MODULES:
                return None
            namespace[name] = importlib.import_module(item["module"])
        elif "float" in item:
            namespace[name] = float(item["float"])
        elif "type" in item:
            namespace[name] = _TYPES[item["type"]]
        else:
            cached = cache.source(item["sha256"])  # None unless it hashes to sha256
            if cached is None:
                return None
            sched_name, params = item["schedule"]
            source = KernelSource(
                cached.name,
                cached.text,
                Schedule(sched_name, tuple((k, v) for k, v in params)),
                item["spec_key"],
                tuple(item["kernels"]),
                item["entry"],
            )
            if item["interpret"]:
                interpreter_notice()
            module, path = load_source(source, config.kernel_path, interpret=item["interpret"])
            call = KernelCall(item["kind"], item["region"], getattr(module, source.entry), path)
            namespace[name] = call
    exec(compile(value["code"], f"<convcompiler graph {key[0][6:22]}>", "exec"), namespace)
    forward = namespace["forward"]
    for row in value["regions"]:
        row["candidates"] = tuple(CandidateRow(**c) for c in row["candidates"])
        if row["origin"] in ("tuned", "model"):  # the decision now comes from the cache
            row["origin"], row["why"] = "cache", f"cached {row['origin']} decision: {row['why']}"
        report.regions.append(RegionRecord(**row))
    report.devices.update(value["devices"])
    counters["graph_cache.hit"] += 1

    def run(*args: Any) -> Any:
        return forward(None, *args)

    return run
