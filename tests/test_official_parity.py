"""Parity with the official OpenGVLab/PIIP classification models (fixtures recorded from the official code)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from .conftest import capture_intermediates, compare_intermediates, load_official_fixture, require_fixture

CLS_FIXTURES = [
    "cls_2branch_small",
    "cls_3branch_deit_small",
    "cls_3branch_augreg_small",
    "cls_3branch_merged_small",
    "cls_4branch_small",
]
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CLS_FIXTURES)
def test_classification_fixture(name):
    model, io = load_official_fixture(name)
    records, handles = capture_intermediates(model)
    with torch.no_grad():
        logits = model(io["input"])
    for handle in handles:
        handle.remove()

    torch.testing.assert_close(logits, io["logits"], **TOL)
    checked = compare_intermediates(name, io, records, **TOL)
    assert checked >= 10


def test_msda_fixture_through_public_op():
    path = require_fixture("msda_op")
    from piip_models.kernels import multi_scale_deformable_attention

    io = load_file(path / "io.safetensors")
    cases = json.loads((path / "config.json").read_text())["cases"]
    for case in range(len(cases)):
        p = f"case{case}."
        inputs = [io[p + n].clone().requires_grad_() for n in ("value", "sampling_locations", "attention_weights")]
        out = multi_scale_deformable_attention(inputs[0], io[p + "spatial_shapes"], io[p + "level_start_index"],
                                               inputs[1], inputs[2])
        torch.testing.assert_close(out, io[p + "output"], rtol=1e-10, atol=1e-12)
        grads = torch.autograd.grad(out, inputs, io[p + "grad_output"])
        for grad, name in zip(grads, ("grad_value", "grad_sampling_locations", "grad_attention_weights")):
            torch.testing.assert_close(grad, io[p + name], rtol=1e-10, atol=1e-12)
