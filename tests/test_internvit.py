"""InternViT-6B branch and the PIIP-H6B / LH6B backbones.

No official fixture covers an InternViT-6B (RMSNorm, qk-norm) branch (fixtures README, section 7), so the block is
checked against a direct restatement of the official formulas; the 6-7 B parameter models are checked on the meta
device (parameter counts against the official numbers, segments, pyramid shapes) and through small real configs that
run the same code.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN
from timm.layers import GELUTanh, resample_abs_pos_embed

import piip_models
from piip_models import PIIP, BranchCfg, InteractionCfg, even_segments
from piip_models.layers.qk_norm_attention import FullWidthQkNormAttention
from piip_models.layers.rms_norm import MultiHeadRmsNorm, RmsNorm
from piip_models.layers.window_attention import block_forward
from piip_models.official import build_from_official
from piip_models.piip_h6b import h6b_branches, lh6b_branches
from piip_models.weights import checkpoint_filter_fn

from .test_pretrained import run_offline, seed_hub, torch_bytes

H6B_DET = ["piip_h6b_1024_512", "piip_h6b_1024_512_speedup", "piip_h6b_1024_768_dino"]
H6B_SEG = ["piip_h6b_512_192", "piip_h6b_512_256", "piip_h6b_512_384", "piip_h6b_512_512"]
LH6B = ["piip_lh6b_1536_1024_512", "piip_lh6b_1536_1024_512_dino"]
ALL_6B = H6B_DET + H6B_SEG + LH6B + ["piip_baseline_internvit_6b_1024", "piip_baseline_internvit_6b_512"]
NO_PROJ_NO_NORM = InteractionCfg(with_proj=False, with_norm=False)
D6B, DH, DL = 3200, 1280, 1024


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomise(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma") or "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    return module


def _tiny_internvit(**kwargs) -> nn.Module:
    return timm.create_model("internvit_6b_patch14_224", embed_dim=64, depth=2, num_heads=4, **kwargs)


# ---------------------------------------------------------------------------------------------------- the block


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    return weight * normed.to(x.dtype)


def _official_block(block: nn.Module, x: torch.Tensor, full_width_qk_norm: bool = True) -> torch.Tensor:
    """The official InternViT-6B block (det ``internvit_6b.py`` Block/Attention, naive path), restated."""
    attn = block.attn
    batch, tokens, dim = x.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    q, k, v = F.linear(_rms(x, block.norm1.weight), attn.qkv.weight).view(batch, tokens, 3, heads, head_dim).unbind(2)
    if full_width_qk_norm:
        q = _rms(q.flatten(2), attn.q_norm.weight).view(batch, tokens, heads, head_dim)
        k = _rms(k.flatten(2), attn.k_norm.weight).view(batch, tokens, heads, head_dim)
    else:  # what a per-head qk-norm would compute, for contrast
        q = _rms(q, attn.q_norm.weight.view(heads, head_dim))
        k = _rms(k, attn.k_norm.weight.view(heads, head_dim))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    weights = ((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(-1)
    out = F.linear((weights @ v).transpose(1, 2).reshape(batch, tokens, dim), attn.proj.weight, attn.proj.bias)
    x = x + block.ls1.gamma * out
    hidden = F.gelu(F.linear(_rms(x, block.norm2.weight), block.mlp.fc1.weight, block.mlp.fc1.bias))
    return x + block.ls2.gamma * F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias)


def test_block_matches_official_formulas():
    block = _randomise(_tiny_internvit().blocks[0]).eval()
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        out = block(x)
        torch.testing.assert_close(out, _official_block(block, x), rtol=1e-5, atol=1e-5)
        # the normalisation spans all heads: a per-head RMSNorm gives something else
        assert (out - _official_block(block, x, full_width_qk_norm=False)).abs().max() > 1e-2


def test_full_size_block_matches_official_formulas(one_thread):
    """One real InternViT-6B block (width 3200, 25 heads of 128): 123 M parameters, 0.5 GB."""
    block = _randomise(timm.create_model("internvit_6b_patch14_224", depth=1).blocks[0]).eval()
    x = torch.randn(1, 6, D6B)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _official_block(block, x), rtol=1e-4, atol=1e-4)


def test_internvit_layout_and_init():
    model = _tiny_internvit()
    block = model.blocks[0]
    assert isinstance(block.norm1, RmsNorm) and isinstance(block.attn, FullWidthQkNormAttention)
    assert isinstance(block.attn.q_norm, MultiHeadRmsNorm) and block.attn.q_norm.weight.shape == (64,)
    assert block.attn.qkv.bias is None and block.attn.proj.bias is not None
    assert torch.equal(block.ls1.gamma, torch.full((64,), 0.1)) and torch.equal(block.ls2.gamma, block.ls1.gamma)
    assert model.pos_embed.shape == (1, 16 * 16 + 1, 64) and model.cls_token is not None  # 224 / 14, class slot
    assert isinstance(model.norm, nn.Identity)
    assert {k for k in model.state_dict() if k.startswith("blocks.0.")} == {
        f"blocks.0.{k}" for k in ("norm1.weight", "attn.qkv.weight", "attn.q_norm.weight", "attn.k_norm.weight",
                                  "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight",
                                  "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma")
    }


def test_internvit_6b_parameter_count_on_meta():
    model = timm.create_model("internvit_6b_patch14_224", device="meta")
    assert n_params(model.blocks[0]) == 12 * D6B**2 + 12 * D6B == 122_918_400  # reference section 9.1
    patch, pos_and_cls = 3 * 14 * 14 * D6B + D6B, (257 + 1) * D6B
    assert n_params(model) == 48 * 122_918_400 + patch + pos_and_cls == 5_902_793_600


def test_rms_norm_normalises_in_fp32_and_casts_before_the_weight():
    norm = RmsNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 64).bfloat16()
    expected = norm.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("padding", ["before_qkv", "after_qkv"])
def test_windowed_attention_runs_the_full_width_qk_norm(padding):
    """PIIP's windowed attention calls q_norm on per-head tensors; a window covering the grid is global attention."""
    block = _randomise(_tiny_internvit().blocks[0]).eval()
    x = torch.randn(1, 5 * 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(block_forward(block, x, (5, 5), 5, padding), block(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- small H6B-style pyramids


def _tiny(branches: tuple[BranchCfg, ...], depths: tuple[int, ...], dims: tuple[int, ...]) -> tuple[BranchCfg, ...]:
    """The registered branch configs with small widths/depths (same classes, norms, drop path, pos-embed grid)."""
    return tuple(
        replace(b, segments=even_segments(depth, 2),
                model_args=dict(b.model_args, embed_dim=dim, depth=depth, num_heads=2))
        for b, depth, dim in zip(branches, depths, dims)
    )


@pytest.mark.parametrize("interaction", [InteractionCfg(), NO_PROJ_NO_NORM], ids=["proj", "speedup"])
def test_small_h6b_forward_backward_cpu(interaction, one_thread):
    branches = _tiny(h6b_branches((64, 128), fused_mlp=not interaction.with_proj), (4, 3), (64, 32))
    model = PIIP(branches=branches, interaction=interaction, head_type="dense", class_token=False, num_classes=0,
                 with_fpn=True)
    x = torch.randn(2, 3, 96, 160)
    maps = model.forward_intermediates(x, intermediates_only=True)
    assert [m.shape for m in maps] == [(2, 64, 96 // s, 160 // s) for s in (4, 8, 16, 32)]
    sum(m.mean() for m in maps).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.isfinite(m).all() for m in maps)


def test_small_lh6b_forward_backward_cpu(one_thread):
    branches = _tiny(lh6b_branches((48, 96, 144)), (4, 4, 2), (96, 64, 32))
    model = PIIP(branches=branches, interaction=NO_PROJ_NO_NORM, head_type="dense", class_token=False,
                 num_classes=0, with_fpn=True, fpn_levels=(1, 2, 3))
    maps = model.forward_intermediates(torch.randn(1, 3, 144, 96), intermediates_only=True)
    assert [m.shape[-2:] for m in maps] == [(18, 12), (9, 6), (4, 3)]
    sum(m.mean() for m in maps).backward()
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------------- registered models (meta device)

# Official segments (mmdetection/configs/piip/2branch/*h6b*.py, 3branch/*lh6b*.py, mmsegmentation h6b configs).
H6B_SEGMENTS = (
    tuple((4 * i, 4 * i + 3) for i in range(12)),
    ((0, 1), (2, 3), (4, 5), (6, 7), (8, 10), (11, 13), (14, 16), (17, 19), (20, 22), (23, 25), (26, 28), (29, 31)),
)
LH6B_SEGMENTS = (
    ((0, 11), (12, 23), (24, 35), (36, 47)),
    ((0, 7), (8, 15), (16, 23), (24, 31)),
    ((0, 5), (6, 11), (12, 17), (18, 23)),
)


@pytest.mark.parametrize("name", ALL_6B)
def test_configuration_on_meta(name):
    model = piip_models.create_model(name, device="meta")
    b6 = model.branches[0]
    fused = name.startswith(("piip_h6b_512", "piip_lh6b")) or name.endswith("speedup")
    assert all(w == 0 for ws in model.windows for w in ws)  # InternViT experiments use global attention only
    assert b6.embed_dim == D6B and b6.patch_embed.patch_size == (16, 16) and b6.cls_token is None
    if name.startswith("piip_baseline"):
        assert model.segments == (even_segments(48, 4),)
        return
    assert model.segments == (LH6B_SEGMENTS if name.startswith("piip_lh6b") else H6B_SEGMENTS)
    mae = model.branches[1]
    assert mae.embed_dim == DH and mae.patch_embed.patch_size == (16, 16)
    # position embeddings: det at the 224 pretraining grid (14 x 14), seg at each branch grid; no class slot
    seg = name.startswith("piip_h6b_512")
    assert b6.pos_embed.shape[1] == (model.branch_sizes[0] // 16 if seg else 14) ** 2
    assert mae.pos_embed.shape[1] == (32 if seg else 14) ** 2
    assert isinstance(mae.blocks[0].norm1, nn.LayerNorm) and mae.blocks[0].attn.qkv.bias is not None
    for branch in model.branches:  # the official fused MLP computes a tanh-approximate GELU
        assert type(branch.blocks[0].mlp.act) is (GELUTanh if fused else nn.GELU)
    # linear drop path 0 -> 0.4 over the InternViT-6B and ViT-H blocks (det/seg InternViT6B class)
    for branch in model.branches[:2]:
        rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in branch.blocks]
        assert rates[0] == 0 and rates[-1] == pytest.approx(0.4) and rates == sorted(rates)
    if name.startswith("piip_lh6b"):  # DeiT III-L (384): constant drop path, 24 x 24 position grid
        deit3 = model.branches[2]
        assert {b.drop_path1.drop_prob for b in deit3.blocks} == {0.4} and deit3.pos_embed.shape == (1, 576, DL)
    # projections and interaction norms only in the plain H6B detection configs
    unit = model.interactions[0].units[0]
    assert isinstance(unit.branch2to1_proj, nn.Identity) == fused
    assert isinstance(unit.branch2to1_injector.query_norm, nn.Identity) == fused


def _official_6b(real_size: int, segments, **extra) -> dict:
    """An official InternViT-6B branch dict (mmdetection/configs/piip/*/..._internvit_*h6b_*.py)."""
    return dict(real_size=real_size, pretrain_img_size=224, patch_size=16, pretrain_patch_size=14, depth=48,
                embed_dim=D6B, num_heads=25, mlp_ratio=4, qkv_bias=False, init_values=0.1, qk_normalization=True,
                drop_path_rate=0.4, interaction_indexes=[list(s) for s in segments],
                pretrained="pretrained/intern_vit_6b_224px.pth", norm_layer_type="RMSNorm", **extra)


def _official_mae_h(real_size: int, segments, **extra) -> dict:
    return dict(real_size=real_size, pretrain_img_size=224, patch_size=16, pretrain_patch_size=14, depth=32,
                embed_dim=DH, num_heads=16, mlp_ratio=4, qkv_bias=True, init_values=1.0, qk_normalization=False,
                drop_path_rate=0.4, interaction_indexes=[list(s) for s in segments],
                pretrained="pretrained/mae_pretrain_vit_huge.pth", norm_layer_type="LayerNorm", **extra)


_INTERACTION = dict(n_points=4, deform_num_heads=16, cffn_ratio=0.25, deform_ratio=0.5, with_cffn=True,
                    interact_attn_type="deform", interaction_drop_path_rate=0.4)
_SPEEDUP = dict(interaction_proj=False, norm_layer="none")
_FUSED = dict(mlp_type="fused_mlp")
_DEIT3_L = dict(real_size=1536, pretrain_img_size=384, patch_size=16, pretrain_patch_size=16, depth=24, embed_dim=DL,
                num_heads=16, mlp_ratio=4, qkv_bias=True, drop_path_rate=0.4, init_scale=1,
                interaction_indexes=[list(s) for s in LH6B_SEGMENTS[2]],
                pretrained="./pretrained/deit_3_large_384_21k.pth", Mlp_block="fused_mlp")
OFFICIAL_CONFIGS = {
    "piip_h6b_1024_512": dict(
        _INTERACTION, branch1=_official_6b(512, H6B_SEGMENTS[0]), branch2=_official_mae_h(1024, H6B_SEGMENTS[1])),
    "piip_h6b_1024_512_speedup": dict(
        _INTERACTION, **_SPEEDUP, branch1=_official_6b(512, H6B_SEGMENTS[0], **_FUSED),
        branch2=_official_mae_h(1024, H6B_SEGMENTS[1], **_FUSED)),
    "piip_h6b_1024_768_dino": dict(
        _INTERACTION, is_dino=True, branch1=_official_6b(768, H6B_SEGMENTS[0]),
        branch2=_official_mae_h(1024, H6B_SEGMENTS[1])),
    "piip_lh6b_1536_1024_512": dict(
        _INTERACTION, **_SPEEDUP, branch1=_official_6b(512, LH6B_SEGMENTS[0], **_FUSED),
        branch2=_official_mae_h(1024, LH6B_SEGMENTS[1], **_FUSED), branch3=_DEIT3_L),
    "piip_lh6b_1536_1024_512_dino": dict(
        _INTERACTION, **_SPEEDUP, is_dino=True, branch1=_official_6b(512, LH6B_SEGMENTS[0], **_FUSED),
        branch2=_official_mae_h(1024, LH6B_SEGMENTS[1], **_FUSED), branch3=_DEIT3_L),
    # mmsegmentation/configs/piip/2branch/upernet_internvit_h6b_192_512_80k_ade20k_bs16_lr4e-5.py
    "piip_h6b_512_192": dict(
        _INTERACTION, **_SPEEDUP, branch1=_official_6b(192, H6B_SEGMENTS[0], img_size=192, **_FUSED),
        branch2=_official_mae_h(512, H6B_SEGMENTS[1], img_size=512, **_FUSED)),
}


def _structure(model: PIIP) -> tuple:
    acts = tuple(type(b.blocks[0].mlp.act) for b in model.branches)
    rates = tuple(tuple(getattr(blk.drop_path1, "drop_prob", 0.0) for blk in b.blocks) for b in model.branches)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return model.branch_sizes, model.segments, model.windows, acts, rates, shapes


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
def test_registered_model_equals_the_official_config(name):
    """The registered model and the translation of the official config (piip_models.official) build the same."""
    official = build_from_official(OFFICIAL_CONFIGS[name], device="meta")
    registered = timm.create_model(name, with_fpn=True, device="meta")
    assert _structure(registered) == _structure(official)


# Official mmdet module sizes (reference section 9.5): the official InternViT6B class keeps an unused class slot in
# every InternViT-type branch's position embedding; PIIP's dense branches have no class token and store no slot.
SLOTS_H6B = D6B + DH  # 4,480 (LH6B: the DeiT III-L branch has no slot officially either)


@pytest.mark.parametrize("name,official", [
    ("piip_h6b_1024_512", 7_293_644_290),
    ("piip_h6b_1024_512_speedup", 7_172_845_570),
    ("piip_h6b_1024_768_dino", 7_211_711_490),  # the 2-branch DINO class builds no stride-4 level either
])
def test_h6b_parameter_counts_match_official_modules(name, official):
    assert n_params(timm.create_model(name, with_fpn=True, device="meta")) == official - SLOTS_H6B


def _unit(d_a: int, d_b: int, proj: bool) -> int:
    """Closed form of one bidirectional unit (reference section 2.1): projections, two injectors."""
    def injector(d: int, d_feat: int) -> int:
        hidden, value = d // 4, d // 2
        norms = 2 * (d + d_feat + d) if proj else 0
        attn = (d * 128 + 128) + (d * 64 + 64) + (d_feat * value + value) + (value * d + d)
        ffn = (d * hidden + hidden) + 10 * hidden + (hidden * d + d)
        return norms + attn + 2 * d + ffn
    projections = 2 * d_a * d_b + d_a + d_b if proj else 0
    return projections + injector(d_a, d_a if proj else d_b) + injector(d_b, d_b if proj else d_a)


def _vit(dim: int, depth: int, tokens: int, block_extra: int) -> int:
    """Patch-16 embedding + position embedding of ``tokens`` + blocks of ``12 D^2 + block_extra * D``."""
    return 768 * dim + dim + tokens * dim + depth * (12 * dim * dim + block_extra * dim)


def _dense_head(dims: tuple[int, ...], levels: tuple[int, ...] = (0, 1, 2, 3)) -> int:
    d1 = dims[0]
    merges = sum(9 * d * d1 + 2 * d1 + 9 * d1 * d1 + 2 * d1 for d in dims) + len(dims)
    fpn = {0: 2 * (4 * d1 * d1 + d1) + 2 * d1, 1: 4 * d1 * d1 + d1, 2: 0, 3: 0}
    return merges + sum(fpn[level] for level in levels)


def test_closed_form_reproduces_the_official_h6b_module_size():
    """The closed forms used below give exactly the official H6B Mask R-CNN module size (with the class slots)."""
    h6b = _vit(D6B, 48, 197, 12) + _vit(DH, 32, 197, 15) + 12 * _unit(D6B, DH, True) + _dense_head((D6B, DH))
    assert h6b == 7_293_644_290


@pytest.mark.parametrize("name,size", list(zip(H6B_SEG, (192, 256, 384, 512))))
def test_segmentation_parameter_counts(name, size):
    """mmseg stores the position embeddings at the branch grids (+ class slot) and builds all four levels."""
    grid = (size // 16) ** 2
    official = _vit(D6B, 48, grid + 1, 12) + _vit(DH, 32, 32 * 32 + 1, 15) + 12 * _unit(D6B, DH, False) + _dense_head(
        (D6B, DH))
    assert n_params(timm.create_model(name, with_fpn=True, device="meta")) == official - SLOTS_H6B


@pytest.mark.parametrize("name,levels", [
    ("piip_lh6b_1536_1024_512", (0, 1, 2, 3)),
    ("piip_lh6b_1536_1024_512_dino", (1, 2, 3)),  # the official 3-branch DINO class also builds an unused fpn1
])
def test_lh6b_parameter_counts(name, levels):
    official = (_vit(D6B, 48, 197, 12) + _vit(DH, 32, 197, 15) + _vit(DL, 24, 24 * 24, 15)
                + 4 * (_unit(D6B, DH, False) + _unit(DH, DL, False)) + _dense_head((D6B, DH, DL), levels))
    assert n_params(timm.create_model(name, with_fpn=True, device="meta")) == official - SLOTS_H6B


def test_baseline_parameter_count():
    """The official InternViT6B detection baseline: pyramid (channel LayerNorm at stride 4) + class slot."""
    official = _vit(D6B, 48, 197, 12) + 2 * (4 * D6B * D6B + D6B) + 2 * D6B + (4 * D6B * D6B + D6B)
    model = timm.create_model("piip_baseline_internvit_6b_1024", with_fpn=True, device="meta")
    assert n_params(model) == official - D6B


def test_segmentation_baseline_is_the_512_encoder_with_fused_mlps():
    model = timm.create_model("piip_baseline_internvit_6b_512", device="meta", with_fpn=True)
    branch = model.branches[0]
    assert model.branch_sizes == (512,) and branch.pos_embed.shape == (1, 32 * 32, D6B)
    assert type(branch.blocks[0].mlp.act) is GELUTanh
    assert model.pretrained_cfg["mean"] == IMAGENET_DEFAULT_MEAN
    # the mmseg InternViT6B's simple pyramid (use_simple_fpn=True): all four levels from the last block, the
    # stride-4 level with the channels-first LayerNorm of the detection baseline
    detection = timm.create_model("piip_baseline_internvit_6b_1024", device="meta", with_fpn=True)
    assert [type(m) for m in model.fpn.p2] == [type(m) for m in detection.fpn.p2]
    assert model.segments == detection.segments and model.pyramid_stages == ()


def _readme_params(branches: tuple[BranchCfg, ...], interaction: InteractionCfg, slots: int) -> float:
    """README #Param convention (reference section 6): classification modules (GroupNorm/Linear merges, LayerNorm,
    1000-class head), position embeddings at each branch's real grid plus the official class slots; in M."""
    branches = tuple(replace(b, pos_embed_size=None) for b in branches)
    model = PIIP(branches=branches, interaction=interaction, head_type="merged", class_token=False,
                 num_classes=1000, device="meta")
    return round((n_params(model) + slots) / 1e6, 2)


def test_readme_parameter_convention():
    assert _readme_params(h6b_branches((512, 1024)), InteractionCfg(), SLOTS_H6B) == 6872.34
    assert _readme_params(h6b_branches((512, 1024), True), NO_PROJ_NO_NORM, SLOTS_H6B) == 6751.54
    seg = [_readme_params(h6b_branches((s, 512), True, None), NO_PROJ_NO_NORM, SLOTS_H6B) for s in (192, 256, 384, 512)]
    assert seg == [6744.80, 6745.15, 6746.18, 6747.61]
    baseline = h6b_branches((1024, 1024))[0]
    assert _readme_params((baseline,), InteractionCfg(), D6B) == 5918.86


@pytest.mark.parametrize("name", ["piip_h6b_1024_512", "piip_h6b_1024_768_dino", "piip_lh6b_1536_1024_512"])
def test_features_only_feature_info(name):
    model = timm.create_model(name, features_only=True, device="meta")
    dino = name.endswith("_dino")
    strides = [8, 16, 32] if dino else [4, 8, 16, 32]
    assert model.feature_info.channels() == [D6B] * len(strides) and model.feature_info.reduction() == strides
    assert model.feature_info.module_name() == [f"fpn.p{s.bit_length() - 1}" for s in strides]
    maps = model(torch.randn(1, 3, 640, 896, device="meta"))
    assert [m.shape for m in maps] == [(1, D6B, 640 // s, 896 // s) for s in strides]


def test_registry_and_tags():
    names = piip_models.list_models("piip_*6b*")
    assert sorted(names) == sorted(ALL_6B)
    # the released checkpoint is the default tag where one exists (tests/test_hub.py), the branch init stays available
    assert all(f"{n}.branches" in timm.list_models(n, include_tags=True) for n in names)
    without_release = set(LH6B)
    assert {n for n in names if timm.get_pretrained_cfg(n).tag == "branches"} == without_release
    internvit = timm.get_pretrained_cfg("internvit_6b_patch14_224.internvl")
    assert (internvit.hf_hub_id, internvit.hf_hub_filename) == ("OpenGVLab/InternVL", "intern_vit_6b_224px.pth")
    assert timm.get_pretrained_cfg("piip_h6b_512_192").mean == (0.485, 0.456, 0.406)  # mmseg ADE20K statistics
    assert timm.get_pretrained_cfg("piip_h6b_1024_768_dino").mean == (0.5, 0.5, 0.5)  # [-1, 1] as the det configs


# ------------------------------------------------------------------------------------------------ weights


_OFFICIAL_NAMES = (
    (re.compile(r"^branches\.(\d+)\."), lambda m: f"branch{int(m.group(1)) + 1}."),
    (re.compile(r"^interactions\.(\d+)\.units\.(\d+)\."),
     lambda m: f"interactions.{m.group(1)}.interaction_units_{int(m.group(2)) + 1}{int(m.group(2)) + 2}."),
    (re.compile(r"\.ffn\.dwconv\."), lambda m: ".ffn.dwconv.dwconv."),
    (re.compile(r"^merges\.(\d+)\."), lambda m: f"merge_branch{int(m.group(1)) + 1}."),
    (re.compile(r"^fpn\.p(\d)\."), lambda m: f"fpn{int(m.group(1)) - 1}."),
)


def test_official_h6b_checkpoint_layout_loads():
    """An official-layout PIIP-H6B state dict (``branch{k}.``, class slots, ``w{k}``) loads strictly into ours."""
    branches = _tiny(h6b_branches((64, 128)), (4, 3), (64, 32))
    model = _randomise(PIIP(branches=branches, head_type="dense", class_token=False, num_classes=0, with_fpn=True))
    official = {}
    for key, value in model.state_dict().items():
        if key == "branch_weights":
            official.update({f"backbone.w{k + 1}": w for k, w in enumerate(value)})
            continue
        if key.endswith("pos_embed"):
            value = torch.cat([torch.randn(1, 1, value.shape[-1]), value], dim=1)  # unused class slot
        for pattern, repl in _OFFICIAL_NAMES:
            key = pattern.sub(repl, key)
        official[f"backbone.{key}"] = value
    assert "backbone.branch1.blocks.0.attn.q_norm.weight" in official and "backbone.branch1.pos_embed" in official
    fresh = PIIP(branches=branches, head_type="dense", class_token=False, num_classes=0, with_fpn=True)
    fresh.load_state_dict(checkpoint_filter_fn(official, fresh), strict=True)
    for (name, expected), actual in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(actual, expected), name


def test_pretrained_internvit_branch_from_seeded_offline_cache(tmp_path):
    """``.branches`` loads the official ``intern_vit_6b_224px.pth`` layout through timm's Hub path (offline cache):
    patch-14 kernels resized to 16, the 16x16 (+class) grid resampled to the 14x14 detection grid, no class token."""
    source = {k: torch.randn_like(v) for k, v in _tiny_internvit().state_dict().items()}
    seed_hub(tmp_path / "hub", "OpenGVLab/InternVL", {"intern_vit_6b_224px.pth": torch_bytes(source)})
    torch.save(source, tmp_path / "source.pt")

    out = run_offline(tmp_path / "hub", f"""
        import torch, timm, piip_models
        import torch.nn.functional as F
        from timm.layers import GELUTanh, resample_abs_pos_embed
        from piip_models import BranchCfg, even_segments
        src = torch.load({str(tmp_path / "source.pt")!r})
        tiny = BranchCfg("internvit_6b_patch14_224.internvl", 1024, even_segments(2, 2), 0.4, "linear",
                         model_args=dict(patch_size=16, embed_dim=64, depth=2, num_heads=4), pos_embed_size=224)
        model = timm.create_model("piip_baseline_internvit_6b_1024.branches", pretrained=True, branches=(tiny,))
        branch = model.branches[0]
        assert torch.equal(branch.blocks[1].attn.q_norm.weight, src["blocks.1.attn.q_norm.weight"])
        assert torch.equal(branch.blocks[0].ls2.gamma, src["blocks.0.ls2.gamma"])
        kernel = F.interpolate(src["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False)
        assert torch.equal(branch.patch_embed.proj.weight, kernel)
        grid = resample_abs_pos_embed(src["pos_embed"][:, 1:], (14, 14), (16, 16), num_prefix_tokens=0,
                                      antialias=False)
        assert torch.equal(branch.pos_embed, grid) and branch.cls_token is None
        print("ok")
    """)
    assert out.startswith("ok")


def test_branch_filter_drops_the_class_token_of_headless_checkpoints():
    """MAE/DINOv2/InternViT checkpoints have no head, so timm loads them strictly; the dense branch has no cls_token."""
    from timm.models import load_pretrained

    from piip_models.weights import branch_checkpoint_filter_fn

    branch = timm.create_model("vit_huge_patch14_224.mae", embed_dim=64, depth=2, num_heads=2, patch_size=16,
                               class_token=False, num_classes=0, global_pool="", final_norm=False,
                               dynamic_img_size=True, init_values=1.0)
    source = timm.create_model("vit_huge_patch14_224", embed_dim=64, depth=2, num_heads=2).state_dict()
    assert "cls_token" in source and branch.pretrained_cfg["num_classes"] == 0
    load_pretrained(branch, pretrained_cfg=dict(branch.pretrained_cfg, state_dict=source), num_classes=0,
                    filter_fn=branch_checkpoint_filter_fn)
    torch.testing.assert_close(branch.blocks[1].mlp.fc2.weight, source["blocks.1.mlp.fc2.weight"])
    expected = resample_abs_pos_embed(source["pos_embed"][:, 1:], (14, 14), (16, 16), num_prefix_tokens=0,
                                      antialias=False)
    torch.testing.assert_close(branch.pos_embed, expected)
