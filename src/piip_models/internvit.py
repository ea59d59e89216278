"""InternViT-6B as a timm ``VisionTransformer``.

InternViT-6B (InternVL, arXiv:2312.14238) is a 48-block ViT of width 3200 with 25 heads, RMSNorm instead of
LayerNorm, no qkv bias, RMSNorm query/key normalisation over the full width (not per head) and LayerScale
initialised to 0.1. Built from timm's ``VisionTransformer`` with :class:`~piip_models.layers.RmsNorm` and
:class:`~piip_models.layers.FullWidthQkNormAttention`, so it slots into PIIP branches (and timm's tooling) like any
other timm ViT. Parameter and module names equal those of the official ``intern_vit_6b_224px.pth`` checkpoint
(``patch_embed.proj``, ``pos_embed`` with a class slot, ``blocks.{i}.{norm1,attn.qkv,attn.q_norm,attn.k_norm,
attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``), so it loads without renaming.

@article{chen2023internvl,
  title={InternVL: Scaling up Vision Foundation Models and Aligning for Generic Visual-Linguistic Tasks},
  author={Chen, Zhe and Wu, Jiannan and Wang, Wenhai and Su, Weijie and Chen, Guo and Xing, Sen and Zhong, Muyan and
          Zhang, Qinglong and Zhu, Xizhou and Lu, Lewei and others},
  journal={arXiv preprint arXiv:2312.14238},
  year={2023}
}
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .layers.qk_norm_attention import FullWidthQkNormAttention
from .layers.rms_norm import RmsNorm
from .vit_family import create_vit, vit_cfg

__all__ = ["internvit_6b_patch14_224"]


default_cfgs = generate_default_cfgs({
    # The InternViT-6B weights PIIP initialises from (the official `intern_vit_6b_224px.pth`, 12 GB, pickled).
    "internvit_6b_patch14_224.internvl": vit_cfg(
        hf_hub_id="OpenGVLab/InternVL",
        hf_hub_filename="intern_vit_6b_224px.pth",
        num_classes=0,
        crop_pct=1.0,
        license="mit",
        paper_ids="arXiv:2312.14238",
        paper_name="InternVL: Scaling up Vision Foundation Models and Aligning for Generic Visual-Linguistic Tasks",
        origin_url="https://github.com/OpenGVLab/InternVL",
    ),
})


@register_model
def internvit_6b_patch14_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """InternViT-6B/14 @224 (5.9 B parameters): RMSNorm, full-width qk-norm, no qkv bias, LayerScale 0.1."""
    model_args = dict(
        patch_size=14,
        embed_dim=3200,
        depth=48,
        num_heads=25,
        mlp_ratio=4.0,
        qkv_bias=False,
        qk_norm=True,
        init_values=0.1,
        norm_layer=RmsNorm,
        attn_layer=FullWidthQkNormAttention,
        final_norm=False,
    )
    return create_vit("internvit_6b_patch14_224", pretrained, **dict(model_args, **kwargs))
