"""The debug dump: everything one compile saw and made, in one directory.

    <debug_dir>/compile-<id>-<pid>/
        pre_grad/00_input.py, 01_<pass>.py ...       the Dynamo graph, before and after each pass
        forward|backward|inference/00_input.py ...   the aten graphs, then NN_lowered.py
        regions.json                                 the report (rewritten after each stage)
        kernels/                                     a copy of every kernel file the compile used
        torchinductor/<graph>/output_code.py ...     Inductor's trace of the same compile:
                                                     its output code calls the im2win ops

Enabled by the `debug_dir` option or $CONVCOMPILER_DEBUG_DIR.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch.fx

from ..config import Config
from ..passes import PassContext, dump_graph
from ..runtime import private_dir
from .report import Report

log = logging.getLogger(__name__)


def dump_dir_for(config: Config, compile_id: int) -> Path | None:
    if config.debug_dir is None:
        return None
    path = private_dir(Path(config.debug_dir) / f"compile-{compile_id:03d}-{os.getpid()}")
    log.info("convcompiler: debug dump of compile %d in %s", compile_id, path)
    return path


def dump_lowered(gm: torch.fx.GraphModule, ctx: PassContext, step: int, report: Report) -> None:
    """After lowering one stage: the rewritten graph, the report, and the kernels used."""
    if ctx.dump_dir is None:
        return
    dump_graph(gm, ctx, step, "lowered")
    (ctx.dump_dir / "regions.json").write_text(report.to_json())
    kernels = private_dir(ctx.dump_dir / "kernels")
    for region in report.regions:
        if region.kernel_path is not None:
            shutil.copy2(region.kernel_path, kernels / Path(region.kernel_path).name)
