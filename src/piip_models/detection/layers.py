"""torchvision detection pieces that behave as mmdet 2.x does where torchvision's own cannot be configured to.

Each class subclasses the torchvision piece it replaces, so a stock ``MaskRCNN``/``FasterRCNN`` accepts it:

* :class:`MMDetTransform`: mmcv's resize rounding (``int(x * scale + 0.5)``, where ``F.interpolate`` floors) and
  mmdet's mask pasting (``grid_sample`` of each 28x28 mask over its box, instead of torchvision's integer-box paste).
* :class:`MMDetAnchorGenerator`: anchors without torchvision's rounding to whole pixels, at fixed level strides
  (torchvision infers ``padded size // grid``, e.g. 62 instead of 64 for an odd stride-32 grid).
* :class:`MMDetBoxCoder`: ``DeltaXYWHBBoxCoder.decode`` (deltas times the target stds, ``dw``/``dh`` clamped on both
  sides; torchvision clamps the maximum only).
* :class:`MMDetRoIAlign`: ``SingleRoIExtractor`` with ``RoIAlign(aligned=True)`` (torchvision's ``MultiScaleRoIAlign``
  pools with ``aligned=False``) at fixed feature strides and mmdet's level mapping (torchvision infers the strides
  from the first batch and caches them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes, resize_keypoints
from torchvision.ops import MultiScaleRoIAlign, roi_align

__all__ = [
    "MMDetAnchorGenerator", "MMDetBoxCoder", "MMDetRoIAlign", "MMDetTransform", "paste_masks", "rescaled_size"
]

# mmdet's DeltaXYWHBBoxCoder(wh_ratio_clip=16 / 1000): |log(dw)|, |log(dh)| <= |log(0.016)|
_WH_RATIO_CLIP = abs(math.log(16 / 1000))


def rescaled_size(height: int, width: int, short_side: int, long_side: int) -> tuple[int, int]:
    """mmcv ``imrescale`` with ``keep_ratio``: the largest scale that fits both limits, sides rounded half up."""
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Pastes ``(N, 1, M, M)`` mask probabilities into an image as mmdet's ``FCNMaskHead`` does.

    Every output pixel centre is mapped into its box and sampled bilinearly from the mask (``grid_sample``,
    ``align_corners=False``, zero outside); mmdet then binarises with ``>= 0.5``. Each mask is pasted over its box
    widened by a pixel (mmdet's CPU path): the probabilities outside that window, all below 0.5, are left at 0.

    Returns:
        ``(N, 1, H, W)`` float probabilities.
    """
    height, width = image_size
    out = masks.new_zeros(len(masks), 1, height, width, dtype=torch.float32)
    for mask, box, (x0, y0, x1, y1), target in zip(masks.float(), boxes.float(), boxes.tolist(), out):
        left, top = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
        right, bottom = min(math.ceil(x1) + 1, width), min(math.ceil(y1) + 1, height)
        if right <= left or bottom <= top:
            continue
        xs = torch.arange(left, right, device=box.device, dtype=torch.float32) + 0.5
        ys = torch.arange(top, bottom, device=box.device, dtype=torch.float32) + 0.5
        # a box of zero width or height maps its pixels to +-inf (nan on its edge): mmdet sets those to 0
        xs = torch.nan_to_num((xs - box[0]) / (box[2] - box[0]) * 2 - 1, posinf=0.0, neginf=0.0)
        ys = torch.nan_to_num((ys - box[1]) / (box[3] - box[1]) * 2 - 1, posinf=0.0, neginf=0.0)
        grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)
        target[:, top:bottom, left:right] = F.grid_sample(mask[None], grid[None], align_corners=False)[0]
    return out


class MMDetTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` with mmcv's resized sizes and mmdet's mask pasting.

    Sizes are ``int(side * scale + 0.5)`` with ``scale = min(min_size / short side, max_size / long side)``
    (``F.interpolate`` floors ``side * scale``: a 480x640 image at 941/1568 becomes 941x1254 instead of mmdet's
    941x1255). Output masks are :func:`paste_masks` probabilities; ``masks >= 0.5`` are mmdet's binary masks.
    Normalisation, padding and box rescaling are torchvision's (the same as mmdet's for the released configs).
    """

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        if self.fixed_size is not None or (self.training and self._skip_resize):
            return super().resize(image, target)
        height, width = image.shape[-2:]
        short_side = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        size = rescaled_size(height, width, short_side, self.max_size)
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, target
        target["boxes"] = resize_boxes(target["boxes"], [height, width], list(size))
        if "masks" in target:
            target["masks"] = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
        if "keypoints" in target:
            target["keypoints"] = resize_keypoints(target["keypoints"], [height, width], list(size))
        return image, target

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        masks = [prediction.pop("masks", None) for prediction in result]
        result = super().postprocess(result, image_shapes, original_image_sizes)
        for prediction, mask, size in zip(result, masks, original_image_sizes):
            if mask is not None:
                prediction["masks"] = paste_masks(mask, prediction["boxes"], size)
        return result


class MMDetAnchorGenerator(AnchorGenerator):
    """``AnchorGenerator`` with mmdet's ``AnchorGenerator(scales=[8], ratios=[0.5, 1, 2], strides=[4, ..., 64])``.

    Base anchors are centred on 0 and not rounded (mmdet keeps ``w = size / sqrt(ratio)`` fractional, torchvision
    rounds to whole pixels), and level ``i`` is shifted by ``strides[i]`` (torchvision divides the padded image size
    by the grid size, which is off for the stride-64 level whenever the stride-32 grid is odd).

    Args:
        sizes: Anchor sizes per level (mmdet: ``8 * stride``).
        aspect_ratios: Height / width ratios per level.
        strides: Feature stride of each level.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[int]] = ((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),) * 5,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
    ) -> None:
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in aspect_ratios))
        if len(strides) != len(self.sizes):
            raise ValueError(f"one stride per anchor level: {len(self.sizes)} levels, strides {tuple(strides)}")
        self.strides = tuple(int(s) for s in strides)

    def generate_anchors(
        self,
        scales: list[int],
        aspect_ratios: list[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} anchor levels")
        grid_sizes = [list(feature_map.shape[-2:]) for feature_map in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class MMDetBoxCoder(BoxCoder):
    """``BoxCoder`` decoding as mmdet's ``DeltaXYWHBBoxCoder`` (target means 0, target stds ``1 / weights``).

    ``delta * stds`` moves the box centre by ``(dx * w, dy * h)`` and scales it by ``exp(dw)``, ``exp(dh)``, with
    ``dw`` and ``dh`` clamped to ``[-log(1000 / 16), log(1000 / 16)]`` (torchvision: the upper bound only). Encoding
    (training targets) is torchvision's, the same formula.
    """

    def __init__(self, weights: tuple[float, float, float, float]) -> None:
        super().__init__(weights, bbox_xform_clip=_WH_RATIO_CLIP)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        boxes = boxes.to(rel_codes.dtype)
        stds = rel_codes.new_tensor([1 / w for w in self.weights])
        deltas = rel_codes.reshape(len(rel_codes), -1, 4) * stds
        centres = ((boxes[:, :2] + boxes[:, 2:]) * 0.5)[:, None]
        sizes = (boxes[:, 2:] - boxes[:, :2])[:, None]
        new_centres = centres + sizes * deltas[..., :2]
        new_sizes = sizes * deltas[..., 2:].clamp(-self.bbox_xform_clip, self.bbox_xform_clip).exp()
        decoded = torch.cat([new_centres - new_sizes * 0.5, new_centres + new_sizes * 0.5], dim=-1)
        return decoded.reshape(len(rel_codes), -1)


class MMDetRoIAlign(MultiScaleRoIAlign):
    """mmdet's ``SingleRoIExtractor(RoIAlign(output_size, sampling_ratio=0, aligned=True), finest_scale=56)``.

    A box of scale ``s = sqrt(w * h)`` is pooled from level ``floor(log2(s / finest_scale + 1e-6))`` (clamped to
    the levels), the level of stride ``featmap_strides[level]``, with pixel-centre-aligned RoIAlign and an adaptive
    sample count (``ceil(bin size)`` per bin side).

    Args:
        featmap_names: Feature maps to pool from, finest first.
        output_size: Pooled size (7 for boxes, 14 for masks).
        featmap_strides: Stride of each of ``featmap_names``.
        sampling_ratio: Samples per bin side (0: adaptive).
        finest_scale: Box scale mapped to the boundary between the first two levels.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | tuple[int, int],
        featmap_strides: Sequence[int] = (4, 8, 16, 32),
        sampling_ratio: int = 0,
        finest_scale: int = 56,
    ) -> None:
        super().__init__(featmap_names, output_size, sampling_ratio)
        if len(featmap_strides) != len(featmap_names):
            raise ValueError(f"one stride per feature map: {featmap_names} with strides {tuple(featmap_strides)}")
        self.featmap_strides = tuple(int(s) for s in featmap_strides)
        self.finest_scale = finest_scale

    def roi_levels(self, boxes: Tensor) -> Tensor:
        """Pyramid level (index into ``featmap_names``) of each ``(x1, y1, x2, y2)`` box."""
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return levels.clamp(0, len(self.featmap_strides) - 1).long()

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        all_boxes = torch.cat(boxes)
        image_index = [torch.full((len(b), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)]
        rois = torch.cat([torch.cat(image_index), all_boxes], dim=1)
        levels = self.roi_levels(all_boxes)
        pooled = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, stride) in enumerate(zip(features, self.featmap_strides)):
            index = torch.where(levels == level)[0]
            pooled[index] = roi_align(
                feature, rois[index], self.output_size, 1 / stride, self.sampling_ratio, aligned=True
            ).to(pooled.dtype)
        return pooled
