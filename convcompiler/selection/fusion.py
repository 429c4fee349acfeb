"""Whether two layers run as one conv kernel or each as a region of its own: the cost
model's call for a conv whose kernel would compute its input from another layer's output
(spec.prologue.dw: the inverted residual's depthwise conv, its BN and activation inside
the 1x1 project conv that alone reads them).

Each way is priced at its best schedule by the model: the fused kernel (a generated one:
ATen would run the layers apart anyway) against the sum of the layers' own best, ATen
among their candidates. The note gives both times and bytes for the report.
"""

from __future__ import annotations

from ..spec import ConvSpec
from .cost import rank
from .select import SelectionContext, model_candidates


def select_fusion(
    fused: ConvSpec, parts: tuple[ConvSpec, ...], ctx: SelectionContext
) -> tuple[str | None, str]:
    """(None when `fused` runs as one kernel, else why its layers `parts` run apart; a note
    that compares the two)."""
    one = rank(fused, model_candidates(fused, ctx.device, include_aten=False), ctx.device,
               ctx.calibration)  # fmt: skip
    if not one:
        reason = f"no fused schedule fits {ctx.device.name}"
        return reason, reason
    apart = [
        rank(part, model_candidates(part, ctx.device, include_aten=True), ctx.device,
             ctx.calibration)[0]  # fmt: skip
        for part in parts
    ]
    best, seconds = one[0], sum(p.at_hint for p in apart)
    note = (
        f"fused {best.schedule.name} {best.at_hint * 1e6:.1f} us and "
        f"{best.bytes / 2**20:.2f} MiB against its layers apart "
        f"({' + '.join(p.schedule.name for p in apart)}) {seconds * 1e6:.1f} us and "
        f"{sum(p.bytes for p in apart) / 2**20:.2f} MiB"
    )
    return (f"per layer: {note}" if seconds < best.at_hint else None), note
