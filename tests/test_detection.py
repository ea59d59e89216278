"""piip_models.detection: the released mmdet Mask R-CNN detectors in torchvision.

The mmdet side is written here from mmdet 2.x / mmcv 1.x definitions (reference mmdet_maskrcnn.md): the checkpoint
layout of the neck and heads, ``DeltaXYWHBBoxCoder``, ``AnchorGenerator``, mmcv ``RoIAlign`` and
``SingleRoIExtractor.map_roi_levels``, ``RPNHead._get_bboxes_single``, ``multiclass_nms``, ``FCNMaskHead`` and its
mask paste; torchvision's side is the built detector.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN, MaskRCNN_ResNet50_FPN_Weights
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, batched_nms

from piip_models.detection import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    MMDetTransform,
    PIIPBackboneWithFPN,
    coco_categories,
    convert_mmdet_checkpoint,
    faster_rcnn,
    load_mmdet_checkpoint,
    mask_rcnn,
    transform_cfg,
)
from piip_models.hub import OFFICIAL_REPO, CheckpointError
from piip_models.weights import CheckpointMismatchError

from .conftest import fixtures_dir
from .test_hub import official_layout, offline  # noqa: F401  (offline is a fixture)
from .test_models import tiny_branches
from .test_pretrained import seed_hub, torch_bytes

MASK_RCNN_TAGS = sorted(n for n in timm.list_models("piip_*", pretrained=True, include_tags=True)
                        if n.endswith(".coco_mask_rcnn"))
TINY = dict(branches=tiny_branches())  # 3 ViT branches, widths 96/64/32: a 96-channel pyramid
COCO_IDS = torch.tensor(COCO_CATEGORY_IDS)


# ----------------------------------------------------------------------------------------------------------------
# mmdet definitions


def mmdet_head_layout(in_channels: list[int], num_classes: int = 80) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of mmdet's FPN(out 256) + RPNHead + Shared2FCBBoxHead + FCNMaskHead (mask_rcnn_r50_fpn)."""
    layout: dict[str, tuple[int, ...]] = {}

    def add(name, weight):
        layout[f"{name}.weight"], layout[f"{name}.bias"] = weight, weight[:1]

    for i, channels in enumerate(in_channels):
        add(f"neck.lateral_convs.{i}.conv", (256, channels, 1, 1))
        add(f"neck.fpn_convs.{i}.conv", (256, 256, 3, 3))
    add("rpn_head.rpn_conv", (256, 256, 3, 3))
    add("rpn_head.rpn_cls", (3, 256, 1, 1))  # 3 anchors x 1 sigmoid logit
    add("rpn_head.rpn_reg", (12, 256, 1, 1))
    add("roi_head.bbox_head.shared_fcs.0", (1024, 256 * 7 * 7))
    add("roi_head.bbox_head.shared_fcs.1", (1024, 1024))
    add("roi_head.bbox_head.fc_cls", (num_classes + 1, 1024))
    add("roi_head.bbox_head.fc_reg", (4 * num_classes, 1024))
    for i in range(4):
        add(f"roi_head.mask_head.convs.{i}.conv", (256, 256, 3, 3))
    add("roi_head.mask_head.upsample", (256, 256, 2, 2))
    add("roi_head.mask_head.conv_logits", (num_classes, 256, 1, 1))
    return layout


def mmdet_checkpoint(backbone: dict[str, tuple[int, ...]], in_channels: list[int], make=torch.randn) -> dict:
    """An mmcv detector checkpoint: ``meta`` and ``state_dict`` with the ``backbone.`` prefix and the heads."""
    layout = {**{f"backbone.{k}": v for k, v in backbone.items()}, **mmdet_head_layout(in_channels)}
    return {"meta": {"CLASSES": COCO_CLASSES, "mmdet_version": "2.25.3"},
            "state_dict": {k: make(shape) * 0.1 for k, shape in layout.items()}}


