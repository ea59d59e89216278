"""Triton kernels for multi-scale deformable attention (forward and backward).

Imported lazily by :mod:`.op` the first time a Triton kernel runs, so that importing the package never imports Triton
or touches CUDA, and so that ``TRITON_INTERPRET=1`` set by a test before that point is honoured.

Notation (Deformable-DETR): image ``b``, query ``q``, head ``m``, level ``l`` with a ``H_l x W_l`` map starting at
row ``start_l`` of the flattened positions, point ``p``, channel ``d``. A sample reads the location
``(x, y) = loc[b, q, m, l, p]`` at the pixel ``(u, v) = (x * W_l - 0.5, y * H_l - 0.5)`` (``grid_sample`` with
``align_corners=False``); its four corners ``c = (i, j)``, ``i, j in {0, 1}``, are the pixels
``(floor(v) + i, floor(u) + j)``, at the flat positions ``pixel_c`` (``start_l`` + row * ``W_l`` + column), with the
1-D weights ``wy_c = i ? fv : 1 - fv`` and ``wx_c = j ? fu : 1 - fu``
(``fu``, ``fv`` the fractional parts). Corners outside the map read zero; samples with ``u`` or ``v`` outside
``[-1, W_l)`` / ``[-1, H_l)``, or not finite, read nothing. With ``a = attn[b, q, m, l, p]``:

* forward: ``out[b, q, m, :] = sum_{l, p} a * sum_c wy_c * wx_c * value[b, pixel_c, m, :]``;
* backward, with ``g = grad_out[b, q, m, :]`` and the corner dot products ``g_c = <g, value[b, pixel_c, m, :]>``:
  ``grad_attn = sum_c wy_c * wx_c * g_c``, ``grad_x = a * W_l * sum_c wy_c * sx_c * g_c`` and
  ``grad_y = a * H_l * sum_c sy_c * wx_c * g_c`` (``sx_c = +1`` for ``j = 1``, ``-1`` for ``j = 0``; ``sy_c``
  likewise with ``i``), and ``grad_value[b, pixel_c, m, :] += a * wy_c * wx_c * g`` over every sample.

Layout: a program covers ``BLOCK_R`` flat ``(query, head)`` rows of one image and the whole head width (``BLOCK_D``,
the next power of two of ``HEAD_DIM``, masked), so small heads (6, 12, 24 ...) still fill a tile and the location and
attention gradients reduce inside the program, with plain stores. A sample's four corners are four
``[BLOCK_R, BLOCK_D]`` gathers whose channels sit in the same threads, so the bilinear sums need no shuffles. Levels
and points are loops with run-time trip counts: registers do not grow with them, and one compiled kernel serves
every level and point count. Coordinates and accumulation are float32 (float64 for float64 values) whatever the input
dtypes; outputs are stored in the inputs' dtypes, and the value gradient is accumulated with relaxed atomics in a
float32 (float64) buffer. Offsets inside an image are int32 (the wrappers check that they fit), image offsets int64.

Launch: :func:`launch_config` is the one heuristic (rows per program from the head width, four warps), chosen from the
compile table of :mod:`.compile_gate`. On CUDA the kernels are autotuned over :func:`candidate_configs` (the
heuristic's config and half its rows), once per head dim, dtypes and level/point counts; ``PIIP_MSDA_AUTOTUNE=0``
launches the heuristic's config directly. Every candidate is in the compile gate, and the forward's result does not
depend on the config.

Strides are named as in Triton's flash-attention: ``stride_<tensor><dim>`` with ``v`` value (``b``, ``s`` position),
``s`` sampling locations (``b``, ``q``, ``h`` head, ``l`` level, ``p`` point, ``c`` coordinate), ``a`` attention
weights and ``g`` grad_output (``b``, ``q``). The head and channel strides of value and grad_output are ``HEAD_DIM``
and 1 (the wrappers copy other layouts), which lets Triton vectorise the row gathers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from .msda_torch import compute_dtype

__all__ = [
    "ENV_AUTOTUNE",
    "KERNELS",
    "KernelArgs",
    "LaunchConfig",
    "autotuning",
    "backward_args",
    "candidate_configs",
    "forward_args",
    "launch_config",
    "msda_triton_backward",
    "msda_triton_forward",
]

ENV_AUTOTUNE = "PIIP_MSDA_AUTOTUNE"

# Only builtins (tl.full, tl.reduce ...) and this module's own @triton.jit helpers are used, never the @jit helpers of
# triton.language.standard (tl.zeros, tl.sum): those are bound to the interpreter mode at the time Triton was first
# imported, and TRITON_INTERPRET=1 may be set after that (timm imports Triton).


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@triton.jit
def _program_rows(queries, heads, BLOCK_R: tl.constexpr):
    """Image, flat ``(query, head)`` rows of this program with their mask, and each row's query and head."""
    batch = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows_ok = rows < queries * heads
    query = rows // heads
    return batch, rows, rows_ok, query, rows - query * heads


