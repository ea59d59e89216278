"""Triton kernels for multi-scale deformable attention (forward and backward).

Imported lazily by :mod:`.op` the first time a Triton kernel runs, so that importing the package never imports Triton
or touches CUDA, and so that ``TRITON_INTERPRET=1`` set by a test before that point is honoured.

Layout: one program covers ``BLOCK_R`` flat ``(query, head)`` rows of one batch element and the whole head width
(``BLOCK_D`` = next power of two of ``D``, masked), so small heads (6, 12, 24 ...) still fill a tile, and the location
and attention gradients reduce inside the program with plain stores. Coordinates and accumulation are float32 (float64
for float64 values); every offset that scales with the problem size is int64; inputs are read through their strides.
The backward recomputes the samples (the forward saves nothing) and scatters the value gradient with relaxed
``atomic_add`` into a float32 (float64) buffer.
"""

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .msda_torch import compute_dtype

__all__ = ["msda_triton_backward", "msda_triton_forward"]


# Only builtins (tl.full, tl.reduce ...) and this module's own @triton.jit helpers are used, never the @jit helpers of
# triton.language.standard (tl.zeros, tl.sum): those are bound to the interpreter mode at the time Triton was first
# imported, and TRITON_INTERPRET=1 may be set after that (timm imports Triton).


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _corners(loc_row, attn_row, lvl, pt, shapes_ptr, s_l, s_p, s_c, a_l, a_p, row_mask, COMPUTE: tl.constexpr):
    """Geometry of sample (lvl, pt) for a block of rows: the four corner pixel indices, masks and weights."""
    height = tl.load(shapes_ptr + 3 * lvl)
    width = tl.load(shapes_ptr + 3 * lvl + 1)
    start = tl.load(shapes_ptr + 3 * lvl + 2)
    loc_off = lvl * s_l + pt * s_p
    x = tl.load(loc_row + loc_off, mask=row_mask, other=0.0).to(COMPUTE)
    y = tl.load(loc_row + loc_off + s_c, mask=row_mask, other=0.0).to(COMPUTE)
    attn = tl.load(attn_row + lvl * a_l + pt * a_p, mask=row_mask, other=0.0).to(COMPUTE)
    w_im = x * width - 0.5
    h_im = y * height - 0.5
    # Same support as grid_sample; NaN fails every comparison, and zeroing keeps the float->int casts defined.
    inside = row_mask & (h_im >= -1) & (h_im < height) & (w_im >= -1) & (w_im < width)
    h_im = tl.where(inside, h_im, 0.0)
    w_im = tl.where(inside, w_im, 0.0)
    h_low = tl.floor(h_im)
    w_low = tl.floor(w_im)
    lh = h_im - h_low
    lw = w_im - w_low
    h0 = h_low.to(tl.int64)
    w0 = w_low.to(tl.int64)
    y0_ok = inside & (h0 >= 0)
    y1_ok = inside & (h0 < height - 1)
    x0_ok = inside & (w0 >= 0)
    x1_ok = inside & (w0 < width - 1)
    pix00 = start + h0 * width + w0
    return (pix00, pix00 + 1, pix00 + width, pix00 + width + 1, y0_ok & x0_ok, y0_ok & x1_ok, y1_ok & x0_ok,
            y1_ok & x1_ok, lh, lw, attn, width, height)


