"""Grow a convolution's epilogue chain: the pointwise ops its kernel can apply before storing.

    conv -> [batch_norm (running stats) -> getitem 0] -> [act] -> [add residual] -> [act]
    conv -> act -> batch_norm (running stats) -> getitem 0 -> [add residual] -> [act]
    conv -> permute NHWC -> layer_norm over the channels -> permute NCHW   (LayerNorm2d)
    conv (a linear's) -> window reverse -> [roll] -> add residual          (Swin's proj;
        linear_as_conv.py found it: node.meta[OUT_WINDOWS])

With `layer_scale` (a linear's chain, passes/linear_as_conv.py: the dim of its channels), a
multiplication by a per-channel vector (ConvNeXt's and LayerScale's gamma: [K, 1, 1] on an
image, [K] on tokens) joins the chain before the residual add.

A node joins the chain only if it is the sole user of the chain so far (otherwise the
intermediate value is needed elsewhere and must be materialised), and only if no other
chain has claimed it. The residual is the add's other operand, of the same shape and dtype.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from ..spec import Epilogue
from .activations import as_activation
from .layer_norm import image_norm_after
from .meta import fake_value

aten = torch.ops.aten
BN_EVAL = aten._native_batch_norm_legit_no_training.default
BN_TRAIN = aten._native_batch_norm_legit_functional.default
# A LayerNorm epilogue needs every output channel in one tile: the conv templates' widest
# BLOCK_N. A wider conv keeps its own kernel and leaves the norm to Inductor.
LN_CHANNELS = 128
# node.meta key on a linear's conv (linear_as_conv.py): (the Windows its output rows are, the
# window reverse's node names, the residual add's name)
OUT_WINDOWS = "im2win_out_windows"


@dataclass(frozen=True)
class Chain:
    roles: tuple[tuple[str, str], ...]  # (role, node name): conv, bn, getitem, act, add, post_act
    epilogue: Epilogue
    last: torch.fx.Node


def _sole_user(node: torch.fx.Node, claimed: set[str]) -> torch.fx.Node | None:
    users = list(node.users)
    if len(users) != 1 or users[0].name in claimed or users[0].op != "call_function":
        return None
    return users[0]


def _same_tensor_meta(a: object, b: object) -> bool:
    va, vb = fake_value(a), fake_value(b)
    return va is not None and vb is not None and va.shape == vb.shape and va.dtype == vb.dtype


def _eval_bn(user: torch.fx.Node | None, cur: torch.fx.Node) -> tuple[dict, torch.fx.Node] | None:
    """(epilogue fields, its getitem 0) when `user` is an eval-mode batch norm of `cur` whose
    only use is its output; else None."""
    if user is None or user.target is not BN_EVAL or user.args[0] is not cur:
        return None
    weight, bias, _mean, _var, _momentum, eps = user.args[1:7]
    items = list(user.users)
    if (
        (weight is None) == (bias is None)
        and isinstance(eps, (int, float))
        and len(items) == 1
        and items[0].target is operator.getitem
        and items[0].args[1] == 0
    ):
        return dict(bn="plain" if weight is None else "affine", bn_eps=float(eps)), items[0]
    return None


def _channel_vector(user: torch.fx.Node | None, cur: torch.fx.Node, dim: int) -> bool:
    """Whether `user` is cur * v with v one value per channel of cur's dim `dim`, broadcast
    over every other dim, of cur's dtype."""
    if user is None or user.target is not aten.mul.Tensor or len(user.args) != 2:
        return False
    a, b = user.args
    other = b if a is cur else a if b is cur else None
    out, v = fake_value(cur), fake_value(other)
    if not isinstance(other, torch.fx.Node) or other is cur or out is None or v is None:
        return False
    shape = [1] * (out.dim() - v.dim()) + list(v.shape)
    dim %= out.dim()
    expected = [out.shape[i] if i == dim else 1 for i in range(out.dim())]
    return v.dim() <= out.dim() and v.dtype == out.dtype and shape == expected