@triton.jit
def _load_sample(loc_rows, attn_rows, level, point, stride_sl, stride_sp, stride_sc, stride_al, stride_ap, rows_ok,
                 COMPUTE: tl.constexpr):
    """Location ``(x, y)`` and attention weight of sample ``(level, point)`` of each row, in the compute dtype."""
    loc = loc_rows + level * stride_sl + point * stride_sp
    x = tl.load(loc, mask=rows_ok, other=0.0).to(COMPUTE)
    y = tl.load(loc + stride_sc, mask=rows_ok, other=0.0).to(COMPUTE)
    attn = tl.load(attn_rows + level * stride_al + point * stride_ap, mask=rows_ok, other=0.0)
    return x, y, attn.to(COMPUTE)


@triton.jit
def _bilinear_cell(x, y, height, width, rows_ok):
    """The bilinear cell of each row's sample: its top-left pixel ``(v0, u0)`` (int32), the position ``(fv, fu)``
    inside it, and whether the sample is inside the ``grid_sample`` support (else it reads nothing)."""
    u = x * width - 0.5
    v = y * height - 0.5
    # NaN fails every comparison, and zeroing keeps the float->int casts defined.
    inside = rows_ok & (v >= -1) & (v < height) & (u >= -1) & (u < width)
    u = tl.where(inside, u, 0.0)
    v = tl.where(inside, v, 0.0)
    u0 = tl.floor(u)
    v0 = tl.floor(v)
    return v0.to(tl.int32), u0.to(tl.int32), v - v0, u - u0, inside


@triton.jit
def _corner(v0, u0, height, width, start, inside, ROW: tl.constexpr, COLUMN: tl.constexpr):
    """Flat position of corner ``(v0 + ROW, u0 + COLUMN)`` of each row's cell, and whether it lies on the map."""
    row = v0 + ROW
    column = u0 + COLUMN
    on_map = inside & (row >= 0) & (row < height) & (column >= 0) & (column < width)
    return start + row * width + column, on_map


@triton.jit
def _weight_1d(frac, INDEX: tl.constexpr):
    """Bilinear weight of the lower (``INDEX`` 0: ``1 - frac``) or upper (1: ``frac``) neighbour."""
    if INDEX == 0:
        return 1.0 - frac
    return frac


@triton.jit
def _level(shapes_ptr, level):
    """Height, width and first flat position of a level (rows of the int32 ``(L, 3)`` shape table)."""
    return tl.load(shapes_ptr + 3 * level), tl.load(shapes_ptr + 3 * level + 1), tl.load(shapes_ptr + 3 * level + 2)


