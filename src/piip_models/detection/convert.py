"""Released mmdet 2.x Mask R-CNN checkpoints (``OpenGVLab/PIIP`` ``detection/mask_rcnn_*.pth``) into torchvision
detectors built around :class:`~piip_models.detection.PIIPBackboneWithFPN`.

The backbone (``backbone.*``, official PIIP names) goes through :func:`piip_models.weights.adapt_state_dict`;
the FPN neck, RPN head and RoI heads are renamed one to one, except the classifiers: mmdet's box classifier puts the
background last and numbers the 80 COCO classes 0..79, torchvision's puts the background first; with 91 outputs each
class moves to its COCO category id (the slots of unused ids get bias -1e4, so their softmax share underflows to
0 and the other probabilities are mmdet's), with ``80 + 1`` outputs class ``j`` moves to ``j + 1``.

Everything is checked before anything is copied (names, shapes and dtype kinds, as
:func:`piip_models.weights.check_tensors` does for the other loads): a checkpoint that does not fit changes no
parameter.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .. import PIIP
from ..hub import read_checkpoint
from ..weights import CheckpointMismatchError, _listing, adapt_state_dict, dtype_mismatches
from .coco import COCO_CATEGORY_IDS, COCO_CLASSES

__all__ = ["ConversionReport", "convert_mmdet_checkpoint", "load_mmdet_checkpoint"]

_logger = logging.getLogger(__name__)

# mmdet module -> torchvision module, for the tensors copied as they are (both end in .weight / .bias).
_RENAMES = (
    (re.compile(r"^neck\.lateral_convs\.(\d+)\.conv\."), r"backbone.fpn.inner_blocks.\1.0."),
    (re.compile(r"^neck\.fpn_convs\.(\d+)\.conv\."), r"backbone.fpn.layer_blocks.\1.0."),
    (re.compile(r"^rpn_head\.rpn_conv\."), "rpn.head.conv.0.0."),
    (re.compile(r"^rpn_head\.rpn_cls\."), "rpn.head.cls_logits."),
    (re.compile(r"^rpn_head\.rpn_reg\."), "rpn.head.bbox_pred."),
    (re.compile(r"^roi_head\.bbox_head\.shared_fcs\.0\."), "roi_heads.box_head.fc6."),
    (re.compile(r"^roi_head\.bbox_head\.shared_fcs\.1\."), "roi_heads.box_head.fc7."),
    (re.compile(r"^roi_head\.mask_head\.convs\.(\d+)\.conv\."), r"roi_heads.mask_head.\1.0."),
    (re.compile(r"^roi_head\.mask_head\.upsample\."), "roi_heads.mask_predictor.conv5_mask."),
)
# Per-class outputs: mmdet module -> (torchvision module, rows per class, mmdet has a background row last)
_CLASSIFIERS = {
    "roi_head.bbox_head.fc_cls": ("roi_heads.box_predictor.cls_score", 1, True),
    "roi_head.bbox_head.fc_reg": ("roi_heads.box_predictor.bbox_pred", 4, False),
    "roi_head.mask_head.conv_logits": ("roi_heads.mask_predictor.mask_fcn_logits", 1, False),
}
_MASK_HEAD = "roi_head.mask_head."
# Bias of class slots no mmdet class maps to: exp(-1e4) is 0 in float32, so the softmax over the others is mmdet's.
_UNUSED_CLASS_BIAS = -1e4
_WRAPPERS = ("state_dict", "module", "model")


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did not carry over.

    Attributes:
        unused: Checkpoint tensors (mmdet names) not loaded: the heads of a model without them (a Faster R-CNN
            takes no mask head), the classifiers when the model has another class count.
        kept: Model tensors left as initialised (the classifiers for another class count).
        classes: The class names the checkpoint's mmcv ``meta`` records, if any.
    """

    unused: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    classes: tuple[str, ...] | None = None

    def __str__(self) -> str:
        if not (self.unused or self.kept):
            return "every checkpoint tensor loaded, every model tensor set"
        return (
            f"{len(self.unused)} checkpoint tensors not loaded {list(self.unused)}; "
            f"{len(self.kept)} model tensors kept as initialised {list(self.kept)}"
        )


