"""Checkpoint filters: timm branch checkpoints and official key layouts."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from piip_models.weights import adapt_pos_embed, branch_checkpoint_filter_fn, convert_official_state_dict


def _branch(**kwargs):
    args = dict(embed_dim=64, depth=2, num_heads=2, img_size=64, dynamic_img_size=True, num_classes=0,
                global_pool="", fc_norm=False)
    return timm.create_model("vit_small_patch16_224", **dict(args, **kwargs))


def test_patch14_kernel_resized_bicubically_and_pos_grid_resampled():
    source = timm.create_model("vit_small_patch14_dinov2", embed_dim=64, depth=2, num_heads=2, img_size=70).state_dict()
    branch = _branch(init_values=1.0, final_norm=False)
    state_dict = branch_checkpoint_filter_fn(source, branch)
    expected = F.interpolate(source["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(state_dict["patch_embed.proj.weight"], expected)
    assert state_dict["pos_embed"].shape == branch.pos_embed.shape == (1, 17, 64)  # 5x5 (+cls) -> 4x4 (+cls)
    assert not any(k.startswith("norm.") for k in state_dict)
    branch.load_state_dict(state_dict, strict=True)


def test_deit_v1_checkpoint_into_layerscale_branch_without_class_slot():
    source = timm.create_model("deit_tiny_patch16_224", embed_dim=64, depth=2, num_heads=2, img_size=64).state_dict()
    branch = _branch(init_values=1.0, no_embed_class=True, num_classes=1000)
    state_dict = branch_checkpoint_filter_fn(source, branch)
    assert state_dict["pos_embed"].shape == (1, 16, 64)
    torch.testing.assert_close(state_dict["pos_embed"], source["pos_embed"][:, 1:])  # same grid: slot dropped only
    assert torch.equal(state_dict["blocks.0.ls1.gamma"], torch.ones(64))
    branch.load_state_dict(state_dict, strict=True)


def test_adapt_pos_embed_adds_zero_class_slot_when_the_source_has_none():
    branch = _branch()
    grid = torch.randn(1, 16, 64)
    adapted = adapt_pos_embed(torch.randn(1, 9, 64), branch)
    assert adapted.shape == (1, 17, 64) and torch.equal(adapted[:, 0], torch.zeros(1, 64))
    assert torch.equal(adapt_pos_embed(torch.cat([torch.zeros(1, 1, 64), grid], 1), branch)[:, 1:], grid)


def test_official_key_renames():
    official = {
        "branch1.blocks.0.gamma_1": torch.ones(4),
        "interactions.3.interaction_units_23.branch2to1_injector.ffn.dwconv.dwconv.weight": torch.ones(1),
        "interactions.0.interaction_units_12.branch1to2_injector.ca_weight": torch.ones(1),
        "merge_branch1.weight": torch.ones(1),
        "merge_branch2.4.bias": torch.ones(1),
        "fpn1.3.weight": torch.ones(1),
        "w1": torch.tensor(1.0), "w2": torch.tensor(2.0),
        "cls_norm.weight": torch.ones(1), "cls_head.bias": torch.ones(1),
    }
    converted = convert_official_state_dict({"module": {f"backbone.{k}": v for k, v in official.items()}})
    assert set(converted) == {
        "branches.0.blocks.0.ls1.gamma",
        "interactions.3.units.1.branch2to1_injector.ffn.dwconv.weight",
        "interactions.0.units.0.branch1to2_injector.ca_gamma",
        "merges.0.0.weight", "merges.1.4.bias", "fpn.p2.3.weight", "branch_weights",
        "head_norm.weight", "head.bias",
    }
    assert converted["branch_weights"].tolist() == [1.0, 2.0]