@triton.jit
def _channels(BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``[1, BLOCK_D]`` channel indices of a row and which of them exist."""
    channels = tl.arange(0, BLOCK_D)[None, :]
    return channels, channels < HEAD_DIM


@triton.jit
def _input_rows(value_ptr, loc_ptr, attn_ptr, batch, query, head, stride_vb, stride_sb, stride_sq, stride_sh,
                stride_ab, stride_aq, stride_ah, HEAD_DIM: tl.constexpr):
    """Per row: its head's channels at position 0 of ``value``, and its samples' first location and weight."""
    value_rows = value_ptr + batch * stride_vb + head * HEAD_DIM
    loc_rows = loc_ptr + batch * stride_sb + query * stride_sq + head * stride_sh
    attn_rows = attn_ptr + batch * stride_ab + query * stride_aq + head * stride_ah
    return value_rows, loc_rows, attn_rows


@triton.jit
def _load_corner(value_rows, pixel, on_map, stride_vs, channels, channels_ok):
    """``[BLOCK_R, BLOCK_D]`` value rows at the flat positions ``pixel`` (zeros off the map), as stored."""
    return tl.load(value_rows[:, None] + pixel[:, None] * stride_vs + channels, mask=on_map[:, None] & channels_ok,
                   other=0.0)


@triton.jit
def _msda_fwd_kernel(
    value_ptr, shapes_ptr, loc_ptr, attn_ptr, out_ptr,
    queries, heads, levels, points,
    stride_vb, stride_vs,
    stride_sb, stride_sq, stride_sh, stride_sl, stride_sp, stride_sc,
    stride_ab, stride_aq, stride_ah, stride_al, stride_ap,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr,
):
    """``out[b, q, m, :] = sum_{l, p} a * sum_c wy_c * wx_c * value[b, pixel_c, m, :]`` (module docstring)."""
    batch, rows, rows_ok, query, head = _program_rows(queries, heads, BLOCK_R)
    channels, channels_ok = _channels(BLOCK_D, HEAD_DIM)
    value_rows, loc_rows, attn_rows = _input_rows(value_ptr, loc_ptr, attn_ptr, batch, query, head, stride_vb,
                                                  stride_sb, stride_sq, stride_sh, stride_ab, stride_aq, stride_ah,
                                                  HEAD_DIM)
    acc = tl.full([BLOCK_R, BLOCK_D], 0.0, dtype=COMPUTE)
    for level in range(levels):
        height, width, start = _level(shapes_ptr, level)
        for point in range(points):
            x, y, attn = _load_sample(loc_rows, attn_rows, level, point, stride_sl, stride_sp, stride_sc, stride_al,
                                      stride_ap, rows_ok, COMPUTE)
            v0, u0, fv, fu, inside = _bilinear_cell(x, y, height, width, rows_ok)
            for i in tl.static_range(2):
                for j in tl.static_range(2):
                    pixel, on_map = _corner(v0, u0, height, width, start, inside, i, j)
                    corner = _load_corner(value_rows, pixel, on_map, stride_vs, channels, channels_ok)
                    weight = attn * _weight_1d(fv, i) * _weight_1d(fu, j)
                    acc += weight[:, None] * corner.to(COMPUTE)
    out = out_ptr + batch * queries * heads * HEAD_DIM + rows[:, None] * HEAD_DIM + channels
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & channels_ok)


@triton.jit
def _msda_bwd_kernel(
    value_ptr, shapes_ptr, loc_ptr, attn_ptr, grad_out_ptr, grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    queries, heads, levels, points, positions,
    stride_vb, stride_vs,
    stride_sb, stride_sq, stride_sh, stride_sl, stride_sp, stride_sc,
    stride_ab, stride_aq, stride_ah, stride_al, stride_ap,
    stride_gb, stride_gq,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr,
    VALUE_GRAD: tl.constexpr,
):
    """Recomputes the samples and writes (module docstring): ``grad_attn = sum_c wy_c * wx_c * g_c``,
    ``grad_x = a * W * sum_c wy_c * sx_c * g_c``, ``grad_y = a * H * sum_c sy_c * wx_c * g_c`` into contiguous
    ``grad_loc`` / ``grad_attn``, and with ``VALUE_GRAD`` scatters ``a * wy_c * wx_c * g`` into the contiguous
    ``grad_value`` buffer."""
    batch, rows, rows_ok, query, head = _program_rows(queries, heads, BLOCK_R)
    channels, channels_ok = _channels(BLOCK_D, HEAD_DIM)
    value_rows, loc_rows, attn_rows = _input_rows(value_ptr, loc_ptr, attn_ptr, batch, query, head, stride_vb,
                                                  stride_sb, stride_sq, stride_sh, stride_ab, stride_aq, stride_ah,
                                                  HEAD_DIM)
    grad_out = tl.load(grad_out_ptr + batch * stride_gb + (query * stride_gq + head * HEAD_DIM)[:, None] + channels,
                       mask=rows_ok[:, None] & channels_ok, other=0.0).to(COMPUTE)
    samples = levels * points
    sample_rows = batch * queries * heads * samples + rows * samples
    grad_value_rows = grad_value_ptr + batch * positions * heads * HEAD_DIM + head * HEAD_DIM
    for level in range(levels):
        height, width, start = _level(shapes_ptr, level)
        for point in range(points):
            x, y, attn = _load_sample(loc_rows, attn_rows, level, point, stride_sl, stride_sp, stride_sc, stride_al,
                                      stride_ap, rows_ok, COMPUTE)
            v0, u0, fv, fu, inside = _bilinear_cell(x, y, height, width, rows_ok)
            grad_attn = tl.full(x.shape, 0.0, dtype=COMPUTE)
            slope_x = tl.full(x.shape, 0.0, dtype=COMPUTE)  # sum_c wy_c * sx_c * g_c
            slope_y = tl.full(x.shape, 0.0, dtype=COMPUTE)  # sum_c sy_c * wx_c * g_c
            for i in tl.static_range(2):
                for j in tl.static_range(2):
                    pixel, on_map = _corner(v0, u0, height, width, start, inside, i, j)
                    corner = _load_corner(value_rows, pixel, on_map, stride_vs, channels, channels_ok)
                    # A corner off the map loads zeros, so its dot product vanishes without extra masking.
                    dot = _sum(grad_out * corner.to(COMPUTE), 1)
                    wy = _weight_1d(fv, i)
                    wx = _weight_1d(fu, j)
                    grad_attn += wy * wx * dot
                    slope_x += (wy * dot) if j == 1 else -(wy * dot)
                    slope_y += (wx * dot) if i == 1 else -(wx * dot)
                    if VALUE_GRAD:
                        # Relaxed ordering: pure accumulations need no fence.
                        tl.atomic_add(grad_value_rows[:, None] + pixel[:, None] * (heads * HEAD_DIM) + channels,
                                      (attn * wy * wx)[:, None] * grad_out, mask=on_map[:, None] & channels_ok,
                                      sem="relaxed")
            sample = sample_rows + level * points + point
            tl.store(grad_attn_ptr + sample, grad_attn.to(grad_attn_ptr.dtype.element_ty), mask=rows_ok)
            grad_x = (attn * width * slope_x).to(grad_loc_ptr.dtype.element_ty)
            grad_y = (attn * height * slope_y).to(grad_loc_ptr.dtype.element_ty)
            tl.store(grad_loc_ptr + 2 * sample, grad_x, mask=rows_ok)
            tl.store(grad_loc_ptr + 2 * sample + 1, grad_y, mask=rows_ok)


@dataclass(frozen=True)
class LaunchConfig:
    """Rows per program and warps of a kernel launch."""

    block_rows: int
    num_warps: int


def launch_config(kernel: str, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """The launch heuristic: the config of every launch that is not autotuned, and the first autotuning candidate.

    Chosen from the compile table of :mod:`.compile_gate` (``python benchmarks/msda_compile.py``): about 8 (forward)
    or 4 (backward) channels per thread and corner (a quarter of that in float64) keep the forward at 32-69 and the
    backward at 39-128 registers, without spills, on sm_80 and sm_90: 25-100% occupancy. Twice as much work per thread
    takes 110-210 registers.

    Args:
        kernel: ``"forward"`` or ``"backward"``.
        head_dim: channels per head.
        dtype: value dtype.
    """
    block_d = triton.next_power_of_2(head_dim)
    # Elements of one [BLOCK_R, BLOCK_D] corner gather per program. float64 takes two registers per element, and with
    # twice the rows of a quarter budget ptxas spilled a few bytes (forward, head dims 8 and 16, sm_90).
    budget = _TILE_ELEMENTS[kernel] // (4 if dtype == torch.float64 else 1)
    return LaunchConfig(max(1, min(_MAX_ROWS, budget // block_d)), _WARPS)


_TILE_ELEMENTS = {"forward": 1024, "backward": 512}
_MAX_ROWS = 128
_WARPS = 4
# Autotuning candidates as factors of the heuristic's (rows, warps): the heuristic and half its work per thread. In
# the compile table, twice the work per thread takes 110-210 registers (12-25% occupancy), and twice the rows on
# eight warps makes ptxas squeeze some kernels into 64 registers with spills: neither is a candidate.
_TUNING = ((1, 1), (0.5, 1))


def candidate_configs(kernel: str, head_dim: int, dtype: torch.dtype) -> list[LaunchConfig]:
    """Configs the autotuner may pick (the heuristic's first); float64 is never autotuned."""
    base = launch_config(kernel, head_dim, dtype)
    if dtype == torch.float64:
        return [base]
    configs = (LaunchConfig(min(_MAX_ROWS, max(1, int(base.block_rows * rows))), base.num_warps * warps)
               for rows, warps in _TUNING)
    return list(dict.fromkeys(configs))


def autotuning() -> bool:
    """Whether CUDA launches are autotuned: unless ``PIIP_MSDA_AUTOTUNE=0`` (never under the interpreter)."""
    return os.environ.get(ENV_AUTOTUNE, "1").strip() not in ("0", "false", "no", "off")


def _shape_table(shapes: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """int32 ``(L, 3)`` rows ``(H, W, start)``, cached per shapes and device: on CUDA, building it is a
    host-to-device copy that waits for the host."""
    key = (tuple(shapes), device)
    table = _SHAPE_TABLES.get(key)
    if table is None:
        rows, start = [], 0
        for h, w in shapes:
            rows.append((h, w, start))
            start += h * w
        table = torch.tensor(rows, dtype=torch.int32, device=device)
        if len(_SHAPE_TABLES) >= _SHAPE_TABLE_CACHE:
            _SHAPE_TABLES.pop(next(iter(_SHAPE_TABLES)))
        _SHAPE_TABLES[key] = table
    return table


_SHAPE_TABLES: dict[tuple, torch.Tensor] = {}
_SHAPE_TABLE_CACHE = 64


def _compute_flag(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def _head_rows(value: torch.Tensor) -> torch.Tensor:
    """``value`` ``(N, S, M, D)`` with unit channel stride and head stride ``D``: rows the kernels vectorise."""
    return value if value.stride(-1) == 1 and value.stride(-2) == value.shape[-1] else value.contiguous()


def _check_int32(*tensors: torch.Tensor) -> None:
    """The kernels offset inside one image with int32: every tensor's per-image extent must fit."""
    for t in tensors:
        extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:]))
        if extent >= 2**31:
            raise ValueError(f"the Triton kernels index one image with int32, but a {tuple(t.shape)} input spans "
                             f"{extent} elements per image; use backend='torch'")


@dataclass
class KernelArgs:
    """A kernel launch: kernel name, grid, arguments, compile-time constants and launch config. What a launch passes,
    and what the compile gate compiles for a GPU target."""

    kernel: str
    rows: int
    batch: int
    args: tuple
    constants: dict
    config: LaunchConfig

    @property
    def grid(self) -> tuple[int, int]:
        return triton.cdiv(self.rows, self.config.block_rows), self.batch

    @property
    def launch_constants(self) -> dict:
        """Keyword arguments of a launch with this config."""
        return dict(self.constants, BLOCK_R=self.config.block_rows, num_warps=self.config.num_warps)


def forward_args(value, spatial_shapes, sampling_locations, attention_weights, out, config=None) -> KernelArgs:
    """Arguments of the forward kernel writing ``out`` (contiguous ``(N, Lq, M * D)``); ``value`` after
    :func:`_head_rows`."""
    batch, _, heads, head_dim = value.shape
    queries, _, levels, points = sampling_locations.shape[1:5]
    args = (
        value, _shape_table(spatial_shapes, value.device), sampling_locations, attention_weights, out,
        queries, heads, levels, points,
        value.stride(0), value.stride(1), *sampling_locations.stride(), *attention_weights.stride(),
    )
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), COMPUTE=_compute_flag(value.dtype))
    config = config or launch_config("forward", head_dim, value.dtype)
    return KernelArgs("forward", queries * heads, batch, args, constants, config)


