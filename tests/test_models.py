"""Registry, parameter counts, the zero-init property, timm's model API and input validation."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import piip_models
from piip_models import PIIP, BranchCfg, even_segments

CLASSIFIERS = ["piip_tsb", "piip_sbl", "piip_sbl_320_160_96", "piip_tsbl"]
DENSE_BACKBONES = [
    "piip_tsb_1120_896_448", "piip_tsb_1568_896_448", "piip_tsb_1568_1120_672",
    "piip_sbl_1120_672_448", "piip_sbl_1344_896_448", "piip_sbl_1568_896_672", "piip_sbl_1568_1120_672",
    "piip_tsbl_1344_896_672_448", "piip_tsbl_1568_1120_672_448", "piip_tsbl_1792_1568_1120_448",
    "piip_sbl_1792_1120_672_dino", "piip_sbl_1568_1120_672_augreg", "piip_sbl_1568_1120_672_augreg_speedup",
    "piip_sbl_1568_1120_672_mae", "piip_sbl_1568_1120_672_dinov2", "piip_sbl_1568_1120_672_beitv2",
    "piip_baseline_vit_b_1024", "piip_baseline_vit_l_1024",
]
INTERNVIT_6B_BACKBONES = [
    "piip_h6b_1024_512", "piip_h6b_1024_512_speedup", "piip_h6b_1024_768_dino",
    "piip_lh6b_1536_1024_512", "piip_lh6b_1536_1024_512_dino",
    "piip_h6b_512_192", "piip_h6b_512_256", "piip_h6b_512_384", "piip_h6b_512_512",
    "piip_baseline_internvit_6b_1024", "piip_baseline_internvit_6b_512",
]
CONVNEXT_BACKBONES = [
    "piip_ct_cs_cb_1024_672_448", "piip_ct_vs_vb_1024_672_448", "piip_ct_cs_vb_1024_672_448",
    "piip_ct_vs_cb_1024_672_448", "piip_vt_cs_vb_1024_672_448", "piip_vt_cs_cb_1024_672_448",
    "piip_vt_vs_cb_1024_672_448", "piip_baseline_convnext_b_1024",
]
LLAVA_TOWERS = [
    "piip_llava_clip_bl_512_256", "piip_llava_clip_bl_512_448", "piip_llava_clip_bl_512_448_13b",
    "piip_llava_convnext_b_clip_l_640_224",
    "piip_llava_convnext_b_clip_l_1024_336", "piip_llava_convnext_b_clip_l_1024_336_13b",
    "piip_llava_convnext_l_clip_l_1024_336", "piip_llava_convnext_l_clip_l_1024_336_13b",
]
REGISTERED = CLASSIFIERS + DENSE_BACKBONES + INTERNVIT_6B_BACKBONES + CONVNEXT_BACKBONES + LLAVA_TOWERS


def tiny_branches(dims=(96, 64, 32)) -> tuple[BranchCfg, ...]:
    """Three small ViT branches (2 interactions) for fast real-tensor tests."""
    sizes = (32, 48, 80)
    return tuple(
        BranchCfg("vit_small_patch16_224", size, even_segments(4, 2),
                  model_args=dict(embed_dim=dim, depth=4, num_heads=2, init_values=1.0, no_embed_class=True))
        for dim, size in zip(dims, sizes)
    )


def tiny_model(**kwargs) -> PIIP:
    return PIIP(branches=tiny_branches(), num_classes=7, global_pool="first_patch", **kwargs)


def test_registry_lists_every_model_without_overwriting_timm():
    assert sorted(timm.list_models("piip_*")) == sorted(REGISTERED)
    assert sorted(piip_models.list_models()) == sorted(REGISTERED)
    assert sorted(timm.list_models(module=piip_models.MODEL_MODULES)) == sorted(REGISTERED)
    # timm's own entries are untouched
    assert "vit_base_patch16_224" in timm.list_models(module="vision_transformer")
    # re-registering a timm name would move it to module "piip" and drop its pretrained cfgs
    assert timm.get_pretrained_cfg("deit_tiny_patch16_224").hf_hub_id == "timm/deit_tiny_patch16_224.fb_in1k"


@pytest.mark.parametrize("name,expected", [
    ("piip_tsb", 144_031_416),
    ("piip_sbl", 488_925_880),
    ("piip_sbl_320_160_96", 488_795_832),
])
def test_parameter_counts_match_official(name, expected):
    model = timm.create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == expected


def test_zero_init_equals_mean_of_independent_branches():
    """A fresh PIIP-TSB is exactly the three timm DeiTs (sharing its weights) averaged at their resolutions."""
    model = timm.create_model("piip_tsb", num_classes=10).eval()
    x = torch.randn(2, 3, 368, 368)
    with torch.no_grad():
        logits = model(x)
        expected = []
        for branch, size in zip(model.branches, model.branch_sizes):
            vit = copy.deepcopy(branch)  # an ordinary timm VisionTransformer with the same weights
            image = x if size == 368 else F.interpolate(x, scale_factor=size / 368, mode="bilinear")
            tokens = vit.forward_features(image)
            expected.append(vit.head(tokens[:, vit.num_prefix_tokens]))  # first patch token, as PIIP reads it
        torch.testing.assert_close(logits, torch.stack(expected).mean(0), rtol=1e-5, atol=1e-5)


def test_interactions_change_output_once_gates_open():
    model = tiny_model().eval()
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        before = model(x)
        for name, param in model.named_parameters():
            if name.endswith(("ca_gamma", "cffn_gamma")):
                param.fill_(0.5)
        after = model(x)
    assert (before - after).abs().max() > 1e-3


@pytest.mark.parametrize("head_type,pool,num_features", [("separate", "first_patch", 192), ("merged", "avg", 96)])
def test_timm_api_shapes(head_type, pool, num_features):
    model = PIIP(branches=tiny_branches(), num_classes=7, head_type=head_type, global_pool=pool).eval()
    x = torch.randn(2, 3, 80, 112)  # non-square and not the configured size
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, num_features, 5, 7)
        assert model.forward_head(features, pre_logits=True).shape == (2, num_features)
        assert model(x).shape == (2, 7)
        model.reset_classifier(0)
        assert model(x).shape == (2, num_features)
        model.reset_classifier(3, "")
        assert model(x).shape == (2, 3, 5, 7)
    classifier = model.get_classifier()
    heads = classifier if isinstance(classifier, tuple) else (classifier,)
    assert all(h.out_features == 3 for h in heads)


def test_separate_head_reads_first_patch_token():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        tokens, _ = model.forward_branches(x)
        expected = torch.stack([b.head(b.norm(t)[:, 0]) for b, t in zip(model.branches, tokens)]).mean(0)
        torch.testing.assert_close(model(x), expected)


def test_grad_checkpointing_same_output_and_grads():
    model = tiny_model()
    x = torch.randn(2, 3, 80, 80)
    model.train()
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_group_matcher_and_no_weight_decay():
    from timm.models._manipulate import group_parameters

    model = timm.create_model("piip_tsb", device="meta")
    groups = group_parameters(model, model.group_matcher())
    assert len(groups) == 14  # embeddings, 12 stages, heads
    first_stage = set(groups[1])
    assert "branches.0.blocks.0.attn.qkv.weight" in first_stage
    assert "interactions.0.units.0.branch2to1_injector.ca_gamma" in first_stage
    assert "branches.2.pos_embed" in groups[0]
    names = [n for n, _ in model.named_parameters()]
    import fnmatch

    assert all(any(fnmatch.fnmatch(n, p) for n in names) or p.endswith("reg_token") for p in model.no_weight_decay())


def test_device_dtype_factory_kwargs_and_meta_forward():
    model = timm.create_model("piip_tsb", device="meta", dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(torch.randn(2, 3, 368, 368, device="meta", dtype=torch.bfloat16))
    assert out.shape == (2, 1000) and out.dtype == torch.bfloat16


def test_img_size_and_branch_size_overrides():
    model = timm.create_model("piip_tsb", img_size=224, device="meta")
    assert model.branch_sizes == (78, 117, 224)
    model = timm.create_model("piip_tsb", branch_sizes=(96, 160, 320), device="meta")
    assert model.branch_sizes == (96, 160, 320)
    assert model.branches[2].pos_embed.shape == (1, 400, 192)


def test_any_input_size_resamples_position_embeddings():
    model = tiny_model().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 100)).shape == (1, 7)


def test_features_only_taps():
    model = timm.create_model("piip_tsb", features_only=True, out_indices=(3, 11)).eval()
    assert model.feature_info.channels() == [1344, 1344]
    assert model.feature_info.reduction() == [16, 16]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 192, 256))
    assert [m.shape for m in maps] == [(1, 1344, 12, 16)] * 2


def test_forward_intermediates_final_equals_forward_features():
    model = tiny_model().eval()
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(taps) == 2 and taps[0].shape == (1, 192, 5, 5)


def test_create_pyramid_from_timm_names():
    model = piip_models.create_pyramid(
        [("vit_base_patch16_224", 64), ("vit_small_patch16_224", 112)], num_interactions=4, num_classes=5,
        device="meta",
    )
    assert model.segments[0] == ((0, 2), (3, 5), (6, 8), (9, 11))
    assert model.embed_dims == (768, 384)
    assert model(torch.randn(1, 3, 112, 112, device="meta")).shape == (1, 5)


def test_even_segments():
    assert even_segments(12, 12) == tuple((i, i) for i in range(12))
    assert even_segments(24, 12)[:2] == ((0, 1), (2, 3))
    assert even_segments(39, 12)[-1][1] == 38
    with pytest.raises(ValueError, match="cannot split"):
        even_segments(3, 4)


# ----------------------------------------------------------------------------------------------------- bad input


def test_wrong_channel_count():
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        tiny_model()(torch.randn(1, 1, 80, 80))


def test_non_4d_input():
    with pytest.raises(ValueError, match="4-D"):
        tiny_model()(torch.randn(3, 80, 80))


def test_image_too_small_for_smallest_branch():
    with pytest.raises(ValueError, match="too small: branch 0"):
        tiny_model()(torch.randn(1, 3, 32, 32))


def test_unknown_model_and_tag():
    with pytest.raises(RuntimeError, match="Unknown PIIP model 'piip_tbs'; did you mean piip_tsb"):
        piip_models.create_model("piip_tbs")
    with pytest.raises(RuntimeError, match="Unknown tag 'in22k' for piip_tsb; available tags: branches"):
        piip_models.create_model("piip_tsb.in22k")


def test_unknown_kwargs_raise_type_error():
    with pytest.raises(TypeError):
        timm.create_model("piip_tsb", device="meta", not_a_model_arg=1)


def test_segment_counts_must_match():
    branches = list(tiny_branches())
    branches[1] = BranchCfg(branches[1].model_name, branches[1].img_size, even_segments(4, 4),
                            model_args=branches[1].model_args)
    with pytest.raises(ValueError, match="same number of block segments .*branch 1: 4"):
        PIIP(branches=branches, device="meta")


def test_segments_must_cover_blocks():
    branches = list(tiny_branches())
    branches[0] = BranchCfg(branches[0].model_name, 32, ((0, 1), (2, 2)), model_args=branches[0].model_args)
    with pytest.raises(ValueError, match="branch 0: segments .* cover 3 of 4 blocks"):
        PIIP(branches=branches, device="meta")


def test_branch_order_must_be_inverted():
    with pytest.raises(ValueError, match="branch order is not inverted: widths"):
        PIIP(branches=tiny_branches()[::-1], branch_sizes=(32, 48, 80), device="meta")
    with pytest.raises(ValueError, match="branch order is not inverted: sizes"):
        PIIP(branches=tiny_branches(), branch_sizes=(80, 48, 32), device="meta")


def test_bad_pool_and_head_type():
    with pytest.raises(ValueError, match="global_pool for a merged head"):
        PIIP(branches=tiny_branches(), head_type="merged", global_pool="first_patch", device="meta")
    with pytest.raises(ValueError, match="head_type"):
        PIIP(branches=tiny_branches(), head_type="fused", device="meta")


def test_non_vit_branch_is_rejected():
    bad = BranchCfg("resnet18", 64, ((0, 0),))
    with pytest.raises(TypeError):
        PIIP(branches=(bad, bad), device="meta")
