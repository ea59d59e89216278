"""torch.compile captures a whole PIIP forward and backward without graph breaks."""

from __future__ import annotations

import torch

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
