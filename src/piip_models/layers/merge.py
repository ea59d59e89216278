"""Branch merges: per-branch maps brought to one width and grid, then summed with learnable branch weights.

The builders reproduce the three official merges: the classification merge (GroupNorm, then Linear + GroupNorm for
branches that change width), the detection/segmentation merge (two Conv3x3-GroupNorm-ReLU layers) and the lighter
(Conv3x3-)GroupNorm-ReLU merge of the regular-FPN configs. :func:`merge_maps` applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .permute import ChannelsLast

__all__ = ["classification_merge", "dense_merge", "group_norm", "merge_maps", "regular_dense_merge"]


def group_norm(channels: int, dd: dict[str, Any]) -> nn.GroupNorm:
    """GroupNorm(32, channels), the normalisation of every official merge."""
    if channels % 32:
        raise ValueError(f"branch merges use GroupNorm(32, C) and need widths divisible by 32, got {channels}")
    return nn.GroupNorm(32, channels, **dd)


def classification_merge(in_dim: int, out_dim: int, project: bool, dd: dict[str, Any]) -> nn.Sequential:
    """GroupNorm, then (``project``) Linear to the merge width and GroupNorm: the official classification merge."""
    if not project:
        return nn.Sequential(group_norm(in_dim, dd))
    linear = nn.Linear(in_dim, out_dim, **dd)
    return nn.Sequential(
        group_norm(in_dim, dd), ChannelsLast(), linear, ChannelsLast(inverse=True), group_norm(out_dim, dd)
    )


def dense_merge(in_dim: int, out_dim: int, dd: dict[str, Any]) -> nn.Sequential:
    """Two Conv3x3-GroupNorm-ReLU layers to the merge width: the official detection/segmentation merge."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, 3, padding=1, bias=False, **dd), group_norm(out_dim, dd), nn.ReLU(),
        nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False, **dd), group_norm(out_dim, dd), nn.ReLU(),
    )


def regular_dense_merge(in_dim: int, out_dim: int, project: bool, dd: dict[str, Any]) -> nn.Sequential:
    """GroupNorm-ReLU, after a Conv3x3 to the merge width when ``project``: the lighter merge of the official
    regular-FPN (intermediate merging) configs."""
    conv = [nn.Conv2d(in_dim, out_dim, 3, padding=1, bias=False, **dd)] if project else []
    return nn.Sequential(*conv, group_norm(out_dim, dd), nn.ReLU())


def merge_maps(
    maps: Sequence[torch.Tensor],
    size: tuple[int, int],
    merges: Sequence[nn.Module] | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Brings every branch map to ``size`` and combines them.

    Each map goes through its merge (when ``merges`` is given), is resized bilinearly to ``size`` (in fp32, as the
    reference does; a smaller grid's top-left cell maps exactly onto the target's) and the maps are summed with the
    branch ``weights``, or concatenated along channels without weights.

    Args:
        maps: ``(B, C_k, H_k, W_k)`` branch maps.
        size: Target grid ``(H, W)``.
        merges: One merge module per branch.
        weights: ``(num_branches,)`` branch weights.

    Returns:
        ``(B, C, H, W)``: the weighted sum, or the concatenation.
    """
    resized = []
    for k, feature_map in enumerate(maps):
        if merges is not None:
            feature_map = merges[k](feature_map)
        if tuple(feature_map.shape[-2:]) != tuple(size):
            feature_map = F.interpolate(
                feature_map.float(), size=size, mode="bilinear", align_corners=False
            ).to(feature_map.dtype)
        resized.append(feature_map)
    if weights is None:
        # cat copies even a single map: the fused map is a tensor of its own, not a view of a branch's tokens
        return torch.cat(resized, dim=1)
    return sum(w * m for w, m in zip(weights.unbind(0), resized))
