"""The examples, end to end through their ``main``: Mask R-CNN fine-tuning (one real training step and one inference)
and detection drawn to a PNG."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from piip_models.detection import MMDetRoIAlign, MMDetTransform

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SIZE = 128
NUM_CLASSES = 3


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_maskrcnn_example_trains_and_detects(monkeypatch, one_thread):
    example = load_example("maskrcnn_piip")
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
    # the detector of piip_models.detection: mmdet's transform and RoI pooling, fresh classifiers for 3 classes
    assert isinstance(model.transform, MMDetTransform) and isinstance(model.roi_heads.box_roi_pool, MMDetRoIAlign)
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES

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


def test_detect_example_draws_detections_to_png(tmp_path, one_thread):
    example = load_example("detect")
    image = torch.zeros(3, 150, 200, dtype=torch.uint8)
    image[:, 30:110, 40:160] = torch.tensor([200, 40, 40], dtype=torch.uint8)[:, None, None]
    to_pil_image(image).save(tmp_path / "in.png")
    out_path = tmp_path / "out.png"
    # random weights at a small size: every detection is drawn (threshold 0)
    out = example.main([str(tmp_path / "in.png"), "--model", "piip_tsb_1120_896_448", "--size", "224",
                        "--score-thresh", "0", "--out", str(out_path)])
    model, det = out["model"], out["detections"]
    assert (model.transform.min_size, model.transform.max_size) == ((224 * 800 // 1333,), 224)
    n = len(det["scores"])
    assert n == model.roi_heads.detections_per_img
    assert det["masks"].shape == (n, 1, 150, 200) and (det["boxes"][:, 2:] <= torch.tensor([200, 150]) + 1e-3).all()
    with Image.open(out_path) as png:
        assert png.format == "PNG"
        drawing = pil_to_tensor(png)
    assert drawing.shape == (3, 150, 200) and drawing.dtype == torch.uint8
    changed = (drawing != image).any(dim=0)
    boxes = det["boxes"].round().long().clamp(min=0)
    x1, y1 = int(boxes[0, 0].clamp(max=199)), int(boxes[0, 1].clamp(max=149))
    assert changed[y1, x1], "the top detection's box corner is drawn"
    masks = det["masks"][:, 0] >= example.MASK_THRESHOLD
    if masks.any():
        assert changed[masks.any(dim=0)].float().mean() > 0.9  # masks are blended over the image
    # nothing drawn above the top score
    empty = example.draw_detections(image, det, float(det["scores"].max()) + 1, ["?"] * 91)
    assert torch.equal(empty, image)
