"""PIIP pyramids of timm Vision Transformers: the ImageNet classifiers and the detection backbones of arXiv:2406.04330.

* Classifiers (separate heads, each branch's first patch token, logits averaged): PIIP-TSB (DeiT-T/S/B v1 with
  LayerScale), PIIP-SBL (AugReg ViT-S/B/L) at two resolutions, and PIIP-TSBL, a four-branch DeiT-T + DeiT III S/B/L
  classifier of our own.
* Detection backbones (dense merges and a simple feature pyramid at strides 4-32; 16-32 for DINO): DeiT III / DeiT-T
  pyramids with windowed attention at every released resolution, the AugReg, MAE, DINOv2 and BEiT v2 variants, and
  the single-branch DeiT III-B/L baselines at 1024 px.

Names list the branch sizes largest image first, as the official README does. The released checkpoints of
``OpenGVLab/PIIP`` are each model's default tag; the tag ``branches`` loads timm's pretrained branches instead.

Paper: Parameter-Inverted Image Pyramid Networks (https://arxiv.org/abs/2406.04330); official code
https://github.com/OpenGVLab/PIIP.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ._builder import (
    build_dense,
    build_piip,
    deit3_detection_branch,
    deit_branch,
    deit_detection_branch,
    dense_cfg,
    piip_cfg,
)
from .config import BranchCfg, InteractionCfg, even_segments
from .piip import PIIP

__all__: list[str] = []  # entrypoints are added by register_model


def _augreg(size: str, img_size: int, depth: int, drop_path_rate: float) -> BranchCfg:
    """AugReg ViT branch; its position embedding keeps the (unused) class slot, as in the official models."""
    return BranchCfg(f"vit_{size}_patch16_224.augreg_in21k_ft_in1k", img_size, even_segments(depth, 12), drop_path_rate)


def _deit3(size: str, img_size: int, depth: int, drop_path_rate: float) -> BranchCfg:
    return BranchCfg(f"deit3_{size}_patch16_224.fb_in22k_ft_in1k", img_size, even_segments(depth, 12), drop_path_rate)


_OFFICIAL_CLS = dict(head_type="separate", global_pool="first_patch", class_token=True)


def _internvit_det(
    name: str, img_size: int, depth: int, drop_path_rate: float, pretrain: int, **model_args: Any
) -> BranchCfg:
    """AugReg / MAE / DINOv2 detection branch as the official ``InternViT6B`` class builds it: LayerScale from 1.0,
    linear drop path, window 28, patch 16. Without a class token the position embedding has no class slot (the
    official class stores an unused one; checkpoints with it load, the slot dropped)."""
    return BranchCfg(
        name,
        img_size,
        even_segments(depth, 12),
        drop_path_rate,
        "linear",
        model_args=dict(init_values=1.0, patch_size=16, **model_args),
        pos_embed_size=pretrain,
        window_size=28,
    )


def _beitv2_det(size: str, img_size: int, drop_path_rate: float) -> BranchCfg:
    """BEiT v2 (ImageNet-22k fine-tuned) detection branch: window 28 with a per-window relative position bias,
    LayerScale, linear drop path, no absolute position embedding."""
    depth = {"base": 12, "large": 24}[size]
    return BranchCfg(
        f"windowed_beitv2_{size}_patch16_224.in1k_ft_in22k",
        img_size,
        even_segments(depth, 12),
        drop_path_rate,
        "linear",
        model_args=dict(window_size=28, init_values=1e-6),
        window_size=28,
    )


def _tsb_det(sizes: tuple[int, int, int]) -> tuple[BranchCfg, ...]:
    base, small, tiny = sizes
    return (
        deit3_detection_branch("base", base, 0.15, 14),
        deit3_detection_branch("small", small, 0.05, 14),
        deit_detection_branch(tiny, 14),
    )


def _sbl_det(sizes: tuple[int, int, int]) -> tuple[BranchCfg, ...]:
    large, base, small = sizes
    return (
        deit3_detection_branch("large", large, 0.4, 28),
        deit3_detection_branch("base", base, 0.15, 28),
        deit3_detection_branch("small", small, 0.05, 28),
    )


def _tsbl_det(sizes: tuple[int, int, int, int]) -> tuple[BranchCfg, ...]:
    return _sbl_det(sizes[:3]) + (deit_detection_branch(sizes[3], 28),)


def _sbl(sizes: tuple[int, int, int]) -> tuple[BranchCfg, ...]:
    large, base, small = sizes
    return (_augreg("large", large, 24, 0.4), _augreg("base", base, 12, 0.2), _augreg("small", small, 12, 0.05))


# The DINO config normalises with ImageNet statistics, the other detection configs to [-1, 1].
_DINO_NORM = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)

# The first tag of a model is its default: the released checkpoint where one exists, then `branches`.
default_cfgs = generate_default_cfgs({
    "piip_tsb.in1k": piip_cfg(368, 3, file="classification/piip_3branch_tsb_368-192-128_cls_token_deit1.pth"),
    "piip_tsb.branches": piip_cfg(368, 3),
    "piip_sbl.in1k": piip_cfg(384, 3, file="classification/piip_3branch_sbl_384-192-128_cls_token_augreg.pth"),
    "piip_sbl.branches": piip_cfg(384, 3),
    "piip_sbl_320_160_96.in1k": piip_cfg(
        320, 3, file="classification/piip_3branch_sbl_320-160-96_cls_token_augreg.pth"),
    "piip_sbl_320_160_96.branches": piip_cfg(320, 3),
    "piip_tsbl.branches": piip_cfg(384, 4),
    "piip_tsb_1120_896_448.coco_mask_rcnn": dense_cfg(
        1120, 3, file="detection/mask_rcnn_deit_tsb_1120_896_448_fpn_1x_coco_bs16.pth"),
    "piip_tsb_1120_896_448.branches": dense_cfg(1120, 3),
    "piip_tsb_1568_896_448.coco_mask_rcnn": dense_cfg(
        1568, 3, file="detection/mask_rcnn_deit_tsb_1568_896_448_fpn_1x_coco_bs16.pth"),
    "piip_tsb_1568_896_448.branches": dense_cfg(1568, 3),
    "piip_tsb_1568_1120_672.coco_mask_rcnn": dense_cfg(
        1568, 3, file="detection/mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16.pth"),
    "piip_tsb_1568_1120_672.branches": dense_cfg(1568, 3),
    "piip_sbl_1120_672_448.coco_mask_rcnn": dense_cfg(
        1120, 3, file="detection/mask_rcnn_deit_sbl_1120_672_448_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1120_672_448.branches": dense_cfg(1120, 3),
    "piip_sbl_1344_896_448.coco_mask_rcnn": dense_cfg(
        1344, 3, file="detection/mask_rcnn_deit_sbl_1344_896_448_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1344_896_448.branches": dense_cfg(1344, 3),
    "piip_sbl_1568_896_672.coco_mask_rcnn": dense_cfg(
        1568, 3, file="detection/mask_rcnn_deit_sbl_1568_896_672_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1568_896_672.branches": dense_cfg(1568, 3),
    "piip_sbl_1568_1120_672.coco_mask_rcnn": dense_cfg(
        1568, 3, file="detection/mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1568_1120_672.branches": dense_cfg(1568, 3),
    "piip_tsbl_1344_896_672_448.coco_mask_rcnn": dense_cfg(
        1344, 4, file="detection/mask_rcnn_deit_tsbl_1344_896_672_448_fpn_1x_coco_bs16.pth"),
    "piip_tsbl_1344_896_672_448.branches": dense_cfg(1344, 4),
    "piip_tsbl_1568_1120_672_448.coco_mask_rcnn": dense_cfg(
        1568, 4, file="detection/mask_rcnn_deit_tsbl_1568_1120_672_448_fpn_1x_coco_bs16.pth"),
    "piip_tsbl_1568_1120_672_448.branches": dense_cfg(1568, 4),
    "piip_tsbl_1792_1568_1120_448.coco_mask_rcnn": dense_cfg(
        1792, 4, file="detection/mask_rcnn_deit_tsbl_1792_1568_1120_448_fpn_1x_coco_bs16.pth"),
    "piip_tsbl_1792_1568_1120_448.branches": dense_cfg(1792, 4),
    "piip_sbl_1792_1120_672_dino.coco_dino": dense_cfg(
        1792, 3, file="detection/dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms.pth", **_DINO_NORM),
    "piip_sbl_1792_1120_672_dino.branches": dense_cfg(1792, 3, **_DINO_NORM),
    "piip_sbl_1568_1120_672_augreg.coco_mask_rcnn": dense_cfg(
        1568, 3, file="detection/mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1568_1120_672_augreg.branches": dense_cfg(1568, 3),
    "piip_sbl_1568_1120_672_augreg_speedup.coco_mask_rcnn": dense_cfg(
        1568, 3, file="detection/mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16_speedup.pth"),
    "piip_sbl_1568_1120_672_augreg_speedup.branches": dense_cfg(1568, 3),
    "piip_sbl_1568_1120_672_mae.coco_mask_rcnn": dense_cfg(
        1568, 3, file="detection/mask_rcnn_mae_sbl_1568_1120_672_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1568_1120_672_mae.branches": dense_cfg(1568, 3),
    "piip_sbl_1568_1120_672_dinov2.coco_mask_rcnn": dense_cfg(
        1568, 3, file="detection/mask_rcnn_dinov2_sbl_1568_1120_672_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1568_1120_672_dinov2.branches": dense_cfg(1568, 3),
    "piip_sbl_1568_1120_672_beitv2.coco_mask_rcnn": dense_cfg(
        1568, 3, file="detection/mask_rcnn_beit_sbl_1568_1120_672_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1568_1120_672_beitv2.branches": dense_cfg(1568, 3),
    "piip_baseline_vit_b_1024.coco_mask_rcnn": dense_cfg(
        1024, 1, file="detection/mask_rcnn_deit_vit_b_fpn_1x_coco_bs16.pth"),
    "piip_baseline_vit_b_1024.branches": dense_cfg(1024, 1),
    "piip_baseline_vit_l_1024.coco_mask_rcnn": dense_cfg(
        1024, 1, file="detection/mask_rcnn_deit_vit_l_fpn_1x_coco_bs16.pth"),
    "piip_baseline_vit_l_1024.branches": dense_cfg(1024, 1),
})


@register_model
def piip_tsb(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSB 368/192/128: DeiT-T@368, DeiT-S@192, DeiT-B@128 (arXiv:2406.04330, ImageNet-1k 82.1 top-1)."""
    branches = (deit_branch("base", 128, 0.2), deit_branch("small", 192, 0.05), deit_branch("tiny", 368, 0.05))
    return build_piip("piip_tsb", pretrained, **dict(dict(branches=branches, **_OFFICIAL_CLS), **kwargs))


