"""PIIP with an InternViT-6B branch: PIIP-H6B and PIIP-LH6B detection backbones, H6B segmentation backbones.

The largest pyramids of arXiv:2501.07783: InternViT-6B on the smallest image, MAE ViT-H/14 (and DeiT III-L for
LH6B) on the larger ones, every branch with global attention. As in the official configs, the patch-14 kernels
of InternViT-6B and MAE ViT-H are resized to 16, position embeddings live at the 224 pretraining grid and are
resampled per forward (segmentation: stored at the branch grid), drop path rises linearly to 0.4 over the
InternViT-6B and ViT-H blocks, and the "speedup" / LH6B / segmentation variants use interactions without
projections or norms and tanh-approximate GELU MLPs (the official fused MLP).
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from . import internvit  # noqa: F401  (registers internvit_6b_patch14_224 before any branch is built)
from ._builder import build_dense, dense_cfg
from .config import BranchCfg, InteractionCfg, even_segments, segments_of_lengths
from .piip import PIIP

__all__: list[str] = []  # entrypoints are added by register_model

_NO_PROJ_NO_NORM = InteractionCfg(with_proj=False, with_norm=False)
_FUSED_MLP = dict(act_layer="gelu_tanh")  # flash-attn FusedMLP(activation="gelu_approx") of the official configs


# MAE ViT-H (32 blocks) against InternViT-6B's 12 x 4: four 2-block, then eight 3-block segments.
_H_SEGMENTS_12 = segments_of_lengths((2,) * 4 + (3,) * 8)


def _internvit_6b(img_size: int, segments: tuple[tuple[int, int], ...], fused_mlp: bool, pos_embed_size: int | None):
    return BranchCfg(
        "internvit_6b_patch14_224.internvl",
        img_size,
        segments,
        0.4,
        "linear",
        model_args=dict(patch_size=16, **(_FUSED_MLP if fused_mlp else {})),
        pos_embed_size=pos_embed_size,
    )


def _mae_huge(img_size: int, segments: tuple[tuple[int, int], ...], fused_mlp: bool, pos_embed_size: int | None):
    """MAE ViT-H/14 as the official ``InternViT6B`` class builds it: LayerScale from 1.0, patch 16."""
    return BranchCfg(
        "vit_huge_patch14_224.mae",
        img_size,
        segments,
        0.4,
        "linear",
        model_args=dict(patch_size=16, init_values=1.0, **(_FUSED_MLP if fused_mlp else {})),
        pos_embed_size=pos_embed_size,
    )


def h6b_branches(
    sizes: tuple[int, int], fused_mlp: bool = False, pos_embed_size: int | None = 224
) -> tuple[BranchCfg, BranchCfg]:
    """InternViT-6B @``sizes[0]`` and MAE ViT-H @``sizes[1]``, 12 interactions (6B: 12 x 4 blocks).

    Args:
        sizes: Branch resolutions, InternViT-6B (smallest image) first.
        fused_mlp: tanh-approximate GELU in every MLP (the official fused MLP).
        pos_embed_size: Grid of the stored position embeddings (224: the pretraining grid, resampled per forward;
            None: each branch's own size, as the segmentation configs).
    """
    return (
        _internvit_6b(sizes[0], even_segments(48, 12), fused_mlp, pos_embed_size),
        _mae_huge(sizes[1], _H_SEGMENTS_12, fused_mlp, pos_embed_size),
    )


def lh6b_branches(sizes: tuple[int, int, int]) -> tuple[BranchCfg, BranchCfg, BranchCfg]:
    """InternViT-6B, MAE ViT-H and DeiT III-L (384, ImageNet-21k) with 4 interactions and fused MLPs."""
    deit3_large = BranchCfg(
        "deit3_large_patch16_384.fb_in22k_ft_in1k",
        sizes[2],
        even_segments(24, 4),
        0.4,
        model_args=dict(init_values=1.0, **_FUSED_MLP),
        pos_embed_size=384,
    )
    return (
        _internvit_6b(sizes[0], even_segments(48, 4), True, 224),
        _mae_huge(sizes[1], even_segments(32, 4), True, 224),
        deit3_large,
    )


def _seg(variant: str, size: int, pretrained: bool, kwargs: dict[str, Any]) -> PIIP:
    branches = h6b_branches((size, 512), fused_mlp=True, pos_embed_size=None)
    return build_dense(variant, branches, pretrained, kwargs, interaction=_NO_PROJ_NO_NORM)


# Segmentation configs keep mmseg's ADE20K ImageNet statistics; the detection configs normalise to [-1, 1].
_SEG_NORM = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)

def _seg_file(size: int) -> str:
    return f"segmentation/upernet_internvit_h6b_{size}_512_80k_ade20k_bs16_lr4e-5.pth"


# The first tag of a model is its default: the released checkpoint (OpenGVLab/PIIP) where one exists.
default_cfgs = generate_default_cfgs({
    "piip_h6b_1024_512.coco_mask_rcnn": dense_cfg(
        1024, 2, file="detection/mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms.pth"),
    "piip_h6b_1024_512.branches": dense_cfg(1024, 2),
    "piip_h6b_1024_512_speedup.coco_mask_rcnn": dense_cfg(
        1024, 2, file="detection/mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms_speedup.pth"),
    "piip_h6b_1024_512_speedup.branches": dense_cfg(1024, 2),
    "piip_h6b_1024_768_dino.coco_dino": dense_cfg(
        1024, 2, file="detection/dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs32_ms.pth"),
    "piip_h6b_1024_768_dino.branches": dense_cfg(1024, 2),
    "piip_lh6b_1536_1024_512.branches": dense_cfg(1536, 3),
    "piip_lh6b_1536_1024_512_dino.branches": dense_cfg(1536, 3),
    "piip_h6b_512_192.ade20k_upernet": dense_cfg(512, 2, file=_seg_file(192), **_SEG_NORM),
    "piip_h6b_512_192.branches": dense_cfg(512, 2, **_SEG_NORM),
    "piip_h6b_512_256.ade20k_upernet": dense_cfg(512, 2, file=_seg_file(256), **_SEG_NORM),
    "piip_h6b_512_256.branches": dense_cfg(512, 2, **_SEG_NORM),
    "piip_h6b_512_384.ade20k_upernet": dense_cfg(512, 2, file=_seg_file(384), **_SEG_NORM),
    "piip_h6b_512_384.branches": dense_cfg(512, 2, **_SEG_NORM),
    "piip_h6b_512_512.ade20k_upernet": dense_cfg(512, 2, file=_seg_file(512), **_SEG_NORM),
    "piip_h6b_512_512.branches": dense_cfg(512, 2, **_SEG_NORM),
    "piip_baseline_internvit_6b_1024.coco_mask_rcnn": dense_cfg(
        1024, 1, file="detection/mask_rcnn_internvit_6b_fpn_1x_coco_bs16_ms.pth"),
    "piip_baseline_internvit_6b_1024.branches": dense_cfg(1024, 1),
    "piip_baseline_internvit_6b_512.ade20k_upernet": dense_cfg(
        512, 1, file="segmentation/upernet_internvit_6b_512_80k_ade20k_bs16_lr4e-5.pth", **_SEG_NORM),
    "piip_baseline_internvit_6b_512.branches": dense_cfg(512, 1, **_SEG_NORM),
})


@register_model
def piip_h6b_1024_512(pretrained: bool = False, **kwargs: Any) -> PIIP:
    """PIIP-H6B 1024/512 Mask R-CNN backbone: MAE ViT-H@1024, InternViT-6B@512 (COCO 55.8 box / 49.0 mask AP)."""
    return build_dense("piip_h6b_1024_512", h6b_branches((512, 1024)), pretrained, kwargs)


@register_model
def piip_h6b_1024_512_speedup(pretrained: bool = False, **kwargs: Any) -> PIIP:
    """PIIP-H6B 1024/512, faster variant: interactions without projections or norms, tanh-GELU MLPs (55.6 / 49.0)."""
    branches = h6b_branches((512, 1024), fused_mlp=True)
    return build_dense("piip_h6b_1024_512_speedup", branches, pretrained, kwargs, interaction=_NO_PROJ_NO_NORM)


@register_model
def piip_h6b_1024_768_dino(pretrained: bool = False, **kwargs: Any) -> PIIP:
    """PIIP-H6B 1024/768 DINO backbone: MAE ViT-H@1024, InternViT-6B@768, 3 pyramid levels (COCO 60.0 box AP)."""
    return build_dense("piip_h6b_1024_768_dino", h6b_branches((768, 1024)), pretrained, kwargs, fpn_levels=(1, 2, 3))


@register_model
def piip_lh6b_1536_1024_512(pretrained: bool = False, **kwargs: Any) -> PIIP:
    """PIIP-LH6B 1536/1024/512 Mask R-CNN backbone: DeiT III-L@1536, MAE ViT-H@1024, InternViT-6B@512."""
    branches = lh6b_branches((512, 1024, 1536))
    return build_dense("piip_lh6b_1536_1024_512", branches, pretrained, kwargs, interaction=_NO_PROJ_NO_NORM)


@register_model
def piip_lh6b_1536_1024_512_dino(pretrained: bool = False, **kwargs: Any) -> PIIP:
    """PIIP-LH6B 1536/1024/512 DINO backbone (3 pyramid levels)."""
    branches = lh6b_branches((512, 1024, 1536))
    return build_dense(
        "piip_lh6b_1536_1024_512_dino", branches, pretrained, kwargs, interaction=_NO_PROJ_NO_NORM,
        fpn_levels=(1, 2, 3),
    )


@register_model
def piip_h6b_512_192(pretrained: bool = False, **kwargs: Any) -> PIIP:
    """PIIP-H6B 512/192 UperNet backbone: MAE ViT-H@512, InternViT-6B@192 (ADE20K 57.81 mIoU)."""
    return _seg("piip_h6b_512_192", 192, pretrained, kwargs)


@register_model
def piip_h6b_512_256(pretrained: bool = False, **kwargs: Any) -> PIIP:
    """PIIP-H6B 512/256 UperNet backbone: MAE ViT-H@512, InternViT-6B@256 (ADE20K 58.35 mIoU)."""
    return _seg("piip_h6b_512_256", 256, pretrained, kwargs)


@register_model
def piip_h6b_512_384(pretrained: bool = False, **kwargs: Any) -> PIIP:
    """PIIP-H6B 512/384 UperNet backbone: MAE ViT-H@512, InternViT-6B@384 (ADE20K 59.32 mIoU)."""
    return _seg("piip_h6b_512_384", 384, pretrained, kwargs)


@register_model
def piip_h6b_512_512(pretrained: bool = False, **kwargs: Any) -> PIIP:
    """PIIP-H6B 512/512 UperNet backbone: MAE ViT-H@512, InternViT-6B@512 (ADE20K 59.85 mIoU)."""
    return _seg("piip_h6b_512_512", 512, pretrained, kwargs)


@register_model
def piip_baseline_internvit_6b_1024(pretrained: bool = False, **kwargs: Any) -> PIIP:
    """Single-branch InternViT-6B @1024 baseline, global attention, simple feature pyramid with the official
    channels-first LayerNorm in its stride-4 level (COCO 53.8 / 48.1)."""
    branch = _internvit_6b(1024, even_segments(48, 4), False, 224)
    return build_dense("piip_baseline_internvit_6b_1024", (branch,), pretrained, kwargs, fpn_norm="layer")


@register_model
def piip_baseline_internvit_6b_512(pretrained: bool = False, **kwargs: Any) -> PIIP:
    """Single-branch InternViT-6B @512 segmentation baseline (ADE20K 58.42 mIoU with UperNet).

    The official mmseg baseline: fused MLPs, position embedding at the 32 x 32 grid, and the simple feature pyramid
    of the last block with the channels-first LayerNorm at stride 4 (its config lists ``out_indices`` 11/23/35/47,
    but the backbone's default ``use_simple_fpn=True`` feeds all four levels from block 47).
    """
    branch = _internvit_6b(512, even_segments(48, 4), True, None)
    return build_dense("piip_baseline_internvit_6b_512", (branch,), pretrained, kwargs, fpn_norm="layer")
