"""Pure-PyTorch multi-scale deformable attention (the portable path).

Sampling follows Deformable-DETR exactly: a location ``(x, y)`` in ``[0, 1]`` maps to pixel coordinates
``(x * W - 0.5, y * H - 0.5)``, values are read bilinearly and points outside the map read zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def msda_torch(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``grid_sample``.

    Args:
        value: ``(N, sum_l H_l * W_l, M, D)`` values of every level, flattened row-major per level.
        spatial_shapes: ``(H_l, W_l)`` of each level, as Python ints.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)`` locations.
        attention_weights: ``(N, Lq, M, L, P)`` weights of the sampled values.

    Returns:
        ``(N, Lq, M * D)`` attended values.
    """
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    value_levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (N, HW, M, D) -> (N*M, D, H, W)
        value_l = value_levels[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Lq, L*P) weighted by (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, levels * points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch, heads * head_dim, num_queries).transpose(1, 2).contiguous()
