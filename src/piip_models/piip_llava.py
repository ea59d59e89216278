"""PIIP-LLaVA vision towers: two-branch PIIPs (CLIP + CLIP or CLIP + ConvNeXt) with the projector to an LLM width.

Branch 0 is OpenAI's CLIP ViT-L (patch 14 resampled to 16, as OpenGVLab's ``clip-vit-large-patch14to16-{224,336}``
checkpoints); branch 1 is CLIP ViT-B/16 or a CLIP ConvNeXt-B/L (timm ``convnext_base.clip_laiona_augreg_320``,
``convnext_large_mlp.clip_laion2b_ft_320``) on the larger image. CLIP branches keep their class token through the
blocks, with its position embedding, and apply CLIP's pre-norm; the post-norm is never used. The tower returns both
branch maps unmerged; :class:`~piip_models.layers.projector.BranchMLPProjector` resizes branch 0's map to branch 1's
grid, projects each with its own MLP and sums them into ``(B, N, llm_dim)`` visual tokens, N = branch 1's grid
(1024 at 512/1024 px, 400 at 640 px).

Registered names follow the released configurations (``piip-llava_<branches>_<sizes>_<LLM>``); the 13B towers
carry ``_13b`` (24 interactions instead of 12 for the ConvNeXt ones, a 5120-wide projector for all), and every
tower's projector width defaults to its LLM's hidden size (Vicuna-7B 4096, Vicuna-13B 5120; ``llm_dim=``
overrides it). Each released PIIP-LLaVA repo (``OpenGVLab/PIIP-LLaVA*``, a whole LLaVA model) is the default tag of
its tower (``llava_v1_5_7b``/``llava_v1_5_13b``: LLaVA-1.5 data; ``llava_plus_7b``: the 2.7M-sample PIIP-LLaVA-Plus);
loading reads only the shards holding the tower and projector and converts them
(:func:`piip_models.weights.checkpoint_filter_fn`). ``branches`` loads timm's CLIP/ConvNeXt weights instead.

Paper: Parameter-Inverted Image Pyramid Networks for Visual Perception and Multimodal Understanding
(https://arxiv.org/abs/2501.07783); official code https://github.com/OpenGVLab/PIIP (``llava/``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ._builder import CONVNEXT_39_SEGMENTS, build_piip, piip_cfg
from .config import BranchCfg, InteractionCfg, check_int, even_segments
from .hub import official_checkpoint
from .layers.projector import BranchMLPProjector
from .piip import PIIP

__all__ = ["PIIPLlava"]


class PIIPLlava(PIIP):
    """A PIIP-LLaVA vision tower and its projector.

    ``forward_features`` is the tower output: every branch's final tokens as maps resized to the last branch's grid
    and concatenated (``head_type='none'``); ``forward`` and :meth:`forward_multimodal` project them to
    ``(B, N, llm_dim)`` visual tokens.
    """

    def __init__(
        self,
        branches: Sequence[BranchCfg],
        interaction: InteractionCfg | None = None,
        llm_dim: int = 4096,
        num_classes: int = 0,
        in_chans: int = 3,
        global_pool: Literal["", "avg"] = "",
        img_size: int | tuple[int, int] | None = None,
        branch_sizes: Sequence[int] | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            branches: Branch configs, branch 0 (the larger model on the smaller image) first.
            interaction: Interaction hyper-parameters (the official ones when None).
            llm_dim: Width of the visual tokens (the language model's hidden size).
            num_classes: Must be 0 (the projector replaces a classifier).
            in_chans: Input channels.
            global_pool: ``''``: :meth:`forward` returns the ``(B, N, llm_dim)`` visual tokens; ``'avg'``: their mean
                over the N tokens, ``(B, llm_dim)``.
            img_size: Input size; scales the branch sizes proportionally when ``branch_sizes`` is not given.
            branch_sizes: Explicit branch resolutions, smallest first.
            drop_rate: Dropout on the tower maps before the projector (:meth:`forward_head`).
            drop_path_rate: Linear stochastic depth of every branch up to this rate (see :class:`PIIP`).
            device: Parameter device.
            dtype: Parameter dtype.
        """
        check_int("llm_dim", llm_dim, 1)
        super().__init__(
            branches, interaction or InteractionCfg(), num_classes=num_classes, in_chans=in_chans,
            global_pool=global_pool, head_type="none", class_token=True, img_size=img_size, branch_sizes=branch_sizes,
            drop_rate=drop_rate, drop_path_rate=drop_path_rate, device=device, dtype=dtype,
        )
        self.llm_dim = llm_dim
        self.projector = BranchMLPProjector(self.embed_dims, llm_dim, device=device, dtype=dtype)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tower maps to ``(B, H * W, llm_dim)`` visual tokens (``pre_logits``: the unprojected tokens), averaged
        over the tokens with ``global_pool='avg'``."""
        x = self.head.drop(x)
        tokens = x.flatten(2).transpose(1, 2) if pre_logits else self.projector(x)
        return tokens.mean(1) if self.global_pool == "avg" else tokens

    def forward_multimodal(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, C, H, W)`` to ``(B, N, llm_dim)`` visual tokens, N = the last branch's final grid size."""
        return self.projector(self.forward_features(x))

    @torch.jit.ignore
    def get_classifier(self) -> BranchMLPProjector:
        """The projector, which takes the classifier's place."""
        return self.projector


