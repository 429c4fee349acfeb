"""The traffic benchmark (bench/traffic.py) on a small Swin: counts from Inductor's own
scheduler, planned for a GPU this machine does not have."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.swin_transformer import SwinTransformer

import convcompiler
from convcompiler.bench.traffic import plan_model


@pytest.mark.parametrize("fusion", ["gpu", "cpu"])
def test_im2win_on_inductor_moves_least(fusion: str) -> None:
    torch.manual_seed(0)
    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2], num_heads=[2], window_size=[4, 4]
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    rows = {row.variant: row for row in plan_model(model, x, "h100", fusion)}
    assert list(rows) == ["eager", "inductor", "im2win-aten", "im2win"]
    eager, inductor, aten_host, ours = rows.values()
    report = convcompiler.last_report()
    assert [r.kind for r in report if r.kernel_path] == ["conv"] + ["window_attention"] * 2
    # the regions replace the same compute in both im2win variants
    assert ours.compute == aten_host.compute == 3 + (eager.compute - 1 - 4)
    assert ours.region_bytes == aten_host.region_bytes > 0
    # Inductor fuses what the ATen host ran op by op ...
    assert ours.launches < aten_host.launches < eager.launches
    assert ours.memory_bytes < aten_host.memory_bytes
    # ... and the fused attention moves less than Inductor's bmm/softmax kernels
    assert ours.launches < inductor.launches and ours.bytes < inductor.bytes < eager.bytes
