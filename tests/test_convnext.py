"""ConvNeXt branches: the unit/segment layout, per-stage deformable geometry, the regular pyramid and the combos."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from timm.layers import DropPath

from piip_models import PIIP, BranchCfg, InteractionCfg, even_segments
from piip_models.branches import ConvNeXtAdapter, convnext_units
from piip_models.hub import OFFICIAL_REPO
from piip_models.official import build_from_official
from piip_models.weights import checkpoint_filter_fn

from .test_dense import _forward_backward
from .test_hub import official_state_dict, wrap_official
from .test_pretrained import run_offline, seed_hf_cache, seed_hub, torch_bytes

COMBOS = [
    "piip_ct_cs_cb_1024_672_448", "piip_ct_vs_vb_1024_672_448", "piip_ct_cs_vb_1024_672_448",
    "piip_ct_vs_cb_1024_672_448", "piip_vt_cs_vb_1024_672_448", "piip_vt_cs_cb_1024_672_448",
    "piip_vt_vs_cb_1024_672_448",
]

# Official ``downsample_ratios`` and ``interaction_indexes`` (mmdetection/configs/piip/convnext/*.py), written out.
RATIOS_39 = [4] * 3 + [8] * 4 + [16] * 28 + [32] * 4
RATIOS_T = [4] * 3 + [8] * 4 + [16] * 10 + [32] * 4
SEGMENTS_39 = [[0, 2], [3, 6], [7, 10], [11, 13], [14, 16], [17, 19], [20, 22], [23, 25], [26, 28], [29, 31],
               [32, 34], [35, 38]]
SEGMENTS_T = [[0, 2], [3, 6], [7, 8], [9, 9], [10, 10], [11, 11], [12, 12], [13, 13], [14, 14], [15, 15], [16, 16],
              [17, 20]]


def tiny_convnext(img_size: int, segments=((0, 1), (2, 3), (4, 7))) -> BranchCfg:
    """A ConvNeXt with 8 units: 2 blocks, then downsample + block three times; segments end at strides 4, 8, 32."""
    args = dict(depths=(2, 1, 1, 1), dims=(32, 64, 96, 128), ls_init_value=0.5)
    return BranchCfg("convnext_atto", img_size, tuple(segments), model_args=args)


def tiny_vit(img_size: int, dim: int = 64) -> BranchCfg:
    args = dict(embed_dim=dim, depth=3, num_heads=2, init_values=1.0, no_embed_class=True)
    return BranchCfg("vit_small_patch16_224", img_size, even_segments(3, 3), model_args=args)


def tiny_mixed(**kwargs) -> PIIP:
    """ConvNeXt@48 (branch 0), ViT@64, ConvNeXt@96: both kinds, both positions."""
    branches = (tiny_convnext(48), tiny_vit(64), tiny_convnext(96))
    kwargs = dict(dict(head_type="dense", class_token=False, num_classes=0, merge_stages=(0, 1)), **kwargs)
    return PIIP(branches=branches, interaction=InteractionCfg(num_heads=8), **kwargs)


def test_convnext_units_are_blocks_and_downsampling_layers():
    model = timm.create_model("convnext_small", device="meta")
    adapter = ConvNeXtAdapter(model)
    assert len(convnext_units(model)) == adapter.depth == 39
    assert list(adapter.strides) == RATIOS_39
    assert adapter.widths[:3] == (96,) * 3 and adapter.widths[3] == 192 and adapter.widths[-1] == 768
    assert list(ConvNeXtAdapter(timm.create_model("convnext_tiny", device="meta")).strides) == RATIOS_T


def test_registered_segments_are_the_official_ones():
    model = timm.create_model("piip_ct_vs_cb_1024_672_448", device="meta")
    assert [list(s) for s in model.segments[0]] == SEGMENTS_39  # ConvNeXt-B
    assert [list(s) for s in model.segments[2]] == SEGMENTS_T  # ConvNeXt-T
    assert model.segments[1] == even_segments(12, 12)
    assert model.pyramid_stages == (0, 1, 10, 11)


def test_zero_init_convnext_branches_equal_timm_convnext():
    """With closed gates every ConvNeXt branch is its timm model: same final map as ``forward_features``."""
    model = tiny_mixed().eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        tokens, geoms = model.forward_branches(x)
        for k, size in ((0, 48), (2, 96)):
            image = torch.nn.functional.interpolate(x, scale_factor=size / 96, mode="bilinear") if k == 0 else x
            expected = model.branches[k].forward_features(image)
            assert (geoms[k].height, geoms[k].width) == expected.shape[-2:]
            torch.testing.assert_close(tokens[k], expected.flatten(2).transpose(1, 2))


VIT_RATIOS, VIT_SEGMENTS = [16] * 12, [[i, i] for i in range(12)]


@pytest.mark.parametrize("name,official", [
    ("piip_ct_vs_cb_1024_672_448", [(RATIOS_39, SEGMENTS_39), (VIT_RATIOS, VIT_SEGMENTS), (RATIOS_T, SEGMENTS_T)]),
    ("piip_vt_cs_vb_1024_672_448", [(VIT_RATIOS, VIT_SEGMENTS), (RATIOS_39, SEGMENTS_39), (VIT_RATIOS, VIT_SEGMENTS)]),
])
def test_deformable_grids_follow_the_official_downsample_ratios(name, official):
    """Each interaction's value grid is the other branch's image size // its ratio at the end of the segment, as
    the official ``deform_inputs_*_vit`` compute it."""
    model = timm.create_model(name, device="meta")
    height, width = 448, 672
    images = [(int(height * s / 1024), int(width * s / 1024)) for s in model.branch_sizes]
    seen = []
    for block in model.interactions:
        for unit in block.units:
            for injector in (unit.branch2to1_injector, unit.branch1to2_injector):
                injector.attn.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[3])))
    model.forward_features(torch.randn(1, 3, height, width, device="meta"))
    expected = []
    for stage in range(12):
        grids = [(h // ratios[segs[stage][1]], w // ratios[segs[stage][1]])
                 for (h, w), (ratios, segs) in zip(images, official)]
        # unit 23 runs before unit 12; each unit queries its larger model first (value: the other branch's grid)
        expected += [(grids[2],), (grids[1],), (grids[1],), (grids[0],)]
    assert seen == expected


@pytest.mark.parametrize("name,channels", [
    ("piip_ct_cs_cb_1024_672_448", [128, 256, 512, 1024]),
    ("piip_vt_cs_cb_1024_672_448", [128, 256, 512, 1024]),
    ("piip_ct_vs_vb_1024_672_448", [768] * 4),
])
def test_regular_pyramid_channels_and_modules(name, channels):
    model = timm.create_model(name, features_only=True, device="meta")
    assert model.feature_info.channels() == channels and model.feature_info.reduction() == [4, 8, 16, 32]
    net = model.model
    vit_last = not name.startswith("piip_ct")
    # a ViT last branch (stride 16) needs the deconvolutions and the pooling; a ConvNeXt one is at 4..32 already
    assert [type(m).__name__ for m in net.fpn.values()] == (
        ["Sequential", "Sequential", "Identity", "MaxPool2d"] if vit_last else ["Identity"] * 4
    )
    assert sorted(net.stage_merges.keys()) == ["0", "1", "10"]
    # branch 0 merges are GroupNorm-ReLU, the others Conv3x3 to branch 0's width at that depth
    assert [type(m).__name__ for m in net.stage_merges["10"][0]] == ["GroupNorm", "ReLU"]
    assert net.stage_merges["10"][1][0].weight.shape[:2] == (channels[2], net.stage_dims[10][1])
    assert net.stage_branch_weights["1"].shape == (3,)


def test_convnext_group_matcher_assigns_units_to_their_stage():
    model = timm.create_model("piip_ct_cs_cb_1024_672_448", device="meta")
    stage = model.group_matcher()
    assert stage("branches.2.stem.0.weight") == 0
    assert stage("branches.2.stages.1.downsample.1.weight") == 2  # ConvNeXt-T unit 3: segment 1
    assert stage("branches.0.stages.2.blocks.26.conv_dw.weight") == 11  # ConvNeXt-B unit 34: segment 10
    assert stage("branches.0.stages.3.blocks.0.gamma") == 12
    assert stage("stage_merges.0.1.0.weight") == 13


@pytest.mark.parametrize("name", COMBOS + ["piip_baseline_convnext_b_1024"])
def test_convnext_combo_forward_backward_cpu(name, one_thread):
    """Every combination (about 4 s each at this size): four maps with feature_info's channels/strides, finite, and
    a gradient for every parameter."""
    _forward_backward(name, 1, 128, 160)


def test_tiny_mixed_pyramid_taps_and_gradients():
    model = tiny_mixed(with_fpn=True, fpn_levels=(1, 2, 3))
    x = torch.randn(1, 3, 96, 160)
    maps = model.forward_intermediates(x, intermediates_only=True)
    # taps after stages 0 and 1 and the final one, on the last (ConvNeXt) branch's grid: strides 4, 8, 32 upsampled
    # or pooled to 8, 16, 32, with branch 0's width at those depths
    assert [m.shape for m in maps] == [(1, 32, 12, 20), (1, 64, 6, 10), (1, 128, 3, 5)]
    assert [f["reduction"] for f in model.feature_info] == [8, 16, 32]
    sum(m.square().mean() for m in maps).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_convnext_configuration_errors():
    with pytest.raises(ValueError, match="changes width between stages"):
        tiny_mixed(merge_stages=())
    with pytest.raises(ValueError, match="no classifier here"):
        PIIP(branches=(tiny_convnext(96),), device="meta")
    with pytest.raises(ValueError, match="not applicable to ConvNeXt: \\['window_size'"):
        PIIP(branches=(BranchCfg("convnext_atto", 96, ((0, 11),), window_size=7),), head_type="none",
             num_classes=0, class_token=False, device="meta")
    with pytest.raises(ValueError, match="merge_stages must be increasing"):
        tiny_mixed(merge_stages=(2,))
    with pytest.raises(ValueError, match="one level per merge stage"):
        tiny_mixed(with_fpn=True)
    with pytest.raises(ValueError, match="too small: branch 0 .* 32x32 px"):
        tiny_mixed()(torch.randn(1, 3, 60, 60))


def test_convnext_branch_loads_from_seeded_offline_cache(tmp_path):
    sources = {}
    for name in ("test_vit.r160_in1k", "test_convnext.r160_in1k"):
        reference = timm.create_model(name)
        sources[name] = {k: torch.randn_like(v) for k, v in reference.state_dict().items()}
        seed_hf_cache(tmp_path / "hub", f"timm/{name}", sources[name])
    torch.save(sources["test_convnext.r160_in1k"], tmp_path / "source.pt")
    out = run_offline(tmp_path / "hub", f"""
        import torch, piip_models
        src = torch.load({str(tmp_path / "source.pt")!r})
        model = piip_models.create_pyramid(
            [("test_vit.r160_in1k", 64), ("test_convnext.r160_in1k", 128)], num_interactions=3, head_type="none",
            num_classes=0, interaction=piip_models.InteractionCfg(num_heads=4), pretrained=True)
        assert model.segments[1] == ((0, 3), (4, 7), (8, 11))  # 12 units: 9 blocks + 3 downsampling layers
        branch = model.branches[1]
        assert torch.equal(branch.stem[0].weight, src["stem.0.weight"])
        assert torch.equal(branch.stages[2].blocks[3].conv_dw.weight, src["stages.2.blocks.3.conv_dw.weight"])
        assert torch.equal(branch.stages[1].downsample[1].weight, src["stages.1.downsample.1.weight"])
        assert not any(k.startswith("head.") for k in branch.state_dict())
        print("ok")
    """)
    assert out.startswith("ok")


def test_official_regular_fpn_convnext_checkpoint_converts(caplog):
    model = tiny_mixed(with_fpn=True, fpn_levels=(1, 2, 3))
    ours = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    official = official_state_dict(model, ours)  # Hugging Face ConvNeXt branches, regular-FPN merges (reference §7.2)
    assert "branch3.convnext_model.encoder.stages.1.layers.0.pwconv2.weight" in official
    assert "intermediate_merging_1_branch2.0.weight" in official and "intermediate_merging_0_w3" in official
    assert "branch1.convnext_model.layernorm.weight" in official  # the unused final norm of HF ConvNeXt
    with caplog.at_level(logging.INFO, logger="piip_models.weights"):
        converted = checkpoint_filter_fn({"module": {f"backbone.{k}": v for k, v in official.items()}}, model)
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], v) for k, v in ours.items())
    assert "dropped 4 official tensors no PIIP module reads: ['branch1.convnext_model.layernorm.bias'" in caplog.text


def test_convnext_tag_loads_the_official_checkpoint_from_offline_cache(tmp_path, monkeypatch, caplog):
    """The released PIIP-CT-CS-CB file's layout (mmdet wrapper, heads, HF ConvNeXt branches, regular-FPN merges)
    through ``pretrained=True`` on a seeded offline cache, for a small model of the same structure."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    tag = "piip_ct_cs_cb_1024_672_448.coco_mask_rcnn"
    kwargs = dict(branches=(tiny_convnext(48), tiny_convnext(64), tiny_convnext(96)),
                  interaction=InteractionCfg(num_heads=8), merge_stages=(0, 1), fpn_levels=(1, 2, 3))
    source = timm.create_model(tag, with_fpn=True, **kwargs).eval()
    with torch.no_grad():
        for param in source.parameters():
            param.normal_(std=0.2)  # open gates, trained-looking merges
    official = wrap_official(official_state_dict(source), detection=True)
    seed_hub(tmp_path, OFFICIAL_REPO, {timm.get_pretrained_cfg(tag).hf_hub_filename: torch_bytes(official)})

    with caplog.at_level(logging.INFO, logger="piip_models"):
        backbone = timm.create_model(tag, pretrained=True, cache_dir=tmp_path, features_only=True, **kwargs).eval()
    loaded, expected = backbone.model.state_dict(), source.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert "dropped 3 tensors: neck (1), roi_head (1), rpn_head (1)" in caplog.text
    assert "dropped 6 official tensors no PIIP module reads" in caplog.text  # the HF ConvNeXts' final norms
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        for ours, theirs in zip(backbone(x), source.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(ours, theirs)


def test_official_config_translates_to_the_registered_model():
    """The backbone dict of mask_rcnn_convnext-t_vit-s_convnext-b_1024_672_448_regular-fpn.py builds the same model."""
    def convnext(name, size, segments, ratios, drop_path):
        return dict(real_size=size, interaction_indexes=segments, downsample_ratios=ratios,
                    pretrained=f"facebook/convnext-{name}-224", drop_path_rate=drop_path)

    config = dict(
        n_points=4, deform_num_heads=16, cffn_ratio=0.25, deform_ratio=0.5, with_cffn=True,
        interact_attn_type="deform", interaction_drop_path_rate=0.4, with_simple_fpn=False,
        out_interaction_indexes=[0, 1, 10],
        branch1=convnext("base", 448, SEGMENTS_39, RATIOS_39, 0.4),
        branch2=dict(real_size=672, pretrain_img_size=224, patch_size=16, pretrain_patch_size=16, depth=12,
                     embed_dim=384, num_heads=6, mlp_ratio=4, qkv_bias=True, drop_path_rate=0.05, init_scale=1.0,
                     with_fpn=False, interaction_indexes=VIT_SEGMENTS, window_attn=[True] * 12, window_size=[14] * 12,
                     pretrained="./pretrained/deit_3_small_224_21k.pth", use_flash_attn=True),
        branch3=convnext("tiny", 1024, SEGMENTS_T, RATIOS_T, 0.3),
    )
    official = build_from_official(config, device="meta")
    registered = timm.create_model("piip_ct_vs_cb_1024_672_448", with_fpn=True, device="meta")
    assert {k: v.shape for k, v in official.state_dict().items()} == {
        k: v.shape for k, v in registered.state_dict().items()
    }
    assert official.segments == registered.segments and official.branch_sizes == registered.branch_sizes
    assert official.pyramid_stages == registered.pyramid_stages and official.windows == registered.windows
    rates = [[m.drop_prob for m in model.modules() if isinstance(m, DropPath)] for model in (official, registered)]
    assert rates[0] == rates[1] and len(rates[0]) > 0


def test_regular_pyramid_prune_keeps_taps_and_ends_features_at_the_tap():
    model = tiny_mixed().eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], taps[1])
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        # the stage-1 merges became the final ones: the features end at the tap, later stages are gone
        assert len(model.interactions) == 2 and list(model.stage_merges) == ["0"]
        torch.testing.assert_close(model.forward_features(x), taps[1])
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True), taps[:2])
