"""Multi-scale deformable attention (MSDA) for piip-models.

This package is self-contained: it never imports the rest of ``piip_models``. It ships inside the
``piip-models`` wheel as ``piip_models.kernels``. Importing it is cheap: Triton is imported, and CUDA touched, only
when a Triton kernel first runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch

from .msda_export import msda_gather
from .op import BACKENDS, ENV_BACKEND, msda_macs

__all__ = ["BACKENDS", "ENV_BACKEND", "msda_macs", "multi_scale_deformable_attention"]


def _as_int(size) -> int | torch.SymInt:
    # Symbolic sizes (torch.compile, torch.export) stay symbolic: int() would specialise the graph on their value.
    return size if isinstance(size, torch.SymInt) else int(size)


def _as_shape_tuples(spatial_shapes: torch.Tensor | Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """``(H, W)`` pairs of positive integers (symbolic sizes pass as they are); anything else is refused rather than
    truncated."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.is_floating_point() or spatial_shapes.is_complex() or spatial_shapes.dtype == torch.bool:
            raise ValueError(f"spatial_shapes must hold integers, got a {spatial_shapes.dtype} tensor")
        # Reading a tensor's values syncs with its device; pass Python ints to stay sync- and meta-safe.
        spatial_shapes = spatial_shapes.tolist()
    shapes = []
    for pair in spatial_shapes:
        if len(pair) != 2:
            raise ValueError(f"spatial_shapes rows must be (H, W) pairs, got {pair!r}")
        for size in pair:
            # (the legacy ONNX tracer hands sizes over as 0-d integer tensors)
            integer_tensor = isinstance(size, torch.Tensor) and size.dim() == 0 and not size.is_floating_point()
            if isinstance(size, bool) or not (isinstance(size, (Integral, torch.SymInt)) or integer_tensor):
                raise ValueError(f"spatial_shapes must hold integers, got {size!r} ({type(size).__name__})")
            if not isinstance(size, torch.SymInt) and int(size) < 1:
                raise ValueError(f"spatial_shapes must be positive (H, W) sizes, got {tuple(pair)}")
        shapes.append((_as_int(pair[0]), _as_int(pair[1])))
    return tuple(shapes)


def _tracing_or_exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.jit.is_tracing() or (is_exporting is not None and is_exporting())


def _check(
    value: torch.Tensor,
    shapes: tuple[tuple[int, int], ...],
    level_start_index: torch.Tensor | Sequence[int] | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str | None,
) -> None:
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
    batch, _, heads, head_dim = value.shape
    if heads == 0 or head_dim == 0:
        raise ValueError(f"value needs at least one head of width >= 1, got {heads} heads of width {head_dim}")
    if (
        sampling_locations.shape[-1] != 2
        or sampling_locations.shape[0] != batch
        or sampling_locations.shape[2] != heads
        or attention_weights.shape != sampling_locations.shape[:-1]
    ):
        raise ValueError(
            f"inconsistent shapes: value {tuple(value.shape)} (N, S, M, D), sampling_locations "
            f"{tuple(sampling_locations.shape)} (N, Lq, M, L, P, 2), attention_weights "
            f"{tuple(attention_weights.shape)} (N, Lq, M, L, P)"
        )
    for name, tensor in (("value", value), ("sampling_locations", sampling_locations), ("attention_weights",
                                                                                          attention_weights)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if level_start_index is not None and not isinstance(level_start_index, torch.Tensor):
        starts = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
        if [_as_int(s) for s in level_start_index] != starts:
            raise ValueError(f"level_start_index {list(level_start_index)} does not match spatial_shapes ({starts})")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
    level_start_index: torch.Tensor | Sequence[int] | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Deformable-DETR multi-scale deformable attention.

    Locations map to pixels as ``grid_sample(align_corners=False, padding_mode="zeros")`` does; corners outside a map
    read zeros. Any number of levels and points and any head width; value in float32/float16/bfloat16/float64 (output
    in the value dtype, accumulation in float32, or float64 for float64 values); inputs may be non-contiguous.

    Args:
        value: ``(N, S, M, D)`` with ``S = sum_l H_l * W_l``.
        spatial_shapes: ``(L, 2)`` rows ``(H_l, W_l)``; a sequence of int pairs (preferred: no device sync, works on
            meta and under ``torch.compile``, where symbolic sizes stay symbolic) or a tensor.
        level_start_index: ``(L,)`` offsets of each level in ``S``, or None. Offsets are always derived from
            ``spatial_shapes``; a Python sequence is checked against them, a tensor is not read (no device sync).
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``, nominally in ``[0, 1]``.
        attention_weights: ``(N, Lq, M, L, P)``.
        backend: ``"auto"`` (Triton for CUDA tensors when Triton imports, PyTorch otherwise), ``"torch"`` or
            ``"triton"``; None reads ``PIIP_MSDA_BACKEND`` when the op runs (default ``"auto"``). Tracing and export
            (``torch.jit.trace``, ``torch.export``, both ONNX exporters) always use the gather formulation
            (:mod:`.msda_export`): plain ATen ops that ONNX has, valid for every batch size and level shape.

    Returns:
        ``(N, Lq, M * D)``.

    Raises:
        ValueError: inconsistent shapes, no heads or an empty head width, ``spatial_shapes`` that are not positive
            integers, non-floating inputs or an unknown backend.
    """
    shapes = _as_shape_tuples(spatial_shapes)
    _check(value, shapes, level_start_index, sampling_locations, attention_weights, backend)
    if _tracing_or_exporting():
        return msda_gather(value, shapes, sampling_locations, attention_weights)
    flat_shapes = [size for shape in shapes for size in shape]
    return torch.ops.piip_models.msda(value, flat_shapes, sampling_locations, attention_weights, backend or "")