def backward_args(grad_output, value, spatial_shapes, sampling_locations, attention_weights, grad_value, grad_loc,
                  grad_attn, config=None) -> KernelArgs:
    """Arguments of the backward kernel (``grad_value`` None: no value gradient); ``value`` after :func:`_head_rows`,
    ``grad_output`` with unit channel stride."""
    batch, positions, heads, head_dim = value.shape
    queries, _, levels, points = sampling_locations.shape[1:5]
    args = (
        value, _shape_table(spatial_shapes, value.device), sampling_locations, attention_weights, grad_output,
        grad_attn if grad_value is None else grad_value, grad_loc, grad_attn,
        queries, heads, levels, points, positions,
        value.stride(0), value.stride(1), *sampling_locations.stride(), *attention_weights.stride(),
        grad_output.stride(0), grad_output.stride(1),
    )
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), COMPUTE=_compute_flag(value.dtype),
                     VALUE_GRAD=grad_value is not None)
    config = config or launch_config("backward", head_dim, value.dtype)
    return KernelArgs("backward", queries * heads, batch, args, constants, config)


KERNELS = {"forward": _msda_fwd_kernel, "backward": _msda_bwd_kernel}


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        allowed = candidate_configs(kernel, kwargs["HEAD_DIM"], _TORCH_DTYPES[str(named_args["value_ptr"].dtype)])
        wanted = {(c.block_rows, c.num_warps) for c in allowed}
        return [c for c in configs if (c.kwargs["BLOCK_R"], c.num_warps) in wanted]

    return prune


