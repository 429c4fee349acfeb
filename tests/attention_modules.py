"""Small, faithful window-attention modules for the tests: the layouts of the original
Microsoft Swin code and of HF transformers, and the shifted-window mask they all use."""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_position_index(window: int) -> torch.Tensor:
    """[N, N] index into the (2w-1)^2 bias table, as every Swin implementation builds it."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    return rel.sum(-1)


def shift_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """[nW, N, N] additive mask (0 / -100) of shifted windows over a height x width map."""
    img = torch.zeros(1, height, width, 1)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            img[:, hs, ws, :] = label
            label += 1
    windows = img.view(1, height // window, window, width // window, window, 1)
    windows = windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window)
    diff = windows[:, None, :] - windows[:, :, None]
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class MicrosoftWindowAttention(nn.Module):
    """The original Swin code: one qkv linear, q scaled before the matmul, a flat bias index,
    the mask added on a [B/nW, nW, H, N, N] view, dropout p=0, transpose(1, 2) output."""

    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        self.register_buffer("index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class HFWindowAttention(nn.Module):
    """HF transformers' SwinSelfAttention: separate q, k, v linears, the scale applied after
    the matmul (a division), an (N, N) bias index, permute(0, 2, 1, 3) + contiguous output."""

    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        self.register_buffer("index", relative_position_index(window))
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.dropout = nn.Dropout(0.0)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = q @ k.transpose(-1, -2)
        scores = scores / math.sqrt(self.head_dim)
        bias = self.table[self.index.view(-1)].view(n, n, -1)
        scores = scores + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            scores = scores.view(b // nw, nw, self.heads, n, n)
            scores = (scores + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.heads, n, n)
        probs = self.dropout(nn.functional.softmax(scores, dim=-1))
        context = (probs @ v).permute(0, 2, 1, 3).contiguous()
        return context.view(b, n, c)