@triton.jit
def _program_rows(
    value_ptr, loc_ptr, attn_ptr, Q, M, D, v_b, v_m, v_d, s_b, s_q, s_m, a_b, a_q, a_m,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """This program's (query, head) rows of image ``b`` and their value / location / attention row pointers."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < Q * M
    q = rows // M
    m = rows % M
    d = tl.arange(0, BLOCK_D)
    d_mask = d[None, :] < D
    value_row = value_ptr + b * v_b + m * v_m
    loc_row = loc_ptr + b * s_b + q * s_q + m * s_m
    attn_row = attn_ptr + b * a_b + q * a_q + m * a_m
    d_off = d[None, :] * v_d
    return b, rows, row_mask, q, m, d, d_mask, value_row, loc_row, attn_row, d_off


@triton.jit
def _msda_fwd_kernel(
    value_ptr, shapes_ptr, loc_ptr, attn_ptr, out_ptr,
    Q, M, D,
    v_b, v_s, v_m, v_d,
    s_b, s_q, s_m, s_l, s_p, s_c,
    a_b, a_q, a_m, a_l, a_p,
    L: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr,
):
    b, rows, row_mask, q, m, d, d_mask, value_row, loc_row, attn_row, d_off = _program_rows(
        value_ptr, loc_ptr, attn_ptr, Q, M, D, v_b, v_m, v_d, s_b, s_q, s_m, a_b, a_q, a_m, BLOCK_R, BLOCK_D
    )
    acc = tl.full([BLOCK_R, BLOCK_D], 0.0, dtype=COMPUTE)
    for lvl in tl.static_range(L):
        for pt in tl.static_range(P):
            p00, p01, p10, p11, m00, m01, m10, m11, lh, lw, attn, _, _ = _corners(
                loc_row, attn_row, lvl, pt, shapes_ptr, s_l, s_p, s_c, a_l, a_p, row_mask, COMPUTE
            )
            # Issue the four gathers before consuming any, to keep them in flight together.
            v00 = tl.load(value_row[:, None] + p00[:, None] * v_s + d_off, mask=m00[:, None] & d_mask, other=0.0)
            v01 = tl.load(value_row[:, None] + p01[:, None] * v_s + d_off, mask=m01[:, None] & d_mask, other=0.0)
            v10 = tl.load(value_row[:, None] + p10[:, None] * v_s + d_off, mask=m10[:, None] & d_mask, other=0.0)
            v11 = tl.load(value_row[:, None] + p11[:, None] * v_s + d_off, mask=m11[:, None] & d_mask, other=0.0)
            hh = 1.0 - lh
            hw = 1.0 - lw
            acc += (attn * hh * hw)[:, None] * v00.to(COMPUTE)
            acc += (attn * hh * lw)[:, None] * v01.to(COMPUTE)
            acc += (attn * lh * hw)[:, None] * v10.to(COMPUTE)
            acc += (attn * lh * lw)[:, None] * v11.to(COMPUTE)
    out = out_ptr + (b * Q * M + rows)[:, None] * D + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask)


@triton.jit
def _msda_bwd_kernel(
    value_ptr, shapes_ptr, loc_ptr, attn_ptr, grad_out_ptr, grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    Q, S, M, D,
    v_b, v_s, v_m, v_d,
    s_b, s_q, s_m, s_l, s_p, s_c,
    a_b, a_q, a_m, a_l, a_p,
    g_b, g_q, g_c,
    L: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr,
    VALUE_GRAD: tl.constexpr,
):
    b, rows, row_mask, q, m, d, d_mask, value_row, loc_row, attn_row, d_off = _program_rows(
        value_ptr, loc_ptr, attn_ptr, Q, M, D, v_b, v_m, v_d, s_b, s_q, s_m, a_b, a_q, a_m, BLOCK_R, BLOCK_D
    )
    grad_out = tl.load(
        grad_out_ptr + b * g_b + q[:, None] * g_q + (m[:, None] * D + d[None, :]) * g_c,
        mask=row_mask[:, None] & d_mask, other=0.0,
    ).to(COMPUTE)
    # grad_value is a contiguous (N, S, M, D) buffer; grad_loc / grad_attn contiguous (N, Lq, M, L, P[, 2]).
    grad_value_row = grad_value_ptr + ((b * S * M + m) * D)[:, None] + d[None, :]
    sample = (b * Q * M + rows) * (L * P)
    for lvl in tl.static_range(L):
        for pt in tl.static_range(P):
            p00, p01, p10, p11, m00, m01, m10, m11, lh, lw, attn, width, height = _corners(
                loc_row, attn_row, lvl, pt, shapes_ptr, s_l, s_p, s_c, a_l, a_p, row_mask, COMPUTE
            )
            v00 = tl.load(value_row[:, None] + p00[:, None] * v_s + d_off, mask=m00[:, None] & d_mask, other=0.0)
            v01 = tl.load(value_row[:, None] + p01[:, None] * v_s + d_off, mask=m01[:, None] & d_mask, other=0.0)
            v10 = tl.load(value_row[:, None] + p10[:, None] * v_s + d_off, mask=m10[:, None] & d_mask, other=0.0)
            v11 = tl.load(value_row[:, None] + p11[:, None] * v_s + d_off, mask=m11[:, None] & d_mask, other=0.0)
            # Corners outside the map load zeros, so their dot products vanish without extra masking.
            g00 = tl.reduce(grad_out * v00.to(COMPUTE), 1, _add)
            g01 = tl.reduce(grad_out * v01.to(COMPUTE), 1, _add)
            g10 = tl.reduce(grad_out * v10.to(COMPUTE), 1, _add)
            g11 = tl.reduce(grad_out * v11.to(COMPUTE), 1, _add)
            hh = 1.0 - lh
            hw = 1.0 - lw
            grad_attn = hh * hw * g00 + hh * lw * g01 + lh * hw * g10 + lh * lw * g11
            grad_w = attn * (hh * (g01 - g00) + lh * (g11 - g10)) * width
            grad_h = attn * (hw * (g10 - g00) + lw * (g11 - g01)) * height
            out = sample + (lvl * P + pt)
            tl.store(grad_attn_ptr + out, grad_attn, mask=row_mask)
            tl.store(grad_loc_ptr + 2 * out, grad_w, mask=row_mask)
            tl.store(grad_loc_ptr + 2 * out + 1, grad_h, mask=row_mask)
            if VALUE_GRAD:
                scaled = attn[:, None] * grad_out
                # Relaxed ordering: these are pure accumulations, no fence needed.
                tl.atomic_add(grad_value_row + p00[:, None] * (M * D), (hh * hw)[:, None] * scaled,
                              mask=m00[:, None] & d_mask, sem="relaxed")
                tl.atomic_add(grad_value_row + p01[:, None] * (M * D), (hh * lw)[:, None] * scaled,
                              mask=m01[:, None] & d_mask, sem="relaxed")
                tl.atomic_add(grad_value_row + p10[:, None] * (M * D), (lh * hw)[:, None] * scaled,
                              mask=m10[:, None] & d_mask, sem="relaxed")
                tl.atomic_add(grad_value_row + p11[:, None] * (M * D), (lh * lw)[:, None] * scaled,
                              mask=m11[:, None] & d_mask, sem="relaxed")


def _launch_config(rows: int, head_dim: int) -> tuple[int, int, int]:
    """Heuristic tile (untuned: no GPU was available): about 2K elements per corner tile."""
    block_d = triton.next_power_of_2(head_dim)
    block_r = max(1, min(128, 2048 // block_d, triton.next_power_of_2(rows)))
    return block_r, block_d, 4


def _shape_table(shapes: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
    rows, start = [], 0
    for h, w in shapes:
        rows.append((h, w, start))
        start += h * w
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _dtype_flag(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def msda_triton_forward(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Forward with the Triton kernel; same contract as :func:`.msda_torch.msda_torch_forward`."""
    batch, _, heads, head_dim = value.shape
    queries = sampling_locations.shape[1]
    levels, points = sampling_locations.shape[3:5]
    out = value.new_empty((batch, queries, heads * head_dim))
    if out.numel() == 0:
        return out
    if levels * points == 0:
        return out.zero_()
    block_r, block_d, warps = _launch_config(queries * heads, head_dim)
    grid = (triton.cdiv(queries * heads, block_r), batch)
    with torch.cuda.device(value.device) if value.is_cuda else nullcontext():
        _msda_fwd_kernel[grid](
            value, _shape_table(spatial_shapes, value.device), sampling_locations, attention_weights, out,
            queries, heads, head_dim,
            *value.stride(), *sampling_locations.stride(), *attention_weights.stride(),
            L=levels, P=points, BLOCK_R=block_r, BLOCK_D=block_d, COMPUTE=_dtype_flag(compute_dtype(value.dtype)),
            num_warps=warps,
        )
    return out


def msda_triton_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    value_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients with the Triton kernel; ``value_grad=False`` skips the (atomic) value gradient and returns None."""
    batch, positions, heads, head_dim = value.shape
    queries = sampling_locations.shape[1]
    levels, points = sampling_locations.shape[3:5]
    dtype = compute_dtype(value.dtype)
    grad_value = torch.zeros(value.shape, dtype=dtype, device=value.device) if value_grad else None
    grad_loc = torch.zeros(sampling_locations.shape, dtype=dtype, device=value.device)
    grad_attn = torch.zeros(attention_weights.shape, dtype=dtype, device=value.device)
    if grad_output.numel() and levels * points:
        block_r, block_d, warps = _launch_config(queries * heads, head_dim)
        grid = (triton.cdiv(queries * heads, block_r), batch)
        with torch.cuda.device(value.device) if value.is_cuda else nullcontext():
            _msda_bwd_kernel[grid](
                value, _shape_table(spatial_shapes, value.device), sampling_locations, attention_weights,
                grad_output, grad_value if value_grad else grad_attn, grad_loc, grad_attn,
                queries, positions, heads, head_dim,
                *value.stride(), *sampling_locations.stride(), *attention_weights.stride(), *grad_output.stride(),
                L=levels, P=points, BLOCK_R=block_r, BLOCK_D=block_d, COMPUTE=_dtype_flag(dtype),
                VALUE_GRAD=value_grad, num_warps=warps,
            )
    return (
        grad_value.to(value.dtype) if value_grad else None,
        grad_loc.to(sampling_locations.dtype),
        grad_attn.to(attention_weights.dtype),
    )