_TORCH_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


@cache
def _autotuned(kernel: str):
    """``KERNELS[kernel]`` autotuned over :func:`candidate_configs`, keyed on head dim, dtypes and levels x points
    (and the value gradient in the backward). The value gradient buffer is zeroed after the trials."""
    configs = [triton.Config({"BLOCK_R": 2**k}, num_warps=_WARPS) for k in range(_MAX_ROWS.bit_length())]
    key = ["HEAD_DIM", "levels", "points"] + (["VALUE_GRAD"] if kernel == "backward" else [])
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _prune(kernel)},
                           reset_to_zero=["grad_value_ptr"] if kernel == "backward" else None)(KERNELS[kernel])


def _launch(launch: KernelArgs, device: torch.device) -> None:
    if device.type != "cuda":  # the interpreter
        KERNELS[launch.kernel][launch.grid](*launch.args, **launch.launch_constants)
        return
    with torch.cuda.device(device):
        if autotuning():
            grid = lambda meta: (triton.cdiv(launch.rows, meta["BLOCK_R"]), launch.batch)  # noqa: E731
            _autotuned(launch.kernel)[grid](*launch.args, **launch.constants)
        else:
            KERNELS[launch.kernel][launch.grid](*launch.args, **launch.launch_constants)


def msda_triton_forward(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Forward with the Triton kernel; same contract as :func:`.msda_torch.msda_torch_forward`. The result does not
    depend on the launch config (every output sums its samples in the same order)."""
    batch, _, heads, head_dim = value.shape
    queries, _, levels, points = sampling_locations.shape[1:5]
    out = value.new_empty((batch, queries, heads * head_dim))
    if out.numel() == 0:
        return out
    if levels * points == 0:
        return out.zero_()
    value = _head_rows(value)
    _check_int32(value, sampling_locations, attention_weights, out)
    _launch(forward_args(value, spatial_shapes, sampling_locations, attention_weights, out), value.device)
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
    """Gradients with the Triton kernel; ``value_grad=False`` skips the (atomic) value gradient and returns None.

    The location and attention gradients are written in their inputs' dtypes; the value gradient is accumulated in
    a float32 (float64) buffer and returned in the value dtype.
    """
    queries, _, levels, points = sampling_locations.shape[1:5]
    device = value.device
    grad_value = torch.zeros(value.shape, dtype=compute_dtype(value.dtype), device=device) if value_grad else None
    work = grad_output.numel() and levels * points
    new = torch.empty if work else torch.zeros
    grad_loc = new(sampling_locations.shape, dtype=sampling_locations.dtype, device=device)
    grad_attn = new(attention_weights.shape, dtype=attention_weights.dtype, device=device)
    if work:
        value = _head_rows(value)
        if grad_output.stride(-1) != 1:
            grad_output = grad_output.contiguous()
        _check_int32(value, sampling_locations, attention_weights, grad_output)
        _launch(backward_args(grad_output, value, spatial_shapes, sampling_locations, attention_weights, grad_value,
                              grad_loc, grad_attn), device)
    return (grad_value.to(value.dtype) if value_grad else None), grad_loc, grad_attn