def _detector_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensors of an mmcv (``state_dict``), DeepSpeed (``module``) or flat checkpoint, without a DDP
    ``module.`` prefix."""
    for key in _WRAPPERS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def _checkpoint_classes(checkpoint: Mapping[str, Any]) -> tuple[str, ...] | None:
    meta = checkpoint.get("meta")
    classes = meta.get("CLASSES") if isinstance(meta, Mapping) else None
    return tuple(classes) if classes is not None else None


def _class_slots(num_mmdet_classes: int, num_outputs: int) -> list[int] | None:
    """torchvision class index of each mmdet class, or None when the model has another class count."""
    if num_outputs == num_mmdet_classes + 1:
        return list(range(1, num_mmdet_classes + 1))
    if num_mmdet_classes == len(COCO_CATEGORY_IDS) and num_outputs == max(COCO_CATEGORY_IDS) + 1:
        return list(COCO_CATEGORY_IDS)
    return None


def _move_classes(tensor: Tensor, target: Tensor, slots: list[int], rows: int, background_last: bool) -> Tensor:
    """mmdet per-class rows (``rows`` per class, a background row last when ``background_last``) moved to their
    torchvision slots in a tensor shaped like ``target``; rows of other slots are 0 (biases of unused classifier
    slots -1e4)."""
    out = tensor.new_zeros(target.shape)
    if background_last and tensor.dim() == 1:
        out.fill_(_UNUSED_CLASS_BIAS)
    grouped = tensor.reshape(-1, rows, *tensor.shape[1:])
    if background_last:
        out[0] = grouped[-1, 0]
        grouped = grouped[:-1]
    out.view(-1, rows, *tensor.shape[1:])[slots] = grouped
    return out


def _piip_prefix(model: nn.Module) -> tuple[str, PIIP]:
    for name, module in model.named_modules():
        if isinstance(module, PIIP):
            return f"{name}.", module
    raise TypeError(f"{type(model).__name__} has no PIIP backbone (build it around PIIPBackboneWithFPN)")


def convert_mmdet_checkpoint(
    checkpoint: Mapping[str, Any], model: nn.Module, strict: bool = True
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Converts a PIIP mmdet Mask R-CNN checkpoint to the state dict of a torchvision detector.

    Args:
        checkpoint: The checkpoint as read (``{"meta", "state_dict"}``, DeepSpeed ``{"module"}`` or flat).
        model: A ``MaskRCNN`` or ``FasterRCNN`` with a :class:`PIIPBackboneWithFPN` backbone (any device, ``meta``
            included). Its class count picks the class layout: 91 (COCO category ids), 81 (mmdet order + 1) or
            anything else (classifiers not converted, reported).
        strict: Checkpoint tensors no rule maps are an error; without ``strict`` they are reported as unused.
            Model tensors the checkpoint lacks, and shape mismatches, are always an error.

    Returns:
        The tensors to load (model names and dtypes) and what was left out.

    Raises:
        CheckpointMismatchError: Missing, (with ``strict``) unexpected or mis-shaped tensors, all listed.
        ValueError: The checkpoint's ``meta.CLASSES`` are not COCO's while the model maps classes to COCO ids.
    """
    tensors = _detector_state_dict(checkpoint)
    classes = _checkpoint_classes(checkpoint)
    expected = model.state_dict()
    prefix, piip = _piip_prefix(model)

    backbone = {k: v for k, v in tensors.items() if k.startswith("backbone.")}
    converted = {prefix + k: v for k, v in adapt_state_dict(backbone, piip).items()}
    unexpected: dict[str, tuple[int, ...]] = {}  # checkpoint tensors no rule maps (mmdet or converted names)
    unused, kept = [], []
    for key, value in tensors.items():
        if key in backbone:
            continue
        module, _, param = key.rpartition(".")
        if module in _CLASSIFIERS:
            target_module, rows, background_last = _CLASSIFIERS[module]
            target = f"{target_module}.{param}"
            if target not in expected:
                unused.append(key)
                continue
            num_mmdet_classes = value.shape[0] // rows - int(background_last)
            slots = _class_slots(num_mmdet_classes, expected[target].shape[0] // rows)
            if slots is None:
                unused.append(key)
                kept.append(target)
                continue
            if classes is not None and slots == list(COCO_CATEGORY_IDS) and classes != COCO_CLASSES:
                raise ValueError(
                    "the checkpoint's classes (meta.CLASSES) are not COCO's 80 in mmdet order, so they have no COCO "
                    "category ids; build the detector with num_classes = number of classes + 1"
                )
            converted[target] = _move_classes(value, expected[target], slots, rows, background_last)
            continue
        for pattern, repl in _RENAMES:
            renamed, count = pattern.subn(repl, key)
            if count:
                break
        if not count:
            unexpected[key] = tuple(value.shape)
        elif renamed not in expected and key.startswith(_MASK_HEAD):
            unused.append(key)
        else:
            converted[renamed] = value

    unexpected.update({k: tuple(v.shape) for k, v in converted.items() if k not in expected})
    converted = {k: v for k, v in converted.items() if k in expected}
    if not strict:
        unused += list(unexpected)
        unexpected = {}
    missing = [f"{k} {tuple(v.shape)}" for k, v in expected.items() if k not in converted and k not in kept]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in converted.items() if v.shape != expected[k].shape
    ]
    wrong_dtype = dtype_mismatches(converted, expected)
    if missing or unexpected or mismatched or wrong_dtype:
        raise CheckpointMismatchError(
            f"the mmdet checkpoint does not fit this {type(model).__name__} (nothing was loaded): {len(missing)} "
            f"missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped and {len(wrong_dtype)} "
            "wrong-dtype tensors (torchvision names; mmdet names where no rule applies)"
            + _listing("missing from the checkpoint", missing)
            + _listing("not in the model", [f"{k} {shape}" for k, shape in unexpected.items()])
            + _listing("shape mismatch", mismatched)
            + _listing("dtype mismatch (integer or bool tensors are never cast to floats)", wrong_dtype)
        )
    state_dict = {k: v.to(expected[k].dtype) for k, v in converted.items()}
    return state_dict, ConversionReport(tuple(unused), tuple(kept), classes)


def load_mmdet_checkpoint(
    model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], strict: bool = True
) -> ConversionReport:
    """Loads a PIIP mmdet Mask R-CNN checkpoint into a torchvision detector.

    A file is read without executing anything from it (:func:`piip_models.hub.read_checkpoint`: safetensors, or a
    pickle restricted to tensors and plain containers). Nothing is copied unless the whole checkpoint fits
    (:func:`convert_mmdet_checkpoint`). What was left out is logged (INFO) and returned.

    Args:
        model: ``MaskRCNN``/``FasterRCNN`` around a :class:`PIIPBackboneWithFPN`.
        checkpoint: A checkpoint file (``.pth`` or ``.safetensors``) or an already read checkpoint.
        strict: Refuse checkpoint tensors no rule maps (without it they are reported unused and skipped).
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint)
    state_dict, report = convert_mmdet_checkpoint(checkpoint, model, strict)
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=False)  # complete but for report.kept, checked above
    _logger.info("loaded an mmdet checkpoint into %s: %s", type(model).__name__, report)
    return report