@register_model
def piip_sbl(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 384/192/128: AugReg ViT-S@384, ViT-B@192, ViT-L@128 (arXiv:2406.04330, 85.9 top-1)."""
    return build_piip("piip_sbl", pretrained, **dict(dict(branches=_sbl((128, 192, 384)), **_OFFICIAL_CLS), **kwargs))


@register_model
def piip_sbl_320_160_96(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 320/160/96: AugReg ViT-S@320, ViT-B@160, ViT-L@96 (arXiv:2406.04330, 85.2 top-1)."""
    model_args = dict(branches=_sbl((96, 160, 320)), **_OFFICIAL_CLS)
    return build_piip("piip_sbl_320_160_96", pretrained, **dict(model_args, **kwargs))


@register_model
def piip_tsbl(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSBL 384/256/192/128: DeiT-T@384, DeiT III-S@256, DeiT III-B@192, DeiT III-L@128 (4 branches).

    Not an official classification config (none with 4 branches was released): the four-branch detection pyramid
    of arXiv:2406.04330 (DeiT-T v1 + DeiT III S/B/L) at classification resolutions, with separate heads.
    """
    branches = (
        _deit3("large", 128, 24, 0.4),
        _deit3("base", 192, 12, 0.15),
        _deit3("small", 256, 12, 0.05),
        deit_branch("tiny", 384, 0.05),
    )
    return build_piip("piip_tsbl", pretrained, **dict(dict(branches=branches, **_OFFICIAL_CLS), **kwargs))


@register_model
def piip_tsb_1120_896_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSB 1120/896/448 detection backbone: DeiT-T@1120, DeiT III-S@896, DeiT III-B@448, window 14."""
    return build_dense("piip_tsb_1120_896_448", _tsb_det((448, 896, 1120)), pretrained, kwargs)


@register_model
def piip_tsb_1568_896_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSB 1568/896/448 detection backbone: DeiT-T@1568, DeiT III-S@896, DeiT III-B@448, window 14."""
    return build_dense("piip_tsb_1568_896_448", _tsb_det((448, 896, 1568)), pretrained, kwargs)


@register_model
def piip_tsb_1568_1120_672(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSB 1568/1120/672 detection backbone: DeiT-T@1568, DeiT III-S@1120, DeiT III-B@672, window 14."""
    return build_dense("piip_tsb_1568_1120_672", _tsb_det((672, 1120, 1568)), pretrained, kwargs)


@register_model
def piip_sbl_1120_672_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1120/672/448 detection backbone: DeiT III-S@1120, -B@672, -L@448, window 28."""
    return build_dense("piip_sbl_1120_672_448", _sbl_det((448, 672, 1120)), pretrained, kwargs)


@register_model
def piip_sbl_1344_896_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1344/896/448 detection backbone: DeiT III-S@1344, -B@896, -L@448, window 28."""
    return build_dense("piip_sbl_1344_896_448", _sbl_det((448, 896, 1344)), pretrained, kwargs)


@register_model
def piip_sbl_1568_896_672(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/896/672 detection backbone: DeiT III-S@1568, -B@896, -L@672, window 28."""
    return build_dense("piip_sbl_1568_896_672", _sbl_det((672, 896, 1568)), pretrained, kwargs)


@register_model
def piip_sbl_1568_1120_672(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/1120/672 detection backbone: DeiT III-S@1568, -B@1120, -L@672, window 28."""
    return build_dense("piip_sbl_1568_1120_672", _sbl_det((672, 1120, 1568)), pretrained, kwargs)


@register_model
def piip_tsbl_1344_896_672_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSBL 1344/896/672/448 detection backbone: DeiT-T, DeiT III-S/B/L, window 28."""
    return build_dense("piip_tsbl_1344_896_672_448", _tsbl_det((448, 672, 896, 1344)), pretrained, kwargs)


@register_model
def piip_tsbl_1568_1120_672_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSBL 1568/1120/672/448 detection backbone: DeiT-T, DeiT III-S/B/L, window 28."""
    return build_dense("piip_tsbl_1568_1120_672_448", _tsbl_det((448, 672, 1120, 1568)), pretrained, kwargs)


@register_model
def piip_tsbl_1792_1568_1120_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSBL 1792/1568/1120/448 detection backbone: DeiT-T, DeiT III-S/B/L, window 28."""
    return build_dense("piip_tsbl_1792_1568_1120_448", _tsbl_det((448, 1120, 1568, 1792)), pretrained, kwargs)


@register_model
def piip_sbl_1792_1120_672_dino(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1792/1120/672 DINO backbone: DeiT III (384) S/B/L, window 24 with global attention every 3rd block."""
    branches = (
        deit3_detection_branch("large", 672, 0.4, 24, pretrain=384, global_every=3),
        deit3_detection_branch("base", 1120, 0.15, 24, pretrain=384, global_every=3),
        deit3_detection_branch("small", 1792, 0.05, 24, pretrain=384, global_every=3),
    )
    return build_dense("piip_sbl_1792_1120_672_dino", branches, pretrained, kwargs, fpn_levels=(1, 2, 3))


@register_model
def piip_sbl_1568_1120_672_augreg(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/1120/672 detection backbone from AugReg ViT-S/B/L (384), window 28."""
    branches = (
        _internvit_det("vit_large_patch16_384.augreg_in21k_ft_in1k", 672, 24, 0.4, 384),
        _internvit_det("vit_base_patch16_384.augreg_in21k_ft_in1k", 1120, 12, 0.3, 384),
        _internvit_det("vit_small_patch16_384.augreg_in21k_ft_in1k", 1568, 12, 0.2, 384),
    )
    return build_dense("piip_sbl_1568_1120_672_augreg", branches, pretrained, kwargs)


@register_model
def piip_sbl_1568_1120_672_augreg_speedup(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/1120/672 AugReg, faster variant: interactions without projections or norms, tanh-GELU MLPs."""
    branches = (
        _internvit_det("vit_large_patch16_384.augreg_in21k_ft_in1k", 672, 24, 0.4, 384, act_layer="gelu_tanh"),
        _internvit_det("vit_base_patch16_384.augreg_in21k_ft_in1k", 1120, 12, 0.3, 384, act_layer="gelu_tanh"),
        _internvit_det("vit_small_patch16_384.augreg_in21k_ft_in1k", 1568, 12, 0.2, 384, act_layer="gelu_tanh"),
    )
    interaction = InteractionCfg(with_proj=False, with_norm=False)
    return build_dense("piip_sbl_1568_1120_672_augreg_speedup", branches, pretrained, kwargs, interaction=interaction)


@register_model
def piip_sbl_1568_1120_672_mae(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/1120/672 detection backbone: DeiT III-S, MAE ViT-B and ViT-L, window 28."""
    branches = (
        _internvit_det("vit_large_patch16_224.mae", 672, 24, 0.4, 224),
        _internvit_det("vit_base_patch16_224.mae", 1120, 12, 0.15, 224),
        deit3_detection_branch("small", 1568, 0.05, 28),
    )
    return build_dense("piip_sbl_1568_1120_672_mae", branches, pretrained, kwargs)


@register_model
def piip_sbl_1568_1120_672_dinov2(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/1120/672 detection backbone from DINOv2 S/B/L (patch 14 resampled to 16), window 28."""
    branches = (
        _internvit_det("vit_large_patch14_dinov2.lvd142m", 672, 24, 0.4, 518),
        _internvit_det("vit_base_patch14_dinov2.lvd142m", 1120, 12, 0.3, 518),
        _internvit_det("vit_small_patch14_dinov2.lvd142m", 1568, 12, 0.2, 518),
    )
    return build_dense("piip_sbl_1568_1120_672_dinov2", branches, pretrained, kwargs)


@register_model
def piip_sbl_1568_1120_672_beitv2(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/1120/672 detection backbone: DeiT III-S, BEiT v2 ViT-B and ViT-L, window 28."""
    branches = (
        _beitv2_det("large", 672, 0.4), _beitv2_det("base", 1120, 0.15), deit3_detection_branch("small", 1568, 0.05, 28)
    )
    return build_dense("piip_sbl_1568_1120_672_beitv2", branches, pretrained, kwargs)


@register_model
def piip_baseline_vit_b_1024(pretrained: bool = False, **kwargs) -> PIIP:
    """Single-branch DeiT III-B @1024 baseline: window 14, global attention every 3rd block, simple feature pyramid
    (channels-first LayerNorm in its stride-4 level, as the official ``vit_models``)."""
    branch = deit3_detection_branch("base", 1024, 0.15, 14, global_every=3)
    branch = replace(branch, segments=even_segments(12, 4))
    return build_dense("piip_baseline_vit_b_1024", (branch,), pretrained, kwargs, fpn_norm="layer")


@register_model
def piip_baseline_vit_l_1024(pretrained: bool = False, **kwargs) -> PIIP:
    """Single-branch DeiT III-L @1024 baseline: window 14, global attention every 3rd block, simple feature pyramid
    (channels-first LayerNorm in its stride-4 level, as the official ``vit_models``)."""
    branch = deit3_detection_branch("large", 1024, 0.4, 14, global_every=3)
    branch = replace(branch, segments=even_segments(24, 4))
    return build_dense("piip_baseline_vit_l_1024", (branch,), pretrained, kwargs, fpn_norm="layer")
