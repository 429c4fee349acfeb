"""Part a's mixed-precision cases: small nets compiled and run under `torch.autocast`.

Under autocast a conv's weight reaches the kernel as a cast copy that Inductor computes into
one of its buffers, and Inductor reuses that buffer for the next layer of the same shape.
These nets repeat identical layers on purpose, so that a pack (or anything else) cached by a
tensor's identity or address would serve one layer's weight to another (issue 25):

    twin_convs          conv3x3 -> BN -> ReLU, twice, both convs of one shape
    inverted_residual   1x1 expand -> depthwise 3x3 -> 1x1 project (+ x), twice
    standardized        weight-standardised 3x3 convs (the graph computes each weight), twice

Each runs compiled with backend="im2win" under autocast in float16 and is compared with
float64 eager; it passes within twice eager autocast's own error (and at least 1e-3).
On the GPU the autocast device is CUDA; in the tests and the dry run it is the CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NETS = ("twin_convs", "inverted_residual", "standardized")
FLOOR = 1e-3  # a tolerance never below this, for nets whose eager error happens to be tiny


@dataclass(frozen=True)
class AutocastCase:
    id: str
    variant: str
    net: str
    batch: int = 2
    size: int = 19
    channels: int = 24
    dtype: str = "float16"


def autocast_cases() -> list[AutocastCase]:
    return [
        AutocastCase(id=f"m{i:02d} autocast {net} float16", variant=f"m{i:02d}", net=net)
        for i, net in enumerate(NETS)
    ]


class StdConv2d(nn.Conv2d):
    """A weight-standardised conv (NF-Nets, BiT): the graph computes its weight each call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) * torch.rsqrt(var + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _inverted_residual(c: int) -> nn.Module:
    hidden = 4 * c
    return _Residual(
        nn.Sequential(
            nn.Conv2d(c, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c, 1, bias=False),
            nn.BatchNorm2d(c),
        )
    )


def build(case: AutocastCase) -> nn.Module:
    """The case's net in float32, eval mode, with seeded random weights and BN statistics."""
    torch.manual_seed(0)
    c = case.channels
    if case.net == "twin_convs":
        net = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        )  # fmt: skip
    elif case.net == "inverted_residual":
        net = nn.Sequential(_inverted_residual(c), _inverted_residual(c))
    elif case.net == "standardized":
        net = nn.Sequential(
            StdConv2d(c, c, 3, padding=1), nn.ReLU(), StdConv2d(c, c, 3, padding=1), nn.ReLU()
        )
    else:
        raise ValueError(f"unknown autocast net {case.net!r}; one of {NETS}")
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_autocast_case(case: AutocastCase) -> dict:
    """Part a for one net: compiled under autocast against float64 eager (a record)."""
    from .gpu_models import guarded

    return guarded(case.id, lambda: _check(case))


def _check(case: AutocastCase) -> dict:
    import convcompiler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = build(case).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.batch, case.channels, case.size, case.size, generator=gen, device=device)
    dtype = getattr(torch, case.dtype)
    torch._dynamo.reset()
    convcompiler.counters.reset()
    compiled = torch.compile(net, backend="im2win")
    with torch.no_grad():
        ref = copy.deepcopy(net).double()(x.double())
        with torch.autocast(device, dtype=dtype):
            eager = net(x)
            y = compiled(x)
    launches = sum(v for k, v in convcompiler.counters.items() if k.startswith("launch."))
    err, eager_err = _rel(y, ref), _rel(eager, ref)
    tol = max(2 * eager_err, FLOOR)
    ok = err <= tol and bool(torch.isfinite(y).all())
    record = {
        "case": case.id,
        "schedule": "backend im2win under autocast",
        "status": ("ok" if ok else "mismatch") if launches else "error",
        "rel_err": err,
        "eager_rel_err": eager_err,
        "tolerance": tol,
        "kernel_launches": launches,
    }
    if not launches:
        record["error"] = "no generated kernel ran: the backend fell back everywhere"
    return record


def plan_autocast_case(case: AutocastCase, checker, target: str = "h200") -> dict:
    """The dry run: trace the net under CPU autocast, plan its regions for `target` and
    compile each kernel for sm_90 (nothing runs)."""
    from .gpu_models import plan_module

    x = torch.empty(case.batch, case.channels, case.size, case.size)
    with torch.autocast("cpu", dtype=getattr(torch, case.dtype)):
        return plan_module(case.id, build(case), x, checker, target)
