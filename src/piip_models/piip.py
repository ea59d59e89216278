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
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models._features import feature_take_indices

from .branches import BranchAdapter, build_branch
from .config import (
    BranchCfg,
    InteractionCfg,
    check_feature_indices,
    check_piip_args,
    check_segments,
)
from .hub import load_checkpoint
from .layers.heads import BranchHeads, FeatureHead, LinearHead
from .layers.interaction import BranchGeometry, InteractionBlock, init_piip_weights
from .layers.merge import classification_merge, dense_merge, merge_maps, regular_dense_merge
from .layers.msdeform_attn import reference_points
from .layers.pyramid import build_feature_taps
from .layers.window_attention import WindowPadding
from .weights import staged_pretrained

__all__ = ["PIIP"]

HeadType = Literal["separate", "merged", "dense", "none"]
# The head module of each head type.
_HEADS: dict[str, type[FeatureHead]] = {
    "separate": BranchHeads, "merged": LinearHead, "dense": LinearHead, "none": FeatureHead
}


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
        head_type: HeadType = "separate",
        class_token: bool = True,
        img_size: int | tuple[int, int] | None = None,
        branch_sizes: Sequence[int] | None = None,
        window_padding: WindowPadding = "before_qkv",
        with_fpn: bool = False,
        fpn_levels: Sequence[int] = (0, 1, 2, 3),
        fpn_norm: Literal["group", "layer"] = "group",
        merge_stages: Sequence[int] = (),
        drop_rate: float = 0.0,
        drop_path_rate: float | None = None,
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
                (or the maps of the merge stages).
            fpn_levels: Pyramid levels, indices of strides ``(4, 8, 16, 32)``; ``(1, 2, 3)`` for DINO.
            fpn_norm: Normalisation inside the stride-4 level: ``'group'`` (GroupNorm(32), the PIIP backbones) or
                ``'layer'`` (channels-first LayerNorm, the official single-ViT baselines).
            merge_stages: Interaction stages whose tokens get merges of their own, the dense maps of the
                official regular-FPN configs (``out_interaction_indexes``): the pyramid is then these maps and the
                final one, each on the last branch's grid at that depth with branch 0's width at that depth, and
                every merge is the lighter (Conv3x3-)GroupNorm-ReLU. Needed by branches whose width changes between
                stages (ConvNeXt).
            drop_rate: Dropout before the classifier.
            drop_path_rate: timm's stochastic depth: each branch's blocks from 0 linearly up to this rate, replacing
                the branch configs' rates (None keeps them); the interactions keep ``interaction.drop_path_rate``.
            device: Parameter device.
            dtype: Parameter dtype.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        branches, merge_stages, self.branch_sizes = check_piip_args(
            branches, interaction, num_classes=num_classes, in_chans=in_chans, global_pool=global_pool,
            head_type=head_type, head_pools={name: head.pools for name, head in _HEADS.items()},
            class_token=class_token, img_size=img_size, branch_sizes=branch_sizes, window_padding=window_padding,
            with_fpn=with_fpn, fpn_levels=fpn_levels, fpn_norm=fpn_norm, merge_stages=merge_stages,
            drop_rate=drop_rate, drop_path_rate=drop_path_rate,
        )

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.head_type = head_type
        self.window_padding = window_padding
        self.grad_checkpointing = False

        def build(branch_dd: dict) -> list[tuple[nn.Module, BranchAdapter]]:
            return [
                build_branch(k, cfg, size, num_classes, in_chans, class_token, head_type == "separate",
                             window_padding, branch_dd)
                for k, (cfg, size) in enumerate(zip(branches, self.branch_sizes))
            ]

        # The branches' structure is checked on meta-device builds, before any weight is allocated.
        built = build({"device": "meta", "dtype": dtype})
        adapters = [adapter for _, adapter in built]
        _check_structure(branches, adapters, self.branch_sizes, interaction)
        self._check_widths(branches, adapters, head_type, merge_stages)
        if device is None or torch.device(device).type != "meta":
            built = build(dd)
        self.branches = nn.ModuleList(model for model, _ in built)
        # Plain tuple, not a module: the adapters add no state-dict level (keys stay branches.{k}.<timm names>).
        self._adapters: tuple[BranchAdapter, ...] = tuple(adapter for _, adapter in built)
        # The build configuration, read by piip_models.counting (paper-convention twin) and the CLI's ``info``.
        self.branch_cfgs = branches
        self.interaction_cfg = interaction
        self.segments = tuple(cfg.segments for cfg in branches)
        self.windows = tuple(adapter.windows for adapter in self._adapters)
        self.embed_dims = tuple(adapter.embed_dim for adapter in self._adapters)
        self.stage_dims, self.stage_strides = _stage_geometry(self._adapters, self.segments)
        self.min_input_sizes = tuple(adapter.min_input for adapter in self._adapters)

        self.interactions = nn.ModuleList(
            InteractionBlock(
                dims,
                num_heads=interaction.num_heads,
                n_points=interaction.n_points,
                deform_ratio=interaction.deform_ratio,
                with_cffn=interaction.with_cffn,
                cffn_ratio=interaction.cffn_ratio,
                drop_path=interaction.drop_path_rate,
                with_norm=interaction.with_norm,
                with_proj=interaction.with_proj,
                **dd,
            )
            for dims in self.stage_dims
        )
        self.interactions.apply(init_piip_weights)

        concatenated = head_type in ("separate", "none")
        merge_dim = self.embed_dims[0]
        self.merges = self.branch_weights = self.stage_merges = self.stage_branch_weights = None
        if not concatenated and len(branches) > 1:
            self._build_merges(head_type, merge_stages, dd)
        self.num_features = self.head_hidden_size = sum(self.embed_dims) if concatenated else merge_dim
        self.head_norm = nn.LayerNorm(merge_dim, eps=1e-6, **dd) if head_type == "merged" else nn.Identity()
        if head_type == "separate":
            self.head = BranchHeads(self.branches, self.embed_dims, global_pool, drop_rate)
        elif head_type == "none":
            self.head = FeatureHead(global_pool, drop_rate)
        else:
            self.head = LinearHead(merge_dim, num_classes, global_pool, drop_rate, **dd)

        self.fpn, self.taps, self.feature_info = build_feature_taps(
            self.stage_dims, self.stage_strides, merge_stages, with_fpn, fpn_levels, fpn_norm, concatenated, dd
        )
        # Interaction stages whose maps a regular pyramid taps: the merge stages and the last one.
        self.pyramid_stages = tuple(tap.stage for tap in self.taps) if merge_stages else ()
        if self.fpn is not None:
            self.fpn.apply(init_piip_weights)

    def _build_merges(self, head_type: HeadType, merge_stages: tuple[int, ...], dd: dict) -> None:
        """The branch merges and weights of the final map and, for regular pyramids, of every merge stage."""
        merge_dim = self.embed_dims[0]
        num_branches = len(self.embed_dims)
        self.merges = nn.ModuleList(
            classification_merge(dim, merge_dim, k > 0, dd) if head_type == "merged" else
            regular_dense_merge(dim, merge_dim, k > 0, dd) if merge_stages else
            dense_merge(dim, merge_dim, dd)
            for k, dim in enumerate(self.embed_dims)
        )
        self.branch_weights = nn.Parameter(torch.ones(num_branches, **dd))
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
                {str(s): nn.Parameter(torch.ones(num_branches, **dd)) for s in merge_stages}
            )
            self.stage_merges.apply(init_piip_weights)

    @staticmethod
    def _check_widths(
        branches: Sequence[BranchCfg], adapters: Sequence[BranchAdapter], head_type: str, merge_stages: tuple[int, ...]
    ) -> None:
        """Raises unless widths do not grow along the pyramid and the head's merges can take them."""
        kinds = [type(adapter) for adapter in adapters]
        dims = [adapter.embed_dim for adapter in adapters]
        # Widths only rank models of one kind: a ConvNeXt-T is wider than a (larger-image) ViT-S.
        if any(ka == kb and a < b for ka, kb, a, b in zip(kinds, kinds[1:], dims, dims[1:])):
            raise ValueError(
                f"branch order is not inverted: widths {tuple(dims)} must not grow from branch 0 (largest model, "
                "smallest image) to the last branch (compared between branches of the same kind)"
            )
        widening = [k for k, adapter in enumerate(adapters) if len(set(adapter.widths)) > 1]
        if widening and (head_type == "merged" or (head_type == "dense" and not merge_stages)):
            k = widening[0]
            raise ValueError(
                f"branch {k} ({branches[k].model_name}) changes width between stages, which one set of merges cannot "
                "take; use head_type='dense' with merge_stages (the regular-FPN configs) or head_type='none'"
            )

    @property
    def global_pool(self) -> str:
        """The head's pooling: ``'first_patch'``, ``'avg'`` or ``''``."""
        return self.head.global_pool

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
        map_stages: Sequence[int] = (),
        last_stage: int | None = None,
        norm: bool = False,
    ) -> tuple[list[torch.Tensor], list[BranchGeometry], dict[int, torch.Tensor]]:
        """Runs the stages up to ``last_stage`` (all by default); returns the final tokens and grids and the fused
        map of every stage in ``map_stages`` that ran."""
        self._check_input(x)
        tokens, prefixes, geoms = [], [], []
        for adapter, branch, image in zip(self._adapters, self.branches, self._branch_images(x)):
            branch_tokens, prefix, grid = adapter.embed(branch, image)
            tokens.append(branch_tokens)
            prefixes.append(prefix)
            geoms.append(self._geometry(grid, branch_tokens.device))
        last_stage = len(self.interactions) - 1 if last_stage is None else last_stage
        checkpointing = self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled()
        maps = {}
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
            if stage in map_stages:
                maps[stage] = self._stage_map(stage, tokens, geoms, norm)
        return tokens, geoms, maps

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

        Without merges (separate and ``'none'`` heads) the branch maps are concatenated, each branch's tokens
        final-normed when ``norm`` (only classifier branches have a final norm); the merged and dense heads apply the
        branch merges and the learnable branch weights.
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
        maps = []
        for adapter, branch, t, geom in zip(self._adapters, self.branches, tokens, geoms):
            if norm:
                t = adapter.final_norm(branch, t)
            maps.append(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], geom.height, geom.width))
        return merge_maps(maps, (geoms[-1].height, geoms[-1].width), merges, weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image to the ``(B, num_features, H, W)`` feature map on the last branch's token grid."""
        return self.fuse(*self.forward_branches(x))

    def forward_pyramid(self, features: torch.Tensor, levels: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The dense head's simple feature pyramid (``p2`` .. ``p5``) of a :meth:`forward_features` map."""
        if self.fpn is None:
            raise RuntimeError("this model has no feature pyramid; build a dense model with with_fpn=True")
        if self.pyramid_stages:
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
            stop_early: Stop after the last stage a selected tap reads.
            output_fmt: Only ``'NCHW'``.
            intermediates_only: Return the taps alone.

        Returns:
            The taps, or ``(forward_features output, taps)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        if indices is not None:
            check_feature_indices(indices, len(self.taps), unique=False)
        take_indices, _ = feature_take_indices(len(self.taps), indices)
        taps = [self.taps[i] for i in take_indices]
        stages = {tap.stage for tap in taps}
        last_stage = max(stages) if stop_early or intermediates_only else None
        tokens, geoms, maps = self._forward_stages(x, stages, last_stage, norm)
        intermediates = [maps[tap.stage] if tap.level is None else self.fpn[tap.level](maps[tap.stage]) for tap in taps]
        if intermediates_only:
            return intermediates
        # a simple pyramid's taps all read the final fused map, which is the features (dense branches have no norm)
        simple_pyramid = self.fpn is not None and not self.pyramid_stages
        return (maps[len(self.interactions) - 1] if simple_pyramid else self.fuse(tokens, geoms)), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Keeps only the selected taps: drops the stages after the last one they read, unselected pyramid levels and
        (regular pyramids) the unselected stages' merges, whose last kept one becomes the final merge.

        Returns:
            The indices of the kept taps in the pruned model.
        """
        check_feature_indices(indices, len(self.taps))
        take_indices, _ = feature_take_indices(len(self.taps), indices)
        keep = sorted(take_indices)
        taps = [self.taps[i] for i in keep]
        last_stage = max(tap.stage for tap in taps)
        if self.stage_merges is not None:
            if str(last_stage) in self.stage_merges:
                self.merges = self.stage_merges[str(last_stage)]
                self.branch_weights = self.stage_branch_weights[str(last_stage)]
            kept_stages = {tap.stage for tap in taps}
            for key in list(self.stage_merges):
                if int(key) == last_stage or int(key) not in kept_stages:
                    del self.stage_merges[key], self.stage_branch_weights[key]
        if self.pyramid_stages:
            self.pyramid_stages = tuple(tap.stage for tap in taps)
        # Without merges the branch maps are concatenated (a single branch's map is its own).
        dims = self.stage_dims[last_stage]
        self.num_features = self.head_hidden_size = sum(dims) if self.merges is None else dims[0]
        if self.fpn is not None:
            self.fpn = nn.ModuleDict({tap.level: self.fpn[tap.level] for tap in taps})
        self.taps = taps
        self.feature_info = [self.feature_info[i] for i in keep]
        self.interactions = self.interactions[:last_stage + 1]
        self.segments = tuple(segs[:last_stage + 1] for segs in self.segments)
        for adapter, branch, segs in zip(self._adapters, self.branches, self.segments):
            adapter.prune(branch, segs[-1][1] + 1, prune_norm)
        if prune_head:
            self.head_norm = nn.Identity()
            self.reset_classifier(0, "")
        return [keep.index(i) for i in take_indices]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Normalises (merged heads), pools and classifies the feature map.

        Args:
            x: Output of :meth:`forward_features`.
            pre_logits: Return the pooled features instead of logits.
        """
        return self.head(self.head_norm(x.permute(0, 2, 3, 1)), pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module | tuple[nn.Module, ...]:
        """The classifier: the head (merged and dense heads, whose ``weight``/``bias`` it holds), each branch's
        ``head`` (separate heads), or ``()`` (no classifier)."""
        return self.head.classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the classifier(s).

        Args:
            num_classes: New number of classes (0 removes the classifier).
            global_pool: New pooling; the current one when None.
        """
        param = next(self.parameters())
        self.head.reset(num_classes, global_pool, device=param.device, dtype=param.dtype)
        self.num_classes = num_classes

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
        """Parameter patterns timm's optimizer factory exempts from weight decay: embeddings and tokens."""
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
        """Loads each branch's timm pretrained weights (from its ``model_name`` tag) through timm's Hub path, all or
        nothing: every branch's weights are read and checked before any is copied.

        Position embeddings are resampled to the branch grid; interactions and merges keep their current values
        (zero-initialised gates make a fresh pyramid equal to the independent branches).
        """
        staged = [
            staged_pretrained(
                branch,
                pretrained_cfg=branch.pretrained_cfg,
                num_classes=branch.num_classes,
                in_chans=self.in_chans,
                filter_fn=adapter.filter_fn,
                cache_dir=cache_dir,
            )
            for adapter, branch in zip(self._adapters, self.branches)
        ]
        with torch.no_grad():
            for branch, state_dict in zip(self.branches, staged):
                branch.load_state_dict(state_dict, strict=False)  # checked above

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str, strict: bool = True) -> None:
        """Loads an official OpenGVLab/PIIP or piip-models checkpoint file (safetensors, or a weights-only pickle).

        Official layouts are converted and detector heads dropped; a checkpoint that does not fit raises before any
        parameter changes (``strict=False`` skips missing and unexpected tensors, never mis-shaped ones). timm calls
        this for tags with a released checkpoint (``custom_load``).
        """
        load_checkpoint(self, checkpoint_path, strict=strict)


def _stage_geometry(
    adapters: Sequence[BranchAdapter], segments: Sequence[Sequence[tuple[int, int]]]
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """Width and stride of every branch at the end of every stage (ConvNeXt branches change both)."""
    ends = [[seg[1] for seg in segs] for segs in segments]
    dims = tuple(zip(*([a.widths[end] for end in e] for a, e in zip(adapters, ends))))
    strides = tuple(zip(*([a.strides[end] for end in e] for a, e in zip(adapters, ends))))
    return dims, strides


def _check_structure(
    branches: Sequence[BranchCfg], adapters: Sequence[BranchAdapter], sizes: Sequence[int], interaction: InteractionCfg
) -> None:
    """Raises unless the branches, as built, fit the configuration: segments cover every unit, every branch image
    holds at least one token and the interactions can split the widths into heads."""
    for k, (cfg, adapter, size) in enumerate(zip(branches, adapters, sizes)):
        check_segments(k, cfg.segments, adapter.depth)
        if size < max(adapter.min_input):
            raise ValueError(
                f"branch {k} ({cfg.model_name}) at {size} px is smaller than the {adapter.min_input[0]}x"
                f"{adapter.min_input[1]} px it needs for one token; give it a larger size"
            )
    if len(adapters) > 1:
        stage_dims, _ = _stage_geometry(adapters, [cfg.segments for cfg in branches])
        interaction.check_widths(sorted({dim for stage in stage_dims for dim in stage}))
