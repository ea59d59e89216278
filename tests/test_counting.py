"""Parameter and FLOP counting: the published numbers (paper convention), hand counts, MSDA work, benchmark rows."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from piip_models.kernels import msda_macs
from torch.utils.flop_counter import FlopCounterMode

from piip_models import PIIP, BranchCfg, InteractionCfg
from piip_models.bench import benchmark
from piip_models.counting import BackboneTwin, TowerTwin, count_flops, count_model, count_params, paper_twin
from piip_models.published import PUBLISHED, baseline_of

TOLERANCE = 0.005  # the 0.5% against the published (rounded) README numbers
REFERENCE_TOLERANCE = 2e-4  # the §9 re-derivations carry 4-5 significant digits


@pytest.mark.parametrize("row", PUBLISHED, ids=[row.model for row in PUBLISHED])
def test_paper_convention_reproduces_published_numbers(row):
    if row.model not in timm.list_models():
        pytest.skip(f"{row.model} ({row.source}) is not registered yet")
    count = count_model(row.model, "paper")
    if row.params is not None:
        assert count.params == pytest.approx(row.params, rel=TOLERANCE)
    if row.reference_params is not None:
        assert count.params == pytest.approx(row.reference_params, rel=REFERENCE_TOLERANCE)
    if row.reference_macs is not None:
        assert count.macs == pytest.approx(row.reference_macs, rel=REFERENCE_TOLERANCE)
    if row.exception:
        # documented exception (the AugReg rows of §8.19, the 13B LLaVA towers): the README's number is not this model's
        assert abs(count.macs / row.macs - 1) > 0.05
    else:
        assert count.macs == pytest.approx(row.macs, rel=TOLERANCE)


def test_exact_classification_counts():
    count = count_model("piip_tsb", "paper")
    assert count.input_size == (368, 368)
    assert count.params == 144_031_416
    # §9.2 sums MACs to 17,427,523,392 with the final norms over the class token too; ours normalises the patch
    # tokens the head reads (3 branches x 2 x D MACs fewer).
    assert count.macs == 17_427_523_392 - 2 * (768 + 384 + 192)


@pytest.mark.parametrize("name,macs", [
    ("piip_tsb_1120_896_448", 243_132_125_952),
    ("piip_sbl_1568_896_672", 1_463_525_234_176),
])
def test_exact_dense_counts_include_the_twin_classifier(name, macs):
    """The classification twin's 1000-way classifier (a LinearHead) counts as the official nn.Linear: these are the
    counts the official convention gives (and the code before the heads became modules gave), to the MAC."""
    assert count_model(name, "paper").macs == macs


def test_paper_twin_of_a_dense_backbone():
    model = timm.create_model("piip_tsb_1568_1120_672", device="meta")
    windows = model.windows
    twin = paper_twin(model)
    assert twin is not model and twin.head_type == "merged" and twin.num_classes == 1000
    assert [b.pos_embed.shape[1] for b in twin.branches] == [42 * 42, 70 * 70, 98 * 98]  # the real grids
    assert all(b.cls_token is None for b in twin.branches)
    assert twin.windows == windows  # kept for the manual attention term
    # counting leaves the model as it was: windows restored, hooks removed
    count_flops(twin)
    assert twin.windows == windows
    assert not any(m._forward_hooks for m in twin.modules())
    assert paper_twin("piip_tsb").head_type == "separate"  # classifiers are counted as they are


def _toy(class_token: bool = False) -> PIIP:
    """Two one-block branches (64 wide on 32 px, 32 wide on 64 px), one interaction with 4 heads."""
    branches = (
        BranchCfg("vit_tiny_patch16_224", 32, ((0, 0),), model_args=dict(depth=1, embed_dim=64, num_heads=2)),
        BranchCfg("vit_tiny_patch16_224", 64, ((0, 0),), model_args=dict(depth=1, embed_dim=32, num_heads=2)),
    )
    return PIIP(
        branches, InteractionCfg(num_heads=4), num_classes=10, class_token=class_token, global_pool="avg"
    ).eval()


# toy geometry at a 64 px input: (tokens, width) of the two branches, interaction heads/points, classes
N0, D0, N1, D1, HEADS, POINTS, CLASSES = 4, 64, 16, 32, 4, 4, 10


def _injector_linear_macs(queries: int, dim: int, values: int) -> int:
    value_dim, hidden = dim // 2, dim // 4
    return (
        values * dim * value_dim  # value_proj (the other branch, projected to this width)
        + queries * dim * HEADS * POINTS * 2  # sampling_offsets
        + queries * dim * HEADS * POINTS  # attention_weights
        + queries * value_dim * dim  # output_proj
        + queries * dim * hidden * 2  # ConvFFN fc1, fc2
    )


def _msda_macs_by_hand(queries: int, dim: int) -> int:
    # 4 bilinear taps + 1 weighted accumulation per channel of every (query, head, point) sample
    return 5 * queries * HEADS * POINTS * (dim // 2 // HEADS)


def _full_by_hand() -> int:
    total = 0
    for n, d in ((N0, D0), (N1, D1)):
        total += n * d * 3 * 16 * 16  # patch conv
        total += 12 * n * d * d + 2 * n * n * d  # qkv, proj, fc1, fc2; q @ k^T and attn @ v
        total += d * CLASSES  # head
    total += N1 * D1 * D0 + N0 * D0 * D1  # the unit's two projections
    total += _injector_linear_macs(N0, D0, N1) + N0 * (D0 // 4) * 9  # injector into branch 0, depthwise 3x3
    total += _injector_linear_macs(N1, D1, N0) + N1 * (D1 // 4) * 9
    return total + _msda_macs_by_hand(N0, D0) + _msda_macs_by_hand(N1, D1)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_full_convention_matches_hand_count(device):
    model = _toy().to(device)
    assert count_flops(model, 64, "full") == _full_by_hand()
    assert count_flops(model, 64, "full", batch_size=3) == _full_by_hand()


def test_full_convention_counts_msda_sampling():
    model = _toy()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 64, 64))
    msda = counter.get_flop_counts()["Global"][torch.ops.piip_models.msda] // 2
    assert msda == 2 * (_msda_macs_by_hand(N0, D0) + _msda_macs_by_hand(N1, D1)) > 0
    # the registered formula as the op's shapes give it: value (N, S, M, D), locations (N, Lq, M, L, P, 2)
    assert msda_macs((2, N1, HEADS, D0 // 2 // HEADS), (2, N0, HEADS, 1, POINTS, 2)) == 2 * _msda_macs_by_hand(N0, D0)


def test_paper_convention_matches_hand_count():
    total = 0
    for n, d in ((N0, D0), (N1, D1)):
        total += n * d * (3 * 16 * 16 + 1)  # patch conv with its bias
        total += 12 * n * d * d + 2 * (2 * n * d)  # Linear layers; norm1, norm2 (affine: x2)
        total += 2 * n * n * d  # manual global attention term
        total += 2 * n * d + d * CLASSES  # final norm over the patch tokens, head
    total += N1 * D1 * D0 + N0 * D0 * D1  # projections
    for queries, dim, values in ((N0, D0, N1), (N1, D1, N0)):
        total += _injector_linear_macs(queries, dim, values)
        total += queries * (dim // 4) * (9 + 1)  # depthwise conv with bias
        total += 2 * queries * dim * 2 + 2 * values * dim  # query_norm, ffn_norm; feat_norm (projected width)
        total += 5 * queries * POINTS * dim  # manual deformable term
    assert count_flops(_toy().to("meta"), 64, "paper") == total


def test_paper_convention_ignores_class_tokens_in_attention_only():
    with_cls, without = _toy(class_token=True).to("meta"), _toy().to("meta")
    extra = sum(12 * d * d + 2 * (2 * d) for d in (D0, D1))  # the class token through Linears and norm1/norm2
    assert count_flops(with_cls, 64, "paper") - count_flops(without, 64, "paper") == extra


def test_module_rules_follow_mmcv():
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.ConvTranspose2d(32, 32, 2, 2, bias=False),
        nn.MaxPool2d(2), nn.GELU(), nn.Upsample(scale_factor=2),
    )
    model.pretrained_cfg = {"input_size": (3, 8, 8)}
    expected = (
        64 * 32 * (27 + 1)  # conv + bias per output element
        + 64 * 32 * 2 + 64 * 32  # affine GroupNorm, ReLU
        + 64 * 4 * 32 * 32  # transposed conv on its input grid
        + 256 * 32  # max pool over its input
        + 256 * 32  # upsample: output elements; GELU counts 0
    )
    assert count_flops(model, convention="paper") == expected


def test_count_params_and_validation():
    model = _toy().to("meta")
    total = sum(p.numel() for p in model.parameters())
    model.branches[0].patch_embed.proj.weight.requires_grad_(False)
    frozen = model.branches[0].patch_embed.proj.weight.numel()
    assert count_params(model, "full") == total
    assert count_params(model, "paper") == total - frozen  # mmcv counts trainable parameters
    with pytest.raises(ValueError, match="convention"):
        count_flops(model, 64, "fvcore")
    with pytest.raises(ValueError, match="batch_size"):
        count_flops(model, 64, batch_size=0)


def test_baselines():
    assert baseline_of("piip_tsb_1120_896_448") == "piip_baseline_vit_b_1024"
    assert baseline_of("piip_tsbl_1568_1120_672_448") == "piip_baseline_vit_l_1024"
    assert baseline_of("piip_sbl_320_160_96") == "vit_large_patch16_224"
    assert baseline_of("piip_baseline_vit_b_1024") is None
    registered = set(timm.list_models())
    for name in timm.list_models("piip_*"):
        assert baseline_of(name) is None or baseline_of(name) in registered, name


def test_benchmark_measures_each_model_beside_its_baseline(one_thread):
    rows = benchmark(["piip_tsb"], scale=0.25, warmup=1, repeats=1, threads=1)
    base, piip = rows
    assert (base.model, piip.model, piip.baseline) == ("deit_base_patch16_224", "piip_tsb", "deit_base_patch16_224")
    assert (base.input_size, piip.input_size) == (64, 96)  # 224 / 4 and 368 / 4, rounded to 16 px
    for row in rows:
        assert row.latency_ms > 0 and row.peak_mem_mb > 0 and row.throughput == pytest.approx(1e3 / row.latency_ms)
    assert piip.macs == count_model("piip_tsb", "paper", 96).macs
    assert piip.macs_ratio == pytest.approx(piip.macs / base.macs)
    assert piip.time_ratio == pytest.approx(piip.latency_ms / base.latency_ms)
    assert piip.mem_ratio == pytest.approx(piip.peak_mem_mb / base.peak_mem_mb)
    assert base.baseline is None and base.time_ratio is None


def test_backbone_twin_runs_qkv_over_the_padded_windows(monkeypatch):
    """ConvNeXt/ViT backbones are counted as they run: DeiT-T@1024 (64x64 tokens, window 14) pads to 70x70 before qkv,
    and only there; the output projection, the merges and the manual terms see the real tokens."""
    twin = paper_twin("piip_vt_vs_cb_1024_672_448")
    assert isinstance(twin, BackboneTwin) and twin.backbone.fpn is None
    as_run = count_flops(twin)
    monkeypatch.setattr(BackboneTwin, "windows_as_run", False)
    assert as_run - count_flops(twin) == 12 * (70 * 70 - 64 * 64) * 192 * 3 * 192


def test_tower_twin_takes_every_deformable_grid_from_the_first_interaction():
    """PIIP-LLaVA ConvNeXt-B@1024 + CLIP-L@336: the official count assumes the ConvNeXt's stride-4 grid (256x256) for
    the ConvNeXt queries of all 12 interactions, which run at strides 4, 8, 16 (x9) and 32 with widths 128 .. 1024."""
    twin = paper_twin("piip_llava_convnext_b_clip_l_1024_336")
    assert isinstance(twin, TowerTwin) and isinstance(twin.tower.projector, nn.Identity)
    as_official = count_flops(twin)
    twin.attention_layouts = {}
    strides_and_widths = [(4, 128), (8, 256)] + [(16, 512)] * 9 + [(32, 1024)]
    extra = sum(5 * 4 * width * (256 * 256 - (1024 // stride) ** 2) for stride, width in strides_and_widths)
    assert as_official - count_flops(twin) == extra


def test_paper_twins_leave_the_given_model_alone():
    model = timm.create_model("piip_llava_convnext_b_clip_l_640_224", device="meta")
    twin = paper_twin(model)
    assert twin.tower is not model and isinstance(model.projector, nn.Module)
    assert not isinstance(model.projector, nn.Identity)
    backbone = timm.create_model("piip_ct_cs_cb_1024_672_448", device="meta", features_only=True)
    assert paper_twin(backbone).backbone.fpn is None  # a pyramid-less rebuild of the named model


def test_relative_position_windows_are_counted_as_they_run():
    """BEiT layers exist on one 28x28 window only, so the paper pass keeps their windows: qkv, proj and the attention
    term see the zero-padded windows (L@672: 42x42 -> 56x56 tokens, B@1120: 70x70 -> 84x84). Everything else equals
    the MAE pyramid of the same shapes, whose windows the pass runs globally."""
    beit = count_model("piip_sbl_1568_1120_672_beitv2", "paper").macs
    mae = count_model("piip_sbl_1568_1120_672_mae", "paper").macs
    padding = sum(
        depth * (padded**2 - side**2) * (4 * dim * dim + 2 * 28 * 28 * dim)
        for depth, dim, side, padded in ((24, 1024, 42, 56), (12, 768, 70, 84))
    )
    assert beit - mae == padding
