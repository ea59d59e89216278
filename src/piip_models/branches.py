"""Branch adapters: how a PIIP drives each kind of timm backbone as one pyramid branch.

The timm models themselves live in ``PIIP.branches`` (state-dict keys stay ``branches.{k}.<timm names>``); each has a
plain adapter object (never a module, so it adds no key level) that knows the branch's *units* (what
``BranchCfg.segments`` index), every unit's output width and stride, and how to embed an image into tokens and run a
range of units on them. Tokens always travel as ``(B, H * W, C)`` on a row-major grid, which is what the
interactions consume.

* :class:`ViTAdapter`: a timm ``VisionTransformer``; units are its blocks (optionally windowed), on the fixed patch
  grid; class/register tokens ride along through the blocks and skip the interactions.
* :class:`ConvNeXtAdapter`: a timm ``ConvNeXt``; units are its blocks with each stage's downsampling layer as a unit
  of its own (the official wrappers split them the same way), so the grid halves and the width grows at every
  downsampling unit and the deformable-attention geometry follows the branch's current stride.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath
from timm.models import split_model_name_tag
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer

from .config import BranchCfg
from .layers.permute import kernels_channels_last
from .layers.window_attention import WindowPadding, block_forward
from .weights import branch_checkpoint_filter_fn, convnext_branch_checkpoint_filter_fn

__all__ = [
    "BranchAdapter", "ConvNeXtAdapter", "ViTAdapter", "branch_class", "build_branch", "convnext_units", "unit_count"
]

Grid = tuple[int, int]


def _run(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    return torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False) if checkpointing else fn(x)


def _resample_grid_embed(embed: torch.Tensor, grid: Grid, size: Grid) -> torch.Tensor:
    """A ``(1, h * w, C)`` position embedding of the ``grid`` resampled bicubically to ``size`` (no antialiasing, as
    the reference implementation does).

    It always interpolates (bit for bit the identity at the stored size): timm's resampling returns early there, a
    size comparison that gave ``torch.compile(dynamic=True)`` a graph for the stored grid and one for the others.
    """
    x = embed.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, -1, embed.shape[-1]).to(embed.dtype)


class BranchAdapter(ABC):
    """What PIIP needs to know about a branch, independent of its architecture.

    Attributes:
        widths: Channel width after every unit.
        strides: Input pixels per token after every unit.
        windows: Attention window of every unit (0: global attention, or no attention at all).
        min_input: Smallest ``(height, width)`` branch image that leaves every unit a non-empty grid.
        filter_fn: Checkpoint filter for the branch's timm pretrained weights.
    """

    widths: tuple[int, ...]
    strides: tuple[int, ...]
    windows: tuple[int, ...]
    min_input: Grid
    filter_fn: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def embed_dim(self) -> int:
        return self.widths[-1]

    @abstractmethod
    def embed(self, model: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Grid]:
        """Image to patch tokens, prefix tokens (or None) and the token grid."""

    @abstractmethod
    def run(
        self,
        model: nn.Module,
        units: tuple[int, int],
        tokens: torch.Tensor,
        prefix: torch.Tensor | None,
        grid: Grid,
        checkpointing: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Grid]:
        """Runs the inclusive unit range ``units``; returns the new tokens, prefix tokens and grid."""

    def final_norm(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """The branch's final norm applied to its tokens (identity for branches without one)."""
        return tokens

    @abstractmethod
    def unit_of(self, name: Sequence[str]) -> int | None:
        """Unit of a parameter path inside the branch: -1 for the stem/embeddings, None for anything else."""

    @abstractmethod
    def prune(self, model: nn.Module, depth: int, prune_norm: bool) -> None:
        """Drops every unit from ``depth`` on (and the final norm when ``prune_norm``)."""


