"""Checkpoint filters: timm branch checkpoints and official PIIP layouts to piip-models state dicts.

Weight compatibility lives here, never in ``forward``: position embeddings are resampled to the model's grids, the
official key names (``branch{k}.``, ``gamma_1``, ``interaction_units_{ab}``, ``merge_branch{k}``, ``w{k}``, ...) are
renamed to the timm-style names of :class:`piip_models.PIIP`, detector heads and the language model of a
PIIP-LLaVA checkpoint are dropped (and logged), and the result is checked against the model before anything is loaded:
keys, shapes and dtype kinds (integer and bool tensors are never cast into floating-point weights, nor floats into
integer buffers), for ``strict=False`` loads too, so a load either copies everything it promised or nothing.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models import load_pretrained
from timm.models.convnext import ConvNeXt
from timm.models.convnext import checkpoint_filter_fn as convnext_checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

__all__ = [
    "CheckpointMismatchError",
    "adapt_pos_embed",
    "adapt_rel_pos_tables",
    "adapt_state_dict",
    "branch_checkpoint_filter_fn",
    "check_state_dict",
    "check_tensors",
    "checkpoint_filter_fn",
    "dtype_mismatches",
    "convert_official_state_dict",
    "convnext_branch_checkpoint_filter_fn",
    "keys_to_load",
    "report_dropped",
    "staged_pretrained",
    "unwrap_state_dict",
]

_logger = logging.getLogger(__name__)
# classification main.py saves {"model": ...}, DeepSpeed {"module": ...}, mmcv {"meta": ..., "state_dict": ...}
_WRAPPER_KEYS = ("model", "module", "state_dict")
_BACKBONE_PREFIX = "backbone."
_DDP_PREFIX = "module."
# A PIIP-LLaVA checkpoint is a whole LLaVA model: the PIIP tower and its projector sit under these prefixes, every
# other tensor belongs to the language model.
_LLAVA_TOWER = "model.vision_tower.vision_tower."
_LLAVA_PROJECTOR = "model.mm_projector."
_MAX_LISTED_KEYS = 20


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's tensors do not fit the model: missing or unexpected keys, or tensors of another shape."""


def report_dropped(what: str, keys: Iterable[str]) -> None:
    """Logs (INFO) the tensors of a checkpoint that are not loaded, counted per module (``model.layers`` for a
    language model's ``model.*`` tensors, else the top-level name)."""
    groups = Counter(".".join(k.split(".")[:2]) if k.startswith("model.") else k.split(".", 1)[0] for k in keys)
    if groups:
        report = ", ".join(f"{name} ({count})" for name, count in sorted(groups.items()))
        _logger.info("%s, dropped %d tensors: %s", what, groups.total(), report)


