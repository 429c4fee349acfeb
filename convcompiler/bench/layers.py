"""Suite `im2win-layers`: the 12 benchmark layers of the im2win paper (batch 128, fp32).

On a GPU: eager, Inductor, Inductor max-autotune and im2win, side by side in one run, with
the do_bench median, TFLOP/s, ratios to eager and peak memory.
On CPU: no timing. Per layer, the workspace bytes of each schedule against im2col, the
schedule the cost model plans for the target GPU (with its prediction, labelled as such),
and the static report of that kernel.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..codegen import render_conv
from ..config import Config
from ..devices import device_for
from ..frontend.kernels import conv_spec_of
from ..inspection.aot import static_report
from ..selection.select import SelectionContext, select_conv_schedule
from .common import VARIANTS, im2col_bytes, mib, time_gpu, workspace_bytes

# the optional flags this suite reads; the others are refused (bench/__main__.py)
FLAGS = frozenset({"batch", "dtype", "json", "target"})

LAYERS = Path(__file__).with_name("im2win_layers.json")


def load_layers(batch: int | None = None) -> list[dict]:
    layers = json.loads(LAYERS.read_text())["layers"]
    if batch is not None:
        layers = [{**layer, "N": batch} for layer in layers]
    return layers


def layer_tensors(layer: dict, device: str, dtype: torch.dtype, make=torch.randn):
    """Input and weight of a layer; `make=torch.empty` when only the shapes matter."""
    k = layer["kernel"]
    x = make(layer["N"], layer["C"], layer["H"], layer["W"], device=device, dtype=dtype)
    return x, make(layer["K"], layer["C"], k, k, device=device, dtype=dtype)


def run_gpu(layers: list[dict], dtype: torch.dtype) -> list[dict]:
    rows = []
    for layer in layers:
        x, w = layer_tensors(layer, "cuda", dtype)
        stride = layer["stride"]

        def conv(x, w):
            return F.conv2d(x, w, None, stride)

        flops = 2 * layer["N"] * layer["K"] * layer["Ho"] * layer["Wo"] * layer["C"]
        flops *= layer["kernel"] ** 2
        times = {v: time_gpu(conv, (x, w), v) for v in VARIANTS}
        eager = times["eager"].median_ms
        row = {"layer": layer["name"]}
        for v, t in times.items():
            row[v] = {
                "ms": t.median_ms,
                "tflops": flops / t.median_ms / 1e9,
                "vs_eager": eager / t.median_ms,
                "peak_mb": t.peak_mem_mb,
            }
        rows.append(row)
        cells = "  ".join(
            f"{v} {row[v]['ms']:.3f} ms {row[v]['tflops']:.1f} TF x{row[v]['vs_eager']:.2f}"
            for v in VARIANTS
        )
        print(f"{layer['name']:7} {cells}")
    return rows


def run_cpu(
    layers: list[dict], dtype: torch.dtype, target: str | None, archs: tuple[str, ...]
) -> list[dict]:
    config = Config(cache=False, target=target)
    device, reason = device_for(target, "cuda")
    print(
        f"planning for {device.name} ({reason}); workspace in MiB; times are cost-model "
        "predictions, not measurements"
    )
    print(
        f"{'layer':7} {'im2col':>8} {'band':>8} {'band/im2col':>11} {'implicit':>8} "
        f"{'plan':16} {'predicted':>10}  static ({', '.join(archs)})"
    )
    rows = []
    for layer in layers:
        x, w = layer_tensors(layer, "cpu", dtype, make=torch.empty)
        spec = dataclasses.replace(conv_spec_of(x, w, None, layer["stride"]), device="cuda")
        choice = select_conv_schedule(spec, SelectionContext(config, device, reason))
        col, band = im2col_bytes(spec), workspace_bytes(spec, "im2win_band")
        static = []
        if choice.schedule.name != "aten":
            for st in static_report(render_conv(spec, choice.schedule), spec, archs):
                static.append(f"{st.arch}:{st.kernel} REG={st.registers} spill={st.spill_bytes}")
        rows.append(
            {
                "layer": layer["name"],
                "im2col_bytes": col,
                "band_bytes": band,
                "implicit_bytes": 0,
                "plan": choice.schedule.describe(),
                "predicted_us": choice.prediction.at_hint * 1e6,
                "static": static,
            }
        )
        print(
            f"{layer['name']:7} {mib(col):>8} {mib(band):>8} {band / col:11.2f} {0:8d} "
            f"{choice.schedule.name:16} {choice.prediction.at_hint * 1e6:8.1f}us  "
            f"{'; '.join(static) or '-'}"
        )
    return rows


def main(args) -> int:
    dtype = getattr(torch, args.dtype)
    layers = load_layers(args.batch)
    if torch.cuda.is_available():
        print(f"im2win-layers on {torch.cuda.get_device_name()}, {args.dtype}: do_bench medians")
        rows = run_gpu(layers, dtype)
    else:
        print("im2win-layers: no GPU, so no speed is measured or claimed")
        rows = run_cpu(layers, dtype, args.target, ("sm_90",))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0
