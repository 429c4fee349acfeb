"""Post-grad canonicalisation: a linear layer whose output feeds a fusable epilogue becomes a
1x1 convolution, so that match_conv makes it a region and its kernel applies the epilogue.

Rule (a linear on channels-last tokens IS a 1x1 convolution over them):

    post_act([gamma *] act(linear(x, W, b)) + r)
        => tokens(post_act([gamma *] act(conv1x1(nhwc(x), W[:, :, None, None], b)) + nhwc(r)))

where, for tokens x of shape [*L, C] (L = [B, H, W], [B, N] or [M]), `nhwc` views them as a
channels_last [B, C, H, W] image (reshape to [B, H, W, C], then permute(0, 3, 1, 2); a 3-D
[B, N, C] is [B, 1, N, C], a 2-D [M, C] is [1, 1, M, C]) and `tokens` is the inverse view.
gamma is a layer scale, one value per output feature (ConvNeXt's, timm's LayerScale). When
the tokens are [B, H, W, K] and only a permute back to [B, K, H, W] reads them (ConvNeXt's
fc2), the chain starts after that permute, on the image: the conv's output is that image
already, and its residual is read as it is.
The layout views sit outside the pointwise chain, so match_conv sees conv -> act -> add ->
act directly, exactly as for a convolution. In the post-grad graph a linear is

    reshape(addmm(b, reshape(x, [M, C]), permute(W, [1, 0])), [*L, K])   (mm without bias;
    view, _unsafe_view and t in a graph that Inductor did not decompose)

Only such linears, and those that read a LayerNorm over the tokens' channels and nothing
else does (with option blocks, a transformer's norm before its qkv or fc1 linear): the conv
records the norm (node.meta[PRE_NORM]: the norm's input seen through the same channels_last
view, and the norm), and match_conv makes it the kernel's prologue, so the normalised tokens
are never written. One with neither stays the host's matmul (cuBLAS on a GPU), where nothing
would be won. The guards run in order; the first that fails leaves the linear
alone and is logged, with its reason, in `ctx.facts["linear_left"]`. Not on backward graphs
(the gradients' matmuls), nor on CPU tensors under cpu="aten" (the host runs everything).
A float32 linear keeps torch's matmul precision, not cuDNN's conv flag (`matmul_precision`).

A linear-derived convolution that no kernel replaced (the cost model chose ATen, cpu="plan",
a lowering guard) is turned back into the linear by `restore_linears` after lowering.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from ..spec import DTYPES, Windows
from .context import PassContext
from .conv_chain import OUT_WINDOWS, grow_chain
from .layer_norm import layer_norm_of
from .meta import fake_value, fp32_precision, layout_mismatch, run_on_fakes

log = logging.getLogger(__name__)
aten = torch.ops.aten

RULE = (
    "post_act(act(linear(x, W, b)) + r) => tokens(post_act(act(conv1x1(nhwc(x), W, b)) + nhwc(r)))"
)
FROM_LINEAR = "im2win_from_linear"  # node.meta key on a convolution this pass made
IN_BLOCK = "im2win_block"  # node.meta key on a matmul a block region runs (match_block.py)
PRE_NORM = "im2win_pre_norm"  # node.meta key: (the norm's input as an image, the norm)
WINDOWS = "im2win_windows"  # node.meta key: the Windows its input's rows are (or None)
RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
META_KEYS = ("stack_trace", "nn_module_stack", "from_node", "seq_nr")


def matmul_precision(dtype: torch.dtype) -> str:
    """How cuBLAS runs a float32 matmul right now: TF32 only if the user allowed it."""
    if dtype != torch.float32:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    return fp32_precision(matmul, lambda: matmul.allow_tf32)


def _lead_4d(lead: list) -> list:
    """The token dims [*L] as [B, H, W]."""
    if len(lead) == 3:
        return list(lead)
    if len(lead) == 2:
        return [lead[0], 1, lead[1]]
    return [1, 1, lead[0]]


class _Linear:
    """What the guards read off one addmm/mm node; `reason` is why it is left alone."""

    def __init__(self, mm: torch.fx.Node, ctx: PassContext) -> None:
        self.mm = mm
        self.reason = self._check(ctx)

    def _check(self, ctx: PassContext) -> str | None:
        mm = self.mm
        if IN_BLOCK in mm.meta:
            return f"part of block region {mm.meta[IN_BLOCK]}"
        if mm.target is aten.addmm.default:
            bias, x2d, wt = mm.args[:3]
            if mm.kwargs.get("beta", 1) != 1 or mm.kwargs.get("alpha", 1) != 1:
                return "addmm with beta or alpha other than 1"
        else:
            bias, (x2d, wt) = None, mm.args[:2]
        out, xv, wtv = fake_value(mm), fake_value(x2d), fake_value(wt)
        if out is None or xv is None or wtv is None:
            return "no fake-tensor metadata on the matmul"
        if xv.device.type == "cpu" and ctx.config.cpu == "aten":
            return "cpu='aten' on CPU tensors: the host runs every linear"
        if xv.device.type not in ("cpu", "cuda"):
            return f"device {xv.device.type!r} is not supported (cpu or cuda)"
        if str(xv.dtype).removeprefix("torch.") not in DTYPES:
            return f"dtype {xv.dtype} is not supported (kernels run {', '.join(DTYPES)})"
        transposed = wt.target is aten.t.default or (
            wt.target is aten.permute.default and list(wt.args[1]) == [1, 0]
        )
        if not transposed:
            return "the weight operand is not a transposed [K, C] weight (permute(W, [1, 0]))"
        self.weight = wt.args[0]
        wv = fake_value(self.weight)
        if wv is None or not wv.is_contiguous() or wv.dtype != xv.dtype:
            return "the weight is not a contiguous [K, C] tensor of the input's dtype"
        k, c = wv.shape
        if not (isinstance(k, int) and isinstance(c, int)):
            return "the weight shape is symbolic; kernels need static channel counts"
        bv = fake_value(bias)
        if bias is not None and (bv is None or tuple(bv.shape) != (k,) or bv.dtype != xv.dtype):
            return "the bias is not a [K] vector of the input's dtype"
        if not xv.is_contiguous():
            return "the tokens are not contiguous"
        if 0 in (k, c) or (isinstance(xv.shape[0], int) and xv.shape[0] == 0):
            return "zero-size linear: nothing to compute"
        self.bias, self.x2d, self.k, self.c = bias, x2d, k, c
        users = list(mm.users)
        if len(users) == 1 and users[0].target in RESHAPES:
            tokens = fake_value(users[0])
            if tokens is None or not 2 <= tokens.dim() <= 4 or tokens.shape[-1] != k:
                return "the matmul's output is reshaped into something other than [*L, K] tokens"
            self.out, self.lead = users[0], list(users[0].args[1][:-1])
        else:
            if not isinstance(xv.shape[0], int):
                return "2-D tokens with a symbolic count (not supported yet)"
            self.out, self.lead = mm, [int(xv.shape[0])]
        # ConvNeXt's fc2: its [N, H, W, K] tokens permuted back to an [N, K, H, W] image first
        self.channels_first = None
        users = list(self.out.users)
        if (
            len(self.lead) == 3 and len(users) == 1 and users[0].target is aten.permute.default
            and list(users[0].args[1]) == [0, 3, 1, 2]
        ):  # fmt: skip
            self.channels_first = users[0]
        start = self.channels_first or self.out
        dim = 1 if self.channels_first else -1
        self.chain = grow_chain(start, set(), fuse_bn=False, layer_scale=dim)
        if self.channels_first is not None and not self.chain.epilogue.name():
            self.channels_first = None  # nothing to fuse after the permute
            self.chain = grow_chain(self.out, set(), fuse_bn=False, layer_scale=-1)
        self.norm = _norm_before(x2d, xv.dtype) if ctx.config.blocks else None
        self.reverse = None  # Swin's proj: window reverse, [roll,] + x (_window_reverse)
        if ctx.config.blocks and not self.chain.epilogue.name() and len(self.lead) == 2:
            self.reverse = _window_reverse(self.out)
        if not self.chain.epilogue.name() and self.norm is None and self.reverse is None:
            return "no fusable epilogue (activation or residual add) follows: the host's mm runs it"
        last = fake_value(self.chain.last)
        if last is None or last.dtype != out.dtype:
            return "the epilogue changes the dtype"
        return None


def _roll_shift(index: object, size: object) -> int | None:
    """s when `index` is fmod(iota(size) + s, size), a decomposed torch.roll by -s; else None."""
    if not isinstance(index, torch.fx.Node) or index.target is not aten.fmod.Scalar:
        return None
    add, modulus = index.args
    if not isinstance(add, torch.fx.Node) or add.target is not aten.add.Tensor:
        return None
    iota, shift = add.args
    if not isinstance(iota, torch.fx.Node) or iota.target is not torch.ops.prims.iota.default:
        return None
    if iota.args[0] != size or modulus != size or not isinstance(shift, int):
        return None
    if iota.kwargs.get("start", 0) != 0 or iota.kwargs.get("step", 1) != 1:
        return None
    return shift % size


def _identity(node: torch.fx.Node) -> bool:
    """alias, or a constant_pad_nd that pads nothing (Swin's pad to whole windows when the
    image already is), in a graph Inductor did not decompose."""
    if node.target is aten.alias.default:
        return True
    return node.target is aten.constant_pad_nd.default and not any(node.args[1])


def _before_identities(node: object) -> object:
    while isinstance(node, torch.fx.Node) and _identity(node) and len(node.users) == 1:
        node = node.args[0]
    return node


def _roll_of(node: object) -> tuple[int, int] | None:
    """(the shift along H, along W), each in [0, size), of torch.roll(x, shifts, dims) over
    dims 1 and 2 of a [B, H, W, C] x (graphs Inductor did not decompose); else None."""
    if not isinstance(node, torch.fx.Node) or node.target is not aten.roll.default:
        return None
    shifts = list(node.args[1])
    dims = list(node.args[2]) if len(node.args) > 2 else list(node.kwargs.get("dims", []))
    xv = fake_value(node)
    if not dims or len(shifts) != len(dims) or xv is None or xv.dim() != 4:
        return None
    out = [0, 0]
    for shift, dim in zip(shifts, dims):
        dim %= 4
        if dim not in (1, 2) or not isinstance(xv.shape[dim], int) or not isinstance(shift, int):
            return None
        out[dim - 1] = shift % xv.shape[dim]
    return out[0], out[1]


def _window_partition(y: object) -> tuple[torch.fx.Node, Windows] | None:
    """(the [B, H, W, C] image, its windows) when y is Swin's window partition of it,
    reshape(clone(permute(reshape(r, [B, nWh, WH, nWw, WW, C]), [0, 1, 3, 2, 4, 5])),
    [B*nWh*nWw, WH*WW, C]), r the image or its roll by -shift along H and W (decomposed:
    index(r, [None, fmod(iota(H) + shift, H)]), then along W), every step read by the next
    alone; else None."""
    if not isinstance(y, torch.fx.Node) or y.target not in RESHAPES:
        return None
    clone = y.args[0]
    if not isinstance(clone, torch.fx.Node) or clone.target is not aten.clone.default:
        return None
    perm = clone.args[0]
    if perm.target is not aten.permute.default or list(perm.args[1]) != [0, 1, 3, 2, 4, 5]:
        return None
    view = perm.args[0]
    if view.target not in RESHAPES or any(len(n.users) != 1 for n in (clone, perm, view)):
        return None
    image, vv, yv = view.args[0], fake_value(view), fake_value(y)
    if vv is None or yv is None or vv.dim() != 6 or yv.dim() != 3:
        return None
    b, nwh, wh, nww, ww, c = vv.shape
    if not all(isinstance(v, int) for v in (wh, ww, c)) or yv.shape[1:] != (wh * ww, c):
        return None
    image = _before_identities(image)
    shift = [0, 0]
    rolled = _roll_of(image)
    if rolled is not None and len(image.users) == 1:  # torch.roll, not decomposed
        sizes_hw = fake_value(image).shape[1:3]
        shift = [(-r) % n for r, n in zip(rolled, sizes_hw)]
        image = _before_identities(image.args[0])
    for dim in (2, 1):  # the roll along W is the last index op, then the one along H
        if not isinstance(image, torch.fx.Node) or image.target is not aten.index.Tensor:
            break
        indices, iv = image.args[1], fake_value(image)
        if len(indices) != dim + 1 or any(i is not None for i in indices[:dim]) or iv is None:
            break
        found = _roll_shift(indices[dim], iv.shape[dim])
        if found is None or len(image.users) != 1:
            break
        shift[dim - 1], image = found, image.args[0]
    image = _before_identities(image)
    iv = fake_value(image)
    if iv is None or iv.dim() != 4 or tuple(iv.shape) != (b, nwh * wh, nww * ww, c):
        return None
    return image, Windows((wh, ww), tuple(shift))


def _sole(node: torch.fx.Node, *targets) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].target in targets else None


def _window_reverse(tokens: torch.fx.Node) -> tuple | None:
    """(the windows, the names of the nodes after the tokens up to the add, the add's name)
    when Swin's window reverse alone reads the [B*nWh*nWw, WH*WW, K] tokens:
    reshape(clone(permute(reshape(t, [B, nWh, nWw, WH, WW, K]), [0, 1, 3, 2, 4, 5])),
    [B, H, W, K]), [rolled by +shift along H, then W (decomposed as _roll_shift reads)], then
    added to a [B, H, W, K] tensor of its dtype (the block's residual); else None."""
    view = _sole(tokens, *RESHAPES)
    perm = _sole(view, aten.permute.default) if view is not None else None
    clone = _sole(perm, aten.clone.default) if perm is not None else None
    image = _sole(clone, *RESHAPES) if clone is not None else None
    if image is None or list(perm.args[1]) != [0, 1, 3, 2, 4, 5]:
        return None
    vv, iv = fake_value(view), fake_value(image)
    if vv is None or iv is None or vv.dim() != 6 or iv.dim() != 4:
        return None
    b, nwh, nww, wh, ww, k = vv.shape
    if not all(isinstance(v, int) for v in (wh, ww)) or tuple(iv.shape) != (b, nwh * wh,
                                                                           nww * ww, k):
        return None
    nodes, cur, shift = [view, perm, clone, image], image, [0, 0]
    rolled = _sole(cur, aten.roll.default)
    if rolled is not None and (by := _roll_of(rolled)) is not None:  # torch.roll, not decomposed
        shift, cur = list(by), rolled
        nodes.append(rolled)
    for dim in (1, 2):  # the roll back along H is the first index op, then the one along W
        index = _sole(cur, aten.index.Tensor)
        if index is None or len(index.args[1]) != dim + 1:
            continue
        if any(i is not None for i in index.args[1][:dim]):
            continue
        found = _roll_shift(index.args[1][dim], iv.shape[dim])
        if found is None:
            continue
        shift[dim - 1] = (-found) % iv.shape[dim]
        nodes.append(index)
        cur = index
    while _sole(cur, aten.alias.default) is not None:  # the unpad, when nothing was padded
        cur = _sole(cur, aten.alias.default)
        nodes.append(cur)
    add = _sole(cur, aten.add.Tensor)
    if add is None or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    other = add.args[1] if add.args[0] is cur else add.args[0]
    ov = fake_value(other) if isinstance(other, torch.fx.Node) else None
    if ov is None or ov.shape != iv.shape or ov.dtype != iv.dtype or other is cur:
        return None
    return Windows((wh, ww), tuple(shift)), tuple(n.name for n in nodes), add.name


def _norm_before(x2d: torch.fx.Node, dtype: torch.dtype) -> tuple | None:
    """(the LayerNorm, the permutation of its tokens' leading dims, the windows) when only
    this linear reads the norm's output y, as reshape(y, [M, C]) or y, or through a
    contiguous copy of a permute of y that keeps the channels last
    (torch.nn.MultiheadAttention's batch-first transpose: ViT's qkv), or through Swin's
    [roll and] window partition of y (_window_partition), the norm of the linear's dtype,
    with both a weight and a bias or neither; else None."""
    y = x2d.args[0] if x2d.target in RESHAPES else x2d
    perm = windows = None
    partition = _window_partition(y)
    if partition is not None:
        y, windows = partition
    elif (
        isinstance(y, torch.fx.Node) and y.target is aten.clone.default and len(y.users) == 1
        and y.args[0].target is aten.permute.default and len(y.args[0].users) == 1
        and list(y.args[0].args[1])[-1] == len(y.args[0].args[1]) - 1
    ):  # fmt: skip
        perm, y = list(y.args[0].args[1]), y.args[0].args[0]
    if not isinstance(y, torch.fx.Node) or len(y.users) != 1 or len(x2d.users) != 1:
        return None  # the normalised tokens are needed elsewhere (or saved for a backward)
    norm = layer_norm_of(y)
    xv = fake_value(norm.x) if norm is not None else None
    if xv is None or xv.dtype != dtype or norm.kind is None:
        return None
    return norm, perm, windows


class _Builder:
    """Adds nodes before `anchor`, each with its fake value; remembers them for a rollback."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node) -> None:
        self.graph, self.anchor, self.added = graph, anchor, []

    def call(self, target, args, kwargs=None, like=None) -> torch.fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, tuple(args), kwargs or {})
        self.added.append(node)
        node.meta["val"] = run_on_fakes(node)
        if like is not None:
            node.meta.update({key: like.meta[key] for key in META_KEYS if key in like.meta})
        return node

    def nhwc(self, tokens: torch.fx.Node, lead4: list, channels: int) -> torch.fx.Node:
        """[*L, C] tokens as a channels_last [B, C, H, W] image."""
        image = self.call(aten.reshape.default, (tokens, [*lead4, channels]))
        return self.call(aten.permute.default, (image, [0, 3, 1, 2]))

    def rollback(self) -> None:
        for node in reversed(self.added):
            self.graph.erase_node(node)


def _rewrite(graph: torch.fx.Graph, lin: _Linear) -> str | None:
    """Build the conv chain before the chain's last node; None, or why it was not kept."""
    nodes = {node.name: node for node in graph.nodes}
    last, lead4 = lin.chain.last, _lead_4d(lin.lead)
    b = _Builder(graph, last)
    # the norm's input, seen as the conv's input is (before the conv: its op replaces it)
    normed = None
    if lin.norm is not None:
        norm, perm, windows = lin.norm
        tokens = b.call(aten.permute.default, (norm.x, perm)) if perm else norm.x
        if windows is not None:  # the [B, H, W, C] image the windows come from, as NCHW
            normed = b.call(aten.permute.default, (norm.x, [0, 3, 1, 2]))
        else:
            normed = b.nhwc(tokens, lead4, lin.c)
    x = b.nhwc(lin.x2d, lead4, lin.c)
    w = b.call(aten.reshape.default, (lin.weight, [lin.k, lin.c, 1, 1]))
    first = lin.channels_first is not None  # the chain reads the image, not the tokens
    conv_args = (x, w, lin.bias, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    cur = b.call(aten.convolution.default, conv_args, like=lin.mm)
    cur.meta[FROM_LINEAR] = True
    if normed is not None:
        cur.meta[PRE_NORM] = (normed, lin.norm[0])
        cur.meta[WINDOWS] = lin.norm[2]
    cur.meta[OUT_WINDOWS] = lin.reverse
    prev = lin.channels_first if first else lin.out
    for role, name in lin.chain.roles[1:]:
        old = nodes[name]
        if role == "add":
            left, right = old.args
            r = right if left is prev else left
            r = r if first else b.nhwc(r, lead4, lin.k)
            args = (cur, r) if left is prev else (r, cur)
            new = b.call(old.target, args, old.kwargs, like=old)
        elif role == "scale":  # the vector as [K, 1, 1] on the image
            left, right = old.args
            v = b.call(aten.reshape.default, (right if left is prev else left, [lin.k, 1, 1]))
            new = b.call(old.target, (cur, v), old.kwargs, like=old)
        else:
            new = b.call(old.target, (cur, *old.args[1:]), old.kwargs, like=old)
        prev, cur = old, new
    out = cur
    if not first:
        out = b.call(aten.permute.default, (cur, [0, 2, 3, 1]))
    if len(lin.lead) != 3 and not first:
        out = b.call(aten.reshape.default, (out, [*lin.lead, lin.k]))
    reason = layout_mismatch(fake_value(out), fake_value(last))
    if reason is not None:
        b.rollback()
        return f"the rewritten chain would change the output layout: {reason}"
    last.replace_all_uses_with(out)
    transposed = lin.mm.args[-1]
    for _, name in reversed(lin.chain.roles):
        graph.erase_node(nodes[name])
    if first:  # the tokens the erased permute read
        graph.erase_node(lin.out)
    if lin.out is not lin.mm:  # the reshape of the matmul was the chain's first node
        graph.erase_node(lin.mm)
    if not transposed.users:
        graph.erase_node(transposed)
    return None


def linear_as_conv(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if ctx.stage == "backward":
        return gm
    left = ctx.facts.setdefault("linear_left", {})
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.addmm.default, aten.mm.default):
            continue
        lin = _Linear(node, ctx)
        reason = lin.reason if lin.reason is not None else _rewrite(gm.graph, lin)
        if reason is not None:
            left[(ctx.stage, node.name)] = reason
            log.debug("linear %s (%s graph) stays a matmul: %s", node.name, ctx.stage, reason)
    gm.graph.lint()
    gm.recompile()
    return gm


def restore_linears(gm: torch.fx.GraphModule) -> int:
    """After lowering: every convolution this pass made that no kernel replaced becomes the
    linear again (addmm, or mm, on the tokens), seen through the same channels_last view, so
    the host runs its own matmul. Returns how many."""
    graph, restored = gm.graph, 0
    for conv in list(graph.nodes):
        if conv.target is not aten.convolution.default or not conv.meta.get(FROM_LINEAR):
            continue
        x, w, bias = conv.args[:3]
        image = x.args[0] if x.target is aten.permute.default else None
        if image is None or image.target is not aten.reshape.default or w.target not in RESHAPES:
            log.warning("%s: not the convolution linear_as_conv built; kept", conv.name)
            continue
        tokens, lead4 = image.args[0], list(image.args[1][:-1])
        b = _Builder(graph, conv)
        wt = b.call(aten.permute.default, (w.args[0], [1, 0]))
        if bias is None:
            mm = b.call(aten.mm.default, (tokens, wt), like=conv)
        else:
            mm = b.call(aten.addmm.default, (bias, tokens, wt), like=conv)
        k = fake_value(w).shape[0]
        out = b.call(aten.reshape.default, (mm, [*lead4, k]))
        out = b.call(aten.permute.default, (out, [0, 3, 1, 2]))
        reason = layout_mismatch(fake_value(out), fake_value(conv))
        if reason is not None:  # the convolution stays: correct, only not a matmul
            log.warning("%s: the restored linear differs (%s); kept", conv.name, reason)
            b.rollback()
            continue
        conv.replace_all_uses_with(out)
        graph.erase_node(conv)
        restored += 1
    if restored:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return restored
