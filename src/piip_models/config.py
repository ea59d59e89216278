"""Configuration of a PIIP: its branches and the interactions between them.

A pyramid is a sequence of :class:`BranchCfg` (largest model on the smallest image first) and one
:class:`InteractionCfg`. Every branch's *units* (what ``BranchCfg.segments`` index: a ViT's blocks, or a ConvNeXt's
blocks and downsampling layers) are split into as many contiguous segments as there are interactions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "BranchCfg",
    "InteractionCfg",
    "check_segments",
    "even_segments",
    "resolve_branch_sizes",
    "segments_of_lengths",
    "stage_count",
]

Segments = tuple[tuple[int, int], ...]


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
    segments: Segments
    drop_path_rate: float = 0.0
    drop_path_mode: Literal["constant", "linear"] = "constant"
    model_args: dict[str, Any] = field(default_factory=dict)
    pos_embed_size: int | None = None
    window_size: int = 0
    global_blocks: tuple[int, ...] = ()
    class_pos_embed: bool = False


def even_segments(depth: int, num_segments: int) -> Segments:
    """Splits ``depth`` units into ``num_segments`` contiguous inclusive ranges, the longer ones last."""
    if not 0 < num_segments <= depth:
        raise ValueError(f"cannot split {depth} blocks into {num_segments} segments")
    bounds = [round(i * depth / num_segments) for i in range(num_segments + 1)]
    return tuple((bounds[i], bounds[i + 1] - 1) for i in range(num_segments))


def segments_of_lengths(lengths: tuple[int, ...]) -> Segments:
    """Contiguous inclusive unit ranges of the given lengths, from unit 0."""
    bounds = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    return tuple((bounds[i], bounds[i + 1] - 1) for i in range(len(lengths)))


def stage_count(branches: Sequence[BranchCfg]) -> int:
    """The number of interaction stages: every branch's segment count, which must agree."""
    segment_counts = {len(b.segments) for b in branches}
    if len(segment_counts) != 1:
        counts = ", ".join(f"branch {k}: {len(b.segments)}" for k, b in enumerate(branches))
        raise ValueError(f"every branch needs the same number of block segments ({counts})")
    return segment_counts.pop()


def resolve_branch_sizes(
    branches: Sequence[BranchCfg], img_size: int | tuple[int, int] | None, branch_sizes: Sequence[int] | None
) -> tuple[int, ...]:
    """Branch resolutions: ``branch_sizes``, or the configured sizes scaled so the last one is ``img_size``; they must
    not shrink from branch 0 (largest model, smallest image) to the last branch."""
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


def check_segments(index: int, segments: Sequence[tuple[int, int]], depth: int) -> None:
    """Raises unless branch ``index``'s segments cover its ``depth`` units contiguously from unit 0."""
    expected_start = 0
    for start, end in segments:
        if start != expected_start or end < start:
            raise ValueError(
                f"branch {index}: segments {list(segments)} must be contiguous, non-empty and start at block 0"
            )
        expected_start = end + 1
    if expected_start != depth:
        raise ValueError(f"branch {index}: segments {list(segments)} cover {expected_start} of {depth} blocks")
