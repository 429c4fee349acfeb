"""Post-grad: whole blocks of layers as one region, their intermediates never in memory.

Rule (the transformer MLP on channels-last tokens):

    [r +] [gamma *] linear(act(linear([layer_norm](x), W1, b1)) [* linear(n, W3, b3)], W2, b2)
        => mlp_block(x, W1, b1, W2, b2, gamma, r, norm weight, norm bias, W3, b3)

(the product with a second linear of the same tokens: a gated MLP, SwiGLU, LLaMA's MLP)

In the post-grad graph the two linears are reshape(addmm(b, reshape(x, [M, C]),
permute(W, [1, 0])), [*L, K]) (mm without a bias; no reshapes for 2-D tokens), and the
activation sits between them on the [*L, H] hidden; gamma is a [CO] vector (a layer scale),
r a tensor of the output's shape; a LayerNorm over C right before the first linear
(passes/layer_norm.py) becomes the kernel's prologue. Every node before the last has the
chain as its only user.

Whether the block runs as one kernel or layer by layer is the cost model's call, made here
(`ctx.plan_block`, supplied by the backend: this pass never imports selection) so that a
block left per layer still reaches `linear_as_conv` as two linears. A block that runs as one
kernel marks its two matmuls (`IN_BLOCK`), which linear_as_conv then leaves alone. A block
that does not (the cost model, or a guard: dtypes, an empty batch, an intermediate the
graph returns) is recorded with the reason, as a region whose fallback is "per layer".
Option blocks=False turns the pass off.

In training, `block_interiors` finds the same blocks in the joint graph, and
recompute.tag_block_intermediates has the backward recompute their inside, so the forward
graph returns none of it and the block region can take it.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from ..counters import counters
from ..spec import DTYPES
from ..spec_block import MlpSpec
from .activations import as_activation
from .context import PassContext, Region
from .layer_norm import LayerNormMatch, layer_norm_of
from .linear_as_conv import IN_BLOCK, RESHAPES, matmul_precision
from .meta import as_size, fake_value, size_hints, sizes

log = logging.getLogger(__name__)
aten = torch.ops.aten

RULE = (
    "[r +] [gamma *] linear(act(linear([layer_norm](x), W1, b1)) [* linear(x, W3, b3)], W2, b2) "
    "=> mlp_block(x, W1, b1, W2, b2, gamma, r, norm weight, norm bias, W3, b3)"
)
MATMULS = (aten.addmm.default, aten.mm.default)


def _sole_user(node: torch.fx.Node, forward: set | None = None) -> torch.fx.Node | None:
    """The node's one user besides the graph's output (a forward graph returns what its
    backward saves; the guards refuse a block whose intermediates are outputs). In a joint
    graph (`forward`: its forward's nodes) only the forward's users count: the backward
    reads the forward's values too."""
    users = [u for u in node.users if u.op != "output" and (forward is None or u in forward)]
    return users[0] if len(users) == 1 else None


def linear_operands(mm: torch.fx.Node | None) -> tuple | None:
    """(tokens, weight, bias) of addmm(b, x, permute(W, [1, 0])) or mm(x, permute(W)), or None."""
    if mm is None or mm.op != "call_function" or mm.target not in MATMULS:
        return None
    if mm.target is aten.addmm.default:
        if mm.kwargs.get("beta", 1) != 1 or mm.kwargs.get("alpha", 1) != 1:
            return None
        bias, x2d, wt = mm.args[:3]
    else:
        bias, (x2d, wt) = None, mm.args[:2]
    transposed = wt.target is aten.t.default or (
        wt.target is aten.permute.default and list(wt.args[1]) == [1, 0]
    )
    return (x2d, wt.args[0], bias) if transposed else None


def _after_reshape(node: torch.fx.Node, forward: set | None = None) -> torch.fx.Node:
    """The node's sole user when that is a reshape (the [*L, K] tokens), else the node."""
    user = _sole_user(node, forward)
    return user if user is not None and user.target in RESHAPES else node


def _token_views(x2d: torch.fx.Node, out2: torch.fx.Node) -> bool:
    """Whether x2d views [*L, C] tokens as [M, C] and out2 views the result back as [*L, CO]
    (a flatten of [N, C, 1, 1], or a reshape into other leading dims, is not that)."""
    if x2d.target not in RESHAPES or out2.target not in RESHAPES:
        return False
    src, flat, out = fake_value(x2d.args[0]), fake_value(x2d), fake_value(out2)
    if src is None or flat is None or out is None or src.dim() < 2 or out.dim() != src.dim():
        return False
    return src.shape[-1] == flat.shape[-1] and sizes(src)[:-1] == sizes(out)[:-1]


class MlpChain:
    """The nodes of one MLP, from its first matmul; `nodes` is empty when it is not one."""

    def __init__(self, fc1: torch.fx.Node, forward: set | None = None) -> None:
        """`forward`: in a joint graph, its forward's nodes (see _sole_user)."""
        self.nodes: list[tuple[str, torch.fx.Node]] = []
        self.forward = forward
        first = linear_operands(fc1)
        if first is None:
            return
        out1 = _after_reshape(fc1, self.forward)
        act = _sole_user(out1, self.forward)
        if act is None or as_activation(act) is None or act.args[0] is not out1:
            return
        hidden = _sole_user(act, self.forward)
        self.w3 = self.b3 = self.x3 = None
        gate = self._gate(act, hidden, first[0])
        if gate:
            hidden = _sole_user(gate[-1][1], self.forward)
        if hidden is not None and hidden.target in RESHAPES:
            fc2 = _sole_user(hidden, self.forward)
        else:
            fc2, hidden = hidden, act
        second = linear_operands(fc2)
        if second is None or second[0] is not hidden:
            return
        self.x2d, self.w1, self.b1 = first
        _, self.w2, self.b2 = second
        self.act = as_activation(act)
        self.nodes = [("fc1", fc1), ("act", act), *gate, ("fc2", fc2)]
        out2 = _after_reshape(fc2, self.forward)
        viewed = _token_views(self.x2d, out2)
        if viewed:  # the kernel reads [*L, C] and writes [*L, CO]
            self.nodes.insert(0, ("x_view", self.x2d))
            self.nodes.append(("out", out2))
        else:  # 2-D tokens in and out (another view before or after stays outside)
            out2 = fc2
        self.norm = self._norm(self.x2d.args[0] if viewed else self.x2d)
        self.scale = self.residual = None
        self.channels_first = False
        perm = _sole_user(out2, self.forward)
        ov = fake_value(out2)
        if perm is not None and perm.target is aten.permute.default and ov is not None:
            nd = ov.dim()
            if nd >= 3 and list(perm.args[1]) == [0, nd - 1, *range(1, nd - 1)]:
                self.channels_first = True  # ConvNeXt: [N, H, W, C] back to [N, C, H, W]
                self.nodes.append(("out_perm", perm))
                out2 = perm
        self._grow(out2)
        self.dw = None  # ConvNeXt's depthwise conv before the norm (absorb_depthwise)

    def absorb_depthwise(self) -> bool:
        """Take the depthwise conv whose output, seen channels last, only the LayerNorm reads
        (ConvNeXt: conv -> permute -> [contiguous copy] -> norm), when the block's residual,
        if any, is the conv's input: the block then starts at the image. False, unchanged,
        when there is none."""
        if self.norm is None or self.forward is not None:
            return False
        roles = dict(self.nodes)
        src = roles["x_copy"].args[0] if "x_copy" in roles else self.norm.x
        if src.target is not aten.permute.default or list(src.args[1]) != [0, 2, 3, 1]:
            return False
        conv = src.args[0]
        if not isinstance(conv, torch.fx.Node) or conv.target is not aten.convolution.default:
            return False
        # the norm reads it (in float32 through a conversion, for 16-bit tokens)
        readers = set(self.norm.nodes) | {n for _, n in self.nodes} | {self.norm.stats.args[0]}
        if _sole_user(conv) is not src or not set(src.users) <= readers:
            return False
        x, w, bias, stride, padding, dilation, transposed, _, groups = conv.args
        xv, wv, out = fake_value(x), fake_value(w), fake_value(conv)
        if xv is None or wv is None or out is None or xv.dim() != 4 or transposed:
            return False
        c = wv.shape[0]
        if (
            groups != c or tuple(wv.shape[:2]) != (c, 1) or list(stride) != [1, 1]
            or list(dilation) != [1, 1] or tuple(out.shape) != tuple(xv.shape)
            or not all(isinstance(v, int) for v in (*wv.shape, *xv.shape[1:]))
        ):  # fmt: skip
            return False
        if self.residual is not None and self.residual is not x:
            return False
        self.dw = (conv, [int(p) for p in padding], bias is not None)
        self.nodes[:0] = [("dw_conv", conv), ("dw_perm", src)]
        return True

    def drop_depthwise(self) -> None:
        """Undo absorb_depthwise: the block starts at the conv's output again."""
        self.nodes = [(r, n) for r, n in self.nodes if r not in ("dw_conv", "dw_perm")]
        self.dw = None

    def _gate(self, act: torch.fx.Node, mul: torch.fx.Node | None, x2d: torch.fx.Node) -> list:
        """A gated MLP's roles after the activation, [("fc3", mm), ("up", its reshape)?,
        ("mul", mul)], when `mul` multiplies the activation by a linear of the same tokens
        that only it reads; else []."""
        if mul is None or mul.target is not aten.mul.Tensor or len(mul.args) != 2:
            return []
        up = mul.args[1] if mul.args[0] is act else mul.args[0]
        if not isinstance(up, torch.fx.Node) or up is act:
            return []
        if _sole_user(up, self.forward) is not mul:
            return []
        mm = up.args[0] if up.target in RESHAPES else up
        third = linear_operands(mm) if isinstance(mm, torch.fx.Node) else None
        if third is None or (mm is not up and _sole_user(mm, self.forward) is not up):
            return []
        x3 = third[0]
        same = x3 is x2d or (
            x3.target in RESHAPES and x2d.target in RESHAPES and x3.args[0] is x2d.args[0]
            and fake_value(x3) is not None and fake_value(x2d) is not None
            and fake_value(x3).shape == fake_value(x2d).shape
        )  # fmt: skip
        if not same or fake_value(up) is None or fake_value(up).shape != fake_value(act).shape:
            return []
        _, self.w3, self.b3 = third
        self.x3 = x3
        return [("fc3", mm)] + ([("up", up)] if up is not mm else []) + [("mul", mul)]

    def _norm(self, y: object) -> LayerNormMatch | None:
        """The LayerNorm whose output the first linear alone reads, taken as the prologue."""
        if not isinstance(y, torch.fx.Node) or y.op != "call_function":
            return None
        norm = layer_norm_of(y, self.forward)
        readers = {u for u in y.users if u.op != "output"}
        readers = {u for u in readers if self.forward is None or u in self.forward}
        first = self.nodes[0][1]  # the first linear's view (and a gated MLP's up projection's)
        if norm is None or first not in readers or not readers <= {first, self.x3}:
            return None
        # autocast runs the norm in float32 and converts its output for the linears: the
        # block then starts at that output (the kernel reads x and the norm's vectors in the
        # linears' dtype), and so does a norm with a weight but no bias, or a bias alone
        values = [fake_value(n) for n in (y, norm.x, norm.weight, norm.bias) if n is not None]
        if any(v is None for v in values) or len({v.dtype for v in values}) != 1:
            return None
        if norm.kind is None:
            return None
        named = [("ln_stats", norm.stats), ("ln_normed", norm.normed)]
        copy = norm.x
        inside = set(norm.nodes) | {norm.stats.args[0]}
        users = {u for u in copy.users if self.forward is None or u in self.forward}
        if copy.target is aten.clone.default and users <= inside:
            named.insert(0, ("x_copy", copy))  # ConvNeXt's contiguous copy of a permute
        named += [("ln_scaled", norm.scaled)] if norm.scaled is not None else []
        named += [("ln_shifted", norm.shifted)] if norm.shifted is not None else []
        if y not in (n for _, n in named):
            named.append(("ln_out", y))
        self.nodes[:0] = named
        return norm

    def _grow(self, cur: torch.fx.Node) -> None:
        """The layer scale and the residual add, when each is the previous node's sole user."""
        out = fake_value(cur)
        for role, target in (("scale", aten.mul.Tensor), ("add", aten.add.Tensor)):
            user = _sole_user(cur, self.forward)
            if user is None or user.target is not target or user.kwargs.get("alpha", 1) != 1:
                continue
            a, b = user.args
            other = b if a is cur else a
            ov = fake_value(other)
            if ov is None or out is None or not isinstance(other, torch.fx.Node):
                return
            if ov.dtype != out.dtype or ov.dim() > out.dim():
                return
            if role == "scale":  # one value per output feature, on the features' dim
                shape = [1] * (out.dim() - ov.dim()) + list(ov.shape)
                channel = 1 if self.channels_first else out.dim() - 1
                if shape != [out.shape[channel] if i == channel else 1 for i in range(out.dim())]:
                    return
            elif tuple(ov.shape) != tuple(out.shape):
                return
            setattr(self, "residual" if role == "add" else "scale", other)
            self.nodes.append((role, user))
            cur = user

    @property
    def last(self) -> torch.fx.Node:
        return self.nodes[-1][1]

    def summary(self) -> str:
        """The layers, for a block whose spec was not built (a guard refused it)."""
        w1, w2 = fake_value(self.w1), fake_value(self.w2)
        if w1 is None or w2 is None or w1.dim() != 2 or w2.dim() != 2:
            return f"mlp at {self.nodes[0][1].name}"
        terms = "+".join(role for role, _ in self.nodes if role in ("scale", "add"))
        return f"mlp {w1.shape[1]} -> {w1.shape[0]} {self.act} -> {w2.shape[0]}" + (
            f" +{terms}" if terms else ""
        )


def spec_or_reason(chain: MlpChain) -> MlpSpec | str:
    """The block's spec, or why it stays per layer (the guards run in order)."""
    if any(user.op == "output" for _, node in chain.nodes[:-1] for user in node.users):
        return (
            "an intermediate of the block is also an output of the graph (in training: saved "
            "for the backward, which recompute.tag_block_intermediates did not recompute)"
        )
    x2d, w1, w2, out = (fake_value(n) for n in (chain.x2d, chain.w1, chain.w2, chain.last))
    if x2d is None or w1 is None or w2 is None or out is None:
        return "no fake-tensor metadata on the block"
    if x2d.device.type not in ("cpu", "cuda"):
        return f"device {x2d.device.type!r} is not supported (cpu or cuda)"
    dtype = str(x2d.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        return f"dtype {x2d.dtype} is not supported (kernels run {', '.join(DTYPES)})"
    vectors = [fake_value(n) for n in (chain.b1, chain.b2, chain.scale) if n is not None]
    if any(t is None or t.dtype != x2d.dtype for t in [w1, w2, out, *vectors]):
        return "the block mixes dtypes"
    if chain.w3 is not None:  # a gated MLP: the up projection as the first linear
        w3, b3 = fake_value(chain.w3), fake_value(chain.b3) if chain.b3 is not None else None
        if w3 is None or w3.dtype != x2d.dtype or tuple(w3.shape) != tuple(w1.shape):
            return "the up projection's weight does not match the first linear's"
        if not w3.is_contiguous() or (chain.b1 is None) != (chain.b3 is None):
            return "the up projection's weight is not contiguous, or one of two biases is missing"
        if b3 is not None and b3.dtype != x2d.dtype:
            return "the block mixes dtypes"
    if w1.dim() != 2 or w2.dim() != 2 or not (w1.is_contiguous() and w2.is_contiguous()):
        return "a weight is not a contiguous [K, C] matrix"
    (h, c), (co, h2) = w1.shape, w2.shape
    if not all(isinstance(v, int) for v in (h, c, co, h2)) or h != h2:
        return "the weights' shapes are symbolic or do not chain"
    layout = out
    if chain.channels_first:  # [N, C, *spatial] seen through the permute back
        layout = out.permute(0, *range(2, out.dim()), 1)
    if not x2d.is_contiguous() or not layout.is_contiguous():
        return "the tokens or the block's output are not contiguous"
    tokens = fake_value(chain.x2d.args[0]) if "x_view" in dict(chain.nodes) else x2d
    norm = chain.norm
    if norm is not None:
        copy = dict(chain.nodes).get("x_copy")
        tokens = fake_value(norm.x if copy is None else copy.args[0])
    if tokens is None or tokens.shape[-1] != c:
        return "the first linear's tokens are not a [*L, C] tensor"
    if tuple(layout.shape) != (*tokens.shape[:-1], co):
        return "the block's output is not the tokens' leading dims with CO features"
    if any(size == 0 for size in out.shape):
        return "zero-size block: nothing to compute"
    dw = {}
    if chain.dw is not None:
        conv, padding, has_bias = chain.dw
        image, weight = fake_value(conv.args[0]), fake_value(conv.args[1])
        if image.dtype != x2d.dtype or weight.dtype != x2d.dtype:
            return "the depthwise conv mixes dtypes"
        if has_bias and fake_value(conv.args[2]).dtype != x2d.dtype:
            return "the depthwise conv mixes dtypes"
        dw = dict(
            dw_kernel=tuple(int(k) for k in weight.shape[2:]),
            dw_padding=tuple(padding),
            dw_bias=has_bias,
            image=tuple(int(s) for s in image.shape[2:]),
        )
    return MlpSpec(
        tokens=as_size(x2d.shape[0]),
        in_features=c,
        hidden=h,
        out_features=co,
        act=chain.act,
        has_bias1=chain.b1 is not None,
        has_bias2=chain.b2 is not None,
        scale=chain.scale is not None,
        residual=chain.residual is not None,
        dtype=dtype,
        device=x2d.device.type,
        precision=matmul_precision(x2d.dtype),
        hints=size_hints(x2d),
        norm=None if norm is None else norm.kind,
        norm_eps=1e-5 if norm is None else norm.eps,
        channels_first=chain.channels_first,
        gated=chain.w3 is not None,
        **dw,
    )


def match_mlp_blocks(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if ctx.stage == "backward" or not ctx.config.blocks:
        return gm
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in MATMULS or IN_BLOCK in node.meta:
            continue
        chain = MlpChain(node)
        if not chain.nodes:
            continue
        x = fake_value(chain.x2d)
        if x is not None and x.device.type == "cpu" and ctx.config.cpu == "aten":
            continue  # the host runs every linear (linear_as_conv says so)
        spec, reason, note = _plan(chain, ctx)
        name = ctx.new_region_name("mlp_block")
        roles = tuple((role, n.name) for role, n in chain.nodes)
        ctx.regions.append(
            Region(
                name=name,
                kind="mlp_block",
                rule=RULE,
                stage=ctx.stage,
                nodes=tuple(n for _, n in roles),
                summary=spec.describe() if spec else chain.summary(),
                spec=spec,
                fallback_reason=None if reason is None else f"per layer: {reason}",
                roles=roles,
                note=note,
            )
        )
        if reason is None:
            counters["match.mlp_block"] += 1
            for role, n in chain.nodes:
                if role in ("fc1", "fc2", "fc3", "dw_conv"):
                    n.meta[IN_BLOCK] = name
        log.debug("%s at %s: %s", name, node.name, reason or "one kernel")
    return gm


def _plan(
    chain: MlpChain, ctx: PassContext, whole: bool = True
) -> tuple[MlpSpec | None, str | None, str | None]:
    """(the block's spec, None when it runs as one kernel else why not, a note). In an
    inference graph a ConvNeXt block is tried whole first (its depthwise conv included); when
    a guard or the cost model ("partly fused") refuses that, the MLP alone is planned, the
    conv stays a region of its own, and the note says why the block is not whole."""
    whole = whole and ctx.stage == "inference" and chain.absorb_depthwise()
    found = spec_or_reason(chain)
    spec = found if isinstance(found, MlpSpec) else None
    reason = found if spec is None else ctx.plan_block(spec) if ctx.plan_block else None
    if whole and reason is not None:
        log.debug("ConvNeXt block at %s not whole: %s", chain.nodes[0][1].name, reason)
        chain.drop_depthwise()
        refused = reason
        spec, reason, _ = _plan(chain, ctx, whole=False)
        # (a guard that refuses the MLP alone too, an empty batch say, is said once)
        note = None if reason == refused else f"not whole with its depthwise conv: {refused}"
        return spec, reason, note
    return spec, reason, None


def block_interiors(
    joint: torch.fx.GraphModule, forward: set[torch.fx.Node], plan_block
) -> list[list[torch.fx.Node]]:
    """In a joint graph: the nodes inside each MLP block that `plan_block` (the backend's
    cost model) runs as one kernel, every node of its chain but the last. Tagged for
    recomputation (recompute.py), the backward rebuilds them in ATen from x and the weights,
    so the forward saves none of them and the block region can take them."""
    found = []
    for node in joint.graph.nodes:
        if node not in forward or node.op != "call_function" or node.target not in MATMULS:
            continue
        chain = MlpChain(node, forward)
        if not chain.nodes:
            continue
        spec = spec_or_reason(chain)
        if isinstance(spec, MlpSpec) and (plan_block is None or plan_block(spec) is None):
            found.append([n for _, n in chain.nodes[:-1]] + list(_norm_inside(chain)))
    return found


def _norm_inside(chain: MlpChain) -> tuple[torch.fx.Node, ...]:
    """The LayerNorm prologue's nodes that are not roles of the chain (var_mean's getitems,
    the centring, the rsqrt)."""
    if chain.norm is None:
        return ()
    named = {n for _, n in chain.nodes}
    return tuple(n for n in chain.norm.nodes if n not in named)
