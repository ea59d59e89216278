"""Parameter and FLOP counting in two conventions, and the published numbers they must reproduce.

``paper`` is the convention of the official #Param/#FLOPs columns (mmcv ``get_model_complexity_info`` plus the
official scripts' manual terms), so the README tables can be re-derived:

* multiply-accumulates (MACs) of one square image at the last branch's size, batch 1, counted by forward hooks whose
  module types match exactly (:data:`PAPER_RULES`): ``nn.Linear`` ``numel(input) * out_features`` (no bias term);
  ``nn.Conv2d`` ``k_h * k_w * C_in / groups`` per output element, plus one per output element with a bias;
  ``nn.ConvTranspose2d`` the same on the input grid; LayerNorm/GroupNorm/BatchNorm ``numel`` (twice if affine);
  ReLU and pooling ``numel``. Everything else counts 0: GELU, softmax, LayerScale, RMSNorm, the LayerNorms of
  ConvNeXts (the official Hugging Face and timm ConvNeXt norms are not ``nn.LayerNorm``), matmuls, attention
  kernels, ``F.interpolate``, ``grid_sample`` and custom ops;
* a manual self-attention term per attention layer (:data:`MANUAL_RULES`): ``2 * n**2 * D`` (global) or
  ``2 * n * w**2 * D`` (window ``w``), ``n`` the patch tokens (class tokens and window padding ignored);
* a manual deformable term per injector: ``5 * Lq * P * D`` with ``Lq`` the query tokens, ``P`` the sampling
  points (4 in every official config) and ``D`` the query width; heads, levels and the value ratio are ignored.

Detection and segmentation numbers were produced with a *classification* re-build of each config, the
:func:`paper_twin`: position embeddings stored at the real grid, no class token, GroupNorm/Linear/GroupNorm merges,
learnable branch weights, a LayerNorm over all tokens, a token mean and a 1000-way head; the detection merges, the
feature pyramid and the necks are not part of it. Linear layers are counted on the unpadded tokens (the hook pass
runs every block globally; the windows only enter the manual term). Two families were counted differently:

* the ConvNeXt/ViT detection backbones and the ConvNeXt-B baseline (whose widths change between stages, which the
  classification merge cannot take) as the backbone itself up to the merges of every tapped stage, on the windows it
  runs with, so the qkv projections see the zero-padded windows (:class:`BackboneTwin`);
* the PIIP-LLaVA towers without their projector, with a deformable term that takes every branch's grid at the first
  interaction for all interactions (:class:`TowerTwin`).

``full`` counts every multiply-add the real model executes on the real input shape with
:class:`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention kernels over padded windows,
merges, the feature pyramid of ``features_only`` models) and the deformable sampling of ``piip_models::msda``
(:func:`piip_models.kernels.msda_macs`: 5 MACs per sample and channel, with the real heads, levels and points).
Element-wise work (norms, activations, softmax, additions, resizing) is not counted. Both conventions report MACs.

Counting runs one forward: build the model on ``device="meta"`` to count anything, even 6B-parameter models, without
computing and without memory (:func:`count_model` does; a few seconds per model, mostly spent building it).

Counting never changes the model it is given: the forward runs on a private copy of its modules that shares the
parameters (read only) but has its own buffers, windows and hooks, so a model may serve inference in other threads
while it is counted, and several threads may count one model at once.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers.attention import Attention
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from .kernels import msda_macs
from .layers.heads import LinearHead
from .layers.msdeform_attn import MSDeformAttn
from .layers.window_attention import WindowRelPosAttention
from .piip import PIIP
from .piip_llava import PIIPLlava

__all__ = [
    "CONVENTIONS",
    "BackboneTwin",
    "TowerTwin",
    "MANUAL_RULES",
    "PAPER_RULES",
    "Count",
    "build_model",
    "count_flops",
    "count_model",
    "count_params",
    "create",
    "default_input_size",
    "paper_twin",
]

Convention = Literal["paper", "full"]
CONVENTIONS: tuple[str, ...] = ("paper", "full")

# ----------------------------------------------------------------------------------------------------------------------
# Paper convention: module rules (mmcv semantics) and manual terms


def _linear(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> int:
    return inputs[0].numel() * module.out_features


def _linear_head(module: LinearHead, inputs: tuple, output: torch.Tensor) -> int:
    # the head's classifier is a linear layer over the pooled features (no bias term, as nn.Linear above)
    return 0 if module.weight is None else output.numel() * module.in_features


def _conv(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> int:
    per_output = math.prod(module.kernel_size) * module.in_channels // module.groups
    return output.numel() * (per_output + (module.bias is not None))


def _deconv(module: nn.ConvTranspose2d, inputs: tuple, output: torch.Tensor) -> int:
    x = inputs[0]
    positions = x.shape[0] * math.prod(x.shape[2:])
    macs = positions * math.prod(module.kernel_size) * module.in_channels * module.out_channels // module.groups
    return macs + (output.numel() if module.bias is not None else 0)


def _norm(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    affine = getattr(module, "affine", False) or getattr(module, "elementwise_affine", False)
    return inputs[0].numel() * (2 if affine else 1)


def _elementwise(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    return inputs[0].numel()


def _upsample(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    return output.numel()


ModuleRule = Callable[[nn.Module, tuple, Any], int]

# Type-exact, as mmcv matches them. timm's LayerNorm stands in for the official models' nn.LayerNorm, so it counts;
# subclasses and other norms (RMSNorm) do not. A LinearHead counts as the official nn.Linear classifier it holds.
PAPER_RULES: dict[type[nn.Module], ModuleRule] = {
    nn.Linear: _linear,
    LinearHead: _linear_head,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.ConvTranspose2d: _deconv,
    nn.LayerNorm: _norm,
    TimmLayerNorm: _norm,
    nn.GroupNorm: _norm,
    nn.BatchNorm1d: _norm,
    nn.BatchNorm2d: _norm,
    nn.InstanceNorm2d: _norm,
    nn.ReLU: _elementwise,
    nn.ReLU6: _elementwise,
    nn.PReLU: _elementwise,
    nn.ELU: _elementwise,
    nn.LeakyReLU: _elementwise,
    nn.MaxPool2d: _elementwise,
    nn.AvgPool2d: _elementwise,
    nn.AdaptiveAvgPool2d: _elementwise,
    nn.AdaptiveMaxPool2d: _elementwise,
    nn.Upsample: _upsample,
}


@dataclass(frozen=True)
class AttentionLayout:
    """What the manual attention term needs to know about one attention layer."""

    window: int = 0  # 0: global
    prefix_tokens: int = 0  # class/register tokens in the sequence, left out of the term
    queries: int = 0  # deformable queries the term assumes per image; 0: the actual ones


def _self_attention(module: nn.Module, inputs: tuple, output: Any, layout: AttentionLayout) -> int:
    batch, tokens, dim = inputs[0].shape
    patches = tokens - layout.prefix_tokens
    keys = layout.window**2 if layout.window else patches
    return batch * 2 * patches * keys * dim


def _deformable(module: MSDeformAttn, inputs: tuple, output: Any, layout: AttentionLayout) -> int:
    batch, queries, _ = inputs[0].shape
    return batch * 5 * (layout.queries or queries) * module.n_points * module.d_model


ManualRule = Callable[[nn.Module, tuple, Any, AttentionLayout], int]

# Terms the official scripts add by hand, from their configs, for every attention layer whose work the hooks do not
# see; matched by isinstance, so attention variants (InternViT-6B, windowed BEiT) get the same term.
MANUAL_RULES: dict[type[nn.Module], ManualRule] = {
    Attention: _self_attention,
    MSDeformAttn: _deformable,
}


def _attention_layouts(model: nn.Module) -> dict[nn.Module, AttentionLayout]:
    """Window and prefix-token count of every attention layer of the timm ViTs (PIIP branches included) in ``model``,
    and the layouts a twin sets itself (``model.attention_layouts``)."""
    layouts: dict[nn.Module, AttentionLayout] = {}
    for module in model.modules():
        if isinstance(module, VisionTransformer):
            for block in module.blocks:
                layouts[block.attn] = AttentionLayout(0, module.num_prefix_tokens)
    for piip in _piip_modules(model):
        for branch, windows in zip(piip.branches, piip.windows):
            if not isinstance(branch, VisionTransformer):
                continue
            for block, window in zip(branch.blocks, windows):
                layouts[block.attn] = AttentionLayout(window, branch.num_prefix_tokens)
    layouts.update(getattr(model, "attention_layouts", {}))
    return layouts


def _piip_modules(model: nn.Module) -> list[PIIP]:
    return [m for m in model.modules() if isinstance(m, PIIP)]


def _global_windows(piip: PIIP) -> tuple[tuple[int, ...], ...]:
    """Global attention for every unit whose attention is defined globally (relative-position windows keep theirs)."""
    return tuple(
        tuple(
            window if isinstance(branch, VisionTransformer) and isinstance(branch.blocks[unit].attn,
                                                                           WindowRelPosAttention) else 0
            for unit, window in enumerate(windows)
        )
        for branch, windows in zip(piip.branches, piip.windows)
    )


@contextlib.contextmanager
def _global_attention(model: nn.Module) -> Iterator[None]:
    """Runs every PIIP block with global attention, so Linear layers see the unpadded tokens; restores the windows.

    Relative-position (BEiT) windows, which exist on one window only, keep them: their layers are counted as they run,
    padding included (no official count exists for that family).
    """
    saved = [(piip, piip.windows) for piip in _piip_modules(model)]
    try:
        for piip, _ in saved:
            piip.set_windows(_global_windows(piip))
        yield
    finally:
        for piip, windows in saved:
            piip.set_windows(windows)


def _convnext_norms(model: nn.Module) -> set[nn.Module]:
    """LayerNorms inside ConvNeXts: the official branches are Hugging Face ConvNeXts (``ConvNextLayerNorm``) or timm
    ConvNeXts (timm's ``LayerNorm`` subclass), neither in mmcv's type-exact table, so they count 0."""
    return {
        norm
        for convnext in model.modules() if isinstance(convnext, ConvNeXt)
        for norm in convnext.modules() if isinstance(norm, nn.LayerNorm)
    }


def _hooked_macs(model: nn.Module, x: torch.Tensor, rule_of: Callable[[nn.Module], ModuleRule | None],
                 global_attention: bool) -> int:
    """Sum of ``rule_of(module)`` over one forward (no grad); every block global when ``global_attention``."""
    total = 0

    def add(count: int) -> None:
        nonlocal total
        total += count

    handles = []
    for module in model.modules():
        rule = rule_of(module)
        if rule is not None:
            handles.append(module.register_forward_hook(lambda m, i, o, rule=rule: add(rule(m, i, o))))
    try:
        with _global_attention(model) if global_attention else contextlib.nullcontext(), torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


def _paper_macs(model: nn.Module, x: torch.Tensor) -> int:
    layouts = _attention_layouts(model)
    uncounted = _convnext_norms(model)

    def module_rule(module: nn.Module) -> ModuleRule | None:
        return None if module in uncounted else PAPER_RULES.get(type(module))

    def manual_rule(module: nn.Module) -> ModuleRule | None:
        manual = next((rule for kind, rule in MANUAL_RULES.items() if isinstance(module, kind)), None)
        return None if manual is None else functools.partial(manual, layout=layouts.get(module, AttentionLayout()))

    if getattr(model, "windows_as_run", False):
        # The modules see the backbone as it runs (qkv over zero-padded windows); the manual terms are by configuration.
        return _hooked_macs(model, x, module_rule, global_attention=False) + _hooked_macs(
            model, x, manual_rule, global_attention=True
        )
    return _hooked_macs(model, x, lambda module: module_rule(module) or manual_rule(module), global_attention=True)


@register_flop_formula(torch.ops.piip_models.msda)
def _msda_flops(value_shape, spatial_shapes, sampling_locations_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode counts a multiply-add as 2 FLOPs
    return 2 * msda_macs(value_shape, sampling_locations_shape)


# scaled_dot_product_attention runs this kernel on the CPU, and torch (2.14) has no flop formula for it: without one,
# the full convention would miss every attention matmul of a CPU count (meta tensors take another kernel). It takes
# query, key and value first, like the flash kernel, whose registered (already shape-wrapped) formula it shares.
if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)(
        flop_registry[torch.ops.aten._scaled_dot_product_flash_attention]
    )


def _full_macs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2  # FlopCounterMode counts a multiply-add as 2 FLOPs


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def count_params(model: nn.Module, convention: Convention = "paper") -> int:
    """Parameters of ``model``: trainable ones (``paper``, mmcv's rule) or all of them (``full``)."""
    _check_convention(convention)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or convention == "full")


def default_input_size(model: nn.Module) -> int:
    """Side of the square input the paper convention uses: the last branch's size (else the model's input size)."""
    piips = _piip_modules(model)
    if piips:
        return piips[0].branch_sizes[-1]
    return model.pretrained_cfg["input_size"][-1]


def _private_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters (no weight is copied; a no-grad forward only reads
    them) and owns everything a count changes: windows, hooks, and buffers (which a forward may update)."""
    shared = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo=shared)


def count_flops(
    model: nn.Module,
    input_size: int | tuple[int, int] | None = None,
    convention: Convention = "paper",
    batch_size: int = 1,
) -> int:
    """Multiply-accumulates per image of one forward of ``model``.

    Args:
        model: Any model; build it on ``device="meta"`` to count without computing. Its parameters' device and
            dtype are used for the input.
        input_size: Square side or ``(H, W)``; :func:`default_input_size` when None.
        convention: ``'paper'`` (official mmcv hooks and manual terms) or ``'full'`` (every executed multiply-add,
            ``torch.utils.flop_counter`` with the MSDA formula).
        batch_size: Images per forward; the count is divided by it.

    Returns:
        MACs per image.
    """
    _check_convention(convention)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    model = _private_copy(model)  # the count switches windows and installs hooks; the caller's model stays as it is
    size = input_size if input_size is not None else default_input_size(model)
    height, width = (size, size) if isinstance(size, int) else size
    param = next(model.parameters())
    channels = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3,))[0]
    x = torch.zeros(batch_size, channels, height, width, device=param.device, dtype=param.dtype)
    if convention == "paper":
        return _paper_macs(model, x) // batch_size
    return _full_macs(model, x) // batch_size


# ----------------------------------------------------------------------------------------------------------------------
# The models the official numbers were computed with


def _classification_twin(model: nn.Module) -> nn.Module:
    """The classification re-build of a dense PIIP (official ``convert_mmdet_config``); classifiers as they are."""
    if not isinstance(model, PIIP) or model.head_type == "separate":
        return model
    branches = tuple(replace(cfg, pos_embed_size=None) for cfg in model.branch_cfgs)
    return PIIP(
        branches,
        model.interaction_cfg,
        num_classes=1000,
        in_chans=model.in_chans,
        global_pool="avg",
        head_type="merged",
        class_token=False,
        branch_sizes=model.branch_sizes,
        device="meta",
    )


class BackboneTwin(nn.Module):
    """A regular-pyramid detection backbone as the official ``get_flops_det.py`` counts it (``cal_flops=True``): the
    pyramid up to the branch merges of every tapped stage, without the pyramid levels, on the windows it runs with.

    The ConvNeXt/ViT combinations and the ConvNeXt-B baseline were counted this way: the classification re-build
    cannot merge branches whose width changes between stages.
    """

    windows_as_run = True

    def __init__(self, backbone: PIIP) -> None:
        super().__init__()
        if backbone.head_type != "dense" or not backbone.pyramid_stages or backbone.fpn is not None:
            raise ValueError("BackboneTwin needs a regular-pyramid dense PIIP (merge_stages) built without with_fpn")
        self.backbone = backbone
        self.pretrained_cfg = backbone.pretrained_cfg

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.forward_intermediates(x, intermediates_only=True)


def _tower_twin(model: nn.Module) -> nn.Module:
    if not isinstance(model, PIIPLlava):
        model = create(_architecture(model))
    # a fresh tower without the projector: the official count covers the vision tower alone
    tower = PIIPLlava(
        model.branch_cfgs, model.interaction_cfg, llm_dim=model.llm_dim, branch_sizes=model.branch_sizes, device="meta"
    )
    tower.projector = nn.Identity()
    twin = TowerTwin(tower)
    twin.pretrained_cfg = model.pretrained_cfg
    return twin


def _backbone_twin(model: nn.Module) -> nn.Module:
    backbone = model if isinstance(model, PIIP) and model.fpn is None else create(_architecture(model))
    return BackboneTwin(backbone)


class TowerTwin(nn.Module):
    """A PIIP-LLaVA vision tower as the official ``get_flops_llava.py`` counts it: the branches and interactions
    without the projector, and a deformable term that assumes every branch's grid at the first interaction in every
    interaction (the official mixed CLIP/ConvNeXt model hands the first unit's downsample ratio to all of them).

    Class tokens count in the Linear and LayerNorm hooks but not in the attention term, as everywhere (the CLIP
    patch embedding has no bias to count).
    """

    def __init__(self, tower: PIIP) -> None:
        super().__init__()
        self.tower = tower
        first_grids = [(size // stride) ** 2 for size, stride in zip(tower.branch_sizes, tower.stage_strides[0])]
        # a plain dict, not registered: keys are the tower's own modules
        self.attention_layouts = {
            injector.attn: AttentionLayout(queries=first_grids[k])
            for block in tower.interactions
            for u, unit in enumerate(block.units)
            for k, injector in ((u, unit.branch2to1_injector), (u + 1, unit.branch1to2_injector))
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower.forward_features(x)


TwinBuilder = Callable[[nn.Module], nn.Module]

# fnmatch pattern of architecture names -> builder of the paper-convention twin from the registered model (on meta);
# the first match wins.
TWIN_BUILDERS: list[tuple[str, TwinBuilder]] = [
    ("piip_[cv]t_[cv]s_[cv]b_*", _backbone_twin),
    ("piip_baseline_convnext_*", _backbone_twin),
    ("piip_llava_*", _tower_twin),
    ("*", _classification_twin),
]


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture", "") or ""


def create(model_name: str, device: torch.device | str = "meta", **kwargs: Any) -> nn.Module:
    """``timm.create_model`` without pretrained weights; timm baselines that support it (ViTs) take any input size
    (``dynamic_img_size=True``), as PIIP models do."""
    if not fnmatch.fnmatch(model_name, "piip_*"):
        try:
            return timm.create_model(model_name, pretrained=False, device=device, dynamic_img_size=True, **kwargs)
        except TypeError:
            pass
    return timm.create_model(model_name, pretrained=False, device=device, **kwargs)


def paper_twin(model: str | nn.Module) -> nn.Module:
    """The model the official #Param/#FLOPs were counted with, on the meta device.

    Classification models are themselves; dense PIIP backbones become the classification re-build (position
    embeddings at the real grid, no class token, GroupNorm/Linear merges, LayerNorm, token mean, 1000-way head).

    Args:
        model: A registered model name, or a model built from one (its ``pretrained_cfg`` names the architecture).
    """
    if isinstance(model, str):
        model = create(model)
    name = _architecture(model)
    builder = next(build for pattern, build in TWIN_BUILDERS if fnmatch.fnmatch(name, pattern))
    return builder(model).eval()


def build_model(model_name: str, device: torch.device | str = "meta") -> nn.Module:
    """The registered model as it runs (random weights, eval mode): dense backbones with their feature pyramid
    (``features_only=True``), classifiers as they are."""
    model = create(model_name, device)
    if isinstance(model, PIIP) and model.head_type == "dense":
        model = create(model_name, device, features_only=True)
    return model.eval()


@dataclass(frozen=True)
class Count:
    """Parameters and multiply-accumulates (per image) of one model in one convention."""

    model: str
    convention: str
    input_size: tuple[int, int]
    params: int
    macs: int


@functools.lru_cache(maxsize=16)
def _meta_model(model_name: str, convention: str) -> nn.Module:
    # Meta models hold no data, and counting works on a private copy, so one build serves every input size.
    return paper_twin(model_name) if convention == "paper" else build_model(model_name)


def count_model(
    model: str | nn.Module, convention: Convention = "paper", input_size: int | tuple[int, int] | None = None
) -> Count:
    """Counts a registered model without computing: its :func:`paper_twin` for ``paper``, the model as it runs
    (:func:`build_model`: dense backbones with their feature pyramid) for ``full``.

    Args:
        model: A timm model name (``piip_*`` or a timm baseline), or a model (counted as it is for ``full``).
        convention: ``'paper'`` or ``'full'``.
        input_size: Square side or ``(H, W)``; the last branch's size (the model's input size) when None.
    """
    _check_convention(convention)
    if isinstance(model, str):
        name, counted = model, _meta_model(model, convention)
    else:
        name, counted = _architecture(model), paper_twin(model) if convention == "paper" else model
    size = input_size if input_size is not None else default_input_size(counted)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return Count(name, convention, size, count_params(counted, convention), count_flops(counted, size, convention))
