"""Pure-PyTorch multi-scale deformable attention: the portable path (CPU, meta, export, no Triton).

Sampling follows Deformable-DETR and ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``: a
location ``(x, y)`` in ``[0, 1]`` maps to pixel ``(x * W - 0.5, y * H - 0.5)``, values are read bilinearly, corners
outside the map read zeros and non-finite locations read nothing.

Forward: every output row ``(n, q, m)`` is one weighted ``embedding_bag`` over the ``4 * L * P`` bilinear corners of
its samples, so the ``(N, Lq, M, L * P, D)`` tensor of samples of the ``grid_sample`` formulation never exists.

Backward (recomputes the corners; the forward saves only its inputs):

* location and attention gradients come from the dot products ``<grad_out, value[corner]>`` of every corner, one
  ``sampled_addmm`` (SDDMM) per chunk;
* the value gradient is a scatter, which ATen only offers as a serial ``index_add_``. It is turned into gathers:
  samples are stable-sorted by the 2x2 cell they read, one ``embedding_bag`` per corner of the cell sums the weighted
  output gradients of all samples of each cell, and only one row per distinct cell and corner is scattered.

Every step has a fixed summation order, so the backward is deterministic on CPU and CUDA.
Work runs in chunks of query rows so that temporaries stay near ``_CHUNK_BYTES`` (and in cache).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["compute_dtype", "msda_torch_backward", "msda_torch_forward"]

# Chunk temporaries are sized like the output the op allocates anyway (which keeps the peak a small multiple of it),
# within [4 MiB, _CHUNK_BYTES]: larger chunks run fewer ops, smaller ones stay in cache.
_CHUNK_BYTES = 32 << 20
# Temporaries per sample (one location of one head) in a chunk: geometry, 4 corner indices and weights, dot products,
# sort keys and permutations; the backward adds up to 4 * D values per sample for the per-cell sums.
_SAMPLE_BYTES = 256
# Below this many value-table rows (N * S * M) the corner dot products are gathered instead of one sampled_addmm.
_MIN_SDDMM_ROWS = 16


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and coordinate dtype for a value dtype: float64 stays float64, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Corners:
    """Bilinear corners of a chunk of samples (see :meth:`_Geometry.corners`)."""

    def __init__(self, index, weight, lerp, valid, base) -> None:
        self.index = index  # (R, M, L, P, 4) value-table rows of corners (y_i, x_j) at 2 * i + j
        self.weight = weight  # (R, M, L, P, 4) attention * bilinear weight, zero for corners outside the map
        self.lerp = lerp  # 2 x (2, R, M, L, P): 1-D bilinear weights [corner][x or y]
        self.valid = valid  # 2 x (2, R, M, L, P): whether that corner coordinate is inside the map
        self.base = base  # (2, R, M, L, P) top-left corner (x, y), float, NaN replaced by -2


class _Geometry:
    """Per-level constants, shaped to broadcast against planar ``(2, R, M, L, P)`` / ``(R, M, L, P)`` tensors."""

    def __init__(
        self, shapes: Sequence[tuple[int, int]], queries: int, heads: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        levels = len(shapes)
        self.queries, self.heads, self.positions = queries, heads, sum(h * w for h, w in shapes)
        # (x, y) scale of each level, i.e. (W_l, H_l).
        self.scale = torch.tensor([[w for _, w in shapes], [h for h, _ in shapes]], dtype=dtype, device=device)
        self.scale = self.scale.view(2, 1, 1, levels, 1)
        # Value-table row of pixel (y, x) of level l, head m: (start_l + y * W_l + x) * M + m.
        self.row_stride = torch.tensor([w * heads for _, w in shapes], device=device).view(levels, 1)
        starts = torch.tensor([sum(h * w for h, w in shapes[:i]) for i in range(levels)], device=device)
        self.level_head = starts.view(levels, 1) * heads + torch.arange(heads, device=device).view(heads, 1, 1)
        # The same for 2x2 cells, indexed by their top-left corner (y, x) in [-1, H_l - 1] x [-1, W_l - 1].
        self.cells = sum((h + 1) * (w + 1) for h, w in shapes)
        self.cell_stride = torch.tensor([(w + 1) * heads for _, w in shapes], device=device).view(levels, 1)
        cell_starts = torch.tensor([sum((h + 1) * (w + 1) for h, w in shapes[:i]) for i in range(levels)],
                                   device=device)
        self.cell_level_head = (
            (cell_starts.view(levels, 1) + torch.tensor([w + 2 for _, w in shapes], device=device).view(levels, 1))
            * heads
            + torch.arange(heads, device=device).view(heads, 1, 1)
        )
        self.cell_min = torch.tensor(-1.0, dtype=dtype, device=device)
        self.zero = torch.tensor(0.0, dtype=dtype, device=device)
        self.upper = self.scale - 1

    def corners(self, loc: torch.Tensor, attn: torch.Tensor, row0: int) -> _Corners:
        """Bilinear corners of flat query rows ``row0 .. row0 + R`` (row ``n * Lq + q``).

        Args:
            loc: ``(R, M, L, P, 2)`` locations.
            attn: ``(R, M, L, P)`` attention weights, in the compute dtype.
            row0: first flat query row of the chunk.
        """
        rows, heads, levels, points, _ = loc.shape
        # out= is faster (no stack copies) but not differentiable; autograd only runs here on the export path.
        differentiable = torch.is_grad_enabled() and (loc.requires_grad or attn.requires_grad)
        if differentiable:
            pixel = loc.movedim(-1, 0) * self.scale - 0.5
        else:
            # Planar (x, y)-major copy: every later op runs on contiguous planes with per-level scalars.
            pixel = torch.mul(loc.movedim(-1, 0), self.scale, out=attn.new_empty((2, rows, heads, levels, points)))
            pixel.sub_(0.5)
        # NaN reads nothing: it becomes a base outside every map. +-inf saturates and fails the checks below too.
        base = pixel.floor().nan_to_num_(-2.0)
        frac = pixel - base
        # Corner coordinates clamped into the map; a corner is inside exactly when clamping left it unchanged.
        base1 = base + 1
        clamped = (torch.clamp(base, self.zero, self.upper), torch.clamp(base1, self.zero, self.upper))
        valid = (clamped[0] == base, clamped[1] == base1)
        lerp = (torch.where(valid[0], 1 - frac, 0), torch.where(valid[1], frac, 0))
        coord = [c.to(torch.int64) for c in clamped]
        batch = torch.arange(row0, row0 + rows, device=loc.device) // self.queries * (self.positions * self.heads)
        offset = batch.view(-1, 1, 1, 1) + self.level_head  # (R, M, L, 1): row of pixel (0, 0)
        row_y = [torch.addcmul(offset, coord[i][1], self.row_stride) for i in range(2)]
        col_x = [coord[j][0] * self.heads for j in range(2)]
        attn_y = [attn * lerp[i][1] for i in range(2)]
        index = torch.empty((rows, heads, levels, points, 4), dtype=torch.int64, device=loc.device)
        for k in range(4):
            torch.add(row_y[k // 2], col_x[k % 2], out=index[..., k])
        if differentiable:
            weight = torch.stack([attn_y[k // 2] * lerp[k % 2][0] for k in range(4)], -1)
        else:
            weight = attn.new_empty(index.shape)
            for k in range(4):
                torch.mul(attn_y[k // 2], lerp[k % 2][0], out=weight[..., k])
        return _Corners(index, weight, lerp, valid, base)

    def cell_keys(self, corners: _Corners, row0: int) -> torch.Tensor:
        """``(R, M, L, P)`` unique id of each sample's 2x2 cell."""
        rows = corners.index.shape[0]
        # Samples outside the map land in a border cell; their weights are zero and their corners match the cell's.
        x, y = torch.clamp(corners.base, self.cell_min, self.upper).to(torch.int64).unbind(0)
        batch = torch.arange(row0, row0 + rows, device=x.device) // self.queries * (self.cells * self.heads)
        offset = batch.view(-1, 1, 1, 1) + self.cell_level_head
        return torch.addcmul(offset, y, self.cell_stride).add_(x * self.heads)


