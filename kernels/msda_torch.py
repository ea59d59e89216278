"""Pure-PyTorch multi-scale deformable attention: the portable path (CPU, meta, no Triton).

Sampling follows Deformable-DETR and ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``: a
location ``(x, y)`` in ``[0, 1]`` maps to pixel ``(x * W - 0.5, y * H - 0.5)``, values are read bilinearly, corners
outside the map read zeros and non-finite locations read nothing.

Work runs in chunks of whole maps (some heads of one image, or whole images). Samples keep the inputs' order
``(n, Lq, m, L, P)``: locations and attention weights are read in place and gradients written in place, through
strided views of the chunk's heads. Each chunk reads a copy of its maps with a zero border of two pixels
(:class:`_Maps`), and pixel coordinates are clamped to ``[-2, W] x [-2, H]`` (NaN to -2): the four corners of every
location are rows of that table, so no validity mask exists. Corners outside the map read the border's zeros, and a
clamped location reads only border zeros, so its gradients vanish as they do for ``grid_sample``. Coordinates are
scaled and clamped per axis and level with Python scalars, and per-chunk constants are contiguous tensors, so every
elementwise op runs vectorised over long rows.

Forward: every output row ``(n, q, m)`` is one weighted ``embedding_bag`` over the ``4 * L * P`` corners of its
samples, so the ``(N, Lq, M, L * P, D)`` tensor of samples of the ``grid_sample`` formulation never exists.

Backward (recomputes the corners; the forward saves only its inputs):

* location and attention gradients come from the dot products ``<grad_out, value[corner]>`` of every corner, one
  ``sampled_addmm`` (SDDMM) per chunk;
* the value gradient is a scatter, which ATen only runs element by element. It is turned into gathers. Where
  samples share cells (at least ``_SHARED_CELLS`` samples per table row), samples are sorted by the 2x2 cell they
  read, named by its top-left table row. Per corner, one ``embedding_bag`` with a bag per table row sums the
  weighted output gradients of the samples of that row's cell; a corner lies at a fixed row offset from its cell's
  top-left row, so the four sums add up as shifted slices. Sparser chunks (few queries on a large map) sort the
  corners themselves by table row and need one ``embedding_bag``.

Every step has a fixed summation order, so the backward is deterministic on CPU and CUDA.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F

__all__ = ["compute_dtype", "msda_torch_backward", "msda_torch_forward"]

# Zero border of the padded maps: pixel coordinates clamped to [-2, W] keep both corners x0, x0 + 1 in [-2, W + 1].
_PAD = 2
# Chunks hold about _CHUNK_SAMPLES samples (one location of one head), fewer when their temporaries would exceed
# the size of the op's output (which keeps the peak a small multiple of it) within [_MIN_CHUNK_BYTES,
# _MAX_CHUNK_BYTES], four times that in the forward, whose temporaries are gone before the backward's. Per sample
# they take about _SAMPLE_BYTES (forward, backward), plus copies of the chunk's maps.
_CHUNK_SAMPLES = 3 << 16
_MIN_CHUNK_BYTES, _MAX_CHUNK_BYTES = 4 << 20, 32 << 20
_SAMPLE_BYTES = (64, 112)
# Sort keys below this bound are int16, which ATen's radix sort orders in two passes instead of four.
_SHORT_KEYS = 1 << 15
# Chunks with at least this many samples per table row sum the samples of each cell (one sort key per sample); sparser
# ones sort the corners themselves (four keys per sample, but no per-cell sums).
_SHARED_CELLS = 1.5
# float32 holds integers exactly below this bound: chunks of fewer table rows compute corner rows in float32.
_EXACT_ROWS = 1 << 24
# ATen sorts 1-D integer tensors with a radix sort from this size on (its GRAIN_SIZE), smaller ones with std::sort,
# which is slower per element: padding keys to the radix size pays off from about a sixth of it.
_RADIX_SIZE = 1 << 15


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and coordinate dtype for a value dtype: float64 stays float64, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Maps:
    """Zero-padded value maps of chunks of heads, and the geometry of their bilinear corners.

    The table of a chunk of ``n`` images and ``m`` heads is ``(n, S', m, D)``: the value layout, restricted to the
    chunk's heads, with every level's map padded by a zero border of ``_PAD`` pixels.
    """

    def __init__(self, value: torch.Tensor, shapes: Sequence[tuple[int, int]], dtype: torch.dtype,
                 queries: int, samples: int, backward: bool) -> None:
        batch, _, heads, head_dim = value.shape
        device = value.device
        self.value, self.heads = value, heads
        self.shapes = list(shapes)
        self.padded = [(h + 2 * _PAD, w + 2 * _PAD) for h, w in shapes]
        self.starts = list(accumulate((h * w for h, w in self.padded), initial=0))
        self.positions = self.starts[-1]  # S'
        # The backward's value gradient: per-cell sums where samples share cells, else sorted corners.
        self.shared_cells = queries * samples >= _SHARED_CELLS * self.positions
        self.chunks = self._plan(batch, queries * samples, head_dim * torch.finfo(dtype).bits // 8,
                                 batch * queries * heads * head_dim * value.element_size(), backward)
        self.rows = max(self.blocks(*chunk) for chunk in self.chunks) * self.positions
        self.index_dtype = torch.int32 if self.rows < 2**31 else torch.int64
        # Index arithmetic runs in floating point, faster than integer ops here.
        self.index_float = dtype if dtype == torch.float64 or self.rows < _EXACT_ROWS else torch.float64
        self.dtype = dtype
        self._buffer: torch.Tensor | None = None
        self._shape = (0, 0)
        levels = len(shapes)
        # Map widths and heights per level; as a tensor, shaped to broadcast against (2, n, Lq, m, L, P) coordinates.
        self.sizes = ([w for _, w in shapes], [h for h, _ in shapes])
        self.scale = torch.tensor(self.sizes, dtype=dtype, device=device).view(2, 1, 1, 1, levels, 1)
        self.lower = torch.tensor(-float(_PAD), dtype=dtype, device=device)
        self._origins: dict[tuple[int, int, int], torch.Tensor] = {}

    def _plan(self, batch: int, per_map: int, row_bytes: int, out_bytes: int,
              backward: bool) -> list[tuple[int, int, int, int]]:
        """``(n0, n1, m0, m1)``: images ``n0:n1`` and heads ``m0:m1`` of each chunk, either some heads of one image
        or whole images. Chunks stay below ``_EXACT_ROWS`` table rows when the maps allow it, and in the backward
        below ``_SHORT_KEYS`` rows (16-bit sort keys)."""
        heads = self.heads
        budget = min(max(out_bytes, _MIN_CHUNK_BYTES), _MAX_CHUNK_BYTES) * (1 if backward else 4)
        # Table-sized buffers: the table; in the backward also the gradient, or the four per-cell sums.
        tables = (5 if self.shared_cells else 3) if backward else 1
        map_bytes = per_map * _SAMPLE_BYTES[backward] + tables * self.positions * row_bytes
        maps = max(1, min(_CHUNK_SAMPLES // per_map, budget // map_bytes))
        maps = max(1, min(maps, (_EXACT_ROWS - 1) // self.positions))
        if backward and self.positions <= _SHORT_KEYS:
            maps = min(maps, _SHORT_KEYS // self.positions)
        if maps >= heads:
            images = maps // heads
            return [(n, min(n + images, batch), 0, heads) for n in range(0, batch, images)]
        parts = -(-heads // maps)
        bounds = [i * heads // parts for i in range(parts + 1)]
        return [(n, n + 1, m0, m1) for n in range(batch) for m0, m1 in zip(bounds[:-1], bounds[1:])]

    @staticmethod
    def blocks(n0: int, n1: int, m0: int, m1: int) -> int:
        return (n1 - n0) * (m1 - m0)

    def _levels(self, padded: torch.Tensor) -> Iterator[torch.Tensor]:
        """Per level, the maps of ``padded`` ``(n, S', m, D)`` as ``(n, H + 2 * _PAD, W + 2 * _PAD, m, D)``."""
        images, _, heads, head_dim = padded.shape
        for (hp, wp), start in zip(self.padded, self.starts):
            yield padded[:, start:start + hp * wp].view(images, hp, wp, heads, head_dim)

    def _interiors(self, padded: torch.Tensor, natural: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per level, the interior of the maps of ``padded`` ``(n, S', m, D)`` and the matching view of ``natural``
        ``(n, S, m, D)``, both ``(n, H, W, m, D)``."""
        images, _, heads, head_dim = natural.shape
        start = 0
        for (h, w), maps in zip(self.shapes, self._levels(padded)):
            yield maps[:, _PAD:_PAD + h, _PAD:_PAD + w], natural[:, start:start + h * w].view(
                images, h, w, heads, head_dim)
            start += h * w

    def table(self, n0: int, n1: int, m0: int, m1: int) -> torch.Tensor:
        """Padded maps of images ``n0:n1``, heads ``m0:m1``: ``(n * S' * m, D)``."""
        rows, head_dim = self.blocks(n0, n1, m0, m1) * self.positions, self.value.shape[-1]
        shape = (n1 - n0, m1 - m0)
        if torch.is_grad_enabled() and self.value.requires_grad:  # autograd needs a fresh table per chunk
            table, fresh = self.value.new_empty((rows, head_dim), dtype=self.dtype), True
        else:
            # One table for all chunks: their interiors overwrite each other and the borders stay zero, as long as
            # the chunks have the same shape.
            fresh = self._buffer is None or self._shape != shape
            if self._buffer is None:
                self._buffer = self.value.new_empty((self.rows, head_dim), dtype=self.dtype)
            self._shape = shape
            table = self._buffer[:rows]
        padded = table.view(n1 - n0, self.positions, m1 - m0, head_dim)
        if fresh:  # only the borders: the interiors are overwritten
            for maps in self._levels(padded):
                rows_inside = maps[:, _PAD:-_PAD]
                for border in (maps[:, :_PAD], maps[:, -_PAD:], rows_inside[:, :, :_PAD], rows_inside[:, :, -_PAD:]):
                    border.zero_()
        for inner, source in self._interiors(padded, self.value[n0:n1, :, m0:m1]):
            inner.copy_(source)
        return table

    def unpad(self, natural: torch.Tensor, padded: torch.Tensor) -> None:
        """Copy the interior of the maps of ``padded`` ``(n, S', m, D)`` into ``natural`` ``(n, S, m, D)``."""
        for inner, target in self._interiors(padded, natural):
            target.copy_(inner)

    def cells(self, loc: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear cells of the samples of a chunk.

        Args:
            loc: ``(n, Lq, m, L, P, 2)`` locations of the chunk's maps (a view of the input, read once).
            dtype: coordinate dtype (the table dtype).

        Returns:
            ``cell`` ``(n, Lq, m, L, P)``: table row of the top-left corner of each sample's 2x2 cell;
            ``frac`` ``(2, n, Lq, m, L, P)``: ``(x, y)`` position inside the cell.
        """
        heads = loc.shape[2]
        device = loc.device
        # Half locations are upcast first: multiplying them by the map size in their own dtype would round the pixel
        # coordinates (to 0.4 px at W ~ 100 in bfloat16).
        xy = loc.movedim(-1, 0).to(dtype)
        # out= and in-place ops skip allocations but are not differentiable; autograd only runs here when
        # msda_torch_forward is differentiated directly (the op has its own backward).
        if torch.is_grad_enabled() and loc.requires_grad:
            pixel = torch.nan_to_num(xy * self.scale - 0.5, nan=-float(_PAD))
            pixel = torch.clamp(pixel, self.lower, self.scale)
            base = pixel.floor()
            frac = pixel - base
        else:
            # Per axis and level with Python scalars: ATen vectorises these, not ops broadcasting a scale tensor.
            pixel = torch.empty(xy.shape, dtype=dtype, device=device)
            for axis, sizes in enumerate(self.sizes):
                for level, size in enumerate(sizes):
                    plane = pixel[axis, ..., level, :]
                    torch.mul(xy[axis, ..., level, :], size, out=plane)
                    plane.sub_(0.5).nan_to_num_(nan=-float(_PAD)).clamp_(-float(_PAD), size)
            base = pixel.floor()
            frac = pixel.sub_(base)
        cell = torch.add(self._origin(xy.shape[1:]), base[0], alpha=heads)
        for level, (_, wp) in enumerate(self.padded):
            cell[..., level, :].add_(base[1, ..., level, :], alpha=wp * heads)
        return cell.to(self.index_dtype), frac

    def _origin(self, shape: torch.Size) -> torch.Tensor:
        """Table row of pixel (0, 0) of the map and level of every sample of chunks of ``shape`` ``(n, Lq, m, L, P)``,
        contiguous (ops broadcasting a small tensor over long rows do not vectorise); cached per chunk shape."""
        key = tuple(shape[:3])
        if key not in self._origins:
            images, _, heads = key
            # Row of pixel (0, 0) of image i, head j, level l: (i * S' + start_l + _PAD * (W'_l + 1)) * m + j.
            level = [start + _PAD * (wp + 1) for start, (_, wp) in zip(self.starts, self.padded)]
            level = torch.tensor(level, dtype=self.index_float, device=self.value.device).view(-1, 1)
            image = torch.arange(images, dtype=self.index_float, device=level.device).view(-1, 1, 1, 1, 1)
            head = torch.arange(heads, dtype=self.index_float, device=level.device).view(-1, 1, 1)
            self._origins[key] = ((image * self.positions + level).mul_(heads) + head).expand(shape).contiguous()
        return self._origins[key]

    def corner_rows(self, cell: torch.Tensor) -> torch.Tensor:
        """Table rows ``(..., 4)`` of the corners ``(y_i, x_j)`` at ``2 * i + j`` of the cells ``(n, Lq, m, L, P)``."""
        heads = cell.shape[2]
        index = cell.new_empty((*cell.shape, 4))
        index[..., 0] = cell
        torch.add(cell, heads, out=index[..., 1])
        for level, (_, wp) in enumerate(self.padded):
            torch.add(cell[..., level, :], wp * heads, out=index[..., level, :, 2])
        torch.add(index[..., 2], heads, out=index[..., 3])
        return index

    def add_corner_sums(self, sums: Sequence[torch.Tensor], images: int, heads: int) -> torch.Tensor:
        """Gradient ``(rows, D)`` of a chunk's table from four per-cell sums ``(rows, D)``: ``sums[k][r]`` belongs to
        corner ``k`` of the cell whose top-left corner is row ``r``, and corners are fixed row offsets from it.
        Accumulates into ``sums[0]``."""
        blocks = [corner.view(images, self.positions * heads, -1) for corner in sums]
        for start, end, (_, wp) in zip(self.starts, self.starts[1:], self.padded):
            start, end = start * heads, end * heads
            # No cell has its top-left corner in a block's last padded row or column: sums never leave their block.
            for corner, step in enumerate((1, wp, wp + 1), 1):
                step *= heads
                blocks[0][:, start + step:end] += blocks[corner][:, start:end - step]
        return sums[0]


def _bilinear_weights(attn: torch.Tensor, frac: Sequence[torch.Tensor], planar: bool = False) -> torch.Tensor:
    """Attention times bilinear weight of the corners ``(y_i, x_j)`` at ``2 * i + j``: ``(..., 4)``, or ``(4, ...)``
    when ``planar``, for ``attn`` ``(...)`` and the positions ``(x, y)`` inside the cell, each ``(...)``."""
    fx, fy = frac
    if torch.is_grad_enabled() and any(t.requires_grad for t in (attn, fx, fy)):
        weight_y = (attn - attn * fy, attn * fy)
        return torch.stack([w for wy in weight_y for w in (wy - wy * fx, wy * fx)], 0 if planar else -1)
    weight = attn.new_empty((4, *attn.shape)) if planar else attn.new_empty((*attn.shape, 4)).movedim(-1, 0)
    # attn * (1 - f) as attn - attn * f: the same value to an ulp.
    weight_y1 = torch.mul(attn, fy)
    for i, weight_y in enumerate((attn - weight_y1, weight_y1)):
        torch.addcmul(weight_y, weight_y, fx, value=-1, out=weight[2 * i])
        torch.mul(weight_y, fx, out=weight[2 * i + 1])
    return weight if planar else weight.movedim(0, -1)


def msda_torch_forward(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with one ``embedding_bag`` per chunk of maps.

    Differentiable by autograd; the custom op pairs it with :func:`msda_torch_backward`, which is much faster than
    autograd through ``embedding_bag``.

    Args:
        value: ``(N, S, M, D)``.
        spatial_shapes: ``(H_l, W_l)`` per level as Python ints, ``sum H_l * W_l == S``.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``.
        attention_weights: ``(N, Lq, M, L, P)``.

    Returns:
        ``(N, Lq, M * D)`` in ``value.dtype`` (accumulated in float32, or float64 for float64 values).
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    samples = levels * points
    if samples == 0 or batch * queries == 0:
        return value.new_zeros(batch, queries, heads * head_dim)
    dtype = compute_dtype(value.dtype)
    maps = _Maps(value, spatial_shapes, dtype, queries, samples, backward=False)
    out = torch.empty((batch, queries, heads, head_dim), dtype=dtype, device=value.device)
    for n0, n1, m0, m1 in maps.chunks:
        cell, frac = maps.cells(sampling_locations[n0:n1, :, m0:m1], dtype)
        weight = _bilinear_weights(attention_weights[n0:n1, :, m0:m1].to(dtype), frac)
        rows = F.embedding_bag(maps.corner_rows(cell).view(-1, 4 * samples), maps.table(n0, n1, m0, m1), mode="sum",
                               per_sample_weights=weight.view(-1, 4 * samples))
        out[n0:n1, :, m0:m1] = rows.view(n1 - n0, queries, m1 - m0, head_dim)
    return out.view(batch, queries, heads * head_dim).to(value.dtype)


def _corner_dots(grad_out: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``dots[b, i] = <grad_out[b], table[index[b, i]]>`` without gathering rows.

    A sampled dense-dense matmul over the CSR pattern "bag b reads rows index[b]" (one ``sampled_addmm``). The
    padded table has at least 25 rows, above the sizes at which ATen's kernel coalesces repeated columns.
    """
    bags, corners = index.shape
    crow = torch.arange(0, (bags + 1) * corners, corners, dtype=index.dtype, device=index.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        # Zeros, not empty: the kernel adds beta * value even for beta 0, and NaN * 0 is NaN.
        pattern = torch.sparse_csr_tensor(crow, index.reshape(-1), table.new_zeros(bags * corners),
                                          size=(bags, table.shape[0]), check_invariants=False)
        # In place (out= its input): a new result would first copy the pattern's column indices and values.
        torch.sparse.sampled_addmm(pattern, grad_out, table.t(), beta=0.0, out=pattern)
    return pattern.values().view(index.shape)


def _location_grads(
    grad_out: torch.Tensor, table: torch.Tensor, index: torch.Tensor, frac: torch.Tensor, attn: torch.Tensor,
    sizes: tuple[Sequence[int], Sequence[int]], grad_loc: torch.Tensor, grad_attn: torch.Tensor,
) -> None:
    """Location and attention gradients of the bilinear samples ``(n, Lq, m, L, P)`` of a chunk, written into the
    views ``grad_loc`` ``(..., 2)`` and ``grad_attn`` of the outputs.

    With ``d_ij = <grad_out, value[corner (y_i, x_j)]>`` and the 1-D weights ``(1 - f, f)``:
    ``d attn = sum_ij ly_i lx_j d_ij`` and, for the location ``x``, ``d x = attn * W * sum_i ly_i (d_i1 - d_i0)``
    (likewise for ``y``), with ``sizes`` the map widths and heights ``W``, ``H`` per level.
    """
    fx, fy = frac
    dots = _corner_dots(grad_out, table, index.view(grad_out.shape[0], -1)).view(index.shape)
    d00, d01, d10, d11 = dots.unbind(-1)
    slope0, slope1 = d01 - d00, d11 - d10  # along x, on the y0 and y1 edges
    edge0, edge1 = torch.addcmul(d00, slope0, fx), torch.addcmul(d10, slope1, fx)  # interpolated along x
    slope_y = edge1.sub_(edge0)
    torch.addcmul(edge0, slope_y, fy, out=grad_attn)
    slope_x = torch.addcmul(slope0, slope1.sub_(slope0), fy)
    for axis, (slope, axis_sizes) in enumerate(zip((slope_x.mul_(attn), slope_y.mul_(attn)), sizes)):
        for level, size in enumerate(axis_sizes):
            torch.mul(slope[..., level, :], size, out=grad_loc[..., level, :, axis])


def _sort_cells(keys: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of keys in ``[0, rows)``: 16-bit keys when they fit, padded to the radix-sort size."""
    short = rows <= _SHORT_KEYS
    keys = keys.to(torch.int16 if short else keys.dtype)
    total = keys.numel()
    if keys.device.type == "cpu" and _RADIX_SIZE // 6 <= total < _RADIX_SIZE:
        keys = torch.cat((keys, keys.new_full((_RADIX_SIZE - total,), torch.iinfo(keys.dtype).max)))
    keys, order = keys.sort(stable=True)
    return keys[:total], order[:total]


def _row_starts(keys: torch.Tensor, rows: int) -> torch.Tensor:
    """Position of the first key ``>= r`` in the sorted ``keys``, for every row ``r`` in ``[0, rows)``."""
    if keys.device.type == "cpu":  # counting is several times faster than binary searches here
        counts = torch.bincount(keys, minlength=rows)
        return counts.cumsum(0).sub_(counts)
    # On CUDA bincount syncs to size its output and is flagged nondeterministic; searchsorted is neither.
    return torch.searchsorted(keys, torch.arange(rows, dtype=keys.dtype, device=keys.device))


def _floor_divide_(t: torch.Tensor, divisor: int) -> torch.Tensor:
    """``t // divisor`` in place for non-negative integers: a shift for powers of two, which vectorises where integer
    division does not."""
    if divisor & (divisor - 1) == 0:
        return t.bitwise_right_shift_(divisor.bit_length() - 1)
    return t.div_(divisor, rounding_mode="floor")


def _scatter_cells(
    grad_out: torch.Tensor, cell: torch.Tensor, attn: torch.Tensor, frac: torch.Tensor, samples: int, rows: int
) -> list[torch.Tensor]:
    """``sums[k][c] = sum weight_k * grad_out[sample // samples]`` over the samples whose top-left corner is table row
    ``c``, with gathers only: samples sorted by cell, one ``embedding_bag`` per corner with a bag per table row.

    Args:
        grad_out: ``(bags, D)``.
        cell: ``(bags * samples,)`` table row of each sample's top-left corner, bag-major.
        attn: ``(bags * samples,)`` attention weights.
        frac: ``(2, bags * samples)`` position inside the cell.
        samples: samples per bag (``L * P``).
        rows: table rows of the chunk.

    Returns:
        Four ``(rows, D)`` per-cell sums, one per corner (zero for rows that are no sample's top-left corner).
    """
    keys, order = _sort_cells(cell, rows)
    starts = _row_starts(keys, rows)
    # Weights in sorted order from sorted inputs: gathers of three values per sample instead of four weights.
    sorted_frac = [plane.index_select(0, order) for plane in frac]
    weight = _bilinear_weights(attn.index_select(0, order), sorted_frac, planar=True)
    bag = _floor_divide_(order, samples)
    return [F.embedding_bag(bag, grad_out, starts, mode="sum", per_sample_weights=w) for w in weight]


def _scatter_corners(
    grad_out: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, samples: int, rows: int
) -> torch.Tensor:
    """``grad[index] += weight * grad_out[sample // samples]`` for every corner of a chunk whose samples mostly read
    cells of their own: corners sorted by table row, one ``embedding_bag`` with a bag per row.

    Args:
        grad_out: ``(bags, D)``.
        index: ``(bags * samples * 4,)`` chunk table rows of the samples' corners, bag-major.
        weight: ``(bags * samples * 4,)`` their weights.
        samples: samples per bag (``L * P``).
        rows: table rows of the chunk.

    Returns:
        ``(rows, D)`` gradient of the chunk's table rows.
    """
    keys, order = _sort_cells(index, rows)
    sorted_weight = weight.index_select(0, order)  # before the order turns into bag numbers, in place
    return F.embedding_bag(_floor_divide_(order, 4 * samples), grad_out, _row_starts(keys, rows), mode="sum",
                           per_sample_weights=sorted_weight)


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
    _, queries, _, levels, points, _ = sampling_locations.shape
    samples = levels * points
    dtype = compute_dtype(value.dtype)
    device = value.device
    work = samples and batch * queries
    new = torch.empty if work else torch.zeros  # every element is written when there is work
    grad_value = new(value.shape, dtype=dtype, device=device)
    grad_loc = new(sampling_locations.shape, dtype=dtype, device=device) if location_grads else None
    grad_attn = new(attention_weights.shape, dtype=dtype, device=device) if location_grads else None
    if work:
        maps = _Maps(value, spatial_shapes, dtype, queries, samples, backward=True)
        grad_out = grad_output.view(batch, queries, heads, head_dim)
        for n0, n1, m0, m1 in maps.chunks:
            attn = attention_weights[n0:n1, :, m0:m1].to(dtype)
            # Contiguous rows: the sparse kernels index them by bag.
            go = grad_out[n0:n1, :, m0:m1].to(dtype).contiguous().view(-1, head_dim)
            table = maps.table(n0, n1, m0, m1)
            cell, frac = maps.cells(sampling_locations[n0:n1, :, m0:m1], dtype)
            index = maps.corner_rows(cell) if location_grads or not maps.shared_cells else None
            if location_grads:
                _location_grads(go, table, index, frac, attn, maps.sizes, grad_loc[n0:n1, :, m0:m1],
                                grad_attn[n0:n1, :, m0:m1])
            if maps.shared_cells:
                sums = _scatter_cells(go, cell.view(-1), attn.reshape(-1), frac.view(2, -1), samples, table.shape[0])
                grad = maps.add_corner_sums(sums, n1 - n0, m1 - m0)
            else:
                weight = _bilinear_weights(attn, frac)
                grad = _scatter_corners(go, index.view(-1), weight.view(-1), samples, table.shape[0])
            maps.unpad(grad_value[n0:n1, :, m0:m1], grad.view(n1 - n0, maps.positions, m1 - m0, head_dim))
    grad_value = grad_value.to(value.dtype)
    if not location_grads:
        return grad_value, None, None
    return grad_value, grad_loc.to(sampling_locations.dtype), grad_attn.to(attention_weights.dtype)
