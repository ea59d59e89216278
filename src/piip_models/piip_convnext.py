"""PIIP detection backbones with ConvNeXt branches: the ConvNeXt/ViT combinations of arXiv:2501.07783.

Each of the three branches is a ConvNeXt (``C``) or a ViT (``V``): ConvNeXt-T/S/B from timm's ``convnext_*.fb_in1k``
(the ImageNet-1k weights the official configs load from Hugging Face ``facebook/convnext-*-224``), DeiT-T (v1) and
DeiT III-S/B with window-14 attention. Names list the branches small to large with their resolutions, as the
official README does: ``piip_ct_vs_cb_1024_672_448`` = ConvNeXt-T@1024, ViT-S@672, ConvNeXt-B@448.

A ConvNeXt's blocks and its downsampling layers are the units its segments index (ConvNeXt-T: 21, S/B: 39), so its
grid and width change between interactions and the deformable attention follows its current stride (4, 8, 16, 32).
The dense head is the official regular-FPN path: lighter merges after interactions 0, 1 and 10 and after the last
one give four maps on the last branch's grid at those depths with branch 0's width there; they are already at
strides 4/8/16/32 when the last branch is a ConvNeXt, and are deconvolved/pooled to them when it is a ViT.
``features_only=True`` returns them (ConvNeXt-B as branch 0: 128/256/512/1024 channels; DeiT III-B: 768).

Paper: Parameter-Inverted Image Pyramid Networks for Visual Perception and Multimodal Understanding
(https://arxiv.org/abs/2501.07783); official code https://github.com/OpenGVLab/PIIP (``mmdetection/configs/piip/
convnext``).
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ._builder import CONVNEXT_39_SEGMENTS, build_dense, deit3_detection_branch, deit_detection_branch, dense_cfg
from .config import BranchCfg
from .piip import PIIP

__all__: list[str] = []

# Segments of the official ConvNeXt-T configs: one per stage end for the first two interactions, then stage 3 in
# pieces (the 39-unit ConvNeXts use CONVNEXT_39_SEGMENTS).
_CONVNEXT_T_SEGMENTS = ((0, 2), (3, 6), (7, 8), *((u, u) for u in range(9, 17)), (17, 20))
# Interactions whose outputs are merged into pyramid maps (official ``out_interaction_indexes``).
_MERGE_STAGES = (0, 1, 10)


def _convnext(size: str, img_size: int, drop_path_rate: float) -> BranchCfg:
    segments = _CONVNEXT_T_SEGMENTS if size == "tiny" else CONVNEXT_39_SEGMENTS
    return BranchCfg(f"convnext_{size}.fb_in1k", img_size, segments, drop_path_rate, "linear")


# Branch letters of the official names at the official resolutions (T@1024, S@672, B@448) and drop-path rates.
_BRANCHES = {
    "ct": lambda: _convnext("tiny", 1024, 0.3),
    "cs": lambda: _convnext("small", 672, 0.3),
    "cb": lambda: _convnext("base", 448, 0.4),
    "vt": lambda: deit_detection_branch(1024, 14),
    "vs": lambda: deit3_detection_branch("small", 672, 0.05, 14),
    "vb": lambda: deit3_detection_branch("base", 448, 0.15, 14),
}


def _combo(variant: str, letters: tuple[str, str, str], pretrained: bool, kwargs: dict[str, Any]) -> PIIP:
    """``letters`` small to large (``('ct', 'vs', 'cb')``); branch 0 is the large one."""
    branches = tuple(_BRANCHES[letter]() for letter in reversed(letters))
    return build_dense(variant, branches, pretrained, kwargs, merge_stages=_MERGE_STAGES)


def _first_convs(letters: tuple[str, ...]) -> tuple[str, ...]:
    """Branch-0-first stem convolutions of branches named small to large."""
    return tuple(
        f"branches.{k}.stem.0" if letter.startswith("c") else f"branches.{k}.patch_embed.proj"
        for k, letter in enumerate(reversed(letters))
    )


def _combo_cfg(letters: tuple[str, str, str], file: str | None = None) -> dict[str, Any]:
    # The ConvNeXt-family configs normalise with ImageNet statistics.
    return dense_cfg(
        1024, 3, file, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv=_first_convs(letters)
    )


# The first tag of a model is its default: the released checkpoint (OpenGVLab/PIIP) where one exists.
default_cfgs = generate_default_cfgs({
    "piip_ct_cs_cb_1024_672_448.coco_mask_rcnn": _combo_cfg(
        ("ct", "cs", "cb"), file="detection/mask_rcnn_convnext-tsb_1024_672_448_regular-fpn.pth"),
    "piip_ct_cs_cb_1024_672_448.branches": _combo_cfg(("ct", "cs", "cb")),
    "piip_ct_vs_vb_1024_672_448.branches": _combo_cfg(("ct", "vs", "vb")),
    "piip_ct_cs_vb_1024_672_448.branches": _combo_cfg(("ct", "cs", "vb")),
    "piip_ct_vs_cb_1024_672_448.branches": _combo_cfg(("ct", "vs", "cb")),
    "piip_vt_cs_vb_1024_672_448.branches": _combo_cfg(("vt", "cs", "vb")),
    "piip_vt_cs_cb_1024_672_448.branches": _combo_cfg(("vt", "cs", "cb")),
    "piip_vt_vs_cb_1024_672_448.branches": _combo_cfg(("vt", "vs", "cb")),
    # the baseline config normalises to [-1, 1] like the ViT detection configs
    "piip_baseline_convnext_b_1024.branches": dense_cfg(1024, 1, first_conv=("branches.0.stem.0",)),
})


@register_model
def piip_ct_cs_cb_1024_672_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-CT-CS-CB: ConvNeXt-T@1024, ConvNeXt-S@672, ConvNeXt-B@448 (official Mask R-CNN 46.4 / 41.7)."""
    return _combo("piip_ct_cs_cb_1024_672_448", ("ct", "cs", "cb"), pretrained, kwargs)


