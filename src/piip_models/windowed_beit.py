"""BEiT v2 as PIIP's detection branches run it: windowed attention with a per-window relative position bias.

A timm :class:`~timm.models.vision_transformer.VisionTransformer` without an absolute position embedding whose
attention layers are :class:`~piip_models.layers.window_attention.WindowRelPosAttention`: separate query/value
biases, LayerScale, and a ``(2W - 1)^2``-entry relative position bias per block for ``W x W`` windows (no class-token
entries). Pretrained timm BEiT v2 weights load through :func:`piip_models.weights.branch_checkpoint_filter_fn`,
which drops the class-token entries of the bias tables and resizes them bicubically to the window.

BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers - https://arxiv.org/abs/2208.06366
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .layers.window_attention import rel_pos_attention
from .vit_family import create_vit, vit_cfg

__all__ = ["create_windowed_beit"]


def create_windowed_beit(variant: str, pretrained: bool = False, window_size: int = 14, **kwargs) -> VisionTransformer:
    """Builds a windowed BEiT v2 ViT.

    Args:
        variant: Registered architecture name.
        pretrained: Load the tag's timm BEiT v2 weights.
        window_size: Attention window (tokens per side) that the relative position bias covers; 14 is BEiT v2's
            224-px pretraining grid, PIIP's detection branches use 28.
        **kwargs: :class:`VisionTransformer` arguments.
    """
    if kwargs.get("pos_embed", "none") != "none":
        raise ValueError("windowed BEiT encodes positions with its relative bias alone; pos_embed must be 'none'")
    kwargs.update(pos_embed="none", attn_layer=rel_pos_attention(window_size))
    return create_vit(variant, pretrained, **kwargs)


def _cfg(hf_hub_id: str, **kwargs) -> dict:
    return vit_cfg(
        hf_hub_id=hf_hub_id, num_classes=21841, crop_pct=0.9, license="apache-2.0", paper_ids="arXiv:2208.06366",
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    "windowed_beitv2_base_patch16_224.in1k_ft_in22k": _cfg("timm/beitv2_base_patch16_224.in1k_ft_in22k"),
    "windowed_beitv2_large_patch16_224.in1k_ft_in22k": _cfg("timm/beitv2_large_patch16_224.in1k_ft_in22k"),
})

_BEIT_ARGS = dict(patch_size=16, mlp_ratio=4, qkv_bias=True, init_values=1e-5, global_pool="avg", fc_norm=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))


@register_model
def windowed_beitv2_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """BEiT v2 base with a per-window relative position bias (``window_size`` kwarg, default 14)."""
    model_args = dict(_BEIT_ARGS, embed_dim=768, depth=12, num_heads=12)
    return create_windowed_beit("windowed_beitv2_base_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def windowed_beitv2_large_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """BEiT v2 large with a per-window relative position bias (``window_size`` kwarg, default 14)."""
    model_args = dict(_BEIT_ARGS, embed_dim=1024, depth=24, num_heads=16)
    return create_windowed_beit("windowed_beitv2_large_patch16_224", pretrained, **dict(model_args, **kwargs))