_CLIP_L_224 = "vit_large_patch14_clip_quickgelu_224.openai"
_CLIP_L_336 = "vit_large_patch14_clip_quickgelu_336.openai"
_CLIP_B = "vit_base_patch16_clip_quickgelu_224.openai"
_CONVNEXT_B = "convnext_base.clip_laiona_augreg_320"
_CONVNEXT_L = "convnext_large_mlp.clip_laion2b_ft_320"
# The 13B ConvNeXt towers interact twice as often: every stage-3 triple of units split into two segments.
_CONVNEXT_39_SEGMENTS_24 = (
    (0, 1), (2, 2), (3, 4), (5, 6), (7, 9), (10, 10),
    *(seg for s in range(11, 35, 3) for seg in ((s, s + 1), (s + 2, s + 2))),
    (35, 36), (37, 38),
)


def _clip(name: str, img_size: int, pretrain_size: int, num_segments: int) -> BranchCfg:
    """An OpenAI CLIP tower (QuickGELU, pre-norm) at patch 16, position embedding stored at the pretraining grid."""
    depth = 24 if "large" in name else 12
    return BranchCfg(
        name, img_size, even_segments(depth, num_segments), model_args=dict(patch_size=16),
        pos_embed_size=pretrain_size, class_pos_embed=True,
    )


def _llava(
    variant: str, branches: tuple[BranchCfg, BranchCfg], pretrained: bool, kwargs: dict[str, Any], llm_dim: int = 4096
) -> PIIPLlava:
    # llm_dim is the tower's default; a caller's llm_dim= overrides it
    model_kwargs = {"branches": branches, "llm_dim": llm_dim, **kwargs}
    return build_piip(variant, pretrained, model_cls=PIIPLlava, **model_kwargs)


def _convnext_clip_l_1024_336(
    variant: str, convnext: str, interactions: int, pretrained: bool, kwargs: dict[str, Any]
) -> PIIPLlava:
    """CLIP-L/16@336 and a CLIP ConvNeXt@1024 interacting 12 (7B) or 24 (13B, 5120-wide tokens) times."""
    segments = CONVNEXT_39_SEGMENTS if interactions == 12 else _CONVNEXT_39_SEGMENTS_24
    branches = (_clip(_CLIP_L_336, 336, 336, interactions), BranchCfg(convnext, 1024, segments))
    return _llava(variant, branches, pretrained, kwargs, llm_dim=4096 if interactions == 12 else 5120)


# The released repos hold transformers' sharded layout: model-0000i-of-0000n.safetensors and this index.
_LLAVA_INDEX = "model.safetensors.index.json"