def delta2bbox(rois, deltas, stds, max_shape):
    """DeltaXYWHBBoxCoder.decode (means 0, wh_ratio_clip 16/1000, clip_border)."""
    n, num_classes = deltas.shape[0], deltas.shape[1] // 4
    d = deltas.reshape(-1, 4) * deltas.new_tensor(stds)
    rois = rois.repeat(1, num_classes).reshape(-1, 4)
    pxy, pwh = (rois[:, :2] + rois[:, 2:]) * 0.5, rois[:, 2:] - rois[:, :2]
    max_ratio = abs(math.log(16 / 1000))
    gxy, gwh = pxy + pwh * d[:, :2], pwh * d[:, 2:].clamp(min=-max_ratio, max=max_ratio).exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, max_shape[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, max_shape[0])
    return boxes.reshape(n, -1)


def mmdet_anchors(featmap_sizes, strides=(4, 8, 16, 32, 64), ratios=(0.5, 1.0, 2.0), scale=8.0):
    """AnchorGenerator(scales=[8], ratios, strides), center_offset 0: base anchors of size stride * 8, not rounded,
    shifted by (x * stride, y * stride), location-major."""
    anchors = []
    for (h, w), stride in zip(featmap_sizes, strides):
        h_ratios = torch.sqrt(torch.tensor(ratios))
        ws, hs = stride / h_ratios * scale, stride * h_ratios * scale
        base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)
        xx = (torch.arange(w) * stride).repeat(h)
        yy = (torch.arange(h) * stride).repeat_interleave(w)
        anchors.append((base[None] + torch.stack([xx, yy, xx, yy], dim=-1)[:, None].float()).reshape(-1, 4))
    return anchors


def linear(x, state_dict, name):
    return F.linear(x, state_dict[f"{name}.weight"], state_dict[f"{name}.bias"])


def _bilinear_matrix(coords: torch.Tensor, size: int) -> torch.Tensor:
    """mmcv bilinear_interpolate along one axis as a (len(coords), size) weight matrix (zero rows outside)."""
    weights = torch.zeros(len(coords), size, dtype=torch.float64)
    for row, c in enumerate(coords.tolist()):
        if c < -1.0 or c > size:
            continue
        c = max(c, 0.0)
        low = int(c)
        high = low + 1
        if low >= size - 1:
            low = high = size - 1
            c = float(low)
        weights[row, low] += 1 - (c - low)
        weights[row, high] += c - low
    return weights


def mmcv_roi_align(feature, roi, output_size, spatial_scale):
    """mmcv RoIAlign(aligned=True, sampling_ratio=0, avg) of one (C, H, W) map and one (x1, y1, x2, y2) box."""
    x1, y1, x2, y2 = (roi.double() * spatial_scale - 0.5).tolist()
    axes = []
    for start, length, size in ((y1, y2 - y1, feature.shape[1]), (x1, x2 - x1, feature.shape[2])):
        bin_size, grid = length / output_size, math.ceil(length / output_size)
        samples = torch.tensor([start + p * bin_size + (i + 0.5) * bin_size / grid
                                for p in range(output_size) for i in range(grid)])
        axes.append((_bilinear_matrix(samples, size), max(grid, 1)))
    (wy, gy), (wx, gx) = axes
    sampled = wy @ feature.double() @ wx.T  # (C, out * gy, out * gx)
    return sampled.reshape(-1, output_size, gy, output_size, gx).mean(dim=(2, 4)).float()


def mmdet_roi_levels(boxes, num_levels=4, finest_scale=56):
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


