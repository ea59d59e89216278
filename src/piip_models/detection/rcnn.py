"""Mask R-CNN and Faster R-CNN on PIIP backbones, set up as the released mmdet 2.x detectors.

:func:`mask_rcnn` returns a stock ``torchvision.models.detection.MaskRCNN`` whose pieces follow the official
``mask_rcnn_r50_fpn`` base config with the PIIP test pipelines: the image transform (mean/std of the detection
config, its test scale and pad divisor, mmcv's rounding), anchors (sizes 32..512, ratios 0.5/1/2, strides 4..64, not
rounded), box coders (target stds 1/1/1/1 for the RPN, 0.1/0.1/0.2/0.2 for the RoI head, symmetric ``dw``/``dh``
clamp), RoI pooling (``RoIAlign(7 / 14, sampling_ratio=0, aligned=True)``, mmdet's level mapping), test-time
thresholds (RPN 1000 per level / 1000 / NMS 0.7 / boxes wider than 0; RCNN score > 0.05, NMS 0.5, 100 detections)
and COCO classes numbered by category id. ``pretrained=True`` on a ``coco_mask_rcnn`` tag loads the whole released
detector.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any

import timm
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN

from ..hub import fetch_checkpoint
from .backbone import PIIPBackboneWithFPN
from .convert import load_mmdet_checkpoint
from .layers import MMDetAnchorGenerator, MMDetBoxCoder, MMDetRoIAlign, MMDetTransform

__all__ = ["MASK_RCNN_TAG", "faster_rcnn", "mask_rcnn", "transform_cfg"]

_logger = logging.getLogger(__name__)

#: Tag of the released mmdet Mask R-CNN checkpoints (``OpenGVLab/PIIP`` ``detection/mask_rcnn_*.pth``).
MASK_RCNN_TAG = "coco_mask_rcnn"

_STRIDES = (4, 8, 16, 32)
_LEVELS = ["0", "1", "2", "3"]


def _pyramid_scale(size: int) -> tuple[int, int, int]:
    """The ViT pyramids' ``img_scale=(L, L * 800 // 1333)`` with ``Pad(size_divisor=224)``."""
    return size, size * 800 // 1333, 224


# (longer side, shorter side, pad divisor) of the test pipeline of each official Mask R-CNN config
_TEST_SCALES: dict[str, tuple[int, int, int]] = {
    **{name: _pyramid_scale(int(name.split("_")[2])) for name in (
        "piip_tsb_1120_896_448", "piip_tsb_1568_896_448", "piip_tsb_1568_1120_672", "piip_sbl_1120_672_448",
        "piip_sbl_1344_896_448", "piip_sbl_1568_896_672", "piip_sbl_1568_1120_672", "piip_tsbl_1344_896_672_448",
        "piip_tsbl_1568_1120_672_448", "piip_tsbl_1792_1568_1120_448", "piip_sbl_1568_1120_672_augreg",
        "piip_sbl_1568_1120_672_augreg_speedup", "piip_sbl_1568_1120_672_mae", "piip_sbl_1568_1120_672_dinov2",
        "piip_sbl_1568_1120_672_beitv2",
    )},
    "piip_baseline_vit_b_1024": (1024, 614, 64),
    "piip_baseline_vit_l_1024": (1024, 614, 64),
    "piip_baseline_convnext_b_1024": (1024, 614, 64),
    # InternViT-6B configs (``*_ms``): COCO's (1333, 800); LH6B scales it by 1536 / 1024
    "piip_h6b_1024_512": (1333, 800, 64),
    "piip_h6b_1024_512_speedup": (1333, 800, 64),
    "piip_baseline_internvit_6b_1024": (1333, 800, 64),
    "piip_lh6b_1536_1024_512": (1999, 1200, 64),
    # the released ConvNeXt detector inherits COCO's pipeline; the other ConvNeXt combinations test at 1024
    "piip_ct_cs_cb_1024_672_448": (1333, 800, 32),
    **{name: (1024, 614, 32) for name in (
        "piip_ct_vs_vb_1024_672_448", "piip_ct_cs_vb_1024_672_448", "piip_ct_vs_cb_1024_672_448",
        "piip_vt_cs_vb_1024_672_448", "piip_vt_cs_cb_1024_672_448", "piip_vt_vs_cb_1024_672_448",
    )},
}


