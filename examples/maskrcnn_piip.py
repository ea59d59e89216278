"""Fine-tune a PIIP Mask R-CNN in torchvision: training steps and one inference on synthetic data.

The detector is :func:`piip_models.detection.mask_rcnn`: a stock torchvision ``MaskRCNN`` around
:class:`~piip_models.detection.PIIPBackboneWithFPN` (the PIIP feature pyramid at strides 4/8/16/32 and a torchvision
FPN with a max-pooled stride-64 level), with anchors, box coders, RoI pooling and image transform set up as the
released mmdet detectors.

    python examples/maskrcnn_piip.py                                   # piip_tsb_1120_896_448 at 224 px, CPU
    python examples/maskrcnn_piip.py --model piip_sbl_1568_1120_672 --size 256 --steps 2 --grad-checkpointing

The defaults are sized for a laptop CPU (random weights, 224 px images, few RPN proposals). For real training:

* ``--pretrained`` starts from the released COCO Mask R-CNN of the model (``OpenGVLab/PIIP``, e.g.
  ``piip_tsb_1120_896_448.coco_mask_rcnn``, fetched from the Hugging Face Hub): backbone, FPN, RPN and RoI heads
  load, the class-specific layers start fresh for ``--num-classes`` (unless it is 91, COCO's category ids). With
  ``--model <name>.branches`` only the timm branch weights load and interactions and merges start from their
  zero-gated init, so the pyramid starts out as the independent pretrained branches.
* Replace :func:`synthetic_batch` with a real dataset (e.g. ``torchvision.datasets.CocoDetection`` wrapped by
  ``torchvision.datasets.wrap_dataset_for_transforms_v2``): images as float ``[0, 1]`` RGB CHW tensors and targets
  as dicts with ``boxes`` (absolute ``x1, y1, x2, y2``), ``labels`` (int64, 0 is background) and ``masks``
  (uint8 ``N x H x W``). Normalisation and resizing are done by the detector (the detection config's mean/std).
* Keep the detector's own input size (drop ``min_size``/``max_size`` in :func:`build_maskrcnn`: 1568 x 941 for
  ``piip_tsb_1568_1120_672``) and the RPN/RoI sampling of the released configs (drop the reductions), an AdamW
  schedule like the official detection configs, and ``--grad-checkpointing`` to trade compute for activation memory.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torchvision.models.detection import MaskRCNN

from piip_models.detection import mask_rcnn


def build_maskrcnn(
    model_name: str,
    num_classes: int,
    size: int,
    pretrained: bool = False,
    grad_checkpointing: bool = False,
    score_thresh: float = 0.05,
) -> MaskRCNN:
    """Mask R-CNN on a PIIP backbone, with images resized to ``size`` and a light RPN/ROI budget for small inputs.

    Args:
        model_name: Dense PIIP model name (optionally with a tag).
        num_classes: Classes including background.
        size: Detector input size (shorter and longer side limit).
        pretrained: Start from the released COCO detector (or the tag's backbone weights).
        grad_checkpointing: Recompute the backbone's activations in backward.
        score_thresh: Minimum class score of a detection at inference.
    """
    model = mask_rcnn(
        model_name,
        pretrained=pretrained,
        num_classes=num_classes,
        min_size=size,
        max_size=size,
        # the released configs' 2000/1000 proposals and 256/512 sampled anchors/RoIs are for ~1000 px COCO images
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=64,
        box_score_thresh=score_thresh,
        box_detections_per_img=20,
    )
    model.backbone.set_grad_checkpointing(grad_checkpointing)
    return model


def synthetic_batch(
    batch_size: int, size: int, num_classes: int, num_objects: int = 3, generator: torch.Generator | None = None
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Noise images with filled rectangles of a per-class colour, and their boxes, labels and masks.

    Returns:
        Images as ``[0, 1]`` float ``(3, size, size)`` tensors and torchvision detection targets.
    """
    # A fixed palette, so every batch (training or test) paints a class the same colour.
    colours = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    images, targets = [], []
    for _ in range(batch_size):
        image = torch.rand(3, size, size, generator=generator) * 0.2
        corners = torch.randint(0, size, (num_objects, 2, 2), generator=generator).sort(dim=1).values
        # At least 8 px per side, so every object covers a few stride-4 cells.
        x1y1 = corners[:, 0].clamp(max=size - 8)
        x2y2 = torch.maximum(corners[:, 1], x1y1 + 8)
        boxes = torch.cat([x1y1, x2y2], dim=1)
        labels = torch.randint(1, num_classes, (num_objects,), generator=generator)
        masks = torch.zeros(num_objects, size, size, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2), label in zip(masks, boxes.tolist(), labels.tolist()):
            mask[y1:y2, x1:x2] = 1
            image[:, y1:y2, x1:x2] = colours[label]
        images.append(image)
        targets.append({"boxes": boxes.float(), "labels": labels, "masks": masks})
    return images, targets


def train_step(
    model: MaskRCNN,
    optimizer: torch.optim.Optimizer,
    images: list[torch.Tensor],
    targets: list[dict[str, torch.Tensor]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step on a batch.

    Returns:
        The total loss (still attached to its graph) and the detector's individual losses.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    losses = model(images, targets)
    loss = sum(losses.values())
    loss.backward()
    optimizer.step()
    return loss, losses


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="piip_tsb_1120_896_448", help="dense PIIP model")
    parser.add_argument("--size", type=int, default=224, help="input size (a multiple of 32)")
    parser.add_argument("--steps", type=int, default=1, help="training steps")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=4, help="classes including background")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--pretrained", action="store_true", help="start from the released COCO detector (Hub)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute backbone activations")
    parser.add_argument("--score-thresh", type=float, default=0.05, help="minimum score of a detection")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the example.

    Returns:
        ``model``, ``loss`` and ``losses`` of the last training step, and the inference ``detections``.
    """
    args = parse_args(argv)
    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = build_maskrcnn(
        args.model, args.num_classes, args.size, args.pretrained, args.grad_checkpointing, args.score_thresh
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    print(f"{args.model} Mask R-CNN: {sum(p.numel() for p in params) / 1e6:.1f}M trainable parameters")

    images, targets = synthetic_batch(args.batch_size, args.size, args.num_classes, generator=generator)
    for step in range(args.steps):
        loss, losses = train_step(model, optimizer, images, targets)
        parts = ", ".join(f"{name} {value.item():.4f}" for name, value in losses.items())
        print(f"step {step}: loss {loss.item():.4f} ({parts})")

    model.eval()
    test_images, _ = synthetic_batch(1, args.size, args.num_classes, generator=generator)
    with torch.no_grad():
        detections = model(test_images)
    print(f"inference: {len(detections[0]['boxes'])} detections")
    return {"model": model, "loss": loss, "losses": losses, "detections": detections}


if __name__ == "__main__":
    main()