@register_model
def piip_ct_vs_vb_1024_672_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-CT-VS-VB: ConvNeXt-T@1024, DeiT III-S@672, DeiT III-B@448 (official Mask R-CNN 47.1 / 42.4)."""
    return _combo("piip_ct_vs_vb_1024_672_448", ("ct", "vs", "vb"), pretrained, kwargs)


@register_model
def piip_ct_cs_vb_1024_672_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-CT-CS-VB: ConvNeXt-T@1024, ConvNeXt-S@672, DeiT III-B@448 (official Mask R-CNN 46.8 / 42.2)."""
    return _combo("piip_ct_cs_vb_1024_672_448", ("ct", "cs", "vb"), pretrained, kwargs)


@register_model
def piip_ct_vs_cb_1024_672_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-CT-VS-CB: ConvNeXt-T@1024, DeiT III-S@672, ConvNeXt-B@448 (official Mask R-CNN 46.7 / 42.0)."""
    return _combo("piip_ct_vs_cb_1024_672_448", ("ct", "vs", "cb"), pretrained, kwargs)


@register_model
def piip_vt_cs_vb_1024_672_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-VT-CS-VB: DeiT-T@1024, ConvNeXt-S@672, DeiT III-B@448 (official Mask R-CNN 45.4 / 40.9)."""
    return _combo("piip_vt_cs_vb_1024_672_448", ("vt", "cs", "vb"), pretrained, kwargs)


@register_model
def piip_vt_cs_cb_1024_672_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-VT-CS-CB: DeiT-T@1024, ConvNeXt-S@672, ConvNeXt-B@448 (official Mask R-CNN 45.2 / 40.7)."""
    return _combo("piip_vt_cs_cb_1024_672_448", ("vt", "cs", "cb"), pretrained, kwargs)


@register_model
def piip_vt_vs_cb_1024_672_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-VT-VS-CB: DeiT-T@1024, DeiT III-S@672, ConvNeXt-B@448 (official Mask R-CNN 44.8 / 40.3)."""
    return _combo("piip_vt_vs_cb_1024_672_448", ("vt", "vs", "cb"), pretrained, kwargs)


@register_model
def piip_baseline_convnext_b_1024(pretrained: bool = False, **kwargs) -> PIIP:
    """Single-branch ConvNeXt-B @1024 baseline: its four stage outputs (strides 4-32) are the pyramid (42.4 / 38.7)."""
    branch = BranchCfg("convnext_base.fb_in1k", 1024, ((0, 2), (3, 6), (7, 34), (35, 38)))
    return build_dense("piip_baseline_convnext_b_1024", (branch,), pretrained, kwargs, merge_stages=(0, 1, 2))
