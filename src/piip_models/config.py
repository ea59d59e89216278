"""Configuration of a PIIP: its branches and the interactions between them.

A pyramid is a sequence of :class:`BranchCfg` (largest model on the smallest image first) and one
:class:`InteractionCfg`. Every branch's *units* (what ``BranchCfg.segments`` index: a ViT's blocks, or a ConvNeXt's
blocks and downsampling layers) are split into as many contiguous segments as there are interactions.

Every value is checked where it enters: the two dataclasses check their fields when constructed, and
:func:`check_piip_args` checks a model's keyword arguments (including how the branches' segments line up), so a
configuration that cannot work is refused before any weights are allocated.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

__all__ = [
    "HEAD_TYPES",
    "BranchCfg",
    "InteractionCfg",
    "check_branches",
    "check_feature_indices",
    "check_int",
    "check_levels",
    "check_piip_args",
    "check_segments",
    "even_segments",
    "resolve_branch_sizes",
    "segments_of_lengths",
    "stage_count",
]

Segments = tuple[tuple[int, int], ...]
HEAD_TYPES = ("separate", "merged", "dense", "none")


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int; raises TypeError unless it is an integer (not a bool), ValueError if below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """Raises unless ``value`` is a real number (not a bool) in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or not (low < value if low_open else low <= value) or not value <= high:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        allowed = f"a finite number {bound}" if math.isinf(high) else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _int_tuple(name: str, values: Any, minimum: int) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of integers, got {values!r}")
    return tuple(check_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(values))


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

    def __post_init__(self) -> None:
        check_int("InteractionCfg.num_heads", self.num_heads, 1)
        check_int("InteractionCfg.n_points", self.n_points, 1)
        _check_number("InteractionCfg.deform_ratio", self.deform_ratio, 0, low_open=True)
        _check_number("InteractionCfg.cffn_ratio", self.cffn_ratio, 0, low_open=True)
        _check_number("InteractionCfg.drop_path_rate", self.drop_path_rate, 0, 1)
        for name in ("with_cffn", "with_proj", "with_norm"):
            _check_bool(f"InteractionCfg.{name}", getattr(self, name))

    def check_widths(self, dims: Sequence[int]) -> None:
        """Raises unless every branch width gives the deformable attention a positive value width that the heads
        divide, and the ConvFFN at least one hidden channel."""
        for dim in dims:
            value_dim = int(dim * self.deform_ratio)
            if value_dim < self.num_heads or value_dim % self.num_heads:
                raise ValueError(
                    f"interaction value width {value_dim} (branch width {dim} x deform_ratio {self.deform_ratio}) "
                    f"must be a positive multiple of num_heads {self.num_heads}"
                )
            if self.with_cffn and int(dim * self.cffn_ratio) < 1:
                raise ValueError(
                    f"cffn_ratio {self.cffn_ratio} leaves the ConvFFN of a {dim}-wide branch no hidden channel"
                )


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

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise TypeError(f"BranchCfg.model_name must be a timm model name, got {self.model_name!r}")
        name = f"BranchCfg({self.model_name!r})"
        check_int(f"{name}.img_size", self.img_size, 1)
        if isinstance(self.segments, (str, bytes)) or not isinstance(self.segments, Sequence) or not self.segments:
            raise ValueError(f"{name}.segments must be a non-empty sequence of (first, last) unit ranges, "
                             f"got {self.segments!r}")
        segments = []
        for i, pair in enumerate(self.segments):
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(f"{name}.segments[{i}] must be a (first, last) unit range, got {pair!r}")
            segments.append(_int_tuple(f"{name}.segments[{i}]", pair, 0))
        object.__setattr__(self, "segments", tuple(segments))
        _check_number(f"{name}.drop_path_rate", self.drop_path_rate, 0, 1)
        _check_choice(f"{name}.drop_path_mode", self.drop_path_mode, ("constant", "linear"))
        if not isinstance(self.model_args, Mapping) or not all(isinstance(k, str) for k in self.model_args):
            raise TypeError(f"{name}.model_args must be a mapping of keyword arguments, got {self.model_args!r}")
        if self.pos_embed_size is not None:
            check_int(f"{name}.pos_embed_size", self.pos_embed_size, 1)
        check_int(f"{name}.window_size", self.window_size, 0)
        object.__setattr__(self, "global_blocks", _int_tuple(f"{name}.global_blocks", self.global_blocks, 0))
        _check_bool(f"{name}.class_pos_embed", self.class_pos_embed)


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


def check_branches(branches: Any) -> tuple[BranchCfg, ...]:
    """The branch configs as a tuple; raises unless they are a non-empty sequence of :class:`BranchCfg`."""
    if isinstance(branches, (str, bytes)) or not isinstance(branches, Sequence) or not branches:
        raise ValueError(f"a pyramid needs a non-empty sequence of BranchCfg, got {branches!r}")
    for k, branch in enumerate(branches):
        if not isinstance(branch, BranchCfg):
            raise TypeError(
                f"branch {k} must be a BranchCfg, got {branch!r}; create_pyramid takes (timm_name, img_size) pairs"
            )
    return tuple(branches)


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
        sizes = _int_tuple("branch_sizes", branch_sizes, 1)
        if len(sizes) != len(branches):
            raise ValueError(f"branch_sizes has {len(sizes)} entries for {len(branches)} branches")
    else:
        sizes = tuple(b.img_size for b in branches)
        if img_size is not None:
            img_size = max(_image_size(img_size))
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


