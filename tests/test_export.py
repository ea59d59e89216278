"""Graph capture with dynamic shapes: ``torch.export`` with a dynamic batch and image size, ``torch.compile
(dynamic=True)`` without per-size recompiles, and ONNX graphs (dynamo exporter) that onnxruntime runs, each matching
eager, for a classifier and a ``features_only`` dense backbone (tiny pyramids)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
from torch.export import Dim

from piip_models import PIIP
from piip_models.features import PIIPFeatures

from .conftest import open_gates
from .test_grad_ckpt import tiny_dense_model
from .test_models import tiny_branches

# Dynamic image sizes: sides that are multiples of the patch (16) between ``16 * low`` and ``16 * high``, from which
# every branch has at least 2 x 2 tokens and every windowed branch (windows of 2 tokens in the dense backbone) at least
# 2 x 2 windows (``low >= 2``: PyTorch pins a size that could be 1). The first shape is the export example; every shape
# must run in the exported graphs, non-multiples of the window included.
SIZES = {
    "classifier": (5, 20, [(2, 3, 80, 96), (1, 3, 96, 128), (3, 3, 112, 80), (1, 3, 80, 80)]),
    "dense_features": (8, 20, [(2, 3, 128, 160), (1, 3, 160, 128), (3, 3, 128, 208), (1, 3, 144, 176)]),
}
# torch.compile(dynamic=True) takes any size in one graph, windowed attention included.
COMPILE_SHAPES = {
    "classifier": [(2, 3, 80, 96), (3, 3, 96, 128), (2, 3, 112, 80), (2, 3, 81, 99)],
    "dense_features": [(2, 3, 128, 160), (2, 3, 160, 128), (3, 3, 128, 208), (2, 3, 144, 176), (2, 3, 200, 184)],
}


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return open_gates(PIIP(branches=tiny_branches(), num_classes=7, global_pool="first_patch")).eval()


def dense_features() -> nn.Module:
    """features_only of a dense pyramid with windowed attention: the four levels of its simple feature pyramid."""
    torch.manual_seed(0)
    branches = tiny_dense_model().branch_cfgs
    model = PIIP(branches=branches, head_type="dense", class_token=False, num_classes=0, with_fpn=True)
    return PIIPFeatures(open_gates(model), out_indices=(0, 1, 2, 3)).eval()


MODELS: dict[str, Callable[[], nn.Module]] = {"classifier": classifier, "dense_features": dense_features}


def dynamic_shapes(name: str) -> dict[str, dict[int, object]]:
    """Dynamic batch (up to 8) and image size (see ``SIZES``)."""
    low, high, _ = SIZES[name]
    side = {2: 16 * Dim("h", min=low, max=high), 3: 16 * Dim("w", min=low, max=high)}
    return {"x": {0: Dim("batch", min=1, max=8), **side}}


def _as_list(out: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return out if isinstance(out, list) else [out]


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request):
    """(name, model, exported program) per model: one export serves the torch.export and the ONNX tests."""
    model = MODELS[request.param]()
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(SIZES[request.param][2][0]),),
                                      dynamic_shapes=dynamic_shapes(request.param))
    return request.param, model, program


def test_export_dynamic_batch_and_size_matches_eager(exported):
    name, model, program = exported
    module = program.module()
    for shape in SIZES[name][2]:
        x = torch.randn(shape)
        with torch.no_grad():
            for got, want in zip(_as_list(module(x)), _as_list(model(x)), strict=True):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _check_onnx(path, model: nn.Module, shapes: list[tuple[int, ...]], dynamic: list[bool]) -> None:
    """Runs the ONNX file in onnxruntime on every shape, against eager; ``dynamic``: which input axes are named."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert [isinstance(d, str) for d in graph_input.shape] == dynamic
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = _as_list(model(x))
        outputs = session.run(None, {graph_input.name: x.numpy()})
        assert len(outputs) == len(expected)
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_onnx_graph_runs_in_onnxruntime_with_dynamic_axes(exported, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    name, model, program = exported
    torch.onnx.export(program, dynamo=True, optimize=False).save(tmp_path / "model.onnx")
    _check_onnx(tmp_path / "model.onnx", model, SIZES[name][2], [True, False, True, True])  # batch, 3, h, w


@pytest.mark.parametrize("name", sorted(MODELS))
def test_legacy_onnx_exporter_keeps_the_batch_dynamic(name, tmp_path):
    """The TorchScript-based exporter traces: the image size is the example's, the batch stays dynamic."""
    pytest.importorskip("onnxruntime")
    model = MODELS[name]()
    example = SIZES[name][2][0]
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.randn(example),), path, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    assert not model.training  # the exporter restores the mode it found
    _check_onnx(path, model, [(batch, *example[1:]) for batch in (1, 3)], [True, False, False, False])


def _count_graphs(model: nn.Module, shapes: list[tuple[int, ...]], unbacked_batch: bool = False) -> int:
    """Runs ``torch.compile(model, dynamic=True, fullgraph=True)`` on every shape, each output checked against eager;
    returns the number of graphs compiled."""
    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend, dynamic=True, fullgraph=True)
    for shape in shapes:
        x = torch.randn(shape)
        if unbacked_batch:
            torch._dynamo.decorators.mark_unbacked(x, 0)
        with torch.no_grad():
            for got, want in zip(_as_list(compiled(x)), _as_list(model(x)), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    return len(graphs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compile_dynamic_needs_one_graph_for_every_size(name):
    assert _count_graphs(MODELS[name](), COMPILE_SHAPES[name]) == 1


def test_compile_dynamic_with_an_unbacked_batch_needs_one_graph_for_every_batch():
    """PyTorch gives batch 1 (0/1 specialisation) and, on CPU, batch 16+ (convolution backend choice) graphs of their
    own; an unbacked batch dimension shares one graph."""
    shapes = [(2, 3, 80, 96), (1, 3, 96, 128), (17, 3, 80, 80), (1, 3, 81, 99)]
    assert _count_graphs(classifier(), shapes, unbacked_batch=True) == 1
