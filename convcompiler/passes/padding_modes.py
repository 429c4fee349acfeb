"""Pre-grad pass: remember convolutions whose input comes from a non-zero padding mode.

A circular F.pad that feeds a conv becomes the op im2win.pad_circular (runtime/ops.py):
ATen has no circular pad op, so after aot_autograd nothing else would show the pad's mode
and amounts to the conv matcher (passes/conv_spec.py padded_input reads it like ATen's
reflection and replication pads).

`nn.Conv2d(padding_mode="circular")` (also "reflect", "replicate") pads with `F.pad` and then
runs a conv with padding 0. After aot_autograd the pad is a chain of slices and copies that
no longer says what it was, so this pass reads the Dynamo graph, where the mode is still an
argument, and leaves a fact for `match_conv`:

    facts["conv_padding_mode"][<dynamo conv node name>] = "circular"
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from .context import PassContext

_PAD_TARGETS = {torch._C._nn.pad, F.pad}
_CONV_TARGETS = {torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d}


def _pad_mode(node: torch.fx.Node) -> str | None:
    if node.op != "call_function" or node.target not in _PAD_TARGETS:
        return None
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    return None if mode in (None, "constant") else str(mode)


def _as_circular_op(pad: torch.fx.Node) -> None:
    """F.pad(x, amounts, mode="circular") -> im2win.pad_circular(x, amounts), which stays one
    node through aot_autograd (runtime/ops.py), so the conv it feeds can read x with the
    circular index map. Amounts that are not plain ints leave it as it is."""
    amounts = pad.args[1] if len(pad.args) > 1 else pad.kwargs.get("pad")
    if not isinstance(amounts, (list, tuple)) or not all(type(a) is int for a in amounts):
        return
    pad.target = torch.ops.im2win.pad_circular.default
    pad.args, pad.kwargs = (pad.args[0], list(amounts)), {}


def find_conv_padding_modes(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    found = ctx.facts.setdefault("conv_padding_mode", {})
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _CONV_TARGETS:
            source = node.args[0] if node.args else node.kwargs.get("input")
            mode = _pad_mode(source) if isinstance(source, torch.fx.Node) else None
            if mode is not None:
                found[node.name] = mode
            if mode == "circular":
                _as_circular_op(source)
        elif node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            mode = getattr(module, "padding_mode", "zeros")
            if isinstance(module, torch.nn.modules.conv._ConvNd) and mode != "zeros":
                found[node.name] = mode
    return gm
