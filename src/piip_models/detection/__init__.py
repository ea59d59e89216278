"""PIIP detectors in plain torchvision: the released mmdet Mask R-CNN checkpoints without mmcv or mmdet.

    from piip_models.detection import coco_categories, mask_rcnn

    model = mask_rcnn("piip_tsb_1568_1120_672", pretrained=True).eval()
    detections = model([image])  # float RGB in [0, 1], (3, H, W)
    names = [coco_categories()[label] for label in detections[0]["labels"]]

``import piip_models`` does not import this package; ``pip install "piip-models[detection]"`` pins the torchvision
it is tested with (0.19 or newer).
"""

from __future__ import annotations

from .backbone import PIIPBackboneWithFPN
from .coco import COCO_CATEGORY_IDS, COCO_CLASSES, coco_categories
from .convert import ConversionReport, convert_mmdet_checkpoint, load_mmdet_checkpoint
from .layers import MMDetAnchorGenerator, MMDetBoxCoder, MMDetRoIAlign, MMDetTransform, paste_masks
from .rcnn import MASK_RCNN_TAG, faster_rcnn, mask_rcnn, transform_cfg

__all__ = [
    "COCO_CATEGORY_IDS",
    "COCO_CLASSES",
    "MASK_RCNN_TAG",
    "ConversionReport",
    "MMDetAnchorGenerator",
    "MMDetBoxCoder",
    "MMDetRoIAlign",
    "MMDetTransform",
    "PIIPBackboneWithFPN",
    "coco_categories",
    "convert_mmdet_checkpoint",
    "faster_rcnn",
    "load_mmdet_checkpoint",
    "mask_rcnn",
    "paste_masks",
    "transform_cfg",
]