def _image_size(img_size: Any) -> tuple[int, int]:
    """``img_size`` (a side or ``(H, W)``) as ``(H, W)`` of positive integers."""
    if isinstance(img_size, numbers.Number):
        side = check_int("img_size", img_size, 1)
        return side, side
    size = _int_tuple("img_size", img_size, 1)
    if len(size) != 2:
        raise ValueError(f"img_size must be a side or (height, width), got {img_size!r}")
    return size


def check_levels(levels: Sequence[int]) -> None:
    """Raises unless ``levels`` are increasing feature-pyramid level indices in 0 .. 3 (``p2`` .. ``p5``)."""
    if (isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels
            or any(isinstance(v, bool) or v not in range(4) for v in levels) or list(levels) != sorted(set(levels))):
        raise ValueError(f"fpn_levels must be increasing indices in 0..3 (pyramid levels p2..p5), got {levels}")


def check_feature_indices(indices: Any, num_taps: int, unique: bool = True) -> None:
    """Raises unless ``indices`` selects feature taps as timm's ``out_indices`` do: ``n`` (the last ``n``) or a
    non-empty sequence of tap indices (negative ones count from the end), each tap once when ``unique``."""
    if isinstance(indices, numbers.Integral) and not isinstance(indices, bool):
        if not 0 < indices <= num_taps:
            raise ValueError(f"out_indices={indices} asks for the last {indices} of {num_taps} feature taps")
        return
    taps = _int_tuple("out_indices", indices, -num_taps)
    if not taps:
        raise ValueError(f"out_indices must select at least one of the {num_taps} feature taps, got {indices!r}")
    absolute = [i % num_taps if i < 0 else i for i in taps]
    if max(absolute) >= num_taps:
        raise ValueError(f"out_indices {tuple(indices)} selects a tap beyond the {num_taps} of this model")
    if unique and len(set(absolute)) != len(absolute):
        raise ValueError(f"out_indices {tuple(indices)} select a feature tap twice (of {num_taps})")


def check_piip_args(
    branches: Any,
    interaction: Any,
    *,
    num_classes: Any,
    in_chans: Any,
    global_pool: Any,
    head_type: Any,
    head_pools: Mapping[str, Sequence[str]],
    class_token: Any,
    img_size: Any,
    branch_sizes: Any,
    window_padding: Any,
    with_fpn: Any,
    fpn_levels: Any,
    fpn_norm: Any,
    merge_stages: Any,
    drop_rate: Any,
    drop_path_rate: Any = None,
) -> tuple[tuple[BranchCfg, ...], tuple[int, ...], tuple[int, ...]]:
    """Checks the keyword arguments of a :class:`piip_models.PIIP` that need no built branch (see the class for
    their meaning); the branch structure (depths, widths, patch sizes) is checked against these afterwards.

    Args:
        head_pools: The ``global_pool`` values each head type takes.
        drop_path_rate: timm's factory argument: when given, every branch gets a linear schedule up to it.

    Returns:
        The branches (with ``drop_path_rate`` applied), the merge stages and the branch sizes
        (:func:`resolve_branch_sizes`), as tuples.

    Raises:
        TypeError: A value of the wrong type.
        ValueError: A value out of range, or options that do not work together.
    """
    branches = check_branches(branches)
    if drop_path_rate is not None:
        _check_number("drop_path_rate", drop_path_rate, 0, 1)
        branches = tuple(replace(b, drop_path_rate=drop_path_rate, drop_path_mode="linear") for b in branches)
    if not isinstance(interaction, InteractionCfg):
        raise TypeError(f"interaction must be an InteractionCfg, got {interaction!r}")
    num_stages = stage_count(branches)
    _check_choice("head_type", head_type, HEAD_TYPES)
    _check_choice(f"global_pool for a {head_type} head", global_pool, head_pools[head_type])
    check_int("num_classes", num_classes, 0)
    check_int("in_chans", in_chans, 1)
    _check_number("drop_rate", drop_rate, 0, 1)
    for name, value in (("class_token", class_token), ("with_fpn", with_fpn)):
        _check_bool(name, value)
    _check_choice("window_padding", window_padding, ("before_qkv", "after_qkv"))
    _check_choice("fpn_norm", fpn_norm, ("group", "layer"))
    if img_size is not None:
        _image_size(img_size)
    sizes = resolve_branch_sizes(branches, img_size, branch_sizes)
    merge_stages = _int_tuple("merge_stages", merge_stages, 0)
    if with_fpn and head_type != "dense":
        raise ValueError(f"with_fpn needs head_type='dense', got {head_type!r}")
    if merge_stages and head_type != "dense":
        raise ValueError(f"merge_stages needs head_type='dense', got {head_type!r}")
    if merge_stages and (list(merge_stages) != sorted(set(merge_stages)) or merge_stages[-1] >= num_stages - 1):
        raise ValueError(
            f"merge_stages must be increasing interaction stages before the last ({num_stages - 1}), got "
            f"{merge_stages}"
        )
    if with_fpn:
        check_levels(fpn_levels)
        if merge_stages and len(fpn_levels) != len(merge_stages) + 1:
            raise ValueError(
                f"a regular pyramid has one level per merge stage and one for the final map ({len(merge_stages) + 1})"
                f", got fpn_levels {tuple(fpn_levels)}"
            )
    if head_type == "none" and num_classes:
        raise ValueError(f"head_type='none' has no classifier; build it with num_classes=0, not {num_classes}")
    if class_token and any(b.window_size for b in branches):
        raise ValueError("windowed attention works on the patch grid alone; build the model with class_token=False")
    return branches, merge_stages, sizes
