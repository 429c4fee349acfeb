"""One rank of the distributed tests (tests/test_distributed.py).

    python tests/distributed_worker.py SCENARIO DIR

RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and CONVCOMPILER_CACHE_DIR come from the
environment, as torchrun sets them; the inputs are read from DIR/inputs.pt and the results
written to DIR/rank<r>.pt. The process group is gloo on CPU. Scenarios:

    ddp        DDP with 1 MiB buckets (the graph splits in two), 3 SGD steps
    ddp_tune   the same with autotuning (fake benchmarker), one step
    fsdp2      fully_shard per block and the root: one forward and backward
    timeout    rank 0 claims every region and never publishes; rank 1 must not hang
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    """Conv+BN+ReLU blocks; the 128->256 conv holds 1.2 MB of weights, so DDP's smallest
    usable bucket (1 MiB: Dynamo's DDP optimizer needs bucket_cap_mb >= its 1 MiB first
    bucket) closes after it and the graph is compiled in two pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(3, 16), Block(16, 128), Block(128, 256), Block(256, 8)])
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


LR = 0.1


class BucketLog(logging.Handler):
    """How many buckets (graph pieces) Dynamo's DDP optimizer made, from its INFO line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.buckets: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "DDPOptimizer used bucket cap" in str(record.msg):
            self.buckets.append(int(record.args[1]))


def report_rows(reports) -> list[dict]:
    return [
        {
            "compile_id": r.compile_id,
            "graph": r.graph,
            "piece": r.piece,
            "pieces": r.pieces(),
            "regions": [
                {
                    "name": x.name,
                    "kind": x.kind,
                    "stage": x.stage,
                    "spec": x.spec,
                    "schedule": x.schedule,
                    "params": x.params,
                    "origin": x.origin,
                    "why": x.why,
                    "kernel": os.path.basename(x.kernel_path) if x.kernel_path else None,
                }
                for x in r.regions
            ],
        }
        for r in reports
    ]


def run_ddp(inputs: dict, rank: int, options: dict | None, steps: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import convcompiler
    from convcompiler.inspection.report import next_compile_id, reports_since

    buckets = BucketLog()
    ddp_log = logging.getLogger("torch._dynamo.backends.distributed")
    ddp_log.setLevel(logging.INFO)
    ddp_log.addHandler(buckets)
    model = DDP(make_net(), bucket_cap_mb=1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    first = next_compile_id()
    compiled = torch.compile(model, backend="im2win", options=options)
    losses = []
    for step in range(steps):
        loss = F.cross_entropy(compiled(inputs["x"][step][rank]), inputs["y"][step][rank])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {
        "losses": losses,
        "params": {k: v.detach().clone() for k, v in model.module.named_parameters()},
        "counters": dict(convcompiler.counters),
        "buckets": buckets.buckets,
        "last_reports": report_rows(convcompiler.last_reports()),
        "all_reports": report_rows(reports_since(first)),
        "aot_graphs": torch._dynamo.utils.counters["aot_autograd"]["total"],
    }


def run_fsdp2(inputs: dict, rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import convcompiler
    from convcompiler.inspection.report import next_compile_id, reports_since

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = make_net()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    first = next_compile_id()
    compiled = torch.compile(model, backend="im2win")
    loss = F.cross_entropy(compiled(inputs["x"][0][rank]), inputs["y"][0][rank])
    loss.backward()
    grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
    return {
        "losses": [loss.item()],
        "grads": grads,
        "counters": dict(convcompiler.counters),
        "all_reports": report_rows(reports_since(first)),
    }


def run_timeout(inputs: dict, rank: int) -> dict:
    """Rank 0 claims every region and dies (as far as the others know) before publishing."""
    import convcompiler
    from convcompiler.selection import agreement

    options = {"rank_timeout": 3}
    model = make_net().eval()
    x = inputs["x"][0][rank]
    warnings = []

    class Warnings(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    logging.getLogger("convcompiler").addHandler(Warnings(logging.WARNING))
    waits = []  # seconds each wait for a decision took
    receive = agreement.Agreement._receive

    def timed_receive(self, key: str):
        start = time.perf_counter()
        try:
            return receive(self, key)
        finally:
            waits.append(time.perf_counter() - start)

    agreement.Agreement._receive = timed_receive
    if rank == 0:
        agreement.Agreement._publish = lambda self, key, payload: None
        with torch.no_grad():
            out = torch.compile(model, backend="im2win", options=options)(x)
    dist.barrier()  # rank 0 has claimed every region
    if rank == 1:
        with torch.no_grad():
            out = torch.compile(model, backend="im2win", options=options)(x)
    dist.barrier()
    with torch.no_grad():
        ref = model(x)
    return {
        "waits": waits,
        "rel_err": ((out - ref).abs().max() / ref.abs().max()).item(),
        "warnings": warnings,
        "counters": dict(convcompiler.counters),
        "all_reports": report_rows([convcompiler.last_report()]),
    }


def main() -> None:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    # a rank that fails must not leave the others in a collective for gloo's default 30 min
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    inputs = torch.load(os.path.join(out_dir, "inputs.pt"))
    if scenario == "ddp":
        result = run_ddp(inputs, rank, None, steps=3)
    elif scenario == "ddp_tune":
        options = {"autotune": True, "benchmarker": "fake", "host": "aten"}
        result = run_ddp(inputs, rank, options, steps=1)
    elif scenario == "fsdp2":
        result = run_fsdp2(inputs, rank)
    elif scenario == "timeout":
        result = run_timeout(inputs, rank)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
