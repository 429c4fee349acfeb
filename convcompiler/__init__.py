"""convcompiler: a torch.compile backend that runs convolutions as generated im2win kernels.

    torch.compile(model, backend="im2win")        # no import of convcompiler needed

Public API:
    Config          the backend's options (torch.compile(options={...}))
    last_report()   the regions of the most recent compile
    last_reports()  every piece of the most recent Dynamo graph (DDP splits graphs)
    counters        launches, matches and fallbacks (resettable)

Importing the package imports neither torch nor triton (the `convcompiler cache` commands
start without them).
"""

from __future__ import annotations

import sys

from .config import Config
from .counters import counters
from .inspection.report import RegionRecord, Report, last_report, last_reports

__version__ = "0.1.0"


def _installed_entry_point() -> bool:
    """Whether `im2win` is in the torch_dynamo_backends entry points (a pip install), so
    Dynamo finds the backend by itself the first time it is named."""
    from importlib.metadata import entry_points

    return any(ep.name == "im2win" for ep in entry_points(group="torch_dynamo_backends"))


def register_backend() -> None:
    """Register `im2win` with Dynamo unless the entry point (or anyone) already did."""
    from torch._dynamo.backends import registry

    registry._discover_entrypoint_backends()  # reads the torch_dynamo_backends group
    if "im2win" in registry._BACKENDS:
        return
    from .frontend.backend import im2win

    registry.register_backend(im2win, name="im2win")


# A pip install registers the backend through its entry point, and torch is only imported
# when someone uses it. A source checkout on PYTHONPATH has no entry point: register now.
if "torch" in sys.modules or not _installed_entry_point():
    register_backend()

__all__ = [
    "Config",
    "RegionRecord",
    "Report",
    "counters",
    "last_report",
    "last_reports",
    "__version__",
]
