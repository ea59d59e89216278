"""Windowed BEiT v2 branches: per-window relative position bias, timm checkpoint conversion, PIIP-SBL BEiTv2."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.beit import Beit

from piip_models import PIIP, BranchCfg, even_segments
from piip_models.layers.window_attention import rel_pos_attention, windowed_attention
from piip_models.weights import branch_checkpoint_filter_fn, checkpoint_filter_fn

from .test_pretrained import run_offline, seed_hf_cache


def _attention(window: int, dim: int = 32, heads: int = 2):
    attn = rel_pos_attention(window)(dim, num_heads=heads, qkv_bias=True).eval()
    with torch.no_grad():
        for param in attn.parameters():
            param.normal_()
    return attn


def _reference_windowed_attention(attn, x: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """The official windowed BEiT attention, one window at a time: zero-pad the normalised tokens, project with
    (q_bias, 0, v_bias), add the window's relative position bias to the scaled logits."""
    batch, _, dim = x.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    height, width = grid
    padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
    tokens = F.pad(x.view(batch, height, width, dim), (0, 0, 0, padded_w - width, 0, padded_h - height))
    coords = [(i, j) for i in range(window) for j in range(window)]
    side = 2 * window - 1
    index = torch.tensor([[(a[0] - b[0] + window - 1) * side + (a[1] - b[1] + window - 1) for b in coords]
                          for a in coords])
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)
    qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    out = torch.zeros(batch, padded_h, padded_w, dim)
    for top in range(0, padded_h, window):
        for left in range(0, padded_w, window):
            win = tokens[:, top:top + window, left:left + window].reshape(batch, window * window, dim)
            q, k, v = F.linear(win, attn.qkv.weight, qkv_bias).view(batch, -1, 3, heads, head_dim).unbind(2)
            logits = torch.einsum("bqhd,bkhd->bhqk", q * head_dim ** -0.5, k) + bias
            mixed = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(batch, -1, dim)
            out[:, top:top + window, left:left + window] = attn.proj(mixed).view(batch, window, window, dim)
    return out[:, :height, :width].reshape(batch, height * width, dim)


def test_windowed_rel_pos_attention_matches_the_official_formula():
    attn = _attention(window=4)
    x = torch.randn(2, 5 * 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            windowed_attention(attn, x, (5, 7), 4), _reference_windowed_attention(attn, x, (5, 7), 4)
        )


def test_global_rel_pos_attention_is_one_window_and_rejects_other_grids():
    attn = _attention(window=4)
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _reference_windowed_attention(attn, x, (4, 4), 4))
        with pytest.raises(ValueError, match="needs 16 tokens, got 20"):
            attn(torch.randn(1, 20, 32))
        with pytest.raises(ValueError, match="covers 4x4 windows, got window 3"):
            windowed_attention(attn, torch.randn(1, 36, 32), (6, 6), 3)


def _tiny_timm_beit() -> Beit:
    beit = Beit(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, use_abs_pos_emb=False,
                use_rel_pos_bias=True, init_values=0.1, num_classes=0)
    with torch.no_grad():
        for name, param in beit.named_parameters():
            if "relative_position_bias_table" in name or name.endswith(("q_bias", "v_bias")):
                param.normal_()
    return beit


def _tiny_windowed_beit(window: int):
    return timm.create_model("windowed_beitv2_base_patch16_224", img_size=64, embed_dim=32, depth=2, num_heads=2,
                             window_size=window, num_classes=0, global_pool="", fc_norm=False, final_norm=False,
                             class_token=False)


def test_timm_beit_checkpoint_loads_into_a_windowed_branch():
    beit = _tiny_timm_beit()
    branch = _tiny_windowed_beit(window=4)  # BEiT's own 4x4 grid: the table keeps its values
    branch.load_state_dict(branch_checkpoint_filter_fn(beit.state_dict(), branch))
    for ours, theirs in zip(branch.blocks, beit.blocks):
        torch.testing.assert_close(ours.attn.position_bias(4), theirs.attn._get_rel_pos_bias()[0, :, 1:, 1:])
        torch.testing.assert_close(ours.ls1.gamma, theirs.gamma_1)
        torch.testing.assert_close(ours.attn.qkv_bias(), torch.cat([theirs.attn.q_bias, theirs.attn.k_bias,
                                                                     theirs.attn.v_bias]))


def test_timm_beit_table_is_resized_to_a_larger_window():
    beit = _tiny_timm_beit()
    branch = _tiny_windowed_beit(window=7)
    branch.load_state_dict(branch_checkpoint_filter_fn(beit.state_dict(), branch))
    src = beit.blocks[0].attn.relative_position_bias_table[:7 * 7].view(7, 7, 2)
    dst = branch.blocks[0].attn.relative_position_bias_table.view(13, 13, 2)
    assert dst.shape == (13, 13, 2)
    torch.testing.assert_close(dst[6, 6], src[3, 3])  # zero offset stays zero offset under the bicubic resize
    assert not torch.equal(dst[0, 0], src[0, 0])


