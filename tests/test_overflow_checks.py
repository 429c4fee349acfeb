"""Interpreted launches skip the overflow checks Triton's interpreter would compute and throw
away (runtime/overflow_checks.py), and keep them when its options ask for asserts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import FAST, assert_close, float64_copy
from triton.language import semantic
from triton.runtime import interpreter

import convcompiler
from convcompiler.runtime.overflow_checks import discarded_checks_off


@pytest.fixture
def sanitize_calls(monkeypatch):
    """For every integer add/sub/mul the interpreter runs: was the overflow check on?"""
    seen: list[bool] = []
    check = semantic.TritonSemantic.binary_op_sanitize_overflow_impl

    def counted(self, lhs, rhs, op):
        seen.append(bool(self.builder.options.sanitize_overflow))
        return check(self, lhs, rhs, op)

    monkeypatch.setattr(semantic.TritonSemantic, "binary_op_sanitize_overflow_impl", counted)
    return seen


def test_a_compiled_conv_runs_without_the_discarded_checks(sanitize_calls) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(1, 3, 7, 9)
    before = interpreter.interpreter_builder.options
    with torch.no_grad():
        y = torch.compile(conv, backend="im2win", options=FAST)(x)
        assert_close(y, float64_copy(conv)(x.double()), torch.float32)
    assert convcompiler.counters["launch.conv"] == 1
    assert sanitize_calls and not any(sanitize_calls)  # integer ops ran, none checked
    assert interpreter.interpreter_builder.options is before  # put back


def test_the_checks_stay_when_the_interpreter_asserts(monkeypatch) -> None:
    builder = interpreter.interpreter_builder
    debug = dataclasses.replace(builder.options, debug=True, sanitize_overflow=True)
    monkeypatch.setattr(builder, "options", debug)
    with discarded_checks_off():
        assert builder.options.sanitize_overflow  # device_assert would act on them
    assert builder.options is debug


def test_the_options_come_back_after_an_error() -> None:
    builder = interpreter.interpreter_builder
    before = builder.options
    assert before.sanitize_overflow and not before.debug  # what the interpreter starts with
    with pytest.raises(RuntimeError), discarded_checks_off():
        assert not builder.options.sanitize_overflow
        raise RuntimeError("a launch that fails")
    assert builder.options is before
