"""Benchmark workloads of multi-scale deformable attention: the PIIP interaction shapes and the Deformable-DETR
encoder, PIIP-like inputs for them, and the bytes a kernel must move (used by ``benchmarks/msda.py`` and the GPU
self-check)."""

from __future__ import annotations

import torch

__all__ = ["SHAPES", "compulsory_bytes", "gather_bytes", "hbm_bytes_per_second", "make_inputs"]

# name: (query grid (h, w), value levels [(H, W)], heads, head_dim, points)
SHAPES = {
    "piip-B": ((98, 98), [(70, 70)], 16, 12, 4),  # ViT-S queries (1568 px) read ViT-B tokens (1120 px)
    "piip-C": ((70, 70), [(98, 98)], 16, 24, 4),  # ViT-B queries read ViT-S tokens
    "piip-D": ((42, 42), [(70, 70)], 16, 32, 4),  # ViT-L queries (672 px) read ViT-B tokens
    "piip-E": ((70, 70), [(42, 42)], 16, 24, 4),  # ViT-B queries read ViT-L tokens
    "detr-enc": (None, [(100, 152), (50, 76), (25, 38), (13, 19)], 8, 32, 4),  # queries = every level's pixels
}


def _pixel_centres(h: int, w: int) -> torch.Tensor:
    y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    return torch.stack((x, y), -1).view(-1, 2)


def make_inputs(name: str, batch: int, dtype: torch.dtype, device: str | torch.device, seed: int = 0):
    """PIIP-like inputs of workload ``name``: reference points on the query grid, offsets of a few pixels, softmaxed
    weights; value and grad_output in ``dtype``, locations and weights float32.

    Returns:
        ``(spatial_shapes, value, sampling_locations, attention_weights, grad_output)``.
    """
    grid, shapes, heads, head_dim, points = SHAPES[name]
    gen = torch.Generator().manual_seed(seed)
    ref = torch.cat([_pixel_centres(h, w) for h, w in shapes]) if grid is None else _pixel_centres(*grid)
    queries, levels = ref.shape[0], len(shapes)
    size = torch.tensor([(w, h) for h, w in shapes], dtype=torch.float32)
    offsets = torch.randn(batch, queries, heads, levels, points, 2, generator=gen) * 2.0 / size.view(levels, 1, 2)
    loc = ref.view(1, queries, 1, 1, 1, 2) + offsets
    attn = torch.randn(batch, queries, heads, levels * points, generator=gen).softmax(-1)
    attn = attn.view(batch, queries, heads, levels, points)
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, generator=gen)
    grad = torch.randn(batch, queries, heads * head_dim, generator=gen)
    return shapes, value.to(device, dtype), loc.to(device), attn.to(device), grad.to(device, dtype)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def compulsory_bytes(value, loc, attn, grad) -> tuple[int, int]:
    """Bytes a forward, and a forward + backward, must read or write at least: inputs and output (the output has the
    shape of ``grad``), plus in the backward the inputs again, grad_output and the three gradients."""
    forward = _nbytes(value) + _nbytes(loc) + _nbytes(attn) + _nbytes(grad)
    backward = 2 * _nbytes(value) + 2 * _nbytes(loc) + 2 * _nbytes(attn) + _nbytes(grad)
    return forward, forward + backward


def gather_bytes(value, loc) -> int:
    """Logical bytes of the forward's corner gathers: four head-wide value rows per sample (served mostly by L2)."""
    samples = loc[..., 0].numel()
    return 4 * samples * value.shape[-1] * value.element_size()


def hbm_bytes_per_second(device: torch.device | int | None = None) -> float:
    """Peak memory bandwidth of a CUDA device from its memory clock and bus width (double data rate)."""
    props = torch.cuda.get_device_properties(device)
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8
