"""Multi-scale deformable attention (MSDA) for piip-models.

This package is self-contained: it never imports the rest of ``piip_models``. It ships inside the
``piip-models`` wheel as ``piip_models.kernels``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .msda_torch import msda_torch

__all__ = ["multi_scale_deformable_attention"]


def _as_shape_tuples(spatial_shapes: torch.Tensor | Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    if isinstance(spatial_shapes, torch.Tensor):
        # Reading a tensor's values syncs with its device; pass Python ints to stay sync- and meta-safe.
        spatial_shapes = spatial_shapes.tolist()
    return tuple((int(h), int(w)) for h, w in spatial_shapes)


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
    level_start_index: torch.Tensor | Sequence[int] | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable-DETR multi-scale deformable attention.

    Args:
        value: ``(N, S, M, D)`` with ``S = sum_l H_l * W_l``.
        spatial_shapes: ``(L, 2)`` rows ``(H_l, W_l)``; a tensor or a sequence of int pairs.
        level_start_index: ``(L,)`` offsets of each level in ``S``; derived from ``spatial_shapes`` when None.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)`` in ``[0, 1]`` (outside reads zeros).
        attention_weights: ``(N, Lq, M, L, P)``.

    Returns:
        ``(N, Lq, M * D)``.
    """
    shapes = _as_shape_tuples(spatial_shapes)
    if value.dim() != 4 or sampling_locations.dim() != 6 or attention_weights.dim() != 5:
        raise ValueError(
            "expected value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2) and attention_weights "
            f"(N, Lq, M, L, P); got {tuple(value.shape)}, {tuple(sampling_locations.shape)}, "
            f"{tuple(attention_weights.shape)}"
        )
    if sum(h * w for h, w in shapes) != value.shape[1]:
        raise ValueError(f"value has {value.shape[1]} positions but spatial_shapes {shapes} sum to a different count")
    if sampling_locations.shape[3] != len(shapes):
        raise ValueError(f"sampling_locations has {sampling_locations.shape[3]} levels, spatial_shapes {len(shapes)}")
    return msda_torch(value, shapes, sampling_locations, attention_weights)
