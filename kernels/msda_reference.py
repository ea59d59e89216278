"""The ``grid_sample`` formulation of multi-scale deformable attention (Deformable-DETR's and PIIP's
``ms_deform_attn_core_pytorch``): the float64 reference of the tests and the baseline of ``benchmarks/msda.py``.

It materialises every sampled value, so it is neither the fast nor the lean path; the dispatcher never uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["reference"]


def reference(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``grid_sample`` (the original PyTorch formulation)."""
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
