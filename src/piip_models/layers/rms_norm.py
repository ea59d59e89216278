"""RMSNorm as InternViT-6B computes it, and its multi-head form for query/key normalisation."""

from __future__ import annotations

import torch
from timm.layers import RmsNorm as TimmRmsNorm

__all__ = ["RmsNorm", "MultiHeadRmsNorm"]


class RmsNorm(TimmRmsNorm):
    """Weight-only RMSNorm normalised in fp32 and cast back to the input dtype *before* the weight is applied.

    This is InternViT-6B's order of operations; timm's ``RmsNorm`` stays in the input dtype, which differs in
    half precision (in fp32 both agree up to rounding).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class MultiHeadRmsNorm(RmsNorm):
    """:class:`RmsNorm` over all heads at once of ``(B, heads, N, head_dim)`` queries or keys.

    InternViT-6B normalises q and k over the full width (``heads * head_dim``), not per head; the weight has the
    full width, so checkpoints keep their ``q_norm.weight`` / ``k_norm.weight`` shapes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, heads, tokens, head_dim = x.shape
        flat = x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        return super().forward(flat).view(batch, tokens, heads, head_dim).transpose(1, 2)
