"""COCO class conventions of the released detectors and of torchvision.

mmdet numbers the 80 COCO classes 0..79 in ``CocoDataset.CLASSES`` order (background is the extra last logit);
torchvision's COCO models number them by COCO category id (1..90, ten ids unused, background 0). The two orders are
the same list of names, so a class is moved between them by its COCO category id alone.
"""

from __future__ import annotations

__all__ = ["COCO_CATEGORY_IDS", "COCO_CLASSES", "coco_categories"]

#: The 80 COCO classes in mmdet's ``CocoDataset.CLASSES`` order (mmdet label ``j`` is ``COCO_CLASSES[j]``).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

#: COCO category id of each of :data:`COCO_CLASSES` (the ``category_id`` of COCO annotation files).
COCO_CATEGORY_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91)
)


def coco_categories() -> list[str]:
    """Names of torchvision's 91 COCO labels: ``"__background__"`` at 0, ``"N/A"`` for the unused category ids.

    With ``num_classes=91`` (the default of :func:`piip_models.detection.mask_rcnn`) a predicted label is its COCO
    category id and ``coco_categories()[label]`` its name, as with torchvision's own COCO weights.
    """
    names = ["__background__"] + ["N/A"] * max(COCO_CATEGORY_IDS)
    for name, category_id in zip(COCO_CLASSES, COCO_CATEGORY_IDS):
        names[category_id] = name
    return names
