"""Shared pieces of the timm ViT families this package registers as PIIP branches (InternViT-6B, windowed BEiT)."""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import VisionTransformer

from .weights import branch_checkpoint_filter_fn

__all__ = ["create_vit", "vit_cfg"]


def vit_cfg(**kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg for a 224-px timm ViT with ImageNet statistics; ``kwargs`` override or add entries."""
    return {
        "input_size": (3, 224, 224),
        "pool_size": None,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


def create_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Builds a registered timm ``VisionTransformer`` variant; pretrained weights pass PIIP's branch filter (position
    embedding and patch-kernel resizing as the reference does), ``features_only`` uses timm's getter."""
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=branch_checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )
