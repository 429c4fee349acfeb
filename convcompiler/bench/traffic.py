"""Suite `traffic`: memory-bound launches per forward and modelled HBM bytes, from the traced
shapes, for eager, Inductor, im2win as it was (regions + ATen for the rest) and im2win on
Inductor (regions + Inductor for the rest). Nothing runs and nothing is timed: the model is
traced once by Dynamo on fake outputs, then each variant is planned.

    eager              the aot inference graph (no decompositions): every aten op that is
                       not a view is one launch; it reads its tensor inputs and writes its
                       outputs once
    inductor           Inductor's own scheduler after fusion (`_post_fusion_custom_pass`;
                       code generation is then skipped): every generated kernel is one
                       launch, extern calls count by their op; bytes are the scheduler's
                       read/write estimate per kernel
    im2win-aten        host="aten": the post-grad graph after the regions became ops, the
                       rest counted like eager (the backend before Inductor hosted it)
    im2win             host="inductor": Inductor's scheduler again, around the regions' ops

A region's op moves what the cost model says its kernel moves (`Prediction.bytes`, planned for
--target, default h100); other compute (conv, matmul, SDPA) moves its inputs and outputs.
"Memory-bound" is everything else: elementwise ops, norms, reductions, copies and pooling.
The linear layers' matmuls are a column of their own: an extern mm/addmm in the other
variants; in im2win, a linear followed by an activation or a residual add is a "linear"
region (passes/linear_as_conv.py) whose kernel also applies that epilogue, so its bytes stay
in that column and the activation's and the add's traffic leaves the memory-bound one. A whole
MLP that runs as one kernel (an "mlp_block" region, passes/match_block.py) counts there too,
with the bytes its kernel moves (the hidden's round trip gone).
Both totals are printed: "MiB" (memory-bound + conv/attention regions, the issue's metric)
and "total MiB" (everything, the matmuls included).
`--fusion gpu` (the default) plans Inductor's kernels for a CUDA device without one: the
inputs are fake CUDA tensors and Inductor is told it has an H100 (`_described_gpu`), so
its GPU fusion decisions are counted (a LayerNorm is one kernel there, two on the CPU).
`--fusion cpu` counts Inductor's CPU kernels instead.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx

from ..devices import lookup
from ..runtime.kernel_ref import decode
from ..selection.cost import predict
from . import common

# the optional flags this suite reads; the others are refused (bench/__main__.py)
FLAGS = frozenset({"batch", "dtype", "fusion", "input", "json", "model", "options", "target"})

COMPUTE = {
    "convolution",
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention",
    "conv",
    "conv_pool",
    "window_attention",
    "mlp_block",
    "mkldnn_rnn_layer",
}
REGION_OPS = ("conv", "conv_pool", "window_attention", "mlp_block")  # the im2win.* ops
# also free here: the rest of the view family and graph bookkeeping
VIEWS = common.VIEWS | {
    "squeeze",
    "slice",
    "split",
    "split_with_sizes",
    "as_strided",
    "getitem",
    "sym_size",
    "lift_fresh_copy",
}
MODELS = {
    "resnet50": "torchvision:resnet50",
    "mobilenet_v3_small": "torchvision:mobilenet_v3_small",
    "convnext_tiny": "torchvision:convnext_tiny",
    "swin_t": "torchvision:swin_t",
}
VARIANTS = ("eager", "inductor", "im2win-aten", "im2win")
CAUSAL_BLOCK = "causal_conv3d"  # added to a clip's (5-D input's) rows


class CausalConv3dBlock(torch.nn.Module):
    """A video VAE's causal conv (HunyuanVideo, CogVideoX, LTX, Wan): the past padded by
    replicating the first frame (two frames before, none after), then a 3x3x3 conv,
    GroupNorm and SiLU."""

    def __init__(self, channels: int, out_channels: int = 64) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(channels, out_channels, 3)
        self.norm = torch.nn.GroupNorm(32, out_channels)

    def forward(self, x):
        x = torch.nn.functional.pad(x, (1, 1, 1, 1, 2, 0), mode="replicate")
        return torch.nn.functional.silu(self.norm(self.conv(x)))


@dataclass(frozen=True)
class Traffic:
    variant: str
    launches: int  # memory-bound launches per forward
    compute: int  # compute launches (conv, matmul, attention, regions)
    memory_bytes: float  # modelled HBM bytes of the memory-bound launches
    region_bytes: float  # ... of the regions' kernels, or of what they replace (conv, bmm, SDPA)
    matmul_bytes: float  # ... of the linear layers' matmuls (im2win: with fused epilogues)

    @property
    def bytes(self) -> float:
        """What the compiler decides: memory-bound launches plus regions (the issue's model)."""
        return self.memory_bytes + self.region_bytes

    @property
    def total_bytes(self) -> float:
        """Everything: memory-bound launches, regions and the linear layers' matmuls."""
        return self.bytes + self.matmul_bytes


class _Planned(Exception):
    """Raised by the post-fusion hook once Inductor's kernels are known: skip codegen."""


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.numel()) * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", str(target))
    packet = getattr(target, "_opname", None) or name.split(".")[0]
    return "getitem" if name == "getitem" else packet


def _region_bytes(kernel: str, target: str) -> tuple[str, float]:
    """(the column a region's op counts in, the bytes its kernel moves)."""
    ref = decode(kernel)
    moved = float(predict(ref.spec, ref.schedule, lookup(target), symbolic=False).bytes)
    return ("matmul" if ref.kind in ("linear", "mlp_block") else "region"), moved


def count_graph(gm: torch.fx.GraphModule, variant: str, target: str) -> Traffic:
    """Eager-style counting: one launch per aten op that is not a view."""
    launches = compute = 0
    moved = {"memory": 0.0, "region": 0.0, "matmul": 0.0}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name in VIEWS:
            continue
        kernel = next((a for a in node.args if isinstance(a, str)), None)
        if name in REGION_OPS and kernel is not None:
            compute += 1
            column, size = _region_bytes(kernel, target)
            moved[column] += size
            continue
        inputs = {a for a in node.all_input_nodes}
        size = sum(_nbytes(a.meta.get("val")) for a in inputs) + _nbytes(node.meta.get("val"))
        if name in COMPUTE:
            compute += 1
            moved[_compute_kind(name)] += size
        else:
            launches += 1
            moved["memory"] += size
    return Traffic(variant, launches, compute, moved["memory"], moved["region"], moved["matmul"])


def _compute_kind(name: str) -> str:
    """A compute op's bytes count as a region's when a region would take its place."""
    attention = "scaled_dot_product" in name or "bmm" in name  # a window attention's matmuls
    return "region" if "conv" in name or attention else "matmul"


def count_scheduler(nodes: list, variant: str, target: str) -> Traffic:
    """Inductor-style counting: one launch per generated kernel or extern call."""
    from torch._inductor.scheduler import ExternKernelSchedulerNode, NopKernelSchedulerNode

    launches = compute = 0
    moved = {"memory": 0.0, "region": 0.0, "matmul": 0.0}
    for node in nodes:
        if isinstance(node, NopKernelSchedulerNode):
            continue
        if isinstance(node, ExternKernelSchedulerNode):
            ir = node.node
            if type(ir).__name__ == "MultiOutput":  # one output of a multi-output op: a view
                continue
            name = _op_name(
                getattr(ir, "op_overload", None) or getattr(ir, "python_kernel_name", "")
            )
            kernel = next((a for a in getattr(ir, "constant_args", ()) if isinstance(a, str)), None)
            if name in REGION_OPS and kernel is not None:
                compute += 1
                column, size = _region_bytes(kernel, target)
                moved[column] += size
                continue
            if name in VIEWS:
                continue
            if name in COMPUTE or "conv" in name or "mm" in name:
                compute += 1
                moved[_compute_kind(name)] += node.get_read_write_buffers_sizes()
            else:
                launches += 1
                moved["memory"] += node.get_read_write_buffers_sizes()
            continue
        moved["memory"] += node.get_read_write_buffers_sizes()
        launches += 1
    return Traffic(variant, launches, compute, moved["memory"], moved["region"], moved["matmul"])


@contextlib.contextmanager
def _described_gpu():
    """Inductor, planning for cuda:0 on a machine without a GPU: it reads an H100's
    properties and does not ask the driver. Only fusion is planned; nothing is compiled."""
    from unittest import mock

    import torch._inductor.runtime.hints as hints

    h100 = hints.DeviceProperties(
        type="cuda",
        index=0,
        multi_processor_count=132,
        cc=90,
        major=9,
        regs_per_multiprocessor=65536,
        max_threads_per_multi_processor=2048,
        max_threads_per_block=1024,
        warp_size=32,
    )
    patches = (
        mock.patch.object(hints.DeviceProperties, "create", classmethod(lambda cls, d: h100)),
        mock.patch("torch._inductor.scheduler.has_triton", lambda: True),
        mock.patch("torch.cuda.get_device_capability", lambda *a, **k: (9, 0)),
        mock.patch("torch.cuda.current_device", lambda: 0),
        mock.patch("torch.cuda.device_count", lambda: 1),
    )
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def _fake_cuda(inputs: list) -> list:
    from torch._subclasses import FakeTensorMode

    with torch.no_grad():
        inputs = [t.detach() if isinstance(t, torch.Tensor) else t for t in inputs]
    mode = FakeTensorMode()
    with mode, torch.no_grad():
        return [mode.from_tensor(t).to("cuda") if torch.is_tensor(t) else t for t in inputs]


# Constant folding would run real CUDA ops on the fake device.
_GPU_PLAN = {"joint_graph_constant_folding": False, "freezing": False}


def capture(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, list]:
    """The Dynamo graph of `model(x)` and its example inputs; the graph runs on fakes."""
    from torch._subclasses import FakeTensorMode

    captured: list = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list):
        captured.append((gm, list(example_inputs)))

        def run(*args):
            with FakeTensorMode(allow_non_fake_inputs=True):
                return gm(*args)

        return run

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(x)
    (gm, inputs), *rest = captured
    if rest:
        raise ValueError("the model's forward is more than one graph")
    return gm, inputs


def _plan_with_inductor(
    gm, inputs, patches: dict, variant: str, target: str, decompositions=None
) -> Traffic:
    """Inductor's kernels for `gm`, counted inside its scheduler (which the byte estimates
    need), then the compile is abandoned: no code is generated or compiled."""
    from torch._inductor.compile_fx import compile_fx

    seen: list[Traffic] = []

    def after_fusion(nodes):
        seen.append(count_scheduler(nodes, variant, target))
        raise _Planned

    patches = {**patches, "_post_fusion_custom_pass": after_fusion}
    try:
        with torch.no_grad():
            compile_fx(gm, inputs, config_patches=patches, decompositions=decompositions)
    except _Planned:
        pass
    except Exception as err:  # Inductor wraps exceptions raised inside its passes
        if not any(isinstance(e, _Planned) for e in _chain(err)):
            raise
    if not seen:
        raise RuntimeError("Inductor finished without scheduling the graph")
    return seen[0]


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _eager_graph(gm, inputs) -> torch.fx.GraphModule:
    from torch._functorch.aot_autograd import aot_export_module

    with torch.no_grad():
        graph, _ = aot_export_module(gm, inputs, trace_joint=False)
    return graph


def plan_model(
    model: torch.nn.Module,
    x: torch.Tensor,
    target: str,
    fusion: str = "gpu",
    blocks: bool = True,
) -> list[Traffic]:
    """The four variants of one model at the input `x` (inference: no grad); Inductor's
    kernels as it fuses for a GPU (`fusion="gpu"`) or for this CPU; `blocks` is the backend's
    option of that name (block fusion)."""
    import copy

    from torch._functorch.aot_autograd import aot_export_module

    from ..config import Config
    from ..frontend.inductor import anchored_decompositions, config_patches
    from ..frontend.session import CompileSession

    gm, inputs = capture(model, x)
    gpu = fusion == "gpu"
    planned = _fake_cuda(inputs) if gpu else inputs
    extra = _GPU_PLAN if gpu else {}
    inductor_context = _described_gpu if gpu else contextlib.nullcontext
    with torch.no_grad():
        rows = [count_graph(_eager_graph(copy.deepcopy(gm), inputs), "eager", target)]
        with inductor_context():
            rows.append(_plan_with_inductor(copy.deepcopy(gm), planned, extra, "inductor", target))

        options = {"cpu": "interpret", "verify": False, "target": target, "blocks": blocks}
        session = CompileSession(Config(host="aten", **options), gm, inputs)
        graph = session.pre_grad(copy.deepcopy(gm))
        aten_graph, _ = aot_export_module(graph, inputs, trace_joint=False)
        rows.append(count_graph(session.post_grad(aten_graph), "im2win-aten", target))

        with inductor_context():
            session = CompileSession(Config(**options), gm, planned)
            patches = {**config_patches(session, None), **extra}
            graph, decompositions = copy.deepcopy(gm), anchored_decompositions()
            rows.append(
                _plan_with_inductor(graph, planned, patches, "im2win", target, decompositions)
            )
    return rows


def main(args) -> int:
    from ..inspection.models import load_model, make_input

    names = [args.model] if args.model_given else list(MODELS)
    batch = args.batch or (int(args.input.split(",")[0]) if args.input_given else 32)
    dtype = args.dtype_given and args.dtype or "float16"
    target = args.target or "h100"
    options = json.loads(args.options)
    if not isinstance(options, dict) or set(options) - {"blocks"}:
        raise SystemExit("traffic: --options takes only {\"blocks\": true|false}")
    blocks = options.get("blocks", True)
    results = {}
    print(
        f"memory-bound launches per forward and modelled HBM bytes (MiB); batch {batch}, "
        f"{dtype}, regions' bytes planned for {target}; Inductor's {args.fusion.upper()} "
        f"fusion; block fusion {'on' if blocks else 'off'}; traced shapes, nothing timed"
    )
    print(
        "MiB = memory-bound launches + regions (conv and attention, or the conv, bmm and SDPA "
        "they replace); matmul MiB = the linear layers' matmuls (im2win: with the activation "
        "or residual add they fuse); total = all three"
    )
    print(
        f"{'model':20} {'variant':12} {'mem-bound':>9} {'compute':>8} {'mem MiB':>9} "
        f"{'region MiB':>10} {'MiB':>9} {'vs eager':>8} {'matmul MiB':>10} "
        f"{'total MiB':>9} {'vs eager':>8}"
    )
    shape = args.input.split(",") if args.input_given else ["32", "3", "224", "224"]
    shape = ",".join([str(batch), *shape[1:]])
    if len(shape.split(",")) == 5:  # a clip: a video VAE's causal conv block on it too
        names.append(CAUSAL_BLOCK)
        print(f"{CAUSAL_BLOCK}: F.pad(replicate, the past only) -> Conv3d 3x3x3 -> GroupNorm "
              "-> SiLU on the same clip; Inductor writes the padded copy, im2win reads x")
    for name in names:
        if name == CAUSAL_BLOCK:
            model = CausalConv3dBlock(int(shape.split(",")[1])).eval()
        else:
            model = load_model(MODELS.get(name, name))
        model = model.to(getattr(torch, dtype))
        x = make_input(shape, dtype)
        rows = plan_model(model, x, target, args.fusion, blocks=blocks)
        eager, eager_total = rows[0].bytes, rows[0].total_bytes
        for row in rows:
            print(
                f"{name:20} {row.variant:12} {row.launches:9d} {row.compute:8d} "
                f"{row.memory_bytes / 2**20:9.1f} {row.region_bytes / 2**20:10.1f} "
                f"{row.bytes / 2**20:9.1f} {row.bytes / eager:8.2f} "
                f"{row.matmul_bytes / 2**20:10.1f} {row.total_bytes / 2**20:9.1f} "
                f"{row.total_bytes / eager_total:8.2f}"
            )
        results[name] = [
            {**asdict(r), "bytes": r.bytes, "total_bytes": r.total_bytes} for r in rows
        ]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0
