"""Translation of official OpenGVLab/PIIP model configs into piip-models arguments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import BranchCfg, InteractionCfg
from .piip import PIIP

__all__ = ["branch_cfg_from_official", "model_kwargs_from_official", "build_from_official"]

# Official branch kwargs with a direct timm VisionTransformer equivalent.
_VIT_ARGS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")
# Hugging Face ConvNeXt checkpoints of the detection configs and the timm weights with the same tensors.
_HF_CONVNEXT = {
    "facebook/convnext-tiny-224": "convnext_tiny.fb_in1k",
    "facebook/convnext-small-224": "convnext_small.fb_in1k",
    "facebook/convnext-base-224": "convnext_base.fb_in1k",
}


def _is_deit_type(branch: Mapping[str, Any]) -> bool:
    """The official code picks ``vit_models`` (DeiT) by ``model_type`` (classification) or, in detection, by the
    substring ``deit`` in the ``pretrained`` path; everything else is the ``InternViT6B`` (AugReg-style) class."""
    if "model_type" in branch:
        return branch["model_type"] == "deit"
    return branch.get("pretrained") is None or "deit" in str(branch["pretrained"]).lower()


def _windows(branch: Mapping[str, Any]) -> tuple[int, tuple[int, ...]]:
    flags = branch.get("window_attn") or []
    sizes = branch.get("window_size") or []
    if not any(flags):
        return 0, ()
    windowed = {size for flag, size in zip(flags, sizes) if flag}
    if len(windowed) != 1:
        raise ValueError(f"one window size per branch is supported, got {sorted(windowed)}")
    return windowed.pop(), tuple(i for i, flag in enumerate(flags) if not flag)


def branch_cfg_from_official(branch: Mapping[str, Any]) -> BranchCfg:
    """Maps one official ``branch{k}`` dict (classification or detection) to a BranchCfg.

    Hugging Face ConvNeXt branches become the timm ConvNeXts with the same weights (linear drop path, as Hugging
    Face's). DeiT-type branches always carry LayerScale gammas (``init_scale``), a position embedding without a class
    slot and a constant drop-path rate; AugReg-type (``InternViT6B``) branches keep the class slot, use LayerScale
    only with ``init_values`` and, in detection configs, a linear drop-path schedule; with RMSNorm and
    qk-normalisation they are InternViT-6B branches. Fused MLPs (``mlp_type``/``Mlp_block='fused_mlp'``) use
    tanh-approximate GELU; segmentation branches (``img_size`` beside ``real_size``) store their position embedding
    at ``img_size``.

    Raises:
        ValueError: A required option is missing or malformed (the values are then checked by :class:`BranchCfg`).
    """
    if not isinstance(branch, Mapping):
        raise ValueError(f"an official branch config is a dict of options, got {branch!r}")
    try:
        return _branch_cfg(branch)
    except (KeyError, IndexError) as e:
        raise ValueError(f"official branch config {dict(branch)} lacks or malforms {e}") from None


def _branch_cfg(branch: Mapping[str, Any]) -> BranchCfg:
    rms_norm = branch.get("norm_layer_type", "LayerNorm") == "RMSNorm"
    if rms_norm != bool(branch.get("qk_normalization")):
        raise ValueError("RMSNorm and qk-normalisation are supported together only (the InternViT-6B combination)")
    dense = "real_size" in branch
    segments = tuple(tuple(pair) for pair in branch["interaction_indexes"])
    if "convnext" in str(branch.get("pretrained", "")).lower():
        if branch["pretrained"] not in _HF_CONVNEXT:
            raise ValueError(f"unknown ConvNeXt checkpoint {branch['pretrained']!r}; known: {sorted(_HF_CONVNEXT)}")
        drop_path_rate = float(branch.get("drop_path_rate", 0.0))
        name = _HF_CONVNEXT[branch["pretrained"]]
        return BranchCfg(name, int(branch["real_size"]), segments, drop_path_rate, "linear")
    model_name = "internvit_6b_patch14_224" if rms_norm else "vit_base_patch16_224"
    model_args = {k: branch[k] for k in _VIT_ARGS if k in branch}
    if _is_deit_type(branch):
        model_args.update(init_values=branch.get("init_scale", 1.0), no_embed_class=True)
        drop_path_mode = "constant"
    else:
        model_args["init_values"] = branch.get("init_values") or None
        drop_path_mode = "linear" if dense else "constant"
    if "fused_mlp" in (branch.get("mlp_type"), branch.get("Mlp_block")):
        model_args["act_layer"] = "gelu_tanh"
    window_size, global_blocks = _windows(branch)
    return BranchCfg(
        model_name,
        int(branch["real_size"] if dense else branch["img_size"]),
        segments,
        float(branch.get("drop_path_rate", 0.0)),
        drop_path_mode,
        model_args=model_args,
        pos_embed_size=int(branch.get("img_size", branch["pretrain_img_size"])) if dense else None,
        window_size=window_size,
        global_blocks=global_blocks,
    )


def model_kwargs_from_official(config: Mapping[str, Any]) -> dict[str, Any]:
    """Maps the constructor kwargs of an official ``PIIP{Two,Three,Four}Branch`` (classification or detection
    backbone) to PIIP kwargs."""
    branch_keys = sorted((k for k in config if k.startswith("branch") and k[6:].isdigit()), key=lambda k: int(k[6:]))
    branches = [config[k] for k in branch_keys]
    if not branches:
        raise ValueError(f"an official PIIP config needs branch1, branch2, ... entries; got keys {sorted(config)}")
    interaction = InteractionCfg(
        num_heads=config.get("deform_num_heads", 16),
        n_points=config.get("n_points", 4),
        deform_ratio=config.get("deform_ratio", 0.5),
        with_cffn=config.get("with_cffn", True),
        cffn_ratio=config.get("cffn_ratio", 0.25),
        drop_path_rate=config.get("interaction_drop_path_rate", 0.4),
        with_proj=config.get("interaction_proj", True),
        with_norm=config.get("norm_layer", "layer_norm") != "none",
    )
    kwargs: dict[str, Any] = dict(
        branches=tuple(branch_cfg_from_official(b) for b in branches), interaction=interaction
    )
    if "real_size" in branches[0]:
        dense = dict(kwargs, head_type="dense", class_token=False, num_classes=0, global_pool="avg", with_fpn=True)
        if not config.get("with_simple_fpn", True):  # regular FPN: intermediate merges
            return dict(dense, merge_stages=tuple(config["out_interaction_indexes"]))
        return dict(dense, fpn_levels=(1, 2, 3) if config.get("is_dino") else (0, 1, 2, 3))
    separate = bool(config.get("separate_head", False))
    return dict(
        kwargs,
        num_classes=int(config.get("num_classes", 1000)),
        head_type="separate" if separate else "merged",
        global_pool="first_patch" if separate else "avg",
        class_token=bool(branches[0].get("use_cls_token", True)),
    )


def build_from_official(config: Mapping[str, Any], **kwargs: Any) -> PIIP:
    """Builds the PIIP equivalent of an official model config (random init)."""
    return PIIP(**{**model_kwargs_from_official(config), **kwargs})
