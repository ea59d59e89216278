"""Translation of official OpenGVLab/PIIP model configs into piip-models arguments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .piip import PIIP, BranchCfg, InteractionCfg

__all__ = ["branch_cfg_from_official", "model_kwargs_from_official", "build_from_official"]

# Official branch kwargs with a direct timm VisionTransformer equivalent.
_VIT_ARGS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")


def branch_cfg_from_official(branch: Mapping[str, Any]) -> BranchCfg:
    """Maps one official ``branch{k}`` dict (``vit_models`` / DeiT or ``InternViT6B`` / AugReg type) to a BranchCfg.

    DeiT-type branches always carry LayerScale gammas (``init_scale``) and a position embedding without a class
    slot; AugReg-type branches keep the class slot and use LayerScale only when ``init_values`` is set.
    """
    model_args = {k: branch[k] for k in _VIT_ARGS if k in branch}
    if branch.get("model_type", "deit") == "augreg":
        if branch.get("init_values"):
            model_args["init_values"] = branch["init_values"]
    else:
        model_args.update(init_values=branch.get("init_scale", 1.0), no_embed_class=True)
    segments = tuple((int(start), int(end)) for start, end in branch["interaction_indexes"])
    return BranchCfg(
        "vit_base_patch16_224",
        int(branch["img_size"]),
        segments,
        float(branch.get("drop_path_rate", 0.0)),
        model_args=model_args,
    )


def model_kwargs_from_official(config: Mapping[str, Any]) -> dict[str, Any]:
    """Maps the constructor kwargs of an official classification ``PIIP{Two,Three,Four}Branch`` to PIIP kwargs."""
    branch_keys = sorted((k for k in config if k.startswith("branch") and k[6:].isdigit()), key=lambda k: int(k[6:]))
    branches = [config[k] for k in branch_keys]
    separate = bool(config.get("separate_head", False))
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
    return dict(
        branches=tuple(branch_cfg_from_official(b) for b in branches),
        interaction=interaction,
        num_classes=int(config.get("num_classes", 1000)),
        head_type="separate" if separate else "merged",
        global_pool="first_patch" if separate else "avg",
        class_token=bool(branches[0].get("use_cls_token", True)),
    )


def build_from_official(config: Mapping[str, Any], **kwargs: Any) -> PIIP:
    """Builds the PIIP equivalent of an official classification model config (random init)."""
    return PIIP(**{**model_kwargs_from_official(config), **kwargs})
