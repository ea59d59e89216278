"""Multi-scale deformable attention as plain gathers: the formulation of tracing and export.

``torch.export``, ``torch.jit.trace`` and both ONNX exporters see only elementwise ops, one ``index`` (ONNX
``Gather``) of value rows and one batched ``matmul``, all of which ONNX has at every opset from 13 on, and no Python
control flow that depends on a tensor size: the batch, the number of queries and the level shapes may be symbolic
(dynamic dims), and the graph stays valid for every size. Differentiable by autograd.

Every output row ``(n, q, m)`` is the weighted sum of the ``4 * L * P`` value rows of its samples' bilinear corners,
read from ``value`` viewed as a ``(N * S * M, D)`` table (no copy). Corners off the map, and every corner of a
non-finite location, get weight 0 and read row 0, so the graph needs no masks. It materialises the corner rows
(``N * Lq * M * 4 * L * P * D`` elements), four times the sampled values of the ``grid_sample`` formulation:
fine for export, not for training, where the op's own paths run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .msda_torch import compute_dtype

__all__ = ["msda_gather"]


def msda_gather(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with gathers; the contract of :func:`.msda_torch.msda_torch_forward`, with
    ``spatial_shapes`` ints or symbolic ints."""
    batch, positions, heads, head_dim = value.shape
    queries = sampling_locations.shape[1]
    dtype = compute_dtype(value.dtype)
    # Table row of (image n, position 0, head m): (n * S) * M + m, shaped to broadcast over (N, Lq, M, P).
    image = torch.arange(batch, device=value.device).view(-1, 1, 1, 1) * (positions * heads)
    origin = image + torch.arange(heads, device=value.device).view(1, 1, -1, 1)
    rows, weights = [], []
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        loc = sampling_locations[:, :, :, level].to(dtype)
        attn = attention_weights[:, :, :, level].to(dtype)
        x = loc[..., 0] * width - 0.5
        y = loc[..., 1] * height - 0.5
        x0 = x.floor()
        y0 = y.floor()
        fx = x - x0
        fy = y - y0
        for dy, weight_y in ((0, 1 - fy), (1, fy)):
            for dx, weight_x in ((0, 1 - fx), (1, fx)):
                column = x0 + dx
                row = y0 + dy
                # Comparisons with NaN are false: non-finite locations read nothing.
                valid = (column >= 0) & (column < width) & (row >= 0) & (row < height)
                pixel = torch.where(valid, row * width + column, 0).to(torch.int64)
                rows.append(origin + (pixel + start) * heads)
                weights.append(torch.where(valid, attn * weight_y * weight_x, 0))
        start = start + height * width
    # (N, Lq, M, 4 * L * P) rows and weights -> (N, Lq, M, 1, 4 * L * P) @ (N, Lq, M, 4 * L * P, D)
    corners = value.reshape(-1, head_dim)[torch.cat(rows, -1)].to(dtype)
    out = torch.matmul(torch.cat(weights, -1).unsqueeze(-2), corners)
    return out.reshape(batch, queries, heads * head_dim).to(value.dtype)
