"""The convcompiler command: explain, kernels, cache, roofline, the debug dump and the bench."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from convcompiler import bench
from convcompiler.bench.__main__ import main as bench_main
from convcompiler.inspection.cli import main
from convcompiler.passes import POST_GRAD_PASSES


def test_explain_prints_the_region_table(capsys, tmp_path) -> None:
    out_json = tmp_path / "regions.json"
    assert (
        main(["explain", "torchvision:resnet18", "--input", "1,3,64,64", "--json", str(out_json)])
        == 0
    )
    out = capsys.readouterr().out
    for column in ("region", "kind", "spec", "schedule", "predicted", "kernel / fallback reason"):
        assert column in out
    assert out.count("\nconv_bn_") == 20
    data = json.loads(out_json.read_text())
    assert len(data[0]["regions"]) == 20
    assert all(
        r["kind"] == "conv_bn" and r["epilogue"].startswith("bn") for r in data[0]["regions"]
    )


def test_explain_from_a_python_file_and_candidates(capsys, tmp_path) -> None:
    path = tmp_path / "net.py"
    path.write_text(
        "import torch.nn as nn\n"
        "def make():\n    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1))\n"
    )
    assert (
        main(["explain", f"{path}:make", "--input", "1,3,16,16", "--explain", "--target", "a100"])
        == 0
    )
    out = capsys.readouterr().out
    assert "planned for a100" in out and "predicted" in out and "->" in out
    # why the winner won (its time and the deciding term), then what runs on this CPU
    assert re.search(r"-> \w+ \(model\): \w+: [\d.]+ us \((compute|memory|launch)", out)
    assert "runs here: option cpu='plan'" in out
    # tile variants the cost model cannot tell apart are one row
    assert "tile variants, the same time" in out
    rows = [ln for ln in out.splitlines() if "us predicted" in ln]
    assert len(rows) == len({tuple(r.split()[:1]) + (r.split("(")[0],) for r in rows})


def test_bad_model_and_options_are_clear_errors(capsys) -> None:
    assert main(["explain", "resnet_x:make", "--input", "1,3,8,8"]) == 2
    assert "torchvision:NAME" in capsys.readouterr().err
    assert (
        main(["explain", "torchvision:resnet18", "--input", "1,3,8,8", "--options", '{"nope": 1}'])
        == 2
    )
    assert "valid options are" in capsys.readouterr().err


CLI_ERRORS = {
    "missing import file": (["cache", "import", "{tmp}/missing.json"], "no such file"),
    "import file not JSON": (["cache", "import", "{tmp}/bad.json"], "bad.json is not valid JSON"),
    "import file not an export": (["cache", "import", "{tmp}/list.json"], "not a convcompiler"),
    "import file of another format": (["cache", "import", "{tmp}/other.json"], "export"),
    "export without a file": (["cache", "export"], "needs a FILE"),
    "no kernel of that name": (["kernels", "show", "no-such-kernel"], "no kernels in"),
    "options not JSON": (
        ["explain", "torchvision:resnet18", "--input", "1,3,8,8", "--options", "{bad"],
        "--options is not valid JSON",
    ),
    "options not an object": (
        ["explain", "torchvision:resnet18", "--input", "1,3,8,8", "--options", "[1]"],
        "--options must be a JSON object",
    ),
    "unknown option": (
        ["explain", "torchvision:resnet18", "--input", "1,3,8,8", "--options", '{"nope": 1}'],
        "valid options are",
    ),
    "unknown torchvision model": (
        ["explain", "torchvision:resnet_nope", "--input", "1,3,8,8"],
        "torchvision has no model 'resnet_nope'",
    ),
    "unknown model kind": (["explain", "resnet_x:make", "--input", "1,3,8,8"], "torchvision:NAME"),
    "missing model file": (["explain", "{tmp}/nope.py:make", "--input", "1,3,8,8"], "nope.py"),
    "bad input shape": (["explain", "torchvision:resnet18", "--input", "1,x"], "input shape"),
    "unknown arch": (
        ["aot", "--arch", "sm_70", "torchvision:resnet18", "--input", "1,3,8,8"],
        "sm_70",
    ),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_errors_are_one_line_and_a_hint(case: str, tmp_path) -> None:
    """Each documented error: exit 2, one error line and one hint line, no traceback."""
    (tmp_path / "bad.json").write_text('{"format": ')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    argv, expected = CLI_ERRORS[case]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    env = {**os.environ, "CONVCOMPILER_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run(
        [sys.executable, "-m", "convcompiler", *argv], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith(("convcompiler:", "  hint:"))]
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert len(lines) == 2 and lines[0].startswith("convcompiler: error: "), run.stderr
    assert lines[1].startswith("  hint: ") and expected in lines[0], run.stderr


def test_kernels_list_and_show(capsys, tmp_path) -> None:
    torch.compile(nn.Conv2d(3, 4, 3), backend="im2win", options={"kernel_dir": str(tmp_path)})(
        torch.randn(1, 3, 8, 8)
    )
    assert main(["kernels", "list", "--dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    name = next(line.split()[-1] for line in listing.splitlines() if line.endswith(".py"))
    assert main(["kernels", "show", "--dir", str(tmp_path)]) == 0
    assert "@triton.jit" in capsys.readouterr().out
    assert main(["kernels", "show", name[:30], "--dir", str(tmp_path)]) == 0
    assert "def launch(x, weight, bias=None, bn_weight=None" in capsys.readouterr().out
    assert main(["kernels", "show", "no-such-kernel", "--dir", str(tmp_path)]) == 2


def test_cache_commands(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CONVCOMPILER_CACHE_DIR", str(tmp_path / "cache"))
    torch.compile(nn.Conv2d(3, 4, 3), backend="im2win")(torch.randn(1, 3, 8, 8))
    assert main(["cache", "stats"]) == 0
    assert "records      1" in capsys.readouterr().out
    exported = tmp_path / "cache.json"
    assert main(["cache", "export", str(exported)]) == 0
    assert list((tmp_path / "cache" / "kernels").glob("*.py"))
    assert main(["cache", "clear"]) == 0
    assert "and 1 kernel files" in capsys.readouterr().out
    assert not list((tmp_path / "cache" / "kernels").glob("*.py"))
    assert main(["cache", "import", str(exported)]) == 0
    assert "imported 1 records" in capsys.readouterr().out
    assert main(["cache", "export"]) == 2


def test_roofline_png_for_resnet50(tmp_path) -> None:
    png = tmp_path / "roofline_resnet50.png"
    assert (
        main(
            [
                "roofline",
                "torchvision:resnet50",
                "--input",
                "2,3,64,64",
                "--target",
                "h100",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_debug_dump_holds_every_pass_and_kernel(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CONVCOMPILER_DEBUG_DIR", str(tmp_path))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, 9, 9, requires_grad=True)
    with caplog.at_level("INFO", logger="convcompiler"):
        torch.compile(model, backend="im2win")(x).sum().backward()
    (dump,) = tmp_path.iterdir()
    assert any(str(dump) in r.getMessage() for r in caplog.records)  # it says where
    names = {str(p.relative_to(dump)) for p in dump.rglob("*")}
    passes = [p.__name__ for p in POST_GRAD_PASSES] + ["lowered"]  # every pass, in order
    lowered = f"forward/{len(passes):02d}_lowered.py"
    for expected in (
        "pre_grad/00_input.py",
        "pre_grad/01_find_conv_padding_modes.py",
        "forward/00_input.py",
        *(f"forward/{i:02d}_{name}.py" for i, name in enumerate(passes, start=1)),
        "backward/00_input.py",
        "regions.json",
    ):
        assert expected in names, sorted(names)
    output_code = [
        n for n in names if n.startswith("torchinductor/") and n.endswith("output_code.py")
    ]
    assert output_code, sorted(names)  # Inductor's trace of the same compile
    assert any("torch.ops.im2win.conv" in (dump / n).read_text() for n in output_code)
    regions = json.loads((dump / "regions.json").read_text())["regions"]
    kernels = {p.name for p in (dump / "kernels").iterdir()}
    assert {os.path.basename(r["kernel_path"]) for r in regions} == kernels
    # forward: 2 convs; backward: grad_input of both (x requires grad) and grad_weight of both
    assert len(kernels) == 6, sorted(kernels)
    assert "torch.ops.im2win.conv" in (dump / lowered).read_text()


@pytest.mark.parametrize(
    "suite,shape", [("resnet50", "1,3,32,32"), ("swin_t", "2,3,112,112"), ("convnext_tiny", "")]
)
def test_bench_network_suites_on_cpu_honour_their_flags(suite, shape, capsys, tmp_path) -> None:
    """Each network suite in its small form on CPU: --input, --batch and --json take effect,
    window attention regions included (`bench swin_t` used to crash on them)."""
    out_json = tmp_path / "net.json"
    sizes = ["--input", shape] if shape else ["--input", "4,3,32,32", "--batch", "1"]
    assert bench_main([suite, *sizes, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "no speed is measured or claimed" in out and "0 with problems" in out
    regions = json.loads(out_json.read_text())["regions"]
    batch = int((shape or "1").split(",")[0])
    assert regions and all(r["planned_bytes"] >= 0 for r in regions), regions
    assert f"[{batch}," in out or f"batch={batch} " in out
    if suite == "swin_t":
        assert sum(r["region"].startswith("window_attention") for r in regions) == 12


@pytest.mark.parametrize(
    "argv",
    [
        ["window-attention", "--input", "1,3,8,8"],
        ["im2win-layers", "--model", "resnet18"],
        ["compile-cache", "--batch", "2"],
        ["transfer-learning", "--dtype", "float16"],
        ["resnet50", "--fusion", "cpu"],
    ],
)
def test_bench_refuses_a_flag_its_suite_does_not_read(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{argv[1]} has no effect on suite {argv[0]!r}" in err


@pytest.mark.slow
def test_bench_transfer_learning_in_its_small_form(capsys, tmp_path) -> None:
    """--model, --input and --json take effect; im2win (Tune mode) saves less than eager."""
    out_json = tmp_path / "transfer.json"
    argv = ["transfer-learning", "--model", "resnet18", "--input", "2,3,32,32"]
    assert bench_main([*argv, "--json", str(out_json)]) == 0
    assert "transfer-learning: resnet18" in capsys.readouterr().out
    rows = {r["variant"]: r for r in json.loads(out_json.read_text())}
    assert {r["batch"] for r in rows.values()} == {2} and {r["px"] for r in rows.values()} == {32}
    assert rows["im2win"]["saved_bytes"] < rows["eager"]["saved_bytes"]


@pytest.mark.slow
def test_bench_compile_cache_in_its_small_form(capsys) -> None:
    """Cold then warm, each in a new process: the warm one renders no new kernel and is
    served by Inductor's caches."""
    assert bench_main(["compile-cache", "--input", "1,3,16,16"]) == 0
    out = capsys.readouterr().out
    warm = next(line for line in out.splitlines() if line.startswith("warm "))
    assert "codegen=0" in warm and "inductor-served=1" in warm, out


