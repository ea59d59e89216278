"""torch.compile captures a whole PIIP forward and backward without graph breaks."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from piip_models import PIIP, BranchCfg, even_segments

from .test_models import tiny_model


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    model = tiny_model().eval()
    x = torch.randn(2, 3, 80, 96)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert model.interactions[0].units[0].branch2to1_injector.attn.sampling_offsets.weight.grad is not None


def _dense_backbone() -> PIIP:
    """Two-branch dense PIIP backbone (16 deformable heads per injector, as every registered model)."""
    branches = tuple(
        BranchCfg("vit_small_patch16_224", size, even_segments(2, 1),
                  model_args=dict(embed_dim=dim, depth=2, num_heads=2, init_values=1.0, no_embed_class=True))
        for dim, size in ((64, 32), (32, 64))
    )
    return PIIP(branches=branches, head_type="dense", class_token=False, num_classes=0)


def test_dynamic_shapes_compile_one_graph_for_every_input_size():
    """Multi-scale training: under torch.compile(dynamic=True) three input sizes (also sizes that are no multiple of
    the patch) share one graph, forward and backward, with fullgraph. The deformable attention's level shapes stay
    symbolic (SymInt[] in the op schema), so nothing specialises on a size."""
    torch._dynamo.reset()
    counters.clear()
    model = _dense_backbone().eval()  # eval: no random layers between the compiled and the eager run
    compiled = torch.compile(model.forward_features, dynamic=True, fullgraph=True, backend="aot_eager")
    for size in ((96, 128), (128, 160), (160, 120)):
        x = torch.randn(2, 3, *size)
        out = compiled(x)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        expected = model.forward_features(x)
        expected.square().mean().backward()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for grad, p in zip(grads, model.parameters()):
            torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-5)
        model.zero_grad()
        assert counters["stats"]["unique_graphs"] == 1, f"recompiled for input size {size}"
