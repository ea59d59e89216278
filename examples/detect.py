"""Detect and segment objects in an image with a released PIIP Mask R-CNN, in plain torchvision (no mmcv, no mmdet).

    python examples/detect.py photo.jpg --pretrained                        # PIIP-TSB 1568/1120/672, COCO weights
    python examples/detect.py photo.jpg --pretrained --model piip_sbl_1568_1120_672_beitv2 --out beit.png
    python examples/detect.py photo.jpg --checkpoint mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16.pth
    python examples/detect.py photo.jpg --model piip_tsb_1120_896_448 --size 448 --score-thresh 0   # CPU smoke run

``--pretrained`` fetches the model's released COCO detector from the Hugging Face Hub (``OpenGVLab/PIIP``; offline,
it must be in the Hugging Face cache), ``--checkpoint`` reads a local copy. Without either, the weights are random and
the drawing only shows that everything runs. The image is resized as the official test pipeline does (e.g. 1568 x 941
for PIIP-TSB 1568/1120/672); ``--size`` picks a smaller longer side for a quick CPU run, at some loss of accuracy.

The output PNG shows the masks (``probability >= 0.5``, as mmdet binarises them) and boxes with COCO class names and
scores of the detections above ``--score-thresh``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from piip_models.detection import coco_categories, mask_rcnn

MASK_THRESHOLD = 0.5
# one colour per class (cycled)
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128)]


def draw_detections(
    image: torch.Tensor, detections: dict[str, torch.Tensor], score_thresh: float, names: Sequence[str]
) -> torch.Tensor:
    """Draws the masks and labelled boxes of the detections scoring at least ``score_thresh``.

    Args:
        image: uint8 ``(3, H, W)`` RGB image.
        detections: One image's output of a torchvision Mask R-CNN in eval mode.
        score_thresh: Minimum score of a drawn detection.
        names: Class name of every label.

    Returns:
        The uint8 ``(3, H, W)`` drawing.
    """
    keep = detections["scores"] >= score_thresh
    boxes, labels, scores = detections["boxes"][keep], detections["labels"][keep], detections["scores"][keep]
    if not len(boxes):
        return image
    colours = [PALETTE[label % len(PALETTE)] for label in labels.tolist()]
    masks = detections["masks"][keep][:, 0] >= MASK_THRESHOLD
    drawing = draw_segmentation_masks(image, masks, alpha=0.5, colors=colours)
    captions = [f"{names[label]} {score:.2f}" for label, score in zip(labels.tolist(), scores.tolist())]
    return draw_bounding_boxes(drawing, boxes, captions, colors=colours, width=2)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path, help="input image (JPEG, PNG, ...)")
    parser.add_argument("--model", default="piip_tsb_1568_1120_672", help="PIIP detector (model name, optional tag)")
    parser.add_argument("--pretrained", action="store_true", help="the released COCO Mask R-CNN (Hugging Face Hub)")
    parser.add_argument("--checkpoint", type=Path, help="a local released mmdet Mask R-CNN checkpoint")
    parser.add_argument("--out", type=Path, default=Path("detections.png"), help="output PNG")
    parser.add_argument("--size", type=int, help="longer image side (default: the official test scale)")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="minimum score of a drawn detection")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the example.

    Returns:
        ``model``, the ``detections`` of the image and the path of the written drawing (``out``).
    """
    args = parse_args(argv)
    # the official scales are (L, L * 800 // 1333); the detector keeps drawing-time detections down to the threshold
    sizes = dict(max_size=args.size, min_size=args.size * 800 // 1333) if args.size else {}
    model = mask_rcnn(
        args.model,
        pretrained=args.pretrained,
        checkpoint_path=args.checkpoint,
        box_score_thresh=min(args.score_thresh, 0.05),
        **sizes,
    )
    model.eval().to(args.device)
    image = pil_to_tensor(Image.open(args.image).convert("RGB"))
    with torch.no_grad():
        detections = model([image.to(args.device).float() / 255])[0]
    detections = {k: v.cpu() for k, v in detections.items()}
    drawing = draw_detections(image, detections, args.score_thresh, coco_categories())
    to_pil_image(drawing).save(args.out, format="PNG")
    shown = int((detections["scores"] >= args.score_thresh).sum())
    print(f"{args.model}: {len(detections['scores'])} detections, {shown} drawn to {args.out}")
    return {"model": model, "detections": detections, "out": args.out}


if __name__ == "__main__":
    main()
