"""Graph passes: find regions in FX graphs. Passes never import codegen.

Two ordered lists, run by `run_passes`:

    PRE_GRAD_PASSES   on the Dynamo graph (torch-level ops), before autograd
    POST_GRAD_PASSES  on the aten graphs (forward, backward, inference), before the host
                      compiler lowers them

Each pass is `pass(gm, ctx) -> gm`, named by its function name.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import torch.fx

from ..counters import counters
from ..files import private_dir, write_private
from .context import PassContext, Region
from .conv_backward import split_conv_backward
from .conv_bn_tune import fold_conv_bn_tune
from .grad_mask import fuse_gradient_masks
from .linear_as_conv import linear_as_conv, restore_linears
from .match_attention import match_window_attention
from .match_attention_backward import match_attention_backward
from .match_block import match_mlp_blocks
from .match_conv import match_conv
from .padding_modes import find_conv_padding_modes
from .train_bn import find_train_batch_norms

log = logging.getLogger(__name__)

GraphPass = Callable[[torch.fx.GraphModule, PassContext], torch.fx.GraphModule]

PRE_GRAD_PASSES: tuple[GraphPass, ...] = (
    find_conv_padding_modes,
    find_train_batch_norms,
    fold_conv_bn_tune,
)
POST_GRAD_PASSES: tuple[GraphPass, ...] = (
    match_mlp_blocks,
    linear_as_conv,
    split_conv_backward,
    match_conv,
    fuse_gradient_masks,
    match_window_attention,
    match_attention_backward,
)


def dump_graph(gm: torch.fx.GraphModule, ctx: PassContext, step: int, name: str) -> None:
    """With a debug dump directory: write the graph as readable code, one file per step."""
    if ctx.dump_dir is None:
        return
    folder = private_dir(ctx.dump_dir / ctx.stage)
    text = gm.print_readable(print_output=False, include_stride=True)
    write_private(folder / f"{step:02d}_{name}.py", text)


def run_passes(
    passes: Sequence[GraphPass], gm: torch.fx.GraphModule, ctx: PassContext
) -> torch.fx.GraphModule:
    dump_graph(gm, ctx, 0, "input")
    for step, graph_pass in enumerate(passes, start=1):
        start = time.perf_counter()
        gm = graph_pass(gm, ctx)
        counters[f"pass.{graph_pass.__name__}"] += 1
        log.debug(
            "pass %s on the %s graph: %.2f ms",
            graph_pass.__name__,
            ctx.stage,
            1e3 * (time.perf_counter() - start),
        )
        dump_graph(gm, ctx, step, graph_pass.__name__)
    return gm


__all__ = [
    "POST_GRAD_PASSES",
    "PRE_GRAD_PASSES",
    "PassContext",
    "Region",
    "dump_graph",
    "restore_linears",
    "run_passes",
]
