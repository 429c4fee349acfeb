"""The callable a rewritten FX graph runs in place of the region's ATen nodes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from ..counters import counters
from .overflow_checks import discarded_checks_off
from .stack_headroom import with_headroom

log = logging.getLogger(__name__)
_interpreter_notice_given = False


def interpreter_notice() -> None:
    """Say once per process that CPU kernels run through Triton's interpreter."""
    global _interpreter_notice_given
    if not _interpreter_notice_given:
        _interpreter_notice_given = True
        log.info(
            "convcompiler: CPU tensors run the generated Triton kernels through Triton's "
            "interpreter (cpu='interpret'), which is slow and meant for verification; "
            "cpu='aten' (the default) runs the host compiler's code on CPU instead."
        )


def _cuda_index(args: tuple) -> int | None:
    """The CUDA device of the first tensor argument (None for CPU tensors)."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.index if arg.device.type == "cuda" else None
    return None


def launch_on_device(launch: Callable[..., Any], args: tuple) -> Any:
    """Run `launch(*args)` with the tensors' CUDA device current: Triton launches on the
    current device, which need not be the one the tensors live on. CPU tensors run through
    Triton's interpreter, given room on the frame stack (stack_headroom.py) and without the
    overflow checks it would compute and discard (overflow_checks.py)."""
    device = _cuda_index(args)
    if device is None:
        with discarded_checks_off():
            return with_headroom(launch, *args)
    if device != torch.cuda.current_device():
        with torch.cuda.device(device):
            return launch(*args)
    return launch(*args)


class KernelCall:
    """Counts a launch under `launch.<kind>`, then runs the generated module's launcher."""

    def __init__(self, kind: str, region: str, launch: Callable[..., Any], path: Path) -> None:
        self.kind = kind
        self.region = region
        self.path = path
        self._launch = launch
        self._counter = f"launch.{kind}"
        # FX prints and code-generates call_function targets by these names.
        self.__name__ = f"{kind}_kernel_{region}"
        self.__qualname__ = self.__name__
        self.__module__ = __name__

    def __call__(self, *args: Any) -> Any:
        counters[self._counter] += 1
        return launch_on_device(self._launch, args)

    def __repr__(self) -> str:
        return f"KernelCall({self.region}, {self.path.name})"