def _norm_chain(conv: torch.fx.Node, claimed: set[str]) -> Chain | None:
    """conv -> LayerNorm2d (layer_norm.image_norm_after) as a chain: the norm's nodes in
    order (its weight's mul and bias's add as roles ln_scaled, ln_shifted), the permute back
    last."""
    found = image_norm_after(conv)
    out = fake_value(conv)
    if found is None or out is None or out.shape[1] > LN_CHANNELS:
        return None
    norm, nodes = found
    if any(n.name in claimed for n in nodes):
        return None
    named = {norm.scaled: "ln_scaled", norm.shifted: "ln_shifted"}
    roles = [("conv", conv.name)] + [(named.get(n, f"ln{i}"), n.name) for i, n in enumerate(nodes)]
    return Chain(tuple(roles), Epilogue(ln=norm.kind, ln_eps=norm.eps), nodes[-1])


def window_chain(conv: torch.fx.Node, claimed: set[str]) -> Chain | None:
    """The chain of a linear's conv whose output rows go back to their windows' pixels and
    are added to the residual there (linear_as_conv's OUT_WINDOWS: Swin's proj), when no
    other chain took those nodes; else None."""
    found = conv.meta.get(OUT_WINDOWS)
    if found is None:
        return None
    _, names, add = found
    if any(name in claimed for name in (*names, add)):
        return None
    nodes = {n.name: n for n in conv.graph.nodes}
    roles = (("conv", conv.name), *(("win_out", name) for name in names), ("add", add))
    return Chain(roles, Epilogue(residual=True), nodes[add])


def grow_chain(
    conv: torch.fx.Node,
    claimed: set[str],
    *,
    fuse_bn: bool = True,
    layer_scale: int | None = None,
    layer_norm: bool = False,
) -> Chain:
    """The conv's chain (see the module docstring); with `layer_norm`, a LayerNorm2d that
    alone reads the conv's output is its whole epilogue (spec.epilogue.ln)."""
    normed = _norm_chain(conv, claimed) if layer_norm else None
    if normed is not None:
        return normed
    roles = [("conv", conv.name)]
    cur, fields = conv, {}
    user = _sole_user(cur, claimed)
    bn = _eval_bn(user, cur) if fuse_bn else None
    if bn is not None:
        fields.update(bn[0])
        roles += [("bn", user.name), ("getitem", bn[1].name)]
        cur = bn[1]
        user = _sole_user(cur, claimed)
    act = as_activation(user) if user is not None and user.args[0] is cur else None
    if act is not None:
        fields["act"] = act
        roles.append(("act", user.name))
        cur = user
        user = _sole_user(cur, claimed)
        late = _eval_bn(user, cur) if fuse_bn and "bn" not in fields else None
        if late is not None:  # conv -> act -> BN (ConvMixer, RepViT)
            fields.update(late[0], bn_after_act=True)
            roles += [("bn", user.name), ("getitem", late[1].name)]
            cur = late[1]
            user = _sole_user(cur, claimed)
    if layer_scale is not None and _channel_vector(user, cur, layer_scale):
        fields["scale"] = True
        roles.append(("scale", user.name))
        cur = user
        user = _sole_user(cur, claimed)
    if (
        user is not None
        and user.target is aten.add.Tensor
        and len(user.args) == 2
        and user.kwargs.get("alpha", 1) == 1
        and all(isinstance(a, torch.fx.Node) for a in user.args)
        and user.args[0] is not user.args[1]
        and _same_tensor_meta(*user.args)
    ):
        fields["residual"] = True
        roles.append(("add", user.name))
        cur = user
        user = _sole_user(cur, claimed)
        post = as_activation(user) if user is not None and user.args[0] is cur else None
        if post is not None:
            fields["post_act"] = post
            roles.append(("post_act", user.name))
            cur = user
    return Chain(tuple(roles), Epilogue(**fields), cur)
