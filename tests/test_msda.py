"""Multi-scale deformable attention: PyTorch path, Triton kernels (CPU interpreter), dispatch and registration.

The Triton cases run under ``TRITON_INTERPRET=1`` on CPU (set here, before anything imports Triton) and skip when
Triton does not import. Shapes are tiny: the interpreter executes every program instance in Python.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from piip_models.kernels import msda_torch
from piip_models.kernels import multi_scale_deformable_attention as msda
from piip_models.kernels import op as msda_op
from piip_models.kernels.msda_reference import reference
from piip_models.kernels.msda_torch import msda_torch_backward, msda_torch_forward

try:
    import triton  # noqa: F401

    _TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - platform dependent
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"

_TRITON_RUNNABLE = _TRITON_ERROR is None and (torch.cuda.is_available() or os.environ["TRITON_INTERPRET"] == "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [
    "torch",
    pytest.param(
        "triton", marks=pytest.mark.skipif(not _TRITON_RUNNABLE, reason=f"Triton unavailable: {_TRITON_ERROR}")
    ),
]
KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"


# ----------------------------------------------------------------------------------------------------------------------
# References: the grid_sample formulation (Deformable-DETR / PIIP ``ms_deform_attn_core_pytorch``) and a naive loop.


def naive(value, spatial_shapes, sampling_locations, attention_weights):
    """Scalar-loop float64 reference with the CUDA kernel's conventions, independent of ``grid_sample``."""
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    out = torch.zeros(batch, num_queries, heads, head_dim, dtype=torch.float64)
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        for n in range(batch):
            for q in range(num_queries):
                for m in range(heads):
                    for p in range(points):
                        x, y = sampling_locations[n, q, m, level, p].tolist()
                        x, y = x * w - 0.5, y * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yy in (y0, y0 + 1):
                            for xx in (x0, x0 + 1):
                                if 0 <= yy < h and 0 <= xx < w:
                                    weight = (1 - abs(y - yy)) * (1 - abs(x - xx))
                                    weight *= float(attention_weights[n, q, m, level, p])
                                    out[n, q, m] += weight * value[n, start + yy * w + xx, m].double()
        start += h * w
    return out.view(batch, num_queries, heads * head_dim)


def make_inputs(batch, queries, heads, head_dim, shapes, points, *, dtype=torch.float64, low=-0.2, high=1.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    positions = sum(h * w for h, w in shapes)
    levels = len(shapes)
    value = torch.randn(batch, positions, heads, head_dim, generator=gen, dtype=torch.float64)
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=torch.float64)
    loc = loc * (high - low) + low
    attn = torch.rand(batch, queries, heads, levels, points, generator=gen, dtype=torch.float64)
    return value.to(DEVICE, dtype), loc.to(DEVICE, dtype), attn.to(DEVICE, dtype)


def away_from_grid_lines(loc, shapes, margin=2e-3):
    """Nudge locations off integer pixel coordinates, where bilinear sampling is not differentiable."""
    size = torch.tensor([(w, h) for h, w in shapes], dtype=loc.dtype, device=loc.device).view(-1, 1, 2)
    pixel = loc * size - 0.5
    frac = pixel - pixel.floor()
    near = (frac < margin) | (frac > 1 - margin)
    return torch.where(near, (pixel + 4 * margin + 0.5) / size, loc)


def grads(fn, value, loc, attn, grad_output):
    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad_output))


def assert_close_scaled(actual, expected, rel):
    """Elementwise |actual - expected| <= rel * max|expected| (a relative error robust to cancellations)."""
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=0, atol=rel * scale)


def run(backend, shapes):
    return lambda v, lo, a: msda(v, shapes, None, lo, a, backend=backend)


# ----------------------------------------------------------------------------------------------------------------------
# References and the official fixture.


def test_grid_sample_reference_matches_naive_loop():
    shapes = [(5, 7), (3, 4), (1, 6)]
    value, loc, attn = make_inputs(2, 4, 2, 3, shapes, 3, low=-0.4, high=1.4)
    torch.testing.assert_close(reference(value.cpu(), shapes, loc.cpu(), attn.cpu()), naive(value, shapes, loc, attn))


