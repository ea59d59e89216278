"""``torch.library`` registration of multi-scale deformable attention: ``piip_models::msda`` and its backward.

The ops are opaque to ``torch.compile`` (no graph breaks; fake implementations give the output metadata), carry their
own autograd formula, and pick the backend when they run, never at import or trace time: Triton for CUDA tensors when
Triton imports, the PyTorch path otherwise. Autocast has no rule for them, so bf16/fp16 values flow through as they are
instead of being upcast.
"""

import os
from collections.abc import Sequence

import torch

from .msda_torch import msda_torch_backward, msda_torch_forward

__all__ = [
    "BACKENDS", "ENV_BACKEND", "MACS_PER_SAMPLE_CHANNEL", "msda", "msda_backward", "msda_macs", "resolve_backend"
]

BACKENDS = ("auto", "torch", "triton")
ENV_BACKEND = "PIIP_MSDA_BACKEND"

_triton_error: str | None = None
_triton_checked = False


def _triton_import_error() -> str | None:
    """Import Triton once, lazily; return why it failed, or None."""
    global _triton_checked, _triton_error
    if not _triton_checked:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # a broken install must fall back, not crash the model
            _triton_error = f"{type(exc).__name__}: {exc}"
        _triton_checked = True
    return _triton_error


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Backend that runs for tensors on ``device``.

    Args:
        backend: ``"auto"``, ``"torch"``, ``"triton"``, or ``""`` for the ``PIIP_MSDA_BACKEND`` environment variable
            (default ``"auto"``).
        device: device of the value tensor.

    Returns:
        ``"torch"`` or ``"triton"``.

    Raises:
        ValueError: unknown backend, or ``"triton"`` requested for non-CUDA tensors outside the Triton interpreter.
        RuntimeError: ``"triton"`` requested but Triton does not import.
    """
    name = (backend or os.environ.get(ENV_BACKEND, "") or "auto").strip().lower()
    if name not in BACKENDS:
        source = "backend" if backend else ENV_BACKEND
        raise ValueError(f"{source}={name!r}: expected one of {BACKENDS}")
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" and _triton_import_error() is None else "torch"
    error = _triton_import_error()
    if error is not None:
        raise RuntimeError(f"backend='triton' but Triton does not import ({error})")
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1")
    return "triton"


def _pairs(spatial_shapes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple((int(spatial_shapes[i]), int(spatial_shapes[i + 1])) for i in range(0, len(spatial_shapes), 2))


# spatial_shapes are SymInt[]: under torch.compile(dynamic=True) the level shapes stay symbolic, so a new input size
# reuses the compiled graph instead of specialising it on the shapes.
@torch.library.custom_op(
    "piip_models::msda",
    mutates_args=(),
    schema="(Tensor value, SymInt[] spatial_shapes, Tensor sampling_locations, Tensor attention_weights, str backend)"
    " -> Tensor",
)
def msda(
    value: torch.Tensor,
    spatial_shapes: Sequence[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """Forward op; ``spatial_shapes`` is the flat list ``[H_0, W_0, H_1, W_1, ...]``. See the package docstring."""
    shapes = _pairs(spatial_shapes)
    if resolve_backend(backend, value.device) == "triton":
        from .msda_triton import msda_triton_forward

        return msda_triton_forward(value, shapes, sampling_locations, attention_weights)
    return msda_torch_forward(value, shapes, sampling_locations, attention_weights)


@msda.register_fake
def _msda_fake(value, spatial_shapes, sampling_locations, attention_weights, backend):
    batch, _, heads, head_dim = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * head_dim))


@torch.library.custom_op(
    "piip_models::msda_backward",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor value, SymInt[] spatial_shapes, Tensor sampling_locations, "
    "Tensor attention_weights, str backend) -> (Tensor, Tensor, Tensor)",
)
def msda_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: Sequence[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for value, sampling locations and attention weights (contiguous, in the inputs' dtypes)."""
    shapes = _pairs(spatial_shapes)
    args = (value, shapes, sampling_locations, attention_weights)
    if resolve_backend(backend, value.device) == "torch":
        return msda_torch_backward(grad_output, *args)
    from .msda_triton import msda_triton_backward

    if not torch.are_deterministic_algorithms_enabled():
        return msda_triton_backward(grad_output, *args, value_grad=True)
    # Atomics make the Triton value gradient order-dependent; the PyTorch path's sorted per-cell gathers are not.
    _, grad_loc, grad_attn = msda_triton_backward(grad_output, *args, value_grad=False)
    grad_value, _, _ = msda_torch_backward(grad_output, *args, location_grads=False)
    return grad_value, grad_loc, grad_attn


@msda_backward.register_fake
def _msda_backward_fake(grad_output, value, spatial_shapes, sampling_locations, attention_weights, backend):
    return tuple(
        torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (value, sampling_locations, attention_weights)
    )


def _setup_context(ctx, inputs, output) -> None:
    value, spatial_shapes, sampling_locations, attention_weights, backend = inputs
    ctx.save_for_backward(value, sampling_locations, attention_weights)
    ctx.spatial_shapes, ctx.backend = spatial_shapes, backend


def _backward(ctx, grad_output):
    value, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = torch.ops.piip_models.msda_backward(
        grad_output, value, ctx.spatial_shapes, sampling_locations, attention_weights, ctx.backend
    )
    return grad_value, None, grad_loc, grad_attn, None


msda.register_autograd(_backward, setup_context=_setup_context)


# Each sample (query, head, level, point) reads 4 bilinear corners of a head_dim vector (4 multiply-adds per channel)
# and adds the result, scaled by its attention weight, to the output (1 more); the per-sample scalar work (corner
# weights, coordinates) is not counted. piip_models.counting registers it with torch.utils.flop_counter (which
# imports Triton, so it is not imported here).
MACS_PER_SAMPLE_CHANNEL = 5


def msda_macs(value_shape: Sequence[int], sampling_locations_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward: ``5 * N * Lq * M * L * P * D`` for value ``(N, S, M, D)`` and
    locations ``(N, Lq, M, L, P, 2)``."""
    batch, _, heads, head_dim = value_shape
    _, queries, _, levels, points, _ = sampling_locations_shape
    return MACS_PER_SAMPLE_CHANNEL * batch * queries * heads * levels * points * head_dim