def test_piip_with_beit_branch_runs_windowed_and_rejects_global_blocks():
    beit = BranchCfg("windowed_beitv2_base_patch16_224", 32, even_segments(2, 2), window_size=2,
                     model_args=dict(embed_dim=64, depth=2, num_heads=2, window_size=2))
    vit = BranchCfg("vit_small_patch16_224", 64, even_segments(2, 2), window_size=2,
                    model_args=dict(embed_dim=32, depth=2, num_heads=2, no_embed_class=True))
    model = PIIP(branches=(beit, vit), head_type="dense", class_token=False, num_classes=0, with_fpn=True)
    assert model.branches[0].pos_embed is None
    maps = model.forward_intermediates(torch.randn(1, 3, 80, 112), intermediates_only=True)
    sum(m.mean() for m in maps).backward()
    assert [m.shape[-2:] for m in maps] == [(20, 28), (10, 14), (5, 7), (2, 3)]
    assert model.branches[0].blocks[0].attn.relative_position_bias_table.grad is not None

    global_beit = PIIP(branches=(BranchCfg(beit.model_name, 32, beit.segments, model_args=beit.model_args), vit),
                       head_type="dense", class_token=False, num_classes=0)
    with pytest.raises(ValueError, match="run the block with window=2"):
        global_beit.forward_features(torch.randn(1, 3, 80, 112))


def test_piip_sbl_beitv2_matches_the_official_module_size():
    # Official SBL (DeiT III) module 547,810,051, with BEiT v2 L/B branches: no absolute position embeddings
    # (196 x (1024 + 768)), no key bias (24 x 1024 + 12 x 768), a 55 x 55 table per block (16 or 12 heads).
    expected = 547_810_051 - 196 * (1024 + 768) - (24 * 1024 + 12 * 768) + 55 * 55 * (24 * 16 + 12 * 12)
    model = timm.create_model("piip_sbl_1568_1120_672_beitv2", with_fpn=True, device="meta")
    assert sum(p.numel() for p in model.parameters()) == expected == 549_022_227


def test_beit_branch_weights_load_through_the_hub_path(tmp_path):
    beit = _tiny_timm_beit()
    seed_hf_cache(tmp_path / "hub", "timm/beitv2_base_patch16_224.in1k_ft_in22k", beit.state_dict())
    torch.save(beit.state_dict(), tmp_path / "source.pt")
    out = run_offline(tmp_path / "hub", f"""
        import torch, piip_models
        from piip_models import BranchCfg, even_segments
        src = torch.load({str(tmp_path / "source.pt")!r})
        branches = [
            BranchCfg("windowed_beitv2_base_patch16_224.in1k_ft_in22k", size, even_segments(2, 2), window_size=2,
                      model_args=dict(embed_dim=32, depth=2, num_heads=2, window_size=2))
            for size in (32, 64)
        ]
        model = piip_models.create_pyramid(branches, pretrained=True, head_type="dense", class_token=False,
                                           num_classes=0)
        for branch in model.branches:
            assert torch.equal(branch.blocks[1].mlp.fc1.weight, src["blocks.1.mlp.fc1.weight"])
            assert torch.equal(branch.blocks[0].ls2.gamma, src["blocks.0.gamma_2"])
            assert torch.equal(branch.blocks[0].attn.q_bias, src["blocks.0.attn.q_bias"])
            assert branch.blocks[0].attn.relative_position_bias_table.shape == (9, 2)  # 7x7 (+3 cls) -> 3x3
        print("ok")
    """)
    assert out.startswith("ok")


def test_relative_position_tables_skip_weight_decay():
    model = timm.create_model("piip_sbl_1568_1120_672_beitv2", device="meta")
    assert "branches.*.relative_position_bias_table" in model.no_weight_decay()
    plain = timm.create_model("piip_tsb", device="meta")
    assert "branches.*.relative_position_bias_table" not in plain.no_weight_decay()


def test_official_beit_branch_keys_load_into_piip():
    beit = BranchCfg("windowed_beitv2_base_patch16_224", 32, even_segments(2, 2), window_size=2,
                     model_args=dict(embed_dim=64, depth=2, num_heads=2, window_size=2))
    vit = BranchCfg("vit_small_patch16_224", 64, even_segments(2, 2), window_size=2,
                    model_args=dict(embed_dim=32, depth=2, num_heads=2, no_embed_class=True))
    source = PIIP(branches=(beit, vit), head_type="dense", class_token=False, num_classes=0)
    official = {}
    for key, value in source.state_dict().items():
        if key.startswith("branches.0."):  # the official BEiT module names: branch1.*, gamma_1/2, index buffers
            key = key.replace("branches.0.", "branch1.")
            key = key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        official[f"backbone.{key}"] = value
    for block in range(2):
        official[f"backbone.branch1.blocks.{block}.attn.relative_position_index"] = torch.zeros(4, 4, dtype=torch.long)
    target = PIIP(branches=(beit, vit), head_type="dense", class_token=False, num_classes=0)
    target.load_state_dict(checkpoint_filter_fn({"state_dict": official}, target))
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
