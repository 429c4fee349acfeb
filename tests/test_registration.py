"""The front door: backend="im2win" works in a process that never imports convcompiler."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

RESNET18 = textwrap.dedent(
    """
    import sys, torch, torchvision
    assert "convcompiler" not in sys.modules
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = torch.compile(model, backend="im2win")(x)
        ref = model.double()(x.double())
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-4, err

    import convcompiler, os
    report = convcompiler.last_report()
    print(report)
    assert len(report) == 20 and all(r.kind == "conv_bn" for r in report), len(report)
    for r in report:
        assert r.fallback_reason is None, r
        assert r.kernel_path is not None and os.path.exists(r.kernel_path), r
    assert convcompiler.counters["launch.conv_bn"] == 20, convcompiler.counters
    print("RESNET18 OK", err)
    """
)

IMPORT_FIRST = textwrap.dedent(
    """
    import convcompiler, torch
    from torch._dynamo.backends.registry import list_backends
    assert "im2win" in list_backends()
    with torch.no_grad():
        torch.compile(torch.nn.Conv2d(3, 4, 3), backend="im2win")(torch.randn(1, 3, 6, 6))
    assert convcompiler.counters["launch.conv"] == 1
    print("IMPORT FIRST OK")
    """
)


def run_python(code: str, tmp_path) -> str:
    env = dict(os.environ, CONVCOMPILER_CACHE_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_resnet18_without_importing_convcompiler(tmp_path) -> None:
    assert "RESNET18 OK" in run_python(RESNET18, tmp_path)


def test_importing_convcompiler_first_does_not_register_twice(tmp_path) -> None:
    assert "IMPORT FIRST OK" in run_python(IMPORT_FIRST, tmp_path)


def test_import_registers_when_no_entry_point_did(monkeypatch) -> None:
    from torch._dynamo.backends import registry

    import convcompiler
    from convcompiler.frontend.backend import im2win

    monkeypatch.delitem(registry._BACKENDS, "im2win", raising=False)
    monkeypatch.delitem(registry._COMPILER_FNS, "im2win", raising=False)
    convcompiler.register_backend()
    assert registry.lookup_backend("im2win") is im2win
    convcompiler.register_backend()  # a second import is a no-op, not "duplicate name"


CHECKOUT = textwrap.dedent(
    """
    import importlib.metadata, sys
    real = importlib.metadata.entry_points

    def without_ours(**kw):  # a source checkout on PYTHONPATH: no entry point
        eps = real(**kw)
        if kw.get("group") != "torch_dynamo_backends":
            return eps
        return importlib.metadata.EntryPoints(e for e in eps if e.name != "im2win")

    importlib.metadata.entry_points = without_ours
    import convcompiler
    assert "torch" in sys.modules  # registering needs Dynamo
    import torch
    from torch._dynamo.backends.registry import lookup_backend
    from convcompiler.frontend.backend import im2win
    assert lookup_backend("im2win") is im2win
    print("CHECKOUT OK")
    """
)

INSTALLED = textwrap.dedent(
    """
    import sys
    import convcompiler
    assert "torch" not in sys.modules, "import convcompiler imported torch"
    assert convcompiler.counters["launch.conv"] == 0
    import torch
    with torch.no_grad():
        torch.compile(torch.nn.Conv2d(3, 4, 3), backend="im2win")(torch.randn(1, 3, 6, 6))
    assert convcompiler.counters["launch.conv"] == 1
    print("INSTALLED OK")
    """
)


def test_a_checkout_without_the_entry_point_registers_on_import(tmp_path) -> None:
    assert "CHECKOUT OK" in run_python(CHECKOUT, tmp_path)


def test_import_alone_stays_light_and_the_entry_point_still_works(tmp_path) -> None:
    assert "INSTALLED OK" in run_python(INSTALLED, tmp_path)
