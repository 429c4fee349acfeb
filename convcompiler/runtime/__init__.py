"""Runtime: load generated kernel modules (hash-checked) and call them from FX graphs."""

from ..files import private_dir
from .kernel_call import KernelCall, interpreter_notice
from .loader import KernelIntegrityError, keep_source, load_source, load_verified, write_source

__all__ = [
    "KernelCall",
    "KernelIntegrityError",
    "interpreter_notice",
    "keep_source",
    "load_source",
    "load_verified",
    "private_dir",
    "write_source",
]