def transform_cfg(model: str | Mapping[str, Any]) -> dict[str, Any]:
    """torchvision transform arguments reproducing a model's official Mask R-CNN test pipeline.

    Args:
        model: A registered model name (optionally with a tag), or a backbone's timm ``pretrained_cfg`` (its
            ``architecture`` picks the config, its ``mean``/``std`` are the detection config's normalisation).

    Returns:
        ``min_size``, ``max_size``, ``size_divisible``, ``image_mean`` and ``image_std``. Models without an official
        Mask R-CNN config (segmentation backbones) get ``(L, L * 800 // 1333)`` for their input size ``L``, padded
        to 32.
    """
    cfg = model
    if isinstance(model, str):
        registered = timm.get_pretrained_cfg(model)
        if registered is None:
            raise ValueError(f"unknown model {model!r}")
        cfg = registered.to_dict()
    architecture = cfg.get("architecture")
    if architecture in _TEST_SCALES:
        max_size, min_size, size_divisible = _TEST_SCALES[architecture]
    else:
        size = cfg["input_size"][-1]
        max_size, min_size, size_divisible = size, size * 800 // 1333, 32
    return dict(
        min_size=min_size,
        max_size=max_size,
        size_divisible=size_divisible,
        image_mean=list(cfg["mean"]),
        image_std=list(cfg["std"]),
    )


def _detector_arguments(detector: type) -> set[str]:
    names = set(inspect.signature(detector.__init__).parameters) - {"self", "backbone", "kwargs"}
    return names | {"size_divisible", "fixed_size"}  # GeneralizedRCNNTransform's, passed through **kwargs


def _build(
    detector: type[FasterRCNN],
    model_name: str,
    pretrained: bool,
    num_classes: int,
    checkpoint_path: str | os.PathLike | None,
    backbone_kwargs: Mapping[str, Any] | None,
    cache_dir: str | os.PathLike | None,
    kwargs: dict[str, Any],
) -> FasterRCNN:
    unknown = sorted(set(kwargs) - _detector_arguments(detector))
    if unknown:
        raise TypeError(f"{detector.__name__} has no arguments {unknown} (backbone arguments go in backbone_kwargs)")
    if pretrained and checkpoint_path is not None:
        raise ValueError("pass either pretrained=True (the tag's released detector) or checkpoint_path, not both")
    tag_cfg = timm.get_pretrained_cfg(model_name) if ":" not in model_name else None
    released = pretrained and tag_cfg is not None and tag_cfg.tag == MASK_RCNN_TAG
    if pretrained and not released:
        _logger.info("%s has no released Mask R-CNN checkpoint: pretrained=True loads the backbone only", model_name)
    backbone_kwargs = dict(backbone_kwargs or {})
    if cache_dir is not None:
        backbone_kwargs["cache_dir"] = cache_dir
    backbone = PIIPBackboneWithFPN(model_name, pretrained=pretrained and not released, **backbone_kwargs)
    if backbone.strides != _STRIDES:
        raise ValueError(
            f"{detector.__name__} needs the 4-level pyramid of the released detectors (strides {_STRIDES}); "
            f"{model_name} has strides {backbone.strides}: wrap it in PIIPBackboneWithFPN and build the detector "
            "with anchors and RoI poolers for those levels"
        )
    arguments = dict(
        num_classes=num_classes,
        **transform_cfg(backbone.pretrained_cfg),
        rpn_anchor_generator=MMDetAnchorGenerator(),
        rpn_pre_nms_top_n_train=2000,
        rpn_post_nms_top_n_train=1000,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_test=1000,
        rpn_nms_thresh=0.7,
        box_roi_pool=MMDetRoIAlign(_LEVELS, 7),
        box_score_thresh=0.05,
        box_nms_thresh=0.5,
        box_detections_per_img=100,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
    )
    if detector is MaskRCNN:
        arguments["mask_roi_pool"] = MMDetRoIAlign(_LEVELS, 14)
    model = detector(backbone, **{**arguments, **kwargs})
    t = model.transform
    model.transform = MMDetTransform(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible, t.fixed_size)
    model.rpn.box_coder = MMDetBoxCoder((1.0, 1.0, 1.0, 1.0))
    # mmdet's min_bbox_size=0 keeps proposals with w > 0 and h > 0; torchvision keeps w, h >= min_size
    model.rpn.min_size = torch.finfo(torch.float32).tiny
    model.roi_heads.box_coder = MMDetBoxCoder(model.roi_heads.box_coder.weights)
    if released:
        load_mmdet_checkpoint(
            model, fetch_checkpoint(tag_cfg.hf_hub_id, tag_cfg.hf_hub_filename, cache_dir=cache_dir)
        )
    elif checkpoint_path is not None:
        load_mmdet_checkpoint(model, checkpoint_path)
    return model


