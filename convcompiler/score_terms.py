"""An attention's operands and score terms as its kernel reads them, and the key tiles the
terms leave visible.

Plain torch, no project imports: the window-attention template copies these functions into
each kernel's source (so a generated kernel runs alone), and the attention matcher calls
them at compile time on a constant mask to price its sparsity (passes/attention_sparsity.py).
Both therefore see the same tiles.

A term hides a (query, key) pair when it makes its score -inf: an additive term's -inf
entries, or a select whose fill is -inf (SDPA's boolean attn_mask: False hides; a
masked_fill's True hides). A key tile is visited by a query tile when any pair of the two is
visible under every term; the others contribute exp(-inf) = 0 to the softmax, so skipping
them changes no bit of the result (see tile_lists for NaN and Inf).
"""

from __future__ import annotations

import torch

TILE_SIZES = (16, 32, 64, 128)  # BLOCK_M and BLOCK_N of the attention kernel's space


def canonical_view(t, transposed, heads_axis):
    """q, k or v as [B, H, N, D] (a view where the strides allow): a 5-D one's leading dims
    other than the heads merged into the batch, a 3-D one ([B*H, N, D]) one head of each, a
    transposed one's last two dims swapped back."""
    if t.dim() == 5:
        t = t.movedim(heads_axis, 2)
        t = t.reshape(-1, *t.shape[2:])
    elif t.dim() == 3:
        t = t.unsqueeze(1)
    return t.transpose(-2, -1) if transposed else t


def per_head(bias, heads, tokens, key_tokens):
    """bias[h, i, j] from a term broadcast over the batch: [.., 1, H|1, N|1, Nk|1]."""
    while bias.dim() > 3:
        bias = bias[0]
    return bias.expand(heads, tokens, key_tokens)


def per_window(mask, tokens, key_tokens):
    """mask[w, i, j] from [nW, N, Nk], [nW, 1, N, Nk] or [1, nW, 1, N, Nk] (size-1 dims of N
    broadcast): a per-window mask as the per-window view [I, nW, H, N, Nk] of the scores
    sees it."""
    if mask.dim() == 5:
        mask = mask[0, :, 0]
    elif mask.dim() == 4:
        mask = mask[:, 0]
    while mask.dim() < 3:
        mask = mask.unsqueeze(0)
    return mask.expand(mask.shape[0], tokens, key_tokens)


def _distinct(t, lead):
    """t with those of its first `lead` dims that are broadcast (stride 0) cut to size 1."""
    for d in range(lead):
        if t.shape[d] > 1 and t.stride(d) == 0:
            t = t.narrow(d, 0, 1)
    return t


def tiles_of(visible, block_m, block_n):
    """[.., N, Nk] bool -> [.., ceil(N / BLOCK_M), ceil(Nk / BLOCK_N)]: whether any pair of
    each query tile x key tile is visible (the padding past N and Nk is not)."""
    n, nk = visible.shape[-2:]
    tq, tk = -(-n // block_m), -(-nk // block_n)
    padded = torch.nn.functional.pad(visible, (0, tk * block_n - nk, 0, tq * block_m - n))
    return padded.unflatten(-1, (tk, block_n)).unflatten(-3, (tq, block_m)).any(-1).any(-2)


def visible_pairs(bias, mask, general, select, keep, fill):
    """The pairs each term leaves visible, as [B|1, H|1, N, Nk] bool (a per-window mask's as
    [nW, 1, N, Nk]); [] when no term can hide a pair. The terms as the kernel indexes them:
    bias [H, N, Nk], mask [nW, N, Nk] (window b mod nW), general and select [B, H, N, Nk]
    (views, broadcast dims kept); None when absent."""
    inf = float("-inf")
    found = []
    if bias is not None:
        found.append(_distinct(bias, 1)[None] != inf)
    if mask is not None:
        found.append(mask[:, None] != inf)
    if general is not None:
        found.append(_distinct(general, 2) != inf)
    if select is not None and fill == inf:
        select = _distinct(select, 2)
        found.append(select if keep else ~select)
    return found


def key_tiles(visible, batch, block_m, block_n):
    """[B|1, H|1, tq, tk] bool: the key tiles some query of each query tile can see under
    every term of `visible` (visible_pairs; the mask's windows repeat over the batch, b ->
    b mod nW), or None when there is no term."""
    seen = None
    for pairs in visible:
        tiles = tiles_of(pairs, block_m, block_n)
        if tiles.shape[0] not in (1, batch):  # the per-window mask
            tiles = tiles.repeat(batch // tiles.shape[0], 1, 1, 1)
        seen = tiles if seen is None else seen & tiles
    return seen


def tile_fractions(visible, batch):
    """((BLOCK_M, BLOCK_N, fraction of key tiles visited), ...) for every tile shape of the
    kernel's space: AttentionSpec.key_tiles, or () when the terms hide no whole key tile."""
    rows = []
    for block_m in TILE_SIZES:
        for block_n in TILE_SIZES:
            seen = key_tiles(visible, batch, block_m, block_n)
            fraction = 1.0 if seen is None else seen.float().mean().item()
            rows.append((block_m, block_n, round(fraction, 4)))
    return tuple(rows) if any(f < 1.0 for _, _, f in rows) else ()


def tile_lists(seen, q, k, v):
    """(counts [B, H, tq] int32, order [B, H, tq, tk] int32): for each query tile, how many
    key tiles it visits and which, in ascending order, first in its row of `order`.

    A (batch, head) whose q, k or v holds a NaN or an Inf visits every key tile, as the dense
    kernel does: eager computes 0 x Inf = NaN for a hidden key's value and NaN + -inf = NaN
    for its score, and only visiting the key gives the same. q, k and v: [B, H, N|Nk, D]."""
    finite = [torch.isfinite(t).all(-1).all(-1) for t in (q, k, v)]
    dense = ~(finite[0] & finite[1] & finite[2])
    seen = seen | dense[:, :, None, None]
    counts = seen.sum(-1, dtype=torch.int32)
    order = torch.argsort((~seen).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts.contiguous(), order.contiguous()