class ViTAdapter(BranchAdapter):
    """A timm ``VisionTransformer`` branch: patch embedding, resampled position embedding, (windowed) blocks."""

    _STEM = ("cls_token", "reg_token", "pos_embed", "patch_embed")
    filter_fn = staticmethod(branch_checkpoint_filter_fn)

    def __init__(self, model: VisionTransformer, cfg: BranchCfg, window_padding: WindowPadding):
        depth = len(model.blocks)
        self.widths = (model.embed_dim,) * depth
        patch = tuple(model.patch_embed.patch_size)
        self.strides = (patch[0],) * depth
        self.min_input = patch
        beyond = [block for block in cfg.global_blocks if block >= depth]
        if beyond:
            raise ValueError(f"{cfg.model_name}: global_blocks {beyond} lie beyond its {depth} blocks")
        self.windows = tuple(0 if i in cfg.global_blocks else cfg.window_size for i in range(depth))
        self.window_padding = window_padding
        # Class/register tokens get no position embedding in PIIP (the LLaVA CLIP towers excepted), although some
        # timm ViTs store slots for them.
        self.pos_skip = 0 if model.no_embed_class else model.num_prefix_tokens
        if cfg.class_pos_embed and not self.pos_skip:
            raise ValueError(f"{cfg.model_name}: class_pos_embed needs a position embedding with prefix-token slots")
        self.class_pos_embed = cfg.class_pos_embed

    @staticmethod
    def build(
        index: int, cfg: BranchCfg, img_size: int, num_classes: int, in_chans: int, class_token: bool,
        with_head: bool, window_padding: WindowPadding, dd: dict[str, Any],
    ) -> tuple[VisionTransformer, ViTAdapter]:
        model = timm.create_model(
            cfg.model_name,
            pretrained=False,
            img_size=cfg.pos_embed_size or img_size,
            in_chans=in_chans,
            num_classes=num_classes if with_head else 0,
            global_pool="",
            fc_norm=False,
            final_norm=with_head,
            class_token=class_token,
            dynamic_img_size=True,
            **{**cfg.model_args, **dd},
        )
        depth = len(model.blocks)
        rates = [cfg.drop_path_rate] * depth
        if cfg.drop_path_mode == "linear":
            rates = [cfg.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        for block, rate in zip(model.blocks, rates):
            block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
            block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
        # No image size: timm skips its divisibility assert, whose message formats the size and so would pin it
        # under torch.compile(dynamic=True) (a recompile per input size). embed() needs no divisible sizes.
        model.patch_embed.img_size = None
        return model, ViTAdapter(model, cfg, window_padding)

    def embed(self, model: VisionTransformer, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Grid]:
        # A stride-p patch conv ignores the last H % p rows and W % p columns: any size is accepted.
        x = model.patch_embed(image)
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels)
        if model.pos_embed is not None:  # BEiT branches encode positions with a relative bias only
            pos_embed = model.pos_embed[:, self.pos_skip:]
            x = x + _resample_grid_embed(pos_embed, model.patch_embed.grid_size, (height, width))
        x = model.pos_drop(x)
        # repeated, not expanded: an expand's gradient at batch 1 is the token's slice of the sequence gradient,
        # strided like the whole sequence, which DDP reported ("Grad strides do not match bucket view strides");
        # repeat_interleave's gradient is a sum of its own
        prefix = [t.repeat_interleave(batch, dim=0) for t in (model.cls_token, model.reg_token) if t is not None]
        prefix_tokens = None
        if prefix:
            prefix_tokens = torch.cat(prefix, dim=1)
            if self.class_pos_embed:
                prefix_tokens = prefix_tokens + model.pos_embed[:, : self.pos_skip]
            prefix_tokens = model.norm_pre(prefix_tokens)
        return model.norm_pre(x), prefix_tokens, (height, width)

    def run(
        self,
        model: VisionTransformer,
        units: tuple[int, int],
        tokens: torch.Tensor,
        prefix: torch.Tensor | None,
        grid: Grid,
        checkpointing: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Grid]:
        start, end = units
        blocks = model.blocks[start:end + 1]
        windows = self.windows[start:end + 1]

        def run_blocks(x: torch.Tensor) -> torch.Tensor:
            for block, window in zip(blocks, windows):
                x = block_forward(block, x, grid, window, self.window_padding)
            return x

        x = _run(run_blocks, tokens if prefix is None else torch.cat([prefix, tokens], dim=1), checkpointing)
        if prefix is None:
            return x, None, grid
        # contiguous patch tokens: whether later matmuls can fold a strided slice depends on the batch being 1, a
        # branch that torch.export and torch.compile(dynamic=True) would pin the batch on
        return x[:, prefix.shape[1]:].contiguous(), x[:, :prefix.shape[1]], grid

    def final_norm(self, model: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
        return model.norm(tokens)

    def unit_of(self, name: Sequence[str]) -> int | None:
        if name[0] in self._STEM:
            return -1
        return int(name[1]) if name[0] == "blocks" else None

    def prune(self, model: VisionTransformer, depth: int, prune_norm: bool) -> None:
        model.blocks = model.blocks[:depth]
        if prune_norm:
            model.norm = nn.Identity()


def convnext_units(model: ConvNeXt) -> list[nn.Module]:
    """A ConvNeXt's units in order: per stage its downsampling layer (when it has one), then its blocks."""
    units: list[nn.Module] = []
    for stage in model.stages:
        if not isinstance(stage.downsample, nn.Identity):
            units.append(stage.downsample)
        units.extend(stage.blocks)
    return units


class ConvNeXtAdapter(BranchAdapter):
    """A timm ``ConvNeXt`` branch: the stem embeds, every block and downsampling layer is a unit."""

    filter_fn = staticmethod(convnext_branch_checkpoint_filter_fn)

    def __init__(self, model: ConvNeXt):
        widths: list[int] = []
        strides: list[int] = []
        # per stage: the unit index of its downsampling layer (or first block) and of its first block
        self.stage_units: list[tuple[int, int]] = []
        for stage, info in zip(model.stages, model.feature_info):
            has_downsample = not isinstance(stage.downsample, nn.Identity)
            self.stage_units.append((len(widths), len(widths) + has_downsample))
            count = len(stage.blocks) + has_downsample
            widths += [info["num_chs"]] * count
            strides += [info["reduction"]] * count
        self.widths, self.strides = tuple(widths), tuple(strides)
        self.windows = (0,) * len(widths)
        self.min_input = (self.strides[-1],) * 2

    @staticmethod
    def build(
        index: int, cfg: BranchCfg, in_chans: int, with_head: bool, dd: dict[str, Any]
    ) -> tuple[ConvNeXt, ConvNeXtAdapter]:
        if with_head:
            raise ValueError(
                f"branch {index} ({cfg.model_name}): ConvNeXt branches have no classifier here; use head_type "
                "'dense' or 'none'"
            )
        unsupported = {
            "window_size": cfg.window_size, "global_blocks": cfg.global_blocks, "pos_embed_size": cfg.pos_embed_size,
            "class_pos_embed": cfg.class_pos_embed,
        }
        unsupported = [name for name, value in unsupported.items() if value]
        if cfg.drop_path_mode != "linear" and cfg.drop_path_rate:
            unsupported.append("drop_path_mode (timm's ConvNeXt drop path is always linear over depth)")
        if unsupported:
            raise ValueError(f"branch {index} ({cfg.model_name}): not applicable to ConvNeXt: {unsupported}")
        model = timm.create_model(
            cfg.model_name,
            pretrained=False,
            in_chans=in_chans,
            num_classes=0,
            drop_path_rate=cfg.drop_path_rate,
            **{**cfg.model_args, **dd},
        )
        if not isinstance(model, ConvNeXt) or not isinstance(model.norm_pre, nn.Identity):
            raise TypeError(f"branch {index} ({cfg.model_name}) is not a timm ConvNeXt with its norm in the head")
        # The pooled head (final norm, MLP) is never used by a pyramid branch; dropping it keeps every parameter in
        # the graph (DDP without find_unused_parameters).
        model.head = nn.Identity()
        kernels_channels_last(model)  # its units run on the tokens' channels-last layout
        return model, ConvNeXtAdapter(model)

    def embed(self, model: ConvNeXt, image: torch.Tensor) -> tuple[torch.Tensor, None, Grid]:
        x = model.stem(image)
        return x.flatten(2).transpose(1, 2), None, (x.shape[-2], x.shape[-1])

    def run(
        self,
        model: ConvNeXt,
        units: tuple[int, int],
        tokens: torch.Tensor,
        prefix: torch.Tensor | None,
        grid: Grid,
        checkpointing: bool,
    ) -> tuple[torch.Tensor, None, Grid]:
        start, end = units
        layers = convnext_units(model)[start:end + 1]

        def run_units(x: torch.Tensor) -> torch.Tensor:
            for layer in layers:
                x = layer(x)
            return x

        x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        x = _run(run_units, x, checkpointing)
        return x.flatten(2).transpose(1, 2), None, (x.shape[-2], x.shape[-1])

    def unit_of(self, name: Sequence[str]) -> int | None:
        if name[0] == "stem":
            return -1
        if name[0] != "stages":
            return None
        first, first_block = self.stage_units[int(name[1])]
        return first if name[2] == "downsample" else first_block + int(name[3])

    def prune(self, model: ConvNeXt, depth: int, prune_norm: bool) -> None:
        for index, (_, first_block) in enumerate(self.stage_units):
            stage = model.stages[index]
            if depth <= first_block + len(stage.blocks):
                stage.blocks = stage.blocks[:max(depth - first_block, 0)]
                model.stages = model.stages[:index + 1]
                return


@functools.cache
def branch_class(model_name: str) -> type[VisionTransformer] | type[ConvNeXt]:
    """The timm class a branch's model name builds (from a meta-device build of the architecture).

    Raises:
        ValueError: Not a timm model.
        TypeError: Neither a timm ``VisionTransformer`` nor a ``ConvNeXt``, the two kinds a branch can be.
    """
    arch = split_model_name_tag(model_name)[0]
    if not timm.is_model(arch):
        raise ValueError(f"{model_name!r} is not a timm model name")
    cls = type(timm.create_model(arch, pretrained=False, device="meta"))
    if not issubclass(cls, (VisionTransformer, ConvNeXt)):
        raise TypeError(
            f"{model_name} is a timm {cls.__name__}; a PIIP branch must be a timm VisionTransformer or ConvNeXt"
        )
    return cls


def unit_count(model_name: str) -> int:
    """Number of units (what segments index) of a timm ViT or ConvNeXt, from a meta-device build."""
    cls = branch_class(model_name)
    model = timm.create_model(model_name, pretrained=False, device="meta")
    return len(convnext_units(model)) if issubclass(cls, ConvNeXt) else len(model.blocks)


def build_branch(
    index: int,
    cfg: BranchCfg,
    img_size: int,
    num_classes: int,
    in_chans: int,
    class_token: bool,
    with_head: bool,
    window_padding: WindowPadding,
    dd: dict[str, Any],
) -> tuple[nn.Module, BranchAdapter]:
    """Builds branch ``index`` from its config: the timm model and the adapter that drives it."""
    try:
        cls = branch_class(cfg.model_name)
    except (TypeError, ValueError) as e:
        raise type(e)(f"branch {index}: {e}") from None
    if issubclass(cls, ConvNeXt):
        return ConvNeXtAdapter.build(index, cfg, in_chans, with_head, dd)
    return ViTAdapter.build(index, cfg, img_size, num_classes, in_chans, class_token, with_head, window_padding, dd)
