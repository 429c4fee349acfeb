"""The debug dump: everything one compile saw and made, in one directory.

    <debug_dir>/compile-<id>-<pid>/
        pre_grad/00_input.py, 01_<pass>.py ...       the Dynamo graph, before and after each pass
        forward|backward|inference/00_input.py ...   the aten graphs, then NN_lowered.py
        regions.json                                 the report (rewritten after each stage)
        kernels/                                     every kernel source the compile used
        torchinductor/<graph>/output_code.py ...     Inductor's trace of the same compile:
                                                     its output code calls the im2win ops

Enabled by the `debug_dir` option or $CONVCOMPILER_DEBUG_DIR. Like everything the project
writes, the dump is private: folders 0700, files 0600 (Inductor's trace is tightened to
the same modes when the compile ends).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch.fx

from ..config import Config
from ..files import private_dir, tighten, write_private
from ..passes import PassContext, dump_graph
from .report import Report

log = logging.getLogger(__name__)


def dump_dir_for(config: Config, compile_id: int) -> Path | None:
    if config.debug_dir is None:
        return None
    root = private_dir(Path(config.debug_dir))
    path = private_dir(root / f"compile-{compile_id:03d}-{os.getpid()}")
    log.info("convcompiler: debug dump of compile %d in %s", compile_id, path)
    return path


def dump_lowered(gm: torch.fx.GraphModule, ctx: PassContext, step: int, report: Report) -> None:
    """After lowering one stage: the rewritten graph, the report, and the kernels used."""
    if ctx.dump_dir is None:
        return
    dump_graph(gm, ctx, step, "lowered")
    write_private(ctx.dump_dir / "regions.json", report.to_json())
    kernels = private_dir(ctx.dump_dir / "kernels")
    texts = {source.filename: source.text for source, _ in report.generated}
    for region in report.regions:  # the rendered sources, whether or not a file was written
        name = Path(region.kernel_path).name if region.kernel_path is not None else None
        if name in texts:
            write_private(kernels / name, texts[name])


def finish_dump(path: Path) -> None:
    """When the compile is done: Inductor's trace in the dump gets the dump's modes."""
    tighten(path)
