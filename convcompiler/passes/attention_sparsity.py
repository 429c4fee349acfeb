"""A constant mask's sparsity: the key tiles the attention kernel can skip.

When an attention's masking terms (bias, per-window mask, attn_mask, boolean select) are
constant for the compile (constants.py: a buffer, or built from shapes alone) and hide whole
key tiles, the spec records the fraction of key tiles visited for each tile shape of the
kernel (score_terms.key_tiles on their values now). The kernel recomputes its tile lists from
each call's terms, so a buffer changed later stays exact; only the price (the cost model, the
report) comes from here. Terms that are not constant can only hide more: the fractions are
then an upper bound.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..score_terms import per_head, per_window, tile_fractions, visible_pairs
from ..spec import AttentionSpec
from .attention_pattern import AttentionMatch
from .constants import constant_value

log = logging.getLogger(__name__)


def key_tile_fractions(
    gm: torch.fx.GraphModule,
    m: AttentionMatch,
    spec: AttentionSpec,
    constants: Mapping[str, torch.Tensor],
) -> tuple[tuple[int, int, float], ...]:
    """AttentionSpec.key_tiles for this match: () unless a constant term hides a key tile (or
    when the analysis fails: the kernel then visits every key tile, as before)."""
    try:
        with unset_fake_temporarily(), torch.no_grad():
            return _fractions(gm, m, spec, constants)
    except Exception:  # pricing only: an analysis bug must not fail the compile
        log.warning("the key tiles of %s were not analysed", m.final.name, exc_info=True)
        return ()


def _fractions(gm, m, spec, constants):
    select = m.select.node if m.select is not None else None
    nodes = {"bias": m.bias, "mask": m.mask, "general": m.general, "select": select}
    terms = {role: constant_value(gm, node, constants) if node is not None else None
             for role, node in nodes.items()}  # fmt: skip
    if all(t is None for t in terms.values()):
        return ()
    b, h, n, nk = spec.hint(spec.batch), spec.heads, spec.tokens, spec.keys
    bias, mask, general, chosen = (terms[r] for r in ("bias", "mask", "general", "select"))
    try:
        bias = per_head(bias, h, n, nk) if bias is not None else None
        mask = per_window(mask, n, nk) if mask is not None else None
        if mask is not None and b % mask.shape[0]:
            return ()
        general = general.expand(b, h, n, nk) if general is not None else None
        chosen = chosen.expand(b, h, n, nk) if chosen is not None else None
    except RuntimeError:  # a shape the kernel's launch would refuse as well
        return ()
    if chosen is not None and chosen.dtype != torch.bool:
        return ()
    visible = visible_pairs(bias, mask, general, chosen, spec.select == "keep", spec.fill)
    return tile_fractions(visible, b)
