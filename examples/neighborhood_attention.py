"""Neighborhood attention (NA) written in plain PyTorch, compiled by im2win.

Each token of an H x W grid attends to the kernel x kernel window around it; at the borders
the window is shifted to stay inside the grid (NATTEN's rule: start = clamp(i - k // 2, 0,
H - k)). Here it is one SDPA call with a constant boolean mask (a buffer, True = attend),
which the backend fuses into its attention kernel: the mask is applied in the kernel, as a
select operand, or as the -inf bias torch's CPU SDPA path turns it into. The mask is
analysed at compile time: the kernel visits only the key tiles some query of its tile can
see (the report's `key_tiles`), so NA costs about what its windows keep.

    python examples/neighborhood_attention.py          # CPU: Triton's interpreter
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import convcompiler


def neighborhood_mask(height: int, width: int, kernel: int) -> torch.Tensor:
    """[H*W, H*W] bool: query (i, j) sees key (y, x) inside its clamped kernel window."""

    def starts(size: int) -> torch.Tensor:
        return (torch.arange(size) - kernel // 2).clamp(0, size - kernel)

    rows = torch.arange(height)
    cols = torch.arange(width)
    sy, sx = starts(height), starts(width)
    in_y = (rows[None, :] >= sy[:, None]) & (rows[None, :] < sy[:, None] + kernel)  # [qy, ky]
    in_x = (cols[None, :] >= sx[:, None]) & (cols[None, :] < sx[:, None] + kernel)  # [qx, kx]
    mask = in_y[:, None, :, None] & in_x[None, :, None, :]  # [qy, qx, ky, kx]
    return mask.reshape(height * width, height * width)


class NeighborhoodAttention2d(nn.Module):
    def __init__(self, dim: int, heads: int, height: int, width: int, kernel: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("mask", neighborhood_mask(height, width, kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, H*W, C]
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def main() -> None:
    torch.manual_seed(0)
    model = NeighborhoodAttention2d(dim=32, heads=2, height=32, width=32, kernel=7).eval()
    x = torch.randn(1, 32 * 32, 32)
    with torch.no_grad():
        expected = model.double()(x.double())
        model.float()
        got = torch.compile(model, backend="im2win", options={"cpu": "interpret"})(x)
    error = ((got.double() - expected).abs().max() / expected.abs().max()).item()
    (region,) = [r for r in convcompiler.last_report().regions if r.kind == "window_attention"]
    print(f"attention: {region.schedule} ({region.spec})")
    print(f"max relative error vs float64 eager: {error:.2e}")
    kept = model.mask.float().mean().item()
    print(f"the mask keeps {kept:.1%} of the score matrix; the kernel visits "
          f"{region.key_tiles:.1%} of the key tiles (the GPU plan's tiles: "
          f"{region.plan_key_tiles:.1%})")


if __name__ == "__main__":
    main()
