"""The traffic benchmark (bench/traffic.py) on a small Swin: counts from Inductor's own
scheduler, planned for a GPU this machine does not have."""

from __future__ import annotations

import json

import torch
from torchvision.models.swin_transformer import SwinTransformer

import convcompiler
from convcompiler.bench.__main__ import main as bench_main
from convcompiler.bench.traffic import plan_model


def tiny_swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2], num_heads=[2], window_size=[4, 4]
    ).eval()


def test_im2win_on_inductor_moves_least() -> None:
    model, x = tiny_swin(), torch.randn(2, 3, 32, 32)
    rows = {row.variant: row for row in plan_model(model, x, "h100", "gpu")}
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


def test_traffic_command_in_its_small_form(tmp_path, capsys) -> None:
    """`python -m convcompiler.bench traffic` on a model file, with Inductor's CPU fusion:
    --model, --input (batch and size), --dtype, --fusion and --json take effect."""
    (tmp_path / "tiny.py").write_text(
        "from torchvision.models.swin_transformer import SwinTransformer\n"
        "def make():\n"
        "    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2],\n"
        "                           num_heads=[2], window_size=[4, 4])\n"
    )
    out_json = tmp_path / "traffic.json"
    argv = ["traffic", "--model", f"{tmp_path}/tiny.py:make", "--input", "2,3,32,32"]
    argv += ["--dtype", "float32", "--fusion", "cpu", "--json", str(out_json)]
    assert bench_main(argv) == 0
    out = capsys.readouterr().out
    assert "batch 2, float32" in out and "Inductor's CPU fusion" in out
    (rows,) = json.loads(out_json.read_text()).values()
    by = {r["variant"]: r for r in rows}
    assert by["im2win"]["launches"] < by["inductor"]["launches"]
    assert by["im2win"]["bytes"] < by["im2win-aten"]["bytes"] < by["eager"]["bytes"]
