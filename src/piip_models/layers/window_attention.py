"""Windowed self-attention over a ViT block's own ``qkv``/``proj`` weights, as PIIP's detection branches use it.

The token grid is zero-padded on the right and bottom to a multiple of the window and attention runs inside each
window without a mask. Where the padding happens matters: padding the normalised tokens *before* the qkv
projection gives padded keys/values equal to the qkv bias (the official flash-attention and InternViT paths, which
the released configs use); padding *after* it gives zero keys/values (the official non-flash DeiT path).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["WindowPadding", "windowed_attention", "block_forward"]

WindowPadding = Literal["before_qkv", "after_qkv"]


def _partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, int, int]:
    """(B, H, W, C) -> zero-padded (B * nH * nW, window * window, C) windows, and the padded grid."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = (-height) % window, (-width) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.view(batch, padded_h // window, window, padded_w // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels), padded_h, padded_w


def _unpartition(windows: torch.Tensor, window: int, batch: int, padded: tuple[int, int], grid: tuple[int, int]):
    padded_h, padded_w = padded
    channels = windows.shape[-1]
    x = windows.view(batch, padded_h // window, padded_w // window, window, window, channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, channels)
    return x[:, : grid[0], : grid[1]]


def windowed_attention(
    attn: nn.Module,
    x: torch.Tensor,
    grid: tuple[int, int],
    window: int,
    padding: WindowPadding = "before_qkv",
) -> torch.Tensor:
    """Self-attention of a timm ``Attention`` module restricted to ``window x window`` windows.

    Args:
        attn: timm ``Attention`` (``qkv``, ``q_norm``/``k_norm``, ``norm``, ``proj``).
        x: ``(B, H * W, C)`` normalised tokens of a row-major grid.
        grid: ``(H, W)``.
        window: Window side in tokens.
        padding: Pad the tokens before the qkv projection or the projected q/k/v after it.

    Returns:
        ``(B, H * W, C)``.
    """
    batch, _, channels = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    tokens = x.view(batch, grid[0], grid[1], channels)
    if padding == "before_qkv":
        windows, padded_h, padded_w = _partition(tokens, window)
        qkv = attn.qkv(windows)
    elif padding == "after_qkv":
        qkv, padded_h, padded_w = _partition(attn.qkv(tokens), window)
    else:
        raise ValueError(f"padding must be 'before_qkv' or 'after_qkv', got {padding!r}")
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(out.shape[0], -1, heads * head_dim))))
    out = _unpartition(out, window, batch, (padded_h, padded_w), grid)
    return out.reshape(batch, grid[0] * grid[1], -1)


def block_forward(
    block: nn.Module,
    x: torch.Tensor,
    grid: tuple[int, int],
    window: int,
    padding: WindowPadding = "before_qkv",
) -> torch.Tensor:
    """A timm ViT ``Block`` forward with windowed attention (``window > 0``) or its own global attention."""
    if window <= 0:
        return block(x)
    x = x + block.drop_path1(block.ls1(windowed_attention(block.attn, block.norm1(x), grid, window, padding)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
