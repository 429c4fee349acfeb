"""Quickstart: compile a small CNN with backend="im2win", check it against eager, show the report.

    python examples/quickstart.py

No import of convcompiler is needed to use the backend: the package registers "im2win"
with torch.compile through an entry point. The generated kernels target GPUs; on CPU tensors
the backend's default (cpu="aten") runs the host compiler's code for the regions. This demo
asks for cpu="interpret" so that, on a machine without a GPU, the generated Triton kernels
run through Triton's interpreter and the results come from this project's kernels.
"""

import time

import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32),
            nn.ReLU(),  # depthwise
            nn.Conv2d(32, 64, 1),
            nn.ReLU(),  # pointwise
            nn.Conv2d(64, 64, 3, stride=2, padding=2, dilation=2),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def main() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 64, 64)

    compiled = torch.compile(model, backend="im2win", options={"cpu": "interpret"})
    with torch.no_grad():
        start = time.perf_counter()
        out = compiled(x)
        seconds = time.perf_counter() - start
        ref = model.double()(x.double())

    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    print(f"compiled + ran in {seconds:.1f} s; max relative error vs float64 eager: {err:.2e}")
    assert err <= 1e-4, "compiled output does not match eager"

    import convcompiler  # only to read what the backend did

    print(convcompiler.last_report())
    print(f"generated conv kernels launched: {convcompiler.counters['launch.conv']}")


if __name__ == "__main__":
    main()