def keys_to_load(keys: Iterable[str]) -> list[str]:
    """The keys of a checkpoint a PIIP model loads: the vision tower and projector of a LLaVA checkpoint (its
    language model is never needed), otherwise every key."""
    keys = list(keys)
    return [k for k in keys if k.startswith((_LLAVA_TOWER, _LLAVA_PROJECTOR))] or keys


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Returns a checkpoint's tensors: unwraps ``model``/``module``/``state_dict``, strips a DDP ``module.`` prefix,
    keeps only the ``backbone.`` part of detector/segmentor checkpoints and the vision tower and projector of
    LLaVA checkpoints (``mm_projector.``), logging what it dropped."""
    for key in _WRAPPER_KEYS:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
    state_dict = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if state_dict and all(k.startswith(_DDP_PREFIX) for k in state_dict):
        state_dict = {k[len(_DDP_PREFIX):]: v for k, v in state_dict.items()}
    if any(k.startswith(_BACKBONE_PREFIX) for k in state_dict):
        report_dropped("kept the backbone of a detector checkpoint",
                       [k for k in state_dict if not k.startswith(_BACKBONE_PREFIX)])
        state_dict = {k[len(_BACKBONE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_BACKBONE_PREFIX)}
    if any(k.startswith((_LLAVA_TOWER, _LLAVA_PROJECTOR)) for k in state_dict):
        vision = set(keys_to_load(state_dict))
        report_dropped("kept the vision tower and projector of a LLaVA checkpoint",
                       [k for k in state_dict if k not in vision])
        # tower keys become the official PIIP names (branch{k}., interactions.), the projector mm_projector.
        state_dict = {
            k.removeprefix(_LLAVA_TOWER).removeprefix("model."): v for k, v in state_dict.items() if k in vision
        }
    return state_dict


def adapt_pos_embed(pos_embed: torch.Tensor, branch: VisionTransformer) -> torch.Tensor:
    """Resamples a square-grid position embedding (with or without prefix slots) to a ViT branch's layout.

    The source's prefix-slot count is inferred as ``N - isqrt(N)**2``; slots the target lacks are dropped, slots
    it needs but the source lacks are zero (PIIP never reads them). The grid is resized bicubically without
    antialiasing, as the reference implementation does.
    """
    target_shape = branch.pos_embed.shape
    if pos_embed.shape == target_shape or not pos_embed.is_floating_point():
        return pos_embed  # (integers are not resampled: the check before loading refuses them)
    num_tokens = pos_embed.shape[1]
    src_grid = math.isqrt(num_tokens)
    src_slots = num_tokens - src_grid * src_grid
    dst_slots = 0 if branch.no_embed_class else branch.num_prefix_tokens
    grid = resample_abs_pos_embed(
        pos_embed[:, src_slots:],
        new_size=branch.patch_embed.grid_size,
        old_size=(src_grid, src_grid),
        num_prefix_tokens=0,
        antialias=False,
    )
    if not dst_slots:
        return grid
    prefix = pos_embed[:, :min(src_slots, dst_slots)]
    missing = dst_slots - prefix.shape[1]
    if missing:
        prefix = torch.cat([prefix, prefix.new_zeros(1, missing, pos_embed.shape[2])], dim=1)
    return torch.cat([prefix, grid], dim=1)


def adapt_rel_pos_tables(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Fits relative position bias tables (BEiT) to ``model``'s window and drops their derived index buffers.

    Class-token entries (the ``N - isqrt(N)**2`` trailing rows of a BEiT pretraining table) are removed when the
    model's table has none, and the ``(2W - 1)^2`` grid is resized bicubically to the model's window.
    """
    targets = model.state_dict()
    adapted = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            continue
        if (key.endswith("relative_position_bias_table") and key in targets and value.shape != targets[key].shape
                and value.is_floating_point()):
            dst_side = math.isqrt(targets[key].shape[0])
            src_side = math.isqrt(value.shape[0])
            if dst_side * dst_side != targets[key].shape[0] or value.shape[1] != targets[key].shape[1]:
                raise ValueError(
                    f"{key}: cannot fit a {tuple(value.shape)} relative position table to {tuple(targets[key].shape)}"
                )
            grid = value[: src_side * src_side].T.reshape(1, -1, src_side, src_side)
            grid = F.interpolate(grid.float(), size=(dst_side, dst_side), mode="bicubic", align_corners=False)
            value = grid.reshape(value.shape[1], -1).T.to(value.dtype)
        adapted[key] = value
    return adapted


