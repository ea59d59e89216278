"""Building registered PIIP models: the create helper of every family, pretrained cfgs and shared branch presets.

:func:`build_piip` is what every registered entrypoint calls (timm's ``build_model_with_cfg`` plus PIIP's two kinds
of pretrained weights: a released checkpoint, or each branch's own timm weights); :func:`piip_cfg` and
:func:`dense_cfg` make pretrained cfgs; the branch presets are the official branch configurations that several
families share. :func:`create_pyramid` builds a custom pyramid from timm model names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from .branches import unit_count
from .config import (
    BranchCfg,
    check_branches,
    check_feature_indices,
    check_int,
    check_levels,
    even_segments,
    stage_count,
)
from .features import PIIPFeatures
from .hub import fetch_pretrained, official_checkpoint, prepare_pretrained_cfg
from .piip import PIIP
from .weights import checkpoint_filter_fn

__all__ = [
    "CONVNEXT_39_SEGMENTS",
    "DENSE_ARGS",
    "build_dense",
    "build_piip",
    "create_pyramid",
    "deit_branch",
    "deit_detection_branch",
    "deit3_detection_branch",
    "dense_cfg",
    "piip_cfg",
]


def _tap_count(kwargs: dict[str, Any]) -> tuple[int, bool]:
    """The number of feature taps the model kwargs give, and whether they are interaction stages."""
    if kwargs.get("with_fpn"):
        levels = kwargs.get("fpn_levels", (0, 1, 2, 3))
        check_levels(levels)
        return len(levels), False
    if kwargs.get("merge_stages"):
        return len(tuple(kwargs["merge_stages"])) + 1, False
    return stage_count(check_branches(kwargs["branches"])), True


def _default_out_indices(kwargs: dict[str, Any]) -> tuple[int, ...]:
    """Taps of ``features_only``: every pyramid level or regular-pyramid map, else four evenly spaced interaction
    stages, the last one included, as ViT-Adapter-style pyramids tap them."""
    num_taps, stages = _tap_count(kwargs)
    if not stages:
        return tuple(range(num_taps))
    return tuple(sorted({max(0, round(num_taps * (i + 1) / 4) - 1) for i in range(4)}))


def build_piip(variant: str, pretrained: bool = False, model_cls: type[PIIP] = PIIP, **kwargs: Any) -> PIIP:
    """Builds a registered PIIP variant with timm's ``build_model_with_cfg``.

    With ``pretrained=True`` a tag with a released checkpoint is fetched, verified and loaded through
    :meth:`PIIP.load_pretrained`; a tag without one (``branches``) loads every branch's timm weights instead, with the
    interactions at their zero init. ``features_only=True`` gives :class:`~piip_models.features.PIIPFeatures`, timm's
    getter over the feature taps; dense models then build their feature pyramid. Requested ``out_indices`` and the
    weights' files (offline: the cache) are checked before the model is built.

    Args:
        variant: Registered architecture name.
        pretrained: Load pretrained weights.
        model_cls: The model class (:class:`PIIP` or a subclass).
        **kwargs: Model keyword arguments and timm's ``pretrained_cfg``, ``pretrained_cfg_overlay``, ``cache_dir``,
            ``features_only``, ``out_indices``.
    """
    pretrained_cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.pop("pretrained_cfg", None),
        pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None),
    )
    cache_dir = kwargs.pop("cache_dir", None)
    # Without a full PIIP checkpoint, pretrained=True means "pretrained branches, fresh interactions".
    load_branches = pretrained and not pretrained_cfg.has_weights
    if kwargs.get("head_type") == "dense" and kwargs.get("features_only"):
        kwargs.setdefault("with_fpn", True)
    # What fails without the model fails before it is built: the feature taps asked for, then the weights.
    if kwargs.get("features_only") and kwargs.get("out_indices") is not None:
        check_feature_indices(kwargs["out_indices"], _tap_count(kwargs)[0])
    if load_branches:
        for branch in check_branches(kwargs["branches"]):
            fetch_pretrained(branch.model_name, cache_dir)
    elif pretrained:
        pretrained_cfg = prepare_pretrained_cfg(pretrained_cfg, cache_dir)
    model = build_model_with_cfg(
        model_cls,
        variant,
        pretrained and not load_branches,
        pretrained_cfg=pretrained_cfg,
        pretrained_filter_fn=partial(checkpoint_filter_fn, strict=kwargs.get("pretrained_strict", True)),
        feature_cfg=dict(feature_cls=PIIPFeatures, out_indices=_default_out_indices(kwargs)),
        cache_dir=cache_dir,
        **kwargs,
    )
    if load_branches:
        # features_only wraps the pyramid (PIIPFeatures keeps it as .model)
        (model.model if kwargs.get("features_only") else model).load_branch_weights(cache_dir=cache_dir)
    return model


_BRANCH_INIT_NOTE = "timm-pretrained branches with zero-initialised interactions (pretrained=True loads the branches)"
_OFFICIAL_NOTE = "official OpenGVLab/PIIP checkpoint, converted to piip-models names on load"
# Detection configs normalise to [-1, 1] (mean = std = 127.5).
_DET_NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def piip_cfg(
    input_size: int, num_branches: int, separate_heads: bool = True, file: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    """A pretrained cfg of a classifier (ImageNet statistics, 1000 classes).

    Args:
        input_size: Input side (the last branch's size).
        num_branches: Number of branches (their patch embeddings are the ``first_conv``).
        separate_heads: The classifiers are the branches' heads (else one ``head``).
        file: The tag's released checkpoint in ``OpenGVLab/PIIP``; without one ``pretrained=True`` loads the timm
            branches.
        **kwargs: Entries that override or add to the defaults.
    """
    classifier = tuple(f"branches.{k}.head" for k in range(num_branches)) if separate_heads else "head"
    weights = {**official_checkpoint(file), "notes": (_OFFICIAL_NOTE,)} if file else {"notes": (_BRANCH_INIT_NOTE,)}
    return {
        "num_classes": 1000,
        "input_size": (3, input_size, input_size),
        "pool_size": (input_size // 16, input_size // 16),
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": tuple(f"branches.{k}.patch_embed.proj" for k in range(num_branches)),
        "classifier": classifier,
        "license": "mit",
        "paper_ids": "arXiv:2406.04330",
        "paper_name": "Parameter-Inverted Image Pyramid Networks",
        "origin_url": "https://github.com/OpenGVLab/PIIP",
        **weights,
        **kwargs,
    }


def dense_cfg(input_size: int, num_branches: int, file: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg of a detection/segmentation backbone: no classes, [-1, 1] normalisation unless overridden."""
    return piip_cfg(input_size, num_branches, False, file, num_classes=0, **{**_DET_NORM, **kwargs})


# Keyword arguments of every dense (detection / segmentation) backbone.
DENSE_ARGS = dict(head_type="dense", class_token=False, num_classes=0, global_pool="avg")


def build_dense(
    variant: str, branches: Sequence[BranchCfg], pretrained: bool, kwargs: dict[str, Any], **extra: Any
) -> PIIP:
    """:func:`build_piip` for a dense backbone; ``extra`` are the variant's own arguments, ``kwargs`` the caller's
    (which win)."""
    return build_piip(variant, pretrained, **dict(dict(branches=tuple(branches), **DENSE_ARGS, **extra), **kwargs))


# Segments of the official 39-unit ConvNeXt configs: one per stage end for the first two interactions, then stage 3
# in pieces of three units.
CONVNEXT_39_SEGMENTS = ((0, 2), (3, 6), (7, 10), *((s, s + 2) for s in range(11, 35, 3)), (35, 38))
_DEIT3_DEPTHS = {"small": 12, "base": 12, "large": 24}


def deit_branch(size: str, img_size: int, drop_path_rate: float) -> BranchCfg:
    """DeiT v1 branch with LayerScale gammas (initialised to 1) and no class slot in the position embedding."""
    return BranchCfg(
        f"deit_{size}_patch16_224.fb_in1k",
        img_size,
        even_segments(12, 12),
        drop_path_rate,
        model_args=dict(init_values=1.0, no_embed_class=True),
    )


def deit_detection_branch(img_size: int, window: int) -> BranchCfg:
    """DeiT-T v1 detection branch: windowed attention, position embedding at the 224 pretraining grid."""
    return replace(deit_branch("tiny", img_size, 0.05), pos_embed_size=224, window_size=window)


def deit3_detection_branch(
    size: str, img_size: int, drop_path_rate: float, window: int, pretrain: int = 224, global_every: int = 0
) -> BranchCfg:
    """DeiT III (ImageNet-21k) detection branch: windowed attention, position embedding at the pretraining grid.

    Args:
        size: ``'small'``, ``'base'`` or ``'large'``.
        img_size: Branch resolution.
        drop_path_rate: Constant stochastic depth.
        window: Attention window in tokens.
        pretrain: Pretraining resolution (224 or 384), whose grid stores the position embedding.
        global_every: Give every n-th block global attention (0: none).
    """
    depth = _DEIT3_DEPTHS[size]
    return BranchCfg(
        f"deit3_{size}_patch16_{pretrain}.fb_in22k_ft_in1k",
        img_size,
        even_segments(depth, 12),
        drop_path_rate,
        model_args=dict(init_values=1.0),
        pos_embed_size=pretrain,
        window_size=window,
        global_blocks=tuple(range(global_every - 1, depth, global_every)) if global_every else (),
    )


def create_pyramid(
    branches: Sequence[tuple[str, int] | BranchCfg],
    num_interactions: int | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> PIIP:
    """Builds a custom PIIP from any timm ViT (or ConvNeXt) names and sizes.

    Args:
        branches: ``(timm_model_name, img_size)`` pairs or :class:`BranchCfg`, largest model (smallest image) first.
            A pretrained tag in the name (``deit_small_patch16_224.fb_in1k``) selects the weights to load.
        num_interactions: Interaction count; each branch's units are split evenly. Defaults to the smallest depth.
        pretrained: Load each branch's timm pretrained weights (interactions start at their zero init).
        **kwargs: :class:`PIIP` keyword arguments (``num_classes``, ``head_type``, ``interaction``, ...).

    Returns:
        The model, with a pretrained_cfg derived from the last branch size.
    """
    if isinstance(branches, (str, bytes)) or not isinstance(branches, Sequence) or not branches:
        raise ValueError(f"create_pyramid needs a non-empty sequence of (timm_name, img_size) pairs, got {branches!r}")
    if num_interactions is not None:
        check_int("num_interactions", num_interactions, 1)
    depths = []
    for k, item in enumerate(branches):
        if isinstance(item, BranchCfg):
            depths.append(max(end for _, end in item.segments) + 1)
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            depths.append(unit_count(item[0]))
        else:
            raise TypeError(f"branch {k} must be a (timm_name, img_size) pair or a BranchCfg, got {item!r}")
    num_interactions = min(depths) if num_interactions is None else num_interactions
    cfgs = tuple(
        item if isinstance(item, BranchCfg)
        else BranchCfg(item[0], item[1], even_segments(depth, num_interactions))
        for item, depth in zip(branches, depths)
    )
    if pretrained:  # before the model is built: offline without the weights, fail at once
        for cfg in cfgs:
            fetch_pretrained(cfg.model_name)
    separate_heads = kwargs.get("head_type", "separate") == "separate"
    pretrained_cfg = {**piip_cfg(cfgs[-1].img_size, len(cfgs), separate_heads), "architecture": "piip_custom"}
    model = PIIP(branches=cfgs, **kwargs)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg
    if pretrained:
        model.load_branch_weights()
    return model
