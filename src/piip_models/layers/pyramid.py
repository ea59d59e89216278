"""Feature pyramids of the dense heads: resampling levels ``p2`` .. ``p5`` at strides 4, 8, 16 and 32.

A *simple* pyramid (ViTDet style) derives every level from the one final map; a *regular* pyramid resamples the map
of each of several interaction stages to its level (the official regular-FPN configs, whose branches may change
stride between stages).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn as nn
from timm.layers import LayerNorm2d

from ..config import check_levels
from .merge import group_norm

__all__ = [
    "PYRAMID_STRIDES",
    "FeatureTap",
    "build_feature_taps",
    "check_levels",
    "level_name",
    "pyramid_level",
    "regular_feature_pyramid",
    "simple_feature_pyramid",
]

# Input pixels per cell of the levels p2 .. p5 (indices 0 .. 3).
PYRAMID_STRIDES = (4, 8, 16, 32)


def level_name(level: int) -> str:
    """``p2`` .. ``p5`` for level indices 0 .. 3."""
    return f"p{level + 2}"


def pyramid_level(scale: float, dim: int, dd: dict[str, Any], norm: Literal["group", "layer"] = "group") -> nn.Module:
    """Resamples a map by ``scale``: 4 (deconv-norm-GELU-deconv), 2 (deconv), 1 (identity) or 1/2 (max-pool).

    ``norm`` is the normalisation of the 4x level: GroupNorm(32) in the official PIIP backbones, a channels-first
    LayerNorm in the official single-ViT baselines.
    """
    if norm not in ("group", "layer"):
        raise ValueError(f"fpn_norm must be 'group' or 'layer', got {norm!r}")
    if scale == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, 2, **dd),
            group_norm(dim, dd) if norm == "group" else LayerNorm2d(dim, eps=1e-6, **dd),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, 2, **dd),
        )
    if scale == 2:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2, **dd))
    if scale == 1:
        return nn.Identity()
    if scale == 0.5:
        return nn.MaxPool2d(2, 2)
    raise ValueError(f"a pyramid level resamples by 4, 2, 1 or 1/2, not {scale}")


def simple_feature_pyramid(
    dim: int, levels: Sequence[int], dd: dict[str, Any], norm: Literal["group", "layer"] = "group"
) -> nn.ModuleDict:
    """ViTDet-style levels of one ``dim``-wide map: 4x, 2x, 1x and 1/2x its resolution (strides 4 .. 32 of a
    stride-16 map)."""
    check_levels(levels)
    return nn.ModuleDict({level_name(level): pyramid_level(2.0 ** (2 - level), dim, dd, norm) for level in levels})


def regular_feature_pyramid(
    dims: Sequence[int], strides: Sequence[int], levels: Sequence[int], dd: dict[str, Any]
) -> nn.ModuleDict:
    """One level per stage map (``dims``/``strides`` of each), resampled from its stride to its level's."""
    check_levels(levels)
    if len(levels) != len(dims):
        raise ValueError(
            f"a regular pyramid has one level per merge stage and one for the final map ({len(dims)}), got "
            f"fpn_levels {tuple(levels)}"
        )
    return nn.ModuleDict({
        level_name(level): pyramid_level(stride / PYRAMID_STRIDES[level], dim, dd)
        for level, dim, stride in zip(levels, dims, strides)
    })


@dataclass(frozen=True)
class FeatureTap:
    """One feature tap: the fused map after interaction ``stage``, resampled by the pyramid level ``level``
    (``'p2'`` .. ``'p5'``) or as it is (None)."""

    stage: int
    level: str | None = None


def build_feature_taps(
    stage_dims: Sequence[Sequence[int]],
    stage_strides: Sequence[Sequence[int]],
    merge_stages: Sequence[int],
    with_fpn: bool,
    fpn_levels: Sequence[int],
    fpn_norm: Literal["group", "layer"],
    concatenated: bool,
    dd: dict[str, Any],
) -> tuple[nn.ModuleDict | None, list[FeatureTap], list[dict[str, Any]]]:
    """The feature pyramid (or None), the feature taps and their timm ``feature_info`` of a pyramid.

    Without a pyramid the taps are the fused maps after every interaction stage. A regular pyramid taps the maps of
    the merge stages and the final one, each on the last branch's grid with branch 0's width at that depth (and
    resampled to its level with ``with_fpn``); a simple pyramid resamples the final map to every level.

    Args:
        stage_dims: Every branch's width at the end of every stage.
        stage_strides: Every branch's stride at the end of every stage.
        merge_stages: Stages with merges of their own (a regular pyramid), or empty.
        with_fpn: Build the pyramid levels.
        fpn_levels: Level indices (strides 4, 8, 16, 32).
        fpn_norm: Normalisation of a simple pyramid's stride-4 level.
        concatenated: The fused maps concatenate the branches (else they have branch 0's width).
        dd: Device and dtype of the levels' parameters.
    """
    last = len(stage_dims) - 1
    if merge_stages:
        stages = tuple(merge_stages) + (last,)
        dims = [stage_dims[s][0] for s in stages]
        strides = [stage_strides[s][-1] for s in stages]
        if not with_fpn:
            info = [dict(num_chs=dim, reduction=stride, module=f"interactions.{s}")
                    for s, dim, stride in zip(stages, dims, strides)]
            return None, [FeatureTap(s) for s in stages], info
        fpn = regular_feature_pyramid(dims, strides, fpn_levels, dd)
        info = [dict(num_chs=dim, reduction=PYRAMID_STRIDES[level], module=f"fpn.{level_name(level)}")
                for level, dim in zip(fpn_levels, dims)]
        return fpn, [FeatureTap(s, level_name(level)) for s, level in zip(stages, fpn_levels)], info
    widths = [sum(dims) if concatenated else dims[0] for dims in stage_dims]
    if with_fpn:
        patch = stage_strides[-1][-1]
        fpn = simple_feature_pyramid(widths[-1], fpn_levels, dd, fpn_norm)
        info = [dict(num_chs=widths[-1], reduction=int(patch * 2.0 ** (level - 2)), module=f"fpn.{level_name(level)}")
                for level in fpn_levels]
        return fpn, [FeatureTap(last, level_name(level)) for level in fpn_levels], info
    info = [dict(num_chs=width, reduction=strides[-1], module=f"interactions.{s}")
            for s, (width, strides) in enumerate(zip(widths, stage_strides))]
    return None, [FeatureTap(s) for s in range(last + 1)], info