def branch_checkpoint_filter_fn(state_dict: Mapping[str, Any], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Adapts a timm/DeiT/AugReg ViT checkpoint to one PIIP branch.

    Besides timm's own ViT conversions: the position embedding loses or gains its class slot as the branch needs,
    patch kernels of another size (DINOv2/MAE-H 14 -> 16) are resized bicubically as the reference does,
    LayerScale gammas absent from the checkpoint (DeiT v1) keep the branch's init values, BEiT relative position
    tables are fitted to the branch's window, and final-norm weights are dropped for branches without a final norm.
    """
    state_dict = unwrap_state_dict(state_dict)
    if "pos_embed" in state_dict:
        state_dict["pos_embed"] = adapt_pos_embed(state_dict["pos_embed"], model)
    if model.cls_token is None:
        state_dict.pop("cls_token", None)
    state_dict = adapt_rel_pos_tables(state_dict, model)
    kernel = state_dict.get("patch_embed.proj.weight")
    target = model.patch_embed.proj.weight.shape[-2:]
    if kernel is not None and kernel.dim() == 4 and kernel.shape[-2:] != target and kernel.is_floating_point():
        # PIIP resizes patch-14 kernels to 16 by plain bicubic interpolation (not timm's pseudo-inverse resampling).
        state_dict["patch_embed.proj.weight"] = F.interpolate(
            kernel.float(), size=tuple(target), mode="bicubic", align_corners=False
        ).to(kernel.dtype)
    state_dict = vit_checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True, antialias=False)
    for name, value in model.state_dict().items():
        if name.endswith(("ls1.gamma", "ls2.gamma")) and name not in state_dict:
            state_dict[name] = value.detach().clone()
    if isinstance(model.norm, nn.Identity):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("norm.")}
    if isinstance(model.fc_norm, nn.Identity):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc_norm.")}
    return state_dict


def convnext_branch_checkpoint_filter_fn(state_dict: Mapping[str, Any], model: ConvNeXt) -> dict[str, torch.Tensor]:
    """Adapts a timm/FB/OpenCLIP ConvNeXt checkpoint to one PIIP branch: timm's own conversion, then the pooled head
    (final norm, MLP, classifier), which a branch does not build, is dropped."""
    state_dict = convnext_checkpoint_filter_fn(unwrap_state_dict(state_dict), model)
    return {k: v for k, v in state_dict.items() if not k.startswith("head.")}


_OFFICIAL_RENAMES = (
    (re.compile(r"^branch(\d+)\."), lambda m: f"branches.{int(m.group(1)) - 1}."),
    (re.compile(r"\.gamma_([12])$"), lambda m: f".ls{m.group(1)}.gamma"),
    (re.compile(r"^interactions\.(\d+)\.interaction_units_(\d)\d\."),
     lambda m: f"interactions.{m.group(1)}.units.{int(m.group(2)) - 1}."),
    (re.compile(r"\.ffn\.dwconv\.dwconv\."), lambda m: ".ffn.dwconv."),
    (re.compile(r"\.ca_weight$"), lambda m: ".ca_gamma"),
    (re.compile(r"\.cffn_weight$"), lambda m: ".cffn_gamma"),
    # classification merge of branch 1 is a bare GroupNorm; every other merge is a Sequential in both layouts
    (re.compile(r"^merge_branch1\.(weight|bias)$"), lambda m: f"merges.0.0.{m.group(1)}"),
    (re.compile(r"^merge_branch(\d+)\."), lambda m: f"merges.{int(m.group(1)) - 1}."),
    (re.compile(r"^fpn([1-4])\."), lambda m: f"fpn.p{int(m.group(1)) + 1}."),
    (re.compile(r"^cls_norm\."), lambda m: "head_norm."),
    (re.compile(r"^cls_head\."), lambda m: "head."),
    # regular-FPN intermediate merges
    (re.compile(r"^intermediate_merging_(\d+)_branch(\d+)\."),
     lambda m: f"stage_merges.{m.group(1)}.{int(m.group(2)) - 1}."),
    # Hugging Face ConvNeXt branches (detection) to timm names
    (re.compile(r"\.convnext_model\.embeddings\.patch_embeddings\."), lambda m: ".stem.0."),
    (re.compile(r"\.convnext_model\.embeddings\.layernorm\."), lambda m: ".stem.1."),
    (re.compile(r"\.convnext_model\.encoder\.stages\.(\d+)\.downsampling_layer\."),
     lambda m: f".stages.{m.group(1)}.downsample."),
    (re.compile(r"\.convnext_model\.encoder\.stages\.(\d+)\.layers\."), lambda m: f".stages.{m.group(1)}.blocks."),
    (re.compile(r"(\.stages\.\d+\.blocks\.\d+)\.(dwconv|layernorm|pwconv1|pwconv2)\."),
     lambda m: f"{m.group(1)}.{_HF_CONVNEXT_BLOCK[m.group(2)]}."),
    (re.compile(r"(\.stages\.\d+\.blocks\.\d+)\.layer_scale_parameter$"), lambda m: f"{m.group(1)}.gamma"),
    # PIIP-LLaVA: timm ConvNeXt branches, their layer scale renamed ``gamma`` -> ``weight`` by the official code
    (re.compile(r"\.convnext_model\.(stem|stages)\."), lambda m: f".{m.group(1)}."),
    (re.compile(r"(\.stages\.\d+\.blocks\.\d+)\.weight$"), lambda m: f"{m.group(1)}.gamma"),
    # PIIP-LLaVA projector (TwoBranchMLP)
    (re.compile(r"^mm_projector\.branch(\d+)\."), lambda m: f"projector.branches.{int(m.group(1)) - 1}."),
)
_HF_CONVNEXT_BLOCK = {"dwconv": "conv_dw", "layernorm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}
_OFFICIAL_BRANCH_WEIGHT = re.compile(r"^(?:intermediate_merging_(\d+)_)?w(\d+)$")
# Official tensors no PIIP module reads: the final (pooling) LayerNorm of Hugging Face ConvNeXt branches, the pooled
# head of timm ConvNeXt branches and the post-LayerNorm (and, in older transformers, the position-id buffer) of
# Hugging Face CLIP branches.
_OFFICIAL_UNUSED = re.compile(
    r"^branch\d+\.(convnext_model\.(layernorm|head)\.|clip_model\.(post_layernorm\.|embeddings\.position_ids$))"
)
# Hugging Face CLIP vision towers (PIIP-LLaVA branches) to timm ViT names, within ``branch{k}.clip_model.``.
_HF_CLIP = re.compile(r"^(branch\d+\.)clip_model\.(.+)$")
_HF_CLIP_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_HF_CLIP_RENAMES = (
    (re.compile(r"^embeddings\.class_embedding$"), "cls_token"),
    (re.compile(r"^embeddings\.position_embedding\.weight$"), "pos_embed"),
    (re.compile(r"^embeddings\.patch_embedding\."), "patch_embed.proj."),
    (re.compile(r"^pre_layrnorm\."), "norm_pre."),
    (re.compile(r"^encoder\.layers\.(\d+)\."), r"blocks.\1."),
    (re.compile(r"\.self_attn\.out_proj\."), ".attn.proj."),
    (re.compile(r"\.layer_norm([12])\."), r".norm\1."),
)
# Single-ViT layout (the official detection baselines' ``vit_models``, or a plain ViT): the ViT is branch 0 and the
# baseline's simple pyramid ``up1..up4`` is ours ``fpn.p2..p5``.
_SINGLE_VIT_RENAMES = (
    (re.compile(r"^(cls_token|pos_embed|patch_embed\.|blocks\.|norm\.)"), lambda m: f"branches.0.{m.group(1)}"),
    (re.compile(r"^up([1-4])\."), lambda m: f"fpn.p{int(m.group(1)) + 1}."),
)


def _is_single_vit_layout(state_dict: Mapping[str, Any]) -> bool:
    return "patch_embed.proj.weight" in state_dict


def is_official_layout(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict uses the official OpenGVLab/PIIP key names (pyramid or single-ViT baseline)."""
    return any(k.startswith("branch1.") for k in state_dict) or _is_single_vit_layout(state_dict)


def _convert_hf_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP branches (``branch{k}.clip_model.``) to timm ViT names: the separate q/k/v projections
    fused into ``attn.qkv`` (in q, k, v order), the class and position embeddings given timm's batch dimensions.
    Other keys pass unchanged; a block missing one of q/k/v keeps its names (the strict check reports it)."""
    converted: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = _HF_CLIP.match(key)
        if not match:
            converted[key] = value
            continue
        prefix, rest = match.groups()
        proj = _HF_CLIP_QKV.match(rest)
        if proj:
            qkv.setdefault(f"{prefix}blocks.{proj[1]}.attn.qkv.{proj[3]}", {})[proj[2]] = value
            continue
        for pattern, repl in _HF_CLIP_RENAMES:
            rest = pattern.sub(repl, rest)
        if rest == "cls_token":
            value = value.reshape(1, 1, -1)
        elif rest == "pos_embed":
            value = value.unsqueeze(0)
        converted[prefix + rest] = value
    for key, parts in qkv.items():
        if parts.keys() == {"q", "k", "v"}:
            converted[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:
            converted.update({key.replace(".qkv.", f".{p}_proj."): v for p, v in parts.items()})
    return converted


def convert_official_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Renames an official OpenGVLab/PIIP state dict to piip-models names (no resampling).

    Args:
        state_dict: Official checkpoint or state dict (wrappers, a ``backbone.`` prefix and a LLaVA model's
            language model are removed).

    Returns:
        The state dict with piip-models key names; the scalar branch weights ``w1..wN`` become ``branch_weights``
        (``intermediate_merging_{i}_w{k}``: ``stage_branch_weights.{i}``), Hugging Face CLIP branches get timm's
        fused ``qkv``; official tensors no PIIP module reads (final norms of Hugging Face ConvNeXt and CLIP
        branches, timm ConvNeXt heads) are dropped and logged.
    """
    state_dict = unwrap_state_dict(state_dict)
    unused = sorted(k for k in state_dict if _OFFICIAL_UNUSED.match(k))
    if unused:
        _logger.info("dropped %d official tensors no PIIP module reads: %s", len(unused), unused)
    state_dict = _convert_hf_clip({k: v for k, v in state_dict.items() if not _OFFICIAL_UNUSED.match(k)})
    renames = _SINGLE_VIT_RENAMES + _OFFICIAL_RENAMES if _is_single_vit_layout(state_dict) else _OFFICIAL_RENAMES
    converted: dict[str, torch.Tensor] = {}
    branch_weights: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = _OFFICIAL_BRANCH_WEIGHT.match(key)
        if match:
            target = "branch_weights" if match.group(1) is None else f"stage_branch_weights.{match.group(1)}"
            branch_weights.setdefault(target, {})[int(match.group(2))] = value.reshape(())
            continue
        for pattern, repl in renames:
            key = pattern.sub(repl, key)
        converted[key] = value
    for target, weights in branch_weights.items():
        converted[target] = torch.stack([weights[k] for k in sorted(weights)])
    return converted


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _model_name(model: nn.Module) -> str:
    """The name errors give a model: its timm architecture, else its class."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def _listing(title: str, lines: list[str]) -> str:
    shown = "".join(f"\n    {line}" for line in lines[:_MAX_LISTED_KEYS])
    more = f"\n    ... and {len(lines) - _MAX_LISTED_KEYS} more" if len(lines) > _MAX_LISTED_KEYS else ""
    return f"\n  {title} ({len(lines)}):{shown}{more}" if lines else ""


def _kind(tensor: torch.Tensor) -> str:
    if tensor.dtype == torch.bool:
        return "bool"
    return "floating-point" if tensor.is_floating_point() or tensor.is_complex() else "integer"


def dtype_mismatches(state_dict: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors a copy would convert between kinds (integer, bool, floating point): ``copy_`` would cast a uint8
    -3 to 253.0 or truncate floats into integer buffers. Other dtype differences (float16 into float32) are fine."""
    return [
        f"{k}: checkpoint {v.dtype}, model {targets[k].dtype}"
        for k, v in state_dict.items() if k in targets and _kind(v) != _kind(targets[k])
    ]


def check_tensors(
    state_dict: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], name: str, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Checks tensors against a module's state dict (``targets``) before anything is copied.

    Args:
        state_dict: Tensors to load.
        targets: The module's ``state_dict()``.
        name: The module, as error messages call it.
        strict: Missing and unexpected tensors are errors; without ``strict`` they are skipped (and logged), as long
            as at least one tensor loads.

    Returns:
        The tensors to copy: each fits its target in shape and dtype kind.

    Raises:
        CheckpointMismatchError: Listing every missing, unexpected (with ``strict``), mis-shaped tensor and every
            tensor of another dtype kind; nothing may be copied then.
    """
    missing = [f"{k} {_shape(v)}" for k, v in targets.items() if k not in state_dict]
    unexpected = [f"{k} {_shape(v)}" for k, v in state_dict.items() if k not in targets]
    mismatched = [
        f"{k}: checkpoint {_shape(v)}, model {_shape(targets[k])}"
        for k, v in state_dict.items() if k in targets and _shape(v) != _shape(targets[k])
    ]
    wrong_kind = dtype_mismatches(state_dict, targets)
    loadable = {k: v for k, v in state_dict.items() if k in targets}
    if strict and (missing or unexpected) or mismatched or wrong_kind or not loadable:
        counts = [f"{len(missing)} missing", f"{len(unexpected)} unexpected"] if strict or not loadable else []
        counts.append(f"{len(mismatched)} mis-shaped")
        if wrong_kind:
            counts.append(f"{len(wrong_kind)} wrong-dtype")
        summary = " and ".join(filter(None, (", ".join(counts[:-1]), counts[-1])))
        raise CheckpointMismatchError(
            f"checkpoint does not fit {name} (nothing was loaded): {summary} tensors (after conversion to "
            "piip-models names)"
            + _listing("missing from the checkpoint", missing if strict or not loadable else [])
            + _listing("not in the model", unexpected if strict or not loadable else [])
            + _listing("shape mismatch", mismatched)
            + _listing("dtype mismatch (integer or bool tensors are never cast to floats, nor floats to integers)",
                       wrong_kind)
        )
    if missing or unexpected:
        _logger.info("strict=False: %d tensors of %s kept as they are (missing from the checkpoint), %d checkpoint "
                     "tensors skipped (not in the model)", len(missing), name, len(unexpected))
    return loadable


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Checks a converted state dict against ``model`` before anything is loaded.

    Classifier tensors for another class count (``num_classes`` differs from the checkpoint's, or 0) are left out so
    the model keeps its fresh heads, as timm does. Every other difference is an error (with ``strict``; without it,
    missing and unexpected tensors are skipped, see :func:`check_tensors`).

    Args:
        state_dict: State dict with piip-models key names (the output of the conversion).
        model: The target model (any device, ``meta`` included).
        strict: Require every model tensor and no other.

    Returns:
        The tensors to load.

    Raises:
        CheckpointMismatchError: Listing the missing keys, unexpected keys, shape and dtype-kind mismatches.
    """
    targets = model.state_dict()
    heads = ("head.",) + tuple(f"branches.{k}.head." for k in range(len(model.branches)))
    # a head for another class count: absent from the model (num_classes=0) or differing in its first dimension
    other_classes = [
        k for k, v in state_dict.items()
        if k.startswith(heads) and (
            k not in targets or _shape(targets[k]) != _shape(v) and _shape(targets[k])[1:] == _shape(v)[1:])
    ]
    if other_classes:
        _logger.info("classifier tensors for another class count not loaded: %s", sorted(other_classes))
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
        targets = {k: v for k, v in targets.items() if not k.startswith(heads)}
    return check_tensors(state_dict, targets, _model_name(model), strict)


def adapt_state_dict(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """A piip-models or official PIIP checkpoint as ``model``'s tensors, unchecked: official layouts (classification,
    detection with their ``backbone.`` prefix and detector heads, single-ViT baselines) converted, pyramid levels the
    model does not build (no ``with_fpn``, or DINO's unused stride-4 level) dropped and logged, position embeddings
    and relative position tables resampled per branch."""
    state_dict = unwrap_state_dict(state_dict)
    if is_official_layout(state_dict):
        state_dict = convert_official_state_dict(state_dict)
    own_fpn = {k for k in model.state_dict() if k.startswith("fpn.")}
    dropped = sorted(k for k in state_dict if k.startswith("fpn.") and k not in own_fpn)
    if dropped:
        _logger.info("dropped %d feature-pyramid tensors the model does not build: %s", len(dropped), dropped)
        state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    for k, branch in enumerate(model.branches):
        key = f"branches.{k}.pos_embed"
        if key in state_dict and isinstance(branch, VisionTransformer):  # (a ConvNeXt branch: reported unexpected)
            state_dict[key] = adapt_pos_embed(state_dict[key], branch)
    return adapt_rel_pos_tables(state_dict, model)


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Loads piip-models or official PIIP checkpoints into ``model``: :func:`adapt_state_dict`, then
    :func:`check_state_dict`, so a wrong checkpoint fails before any tensor is copied (``strict=False`` skips
    missing and unexpected tensors, but never loads a mis-shaped or integer-for-float one)."""
    return check_state_dict(adapt_state_dict(state_dict, model), model, strict)


def staged_pretrained(model: nn.Module, **kwargs: Any) -> dict[str, torch.Tensor]:
    """What timm's ``load_pretrained(model, **kwargs)`` would copy into ``model``, read and checked but not copied.

    timm downloads, filters and adapts (input channels, classifier) the weights, then calls
    ``model.load_state_dict``, which copies tensor after tensor and only then reports what did not fit. Here that
    last call is intercepted: the tensors are checked (:func:`check_tensors`, with timm's strictness) and returned,
    so several models can be loaded all or nothing.
    """
    staged: dict[str, torch.Tensor] = {}
    name = _model_name(model)

    def check_instead_of_copying(state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        staged.update(check_tensors(state_dict, model.state_dict(), name, strict))
        return SimpleNamespace(missing_keys=[], unexpected_keys=[])  # what timm reads of torch's result

    model.load_state_dict = check_instead_of_copying  # an instance attribute shadows the method for this call only
    try:
        load_pretrained(model, **kwargs)
    finally:
        del model.load_state_dict
    return staged
