"""The one Config of the backend.

A `Config` is built once per `torch.compile(..., backend="im2win", options={...})` call
from the options dict plus a few documented environment variables:

    CONVCOMPILER_CACHE_DIR   root of the per-user cache (kernels live in <root>/kernels).
                             Default: $XDG_CACHE_HOME/convcompiler or ~/.cache/convcompiler.
                             Created 0700; used only if this user owns it and group and
                             others cannot write it (files.py), else caching is off.
    CONVCOMPILER_DEBUG_DIR   default for the debug_dir option.
    CONVCOMPILER_CPU         default for the cpu option: aten (when unset), interpret, plan.
    CONVCOMPILER_REMOTE_CACHE  default for the remote_cache option (redis://host:port/db).

Every field that changes generated code is listed in `Config.codegen_fields`; later stages
put exactly those fields into their cache keys.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

CPU_MODES = ("interpret", "aten", "plan")
CONV_SCHEDULES = (
    "im2win_band",
    "im2win_implicit",
    "direct_depthwise",
    "gemm_1x1",
    "dw_gemm",
    "transposed_phase",
    "wgrad_splitk",
    "window_attention",  # attention regions only
    "sdpa",  # attention regions written with softmax: one SDPA call
    "aten",
)
BENCHMARKERS = ("do_bench", "fake")
HOSTS = ("inductor", "aten")
LAUNCHES = ("op", "inductor")
BACKWARDS = ("kernels", "aten")


@dataclass(frozen=True)
class Config:
    """Options of the im2win backend (pass them as `torch.compile(options={...})`).

    cpu: what runs the regions on CPU tensors. "aten" (default; the generated kernels target
        GPUs): the host compiler's own code (Inductor's conv lowering, C++ around it).
        "interpret": this project's generated Triton kernels through Triton's interpreter,
        about 250x slower than eager, for verification. "plan": plan and write the kernels
        for the target GPU (report, kernel files, static checks) but run ATen: for `explain`
        and `aot` on a machine without a GPU. $CONVCOMPILER_CPU sets the default for a
        process (for example CONVCOMPILER_CPU=interpret for a test suite).
    host: what compiles everything outside the regions. "inductor": Inductor fuses and
        compiles it (C++ on CPU, Triton on GPU) and calls the regions' ops. "aten": it runs
        as ATen ops under aot_autograd, with no compiler. None (default): "inductor", except
        that a CPU compile with cpu="plan" (it plans GPU kernels; what runs on the CPU does
        not matter) or with empty inputs uses "aten", and a CPU compile falls back to "aten",
        with one warning, when no C++ compiler is found.
    launch: how a region's kernels are launched on a GPU under host "inductor". "op"
        (default): the region is one `torch.ops.im2win.*` op, which Inductor calls and which
        launches its kernels. "inductor": the launcher is traced into the graph
        (`wrap_triton`), so Inductor's own wrapper launches the kernels (no Python dispatch
        per launch; CUDA graphs hold them). CPU tensors always use "op" (the interpreter).
        Not yet run on a GPU: opt in.
    backward: how a conv's backward runs in a training graph. "kernels" (default): it is
        split into grad_input, grad_weight and grad_bias (passes/conv_backward.py); the first
        two are regions like any other (a generated kernel, or ATen where the cost model or
        a guard says so). "aten": one `aten.convolution_backward` per conv, left to the host
        compiler. CPU tensors under cpu="aten" always keep it.
    schedule: force one schedule for every region it can run (one of CONV_SCHEDULES;
        "window_attention" or "sdpa" for attention regions, "aten" for every region).
        None lets the backend choose (see convcompiler/selection/select.py).
    target: the GPU to plan for ("h100", "h200", "a100", "l4", "rtx4090"). None: the GPU
        in use, or "h100" when there is none.
    autotune: measure the cost model's top_k candidates (also on with mode="max-autotune").
    top_k: how many of the cost model's best candidates autotuning measures.
    benchmarker: "do_bench" (triton.testing.do_bench median, GPU only) or "fake" (a
        deterministic stand-in for tests: it measures nothing).
    cache: read and write the persistent tuning cache (<cache dir>/tuning.sqlite3).
    verify: compile each chosen kernel ahead of time for the planning device's architecture
        and reject it if it spills registers or overflows shared memory (the next candidate
        is taken). The result is cached with the decision, so only a cold compile pays it.
    kernel_dir: where generated kernel sources are written. None means
        <cache dir>/kernels (see CONVCOMPILER_CACHE_DIR).
    recompute_conv_macs: in training, a convolution that reads a graph input and does at most
        this many multiply-adds per output element (C_in/groups x kernel volume) is
        recomputed in the backward, with the activations and max pooling after it, instead
        of saving their outputs (a CNN's stem: ResNet's 7x7 is 147). 0 turns it off.
    debug_dir: write a debug dump of every compile under this directory: the graphs before
        and after each pass, regions.json and the kernels. Default: $CONVCOMPILER_DEBUG_DIR.
    rank_timeout: under torch.distributed (world size > 1) the first rank to reach a region
        decides its schedule and the others use that decision (selection/agreement.py); this
        is how many seconds a rank waits for it before deciding alone (and agreeing no more
        in that process). 0 turns rank agreement off: every rank decides for itself.
    remote_cache: a Redis URL (redis://host:port/db) whose decisions a fleet shares, as a
        second level under the local tuning cache (selection/remote.py); decisions only,
        never code. Default: $CONVCOMPILER_REMOTE_CACHE. Off when `cache` is off.
    blocks: block fusion (passes/match_block.py): a transformer MLP (linear -> activation ->
        linear [-> layer scale] [-> + residual]) runs as one kernel whose hidden never goes
        to memory, where the cost model prefers it to running the layers one by one. False
        keeps every layer its own region, so a GPU run can measure the gain.
    """

    cpu: str = dataclasses.field(default_factory=lambda: default_cpu_mode())
    host: str | None = None
    launch: str = "op"
    backward: str = "kernels"
    schedule: str | None = None
    target: str | None = None
    autotune: bool = False
    top_k: int = 4
    benchmarker: str = "do_bench"
    cache: bool = True
    verify: bool = True
    kernel_dir: str | None = None
    recompute_conv_macs: int = 256
    debug_dir: str | None = None
    rank_timeout: float = 600.0
    remote_cache: str | None = None
    blocks: bool = True

    # Fields that change the generated source text or the schedule picked for a region;
    # they are part of every tuning-cache key.
    # cpu: "interpret" re-picks the tiles for Triton's interpreter, "plan" keeps the GPU's;
    # target: the planning device; verify: the static check refuses candidates; top_k: how
    # many candidates autotuning measures (and how many the report lists).
    codegen_fields = ("cpu", "schedule", "target", "verify", "top_k")

    def __post_init__(self) -> None:
        if self.cpu not in CPU_MODES:
            raise ValueError(f"option 'cpu' must be one of {CPU_MODES}, got {self.cpu!r}")
        if self.host is not None and self.host not in HOSTS:
            raise ValueError(f"option 'host' must be None or one of {HOSTS}, got {self.host!r}")
        if self.launch not in LAUNCHES:
            raise ValueError(f"option 'launch' must be one of {LAUNCHES}, got {self.launch!r}")
        if self.backward not in BACKWARDS:
            raise ValueError(
                f"option 'backward' must be one of {BACKWARDS}, got {self.backward!r}"
            )
        if self.schedule is not None and self.schedule not in CONV_SCHEDULES:
            raise ValueError(
                f"option 'schedule' must be None or one of {CONV_SCHEDULES}, got {self.schedule!r}"
            )
        if self.target is not None:
            from .devices import lookup

            lookup(self.target)  # raises ValueError naming the known targets
        for name in ("autotune", "cache", "verify", "blocks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"option {name!r} must be True or False")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ValueError(f"option 'top_k' must be a positive int, got {self.top_k!r}")
        macs = self.recompute_conv_macs
        if not isinstance(macs, int) or isinstance(macs, bool) or macs < 0:
            raise ValueError(f"option 'recompute_conv_macs' must be an int >= 0, got {macs!r}")
        timeout = self.rank_timeout
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
            raise ValueError(f"option 'rank_timeout' must be seconds >= 0, got {timeout!r}")
        if self.benchmarker not in BENCHMARKERS:
            raise ValueError(f"option 'benchmarker' must be one of {BENCHMARKERS}")
        if self.debug_dir is None and os.environ.get("CONVCOMPILER_DEBUG_DIR"):
            object.__setattr__(self, "debug_dir", os.environ["CONVCOMPILER_DEBUG_DIR"])
        if self.remote_cache is None and os.environ.get("CONVCOMPILER_REMOTE_CACHE"):
            object.__setattr__(self, "remote_cache", os.environ["CONVCOMPILER_REMOTE_CACHE"])
        if self.remote_cache is not None:
            from .selection.remote import check_url

            if not isinstance(self.remote_cache, str):
                raise ValueError(f"option 'remote_cache' must be a URL, got {self.remote_cache!r}")
            check_url(self.remote_cache)
        for name in ("kernel_dir", "debug_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"option {name!r} must be a path, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "Config":
        """Build a Config from `torch.compile(options=...)`; unknown names raise ValueError."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(
                f"unknown im2win backend option(s) {unknown}; "
                f"valid options are {list(cls.option_names())}"
            )
        return cls(**options)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    @property
    def cache_dir(self) -> Path:
        return cache_root()

    @property
    def kernel_path(self) -> Path:
        """The directory generated kernel sources are written to."""
        if self.kernel_dir is not None:
            return Path(self.kernel_dir)
        return cache_root() / "kernels"


def default_cpu_mode() -> str:
    """$CONVCOMPILER_CPU, else "aten"."""
    mode = os.environ.get("CONVCOMPILER_CPU", "").strip() or "aten"
    if mode not in CPU_MODES:
        raise ValueError(f"CONVCOMPILER_CPU must be one of {CPU_MODES}, got {mode!r}")
    return mode


def cache_root() -> Path:
    """The per-user cache root: $CONVCOMPILER_CACHE_DIR, else the XDG cache dir."""
    env = os.environ.get("CONVCOMPILER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "convcompiler"
