"""What is added to (or multiplies) the attention scores, filed under the kernel's operands.

The scores s[b, h, i, j] (b = image * nW + window) are seen in one of three forms:

    [B*H, N, Nk]        the bmm output (Nk = N but for pooled keys)
    [B, H, N, Nk]       the usual view
    [I, nW, H, N, Nk]   Swin's per-window view (I images of nW windows, B = I * nW)

A term added to a form broadcasts against it (aligned right). Each term is proved to be one
of the kernel's operands, or refused with the reason:

    bias[h, i, j]        constant over b (a relative position bias: [1, H, N, N], [N, N], ...)
    mask[w, i, j]        a function of the window w = b mod nW only: [1, nW, 1, N, N] on the
                         per-window view, or such a tensor expanded to [I, nW, h, N, N] and
                         reshaped to [B, h, N, N] (timm's and HF's SDPA masks)
    general[b, h, i, j]  anything else that broadcasts to [B, H, N, N]

A factor (a tensor multiplying the scores) must vary over the heads only: SwinV2's
logit scale. The same mask added twice (HF Swinv2) is one mask with a weight of 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from .attention_views import NoMatch, dtype, is_reshape, same_values, shape, strip_reshapes
from .meta import run_on_fakes

aten = torch.ops.aten


@dataclass(frozen=True)
class Term:
    node: torch.fx.Node  # the value added
    scores: tuple[int, ...]  # the shape of the scores it was added to
    site: torch.fx.Node | None = None  # the add (or mul) that applies it


@dataclass(frozen=True)
class Select:
    """where(m, s, fill) ("keep": SDPA's boolean attn_mask) or where(m, fill, s)
    (masked_fill) as the last step before the softmax."""

    node: torch.fx.Node  # the boolean mask
    keep: bool  # True keeps the score where the mask is True (SDPA); False replaces it
    fill: float
    scores: tuple[int, ...]  # the shape of the scores it selects on


@dataclass
class Terms:
    """The kernel's additive operands and per-head factor, as graph nodes."""

    bias: torch.fx.Node | None = None
    mask: torch.fx.Node | None = None
    windows: int = 1
    mask_repeat: int = 1
    general: torch.fx.Node | None = None
    logit_scale: torch.fx.Node | None = None
    select: Select | None = None  # a boolean mask applied last (see file_select)


def _padded(term_shape: tuple[int, ...], form: tuple[int, ...]) -> tuple[int, ...]:
    """The term's shape aligned right against the form; refused if it does not broadcast."""
    if len(term_shape) > len(form):
        raise NoMatch(f"a term {term_shape} has more dims than the scores {form}")
    padded = (1,) * (len(form) - len(term_shape)) + tuple(term_shape)
    if any(t not in (1, f) for t, f in zip(padded, form)):
        raise NoMatch(f"a term {term_shape} does not broadcast to the scores {form}")
    return padded


def check_form(form: tuple[int, ...], b: int, heads: int, n: int, nk: int) -> None:
    if form[-2:] != (n, nk):
        raise NoMatch(f"scores {form} are not [.., {n}, {nk}]")
    if len(form) == 3 and form[0] == b * heads:
        return
    if len(form) == 4 and form[:2] == (b, heads):
        return
    if len(form) == 5 and form[0] * form[1] == b and form[2] == heads:
        return
    raise NoMatch(
        f"scores viewed as {form}: neither [B*H, N, N], [B, H, N, N] nor [I, nW, H, N, N]"
    )


def _expanded_window_mask(term: torch.fx.Node, b: int) -> tuple[torch.fx.Node, int] | None:
    """(m, nW) if `term` [B, h, N, N] is a reshape of m expanded to [I, nW, h, N, N] with m
    [1, nW, 1, N, N] (aligned right): a per-window mask repeated over images (and heads)."""
    node = term
    while is_reshape(node) or same_values(node):
        node = node.args[0]
    if node.op != "call_function" or node.target is not aten.expand.default:
        return None
    expanded, term_shape = shape(node), shape(term)
    if len(expanded) != 5 or expanded[0] * expanded[1] != b:
        return None
    if term_shape != (expanded[0] * expanded[1], *expanded[2:]):
        return None
    source = node.args[0]
    inner = _padded(shape(source), expanded)
    if inner[0] != 1 or inner[1] != expanded[1] or inner[2] != 1 or expanded[1] == 1:
        return None
    return source, expanded[1]


def _parts(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The summands of a sum of tensors (SDPA's attn_mask = bias + mask)."""
    if (
        node.op == "call_function"
        and node.target is aten.add.Tensor
        and node.kwargs.get("alpha", 1) == 1
        and all(isinstance(a, torch.fx.Node) for a in node.args)
    ):
        return [p for a in node.args for p in _parts(a)]
    return [node]


def _same_values(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    return a is b or (strip_reshapes(a) is strip_reshapes(b) and shape(a) == shape(b))


def _file(out: Terms, role: str, node: torch.fx.Node, windows: int = 1) -> None:
    held = getattr(out, role)
    if held is None:
        setattr(out, role, node)
        if role == "mask":
            out.windows = windows
        return
    if role == "mask" and _same_values(held, node) and windows == out.windows:
        out.mask_repeat += 1
        return
    names = {"bias": "per-head biases", "mask": "per-window masks", "general": "attention masks"}
    raise NoMatch(f"two {names[role]} on the scores (the kernel adds one of each)")


def merge_split_terms(terms: list[Term], b: int, heads: int, n: int, nk: int) -> list[Term]:
    """Terms added on a view that splits the tokens into grid axes ([B, H, qh, qw, kh, kw]:
    MViTv2's rel_h[.., kh, 1] + rel_w[.., 1, kw]) become one [B, H, N, Nk] term: their sum,
    broadcast and viewed back row-major as the scores are (new nodes before the last add, for
    the kernel's general operand; the sum is materialized, the scores are not)."""
    split = [t for t in terms if t.scores[-2:] != (n, nk) and len(t.scores) > 4]
    if not split:
        return terms
    forms = {t.scores for t in split}
    form = next(iter(forms))
    if not all(isinstance(x, int) for x in (b, heads, *form)):
        raise NoMatch("terms on a split view of the scores with dynamic sizes")
    if len(forms) > 1 or math.prod(form) != b * heads * n * nk:
        raise NoMatch(f"terms on split views {sorted(forms)} of the scores")
    graph = split[0].node.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    site = max((t.site for t in split), key=order.__getitem__)
    added = []
    with graph.inserting_before(site):
        total = split[0].node
        for t in split[1:]:
            total = graph.call_function(aten.add.Tensor, (total, t.node))
            added.append(total)
        for target, args, kwargs in (
            (aten.expand.default, (list(form),), {}),
            (aten.clone.default, (), {"memory_format": torch.contiguous_format}),
            (aten.view.default, ([b, heads, n, nk],), {}),
        ):
            total = graph.call_function(target, (total, *args), kwargs)
            added.append(total)
    for node in added:
        node.meta["val"] = run_on_fakes(node)
    return [t for t in terms if t not in split] + [Term(total, (b, heads, n, nk), site)]


def classify(terms: list[Term], b: int, heads: int, n: int, nk: int) -> Terms:
    """File every additive term; raises NoMatch for a term no operand can carry exactly."""
    out = Terms()
    for term in merge_split_terms(terms, b, heads, n, nk):
        check_form(term.scores, b, heads, n, nk)
        for part in _parts(term.node):
            if not dtype(part).is_floating_point:
                raise NoMatch(f"a {dtype(part)} term is added to the scores")
            form = term.scores
            p = _padded(shape(part), form)
            if len(form) == 3:
                if p[0] != 1:
                    raise NoMatch("a term varies over the flattened batch x heads dim")
                _file(out, "bias", part)
            elif len(form) == 4:
                window = _expanded_window_mask(part, b) if p[0] != 1 else None
                if p[0] == 1:
                    _file(out, "bias", part)
                elif window is not None:
                    _file(out, "mask", *window)
                else:
                    _file(out, "general", part)
            elif p[0] != 1:
                raise NoMatch("a per-image term on the per-window view of the scores")
            elif p[1] == 1:
                _file(out, "bias", part)
            elif p[2] == 1:
                _file(out, "mask", part, form[1])
            else:
                raise NoMatch("a per-window, per-head term on the scores")
    return out


def file_select(out: Terms, select: Select, b: int, heads: int, n: int, nk: int) -> None:
    """A boolean mask that broadcasts to the scores: the kernel's select operand."""
    if select.scores[-2:] != (n, nk) or len(select.scores) not in (3, 4):
        raise NoMatch(f"a boolean mask on scores viewed as {select.scores}")
    if dtype(select.node) != torch.bool:
        raise NoMatch(f"a {dtype(select.node)} mask selects the scores")
    padded = _padded(shape(select.node), select.scores)
    if len(select.scores) == 3 and padded[0] != 1:
        raise NoMatch("a boolean mask varies over the flattened batch x heads dim")
    if select.fill != select.fill:
        raise NoMatch("the scores are filled with NaN")
    out.select = select


def file_factor(out: Terms, factor: Term, b: int, heads: int, n: int, nk: int) -> None:
    """A tensor multiplying the scores: a per-head logit scale, or refused."""
    form = factor.scores
    check_form(form, b, heads, n, nk)
    if not dtype(factor.node).is_floating_point:
        raise NoMatch(f"the scores are multiplied by a {dtype(factor.node)} tensor")
    p = _padded(shape(factor.node), form)
    head_dim = {3: None, 4: 1, 5: 2}[len(form)]
    if any(s != 1 for i, s in enumerate(p) if i != head_dim):
        raise NoMatch(f"a factor {shape(factor.node)} on the scores varies over more than heads")
    if out.logit_scale is not None:
        raise NoMatch("two tensor factors on the scores")
    out.logit_scale = factor.node
