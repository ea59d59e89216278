"""The Mask R-CNN example: one real training step and one inference, end to end through its ``main``."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "maskrcnn_piip.py"
SIZE = 128
NUM_CLASSES = 3


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("maskrcnn_piip", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_maskrcnn_example_trains_and_detects(monkeypatch, one_thread):
    example = load_example()
    seen = {}
    train_step = example.train_step

    def observed_train_step(model, optimizer, images, targets):
        backbone = model.backbone.body
        seen["before"] = {n: p.detach().clone() for n, p in backbone.named_parameters()}
        loss, losses = train_step(model, optimizer, images, targets)
        seen["grads"] = {n: p.grad for n, p in backbone.named_parameters()}
        return loss, losses

    monkeypatch.setattr(example, "train_step", observed_train_step)
    # score threshold 0: a one-step model is not confident, but the outputs should still be there to check
    args = ["--size", str(SIZE), "--batch-size", "1", "--num-classes", str(NUM_CLASSES), "--score-thresh", "0"]
    out = example.main([*args, "--grad-checkpointing"])
    model = out["model"]
    assert model.backbone.body.model.grad_checkpointing

    loss, losses = out["loss"], out["losses"]
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert loss.requires_grad and loss.grad_fn is not None
    assert math.isfinite(loss.item())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())

    # Every branch and the PIIP pyramid head got a real gradient, and the step moved every parameter that has one.
    grads = seen["grads"]
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for name in ("model.branches.0.patch_embed.proj.weight", "model.branches.2.blocks.0.attn.qkv.weight",
                 "model.fpn.p2.0.weight", "model.branch_weights"):
        assert grads[name].abs().sum() > 0, name
    after = dict(model.backbone.body.named_parameters())
    for name, before in seen["before"].items():
        if grads[name].abs().sum() > 0:
            assert not torch.equal(after[name], before), f"{name} did not change"

    detections = out["detections"]
    assert isinstance(detections, list) and len(detections) == 1
    det = detections[0]
    n = len(det["boxes"])
    assert 0 < n <= model.roi_heads.detections_per_img
    assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,) and det["scores"].shape == (n,)
    assert det["masks"].shape == (n, 1, SIZE, SIZE)
    assert ((det["boxes"] >= 0) & (det["boxes"] <= SIZE)).all()
    assert ((det["labels"] >= 1) & (det["labels"] < NUM_CLASSES)).all()
    assert ((det["scores"] >= 0) & (det["scores"] <= 1)).all()
    assert torch.all(det["scores"][:-1] >= det["scores"][1:])
