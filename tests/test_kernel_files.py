"""Generated kernels are inspectable files, loaded only after their hash is checked."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from helpers import run_compiled

import convcompiler
from convcompiler.frontend.kernels import conv_source, conv_spec_of
from convcompiler.runtime import KernelIntegrityError, load_source, load_verified, loader


def compile_small(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    return run_compiled(model, [torch.randn(1, 3, 9, 8)], options={"kernel_dir": str(tmp_path)})


def test_kernel_files_are_named_by_region_and_content_hash(tmp_path) -> None:
    _, report = compile_small(tmp_path / "k")
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o700
    for region in report:
        path = region.kernel_path
        assert path is not None and os.path.exists(path)
        assert os.path.dirname(path) == str(tmp_path / "k")
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert path.endswith(f"_{digest[:16]}.py")
        assert region.schedule in os.path.basename(path)
        assert "@triton.jit" in open(path).read()


def test_report_is_a_table_and_json(tmp_path) -> None:
    _, report = compile_small(tmp_path)
    text = str(report)
    assert "conv_0" in text and "conv_1" in text and "schedule" in text
    data = json.loads(report.to_json())
    assert [r["name"] for r in data["regions"]] == ["conv_0", "conv_1"]
    assert all(r["fallback_reason"] is None for r in data["regions"])


def test_altered_kernel_file_is_never_executed(tmp_path) -> None:
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    source = conv_source(conv_spec_of(x, w, None, 1, 1))
    directory = tmp_path / "kernels"
    directory.mkdir(mode=0o700)
    path = directory / source.filename
    path.write_text("import os\nos.environ['CONVCOMPILER_TAMPERED'] = '1'\n")
    with pytest.raises(KernelIntegrityError):
        load_verified(path, source.sha256, interpret=True)
    loader._MODULES.pop((source.sha256, True), None)
    convcompiler.counters.reset()
    module, written = load_source(source, directory, interpret=True)
    assert written == path and path.read_text() == source.text
    assert convcompiler.counters["kernel_file.rewritten"] == 1
    assert "CONVCOMPILER_TAMPERED" not in os.environ
    y = module.launch(x, w, None)
    assert torch.allclose(y, torch.nn.functional.conv2d(x, w, None, 1, 1), atol=1e-5)


def test_interpreter_notice_is_logged_once(caplog) -> None:
    from convcompiler.runtime import kernel_call

    kernel_call._interpreter_notice_given = False
    with caplog.at_level(logging.INFO, logger="convcompiler"):
        for _ in range(2):
            torch._dynamo.reset()
            run_compiled(nn.Conv2d(3, 4, 3).eval(), [torch.randn(1, 3, 8, 8)])
    notices = [r for r in caplog.records if "interpreter (cpu='interpret')" in r.getMessage()]
    assert len(notices) == 1


def test_torch_logs_enables_convcompiler_logging(tmp_path) -> None:
    code = (
        "import torch\n"
        "m = torch.nn.Conv2d(3, 4, 3).eval()\n"
        "with torch.no_grad():\n"
        "    torch.compile(m, backend='im2win')(torch.randn(1, 3, 8, 8))\n"
    )
    env = dict(os.environ, TORCH_LOGS="+convcompiler", CONVCOMPILER_CACHE_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "pass match_conv" in out.stderr