def mmdet_paste(masks, boxes, height, width):
    """FCNMaskHead._do_paste_mask over the whole image (mmdet's GPU path), before the >= 0.5 threshold."""
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    img_y = ((torch.arange(height).float() + 0.5) - y0) / (y1 - y0) * 2 - 1
    img_x = ((torch.arange(width).float() + 0.5) - x0) / (x1 - x0) * 2 - 1
    n = len(masks)
    grid = torch.stack([img_x[:, None, :].expand(n, height, width), img_y[:, :, None].expand(n, height, width)], 3)
    return F.grid_sample(masks.float(), grid, align_corners=False)[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# Builders, the adapter and the checkpoint conversion


def _meta_mask_rcnn(name: str, **kwargs) -> MaskRCNN:
    with torch.device("meta"):
        return mask_rcnn(name, **kwargs)


def _piip(model):
    return model.backbone.body.model


def test_every_released_family_has_a_mask_rcnn_tag():
    families = ("tsb_", "sbl_1120", "tsbl_", "augreg.", "augreg_speedup", "mae", "dinov2", "beitv2", "vit_b", "vit_l",
                "ct_cs_cb", "h6b_1024_512.", "h6b_1024_512_speedup", "internvit_6b")
    assert len(MASK_RCNN_TAGS) == 21
    assert all(any(f in tag for tag in MASK_RCNN_TAGS) for f in families)


@pytest.mark.parametrize("tag", MASK_RCNN_TAGS)
def test_released_detector_converts_from_the_exact_mmdet_layout(tag):
    model = _meta_mask_rcnn(tag)
    layout = official_layout(_piip(model))
    checkpoint = mmdet_checkpoint(layout, model.backbone.body.feature_info.channels(), make=lambda s: torch.empty(s,
                                  device="meta"))
    state_dict, report = convert_mmdet_checkpoint(checkpoint, model)
    expected = model.state_dict()
    assert state_dict.keys() == expected.keys()
    assert all(state_dict[k].shape == v.shape for k, v in expected.items())
    assert not report.unused and not report.kept and report.classes == COCO_CLASSES


def test_released_key_list_converts_with_nothing_missing_or_unexpected():
    path = fixtures_dir() / "keys_det_mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    backbone = {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
    model = _meta_mask_rcnn("piip_tsb_1568_1120_672", num_classes=81)
    checkpoint = mmdet_checkpoint(backbone, [768] * 4, make=lambda s: torch.empty(s, device="meta"))
    state_dict, report = convert_mmdet_checkpoint(checkpoint, model)
    assert state_dict.keys() == model.state_dict().keys() and not report.unused


def _tiny_checkpoint(model) -> dict:
    return mmdet_checkpoint(official_layout(_piip(model)), model.backbone.body.feature_info.channels())


def test_loader_checks_everything_before_copying_anything():
    model = mask_rcnn("piip_tsb_1568_1120_672", backbone_kwargs=TINY)
    checkpoint = _tiny_checkpoint(model)
    tensors = checkpoint["state_dict"]
    del tensors["neck.fpn_convs.2.conv.bias"]
    tensors["roi_head.bbox_head.fc_extra.weight"] = torch.zeros(3)
    tensors["rpn_head.rpn_conv.weight"] = torch.zeros(256, 256, 1, 1)
    del tensors["backbone.branch1.blocks.0.norm1.weight"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as error:
        load_mmdet_checkpoint(model, checkpoint)
    message = str(error.value)
    for expected in ("backbone.fpn.layer_blocks.2.0.bias", "roi_head.bbox_head.fc_extra.weight",
                     "rpn.head.conv.0.0.weight: checkpoint (256, 256, 1, 1)", "branches.0.blocks.0.norm1.weight",
                     "nothing was loaded"):
        assert expected in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_non_strict_loading_reports_unknown_tensors_instead():
    model = mask_rcnn("piip_tsb_1568_1120_672", backbone_kwargs=TINY)
    checkpoint = _tiny_checkpoint(model)
    checkpoint["state_dict"]["roi_head.bbox_head.fc_extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match="fc_extra"):
        load_mmdet_checkpoint(model, checkpoint)
    report = load_mmdet_checkpoint(model, checkpoint, strict=False)
    assert report.unused == ("roi_head.bbox_head.fc_extra.weight",)
    assert torch.equal(model.rpn.head.conv[0][0].weight, checkpoint["state_dict"]["rpn_head.rpn_conv.weight"])
    del checkpoint["state_dict"]["rpn_head.rpn_conv.bias"]  # a missing tensor is never skipped
    with pytest.raises(CheckpointMismatchError, match="rpn.head.conv.0.0.bias"):
        load_mmdet_checkpoint(model, checkpoint, strict=False)


def test_loader_places_every_tensor_and_reports_what_it_leaves_out(tmp_path, caplog):
    model = mask_rcnn("piip_tsb_1568_1120_672", backbone_kwargs=TINY, num_classes=81)
    checkpoint = _tiny_checkpoint(model)
    tensors = checkpoint["state_dict"]
    path = tmp_path / "mask_rcnn.pth"
    torch.save({**checkpoint, "state_dict": {f"module.{k}": v for k, v in tensors.items()}}, path)  # DDP prefix
    report = load_mmdet_checkpoint(model, path)
    assert not report.unused and not report.kept
    own = model.state_dict()
    for mmdet_key, key in (("neck.lateral_convs.1.conv.weight", "backbone.fpn.inner_blocks.1.0.weight"),
                           ("neck.fpn_convs.3.conv.bias", "backbone.fpn.layer_blocks.3.0.bias"),
                           ("rpn_head.rpn_reg.weight", "rpn.head.bbox_pred.weight"),
                           ("roi_head.bbox_head.shared_fcs.0.weight", "roi_heads.box_head.fc6.weight"),
                           ("roi_head.mask_head.convs.3.conv.weight", "roi_heads.mask_head.3.0.weight"),
                           ("roi_head.mask_head.upsample.weight", "roi_heads.mask_predictor.conv5_mask.weight"),
                           ("backbone.fpn1.0.weight", "backbone.body.model.fpn.p2.0.weight"),
                           ("backbone.w2", None)):
        target = own[key] if key else own["backbone.body.model.branch_weights"][1]
        assert torch.equal(target, tensors[mmdet_key].reshape(target.shape)), mmdet_key
    # compact layout: mmdet class j -> j + 1, background 80 -> 0
    cls = tensors["roi_head.bbox_head.fc_cls.bias"]
    assert torch.equal(own["roi_heads.box_predictor.cls_score.bias"], torch.cat([cls[-1:], cls[:-1]]))

    faster = faster_rcnn("piip_tsb_1568_1120_672", backbone_kwargs=TINY, num_classes=5)
    with caplog.at_level(logging.INFO, logger="piip_models"):
        report = load_mmdet_checkpoint(faster, checkpoint)
    assert sorted(report.unused) == sorted(
        [k for k in tensors if k.startswith("roi_head.mask_head.") or ".fc_cls." in k or ".fc_reg." in k])
    assert set(report.kept) == {f"roi_heads.box_predictor.{m}.{p}" for m in ("cls_score", "bbox_pred")
                                for p in ("weight", "bias")}
    assert "checkpoint tensors not loaded" in caplog.text


def test_other_classes_cannot_take_coco_category_ids():
    model = _meta_mask_rcnn("piip_tsb_1568_1120_672", backbone_kwargs=TINY)
    checkpoint = _tiny_checkpoint(model)
    checkpoint["meta"]["CLASSES"] = tuple(reversed(COCO_CLASSES))
    with pytest.raises(ValueError, match="not COCO's 80"):
        convert_mmdet_checkpoint(checkpoint, model)


def _loaded_tiny(num_classes: int = 91, **kwargs):
    model = mask_rcnn("piip_tsb_1568_1120_672", backbone_kwargs=TINY, num_classes=num_classes, **kwargs).eval()
    checkpoint = _tiny_checkpoint(model)
    load_mmdet_checkpoint(model, checkpoint)
    return model, checkpoint["state_dict"]


@pytest.mark.parametrize("num_classes", [91, 81])
def test_converted_heads_give_mmdet_scores_per_coco_class(num_classes):
    model, mm = _loaded_tiny(num_classes)
    slots = COCO_IDS if num_classes == 91 else torch.arange(1, 81)
    roi_features = torch.randn(12, 256, 7, 7)
    with torch.no_grad():
        # Shared2FCBBoxHead: flatten, two ReLU FCs, then fc_cls (background last) and fc_reg (4 per class)
        x = roi_features.flatten(1)
        for i in range(2):
            x = F.relu(linear(x, mm, f"roi_head.bbox_head.shared_fcs.{i}"))
        mm_scores = linear(x, mm, "roi_head.bbox_head.fc_cls").softmax(-1)
        mm_deltas = linear(x, mm, "roi_head.bbox_head.fc_reg")
        logits, deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(roi_features))
    scores = logits.softmax(-1)
    assert scores.shape == (12, num_classes)
    torch.testing.assert_close(scores[:, slots], mm_scores[:, :80], rtol=0, atol=1e-6)
    torch.testing.assert_close(scores[:, 0], mm_scores[:, 80], rtol=0, atol=1e-6)
    assert scores[:, [c for c in range(num_classes) if c not in slots.tolist() + [0]]].eq(0).all()
    torch.testing.assert_close(deltas.reshape(12, -1, 4)[:, slots], mm_deltas.reshape(12, 80, 4), rtol=0, atol=1e-5)

    mask_features = torch.randn(5, 256, 14, 14)
    with torch.no_grad():  # FCNMaskHead: 4 x (conv3x3 + ReLU), deconv 2x2/2 + ReLU, conv 1x1 per class
        y = mask_features
        for i in range(4):
            y = F.relu(F.conv2d(y, mm[f"roi_head.mask_head.convs.{i}.conv.weight"],
                                mm[f"roi_head.mask_head.convs.{i}.conv.bias"], padding=1))
        y = F.relu(F.conv_transpose2d(y, mm["roi_head.mask_head.upsample.weight"],
                                      mm["roi_head.mask_head.upsample.bias"], stride=2))
        mm_masks = F.conv2d(y, mm["roi_head.mask_head.conv_logits.weight"], mm["roi_head.mask_head.conv_logits.bias"])
        masks = model.roi_heads.mask_predictor(model.roi_heads.mask_head(mask_features))
    torch.testing.assert_close(masks[:, slots], mm_masks, rtol=0, atol=1e-5)


def test_detections_follow_mmdet_multiclass_nms_with_coco_ids():
    model, mm = _loaded_tiny()
    # proposals inside the image and moderate deltas: no box is clipped to nothing (torchvision would drop it)
    features, shape = torch.randn(300, 1024), (181, 233)
    proposals = torch.rand(300, 2) * torch.tensor([140.0, 100.0])
    proposals = torch.cat([proposals, proposals + torch.rand(300, 2) * 70 + 1], dim=1)
    with torch.no_grad():
        mm_logits = linear(features * 30, mm, "roi_head.bbox_head.fc_cls")
        mm_deltas = linear(features, mm, "roi_head.bbox_head.fc_reg")
        model.roi_heads.box_predictor.cls_score.weight.mul_(30)  # confident scores: many detections
        boxes, scores, labels = (r[0] for r in model.roi_heads.postprocess_detections(
            *model.roi_heads.box_predictor(features), [proposals], [shape]))
    # BBoxHead.get_bboxes + multiclass_nms(score_thr 0.05, nms 0.5, max_num 100)
    mm_scores = mm_logits.softmax(-1)[:, :-1]
    mm_boxes = delta2bbox(proposals, mm_deltas, (0.1, 0.1, 0.2, 0.2), shape).reshape(-1, 4)
    mm_labels = torch.arange(80).repeat(300)
    valid = mm_scores.reshape(-1) > 0.05
    mm_boxes, mm_scores, mm_labels = mm_boxes[valid], mm_scores.reshape(-1)[valid], mm_labels[valid]
    keep = batched_nms(mm_boxes, mm_scores, mm_labels, 0.5)[:100]
    assert len(keep) == 100
    assert torch.equal(labels, COCO_IDS[mm_labels[keep]])
    torch.testing.assert_close(scores, mm_scores[keep], rtol=0, atol=1e-6)
    torch.testing.assert_close(boxes, mm_boxes[keep], rtol=0, atol=1e-4)


def test_tiny_detector_runs_end_to_end_with_coco_labels():
    model, _ = _loaded_tiny(box_score_thresh=0.0, min_size=160, max_size=224)
    with torch.no_grad():
        out = model([torch.rand(3, 150, 200), torch.rand(3, 96, 120)])
    for det, (h, w) in zip(out, [(150, 200), (96, 120)]):
        n = len(det["boxes"])
        assert n == 100 and det["masks"].shape == (n, 1, h, w)
        assert set(det["labels"].tolist()) <= set(COCO_CATEGORY_IDS)  # never background or an unused id
        # boxes clipped to the resized image, scaled back (up to float rounding)
        assert (det["boxes"][:, 2:] <= torch.tensor([w, h]) + 1e-3).all() and (det["boxes"] >= 0).all()
        assert ((det["masks"] >= 0) & (det["masks"] <= 1)).all()


def test_pretrained_tag_loads_the_released_detector_from_the_offline_cache(tmp_path, offline):  # noqa: F811
    tag = "piip_tsb_1568_1120_672.coco_mask_rcnn"
    reference = mask_rcnn(tag, backbone_kwargs=TINY)
    checkpoint = _tiny_checkpoint(reference)
    with pytest.raises(CheckpointError, match="mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16.pth"):
        mask_rcnn(tag, pretrained=True, backbone_kwargs=TINY, cache_dir=tmp_path)
    seed_hub(tmp_path, OFFICIAL_REPO, {timm.get_pretrained_cfg(tag).hf_hub_filename: torch_bytes(checkpoint)})
    model = mask_rcnn(tag, pretrained=True, backbone_kwargs=TINY, cache_dir=tmp_path)
    own, mm = model.state_dict(), checkpoint["state_dict"]
    assert torch.equal(own["rpn.head.cls_logits.weight"], mm["rpn_head.rpn_cls.weight"])
    assert torch.equal(own["backbone.body.model.branches.2.patch_embed.proj.weight"],
                       mm["backbone.branch3.patch_embed.proj.weight"])
    assert torch.equal(own["roi_heads.mask_predictor.mask_fcn_logits.bias"][COCO_IDS],
                       mm["roi_head.mask_head.conv_logits.bias"])


def test_builders_follow_the_released_configs():
    # test pipelines of the official configs: img_scale (long, short), Pad size_divisor, img_norm_cfg
    expected = {
        "piip_tsb_1568_1120_672": (941, 1568, 224, 0.5), "piip_tsbl_1792_1568_1120_448": (1075, 1792, 224, 0.5),
        "piip_baseline_vit_l_1024": (614, 1024, 64, 0.5), "piip_h6b_1024_512": (800, 1333, 64, 0.5),
        "piip_ct_cs_cb_1024_672_448": (800, 1333, 32, 0.485),
    }
    for name, (short, long, pad, mean) in expected.items():
        model = _meta_mask_rcnn(name)
        t = model.transform
        assert isinstance(t, MMDetTransform)
        assert (t.min_size, t.max_size, t.size_divisible, t.image_mean[0]) == ((short,), long, pad, mean), name
        assert transform_cfg(name) == dict(min_size=short, max_size=long, size_divisible=pad,
                                           image_mean=t.image_mean, image_std=t.image_std)
    rpn, roi = model.rpn, model.roi_heads
    assert (rpn._pre_nms_top_n, rpn._post_nms_top_n, rpn.nms_thresh) == (
        dict(training=2000, testing=1000), dict(training=1000, testing=1000), 0.7)
    assert 0 < rpn.min_size < 1e-30 and rpn.box_coder.weights == (1.0, 1.0, 1.0, 1.0)
    assert (roi.score_thresh, roi.nms_thresh, roi.detections_per_img) == (0.05, 0.5, 100)
    assert roi.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert (roi.box_roi_pool.output_size, roi.mask_roi_pool.output_size) == ((7, 7), (14, 14))
    assert roi.box_roi_pool.sampling_ratio == roi.mask_roi_pool.sampling_ratio == 0
    assert coco_categories() == MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="no arguments \\['box_treshold'\\]"):
        _meta_mask_rcnn("piip_tsb_1568_1120_672", box_treshold=0.3)
    with pytest.raises(TypeError, match="mask_roi_pool"):
        faster_rcnn("piip_tsb_1568_1120_672", mask_roi_pool=None)
    with pytest.raises(ValueError, match="not both"):
        mask_rcnn("piip_tsb_1568_1120_672", pretrained=True, checkpoint_path="x.pth")
    with pytest.raises(ValueError, match="strides \\(8, 16, 32\\)"):
        _meta_mask_rcnn("piip_sbl_1792_1120_672_dino")
    with pytest.raises(TypeError, match="features_only=True"):
        PIIPBackboneWithFPN(torch.nn.Linear(2, 2))


def test_import_piip_models_leaves_detection_unimported():
    code = "import sys, piip_models; assert 'piip_models.detection' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_one_training_step_through_the_adapter_with_stock_torchvision(one_thread):
    backbone = PIIPBackboneWithFPN("piip_tsb_1568_1120_672", **TINY)
    model = MaskRCNN(backbone, num_classes=3, min_size=160, max_size=224)  # stock torchvision from here on
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 160, 224))
    assert list(maps) == ["0", "1", "2", "3", "pool"] and backbone.strides == (4, 8, 16, 32)
    assert [tuple(m.shape[1:]) for m in maps.values()] == [(256, 40, 56), (256, 20, 28), (256, 10, 14),
                                                           (256, 5, 7), (256, 3, 4)]
    torch.testing.assert_close(maps["pool"], maps["3"][..., ::2, ::2])
    images = [torch.rand(3, 150, 200), torch.rand(3, 160, 160)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 120.0]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, 150, 200, dtype=torch.uint8)},
               {"boxes": torch.tensor([[30.0, 5.0, 150.0, 70.0]]), "labels": torch.tensor([2]),
                "masks": torch.ones(1, 160, 160, dtype=torch.uint8)}]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    optimizer.step()
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    for name in ("backbone.body.model.branches.0.blocks.0.attn.qkv.weight", "backbone.body.model.fpn.p2.0.weight",
                 "backbone.body.model.interactions.0.units.0.branch2to1_injector.ca_gamma",
                 "backbone.body.model.merges.1.0.weight", "backbone.body.model.branch_weights",
                 "backbone.fpn.inner_blocks.0.0.weight", "roi_heads.mask_predictor.mask_fcn_logits.weight"):
        assert not torch.equal(dict(model.named_parameters())[name], before[name]), name


