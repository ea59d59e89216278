"""Parameter-Inverted Image Pyramid Networks (PIIP).

An image pyramid runs through pretrained ViT (or ConvNeXt) branches of *inverted* size: the largest model sees the
smallest image. After every block segment, adjacent branches exchange information with cross-resolution deformable
attention, and the branches are merged per task.

Papers:
    Parameter-Inverted Image Pyramid Networks - https://arxiv.org/abs/2406.04330
    Parameter-Inverted Image Pyramid Networks for Visual Perception and Multimodal Understanding
        - https://arxiv.org/abs/2501.07783

Official code: https://github.com/OpenGVLab/PIIP (the branch interactions, merges and checkpoint layouts here are
re-implemented from its behaviour; see ``piip_models.weights`` for the key conversion).

@article{zhu2024parameter,
  title={Parameter-Inverted Image Pyramid Networks},
  author={Zhu, Xizhou and Yang, Xue and Wang, Zhaokai and Li, Hao and Dou, Wenhan and Ge, Junqi and Lu, Lewei and
          Qiao, Yu and Dai, Jifeng},
  journal={arXiv preprint arXiv:2406.04330},
  year={2024}
}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    load_pretrained,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models._features import feature_take_indices

from .branches import build_branch, unit_count
from .hub import load_checkpoint, official_checkpoint, prepare_pretrained_cfg
from .layers.interaction import BranchGeometry, InteractionBlock, init_piip_weights
from .layers.msdeform_attn import reference_points
from .layers.permute import ChannelsLast
from .layers.window_attention import WindowPadding
from .weights import checkpoint_filter_fn

__all__ = ["PIIP", "BranchCfg", "InteractionCfg", "even_segments"]


@dataclass(frozen=True)
class InteractionCfg:
    """Hyper-parameters of the cross-branch interactions (identical in every official config)."""

    num_heads: int = 16
    n_points: int = 4
    deform_ratio: float = 0.5
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    drop_path_rate: float = 0.4
    with_proj: bool = True
    with_norm: bool = True


@dataclass(frozen=True)
class BranchCfg:
    """One pyramid branch: a timm ViT or ConvNeXt, its image size and its block segments.

    Attributes:
        model_name: timm architecture, optionally with a pretrained tag (``deit_tiny_patch16_224.fb_in1k``); the tag
            names the weights that ``pretrained=True`` loads when no full PIIP checkpoint is configured.
        img_size: Branch resolution at the model's default input size.
        segments: Inclusive ``(first, last)`` unit ranges, one per interaction. Units are a ViT's blocks, or a
            ConvNeXt's blocks with every downsampling layer counted as a unit of its own (ConvNeXt-T: 21 units,
            ConvNeXt-S/B/L: 39).
        drop_path_rate: Stochastic depth of the branch blocks.
        drop_path_mode: ``'constant'`` (every block, as the official classification models) or ``'linear'`` (0 to
            the rate over depth).
        model_args: Extra keyword arguments for ``timm.create_model`` (e.g. ``init_values=1.0`` for DeiT v1 with
            LayerScale, ``no_embed_class=True`` for a position embedding without a class slot).
        pos_embed_size: Image size whose patch grid stores the position embedding (the pretraining size of the
            detection configs); ``img_size`` when None. It is resampled to the actual grid on every forward.
        window_size: Attention window in tokens (0: global attention in every block).
        global_blocks: Blocks that keep global attention when ``window_size`` is set.
        class_pos_embed: Add the stored prefix-slot position embedding to the class token (the PIIP-LLaVA CLIP
            towers do; everywhere else PIIP gives class tokens no position embedding).
    """

    model_name: str
    img_size: int
    segments: tuple[tuple[int, int], ...]
    drop_path_rate: float = 0.0
    drop_path_mode: Literal["constant", "linear"] = "constant"
    model_args: dict[str, Any] = field(default_factory=dict)
    pos_embed_size: int | None = None
    window_size: int = 0
    global_blocks: tuple[int, ...] = ()
    class_pos_embed: bool = False


def even_segments(depth: int, num_segments: int) -> tuple[tuple[int, int], ...]:
    """Splits ``depth`` blocks into ``num_segments`` contiguous inclusive ranges, the longer ones last."""
    if not 0 < num_segments <= depth:
        raise ValueError(f"cannot split {depth} blocks into {num_segments} segments")
    bounds = [round(i * depth / num_segments) for i in range(num_segments + 1)]
    return tuple((bounds[i], bounds[i + 1] - 1) for i in range(num_segments))


def _group_norm(channels: int, dd: dict[str, Any]) -> nn.GroupNorm:
    if channels % 32:
        raise ValueError(f"branch merges use GroupNorm(32, C) and need widths divisible by 32, got {channels}")
    return nn.GroupNorm(32, channels, **dd)


def classification_merge(in_dim: int, out_dim: int, project: bool, dd: dict[str, Any]) -> nn.Sequential:
    """GroupNorm, then (``project``) Linear to the merge width and GroupNorm: the official classification merge."""
    if not project:
        return nn.Sequential(_group_norm(in_dim, dd))
    linear = nn.Linear(in_dim, out_dim, **dd)
    return nn.Sequential(
        _group_norm(in_dim, dd), ChannelsLast(), linear, ChannelsLast(inverse=True), _group_norm(out_dim, dd)
    )


def dense_merge(in_dim: int, out_dim: int, dd: dict[str, Any]) -> nn.Sequential:
    """Two Conv3x3-GroupNorm-ReLU layers to the merge width: the official detection/segmentation merge."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, 3, padding=1, bias=False, **dd), _group_norm(out_dim, dd), nn.ReLU(),
        nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False, **dd), _group_norm(out_dim, dd), nn.ReLU(),
    )


def regular_dense_merge(in_dim: int, out_dim: int, project: bool, dd: dict[str, Any]) -> nn.Sequential:
    """GroupNorm-ReLU, after a Conv3x3 to the merge width when ``project``: the lighter merge of the official
    regular-FPN (intermediate merging) configs."""
    conv = [nn.Conv2d(in_dim, out_dim, 3, padding=1, bias=False, **dd)] if project else []
    return nn.Sequential(*conv, _group_norm(out_dim, dd), nn.ReLU())


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
            _group_norm(dim, dd) if norm == "group" else LayerNorm2d(dim, eps=1e-6, **dd),
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


def _check_levels(levels: Sequence[int]) -> None:
    if not levels or any(level not in range(4) for level in levels) or list(levels) != sorted(set(levels)):
        raise ValueError(f"fpn_levels must be increasing indices in 0..3 (pyramid levels p2..p5), got {levels}")


def simple_feature_pyramid(
    dim: int, levels: Sequence[int], dd: dict[str, Any], norm: Literal["group", "layer"] = "group"
) -> nn.ModuleDict:
    """ViTDet-style maps at 1/4, 1/2, 1 and 2 times the input stride (``p2`` .. ``p5``), for the chosen levels."""
    _check_levels(levels)
    return nn.ModuleDict({f"p{level + 2}": pyramid_level(2.0 ** (2 - level), dim, dd, norm) for level in levels})


