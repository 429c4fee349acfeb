"""What the kernels do not cover runs ATen, correctly, with the reason in the report."""

from __future__ import annotations

import torch
import torch.nn as nn
from helpers import assert_close, check_model, float64_copy, run_compiled

import convcompiler


def reasons(report: convcompiler.Report) -> list[str]:
    return [r.fallback_reason for r in report.fallbacks()]


def test_a_conv_after_an_asymmetric_pad_falls_back_with_its_reason_among_kernels() -> None:
    """A conv reading an F.pad(mode="replicate") with different amounts on the two sides has
    no kernel (its reason in the report); the 2-D and 3-D transposed convs, the
    circular-padded conv and the 3-D conv around it run theirs."""
    torch.manual_seed(0)

    class Unsupported(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 4, 3, stride=2)
            self.circular = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
            self.conv3d = nn.Conv3d(4, 2, (1, 3, 3))
            self.up3d = nn.ConvTranspose3d(2, 5, (1, 3, 3))
            self.causal = nn.Conv2d(5, 3, (1, 3))

        def forward(self, x):
            y = self.circular(self.up(x))
            y = self.up3d(self.conv3d(y.unsqueeze(2))).squeeze(2)
            return self.causal(nn.functional.pad(y, (2, 0, 0, 0), mode="replicate"))

    report = check_model(
        Unsupported().eval(), [torch.randn(2, 3, 7, 6)], expect_kernels=4, expect_fallbacks=1
    )
    [reason] = reasons(report)
    assert "padding_mode='replicate'" in reason and "the same on both sides" in reason, reason
    assert convcompiler.counters["fallback.conv"] == 1
    # the transposed convs run their own kernel, the others theirs
    up, up3d = [r for r in report.kernels() if "transposed" in r.spec]
    assert up.spec == "[2,3,7,6] -> [2,4,15,13] 3x3 s2x2 transposed float32 nchw", up.spec
    assert up.schedule.startswith("transposed_phase")
    assert "depth1" in up3d.spec and up3d.schedule.startswith("transposed_phase"), up3d.spec
    specs = [r.spec for r in report.kernels()]
    assert any("circular" in s for s in specs) and any("depth1" in s for s in specs), specs
    # fallback rows keep the conv's shapes and parameters, as a kernel row shows them
    [row] = report.fallbacks()
    assert row.schedule == "aten" and row.kernel_path is None and "1x3" in row.spec, row.spec


def test_asymmetric_reflect_padding_falls_back() -> None:
    """F.pad(mode="reflect") with different amounts on the two sides (a causal conv's) is not
    one padding a kernel reads: the pad stays a separate op (tests/test_padding_modes.py has
    the symmetric ones, which run kernels)."""

    class Causal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3)

        def forward(self, x):
            return self.conv(nn.functional.pad(x, (2, 0), mode="replicate"))

    report = check_model(Causal().eval(), [torch.randn(1, 3, 9)], expect_kernels=0,
                         expect_fallbacks=1)
    assert "padding_mode='replicate'" in report[0].fallback_reason
    assert "the same on both sides" in report[0].fallback_reason


def test_float64_falls_back() -> None:
    model = nn.Conv2d(3, 4, 3).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    out, report = run_compiled(model, [x])
    with torch.no_grad():  # the host compiler runs it: float64 agrees to rounding
        torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)
    assert "dtype float64" in report[0].fallback_reason
    assert convcompiler.counters["launch.conv"] == 0


def test_cpu_aten_option_runs_aten_and_says_so() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 9, 9)
    out, report = run_compiled(model, [x], options={"cpu": "aten"})
    assert_close(out, float64_copy(model)(x.double()), torch.float32)
    assert convcompiler.counters["launch.conv"] == 0
    assert len(report.fallbacks()) == 2
    assert all("cpu='aten'" in r for r in reasons(report))


def test_schedule_option_forces_a_schedule() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 10, 9)
    for name in ("im2win_implicit", "im2win_band"):
        torch._dynamo.reset()
        report = check_model(model, [x], expect_kernels=2, options={"schedule": name})
        assert {r.schedule for r in report} == {name}
        assert all("option schedule=" in r.why for r in report)
    torch._dynamo.reset()
    report = check_model(
        model, [x], expect_kernels=0, expect_fallbacks=2, options={"schedule": "aten"}
    )
    assert all("schedule='aten'" in r for r in reasons(report))
