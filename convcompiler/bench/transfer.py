"""Suite `transfer-learning`: ResNet-50 fine-tuning with BN frozen in eval mode.

Side by side in one run: eager, Inductor with `efficient_conv_bn_eval_fx_passes` off and
on, and im2win (Tune mode). For each: the bytes saved for backward, counted with
`saved_tensors_hooks` by unique storage, parameters included. On a GPU also the peak memory
and the step time (do_bench median of forward + backward).

On CPU im2win runs with cpu="aten": which tensors are saved is decided by the graph, not by
the kernels, and Triton's interpreter would take minutes per step at 224 px.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch.autograd.graph import saved_tensors_hooks

# the optional flags this suite reads; the others are refused (bench/__main__.py)
FLAGS = frozenset({"batch", "input", "json", "model"})

CONFIGS = ((8, 224), (2, 64))
VARIANTS = ("eager", "inductor", "inductor+efficient_conv_bn_eval", "im2win")


def saved_bytes(step) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def build(variant: str, model: torch.nn.Module, gpu: bool):
    torch._dynamo.reset()
    if variant == "eager":
        return model
    if variant.startswith("inductor"):
        return torch.compile(model)
    return torch.compile(model, backend="im2win", options={} if gpu else {"cpu": "aten"})


def measure(net, model: torch.nn.Module, x: torch.Tensor, gpu: bool) -> dict:
    """Bytes saved for backward by one training step of `net`; on a GPU also its peak
    memory and step time.

    The bytes are counted over the forward alone: a step saves its tensors there (the
    backward only reads them), so on a CPU no backward runs and none is compiled."""

    def forward():
        return net(x).square().mean()

    def step():
        forward().backward()

    if gpu:
        step()  # compile both graphs outside the measurement
        model.zero_grad(set_to_none=True)
    else:
        forward()  # compile the forward outside the measurement
    row = {"saved_bytes": saved_bytes(forward)}
    if gpu:
        from triton.testing import do_bench

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        row["step_ms"] = do_bench(step, return_mode="median")
    return row


def main(args) -> int:
    from ..inspection.models import load_model

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    where = torch.cuda.get_device_name() if gpu else "CPU (no timing)"
    name = args.model if args.model_given else "resnet50"
    configs = CONFIGS
    if args.input_given:  # one configuration: --input N,3,H,W (and --batch N)
        n, _, px, _ = (int(v) for v in args.input.split(","))
        configs = ((args.batch or n, px),)
    elif args.batch:
        configs = tuple((args.batch, px) for _, px in CONFIGS)
    print(f"transfer-learning: {name}, BN frozen (eval), weights trained; {where}")
    print(
        f"{'batch':>5} {'px':>4} {'variant':34} {'saved MiB':>10} {'vs eager':>8}"
        + (f" {'peak MiB':>9} {'step ms':>8}" if gpu else "")
    )
    rows = []
    for batch, px in configs:
        torch.manual_seed(0)
        model = load_model(name).to(device)
        x = torch.randn(batch, 3, px, px, device=device)
        eager_bytes = None
        for variant in VARIANTS:
            # Inductor reads the flag when step() compiles; patch() puts it back afterwards
            efficient = variant.endswith("efficient_conv_bn_eval")
            with inductor_config.patch(efficient_conv_bn_eval_fx_passes=efficient):
                row = measure(build(variant, model, gpu), model, x, gpu)
            saved = row["saved_bytes"]
            eager_bytes = eager_bytes or saved
            row = {"batch": batch, "px": px, "variant": variant, **row}
            row["vs_eager"] = saved / eager_bytes
            extra = f" {row['peak_mb']:9.1f} {row['step_ms']:8.2f}" if gpu else ""
            rows.append(row)
            print(
                f"{batch:5d} {px:4d} {variant:34} {saved / 2**20:10.1f} "
                f"{saved / eager_bytes:7.2f}x{extra}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0
