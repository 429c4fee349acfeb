"""Runtime: load generated kernel modules (hash-checked) and call them from FX graphs."""

from .kernel_call import KernelCall, interpreter_notice
from .loader import KernelIntegrityError, load_source, load_verified, private_dir, write_source

__all__ = [
    "KernelCall",
    "KernelIntegrityError",
    "interpreter_notice",
    "load_source",
    "load_verified",
    "private_dir",
    "write_source",
]
