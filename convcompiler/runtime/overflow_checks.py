"""Skip the integer-overflow checks Triton's interpreter computes and then throws away.

Every 32-bit integer add, sub and mul the interpreter runs goes through
`binary_op_sanitize_overflow_impl` (triton/language/semantic.py) when the builder's options
say `sanitize_overflow`, which the interpreter's always do: it widens both operands to int64,
redoes the operation, compares the result with the int32 range and hands the condition to
`device_assert`, which returns at once unless the options say `debug`. The interpreter's
options never do, so the check's result is discarded, yet it costs about half of an
interpreted conv's time (cProfile: 17 of 35 s of a resnet50 forward at 32 px).

`discarded_checks_off()` turns the option off for the duration of a launch, only when
`debug` is off (the check is then a no-op) and puts the interpreter's options back after.
With debug on, the checks run and assert as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator


@contextlib.contextmanager
def discarded_checks_off() -> Iterator[None]:
    from triton.runtime.interpreter import interpreter_builder  # triton 3.6 and 3.8 alike

    options = interpreter_builder.options
    if options.debug or not options.sanitize_overflow:
        yield
        return
    interpreter_builder.options = dataclasses.replace(options, sanitize_overflow=False)
    try:
        yield
    finally:
        interpreter_builder.options = options
