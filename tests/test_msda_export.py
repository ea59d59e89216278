"""Export of multi-scale deformable attention: ``torch.export`` with dynamic batch and level shapes, and ONNX graphs
(dynamo and legacy exporters) that onnxruntime loads and runs, for the op and for an ``MSDeformAttn`` layer.

The ONNX cases skip when onnx, onnxscript or onnxruntime do not import.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from piip_models.kernels import multi_scale_deformable_attention as msda
from piip_models.kernels.msda_export import msda_gather
from piip_models.kernels.msda_reference import reference
from torch.export import Dim

from piip_models.layers.interaction import BranchGeometry, Injector
from piip_models.layers.msdeform_attn import MSDeformAttn, reference_points

from .test_msda import make_inputs

ONNX_MISSING = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
needs_onnx = pytest.mark.skipif(bool(ONNX_MISSING), reason=f"not installed: {', '.join(ONNX_MISSING)}")


class Op(torch.nn.Module):
    """The op on one value map whose size comes from an NCHW input, so that it can be a dynamic dim."""

    def forward(self, feat: torch.Tensor, loc: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = feat.shape
        value = feat.flatten(2).transpose(1, 2).reshape(batch, height * width, 2, -1)
        return msda(value, [(height, width)], None, loc, attn)


class Layer(torch.nn.Module):
    """An ``MSDeformAttn`` as PIIP's injectors use it: queries on one grid attend to another branch's map."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = MSDeformAttn(32, 1, 4, 4, ratio=0.5, d_feat=24)
        with torch.no_grad():  # spread the points beyond the grid init, and off the uniform weights
            self.attn.sampling_offsets.weight.normal_(0, 0.3)
            self.attn.attention_weights.weight.normal_(0, 0.3)

    def forward(self, query: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        _, _, query_h, query_w = query.shape
        _, _, feat_h, feat_w = feat.shape
        ref = reference_points(query_h, query_w, device=query.device)
        return self.attn(query.flatten(2).transpose(1, 2), ref, feat.flatten(2).transpose(1, 2), [(feat_h, feat_w)])


class InjectorLayer(torch.nn.Module):
    """A PIIP interaction injector (deformable attention, gated ConvFFN over the query grid) between two grids."""

    def __init__(self) -> None:
        super().__init__()
        self.injector = Injector(32, 24, num_heads=4, n_points=4, deform_ratio=0.5)
        with torch.no_grad():  # off the zero-initialised gates and the grid init
            for p in self.injector.parameters():
                p.normal_(0, 0.1)

    def forward(self, query: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        geoms = [BranchGeometry(t.shape[-2], t.shape[-1], reference_points(t.shape[-2], t.shape[-1], device=t.device))
                 for t in (query, feat)]
        return self.injector(query.flatten(2).transpose(1, 2), feat.flatten(2).transpose(1, 2), *geoms)


def op_inputs(batch: int, height: int, width: int, queries: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(batch, 6, height, width, generator=gen)
    loc = torch.rand(batch, queries, 2, 1, 3, 2, generator=gen) * 1.4 - 0.2
    attn = torch.rand(batch, queries, 2, 1, 3, generator=gen)
    return feat, loc, attn


def layer_inputs(batch: int, query_hw: tuple[int, int], feat_hw: tuple[int, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 32, *query_hw, generator=gen), torch.randn(batch, 24, *feat_hw, generator=gen)


BATCH = Dim("batch", min=1, max=8)
OP_DIMS = {"feat": {0: BATCH, 2: Dim("height", min=2, max=64), 3: Dim("width", min=2, max=64)},
           "loc": {0: BATCH}, "attn": {0: BATCH}}
LAYER_DIMS = {"query": {0: BATCH, 2: Dim("query_h", min=2, max=64), 3: Dim("query_w", min=2, max=64)},
              "feat": {0: BATCH, 2: Dim("feat_h", min=2, max=64), 3: Dim("feat_w", min=2, max=64)}}
# Inputs of other sizes than the traced ones: batch, level shape and query grid all change.
OP_SIZES = [(2, 4, 5), (3, 7, 3), (1, 2, 9), (8, 6, 6)]
LAYER_SIZES = [(2, (5, 6), (4, 7)), (3, (7, 4), (9, 5)), (1, (3, 3), (2, 2))]


def test_gather_formulation_matches_reference_float64():
    """Every geometry detail of the export formulation: levels, points, out-of-map and non-finite locations."""
    shapes = [(5, 4), (3, 2), (1, 5), (2, 2)]
    value, loc, attn = make_inputs(2, 6, 3, 5, shapes, 3, low=-0.4, high=1.4)
    loc[0, 1, :, :, 0] = float("nan")
    loc[1, 2, 0, 0, 1] = float("inf")
    expected = reference(value, shapes, loc.nan_to_num(nan=-9.0, posinf=-9.0), attn)
    torch.testing.assert_close(msda_gather(value, shapes, loc, attn), expected, rtol=1e-12, atol=1e-12)


def test_export_keeps_batch_and_level_shape_dynamic():
    args = op_inputs(2, 4, 5)
    program = torch.export.export(Op(), args, dynamic_shapes=OP_DIMS)
    # Symbols, not constants: the MSDA path put no guard on the batch or the map size.
    assert {str(r) for r in program.range_constraints.values()} == {"VR[1, 8]", "VR[2, 64]"}
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("piip_models" in t or "embedding_bag" in t for t in targets)
    for batch, height, width in OP_SIZES:
        inputs = op_inputs(batch, height, width, seed=batch)
        torch.testing.assert_close(program.module()(*inputs), Op()(*inputs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("module", [Layer, InjectorLayer], ids=["msdeformattn", "injector"])
def test_export_of_a_layer_with_dynamic_grids(module):
    layer = module().eval()
    program = torch.export.export(layer, layer_inputs(2, (5, 6), (4, 7)), dynamic_shapes=LAYER_DIMS)
    assert len(program.range_constraints) == 5
    for batch, query_hw, feat_hw in LAYER_SIZES:
        inputs = layer_inputs(batch, query_hw, feat_hw, seed=batch)
        torch.testing.assert_close(program.module()(*inputs), layer(*inputs), rtol=1e-4, atol=1e-4)


def test_exported_program_is_differentiable():
    """An exported training graph carries the gradients of the gather formulation."""
    feat, loc, attn = op_inputs(2, 4, 5)
    program = torch.export.export(Op(), (feat, loc, attn), dynamic_shapes=OP_DIMS)
    inputs = [t.clone().requires_grad_() for t in (feat, loc, attn)]
    grads = torch.autograd.grad(program.module()(*inputs).square().sum(), inputs)
    expected_inputs = [t.clone().requires_grad_() for t in (feat, loc, attn)]
    expected = torch.autograd.grad(Op()(*expected_inputs).square().sum(), expected_inputs)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def _onnx_run(path, names, inputs):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0])


def _onnx_ops(path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


@needs_onnx
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("module", ["op", "layer", "injector"])
def test_onnx_export_runs_in_onnxruntime(tmp_path, module, dynamo):
    model, names, sizes, dims = {
        "op": (Op().eval(), ["feat", "loc", "attn"], OP_SIZES, OP_DIMS),
        "layer": (Layer().eval(), ["query", "feat"], LAYER_SIZES, LAYER_DIMS),
        "injector": (InjectorLayer().eval(), ["query", "feat"], LAYER_SIZES, LAYER_DIMS),
    }[module]
    make = op_inputs if module == "op" else layer_inputs
    path = tmp_path / f"{module}.onnx"
    args = make(*sizes[0])
    if dynamo:
        torch.onnx.export(model, args, path, dynamo=True, input_names=names, dynamic_shapes=dims)
    else:
        # The legacy exporter traces: level shapes become constants, the batch stays dynamic.
        torch.onnx.export(model, args, path, dynamo=False, input_names=names, opset_version=17,
                          dynamic_axes={name: {0: "batch"} for name in names})
        sizes = [(batch, *sizes[0][1:]) for batch in (2, 3, 1)]
    assert not _onnx_ops(path) & {"If", "Loop", "EmbeddingBag"}
    for size in sizes:
        inputs = make(*size, seed=size[0])
        with torch.no_grad():
            expected = model(*inputs)
        torch.testing.assert_close(_onnx_run(path, names, inputs), expected, rtol=1e-4, atol=1e-4)