def _row_chunks(rows: int, row_bytes: int, out_bytes: int, chunked: bool = True) -> Iterator[tuple[int, int]]:
    budget = min(_CHUNK_BYTES, max(out_bytes, 4 << 20))
    step = max(1, budget // max(row_bytes, 1)) if chunked else max(rows, 1)
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def _prepare(
    value: torch.Tensor, shapes: Sequence[tuple[int, int]], loc: torch.Tensor, attn: torch.Tensor
) -> tuple[torch.Tensor, _Geometry, torch.Tensor, torch.Tensor]:
    batch, positions, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = loc.shape
    dtype = compute_dtype(value.dtype)
    table = value.to(dtype).reshape(batch * positions * heads, head_dim)
    geometry = _Geometry(shapes, queries, heads, value.device, dtype)
    return (
        table,
        geometry,
        loc.reshape(batch * queries, heads, levels, points, 2),
        attn.reshape(batch * queries, heads, levels, points),
    )


def msda_torch_forward(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    chunked: bool = True,
) -> torch.Tensor:
    """Multi-scale deformable attention with one ``embedding_bag`` per query chunk.

    Differentiable by autograd (used as is for tracing and export); the custom op pairs it with
    :func:`msda_torch_backward`, which is much faster than autograd through ``embedding_bag``.

    Args:
        value: ``(N, S, M, D)``.
        spatial_shapes: ``(H_l, W_l)`` per level as Python ints, ``sum H_l * W_l == S``.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``.
        attention_weights: ``(N, Lq, M, L, P)``.
        chunked: bound temporaries by processing query chunks; ``False`` keeps exported graphs small.

    Returns:
        ``(N, Lq, M * D)`` in ``value.dtype`` (accumulated in float32, or float64 for float64 values).
    """
    batch, _, heads, head_dim = value.shape
    queries = sampling_locations.shape[1]
    samples = sampling_locations.shape[3] * sampling_locations.shape[4]
    if samples == 0:
        return value.new_zeros(batch, queries, heads * head_dim)
    table, geometry, loc, attn = _prepare(value, spatial_shapes, sampling_locations, attention_weights)
    out_bytes = batch * queries * heads * head_dim * table.element_size()
    chunks = list(_row_chunks(batch * queries, heads * samples * _SAMPLE_BYTES, out_bytes, chunked))
    out = table.new_zeros(batch * queries, heads * head_dim) if len(chunks) != 1 else None
    for start, stop in chunks:
        corners = geometry.corners(loc[start:stop], attn[start:stop].to(table.dtype), start)
        rows = F.embedding_bag(
            corners.index.view(-1, 4 * samples), table, mode="sum",
            per_sample_weights=corners.weight.view(-1, 4 * samples),
        ).view(stop - start, heads * head_dim)
        if out is None:
            out = rows
        else:
            out[start:stop] = rows
    return out.view(batch, queries, heads * head_dim).to(value.dtype)


def _corner_dots(grad_out: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``dots[i] = <grad_out[bag of i], table[index[i]]>`` (index: bags x corners), without gathering rows.

    A sampled dense-dense matmul over the CSR pattern "bag b reads rows index[b]" (one ``sampled_addmm``).
    """
    if table.shape[0] < _MIN_SDDMM_ROWS:
        # ATen's sampled_addmm coalesces repeated columns of a row for such small operands, which breaks the
        # fixed CSR pattern; a value table this small is cheap to gather.
        return (grad_out.unsqueeze(1) * table[index.view(grad_out.shape[0], -1)]).sum(-1).view(index.shape)
    bags = grad_out.shape[0]
    corners = index.numel() // max(bags, 1)
    crow = torch.arange(0, (bags + 1) * corners, corners, device=index.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            crow, index.view(-1), table.new_zeros(bags * corners), size=(bags, table.shape[0]), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern, grad_out, table.t(), beta=0.0).values().view(index.shape)


def _scatter_cells(
    grad_table: torch.Tensor, grad_out: torch.Tensor, corners: _Corners, keys: torch.Tensor, samples: int
) -> None:
    """``grad_table[corner rows] += weight * grad_out`` for every corner, as per-cell gathers (see module doc)."""
    keys, order = keys.view(-1).sort(stable=True)
    _, counts = torch.unique_consecutive(keys, return_counts=True)
    ends = counts.cumsum(0)
    starts = ends - counts
    bags = order.div(samples, rounding_mode="floor")  # grad_out row (query, head) of each sorted sample
    weight = corners.weight.view(-1, 4).index_select(0, order).t()
    # All samples of a cell share its corner rows (and which of them lie outside the map, with zero weight).
    rows = corners.index.view(-1, 4).index_select(0, order.index_select(0, starts)).t()
    for role in range(4):
        sums = F.embedding_bag(bags, grad_out, starts, mode="sum", per_sample_weights=weight[role].contiguous())
        grad_table.index_add_(0, rows[role], sums)


def msda_torch_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    location_grads: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`msda_torch_forward`, recomputing the corners chunk by chunk.

    Args:
        grad_output: ``(N, Lq, M * D)``.
        value: forward input.
        spatial_shapes: forward input.
        sampling_locations: forward input.
        attention_weights: forward input.
        location_grads: also compute the location and attention gradients (the Triton path only needs the value one).

    Returns:
        ``(grad_value, grad_sampling_locations, grad_attention_weights)`` in the dtypes of the inputs, contiguous;
        the last two are None when ``location_grads`` is False.
    """
    batch, _, heads, head_dim = value.shape
    queries = sampling_locations.shape[1]
    samples = sampling_locations.shape[3] * sampling_locations.shape[4]
    table, geometry, loc, attn = _prepare(value, spatial_shapes, sampling_locations, attention_weights)
    grad_out = grad_output.reshape(batch * queries, heads, head_dim)
    grad_table = torch.zeros_like(table)
    grad_loc = torch.zeros(loc.shape, dtype=table.dtype, device=table.device) if location_grads else None
    grad_attn = torch.zeros(attn.shape, dtype=table.dtype, device=table.device) if location_grads else None
    row_bytes = heads * samples * (_SAMPLE_BYTES + 4 * head_dim * table.element_size())
    out_bytes = grad_out.numel() * table.element_size()
    for start, stop in _row_chunks(batch * queries if samples else 0, row_bytes, out_bytes):
        attn_c = attn[start:stop].to(table.dtype)
        corners = geometry.corners(loc[start:stop], attn_c, start)
        go = grad_out[start:stop].to(table.dtype).reshape(-1, head_dim)
        if location_grads:
            dots = _corner_dots(go, table, corners.index)
            g = dots.unbind(-1)
            (x0, y0), (x1, y1) = corners.lerp[0], corners.lerp[1]
            # d out / d attn = sum_ij lerp_y[i] lerp_x[j] g_ij; d out / d frac_x = attn sum_ij lerp_y[i] slope_x[j] g_ij
            along_x = [torch.addcmul(g[j] * y0, g[2 + j], y1) for j in range(2)]  # summed over y corners
            along_y = [torch.addcmul(g[2 * i] * x0, g[2 * i + 1], x1) for i in range(2)]  # summed over x corners
            torch.addcmul(along_y[0] * y0, along_y[1], y1, out=grad_attn[start:stop])
            for axis, along in ((0, along_x), (1, along_y)):
                # The 1-D weights (1 - frac, frac) have slopes (-1, +1) where their corner is inside the map.
                inside = corners.valid[0][axis], corners.valid[1][axis]
                slope = torch.where(inside[1], along[1], 0) - torch.where(inside[0], along[0], 0)
                torch.mul(slope.mul_(attn_c), geometry.scale[axis], out=grad_loc[start:stop, ..., axis])
        _scatter_cells(grad_table, go, corners, geometry.cell_keys(corners, start), samples)
    grad_value = grad_table.view(value.shape).to(value.dtype)
    if not location_grads:
        return grad_value, None, None
    return (
        grad_value,
        grad_loc.view(sampling_locations.shape).to(sampling_locations.dtype),
        grad_attn.view(attention_weights.shape).to(attention_weights.dtype),
    )
