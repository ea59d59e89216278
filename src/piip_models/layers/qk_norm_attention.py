"""Self-attention with InternViT-6B's query/key normalisation over the full width."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import Attention

from .rms_norm import MultiHeadRmsNorm

__all__ = ["FullWidthQkNormAttention"]


class FullWidthQkNormAttention(Attention):
    """timm ``Attention`` whose ``qk_norm`` is an RMSNorm over all heads together (InternViT-6B).

    timm normalises each head separately (``norm_layer(head_dim)``); InternViT-6B applies one RMSNorm over the
    ``heads * head_dim`` query (and key) vector of every token. Everything else, including the forward pass, is
    timm's, so PIIP's windowed attention (which calls ``q_norm``/``k_norm`` on per-head tensors) works unchanged.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        norm_layer: type[nn.Module] | None = None,
        qk_norm_eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            dim: Token width.
            num_heads: Attention heads.
            qkv_bias: Bias of the qkv projection (InternViT-6B has none).
            qk_norm: Normalise queries and keys over the full width.
            norm_layer: The block's norm layer (passed by timm's ``Block``; unused here: q/k always use RMSNorm).
            qk_norm_eps: RMSNorm epsilon.
            device: Parameter device.
            dtype: Parameter dtype.
            **kwargs: Further timm ``Attention`` arguments (``proj_bias``, ``attn_drop``, ``proj_drop``, ...).
        """
        super().__init__(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=False, norm_layer=norm_layer, device=device,
            dtype=dtype, **kwargs,
        )
        if qk_norm:
            self.q_norm = MultiHeadRmsNorm(self.attn_dim, eps=qk_norm_eps, device=device, dtype=dtype)
            self.k_norm = MultiHeadRmsNorm(self.attn_dim, eps=qk_norm_eps, device=device, dtype=dtype)
