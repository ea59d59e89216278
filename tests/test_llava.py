"""PIIP-LLaVA towers: CLIP branches, the two-branch projector and the nine released configurations."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import piip_models
from piip_models import BranchCfg, InteractionCfg, PIIPLlava, even_segments
from piip_models.layers.projector import BranchMLPProjector

# Released configuration -> (registered tower, extra kwargs, image size, visual tokens, LLM width, interactions).
RELEASED = {
    "PIIP-LLaVA_CLIP-BL_512-256_7B": ("piip_llava_clip_bl_512_256", {}, 512, 1024, 4096, 2),
    "PIIP-LLaVA_CLIP-BL_512-448_7B": ("piip_llava_clip_bl_512_448", {}, 512, 1024, 4096, 12),
    "PIIP-LLaVA_CLIP-BL_512-448_13B": ("piip_llava_clip_bl_512_448", {"llm_dim": 5120}, 512, 1024, 5120, 12),
    "PIIP-LLaVA_ConvNeXt-B_CLIP-L_640-224_7B": ("piip_llava_convnext_b_clip_l_640_224", {}, 640, 400, 4096, 2),
    "PIIP-LLaVA_ConvNeXt-B_CLIP-L_1024-336_7B": ("piip_llava_convnext_b_clip_l_1024_336", {}, 1024, 1024, 4096, 12),
    "PIIP-LLaVA_ConvNeXt-B_CLIP-L_1024-336_13B": (
        "piip_llava_convnext_b_clip_l_1024_336_13b", {}, 1024, 1024, 5120, 24),
    "PIIP-LLaVA_ConvNeXt-L_CLIP-L_1024-336_7B": ("piip_llava_convnext_l_clip_l_1024_336", {}, 1024, 1024, 4096, 12),
    "PIIP-LLaVA-Plus_ConvNeXt-L_CLIP-L_1024-336_7B": (
        "piip_llava_convnext_l_clip_l_1024_336", {}, 1024, 1024, 4096, 12),
    "PIIP-LLaVA_ConvNeXt-L_CLIP-L_1024-336_13B": (
        "piip_llava_convnext_l_clip_l_1024_336_13b", {}, 1024, 1024, 5120, 24),
}
# Official interaction_indexes of the 13B ConvNeXt branch (llava/configs/piip-llava_convnext-b_clip-l_1024-336_13B.py).
SEGMENTS_13B = [[0, 1], [2, 2], [3, 4], [5, 6], [7, 9], [10, 10], [11, 12], [13, 13], [14, 15], [16, 16], [17, 18],
                [19, 19], [20, 21], [22, 22], [23, 24], [25, 25], [26, 27], [28, 28], [29, 30], [31, 31], [32, 33],
                [34, 34], [35, 36], [37, 38]]


@pytest.mark.parametrize("release", sorted(RELEASED))
def test_released_configurations_give_llm_tokens(release):
    name, kwargs, size, tokens, width, interactions = RELEASED[release]
    model = timm.create_model(name, device="meta", **kwargs)
    assert model.pretrained_cfg["input_size"] == (3, size, size)
    out = model(torch.randn(2, 3, size, size, device="meta"))
    assert out.shape == (2, tokens, width)
    assert model.forward_multimodal(torch.randn(1, 3, size, size, device="meta")).shape == (1, tokens, width)
    # branch 0 is CLIP-L resampled to patch 16, branch 1 the larger-image CLIP-B/16 or ConvNeXt
    assert model.embed_dims[0] == 1024 and model.branches[0].patch_embed.patch_size == (16, 16)
    assert len(model.interactions) == interactions


def test_13b_convnext_segments_are_the_official_ones():
    model = timm.create_model("piip_llava_convnext_l_clip_l_1024_336_13b", device="meta")
    assert [list(s) for s in model.segments[1]] == SEGMENTS_13B
    assert model.segments[0] == even_segments(24, 24)


def _tiny_clip(img_size: int, pos_size: int, dim: int) -> BranchCfg:
    args = dict(embed_dim=dim, depth=2, num_heads=2, patch_size=16)
    return BranchCfg("vit_base_patch16_clip_quickgelu_224", img_size, even_segments(2, 2), model_args=args,
                     pos_embed_size=pos_size, class_pos_embed=True)


def _tiny_tower(**kwargs) -> PIIPLlava:
    convnext = BranchCfg("convnext_atto", 96, ((0, 3), (4, 7)),
                         model_args=dict(depths=(2, 1, 1, 1), dims=(32, 64, 96, 128), ls_init_value=0.5))
    return PIIPLlava(branches=(_tiny_clip(48, 48, 64), convnext), interaction=InteractionCfg(num_heads=4),
                     llm_dim=64, **kwargs)


def test_clip_branch_at_zero_init_is_timm_clip_with_class_position():
    """Fresh gates: the CLIP branch tokens are timm's own CLIP forward (class token with its position embedding,
    pre-norm, QuickGELU), without the post-norm."""
    branches = (_tiny_clip(32, 32, 64), _tiny_clip(64, 64, 32))
    model = PIIPLlava(branches=branches, interaction=InteractionCfg(num_heads=4), llm_dim=64).eval()
    clip = model.branches[1]
    assert clip.blocks[0].mlp.act.__class__.__name__ == "QuickGELU"
    with torch.no_grad():
        clip.pos_embed.normal_()  # a class slot that matters
        x = torch.randn(2, 3, 64, 64)
        tokens, _ = model.forward_branches(x)
        expected = clip.forward_features(x)[:, 1:]
    torch.testing.assert_close(tokens[1], expected)


def test_tiny_tower_matches_the_official_projector_formula():
    """Real forward: tokens = MLP_1(resize(map_1 -> grid_2)) + MLP_2(map_2), each MLP Linear-GN-GELU-Linear."""
    model = _tiny_tower().eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ca_gamma", "cffn_gamma")):
                param.normal_(std=0.1)  # open gates: the CLIP and ConvNeXt branches really interact
        out = model(x)
        tokens, geoms = model.forward_branches(x)
        maps = [t.transpose(1, 2).reshape(2, -1, g.height, g.width) for t, g in zip(tokens, geoms)]
        grid = (geoms[1].height, geoms[1].width)
        maps[0] = F.interpolate(maps[0].float(), size=grid, mode="bilinear", align_corners=False)
        expected = 0
        for branch_map, mlp in zip(maps, model.projector.branches):
            first, norm, second = mlp[1], mlp[3], mlp[6]
            h = F.linear(branch_map.permute(0, 2, 3, 1), first.weight, first.bias).permute(0, 3, 1, 2)
            h = F.gelu(F.group_norm(h, 32, norm.weight, norm.bias, norm.eps))
            expected = expected + F.linear(h.permute(0, 2, 3, 1), second.weight, second.bias)
    assert out.shape == (2, 3 * 4, 64)  # ConvNeXt grid 96/32 x 128/32
    torch.testing.assert_close(out, expected.reshape(2, -1, 64), rtol=1e-5, atol=1e-5)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 12, 64 + 128)


def test_tiny_tower_backward_reaches_every_parameter():
    model = _tiny_tower()
    model(torch.randn(1, 3, 96, 96)).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_registered_tower_real_forward_at_small_size(one_thread):
    model = piip_models.create_model("piip_llava_convnext_b_clip_l_640_224", img_size=128, llm_dim=256).eval()
    assert model.branch_sizes == (45, 128)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    assert out.shape == (1, 16, 256) and torch.isfinite(out).all()


def test_projector_and_tower_errors():
    with pytest.raises(ValueError, match="divisible by 32"):
        BranchMLPProjector((64, 32), 100)
    with pytest.raises(ValueError, match="expected \\(B, 96, H, W\\)"):
        BranchMLPProjector((64, 32), 64)(torch.randn(1, 95, 2, 2))
    with pytest.raises(ValueError, match="num_classes=0"):
        _tiny_tower(num_classes=10)
    with pytest.raises(ValueError, match="class_pos_embed needs"):
        PIIPLlava(branches=(BranchCfg("vit_small_patch16_224", 32, ((0, 11),), class_pos_embed=True,
                                      model_args=dict(no_embed_class=True)),), device="meta")
