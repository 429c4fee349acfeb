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
    kernels = [r.kind for r in report if r.kernel_path]
    # each block's MLP is one kernel (fc1 -> GELU -> fc2 -> + x); its qkv and proj linears
    # read and write their window tokens in place (test_swin_windows.py)
    assert kernels == ["mlp_block"] * 2 + ["conv"] + ["linear"] * 4 + ["window_attention"] * 2
    assert sum("windows4x4" in r.spec for r in report) == 4, str(report)
    # the regions replace the same compute in both im2win variants: a conv, 2 attentions (of
    # 2 bmm each), 2 MLPs (of 2 linears each) and the other linears (as matmuls)
    assert ours.compute == aten_host.compute == 1 + 2 + 2 + (eager.compute - 1 - 4 - 4)
    assert ours.region_bytes == aten_host.region_bytes > 0
    # Inductor fuses what the ATen host ran op by op ...
    assert ours.launches < aten_host.launches < eager.launches
    assert ours.memory_bytes < aten_host.memory_bytes
    # ... and the fused attention moves less than Inductor's bmm/softmax kernels
    assert ours.launches < inductor.launches and ours.bytes < inductor.bytes < eager.bytes


def test_fused_linear_epilogues_move_fewer_bytes(monkeypatch) -> None:
    """The MLP's GELU and residual add run in the linears' GEMM epilogues: their traffic
    leaves the memory-bound launches, and the residual read joins the matmul column."""
    import convcompiler.frontend.session as session
    from convcompiler.passes import linear_as_conv

    model, x = tiny_swin(), torch.randn(2, 3, 32, 32)
    ours = plan_model(model, x, "h100", "gpu", blocks=False)[-1]
    without = tuple(p for p in session.POST_GRAD_PASSES if p is not linear_as_conv)
    monkeypatch.setattr(session, "POST_GRAD_PASSES", without)
    before = plan_model(model, x, "h100", "gpu", blocks=False)[-1]
    assert not [r for r in convcompiler.last_report() if r.kind == "linear"]
    assert ours.region_bytes == before.region_bytes
    assert ours.launches < before.launches
    assert ours.memory_bytes < 0.7 * before.memory_bytes
    assert before.matmul_bytes < ours.matmul_bytes < 1.2 * before.matmul_bytes
    assert ours.total_bytes < before.total_bytes
    # one kernel per MLP with its LayerNorm (block fusion): the 4C hidden's round trip is gone
    # from the matmuls' column, and the norm's output from the memory-bound one (Inductor
    # fused the norm with the residual add before it, so no launch goes)
    fused = plan_model(model, x, "h100", "gpu")[-1]
    hidden = 2 * 2 * (2 * 64) * 128 * 4  # 2 MLPs x (write + read) x 128 tokens x 128 x fp32
    vectors = 2 * (128 + 32 + 2 * 32) * 4  # biases and the norm's weight and bias
    assert fused.matmul_bytes == ours.matmul_bytes - hidden + vectors
    assert fused.launches == ours.launches
    assert fused.memory_bytes < ours.memory_bytes - 2 * (2 * 64) * 32 * 4  # the norms' outputs


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