def mask_rcnn(
    model_name: str,
    pretrained: bool = False,
    *,
    num_classes: int = 91,
    checkpoint_path: str | os.PathLike | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> MaskRCNN:
    """A torchvision ``MaskRCNN`` on a PIIP backbone, configured as the released mmdet detector of that backbone.

    Args:
        model_name: A dense PIIP model, optionally with a tag (``"piip_tsb_1568_1120_672"``,
            ``"piip_sbl_1568_1120_672_beitv2.coco_mask_rcnn"``, ``"piip_tsb_1568_1120_672.branches"``).
        pretrained: Load weights: the whole released detector for a ``coco_mask_rcnn`` tag (the default tag of the
            released detectors; fetched from ``OpenGVLab/PIIP`` and hash-checked), the backbone alone for other tags.
        num_classes: Classes including background. 91: labels are COCO category ids (torchvision's COCO
            convention, names in :func:`piip_models.detection.coco_categories`); 81: label ``j + 1`` is mmdet class
            ``j``; anything else (fine-tuning): the class-specific layers start fresh, every other layer is loaded.
        checkpoint_path: A local mmdet Mask R-CNN checkpoint of this backbone to load instead (``.pth`` or
            ``.safetensors``).
        backbone_kwargs: ``timm.create_model`` arguments of the backbone (``img_size``, ``branch_sizes``,
            ``drop_path_rate``, ...).
        cache_dir: Hugging Face cache folder for the checkpoint download.
        **kwargs: ``MaskRCNN`` arguments overriding the mmdet settings (``min_size``, ``max_size``,
            ``size_divisible``, ``box_score_thresh``, ``rpn_post_nms_top_n_test``, ...); unknown ones raise
            ``TypeError``.

    Raises:
        ValueError: The backbone is not a 4-level stride-4..32 pyramid, or both ``pretrained`` and
            ``checkpoint_path`` are given.
        piip_models.weights.CheckpointMismatchError: The checkpoint does not fit (nothing was loaded).
        piip_models.hub.CheckpointError: The checkpoint is not cached while offline, or corrupt.
    """
    return _build(MaskRCNN, model_name, pretrained, num_classes, checkpoint_path, backbone_kwargs, cache_dir, kwargs)


def faster_rcnn(
    model_name: str,
    pretrained: bool = False,
    *,
    num_classes: int = 91,
    checkpoint_path: str | os.PathLike | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> FasterRCNN:
    """:func:`mask_rcnn` without the mask branch: a torchvision ``FasterRCNN``. A released Mask R-CNN checkpoint
    loads all but its mask head (reported at INFO)."""
    return _build(FasterRCNN, model_name, pretrained, num_classes, checkpoint_path, backbone_kwargs, cache_dir, kwargs)
