"""Dense-prediction backbones: official detection parity, windowed attention and the feature-pyramid API."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from piip_models import PIIP, BranchCfg, even_segments
from piip_models.layers.window_attention import block_forward, windowed_attention
from piip_models.weights import checkpoint_filter_fn

from .conftest import capture_intermediates, compare_intermediates, cpu_sized, load_official_fixture
from .test_grad_ckpt import tiny_dense_model

# The fixtures README: det_3branch_small ran the official non-flash DeiT window attention (pad after qkv); the
# AugReg fixture ran the InternViT one (pad before qkv, as the flash path of the released configs).
DET_FIXTURES = {
    "det_3branch_small": "after_qkv",
    "det_3branch_augreg_small": "before_qkv",
    "det_3branch_small_global": "before_qkv",
}
TOL = dict(rtol=1e-4, atol=2e-4)
DENSE = sorted(
    n for n in timm.list_models("piip_*")
    if timm.get_pretrained_cfg(n).num_classes == 0 and not n.startswith("piip_llava")
)
# Detection configs normalise to [-1, 1] except DINO's and the ConvNeXt/ViT combinations (ImageNet statistics).
IMAGENET_COMBOS = ("piip_ct_", "piip_vt_")
CI_DENSE = ["piip_tsb_1120_896_448", "piip_sbl_1792_1120_672_dino"]


@pytest.mark.parametrize("name", sorted(DET_FIXTURES))
def test_detection_fixture(name):
    model, io = load_official_fixture(name, window_padding=DET_FIXTURES[name])
    records, handles = capture_intermediates(model)
    with torch.no_grad():
        merged, pyramid = model.forward_intermediates(io["input"])
    for handle in handles:
        handle.remove()
    for level, feature in enumerate(pyramid):
        torch.testing.assert_close(feature, io[f"fpn{level + 1}"], **TOL)
    torch.testing.assert_close(merged, io["intermediate.merged"], **TOL)
    checked = compare_intermediates(name, io, records, skip=("merged",), **TOL)
    assert checked == 19  # branch images (2), merges (3), tokens (2 x 3), deform inputs (8)


def test_window_padding_rule_matters():
    # the fixture ran the other rule
    model, io = load_official_fixture("det_3branch_small", window_padding="before_qkv")
    with torch.no_grad():
        merged = model.forward_features(io["input"])
    assert (merged - io["intermediate.merged"]).abs().max() > 1e-2


def _block(dim: int = 64, qkv_bias: bool = True):
    vit = timm.create_model("vit_small_patch16_224", embed_dim=dim, depth=1, num_heads=2, qkv_bias=qkv_bias)
    block = vit.blocks[0].eval()
    with torch.no_grad():
        if qkv_bias:
            block.attn.qkv.bias.normal_()
    return block


@pytest.mark.parametrize("padding", ["before_qkv", "after_qkv"])
def test_window_covering_the_grid_equals_global_attention(padding):
    block = _block()
    x = torch.randn(2, 6 * 6, 64)
    with torch.no_grad():
        torch.testing.assert_close(block_forward(block, x, (6, 6), 6, padding), block(x))


def test_pad_before_qkv_attends_over_zero_padded_windows():
    attn = _block().attn
    x = torch.randn(1, 3 * 5, 64)
    with torch.no_grad():
        out = windowed_attention(attn, x, (3, 5), 4, "before_qkv")
        padded = F.pad(x.view(1, 3, 5, 64), (0, 0, 0, 3, 0, 1))  # 3x5 -> 4x8, zeros right/bottom
        left, right = padded[:, :, :4].reshape(1, 16, 64), padded[:, :, 4:].reshape(1, 16, 64)
        expected = torch.cat([attn(left).view(1, 4, 4, 64), attn(right).view(1, 4, 4, 64)], dim=2)[:, :3, :5]
    torch.testing.assert_close(out, expected.reshape(1, 15, 64))


def test_padding_rules_differ_only_through_the_qkv_bias():
    x = torch.randn(1, 3 * 5, 64)
    with torch.no_grad():
        no_bias = _block(qkv_bias=False).attn
        torch.testing.assert_close(windowed_attention(no_bias, x, (3, 5), 4, "before_qkv"),
                                   windowed_attention(no_bias, x, (3, 5), 4, "after_qkv"))
        biased = _block().attn
        diff = windowed_attention(biased, x, (3, 5), 4, "before_qkv") - windowed_attention(biased, x, (3, 5), 4,
                                                                                           "after_qkv")
    assert diff.abs().max() > 1e-3


@pytest.mark.parametrize("name,expected", [
    ("piip_tsb_1568_1120_672", 175_043_715),
    ("piip_sbl_1568_1120_672", 547_810_051),
    ("piip_tsbl_1568_1120_672_448", 571_066_500),
])
def test_dense_parameter_counts_match_official_modules(name, expected):
    model = timm.create_model(name, with_fpn=True, device="meta")
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", DENSE)
def test_features_only_pyramid_shapes(name):
    """Every dense backbone: 4 maps (3 for DINO) with the channels and strides feature_info states."""
    model = timm.create_model(name, features_only=True, device="meta")
    maps = model(torch.randn(2, 3, 448, 672, device="meta"))
    expected_levels = 3 if name.endswith("_dino") else 4
    assert len(maps) == len(model.feature_info.channels()) == expected_levels
    for feature, channels, stride in zip(maps, model.feature_info.channels(), model.feature_info.reduction()):
        assert feature.shape == (2, channels, 448 // stride, 672 // stride)


def _forward_backward(name: str, batch: int, height: int, width: int) -> None:
    model = timm.create_model(name, features_only=True)
    maps = model(torch.randn(batch, 3, height, width))
    sum(m.mean() for m in maps).backward()
    strides = model.feature_info.reduction()
    assert [m.shape[-2:] for m in maps] == [(height // s, width // s) for s in strides]
    assert all(torch.isfinite(m).all() for m in maps)
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused[:5]


@pytest.mark.parametrize("name", CI_DENSE)
def test_dense_forward_backward_cpu(name):
    _forward_backward(name, 2, 448, 672)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in cpu_sized(DENSE) if n not in CI_DENSE])
def test_dense_forward_backward_cpu_every_model(name):
    _forward_backward(name, 2, 448, 672)


def _tiny_windowed_branches() -> tuple[BranchCfg, ...]:
    return tuple(
        BranchCfg("vit_small_patch16_224", size, even_segments(4, 2), window_size=2, global_blocks=(3,),
                  model_args=dict(embed_dim=dim, depth=4, num_heads=2, init_values=1.0, no_embed_class=True))
        for dim, size in zip((96, 64, 32), (32, 48, 80))
    )


def _tiny_dense(**kwargs) -> PIIP:
    kwargs = dict(dict(head_type="dense", class_token=False, num_classes=0), **kwargs)
    return PIIP(branches=_tiny_windowed_branches(), **kwargs)


def test_dense_api_without_and_with_pyramid():
    x = torch.randn(1, 3, 80, 112)
    plain = _tiny_dense().eval()
    assert plain.fpn is None and [f["module"] for f in plain.feature_info] == ["interactions.0", "interactions.1"]
    with torch.no_grad():
        assert plain.forward_features(x).shape == (1, 96, 5, 7)
        assert plain(x).shape == (1, 96)
        with pytest.raises(RuntimeError, match="no feature pyramid"):
            plain.forward_pyramid(plain.forward_features(x))
    model = _tiny_dense(with_fpn=True, fpn_levels=(1, 2, 3)).eval()
    assert model.feature_info[0]["reduction"] == 8
    with torch.no_grad():
        final, taps = model.forward_intermediates(x, indices=[0, 2])
        assert final.shape == (1, 96, 5, 7) and [t.shape[-1] for t in taps] == [14, 3]
        model.prune_intermediate_layers([1])
        assert list(model.fpn.keys()) == ["p4"]
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True)[0], final)


def test_window_attention_needs_no_class_token():
    with pytest.raises(ValueError, match="class_token=False"):
        _tiny_dense(class_token=True)
    with pytest.raises(ValueError, match="with_fpn needs head_type='dense'"):
        PIIP(branches=_tiny_windowed_branches(), head_type="merged", class_token=False, with_fpn=True)


def test_single_branch_baseline_is_a_windowed_vit():
    model = timm.create_model("piip_baseline_vit_b_1024", device="meta")
    assert len(model.branches) == 1 and model.merges is None and model.branch_weights is None
    assert model.windows[0] == (14, 14, 0) * 4


def test_detection_checkpoint_without_pyramid_drops_its_levels():
    model = _tiny_dense(with_fpn=True)
    plain = _tiny_dense()
    state_dict = checkpoint_filter_fn(model.state_dict(), plain)
    assert not any(k.startswith("fpn.") for k in state_dict)
    plain.load_state_dict(state_dict, strict=True)


def test_dense_models_default_to_no_classes_and_detection_normalisation():
    for name in DENSE:
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.num_classes == 0 and cfg.classifier == "head"
        # DINO-DeiT, the ConvNeXt combinations and the ADE20K segmentation models use ImageNet statistics
        imagenet = name in ("piip_sbl_1792_1120_672_dino", "piip_baseline_internvit_6b_512") or name.startswith(
            ("piip_h6b_512_", *IMAGENET_COMBOS)
        )
        assert cfg.mean == ((0.485, 0.456, 0.406) if imagenet else (0.5, 0.5, 0.5))


def test_set_windows_switches_windowed_attention_and_validates():
    model = _tiny_dense().eval()
    x = torch.randn(1, 3, 80, 112)
    with torch.no_grad():
        windowed = model.forward_features(x)
        windows = model.windows
        model.set_windows(tuple((0,) * len(w) for w in windows))
        global_attention = model.forward_features(x)
        model.set_windows(windows)
        torch.testing.assert_close(model.forward_features(x), windowed)
    assert (global_attention - windowed).abs().max() > 1e-4
    with pytest.raises(ValueError, match="entries per branch"):
        model.set_windows(((0,),))


def test_forward_intermediates_merges_a_simple_pyramid_once():
    """The features returned beside a simple pyramid's levels are the fused map the levels were read from."""
    model = PIIP(branches=tiny_dense_model().branch_cfgs, head_type="dense", class_token=False, num_classes=0,
                 with_fpn=True).eval()
    calls = []
    for merge in model.merges:
        merge.register_forward_hook(lambda module, args, out: calls.append(module))
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        features, levels = model.forward_intermediates(x)
        assert len(calls) == len(model.merges)
        torch.testing.assert_close(features, model.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(levels, model.forward_pyramid(features), rtol=0, atol=0)
