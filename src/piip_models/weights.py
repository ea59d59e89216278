"""Checkpoint filters: timm branch checkpoints and official PIIP layouts to piip-models state dicts.

Weight compatibility lives here, never in ``forward``: position embeddings are resampled to the model's grids, the
official key names (``branch{k}.``, ``gamma_1``, ``interaction_units_{ab}``, ``merge_branch{k}``, ``w{k}``, ...) are
renamed to the timm-style names of :class:`piip_models.piip.PIIP`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.convnext import ConvNeXt
from timm.models.convnext import checkpoint_filter_fn as convnext_checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

if TYPE_CHECKING:
    from .piip import PIIP

__all__ = [
    "adapt_pos_embed",
    "branch_checkpoint_filter_fn",
    "checkpoint_filter_fn",
    "convert_official_state_dict",
    "convnext_branch_checkpoint_filter_fn",
    "unwrap_state_dict",
]

_logger = logging.getLogger(__name__)
_WRAPPER_KEYS = ("model", "module", "state_dict")


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Returns a checkpoint's tensors, unwrapping ``model``/``module``/``state_dict`` and a ``backbone.`` prefix."""
    for key in _WRAPPER_KEYS:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
    state_dict = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if state_dict and all(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items()}
    return state_dict


def adapt_pos_embed(pos_embed: torch.Tensor, branch: VisionTransformer) -> torch.Tensor:
    """Resamples a square-grid position embedding (with or without prefix slots) to a ViT branch's layout.

    The source's prefix-slot count is inferred as ``N - isqrt(N)**2``; slots the target lacks are dropped, slots
    it needs but the source lacks are zero (PIIP never reads them). The grid is resized bicubically without
    antialiasing, as the reference implementation does.
    """
    target_shape = branch.pos_embed.shape
    if pos_embed.shape == target_shape:
        return pos_embed
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


def branch_checkpoint_filter_fn(state_dict: Mapping[str, Any], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Adapts a timm/DeiT/AugReg ViT checkpoint to one PIIP branch.

    Besides timm's own ViT conversions: the position embedding loses or gains its class slot as the branch needs,
    patch kernels of another size (DINOv2/MAE-H 14 -> 16) are resized bicubically as the reference does,
    LayerScale gammas absent from the checkpoint (DeiT v1) keep the branch's init values, and final-norm weights
    are dropped for branches without a final norm.
    """
    state_dict = unwrap_state_dict(state_dict)
    if "pos_embed" in state_dict:
        state_dict["pos_embed"] = adapt_pos_embed(state_dict["pos_embed"], model)
    kernel = state_dict.get("patch_embed.proj.weight")
    target = model.patch_embed.proj.weight.shape[-2:]
    if kernel is not None and kernel.dim() == 4 and kernel.shape[-2:] != target:
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
)
_HF_CONVNEXT_BLOCK = {"dwconv": "conv_dw", "layernorm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}
_OFFICIAL_BRANCH_WEIGHT = re.compile(r"^(?:intermediate_merging_(\d+)_)?w(\d+)$")
# Official tensors no PIIP module reads: the Hugging Face ConvNeXt's final (pooling) LayerNorm.
_OFFICIAL_UNUSED = re.compile(r"^branch\d+\.convnext_model\.layernorm\.")


def is_official_layout(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict uses the official OpenGVLab/PIIP key names."""
    return any(k.startswith("branch1.") for k in state_dict)


def convert_official_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Renames an official OpenGVLab/PIIP state dict to piip-models names (no resampling).

    Args:
        state_dict: Official checkpoint or state dict (wrappers and a ``backbone.`` prefix are removed).

    Returns:
        The state dict with piip-models key names; the scalar branch weights ``w1..wN`` become ``branch_weights``
        (``intermediate_merging_{i}_w{k}``: ``stage_branch_weights.{i}``); the unused final LayerNorm of Hugging
        Face ConvNeXt branches is dropped.
    """
    state_dict = unwrap_state_dict(state_dict)
    converted: dict[str, torch.Tensor] = {}
    branch_weights: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if _OFFICIAL_UNUSED.match(key):
            continue
        match = _OFFICIAL_BRANCH_WEIGHT.match(key)
        if match:
            target = "branch_weights" if match.group(1) is None else f"stage_branch_weights.{match.group(1)}"
            branch_weights.setdefault(target, {})[int(match.group(2))] = value.reshape(())
            continue
        for pattern, repl in _OFFICIAL_RENAMES:
            key = pattern.sub(repl, key)
        converted[key] = value
    for target, weights in branch_weights.items():
        converted[target] = torch.stack([weights[k] for k in sorted(weights)])
    return converted


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: PIIP) -> dict[str, torch.Tensor]:
    """Loads piip-models or official PIIP checkpoints into ``model``, resampling position embeddings per branch.

    Pyramid levels the model does not build (no ``with_fpn``, or DINO's unused stride-4 level) are dropped and
    logged.
    """
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
        if key in state_dict:
            state_dict[key] = adapt_pos_embed(state_dict[key], branch)
    return state_dict
