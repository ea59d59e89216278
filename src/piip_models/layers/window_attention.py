"""Windowed self-attention over a ViT block's own ``qkv``/``proj`` weights, as PIIP's detection branches use it.

The token grid is zero-padded on the right and bottom to a multiple of the window and attention runs inside each
window without a mask. Where the padding happens matters: padding the normalised tokens *before* the qkv
projection gives padded keys/values equal to the qkv bias (the official flash-attention and InternViT paths, which
the released configs use); padding *after* it gives zero keys/values (the official non-flash DeiT path).

BEiT branches add a learned relative position bias defined over one window (:class:`WindowRelPosAttention`).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention

__all__ = ["WindowPadding", "WindowRelPosAttention", "block_forward", "rel_pos_attention", "windowed_attention"]

WindowPadding = Literal["before_qkv", "after_qkv"]


def _partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, int, int]:
    """(B, H, W, C) -> zero-padded (B * nH * nW, window * window, C) windows, and the padded grid."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = (-height) % window, (-width) % window
    # Graphs with symbolic sizes (torch.compile, torch.export) always pad, possibly by nothing: a branch on the
    # padding would pin the grid to the example's divisibility by the window.
    if torch.compiler.is_compiling() or pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    rows, cols = padded_h // window, padded_w // window
    x = x.view(batch, rows, window, cols, window, channels)
    # explicit sizes (no -1), so that an empty batch reshapes too
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch * rows * cols, window * window, channels), padded_h, padded_w


def _unpartition(windows: torch.Tensor, window: int, batch: int, padded: tuple[int, int], grid: tuple[int, int]):
    padded_h, padded_w = padded
    channels = windows.shape[-1]
    x = windows.view(batch, padded_h // window, padded_w // window, window, window, channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, channels)
    if torch.compiler.is_compiling():
        # cropped by gathers: the layout of a sliced crop depends on the padding, which would pin the grid
        rows, cols = (torch.arange(size, device=x.device) for size in grid)
        return x.index_select(1, rows).index_select(2, cols)
    return x[:, : grid[0], : grid[1]]


class WindowRelPosAttention(Attention):
    """BEiT attention with a per-window relative position bias, as PIIP's windowed BEiT branches build it.

    The bias table holds ``(2W - 1)^2`` entries per head for a ``W x W`` window and, unlike BEiT pretraining, no
    class-token entries. The qkv projection has separate query and value biases and no key bias. Subclasses fix
    ``window_size`` (see :func:`rel_pos_attention`) so that timm ViTs can build the layer from ``attn_layer``.
    """

    window_size: int = 0

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if self.window_size <= 0:
            raise TypeError("build WindowRelPosAttention through rel_pos_attention(window_size)")
        super().__init__(
            dim,
            num_heads=num_heads,
            qkv_bias=False,
            qk_norm=qk_norm,
            scale_norm=scale_norm,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
            device=device,
            dtype=dtype,
        )
        dd = {"device": device, "dtype": dtype}
        self.q_bias = nn.Parameter(torch.zeros(self.attn_dim, **dd)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(self.attn_dim, **dd)) if qkv_bias else None
        side = 2 * self.window_size - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(side * side, num_heads, **dd))
        coords = torch.stack(torch.meshgrid(
            torch.arange(self.window_size), torch.arange(self.window_size), indexing="ij"
        )).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (self.window_size - 1)
        index = relative[..., 0] * side + relative[..., 1]
        # Derived from the window size alone, so it stays out of the state dict.
        self.register_buffer("relative_position_index", index.to(device=device), persistent=False)

    def qkv_bias(self) -> torch.Tensor | None:
        """The qkv bias: query bias, zero key bias, value bias."""
        if self.q_bias is None:
            return None
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def check_window(self, window: int) -> None:
        """Raises unless ``window`` is the window the relative position bias covers."""
        if window != self.window_size:
            raise ValueError(
                f"this attention's relative position bias covers {self.window_size}x{self.window_size} windows, "
                f"got window {window}"
            )

    def position_bias(self, window: int) -> torch.Tensor:
        """``(num_heads, window^2, window^2)`` attention bias of one window."""
        self.check_window(window)
        tokens = window * window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(tokens, tokens, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Global attention, defined only when the tokens form exactly one window."""
        if attn_mask is not None or is_causal:
            raise ValueError("WindowRelPosAttention takes no attention mask")
        side = self.window_size
        if x.shape[1] != side * side:
            raise ValueError(
                f"global attention with a {side}x{side}-window relative position bias needs {side * side} tokens, "
                f"got {x.shape[1]}; run the block with window={side}"
            )
        return windowed_attention(self, x, (side, side), side)


@functools.cache
def rel_pos_attention(window_size: int) -> type[WindowRelPosAttention]:
    """The :class:`WindowRelPosAttention` class for ``window_size x window_size`` windows (a timm ``attn_layer``)."""
    if window_size <= 0:
        raise ValueError(f"window_size must be positive, got {window_size}")
    return type(f"WindowRelPosAttention{window_size}", (WindowRelPosAttention,), {"window_size": window_size})


def windowed_attention(
    attn: nn.Module,
    x: torch.Tensor,
    grid: tuple[int, int],
    window: int,
    padding: WindowPadding = "before_qkv",
) -> torch.Tensor:
    """Self-attention of a timm ``Attention`` module restricted to ``window x window`` windows.

    Args:
        attn: timm ``Attention`` (``qkv``, ``q_norm``/``k_norm``, ``norm``, ``proj``) or
            :class:`WindowRelPosAttention`.
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
    rel_pos = isinstance(attn, WindowRelPosAttention)
    if rel_pos and padding == "before_qkv" and grid != (window, window):
        # The module defines attention on one window: call it per window, so that it runs (and hooks see it) as
        # a module.
        attn.check_window(window)
        windows, padded_h, padded_w = _partition(tokens, window)
        out = _unpartition(attn(windows), window, batch, (padded_h, padded_w), grid)
        return out.reshape(batch, grid[0] * grid[1], out.shape[-1])
    bias = attn.position_bias(window) if rel_pos else None

    def project(t: torch.Tensor) -> torch.Tensor:
        qkv = attn.qkv(t)
        qkv_bias = attn.qkv_bias() if rel_pos else None
        return qkv if qkv_bias is None else qkv + qkv_bias

    if padding == "before_qkv":
        windows, padded_h, padded_w = _partition(tokens, window)
        qkv = project(windows)
    elif padding == "after_qkv":
        qkv, padded_h, padded_w = _partition(project(tokens), window)
    else:
        raise ValueError(f"padding must be 'before_qkv' or 'after_qkv', got {padding!r}")
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = None if bias is None else bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = _unpartition(out.transpose(1, 2).reshape(out.shape[0], window * window, heads * head_dim), window, batch,
                       (padded_h, padded_w), grid)
    # the output projection sees only the real tokens, as in the official windowed attention
    return attn.proj_drop(attn.proj(attn.norm(out.reshape(batch, grid[0] * grid[1], heads * head_dim))))


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