def _llava_cfg(input_size: int, convnext: bool, repo: str | None = None) -> dict[str, Any]:
    """``repo``: the released ``OpenGVLab/<repo>`` LLaVA model whose tower and projector the tag loads."""
    weights = (
        dict(**official_checkpoint(_LLAVA_INDEX, f"OpenGVLab/{repo}"),
             notes=("vision tower and projector of the official PIIP-LLaVA model, converted on load",))
        if repo else
        dict(notes=("timm-pretrained CLIP/ConvNeXt branches with zero-initialised interactions and a fresh projector",))
    )
    # LLaVA's PIIP image processor center-crops to the last branch's size and normalises with ImageNet statistics.
    return piip_cfg(
        input_size, 2, False, num_classes=0, classifier="projector", mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD, first_conv=("branches.0.patch_embed.proj", "branches.1.stem.0" if convnext
                                              else "branches.1.patch_embed.proj"),
        paper_ids="arXiv:2501.07783",
        paper_name="Parameter-Inverted Image Pyramid Networks for Visual Perception and Multimodal Understanding",
        **weights,
    )


# The first tag of a tower is its default: the released PIIP-LLaVA model, then `branches`.
default_cfgs = generate_default_cfgs({
    "piip_llava_clip_bl_512_256.llava_v1_5_7b": _llava_cfg(512, False, "PIIP-LLaVA_CLIP-BL_512-256_7B"),
    "piip_llava_clip_bl_512_256.branches": _llava_cfg(512, False),
    "piip_llava_clip_bl_512_448.llava_v1_5_7b": _llava_cfg(512, False, "PIIP-LLaVA_CLIP-BL_512-448_7B"),
    "piip_llava_clip_bl_512_448.branches": _llava_cfg(512, False),
    "piip_llava_clip_bl_512_448_13b.llava_v1_5_13b": _llava_cfg(512, False, "PIIP-LLaVA_CLIP-BL_512-448_13B"),
    "piip_llava_clip_bl_512_448_13b.branches": _llava_cfg(512, False),
    "piip_llava_convnext_b_clip_l_640_224.llava_v1_5_7b": _llava_cfg(
        640, True, "PIIP-LLaVA_ConvNeXt-B_CLIP-L_640-224_7B"),
    "piip_llava_convnext_b_clip_l_640_224.branches": _llava_cfg(640, True),
    "piip_llava_convnext_b_clip_l_1024_336.llava_v1_5_7b": _llava_cfg(
        1024, True, "PIIP-LLaVA_ConvNeXt-B_CLIP-L_1024-336_7B"),
    "piip_llava_convnext_b_clip_l_1024_336.branches": _llava_cfg(1024, True),
    "piip_llava_convnext_b_clip_l_1024_336_13b.llava_v1_5_13b": _llava_cfg(
        1024, True, "PIIP-LLaVA_ConvNeXt-B_CLIP-L_1024-336_13B"),
    "piip_llava_convnext_b_clip_l_1024_336_13b.branches": _llava_cfg(1024, True),
    "piip_llava_convnext_l_clip_l_1024_336.llava_v1_5_7b": _llava_cfg(
        1024, True, "PIIP-LLaVA_ConvNeXt-L_CLIP-L_1024-336_7B"),
    "piip_llava_convnext_l_clip_l_1024_336.llava_plus_7b": _llava_cfg(
        1024, True, "PIIP-LLaVA-Plus_ConvNeXt-L_CLIP-L_1024-336_7B"),
    "piip_llava_convnext_l_clip_l_1024_336.branches": _llava_cfg(1024, True),
    "piip_llava_convnext_l_clip_l_1024_336_13b.llava_v1_5_13b": _llava_cfg(
        1024, True, "PIIP-LLaVA_ConvNeXt-L_CLIP-L_1024-336_13B"),
    "piip_llava_convnext_l_clip_l_1024_336_13b.branches": _llava_cfg(1024, True),
})