# ----------------------------------------------------------------------------------------------------------------
# Components against mmdet's formulas


def test_box_decoding_uses_the_target_stds_and_a_symmetric_clamp():
    model = _meta_mask_rcnn("piip_tsb_1568_1120_672")
    rois = torch.rand(50, 2) * 300
    rois = torch.cat([rois, rois + torch.rand(50, 2) * 200 + 1], dim=1)
    deltas = torch.randn(50, 4 * 91) * 2
    deltas[:5, 2::4], deltas[5:10, 3::4] = -80.0, 80.0  # beyond the ratio clip, both ways
    for coder, stds in ((model.roi_heads.box_coder, (0.1, 0.1, 0.2, 0.2)), (model.rpn.box_coder, (1.0,) * 4)):
        decoded = coder.decode_single(deltas, rois)
        decoded[:, 0::2], decoded[:, 1::2] = decoded[:, 0::2].clamp(0, 400), decoded[:, 1::2].clamp(0, 300)
        torch.testing.assert_close(decoded, delta2bbox(rois, deltas, stds, (300, 400)), rtol=1e-6, atol=1e-4)
    stock = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(deltas[:5], rois[:5])
    assert not torch.allclose(stock, model.roi_heads.box_coder.decode_single(deltas[:5], rois[:5]), atol=1.0)


