"""Multi-scale deformable attention module (Deformable-DETR) with PIIP's ``d_feat`` / ``ratio`` options."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from piip_models.kernels import multi_scale_deformable_attention

__all__ = ["MSDeformAttn", "reference_points"]


def reference_points(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Pixel-centre coordinates of a ``height x width`` query grid.

    Returns:
        ``(1, height * width, 1, 2)`` float32 ``(x, y)`` in ``(0, 1)``, row-major.
    """
    # arange, not linspace: the same values, and symbolic sizes (torch.compile, torch.export) stay symbolic.
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1)[None, :, None]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Queries attend to ``n_points`` learned offsets around their reference point on each of ``n_levels`` value maps.
    PIIP feeds the value from another branch, so the value width (``d_feat``) may differ from the query width and
    the attended width is ``int(d_model * ratio)``.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        ratio: float = 1.0,
        d_feat: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            d_model: Query (and output) width.
            n_levels: Number of value maps.
            n_heads: Attention heads.
            n_points: Sampling points per head and level.
            ratio: Attended value width as a fraction of ``d_model``.
            d_feat: Width of the value input; ``d_model`` when None.
            device: Parameter device.
            dtype: Parameter dtype.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(
                f"value width {value_dim} (d_model {d_model} x ratio {ratio}) must divide by n_heads {n_heads}"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.value_dim = value_dim
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2, **dd)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points, **dd)
        self.value_proj = nn.Linear(d_feat or d_model, value_dim, **dd)
        self.output_proj = nn.Linear(value_dim, d_model, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR grid init: head ``h`` samples along direction ``2*pi*h/n_heads``, point ``i`` at ``i+1``."""
        nn.init.zeros_(self.sampling_offsets.weight)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)
        bias = self.sampling_offsets.bias
        if bias.is_meta:
            return
        with torch.no_grad():
            thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
            grid = torch.stack([thetas.cos(), thetas.sin()], -1)
            grid = grid / grid.abs().max(-1, keepdim=True)[0]
            grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
            grid *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
            bias.copy_(grid.flatten())

    def forward(
        self,
        query: torch.Tensor,
        ref_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """
        Args:
            query: ``(N, Lq, d_model)``.
            ref_points: ``(N or 1, Lq, n_levels, 2)`` normalised ``(x, y)`` reference points.
            value_input: ``(N, sum_l H_l * W_l, d_feat)``.
            spatial_shapes: ``(H_l, W_l)`` of each value level, as Python ints.

        Returns:
            ``(N, Lq, d_model)``.
        """
        batch, num_queries, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_input).view(batch, value_input.shape[1], heads, self.value_dim // heads)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = F.softmax(weights, -1).view(batch, num_queries, heads, levels, points)
        # Sampling coordinates stay fp32 whatever the activation dtype: bf16 cannot resolve sub-pixel offsets.
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float32, device=query.device)
        locations = ref_points[:, :, None, :, None, :] + offsets.float() / normalizer[None, None, None, :, None, :]
        output = multi_scale_deformable_attention(value, spatial_shapes, None, locations, weights)
        return self.output_proj(output)