@register_model
def piip_llava_clip_bl_512_256(pretrained: bool = False, **kwargs) -> PIIPLlava:
    """PIIP-LLaVA CLIP-BL 512/256 (7B): CLIP-L/16@256, CLIP-B/16@512, 2 interactions, 1024 tokens."""
    branches = (_clip(_CLIP_L_224, 256, 224, 2), _clip(_CLIP_B, 512, 224, 2))
    return _llava("piip_llava_clip_bl_512_256", branches, pretrained, kwargs)


def _clip_bl_512_448() -> tuple[BranchCfg, BranchCfg]:
    return _clip(_CLIP_L_336, 448, 336, 12), _clip(_CLIP_B, 512, 224, 12)


@register_model
def piip_llava_clip_bl_512_448(pretrained: bool = False, **kwargs) -> PIIPLlava:
    """PIIP-LLaVA CLIP-BL 512/448 (7B): CLIP-L/16@448, CLIP-B/16@512, 12 interactions, 1024 tokens."""
    return _llava("piip_llava_clip_bl_512_448", _clip_bl_512_448(), pretrained, kwargs)


@register_model
def piip_llava_clip_bl_512_448_13b(pretrained: bool = False, **kwargs) -> PIIPLlava:
    """PIIP-LLaVA CLIP-BL 512/448 (13B): the 7B tower with 5120-wide tokens."""
    return _llava("piip_llava_clip_bl_512_448_13b", _clip_bl_512_448(), pretrained, kwargs, llm_dim=5120)


@register_model
def piip_llava_convnext_b_clip_l_640_224(pretrained: bool = False, **kwargs) -> PIIPLlava:
    """PIIP-LLaVA ConvNeXt-B CLIP-L 640/224 (7B): CLIP-L/16@224, CLIP ConvNeXt-B@640, 2 interactions, 400 tokens."""
    branches = (_clip(_CLIP_L_224, 224, 224, 2), BranchCfg(_CONVNEXT_B, 640, ((0, 19), (20, 38))))
    return _llava("piip_llava_convnext_b_clip_l_640_224", branches, pretrained, kwargs)


@register_model
def piip_llava_convnext_b_clip_l_1024_336(pretrained: bool = False, **kwargs) -> PIIPLlava:
    """PIIP-LLaVA ConvNeXt-B CLIP-L 1024/336 (7B): CLIP-L/16@336, CLIP ConvNeXt-B@1024, 12 interactions, 1024
    tokens."""
    return _convnext_clip_l_1024_336("piip_llava_convnext_b_clip_l_1024_336", _CONVNEXT_B, 12, pretrained, kwargs)


@register_model
def piip_llava_convnext_b_clip_l_1024_336_13b(pretrained: bool = False, **kwargs) -> PIIPLlava:
    """PIIP-LLaVA ConvNeXt-B CLIP-L 1024/336 (13B): as the 7B tower with 24 interactions, 5120-wide tokens."""
    return _convnext_clip_l_1024_336("piip_llava_convnext_b_clip_l_1024_336_13b", _CONVNEXT_B, 24, pretrained, kwargs)


@register_model
def piip_llava_convnext_l_clip_l_1024_336(pretrained: bool = False, **kwargs) -> PIIPLlava:
    """PIIP-LLaVA ConvNeXt-L CLIP-L 1024/336 (7B, and the LLaVA-Plus 7B release): CLIP-L/16@336, CLIP
    ConvNeXt-L@1024, 12 interactions, 1024 tokens."""
    return _convnext_clip_l_1024_336("piip_llava_convnext_l_clip_l_1024_336", _CONVNEXT_L, 12, pretrained, kwargs)


@register_model
def piip_llava_convnext_l_clip_l_1024_336_13b(pretrained: bool = False, **kwargs) -> PIIPLlava:
    """PIIP-LLaVA ConvNeXt-L CLIP-L 1024/336 (13B): as the 7B tower with 24 interactions, 5120-wide tokens."""
    return _convnext_clip_l_1024_336("piip_llava_convnext_l_clip_l_1024_336_13b", _CONVNEXT_L, 24, pretrained, kwargs)
