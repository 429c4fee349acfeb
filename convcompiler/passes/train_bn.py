"""Pre-grad pass: remember convolutions whose output feeds a batch norm in training mode.

    batch_norm(conv(x, w), training=True)  =>  facts["conv_bn_train"] += {conv}

The BN keeps using batch statistics (it stays with the host compiler, which decomposes it),
and the conv runs its generated kernel; the report labels such regions mode "train". After
decomposition the BN no longer says what it was, so the fact is read here, from the Dynamo
graph, and `match_conv` finds it again through each aten node's `from_node` provenance.
"""

from __future__ import annotations

import torch.fx

from .context import PassContext
from .conv_bn_tune import CONVS, bn_args, is_batch_norm


def find_train_batch_norms(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    found = ctx.facts.setdefault("conv_bn_train", set())
    for node in gm.graph.nodes:
        if not is_batch_norm(node):
            continue
        bn = bn_args(node)
        conv = bn["input"] if bn else None
        if (
            bn is not None
            and bn["training"] is True
            and isinstance(conv, torch.fx.Node)
            and conv.op == "call_function"
            and conv.target in CONVS
        ):
            found.add(conv.name)
    return gm
