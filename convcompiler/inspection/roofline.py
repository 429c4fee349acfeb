"""The roofline picture of a compile: each region's arithmetic intensity against the
throughput the cost model predicts for it, under the device's roofline, coloured by
schedule. Needs matplotlib (`pip install convcompiler[plot]`)."""

from __future__ import annotations

from pathlib import Path

from ..devices import Device
from .report import Report


def plot_roofline(report: Report, device: Device, math: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in report.regions if r.flops and r.bytes_moved and r.predicted_us]
    if not points:
        raise ValueError("the report has no region with a prediction to plot")
    peak, bandwidth = device.peak(math), device.bandwidth
    fig, ax = plt.subplots(figsize=(8, 5.5))
    intensities = [r.flops / r.bytes_moved for r in points]
    lo, hi = min(intensities + [1.0]) / 2, max(intensities + [peak / bandwidth]) * 4
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(
        xs,
        [min(peak, x * bandwidth) / 1e12 for x in xs],
        color="black",
        lw=1.5,
        label=f"{device.full_name} roofline ({math})",
    )
    schedules = sorted({r.schedule for r in points})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(schedules):
        mine = [r for r in points if r.schedule == name]
        ax.scatter(
            [r.flops / r.bytes_moved for r in mine],
            [r.flops / (r.predicted_us * 1e-6) / 1e12 for r in mine],
            color=colors[i % len(colors)],
            label=name,
            s=28,
            alpha=0.85,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax.set_ylabel("predicted throughput (TFLOP/s)")
    ax.set_title(f"convcompiler: {len(points)} regions, planned for {device.name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