class PIIP(nn.Module):
    """Parameter-Inverted Image Pyramid network built from timm Vision Transformers and ConvNeXts.

    Branch ``k`` (0-based) is a timm model that sees the input resized by ``branch_sizes[k] / branch_sizes[-1]``;
    branch 0 is the largest model on the smallest image. ``forward_features`` returns an NCHW map on the last
    (finest) branch grid: the concatenation of each branch's (final-normed) tokens resized to that grid
    (``head_type='separate'``, the released classifiers, and ``'none'``, the raw branch outputs of the multimodal
    towers), or the weighted merge of all branches (``'merged'``: GroupNorm/Linear merges; ``'dense'``: the
    detection/segmentation conv merges, whose feature pyramid is exposed through ``forward_intermediates`` and
    ``features_only``).
    """

    def __init__(
        self,
        branches: Sequence[BranchCfg],
        interaction: InteractionCfg = InteractionCfg(),
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: Literal["first_patch", "avg", ""] = "avg",
        head_type: Literal["separate", "merged", "dense", "none"] = "separate",
        class_token: bool = True,
        img_size: int | tuple[int, int] | None = None,
        branch_sizes: Sequence[int] | None = None,
        window_padding: WindowPadding = "before_qkv",
        with_fpn: bool = False,
        fpn_levels: Sequence[int] = (0, 1, 2, 3),
        fpn_norm: Literal["group", "layer"] = "group",
        merge_stages: Sequence[int] = (),
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            branches: Branch configs, largest model (smallest image) first; a single branch makes a plain
                baseline with the same heads.
            interaction: Interaction hyper-parameters.
            num_classes: Classes of the head (0 for features only).
            in_chans: Input channels.
            global_pool: ``'first_patch'`` reads each branch's first patch token (the official separate-head
                readout), ``'avg'`` averages the feature map, ``''`` keeps it.
            head_type: ``'separate'`` (a head per branch, logits averaged), ``'merged'`` (GroupNorm/Linear merge,
                learnable branch weights, LayerNorm, mean, Linear), ``'dense'`` (conv merges, learnable branch
                weights and a feature pyramid, for detection and segmentation) or ``'none'`` (the branch outputs
                alone: no final norms, merges or classifier).
            class_token: Give each ViT branch a class token (no position embedding, skips the interactions).
            img_size: Input size; scales the branch sizes proportionally when ``branch_sizes`` is not given.
            branch_sizes: Explicit branch resolutions, smallest (branch 0) first.
            window_padding: Where windowed attention zero-pads: ``'before_qkv'`` (released configs) or
                ``'after_qkv'`` (the official non-flash DeiT path).
            with_fpn: Build the dense head's feature pyramid; its levels become the feature taps
                (``features_only=True`` turns it on for dense models). Without it the taps are interaction stages
                (or the ``merge_stages`` maps).
            fpn_levels: Pyramid levels, indices of strides ``(4, 8, 16, 32)``; ``(1, 2, 3)`` for DINO.
            fpn_norm: Normalisation inside the stride-4 level: ``'group'`` (GroupNorm(32), the PIIP backbones) or
                ``'layer'`` (channels-first LayerNorm, the official single-ViT baselines).
            merge_stages: Interaction stages whose tokens get merges of their own, the dense maps of the
                official regular-FPN configs (``out_interaction_indexes``): the pyramid is then these maps and the
                final one, each on the last branch's grid at that depth with branch 0's width at that depth, and
                every merge is the lighter (Conv3x3-)GroupNorm-ReLU. Needed by branches whose width changes between
                stages (ConvNeXt).
            drop_rate: Dropout before the classifier.
            device: Parameter device.
            dtype: Parameter dtype.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        branches = tuple(branches)
        merge_stages = tuple(int(s) for s in merge_stages)
        if not branches:
            raise ValueError("a pyramid needs at least one branch")
        if head_type not in ("separate", "merged", "dense", "none"):
            raise ValueError(f"head_type must be 'separate', 'merged', 'dense' or 'none', got {head_type!r}")
        if with_fpn and head_type != "dense":
            raise ValueError(f"with_fpn needs head_type='dense', got {head_type!r}")
        if merge_stages and head_type != "dense":
            raise ValueError(f"merge_stages needs head_type='dense', got {head_type!r}")
        if head_type == "none" and num_classes:
            raise ValueError(f"head_type='none' has no classifier; build it with num_classes=0, not {num_classes}")
        if window_padding not in ("before_qkv", "after_qkv"):
            raise ValueError(f"window_padding must be 'before_qkv' or 'after_qkv', got {window_padding!r}")
        sizes = self._resolve_sizes(branches, img_size, branch_sizes)
        segment_counts = {len(b.segments) for b in branches}
        if len(segment_counts) != 1:
            counts = ", ".join(f"branch {k}: {len(b.segments)}" for k, b in enumerate(branches))
            raise ValueError(f"every branch needs the same number of block segments ({counts})")
        num_stages = segment_counts.pop()
        if merge_stages and (list(merge_stages) != sorted(set(merge_stages)) or not 0 <= merge_stages[0]
                             or merge_stages[-1] >= num_stages - 1):
            raise ValueError(
                f"merge_stages must be increasing interaction stages before the last ({num_stages - 1}), got "
                f"{merge_stages}"
            )
        if class_token and any(b.window_size for b in branches):
            raise ValueError("windowed attention works on the patch grid alone; build the model with class_token=False")

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.head_type = head_type
        self.branch_sizes = sizes
        self.window_padding = window_padding
        self.grad_checkpointing = False
        built = [
            build_branch(k, cfg, size, num_classes, in_chans, class_token, head_type == "separate", window_padding, dd)
            for k, (cfg, size) in enumerate(zip(branches, sizes))
        ]
        self.branches = nn.ModuleList(model for model, _ in built)
        # Plain tuple, not a module: the adapters add no state-dict level (keys stay branches.{k}.<timm names>).
        self._adapters = tuple(adapter for _, adapter in built)
        for k, (cfg, adapter) in enumerate(zip(branches, self._adapters)):
            self._check_segments(k, cfg.segments, adapter.depth)
        # The build configuration, read by piip_models.counting (paper-convention twin) and the CLI's ``info``.
        self.branch_cfgs = branches
        self.interaction_cfg = interaction
        self.segments = tuple(cfg.segments for cfg in branches)
        self.windows = tuple(adapter.windows for adapter in self._adapters)
        self.embed_dims = tuple(adapter.embed_dim for adapter in self._adapters)
        # Width and stride of every branch at the end of every stage (ConvNeXt branches change both).
        self.stage_dims = tuple(
            tuple(a.widths[segs[i][1]] for a, segs in zip(self._adapters, self.segments)) for i in range(num_stages)
        )
        self.stage_strides = tuple(
            tuple(a.strides[segs[i][1]] for a, segs in zip(self._adapters, self.segments)) for i in range(num_stages)
        )
        self.min_input_sizes = tuple(adapter.min_input for adapter in self._adapters)
        self._check_widths(branches, merge_stages)

        injector_kwargs = dict(
            num_heads=interaction.num_heads,
            n_points=interaction.n_points,
            deform_ratio=interaction.deform_ratio,
            with_cffn=interaction.with_cffn,
            cffn_ratio=interaction.cffn_ratio,
            drop_path=interaction.drop_path_rate,
            with_norm=interaction.with_norm,
        )
        self.interactions = nn.ModuleList(
            InteractionBlock(dims, with_proj=interaction.with_proj, **injector_kwargs, **dd) for dims in self.stage_dims
        )
        self.interactions.apply(init_piip_weights)

        self.head_drop = nn.Dropout(drop_rate)
        merge_dim = self.embed_dims[0]
        self.merges = self.branch_weights = self.fpn = self.stage_merges = self.stage_branch_weights = None
        if head_type in ("separate", "none"):
            self.num_features = self.head_hidden_size = sum(self.embed_dims)
        else:
            if len(branches) > 1:
                self.merges = nn.ModuleList(
                    classification_merge(dim, merge_dim, k > 0, dd) if head_type == "merged" else
                    regular_dense_merge(dim, merge_dim, k > 0, dd) if merge_stages else
                    dense_merge(dim, merge_dim, dd)
                    for k, dim in enumerate(self.embed_dims)
                )
                self.branch_weights = nn.Parameter(torch.ones(len(branches), **dd))
                self.merges.apply(init_piip_weights)
                if merge_stages:
                    self.stage_merges = nn.ModuleDict({
                        str(s): nn.ModuleList(
                            regular_dense_merge(dim, self.stage_dims[s][0], k > 0, dd)
                            for k, dim in enumerate(self.stage_dims[s])
                        )
                        for s in merge_stages
                    })
                    self.stage_branch_weights = nn.ParameterDict(
                        {str(s): nn.Parameter(torch.ones(len(branches), **dd)) for s in merge_stages}
                    )
                    self.stage_merges.apply(init_piip_weights)
            self.head_norm = nn.LayerNorm(merge_dim, eps=1e-6, **dd) if head_type == "merged" else nn.Identity()
            self.head = nn.Linear(merge_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
            self.head.apply(init_piip_weights)
            self.num_features = self.head_hidden_size = merge_dim
        self._check_pool(global_pool)
        self.global_pool = global_pool

        # Pyramid levels of the regular-FPN configs: one per merge stage, plus the final map.
        self.tap_stages = merge_stages + (num_stages - 1,) if merge_stages else ()
        if self.tap_stages:
            tap_dims = [self.stage_dims[s][0] for s in self.tap_stages]
            tap_strides = [self.stage_strides[s][-1] for s in self.tap_stages]
            if with_fpn:
                _check_levels(fpn_levels)
                if len(fpn_levels) != len(self.tap_stages):
                    raise ValueError(
                        f"a regular pyramid has one level per merge stage and one for the final map "
                        f"({len(self.tap_stages)}), got fpn_levels {tuple(fpn_levels)}"
                    )
                self.fpn = nn.ModuleDict({
                    f"p{level + 2}": pyramid_level(stride / (4 * 2**level), dim, dd)
                    for level, dim, stride in zip(fpn_levels, tap_dims, tap_strides)
                })
                self.feature_info = [
                    dict(num_chs=dim, reduction=4 * 2**level, module=f"fpn.p{level + 2}")
                    for level, dim in zip(fpn_levels, tap_dims)
                ]
            else:
                self.feature_info = [
                    dict(num_chs=dim, reduction=stride, module=f"interactions.{s}")
                    for s, dim, stride in zip(self.tap_stages, tap_dims, tap_strides)
                ]
        elif with_fpn:
            patch = self.stage_strides[-1][-1]
            self.fpn = simple_feature_pyramid(merge_dim, fpn_levels, dd, fpn_norm)
            self.feature_info = [
                dict(num_chs=merge_dim, reduction=int(patch * 2.0 ** (level - 2)), module=f"fpn.p{level + 2}")
                for level in fpn_levels
            ]
        else:
            concat = head_type in ("separate", "none")
            self.feature_info = [
                dict(num_chs=sum(dims) if concat else merge_dim, reduction=strides[-1], module=f"interactions.{i}")
                for i, (dims, strides) in enumerate(zip(self.stage_dims, self.stage_strides))
            ]
        if self.fpn is not None:
            self.fpn.apply(init_piip_weights)

    @staticmethod
    def _resolve_sizes(
        branches: Sequence[BranchCfg],
        img_size: int | tuple[int, int] | None,
        branch_sizes: Sequence[int] | None,
    ) -> tuple[int, ...]:
        if branch_sizes is not None:
            sizes = tuple(int(s) for s in branch_sizes)
            if len(sizes) != len(branches):
                raise ValueError(f"branch_sizes has {len(sizes)} entries for {len(branches)} branches")
        else:
            sizes = tuple(b.img_size for b in branches)
            if img_size is not None:
                img_size = img_size if isinstance(img_size, int) else max(img_size)
                sizes = tuple(max(1, round(s * img_size / sizes[-1])) for s in sizes)
        if any(a > b for a, b in zip(sizes, sizes[1:])):
            raise ValueError(
                f"branch order is not inverted: sizes {sizes} must not shrink from branch 0 (largest model, smallest "
                "image) to the last branch"
            )
        return sizes

    @staticmethod
    def _check_segments(index: int, segments: Sequence[tuple[int, int]], depth: int) -> None:
        expected_start = 0
        for start, end in segments:
            if start != expected_start or end < start:
                raise ValueError(
                    f"branch {index}: segments {list(segments)} must be contiguous, non-empty and start at block 0"
                )
            expected_start = end + 1
        if expected_start != depth:
            raise ValueError(f"branch {index}: segments {list(segments)} cover {expected_start} of {depth} blocks")

    def _check_widths(self, branches: Sequence[BranchCfg], merge_stages: tuple[int, ...]) -> None:
        kinds = [type(adapter) for adapter in self._adapters]
        # Widths only rank models of one kind: a ConvNeXt-T is wider than a (larger-image) ViT-S.
        if any(ka == kb and a < b for ka, kb, a, b in zip(kinds, kinds[1:], self.embed_dims, self.embed_dims[1:])):
            raise ValueError(
                f"branch order is not inverted: widths {self.embed_dims} must not grow from branch 0 (largest model, "
                "smallest image) to the last branch (compared between branches of the same kind)"
            )
        widening = [k for k, adapter in enumerate(self._adapters) if len(set(adapter.widths)) > 1]
        if widening and (self.head_type == "merged" or (self.head_type == "dense" and not merge_stages)):
            k = widening[0]
            raise ValueError(
                f"branch {k} ({branches[k].model_name}) changes width between stages, which one set of merges cannot "
                "take; use head_type='dense' with merge_stages (the regular-FPN configs) or head_type='none'"
            )

    def _check_pool(self, global_pool: str) -> None:
        allowed = ("first_patch", "avg", "") if self.head_type == "separate" else ("avg", "")
        if global_pool not in allowed:
            raise ValueError(f"global_pool for a {self.head_type} head must be one of {allowed}, got {global_pool!r}")

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D (B, C, H, W) image tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        height, width = x.shape[-2:]
        for k, size in enumerate(self.branch_sizes):
            scale = size / self.branch_sizes[-1]
            branch_h, branch_w = math.floor(height * scale), math.floor(width * scale)
            min_h, min_w = self.min_input_sizes[k]
            if branch_h < min_h or branch_w < min_w:
                min_side = math.ceil(max(min_h, min_w) / scale)
                raise ValueError(
                    f"input {height}x{width} is too small: branch {k} sees {branch_h}x{branch_w} px, less than the "
                    f"{min_h}x{min_w} px it needs for one token; use inputs of at least {min_side}x{min_side}"
                )

    def _branch_images(self, x: torch.Tensor) -> list[torch.Tensor]:
        last = self.branch_sizes[-1]
        # scale_factor (not an output size) drives the sampling grid, as in the reference implementation.
        return [
            x if size == last else F.interpolate(x, scale_factor=size / last, mode="bilinear", align_corners=False)
            for size in self.branch_sizes
        ]

    @staticmethod
    def _geometry(grid: tuple[int, int], device: torch.device) -> BranchGeometry:
        return BranchGeometry(grid[0], grid[1], reference_points(grid[0], grid[1], device=device))

    def _forward_stages(
        self,
        x: torch.Tensor,
        take_indices: Sequence[int] = (),
        last_stage: int | None = None,
        norm: bool = False,
    ) -> tuple[list[torch.Tensor], list[BranchGeometry], list[torch.Tensor]]:
        self._check_input(x)
        tokens, prefixes, geoms = [], [], []
        for adapter, branch, image in zip(self._adapters, self.branches, self._branch_images(x)):
            branch_tokens, prefix, grid = adapter.embed(branch, image)
            tokens.append(branch_tokens)
            prefixes.append(prefix)
            geoms.append(self._geometry(grid, branch_tokens.device))
        last_stage = len(self.interactions) - 1 if last_stage is None else last_stage
        checkpointing = self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled()
        intermediates = []
        for stage, interaction in enumerate(self.interactions[:last_stage + 1]):
            for k, (adapter, branch) in enumerate(zip(self._adapters, self.branches)):
                grid = (geoms[k].height, geoms[k].width)
                tokens[k], prefixes[k], new_grid = adapter.run(
                    branch, self.segments[k][stage], tokens[k], prefixes[k], grid, checkpointing
                )
                if new_grid != grid:
                    geoms[k] = self._geometry(new_grid, tokens[k].device)
            if checkpointing:
                tokens = torch.utils.checkpoint.checkpoint(interaction, tokens, geoms, use_reentrant=False)
            else:
                tokens = interaction(tokens, geoms)
            if stage in take_indices:
                intermediates.append(self._stage_map(stage, tokens, geoms, norm))
        return tokens, geoms, intermediates

    def _stage_map(
        self, stage: int, tokens: Sequence[torch.Tensor], geoms: Sequence[BranchGeometry], norm: bool
    ) -> torch.Tensor:
        if self.stage_merges is not None and str(stage) in self.stage_merges:
            key = str(stage)
            return self._fuse(tokens, geoms, self.stage_merges[key], self.stage_branch_weights[key], norm=False)
        return self.fuse(tokens, geoms, norm=norm)

    def forward_branches(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[BranchGeometry]]:
        """Runs the pyramid through every block segment and interaction.

        Args:
            x: ``(B, C, H, W)`` image at the last branch's resolution (any size the smallest branch can embed).

        Returns:
            The patch tokens ``(B, H_k * W_k, D_k)`` of each branch and each branch's token grid.
        """
        tokens, geoms, _ = self._forward_stages(x)
        return tokens, geoms

    def fuse(self, tokens: Sequence[torch.Tensor], geoms: Sequence[BranchGeometry], norm: bool = True) -> torch.Tensor:
        """Fuses branch tokens into one NCHW map on the last branch's grid.

        Separate heads concatenate each branch's (final-normed when ``norm``) tokens, upsampled to that grid, and
        ``'none'`` heads the raw tokens; the merged and dense heads apply the branch merges and the learnable branch
        weights.
        """
        return self._fuse(tokens, geoms, self.merges, self.branch_weights, norm)

    def _fuse(
        self,
        tokens: Sequence[torch.Tensor],
        geoms: Sequence[BranchGeometry],
        merges: nn.ModuleList | None,
        weights: torch.Tensor | None,
        norm: bool,
    ) -> torch.Tensor:
        target = (geoms[-1].height, geoms[-1].width)
        maps = []
        for k, (t, geom) in enumerate(zip(tokens, geoms)):
            if self.head_type == "separate" and norm:
                t = self.branches[k].norm(t)
            feature_map = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], geom.height, geom.width)
            if merges is not None:
                feature_map = merges[k](feature_map)
            if (geom.height, geom.width) != target:
                # Upsampled in fp32 as the reference does; a smaller grid's top-left cell maps exactly onto the target.
                feature_map = F.interpolate(
                    feature_map.float(), size=target, mode="bilinear", align_corners=False
                ).to(feature_map.dtype)
            maps.append(feature_map)
        if self.head_type in ("separate", "none"):
            return torch.cat(maps, dim=1)
        if weights is None:
            return maps[0]
        return sum(w * m for w, m in zip(weights.unbind(0), maps))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image to the ``(B, num_features, H, W)`` feature map on the last branch's token grid."""
        return self.fuse(*self.forward_branches(x))

    def forward_pyramid(self, features: torch.Tensor, levels: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The dense head's simple feature pyramid (``p2`` .. ``p5``) of a :meth:`forward_features` map."""
        if self.fpn is None:
            raise RuntimeError("this model has no feature pyramid; build a dense model with with_fpn=True")
        if self.tap_stages:
            raise RuntimeError("a regular pyramid needs the maps of several stages; use forward_intermediates")
        names = list(self.fpn.keys()) if levels is None else [list(self.fpn.keys())[i] for i in levels]
        return [self.fpn[name](features) for name in names]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Feature taps: fused maps after interaction stages, or the dense head's pyramid levels.

        Args:
            x: Input image.
            indices: Last ``n`` taps (int), the listed taps, or all (None).
            norm: Apply the branches' final norms to stage taps (separate heads).
            stop_early: Stop after the last selected stage (stage taps).
            output_fmt: Only ``'NCHW'``.
            intermediates_only: Return the taps alone.

        Returns:
            The taps, or ``(forward_features output, taps)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if self.fpn is not None and not self.tap_stages:
            features = self.forward_features(x)
            intermediates = self.forward_pyramid(features, take_indices)
            return intermediates if intermediates_only else (features, intermediates)
        stages = [self.tap_stages[i] for i in take_indices] if self.tap_stages else take_indices
        last_stage = max(stages) if stop_early or intermediates_only else None
        tokens, geoms, intermediates = self._forward_stages(x, stages, last_stage, norm)
        if self.tap_stages and self.fpn is not None:
            names = list(self.fpn.keys())
            intermediates = [self.fpn[names[i]](m) for i, m in zip(sorted(take_indices), intermediates)]
        if intermediates_only:
            return intermediates
        return self.fuse(tokens, geoms), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drops what the selected taps do not need: unselected simple-pyramid levels, or the stages after the last
        selected tap (and, for regular pyramids, the unselected levels' merges; the last kept one becomes final)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        keep = sorted(take_indices)
        if self.fpn is not None and not self.tap_stages:
            self._keep_taps(keep)
            return self._prune_head(list(range(len(keep))), prune_head)
        last_stage = max_index
        if self.tap_stages:
            kept = [self.tap_stages[i] for i in keep]
            last_stage = kept[-1]
            if self.stage_merges is not None:
                if last_stage != self.tap_stages[-1]:
                    self.merges = self.stage_merges[str(last_stage)]
                    self.branch_weights = self.stage_branch_weights[str(last_stage)]
                for key in list(self.stage_merges):
                    if int(key) not in kept[:-1]:
                        del self.stage_merges[key], self.stage_branch_weights[key]
            self._keep_taps(keep)
            self.tap_stages = tuple(kept)
            self.num_features = self.head_hidden_size = self.stage_dims[last_stage][0]
            take_indices = list(range(len(keep)))
        self.interactions = self.interactions[:last_stage + 1]
        self.segments = tuple(segs[:last_stage + 1] for segs in self.segments)
        for adapter, branch, segs in zip(self._adapters, self.branches, self.segments):
            adapter.prune(branch, segs[-1][1] + 1, prune_norm)
        return self._prune_head(take_indices, prune_head)

    def _keep_taps(self, keep: list[int]) -> None:
        """Keeps only the feature taps ``keep`` (indices into ``feature_info``) and their pyramid levels."""
        if self.fpn is not None:
            names = list(self.fpn.keys())
            self.fpn = nn.ModuleDict({names[i]: self.fpn[names[i]] for i in keep})
        self.feature_info = [self.feature_info[i] for i in keep]

    def _prune_head(self, take_indices: list[int], prune_head: bool) -> list[int]:
        if prune_head:
            if self.head_type in ("merged", "dense"):
                self.head_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pools the feature map and applies the classifier(s).

        Args:
            x: Output of :meth:`forward_features`.
            pre_logits: Return the pooled features instead of logits.
        """
        if self.head_type in ("merged", "dense"):
            x = self.head_norm(x.permute(0, 2, 3, 1))
            if self.global_pool == "avg":
                x = x.mean(dim=(1, 2))
            x = self.head_drop(x)
            if not pre_logits:
                x = self.head(x)
            return x if self.global_pool else x.permute(0, 3, 1, 2)

        if self.global_pool == "first_patch":
            x = x[:, :, 0, 0]
        elif self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        if pre_logits or self.num_classes == 0:
            return x
        channels_last = x.movedim(1, -1)
        parts = channels_last.split(list(self.embed_dims), dim=-1)
        logits = torch.stack([branch.head(p) for branch, p in zip(self.branches, parts)]).mean(0)
        return logits.movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module | tuple[nn.Module, ...]:
        if self.head_type in ("merged", "dense"):
            return self.head
        return tuple(branch.head for branch in self.branches) if self.head_type == "separate" else ()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the classifier(s).

        Args:
            num_classes: New number of classes (0 removes the classifier).
            global_pool: New pooling; the current one when None.
        """
        if self.head_type == "none" and num_classes:
            raise ValueError("head_type='none' has no classifier to reset; only num_classes=0 applies")
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        param = next(self.parameters())
        dd = {"device": param.device, "dtype": param.dtype}

        def new_head(dim: int) -> nn.Module:
            return nn.Linear(dim, num_classes, **dd).train(self.training) if num_classes > 0 else nn.Identity()

        if self.head_type in ("merged", "dense"):
            self.head = new_head(self.num_features)
        elif self.head_type == "separate":
            for branch in self.branches:
                branch.head = new_head(branch.embed_dim)
                branch.num_classes = num_classes

    def set_windows(self, windows: Sequence[Sequence[int]]) -> None:
        """Sets every branch's per-unit attention window (0: global), e.g. to run a windowed model globally.

        Args:
            windows: One sequence per branch with one window per unit (ViT block), as :attr:`windows` holds them.
        """
        windows = tuple(tuple(int(w) for w in branch) for branch in windows)
        if [len(w) for w in windows] != [len(w) for w in self.windows]:
            raise ValueError(
                f"windows need {[len(w) for w in self.windows]} entries per branch, got {[len(w) for w in windows]}"
            )
        for adapter, branch_windows in zip(self._adapters, windows):
            adapter.windows = branch_windows
        self.windows = windows

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each branch segment and interaction in the backward pass to save activation memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {"branches.*.pos_embed", "branches.*.cls_token", "branches.*.reg_token"}
        if any(name.endswith("relative_position_bias_table") for name, _ in self.named_parameters()):
            names.add("branches.*.relative_position_bias_table")
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Groups parameters by pyramid stage: embeddings, then one group per interaction, then merge and heads."""
        stage_of_unit = [
            {unit: stage for stage, (start, end) in enumerate(segs) for unit in range(start, end + 1)}
            for segs in self.segments
        ]
        num_stages = len(self.interactions)

        def stage(name: str) -> int:
            parts = name.split(".")
            if parts[0] == "branches":
                unit = self._adapters[int(parts[1])].unit_of(parts[2:])
                if unit is not None:
                    return 0 if unit < 0 else stage_of_unit[int(parts[1])][unit] + 1
            elif parts[0] == "interactions":
                return int(parts[1]) + 1
            return num_stages + 1

        return stage

    @torch.jit.ignore
    def load_branch_weights(self, cache_dir: str | None = None) -> None:
        """Loads each branch's timm pretrained weights (from its ``model_name`` tag) through timm's Hub path.

        Position embeddings are resampled to the branch grid; interactions and merges keep their current values
        (zero-initialised gates make a fresh pyramid equal to the independent branches).
        """
        for adapter, branch in zip(self._adapters, self.branches):
            load_pretrained(
                branch,
                pretrained_cfg=branch.pretrained_cfg,
                num_classes=branch.num_classes,
                in_chans=self.in_chans,
                filter_fn=adapter.filter_fn,
                cache_dir=cache_dir,
            )

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str, strict: bool = True) -> None:
        """Loads an official OpenGVLab/PIIP or piip-models checkpoint file (safetensors, or a weights-only pickle).

        Official layouts are converted and detector heads dropped; a checkpoint that does not fit raises before any
        parameter changes. timm calls this for tags with a released checkpoint (``custom_load``).
        """
        load_checkpoint(self, checkpoint_path, strict=strict)


def _create_piip(variant: str, pretrained: bool = False, model_cls: type[PIIP] | None = None, **kwargs) -> PIIP:
    pretrained_cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.pop("pretrained_cfg", None),
        pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None),
    )
    cache_dir = kwargs.pop("cache_dir", None)
    # Without a full PIIP checkpoint, pretrained=True means "pretrained branches, fresh interactions".
    load_branches = pretrained and not pretrained_cfg.has_weights
    if pretrained and not load_branches:
        pretrained_cfg = prepare_pretrained_cfg(pretrained_cfg, cache_dir)
    if kwargs.get("head_type") == "dense" and kwargs.get("features_only"):
        kwargs.setdefault("with_fpn", True)
    if kwargs.get("with_fpn"):
        out_indices = tuple(range(len(kwargs.get("fpn_levels", (0, 1, 2, 3)))))  # every pyramid level
    elif kwargs.get("merge_stages"):
        out_indices = tuple(range(len(kwargs["merge_stages"]) + 1))  # every regular-pyramid map
    else:
        # Four evenly spaced interaction stages, the last one included, as ViT-Adapter-style pyramids tap them.
        num_stages = len(kwargs["branches"][0].segments)
        out_indices = tuple(sorted({max(0, round(num_stages * (i + 1) / 4) - 1) for i in range(4)}))
    model = build_model_with_cfg(
        model_cls or PIIP,
        variant,
        pretrained and not load_branches,
        pretrained_cfg=pretrained_cfg,
        pretrained_filter_fn=partial(checkpoint_filter_fn, strict=kwargs.get("pretrained_strict", True)),
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        cache_dir=cache_dir,
        **kwargs,
    )
    if load_branches:
        # features_only wraps the pyramid (timm's FeatureGetterNet keeps it as .model)
        (model.model if kwargs.get("features_only") else model).load_branch_weights(cache_dir=cache_dir)
    return model


def _cfg(
    input_size: int, num_branches: int, head_type: str = "separate", file: str | None = None, **kwargs
) -> dict[str, Any]:
    """A pretrained cfg; ``file`` is the tag's released checkpoint in ``OpenGVLab/PIIP`` (without one,
    ``pretrained=True`` loads the timm branches)."""
    classifier = "head" if head_type != "separate" else tuple(f"branches.{k}.head" for k in range(num_branches))
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


_BRANCH_INIT_NOTE = "timm-pretrained branches with zero-initialised interactions (pretrained=True loads the branches)"
_OFFICIAL_NOTE = "official OpenGVLab/PIIP checkpoint, converted to piip-models names on load"

# Detection configs normalise to [-1, 1] (mean = std = 127.5); the DINO config uses ImageNet statistics.
_DET_NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_DINO_NORM = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def _dense_cfg(input_size: int, num_branches: int, file: str | None = None, **kwargs) -> dict[str, Any]:
    return _cfg(input_size, num_branches, "dense", file, num_classes=0, **{**_DET_NORM, **kwargs})


# The first tag of a model is its default: the released checkpoint where one exists, then `branches`.
default_cfgs = generate_default_cfgs({
    "piip_tsb.in1k": _cfg(368, 3, file="classification/piip_3branch_tsb_368-192-128_cls_token_deit1.pth"),
    "piip_tsb.branches": _cfg(368, 3),
    "piip_sbl.in1k": _cfg(384, 3, file="classification/piip_3branch_sbl_384-192-128_cls_token_augreg.pth"),
    "piip_sbl.branches": _cfg(384, 3),
    "piip_sbl_320_160_96.in1k": _cfg(
        320, 3, file="classification/piip_3branch_sbl_320-160-96_cls_token_augreg.pth"),
    "piip_sbl_320_160_96.branches": _cfg(320, 3),
    "piip_tsbl.branches": _cfg(384, 4),
    "piip_tsb_1120_896_448.coco_mask_rcnn": _dense_cfg(
        1120, 3, file="detection/mask_rcnn_deit_tsb_1120_896_448_fpn_1x_coco_bs16.pth"),
    "piip_tsb_1120_896_448.branches": _dense_cfg(1120, 3),
    "piip_tsb_1568_896_448.coco_mask_rcnn": _dense_cfg(
        1568, 3, file="detection/mask_rcnn_deit_tsb_1568_896_448_fpn_1x_coco_bs16.pth"),
    "piip_tsb_1568_896_448.branches": _dense_cfg(1568, 3),
    "piip_tsb_1568_1120_672.coco_mask_rcnn": _dense_cfg(
        1568, 3, file="detection/mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16.pth"),
    "piip_tsb_1568_1120_672.branches": _dense_cfg(1568, 3),
    "piip_sbl_1120_672_448.coco_mask_rcnn": _dense_cfg(
        1120, 3, file="detection/mask_rcnn_deit_sbl_1120_672_448_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1120_672_448.branches": _dense_cfg(1120, 3),
    "piip_sbl_1344_896_448.coco_mask_rcnn": _dense_cfg(
        1344, 3, file="detection/mask_rcnn_deit_sbl_1344_896_448_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1344_896_448.branches": _dense_cfg(1344, 3),
    "piip_sbl_1568_896_672.coco_mask_rcnn": _dense_cfg(
        1568, 3, file="detection/mask_rcnn_deit_sbl_1568_896_672_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1568_896_672.branches": _dense_cfg(1568, 3),
    "piip_sbl_1568_1120_672.coco_mask_rcnn": _dense_cfg(
        1568, 3, file="detection/mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1568_1120_672.branches": _dense_cfg(1568, 3),
    "piip_tsbl_1344_896_672_448.coco_mask_rcnn": _dense_cfg(
        1344, 4, file="detection/mask_rcnn_deit_tsbl_1344_896_672_448_fpn_1x_coco_bs16.pth"),
    "piip_tsbl_1344_896_672_448.branches": _dense_cfg(1344, 4),
    "piip_tsbl_1568_1120_672_448.coco_mask_rcnn": _dense_cfg(
        1568, 4, file="detection/mask_rcnn_deit_tsbl_1568_1120_672_448_fpn_1x_coco_bs16.pth"),
    "piip_tsbl_1568_1120_672_448.branches": _dense_cfg(1568, 4),
    "piip_tsbl_1792_1568_1120_448.coco_mask_rcnn": _dense_cfg(
        1792, 4, file="detection/mask_rcnn_deit_tsbl_1792_1568_1120_448_fpn_1x_coco_bs16.pth"),
    "piip_tsbl_1792_1568_1120_448.branches": _dense_cfg(1792, 4),
    "piip_sbl_1792_1120_672_dino.coco_dino": _dense_cfg(
        1792, 3, file="detection/dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms.pth", **_DINO_NORM),
    "piip_sbl_1792_1120_672_dino.branches": _dense_cfg(1792, 3, **_DINO_NORM),
    "piip_sbl_1568_1120_672_augreg.coco_mask_rcnn": _dense_cfg(
        1568, 3, file="detection/mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1568_1120_672_augreg.branches": _dense_cfg(1568, 3),
    "piip_sbl_1568_1120_672_augreg_speedup.coco_mask_rcnn": _dense_cfg(
        1568, 3, file="detection/mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16_speedup.pth"),
    "piip_sbl_1568_1120_672_augreg_speedup.branches": _dense_cfg(1568, 3),
    "piip_sbl_1568_1120_672_mae.coco_mask_rcnn": _dense_cfg(
        1568, 3, file="detection/mask_rcnn_mae_sbl_1568_1120_672_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1568_1120_672_mae.branches": _dense_cfg(1568, 3),
    "piip_sbl_1568_1120_672_dinov2.coco_mask_rcnn": _dense_cfg(
        1568, 3, file="detection/mask_rcnn_dinov2_sbl_1568_1120_672_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1568_1120_672_dinov2.branches": _dense_cfg(1568, 3),
    "piip_sbl_1568_1120_672_beitv2.coco_mask_rcnn": _dense_cfg(
        1568, 3, file="detection/mask_rcnn_beit_sbl_1568_1120_672_fpn_1x_coco_bs16.pth"),
    "piip_sbl_1568_1120_672_beitv2.branches": _dense_cfg(1568, 3),
    "piip_baseline_vit_b_1024.coco_mask_rcnn": _dense_cfg(
        1024, 1, file="detection/mask_rcnn_deit_vit_b_fpn_1x_coco_bs16.pth"),
    "piip_baseline_vit_b_1024.branches": _dense_cfg(1024, 1),
    "piip_baseline_vit_l_1024.coco_mask_rcnn": _dense_cfg(
        1024, 1, file="detection/mask_rcnn_deit_vit_l_fpn_1x_coco_bs16.pth"),
    "piip_baseline_vit_l_1024.branches": _dense_cfg(1024, 1),
})


def _deit1(size: str, img_size: int, drop_path_rate: float) -> BranchCfg:
    """DeiT v1 branch with LayerScale gammas (initialised to 1) and no class slot in the position embedding."""
    return BranchCfg(
        f"deit_{size}_patch16_224.fb_in1k",
        img_size,
        even_segments(12, 12),
        drop_path_rate,
        model_args=dict(init_values=1.0, no_embed_class=True),
    )


def _augreg(size: str, img_size: int, depth: int, drop_path_rate: float) -> BranchCfg:
    """AugReg ViT branch; its position embedding keeps the (unused) class slot, as in the official models."""
    return BranchCfg(f"vit_{size}_patch16_224.augreg_in21k_ft_in1k", img_size, even_segments(depth, 12), drop_path_rate)


def _deit3(size: str, img_size: int, depth: int, drop_path_rate: float) -> BranchCfg:
    return BranchCfg(f"deit3_{size}_patch16_224.fb_in22k_ft_in1k", img_size, even_segments(depth, 12), drop_path_rate)


_OFFICIAL_CLS = dict(head_type="separate", global_pool="first_patch", class_token=True)
_DENSE = dict(head_type="dense", class_token=False, num_classes=0, global_pool="avg")
_DEIT3_DEPTHS = {"small": 12, "base": 12, "large": 24}


def _deit3_det(
    size: str, img_size: int, drop_path_rate: float, window: int, pretrain: int = 224, global_every: int = 0
) -> BranchCfg:
    """DeiT III (ImageNet-21k) detection branch: windowed attention, position embedding at the pretraining grid."""
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


def _deit1_det(img_size: int, window: int) -> BranchCfg:
    return replace(_deit1("tiny", img_size, 0.05), pos_embed_size=224, window_size=window)


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
    depth = _DEIT3_DEPTHS[size]
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
    return (_deit3_det("base", sizes[0], 0.15, 14), _deit3_det("small", sizes[1], 0.05, 14), _deit1_det(sizes[2], 14))


def _sbl_det(sizes: tuple[int, int, int]) -> tuple[BranchCfg, ...]:
    large, base, small = sizes
    return (
        _deit3_det("large", large, 0.4, 28), _deit3_det("base", base, 0.15, 28), _deit3_det("small", small, 0.05, 28)
    )


def _tsbl_det(sizes: tuple[int, int, int, int]) -> tuple[BranchCfg, ...]:
    return _sbl_det(sizes[:3]) + (_deit1_det(sizes[3], 28),)


def _dense(variant: str, branches: tuple[BranchCfg, ...], pretrained: bool, kwargs: dict[str, Any], **extra) -> PIIP:
    return _create_piip(variant, pretrained, **dict(dict(branches=branches, **_DENSE, **extra), **kwargs))


def _sbl(sizes: tuple[int, int, int]) -> tuple[BranchCfg, ...]:
    large, base, small = sizes
    return (_augreg("large", large, 24, 0.4), _augreg("base", base, 12, 0.2), _augreg("small", small, 12, 0.05))


@register_model
def piip_tsb(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSB 368/192/128: DeiT-T@368, DeiT-S@192, DeiT-B@128 (arXiv:2406.04330, ImageNet-1k 82.1 top-1)."""
    branches = (_deit1("base", 128, 0.2), _deit1("small", 192, 0.05), _deit1("tiny", 368, 0.05))
    return _create_piip("piip_tsb", pretrained, **dict(dict(branches=branches, **_OFFICIAL_CLS), **kwargs))


@register_model
def piip_sbl(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 384/192/128: AugReg ViT-S@384, ViT-B@192, ViT-L@128 (arXiv:2406.04330, 85.9 top-1)."""
    return _create_piip("piip_sbl", pretrained, **dict(dict(branches=_sbl((128, 192, 384)), **_OFFICIAL_CLS), **kwargs))


@register_model
def piip_sbl_320_160_96(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 320/160/96: AugReg ViT-S@320, ViT-B@160, ViT-L@96 (arXiv:2406.04330, 85.2 top-1)."""
    model_args = dict(branches=_sbl((96, 160, 320)), **_OFFICIAL_CLS)
    return _create_piip("piip_sbl_320_160_96", pretrained, **dict(model_args, **kwargs))


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
        _deit1("tiny", 384, 0.05),
    )
    return _create_piip("piip_tsbl", pretrained, **dict(dict(branches=branches, **_OFFICIAL_CLS), **kwargs))


@register_model
def piip_tsb_1120_896_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSB 1120/896/448 detection backbone: DeiT-T@1120, DeiT III-S@896, DeiT III-B@448, window 14."""
    return _dense("piip_tsb_1120_896_448", _tsb_det((448, 896, 1120)), pretrained, kwargs)


@register_model
def piip_tsb_1568_896_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSB 1568/896/448 detection backbone: DeiT-T@1568, DeiT III-S@896, DeiT III-B@448, window 14."""
    return _dense("piip_tsb_1568_896_448", _tsb_det((448, 896, 1568)), pretrained, kwargs)


@register_model
def piip_tsb_1568_1120_672(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSB 1568/1120/672 detection backbone: DeiT-T@1568, DeiT III-S@1120, DeiT III-B@672, window 14."""
    return _dense("piip_tsb_1568_1120_672", _tsb_det((672, 1120, 1568)), pretrained, kwargs)


@register_model
def piip_sbl_1120_672_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1120/672/448 detection backbone: DeiT III-S@1120, -B@672, -L@448, window 28."""
    return _dense("piip_sbl_1120_672_448", _sbl_det((448, 672, 1120)), pretrained, kwargs)


@register_model
def piip_sbl_1344_896_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1344/896/448 detection backbone: DeiT III-S@1344, -B@896, -L@448, window 28."""
    return _dense("piip_sbl_1344_896_448", _sbl_det((448, 896, 1344)), pretrained, kwargs)


@register_model
def piip_sbl_1568_896_672(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/896/672 detection backbone: DeiT III-S@1568, -B@896, -L@672, window 28."""
    return _dense("piip_sbl_1568_896_672", _sbl_det((672, 896, 1568)), pretrained, kwargs)


@register_model
def piip_sbl_1568_1120_672(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/1120/672 detection backbone: DeiT III-S@1568, -B@1120, -L@672, window 28."""
    return _dense("piip_sbl_1568_1120_672", _sbl_det((672, 1120, 1568)), pretrained, kwargs)


@register_model
def piip_tsbl_1344_896_672_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSBL 1344/896/672/448 detection backbone: DeiT-T, DeiT III-S/B/L, window 28."""
    return _dense("piip_tsbl_1344_896_672_448", _tsbl_det((448, 672, 896, 1344)), pretrained, kwargs)


@register_model
def piip_tsbl_1568_1120_672_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSBL 1568/1120/672/448 detection backbone: DeiT-T, DeiT III-S/B/L, window 28."""
    return _dense("piip_tsbl_1568_1120_672_448", _tsbl_det((448, 672, 1120, 1568)), pretrained, kwargs)


@register_model
def piip_tsbl_1792_1568_1120_448(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSBL 1792/1568/1120/448 detection backbone: DeiT-T, DeiT III-S/B/L, window 28."""
    return _dense("piip_tsbl_1792_1568_1120_448", _tsbl_det((448, 1120, 1568, 1792)), pretrained, kwargs)


@register_model
def piip_sbl_1792_1120_672_dino(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1792/1120/672 DINO backbone: DeiT III (384) S/B/L, window 24 with global attention every 3rd block."""
    branches = (
        _deit3_det("large", 672, 0.4, 24, pretrain=384, global_every=3),
        _deit3_det("base", 1120, 0.15, 24, pretrain=384, global_every=3),
        _deit3_det("small", 1792, 0.05, 24, pretrain=384, global_every=3),
    )
    return _dense("piip_sbl_1792_1120_672_dino", branches, pretrained, kwargs, fpn_levels=(1, 2, 3))


@register_model
def piip_sbl_1568_1120_672_augreg(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/1120/672 detection backbone from AugReg ViT-S/B/L (384), window 28."""
    branches = (
        _internvit_det("vit_large_patch16_384.augreg_in21k_ft_in1k", 672, 24, 0.4, 384),
        _internvit_det("vit_base_patch16_384.augreg_in21k_ft_in1k", 1120, 12, 0.3, 384),
        _internvit_det("vit_small_patch16_384.augreg_in21k_ft_in1k", 1568, 12, 0.2, 384),
    )
    return _dense("piip_sbl_1568_1120_672_augreg", branches, pretrained, kwargs)


@register_model
def piip_sbl_1568_1120_672_augreg_speedup(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/1120/672 AugReg, faster variant: interactions without projections or norms, tanh-GELU MLPs."""
    branches = (
        _internvit_det("vit_large_patch16_384.augreg_in21k_ft_in1k", 672, 24, 0.4, 384, act_layer="gelu_tanh"),
        _internvit_det("vit_base_patch16_384.augreg_in21k_ft_in1k", 1120, 12, 0.3, 384, act_layer="gelu_tanh"),
        _internvit_det("vit_small_patch16_384.augreg_in21k_ft_in1k", 1568, 12, 0.2, 384, act_layer="gelu_tanh"),
    )
    interaction = InteractionCfg(with_proj=False, with_norm=False)
    return _dense("piip_sbl_1568_1120_672_augreg_speedup", branches, pretrained, kwargs, interaction=interaction)


@register_model
def piip_sbl_1568_1120_672_mae(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/1120/672 detection backbone: DeiT III-S, MAE ViT-B and ViT-L, window 28."""
    branches = (
        _internvit_det("vit_large_patch16_224.mae", 672, 24, 0.4, 224),
        _internvit_det("vit_base_patch16_224.mae", 1120, 12, 0.15, 224),
        _deit3_det("small", 1568, 0.05, 28),
    )
    return _dense("piip_sbl_1568_1120_672_mae", branches, pretrained, kwargs)


@register_model
def piip_sbl_1568_1120_672_dinov2(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/1120/672 detection backbone from DINOv2 S/B/L (patch 14 resampled to 16), window 28."""
    branches = (
        _internvit_det("vit_large_patch14_dinov2.lvd142m", 672, 24, 0.4, 518),
        _internvit_det("vit_base_patch14_dinov2.lvd142m", 1120, 12, 0.3, 518),
        _internvit_det("vit_small_patch14_dinov2.lvd142m", 1568, 12, 0.2, 518),
    )
    return _dense("piip_sbl_1568_1120_672_dinov2", branches, pretrained, kwargs)


@register_model
def piip_sbl_1568_1120_672_beitv2(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL 1568/1120/672 detection backbone: DeiT III-S, BEiT v2 ViT-B and ViT-L, window 28."""
    branches = (_beitv2_det("large", 672, 0.4), _beitv2_det("base", 1120, 0.15), _deit3_det("small", 1568, 0.05, 28))
    return _dense("piip_sbl_1568_1120_672_beitv2", branches, pretrained, kwargs)


@register_model
def piip_baseline_vit_b_1024(pretrained: bool = False, **kwargs) -> PIIP:
    """Single-branch DeiT III-B @1024 baseline: window 14, global attention every 3rd block, simple feature pyramid
    (channels-first LayerNorm in its stride-4 level, as the official ``vit_models``)."""
    branch = _deit3_det("base", 1024, 0.15, 14, global_every=3)
    branch = replace(branch, segments=even_segments(12, 4))
    return _dense("piip_baseline_vit_b_1024", (branch,), pretrained, kwargs, fpn_norm="layer")


@register_model
def piip_baseline_vit_l_1024(pretrained: bool = False, **kwargs) -> PIIP:
    """Single-branch DeiT III-L @1024 baseline: window 14, global attention every 3rd block, simple feature pyramid
    (channels-first LayerNorm in its stride-4 level, as the official ``vit_models``)."""
    branch = _deit3_det("large", 1024, 0.4, 14, global_every=3)
    branch = replace(branch, segments=even_segments(24, 4))
    return _dense("piip_baseline_vit_l_1024", (branch,), pretrained, kwargs, fpn_norm="layer")


def create_pyramid(
    branches: Sequence[tuple[str, int] | BranchCfg],
    num_interactions: int | None = None,
    pretrained: bool = False,
    **kwargs,
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
    depths = []
    for item in branches:
        if isinstance(item, BranchCfg):
            depths.append(max(end for _, end in item.segments) + 1)
        else:
            depths.append(unit_count(item[0]))
    num_interactions = num_interactions or min(depths)
    cfgs = tuple(
        item if isinstance(item, BranchCfg)
        else BranchCfg(item[0], int(item[1]), even_segments(depth, num_interactions))
        for item, depth in zip(branches, depths)
    )
    head_type = kwargs.get("head_type", "separate")
    pretrained_cfg = {**_cfg(cfgs[-1].img_size, len(cfgs), head_type), "architecture": "piip_custom"}
    model = PIIP(branches=cfgs, **kwargs)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg
    if pretrained:
        model.load_branch_weights()
    return model
