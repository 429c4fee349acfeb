"""Options: one frozen Config; unknown or bad options fail clearly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from convcompiler import Config


def test_defaults_and_frozen(monkeypatch) -> None:
    monkeypatch.delenv("CONVCOMPILER_CPU", raising=False)  # the suite sets it (conftest.py)
    config = Config.from_options(None)
    assert config == Config() and config.cpu == "aten" and config.schedule is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cpu = "interpret"


@pytest.mark.parametrize("mode", ["interpret", "aten", "plan"])
def test_cpu_default_comes_from_the_environment(monkeypatch, mode: str) -> None:
    monkeypatch.setenv("CONVCOMPILER_CPU", mode)
    assert Config().cpu == mode
    assert Config.from_options({"cpu": "aten"}).cpu == "aten"  # an option still wins


def test_bad_cpu_environment_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("CONVCOMPILER_CPU", "gpu")
    with pytest.raises(ValueError, match="CONVCOMPILER_CPU"):
        Config()


def test_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        Config.from_options({"no_such_option": 1})
    message = str(err.value)
    assert "no_such_option" in message
    for name in Config.option_names():
        assert name in message


@pytest.mark.parametrize(
    "options, match",
    [
        ({"cpu": "gpu"}, "cpu"),
        ({"schedule": "im2col"}, "schedule"),
        ({"kernel_dir": 3}, "kernel_dir"),
        ({"rank_timeout": -1}, "rank_timeout"),
        ({"rank_timeout": "60"}, "rank_timeout"),
    ],
)
def test_bad_values_are_rejected(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Config.from_options(options)


def test_torch_compile_with_unknown_option_raises_clearly() -> None:
    compiled = torch.compile(nn.Conv2d(3, 4, 3), backend="im2win", options={"no_such_option": 1})
    with pytest.raises(Exception) as err:
        compiled(torch.randn(1, 3, 8, 8))
    assert "unknown im2win backend option(s) ['no_such_option']" in str(err.value)
    assert "valid options are" in str(err.value)


def test_kernel_dir_option_and_env(tmp_path, monkeypatch) -> None:
    assert Config(kernel_dir=str(tmp_path)).kernel_path == tmp_path
    monkeypatch.setenv("CONVCOMPILER_CACHE_DIR", str(tmp_path / "root"))
    assert Config().kernel_path == tmp_path / "root" / "kernels"