def test_anchors_for_strides_4_to_64():
    model = _meta_mask_rcnn("piip_tsb_1568_1120_672")
    sizes = [(56, 168), (28, 84), (14, 42), (7, 21), (4, 11)]  # a 224 x 672 padded batch: odd stride-32 grid
    images = ImageList(torch.zeros(1, 3, 224, 672), [(224, 650)])
    anchors = model.rpn.anchor_generator.to("cpu")(images, [torch.zeros(1, 256, h, w) for h, w in sizes])[0]
    assert torch.equal(anchors, torch.cat(mmdet_anchors(sizes)))
    assert anchors[0].tolist() == pytest.approx([-22.6274, -11.3137, 22.6274, 11.3137], abs=1e-4)  # not rounded


def test_aligned_roi_align_and_mmdet_level_mapping():
    pooler = _meta_mask_rcnn("piip_tsb_1568_1120_672").roi_heads.box_roi_pool
    squares = torch.tensor([[0.0, 0.0, s, s] for s in (20.0, 55.9, 56.0, 111.9, 112.0, 224.0, 448.0, 900.0)])
    assert pooler.roi_levels(squares).tolist() == mmdet_roi_levels(squares).tolist() == [0, 0, 0, 0, 1, 2, 3, 3]

    features = OrderedDict((str(i), torch.randn(2, 4, 256 // s, 320 // s)) for i, s in enumerate((4, 8, 16, 32)))
    sides = torch.tensor([3.0, 40.0, 70.0, 130.0, 200.0, 290.0, 420.0, 600.0])
    corners = torch.rand(len(sides), 2) * 60
    boxes = torch.cat([corners, corners + torch.stack([sides, sides * 0.7], dim=1)], dim=1)
    levels = mmdet_roi_levels(boxes)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    # image sizes torchvision would infer wrong strides from (100 / 256 rounds to 1/2 at stride 4): not used here
    pooled = pooler(features, [boxes[:4], boxes[4:]], [(100, 320), (60, 300)])
    for i, (box, level) in enumerate(zip(boxes, levels.tolist())):
        expected = mmcv_roi_align(features[str(level)][int(i >= 4)], box, 7, 1 / 4 / 2**level)
        torch.testing.assert_close(pooled[i], expected, rtol=1e-5, atol=1e-5)
    stock = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 0)(features, [boxes[:4], boxes[4:]], [(256, 320)] * 2)
    assert not torch.allclose(stock, pooled, atol=1e-2)


def test_rpn_proposals_follow_mmdet(one_thread):
    model, _ = _loaded_tiny()
    images = ImageList(torch.zeros(1, 3, 160, 224), [(150, 211)])
    sizes = [(40, 56), (20, 28), (10, 14), (5, 7), (3, 4)]
    features = OrderedDict((k, torch.randn(1, 256, h, w)) for k, (h, w) in zip(["0", "1", "2", "3", "pool"], sizes))
    with torch.no_grad():
        model.rpn.head.bbox_pred.weight.mul_(20)  # large deltas: some proposals leave the image (zero size)
        proposals = model.rpn(images, features)[0][0]
        cls_scores, bbox_preds = model.rpn.head(list(features.values()))
    # RPNHead._get_bboxes_single: per level sigmoid scores, top nms_pre=1000, decode, w > 0 and h > 0, NMS 0.7 per
    # level, max_per_img=1000
    scores, deltas, anchors, level_ids = [], [], [], []
    for level, (cls, reg, anc) in enumerate(zip(cls_scores, bbox_preds, mmdet_anchors(sizes))):
        s = cls[0].permute(1, 2, 0).reshape(-1).sigmoid()
        d = reg[0].permute(1, 2, 0).reshape(-1, 4)
        s, order = s.sort(descending=True)
        s, order = s[:1000], order[:1000]
        scores.append(s), deltas.append(d[order]), anchors.append(anc[order])
        level_ids.append(torch.full((len(s),), level))
    boxes = delta2bbox(torch.cat(anchors), torch.cat(deltas), (1.0,) * 4, (150, 211))
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    assert not valid.all()
    boxes, scores, level_ids = boxes[valid], torch.cat(scores)[valid], torch.cat(level_ids)[valid]
    keep = batched_nms(boxes, scores, level_ids, 0.7)[:1000]
    torch.testing.assert_close(proposals, boxes[keep], rtol=0, atol=1e-4)


def test_transform_resizes_as_mmcv_and_pastes_masks_as_mmdet():
    model = _meta_mask_rcnn("piip_tsb_1568_1120_672")
    transform = MMDetTransform(**{k: getattr(model.transform, k) for k in (
        "min_size", "max_size", "image_mean", "image_std", "size_divisible")}).eval()
    stock = GeneralizedRCNNTransform(941, 1568, [0.5] * 3, [0.5] * 3, size_divisible=224).eval()
    images = [torch.rand(3, 480, 640), torch.rand(3, 426, 640)]
    batch, _ = transform(images)
    assert batch.image_sizes == [(941, 1255), (941, 1414)]  # mmcv: int(side * scale + 0.5)
    assert batch.tensors.shape == (2, 3, 1120, 1568)
    assert stock(images)[0].image_sizes == [(941, 1254), (940, 1413)]

    masks = torch.rand(5, 1, 28, 28)
    boxes = torch.tensor([[10.0, 12.0, 60.0, 40.0], [0.0, 0.0, 199.0, 149.0], [50.5, 60.2, 51.3, 99.9],
                          [120.0, 30.0, 260.0, 140.0], [-10.0, 100.0, 40.0, 170.0]])
    pasted = transform.postprocess([{"boxes": boxes.clone(), "masks": masks}], [(150, 200)], [(150, 200)])[0]
    expected = mmdet_paste(masks, boxes, 150, 200)
    assert pasted["masks"].shape == (5, 1, 150, 200)
    assert torch.equal(pasted["masks"][:, 0] >= 0.5, expected >= 0.5)
    inside = pasted["masks"][:, 0] > 0
    torch.testing.assert_close(pasted["masks"][:, 0][inside], expected[inside], rtol=0, atol=1e-6)