def test_bench_im2win_layers_on_cpu_makes_no_speed_claim(capsys, tmp_path) -> None:
    out_json = tmp_path / "layers.json"
    assert bench_main(["im2win-layers", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "no speed is measured or claimed" in out and "band/im2col" in out
    rows = json.loads(out_json.read_text())
    assert [r["layer"] for r in rows] == [f"conv{i}" for i in range(1, 13)]
    for row in rows:
        assert 0 < row["band_bytes"] < row["im2col_bytes"]


def test_bench_window_attention_prints_bytes_from_shapes(capsys, tmp_path) -> None:
    out_json = tmp_path / "attention.json"
    assert bench_main(["window-attention", "--batch", "2", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "no speed is measured or claimed" in out and "computed from shapes" in out
    rows = json.loads(out_json.read_text())
    assert [r["stage"] for r in rows] == ["stage1", "stage2", "stage3", "stage4"]
    for row in rows:
        # q, k, v, out: 4 x B*nW*H*N*D*4 bytes; the scores alone are B*nW*H*N*N*4
        assert row["aten_materialised_bytes"] > 2 * row["fused_bytes"]
        assert "_softmax.default" in row["aten_ops"] and "bmm.default" in row["aten_ops"]
    # stage 1 at batch 2: 128 windows x 3 heads x 49 x 32 floats for each of q, k, v, out
    assert rows[0]["fused_bytes"] == 4 * 128 * 3 * 49 * 32 * 4 + 3 * 49 * 49 * 4 + 64 * 49 * 49 * 4


@pytest.mark.slow
def test_console_script_and_module_entry(tmp_path) -> None:
    env = dict(os.environ, CONVCOMPILER_CACHE_DIR=str(tmp_path))
    for cmd in (
        ["convcompiler", "--help"],
        [sys.executable, "-m", "convcompiler", "cache", "stats"],
    ):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
    assert bench.__doc__


NO_TORCH = """
import sys
import time
from convcompiler.inspection.cli import main
for argv in ({argvs}):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "triton", "numpy") if m in sys.modules)
assert not heavy, heavy
print("NO TORCH OK")
"""


def test_help_cache_and_kernels_commands_never_import_torch(tmp_path) -> None:
    """`--help`, `cache` and `kernels` start without torch (it alone takes seconds); `cache
    verify` renders kernels again, so it may import torch."""
    argvs = [["--help"], ["cache", "--help"], ["cache", "stats"], ["kernels", "list"]]
    argvs += [["cache", "list"], ["cache", "export", str(tmp_path / "x.json")]]
    argvs += [["cache", "import", str(tmp_path / "x.json")], ["cache", "clear"]]
    env = dict(os.environ, CONVCOMPILER_CACHE_DIR=str(tmp_path / "cache"))
    code = NO_TORCH.format(argvs=", ".join(map(repr, argvs)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "NO TORCH OK" in out.stdout, out.stderr
    # and the installed command itself, end to end, well inside the 1.5 s
    for argv in (["--help"], ["cache", "stats"]):
        start = time.perf_counter()
        done = subprocess.run(["convcompiler", *argv], env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        assert done.returncode == 0, done.stderr
        assert elapsed < 1.5, (argv, elapsed)