def _fixture_cases():
    root = Path(os.environ.get("PIIP_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"))
    folder = root / "msda_op"
    if not (folder / "io.safetensors").is_file():
        return None
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "io.safetensors"))
    cases = sorted({key.split(".")[0] for key in tensors})
    return {case: {k.split(".", 1)[1]: t for k, t in tensors.items() if k.startswith(case + ".")} for case in cases}


@pytest.fixture(scope="module")
def fixture_cases():
    cases = _fixture_cases()
    if cases is None:
        pytest.skip("msda_op fixture not found (set PIIP_FIXTURES)")
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [f"case{i}" for i in range(5)])
def test_fixture(fixture_cases, case, backend):
    if case not in fixture_cases:
        pytest.skip(f"{case} not in fixture")
    t = {k: v.to(DEVICE) for k, v in fixture_cases[case].items()}
    out = msda(t["value"], t["spatial_shapes"], t["level_start_index"].tolist(), t["sampling_locations"],
               t["attention_weights"], backend=backend)
    torch.testing.assert_close(out, t["output"], rtol=1e-12, atol=1e-12)
    inputs = t["value"], t["sampling_locations"], t["attention_weights"]
    _, gv, gl, ga = grads(run(backend, t["spatial_shapes"]), *inputs, t["grad_output"])
    torch.testing.assert_close(gv, t["grad_value"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gl, t["grad_sampling_locations"], rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(ga, t["grad_attention_weights"], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# Parametrised grid against the float64 reference.

GEOMETRIES = {
    "L1-P4-nonsquare": ([(5, 7)], 4),
    "L1-P1-1xW": ([(1, 9)], 1),
    "L2-P1-Hx1": ([(6, 1), (3, 4)], 1),
    "L2-P4": ([(4, 6), (2, 3)], 4),
    "L4-P1": ([(6, 5), (3, 3), (2, 1), (1, 2)], 1),
    "L4-P4": ([(5, 4), (3, 2), (1, 5), (2, 2)], 4),
    "L3-P3": ([(4, 5), (3, 2), (2, 3)], 3),  # 9 samples per query: bag divisions that are no shifts
}
HEAD_DIMS = [1, 3, 6, 12, 24, 32, 40, 100]


def _check_against_reference(backend, shapes, points, head_dim, dtype, rel, heads=2, queries=5, **kw):
    value, loc, attn = make_inputs(2, queries, heads, head_dim, shapes, points, dtype=dtype, **kw)
    grad_output = torch.randn(2, queries, heads * head_dim, dtype=torch.float64).to(DEVICE, dtype)
    expected = grads(lambda v, lo, a: reference(v, shapes, lo, a), value.double(), loc.double(), attn.double(),
                     grad_output.double())
    actual = grads(run(backend, shapes), value, loc, attn, grad_output)
    for name, a, e in zip(("output", "grad_value", "grad_loc", "grad_attn"), actual, expected):
        assert a.dtype == dtype, name
        assert_close_scaled(a, e, rel)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_levels_points_maps_float64(backend, geometry):
    shapes, points = GEOMETRIES[geometry]
    _check_against_reference(backend, shapes, points, 5, torch.float64, 1e-12, low=-0.3, high=1.3)


@pytest.mark.parametrize("shared_cells", [0.0, float("inf")], ids=["cell-sums", "corner-sort"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_value_gradient_scatters_float64(monkeypatch, geometry, shared_cells):
    """Both value-gradient scatters of the PyTorch path on every geometry: the cell sums reach every corner row
    through per-level row offsets, also on 1 x W and H x 1 maps and at the padded maps' last rows and columns."""
    monkeypatch.setattr("piip_models.kernels.msda_torch._SHARED_CELLS", shared_cells)
    shapes, points = GEOMETRIES[geometry]
    _check_against_reference("torch", shapes, points, 3, torch.float64, 1e-12, queries=9, low=-0.5, high=1.5)


def test_floor_divide_shifts_powers_of_two():
    """Bag numbers of sorted samples: shifts for powers of two, divisions otherwise, in place, equal to ``//``."""
    positions = torch.arange(5000)
    for divisor in range(1, 40):
        t = positions.clone()
        assert msda_torch._floor_divide_(t, divisor) is t and torch.equal(t, positions // divisor)


def test_row_starts_match_searchsorted():
    """The CPU row starts (bincount) equal the binary searches that CUDA runs: empty rows, repeats, rows past the
    largest key."""
    gen = torch.Generator().manual_seed(0)
    for dtype, rows in ((torch.int16, 50), (torch.int32, 70000)):
        keys = torch.randint(3, rows - 5, (400,), generator=gen).to(dtype).sort().values
        expected = torch.searchsorted(keys, torch.arange(rows, dtype=dtype))
        assert torch.equal(msda_torch._row_starts(keys, rows), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_widths_float64(backend, head_dim):
    _check_against_reference(backend, [(4, 6), (2, 3)], 2, head_dim, torch.float64, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_table_smaller_than_a_sparse_tile(backend):
    # 2 images x (1 x 2) map x 2 heads = 8 value rows, corners repeating rows: where ATen's sampled_addmm coalesces
    _check_against_reference(backend, [(1, 2)], 4, 4, torch.float64, 1e-12, queries=6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", ["L1-P4-nonsquare", "L2-P4", "L4-P1"])
def test_float32_matches_reference(backend, geometry):
    shapes, points = GEOMETRIES[geometry]
    _check_against_reference(backend, shapes, points, 12, torch.float32, 1e-6, heads=3, queries=7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_values(backend, dtype):
    """Half values with float32 locations: output and value gradient in the value dtype, float32 accumulation."""
    shapes = [(4, 5), (2, 3)]
    value, loc, attn = make_inputs(2, 5, 3, 6, shapes, 4, dtype=torch.float32)
    value = value.to(dtype)
    grad_output = torch.randn(2, 5, 18, device=DEVICE).to(dtype)
    out, gv, gl, ga = grads(run(backend, shapes), value, loc, attn, grad_output)
    assert (out.dtype, gv.dtype, gl.dtype, ga.dtype) == (dtype, dtype, torch.float32, torch.float32)
    exact = grads(lambda v, lo, a: reference(v, shapes, lo, a), value.double(), loc.double(), attn.double(),
                  grad_output.double())
    # One rounding of the result (the interpreter truncates instead of rounding to nearest, hence 2 ulp).
    ulp = 2.0 ** -(10 if dtype == torch.float16 else 7)
    for a, e in zip((out, gv, gl, ga), exact):
        assert_close_scaled(a, e, 2 * ulp if a.dtype == dtype else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    shapes = [(3, 5), (2, 2)]
    value, loc, attn = make_inputs(2, 4, 3, 7, shapes, 2)
    # value: a channel slice of a wider tensor; locations: stored (x, y)-major; weights: transposed storage.
    value_nc = torch.stack((value, value), -1)[..., 0]
    loc_nc = loc.movedim(-1, 0).contiguous().movedim(0, -1)
    attn_nc = attn.transpose(1, 2).contiguous().transpose(1, 2)
    grad_output = torch.randn(2, 21, 4, dtype=torch.float64, device=DEVICE).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (value_nc, loc_nc, attn_nc, grad_output))
    actual = grads(run(backend, shapes), value_nc, loc_nc, attn_nc, grad_output)
    expected = grads(lambda v, lo, a: reference(v, shapes, lo, a), value, loc, attn, grad_output)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_points_invalid(backend):
    """Points entirely outside every map (and non-finite ones) read nothing: zero output and zero gradients."""
    shapes = [(3, 4), (2, 2)]
    value, loc, attn = make_inputs(1, 6, 2, 5, shapes, 3, low=1.6, high=3.0)
    loc[:, :2] = -loc[:, :2]
    loc[:, 4, :, :, 0] = float("inf")
    loc[:, 4, :, :, 1] = -float("inf")
    loc[:, 5] = float("nan")
    grad_output = torch.ones(1, 6, 10, dtype=torch.float64, device=DEVICE)
    out, gv, gl, ga = grads(run(backend, shapes), value, loc, attn, grad_output)
    for t in (out, gv, gl, ga):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_queries(backend):
    shapes = [(2, 3)]
    value, loc, attn = make_inputs(2, 0, 2, 3, shapes, 2)
    grad_output = torch.zeros(2, 0, 6, dtype=torch.float64, device=DEVICE)
    out, gv, gl, ga = grads(run(backend, shapes), value, loc, attn, grad_output)
    assert out.shape == (2, 0, 6) and torch.equal(gv, torch.zeros_like(gv)) and gl.shape == loc.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    shapes = [(3, 4), (2, 3)]
    value, loc, attn = make_inputs(1, 3, 2, 3, shapes, 2, low=-0.1, high=1.1)
    inputs = (value.requires_grad_(), away_from_grid_lines(loc, shapes).requires_grad_(), attn.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda v, lo, a: msda(v, shapes, None, lo, a, backend=backend), inputs, eps=1e-6, atol=1e-5, rtol=1e-3
    )


def test_torch_forward_autograd_matches_custom_backward():
    """The export path differentiates through embedding_bag; the op uses the hand-written backward: they agree."""
    shapes = [(4, 5), (3, 2)]
    value, loc, attn = make_inputs(2, 6, 3, 4, shapes, 3)
    grad_output = torch.randn(2, 6, 12, dtype=torch.float64, device=DEVICE)
    _, *autograd = grads(lambda v, lo, a: msda_torch_forward(v, shapes, lo, a), value, loc, attn, grad_output)
    for a, e in zip(msda_torch_backward(grad_output, value, shapes, loc, attn), autograd):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared_cells", [0.0, float("inf")], ids=["cell-sums", "corner-sort"])
@pytest.mark.parametrize("chunk_samples, short_keys, radix_size", [
    (1, 1 << 15, 1 << 15),  # one map (one head of one image) per chunk
    (60, 1 << 15, 1 << 15),  # two of the three heads per chunk: uneven head splits
    (1 << 17, 1, 1 << 15),  # the whole batch in one chunk, 32-bit sort keys
    (1, 1 << 15, 64),  # sort keys padded to a (patched) radix-sort size
])
def test_torch_path_chunks(monkeypatch, chunk_samples, short_keys, radix_size, shared_cells):
    """Chunking, sort key widths, padding and either value-gradient scatter do not change results."""
    shapes = [(4, 5), (3, 2)]
    value, loc, attn = make_inputs(3, 7, 3, 4, shapes, 2)
    grad_output = torch.randn(3, 7, 12, dtype=torch.float64, device=DEVICE)
    expected = grads(lambda v, lo, a: reference(v, shapes, lo, a), value, loc, attn, grad_output)
    monkeypatch.setattr("piip_models.kernels.msda_torch._CHUNK_SAMPLES", chunk_samples)
    monkeypatch.setattr("piip_models.kernels.msda_torch._SHORT_KEYS", short_keys)
    monkeypatch.setattr("piip_models.kernels.msda_torch._RADIX_SIZE", radix_size)
    monkeypatch.setattr("piip_models.kernels.msda_torch._SHARED_CELLS", shared_cells)
    for a, e in zip(grads(run("torch", shapes), value, loc, attn, grad_output), expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_torch_path_float64_corner_rows(monkeypatch):
    """Maps too large for exact float32 arithmetic on table rows compute them in float64: same rows, same results."""
    shapes = [(4, 5), (3, 2)]
    value, loc, attn = make_inputs(2, 7, 3, 4, shapes, 2, dtype=torch.float32)
    grad_output = torch.randn(2, 7, 12, device=DEVICE)
    expected = grads(run("torch", shapes), value, loc, attn, grad_output)
    monkeypatch.setattr("piip_models.kernels.msda_torch._EXACT_ROWS", 1)
    for a, e in zip(grads(run("torch", shapes), value, loc, attn, grad_output), expected):
        assert torch.equal(a, e)


# ----------------------------------------------------------------------------------------------------------------------
# torch.library registration: opcheck, compile, determinism, autocast, meta, export.


def _op_args(backend, dtype=torch.float64):
    shapes = [(3, 4), (2, 2)]
    value, loc, attn = make_inputs(2, 3, 2, 3, shapes, 2, dtype=dtype)
    flat = [s for hw in shapes for s in hw]
    return value.requires_grad_(), flat, loc.requires_grad_(), attn.requires_grad_(), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    args = _op_args(backend)
    torch.library.opcheck(torch.ops.piip_models.msda.default, args)
    value, flat, loc, attn, _ = args
    grad_output = torch.randn(2, 3, 6, dtype=torch.float64, device=DEVICE)
    backward_args = (grad_output, value.detach(), flat, loc.detach(), attn.detach(), backend)
    torch.library.opcheck(torch.ops.piip_models.msda_backward.default, backward_args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    shapes = ((3, 4), (2, 2))
    value, loc, attn = make_inputs(2, 3, 2, 3, list(shapes), 2, dtype=torch.float32)
    proj = torch.nn.Linear(6, 6).to(DEVICE)

    def block(v, lo, a):
        out = msda(v * 2, shapes, None, lo.clamp(-1, 2), a.softmax(-1), backend=backend)
        return proj(out).square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    expected = grads(block, value, loc, attn, torch.tensor(1.0, device=DEVICE))
    actual = grads(compiled, value, loc, attn, torch.tensor(1.0, device=DEVICE))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("shared_cells", [0.0, float("inf")], ids=["cell-sums", "corner-sort"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_backward_is_bitwise_repeatable(backend, deterministic, monkeypatch, shared_cells):
    monkeypatch.setattr("piip_models.kernels.msda_torch._SHARED_CELLS", shared_cells)
    shapes = [(3, 4), (2, 3)]
    # Many queries on a tiny map: every pixel receives many contributions in the value gradient.
    value, loc, attn = make_inputs(2, 24, 2, 5, shapes, 4, dtype=torch.float32)
    grad_output = torch.randn(2, 24, 10, device=DEVICE)
    first = grads(run(backend, shapes), value, loc, attn, grad_output)
    for _ in range(2):
        for a, e in zip(grads(run(backend, shapes), value, loc, attn, grad_output), first):
            assert torch.equal(a, e)
    expected = grads(lambda v, lo, a: reference(v, shapes, lo, a), value.double(), loc.double(), attn.double(),
                     grad_output.double())
    for a, e in zip(first, expected):
        assert_close_scaled(a, e, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_lets_bfloat16_flow(backend):
    shapes = [(3, 4)]
    value, loc, attn = make_inputs(1, 4, 2, 4, shapes, 2, dtype=torch.float32)
    proj = torch.nn.Linear(8, 8).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        v = proj(value.flatten(2)).view(value.shape)
        assert v.dtype == torch.bfloat16
        out = msda(v, shapes, None, loc, attn, backend=backend)
    assert out.dtype == torch.bfloat16
    expected = msda(v.float(), shapes, None, loc, attn, backend="torch")
    assert_close_scaled(out, expected, 2**-6)


def test_meta_tensors():
    shapes = ((7, 9), (4, 5))
    value = torch.empty(2, 83, 4, 6, device="meta", requires_grad=True)
    loc = torch.empty(2, 10, 4, 2, 3, 2, device="meta", requires_grad=True)
    attn = torch.empty(2, 10, 4, 2, 3, device="meta", requires_grad=True)
    out = msda(value, shapes, None, loc, attn)
    assert out.shape == (2, 10, 24) and out.device.type == "meta"
    out.sum().backward()
    assert value.grad.shape == value.shape and loc.grad.shape == loc.shape and attn.grad.shape == attn.shape


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_export_uses_plain_aten_ops():
    shapes = ((3, 4), (2, 2))

    class Block(torch.nn.Module):
        def forward(self, v, lo, a):
            return msda(v, shapes, None, lo, a)

    args = make_inputs(2, 3, 2, 3, list(shapes), 2, dtype=torch.float32)
    program = torch.export.export(Block(), args)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("piip_models" in t for t in targets)
    torch.testing.assert_close(program.module()(*args), reference(*args[:1], list(shapes), *args[1:]))
    traced = torch.jit.trace(Block(), args, check_trace=False)
    torch.testing.assert_close(traced(*args), reference(*args[:1], list(shapes), *args[1:]))


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch and argument checks.


def test_default_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(msda_op.ENV_BACKEND, raising=False)
    assert msda_op.resolve_backend("", torch.device("cpu")) == "torch"
    assert msda_op.resolve_backend("auto", torch.device("meta")) == "torch"
    calls = []
    monkeypatch.setattr(msda_op, "msda_torch_forward", lambda *a: calls.append(1) or msda_torch_forward(*a))
    value, loc, attn = make_inputs(1, 2, 1, 2, [(2, 2)], 1, dtype=torch.float32)
    msda(value.cpu(), [(2, 2)], None, loc.cpu(), attn.cpu())
    assert calls == [1]


def test_backend_selection(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(msda_op, "_triton_import_error", lambda: None)
    assert msda_op.resolve_backend("auto", cuda) == "triton"
    assert msda_op.resolve_backend("torch", cuda) == "torch"
    monkeypatch.setenv(msda_op.ENV_BACKEND, "torch")
    assert msda_op.resolve_backend("", cuda) == "torch"
    assert msda_op.resolve_backend("triton", cuda) == "triton"  # the keyword wins over the environment
    monkeypatch.setenv(msda_op.ENV_BACKEND, "cuda")
    with pytest.raises(ValueError, match="PIIP_MSDA_BACKEND"):
        msda_op.resolve_backend("", cuda)
    monkeypatch.delenv(msda_op.ENV_BACKEND)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        msda_op.resolve_backend("triton", cpu)
    monkeypatch.setattr(msda_op, "_triton_import_error", lambda: "ImportError: no triton")
    assert msda_op.resolve_backend("auto", cuda) == "torch"
    with pytest.raises(RuntimeError, match="does not import"):
        msda_op.resolve_backend("triton", cuda)


def test_import_is_cheap():
    """Importing the kernels package imports neither Triton nor the kernels, and never initialises CUDA."""
    code = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('msda_kernels', {str(KERNELS_DIR / '__init__.py')!r},"
        f" submodule_search_locations=[{str(KERNELS_DIR)!r}])\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['msda_kernels'] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'msda_kernels.msda_triton' not in sys.modules\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


def test_kernels_never_import_the_model_package():
    for path in KERNELS_DIR.glob("*.py"):
        text = path.read_text()
        assert "import piip_models" not in text and "from piip_models" not in text, path.name


def test_spatial_shapes_as_tensor_and_level_start_index():
    shapes = [(3, 4), (2, 2)]
    value, loc, attn = make_inputs(1, 3, 2, 3, shapes, 2)
    expected = msda(value, shapes, None, loc, attn)
    as_tensor = msda(value, torch.tensor(shapes), torch.tensor([0, 12]), loc, attn)
    torch.testing.assert_close(as_tensor, expected, rtol=0, atol=0)
    torch.testing.assert_close(msda(value, shapes, [0, 12], loc, attn), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="level_start_index"):
        msda(value, shapes, [0, 11], loc, attn)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda v, lo, a: (v[0], lo, a), "expected value"),
        (lambda v, lo, a: (v[:, :-1], lo, a), "positions"),
        (lambda v, lo, a: (v, lo[:, :, :, :1], a[:, :, :, :1]), "levels"),
        (lambda v, lo, a: (v, lo[:1], a[:1]), "inconsistent"),
        (lambda v, lo, a: (v, lo, a[..., :1]), "inconsistent"),
        (lambda v, lo, a: (v.long(), lo, a), "floating"),
    ],
)
def test_bad_arguments(change, match):
    shapes = [(3, 4), (2, 2)]
    value, loc, attn = change(*make_inputs(2, 3, 2, 3, shapes, 2))
    with pytest.raises(ValueError, match=match):
        msda(value, shapes, None, loc, attn)
    with pytest.raises(ValueError, match="backend"):
        msda(*make_inputs(2, 3, 2, 3, shapes, 2)[:1], shapes, None, *make_inputs(2, 3, 2, 3, shapes, 2)[1:],
             backend="cuda")


# ----------------------------------------------------------------------------------------------------------------------
# Triton specifics: native half inputs, launch configs, autotuning candidates, index bounds.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_locations_and_weights_read_as_they_are(backend, dtype):
    """Value, locations and weights all in half precision: read as they are (compared with float64 on the same
    rounded inputs), coordinates and sums in float32, every result in its input's dtype within two roundings."""
    shapes = [(5, 6), (3, 2)]
    value, loc, attn = make_inputs(2, 7, 2, 12, shapes, 4, dtype=torch.float32)
    # Off the grid lines (where the location gradient jumps) by more than the rounding of a half location.
    value, loc, attn = value.to(dtype), away_from_grid_lines(loc, shapes, margin=0.05).to(dtype), attn.to(dtype)
    grad_output = torch.randn(2, 7, 24, device=DEVICE).to(dtype)
    actual = grads(run(backend, shapes), value, loc, attn, grad_output)
    expected = grads(lambda v, lo, a: reference(v, shapes, lo, a), value.double(), loc.double(), attn.double(),
                     grad_output.double())
    ulp = 2.0 ** -(10 if dtype == torch.float16 else 7)
    for name, a, e in zip(("output", "grad_value", "grad_loc", "grad_attn"), actual, expected):
        assert a.dtype == dtype, name
        assert_close_scaled(a, e, 2 * ulp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.skipif(not _TRITON_RUNNABLE, reason=f"Triton unavailable: {_TRITON_ERROR}")
def test_triton_forward_does_not_depend_on_the_launch_config(dtype):
    """Every output sums its samples in one order whatever the rows per program: autotuning cannot change results."""
    from piip_models.kernels import msda_triton

    shapes = [(4, 6), (2, 3)]
    value, loc, attn = make_inputs(2, 9, 3, 12, shapes, 4, dtype=torch.float32)
    value, attn = value.to(dtype), attn.to(dtype)
    outs = []
    for config in [msda_triton.LaunchConfig(1, 1), msda_triton.LaunchConfig(4, 2),
                   *msda_triton.candidate_configs("forward", 12, dtype)]:
        out = value.new_empty(2, 9, 36)
        msda_triton._launch(msda_triton.forward_args(value, shapes, loc, attn, out, config), value.device)
        outs.append(out)
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
    torch.testing.assert_close(outs[0], msda(value, shapes, None, loc, attn, backend="triton"), rtol=0, atol=0)


@pytest.mark.skipif(_TRITON_ERROR is not None, reason=f"Triton unavailable: {_TRITON_ERROR}")
def test_launch_heuristic_and_autotuning_candidates():
    from piip_models.kernels import msda_triton

    for kernel in ("forward", "backward"):
        for head_dim in (3, 12, 24, 32, 100):
            for dtype in (torch.float32, torch.bfloat16):
                candidates = msda_triton.candidate_configs(kernel, head_dim, dtype)
                assert candidates[0] == msda_triton.launch_config(kernel, head_dim, dtype)
                assert len(candidates) == len(set(candidates)) >= 1
                assert all(1 <= c.block_rows <= 128 and c.block_rows & (c.block_rows - 1) == 0 for c in candidates)
            # float64 (tests, gradcheck) always runs the heuristic's config
            assert msda_triton.candidate_configs(kernel, head_dim, torch.float64) == [
                msda_triton.launch_config(kernel, head_dim, torch.float64)]
    # The autotuner keeps exactly the candidates of the launch's head dim and dtype.
    prune = msda_triton._prune("backward")
    configs = msda_triton._autotuned("backward").configs
    value = torch.empty(1, 1, 1, 24, dtype=torch.bfloat16)
    kept = {(c.kwargs["BLOCK_R"], c.num_warps) for c in prune(configs, {"value_ptr": value}, HEAD_DIM=24)}
    assert kept == {(c.block_rows, c.num_warps) for c in msda_triton.candidate_configs("backward", 24, torch.bfloat16)}


@pytest.mark.skipif(_TRITON_ERROR is not None, reason=f"Triton unavailable: {_TRITON_ERROR}")
def test_triton_rejects_images_beyond_int32_offsets():
    from piip_models.kernels import msda_triton

    shapes = [(2**16, 2**10)]
    value = torch.empty(1, 2**26, 16, 32, device="meta")  # 2^35 elements per image
    loc = torch.empty(1, 3, 16, 1, 4, 2, device="meta")
    attn = torch.empty(1, 3, 16, 1, 4, device="meta")
    with pytest.raises(ValueError, match="int32.*backend='torch'"):
        msda_triton.msda_triton_forward(value, shapes, loc, attn)


@pytest.mark.skipif(_TRITON_ERROR is not None, reason=f"Triton unavailable: {_TRITON_ERROR}")
def test_shape_table_is_built_once_per_shapes_and_device():
    """On CUDA, building the table is a host-to-device copy that waits for the host: calls reuse it."""
    from piip_models.kernels import msda_triton

    table = msda_triton._shape_table([(3, 4), (2, 5)], torch.device("cpu"))
    assert table.dtype == torch.int32 and table.tolist() == [[3, 4, 0], [2, 5, 12]]
    assert msda_triton._shape_table([(3, 4), (2, 5)], torch.device("cpu")) is table
    assert msda_triton._shape_table([(3, 4)], torch.device("cpu")) is not table
