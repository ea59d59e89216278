"""PIIP-LLaVA towers: CLIP branches, the two-branch projector and the nine released configurations."""

from __future__ import annotations

import json
import logging
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from safetensors.torch import save
from timm.models.convnext import ConvNeXt

import piip_models
from piip_models import BranchCfg, InteractionCfg, PIIPLlava, even_segments
from piip_models.convert import infer_model_name
from piip_models.hub import CheckpointError
from piip_models.layers.projector import BranchMLPProjector
from piip_models.weights import checkpoint_filter_fn

from .test_hub import CHECKPOINTS_PAGE, official_state_dict
from .test_pretrained import seed_hub, torch_bytes

# Released configuration -> (registered tower, extra kwargs, image size, visual tokens, LLM width, interactions).
RELEASED = {
    "PIIP-LLaVA_CLIP-BL_512-256_7B": ("piip_llava_clip_bl_512_256", {}, 512, 1024, 4096, 2),
    "PIIP-LLaVA_CLIP-BL_512-448_7B": ("piip_llava_clip_bl_512_448", {}, 512, 1024, 4096, 12),
    "PIIP-LLaVA_CLIP-BL_512-448_13B": ("piip_llava_clip_bl_512_448_13b", {}, 512, 1024, 5120, 12),
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


# ----------------------------------------------------------------------------------------------------------------
# Released PIIP-LLaVA models (OpenGVLab/PIIP-LLaVA*): whole LLaVA models whose tower and projector the tags load.

TOWER, PROJECTOR = "model.vision_tower.vision_tower.", "model.mm_projector."
LLAVA_TAGS = sorted(
    n for n in timm.list_models("piip_llava_*", pretrained=True, include_tags=True)
    if timm.get_pretrained_cfg(n).hf_hub_id.startswith("OpenGVLab/PIIP-LLaVA")
)
# Released repo -> tag (reference §5.7)
RELEASED_REPOS = {
    "PIIP-LLaVA_CLIP-BL_512-256_7B": "piip_llava_clip_bl_512_256.llava_v1_5_7b",
    "PIIP-LLaVA_CLIP-BL_512-448_7B": "piip_llava_clip_bl_512_448.llava_v1_5_7b",
    "PIIP-LLaVA_CLIP-BL_512-448_13B": "piip_llava_clip_bl_512_448_13b.llava_v1_5_13b",
    "PIIP-LLaVA_ConvNeXt-B_CLIP-L_640-224_7B": "piip_llava_convnext_b_clip_l_640_224.llava_v1_5_7b",
    "PIIP-LLaVA_ConvNeXt-B_CLIP-L_1024-336_7B": "piip_llava_convnext_b_clip_l_1024_336.llava_v1_5_7b",
    "PIIP-LLaVA_ConvNeXt-B_CLIP-L_1024-336_13B": "piip_llava_convnext_b_clip_l_1024_336_13b.llava_v1_5_13b",
    "PIIP-LLaVA_ConvNeXt-L_CLIP-L_1024-336_7B": "piip_llava_convnext_l_clip_l_1024_336.llava_v1_5_7b",
    "PIIP-LLaVA-Plus_ConvNeXt-L_CLIP-L_1024-336_7B": "piip_llava_convnext_l_clip_l_1024_336.llava_plus_7b",
    "PIIP-LLaVA_ConvNeXt-L_CLIP-L_1024-336_13B": "piip_llava_convnext_l_clip_l_1024_336_13b.llava_v1_5_13b",
}
# Our timm CLIP names -> Hugging Face CLIPVisionModel.vision_model names (q/k/v are split separately)
HF_CLIP_RULES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding.weight"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^norm_pre\.", "pre_layrnorm."),
    (r"^blocks\.(\d+)\.", r"encoder.layers.\1."),
    (r"\.attn\.proj\.", ".self_attn.out_proj."),
    (r"\.norm([12])\.", r".layer_norm\1."),
)
LLM = {  # a few tensors of the language model a LLaVA checkpoint carries beside the tower (shapes shrunk)
    "model.embed_tokens.weight": (32, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.1.mlp.down_proj.weight": (16, 16),
    "model.norm.weight": (16,),
    "lm_head.weight": (32, 16),
}


def official_llava_state_dict(model: PIIPLlava, state_dict=None) -> dict[str, torch.Tensor]:
    """The vision tower and projector tensors of the LLaVA checkpoint an official PIIP-LLaVA model equal to ``model``
    saves (reference §7.2, §3.3; ``llava/.../piip/{clip_hf_wrapper,convnext_timm_wrapper}.py``), with their prefixes:
    CLIP branches as Hugging Face CLIPVisionModel (separate q/k/v, unused post-LayerNorm), ConvNeXt branches as
    timm ConvNeXt with ``gamma`` renamed ``weight`` and their unused pooled head, ``ca_weight``/``cffn_weight``."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    interactions = official_state_dict(model, {k: v for k, v in state_dict.items() if k.startswith("interactions.")})
    official = {TOWER + re.sub(r"_gamma$", "_weight", k): v for k, v in interactions.items()
                if k.startswith("interactions.")}
    for key, value in state_dict.items():
        projector = re.fullmatch(r"projector\.branches\.(\d+)\.(.*)", key)
        if projector:
            official[f"{PROJECTOR}branch{int(projector[1]) + 1}.{projector[2]}"] = value
            continue
        branch = re.fullmatch(r"branches\.(\d+)\.(.*)", key)
        if not branch:
            continue
        k, rest = int(branch[1]), branch[2]
        if isinstance(model.branches[k], ConvNeXt):
            official[f"{TOWER}branch{k + 1}.convnext_model.{re.sub(r'gamma$', 'weight', rest)}"] = value
            continue
        prefix = f"{TOWER}branch{k + 1}.clip_model."
        qkv = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", rest)
        if qkv:
            for name, part in zip("qkv", value.chunk(3)):
                official[f"{prefix}encoder.layers.{qkv[1]}.self_attn.{name}_proj.{qkv[2]}"] = part
            continue
        for pattern, repl in HF_CLIP_RULES:
            rest = re.sub(pattern, repl, rest)
        official[prefix + rest] = value.reshape(-1) if rest.endswith("class_embedding") else (
            value[0] if rest.endswith("position_embedding.weight") else value)
    like = next(iter(state_dict.values()))
    for k, branch in enumerate(model.branches):  # modules the official tower has but never runs
        width = branch.num_features
        unused = "convnext_model.head.norm" if isinstance(branch, ConvNeXt) else "clip_model.post_layernorm"
        official.update({f"{TOWER}branch{k + 1}.{unused}.{p}": like.new_zeros(width) for p in ("weight", "bias")})
    return official


def with_language_model(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    like = next(iter(official.values()))
    return {**{k: torch.randn(shape).to(like.device) for k, shape in LLM.items()}, **official}


def test_every_released_llava_repo_has_its_tag():
    assert sorted(RELEASED_REPOS.values()) == LLAVA_TAGS
    page = CHECKPOINTS_PAGE.read_text()
    for repo, tag in RELEASED_REPOS.items():
        cfg = timm.get_pretrained_cfg(tag)
        assert (cfg.hf_hub_id, cfg.hf_hub_filename) == (f"OpenGVLab/{repo}", "model.safetensors.index.json")
        arch = tag.split(".")[0]
        assert f"{arch}.branches" in timm.list_models(arch, include_tags=True)
        assert f"`{tag}`" in page and f"OpenGVLab/{repo}" in page, tag
    assert timm.get_pretrained_cfg("piip_llava_convnext_l_clip_l_1024_336").tag == "llava_v1_5_7b"  # default tag


@pytest.mark.parametrize("tag", LLAVA_TAGS)
def test_released_llava_layout_converts_on_meta(tag, caplog):
    model = timm.create_model(tag, device="meta")
    checkpoint = with_language_model(official_llava_state_dict(model))
    with caplog.at_level(logging.INFO, logger="piip_models.weights"):
        converted = checkpoint_filter_fn(checkpoint, model)
    expected = model.state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert ("kept the vision tower and projector of a LLaVA checkpoint, dropped 5 tensors: lm_head (1), "
            "model.embed_tokens (1), model.layers (2), model.norm (1)") in caplog.text
    assert "dropped 4 official tensors no PIIP module reads" in caplog.text


def test_llava_checkpoint_of_the_13b_tower_is_told_from_the_7b():
    """convert_checkpoint infers the tower of a renamed LLaVA checkpoint from its keys and shapes."""
    model = timm.create_model("piip_llava_clip_bl_512_448_13b", device="meta")
    checkpoint = with_language_model(official_llava_state_dict(model))
    assert infer_model_name("model.safetensors.index.json", checkpoint) == "piip_llava_clip_bl_512_448_13b"


def _hf_clip_tokens(official: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Patch tokens of a Hugging Face CLIP vision tower (embeddings, pre_layrnorm, encoder layers; no post-norm),
    written from transformers' CLIP semantics on the official tensors (quick GELU, LayerNorm eps 1e-5)."""
    def p(name):
        return official[prefix + name]

    def ln(h, name):
        return F.layer_norm(h, h.shape[-1:], p(f"{name}.weight"), p(f"{name}.bias"), eps=1e-5)

    def linear(h, name):
        return F.linear(h, p(f"{name}.weight"), p(f"{name}.bias"))

    h = F.conv2d(x, p("embeddings.patch_embedding.weight"), stride=16).flatten(2).transpose(1, 2)
    cls = p("embeddings.class_embedding").expand(h.shape[0], 1, -1)
    h = ln(torch.cat([cls, h], dim=1) + p("embeddings.position_embedding.weight"), "pre_layrnorm")
    layer = 0
    while f"{prefix}encoder.layers.{layer}.layer_norm1.weight" in official:
        name = f"encoder.layers.{layer}"
        y = ln(h, f"{name}.layer_norm1")
        q, k, v = (linear(y, f"{name}.self_attn.{n}_proj").unflatten(-1, (heads, -1)).transpose(1, 2) for n in "qkv")
        h = h + linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2), f"{name}.self_attn.out_proj")
        y = linear(ln(h, f"{name}.layer_norm2"), f"{name}.mlp.fc1")
        h = h + linear(y * torch.sigmoid(1.702 * y), f"{name}.mlp.fc2")
        layer += 1
    return h[:, 1:]


def _projected(official: dict[str, torch.Tensor], maps: list[torch.Tensor]) -> torch.Tensor:
    """The official TwoBranchMLP on the official tensors: branch 1 resized to branch 2's grid, per-branch
    Linear-GroupNorm(32)-GELU-Linear, summed (reference §3.3)."""
    maps[0] = F.interpolate(maps[0], size=maps[1].shape[-2:], mode="bilinear", align_corners=False)
    out = 0
    for k, branch_map in enumerate(maps):
        p = f"{PROJECTOR}branch{k + 1}."
        h = F.linear(branch_map.permute(0, 2, 3, 1), official[p + "1.weight"], official[p + "1.bias"])
        h = F.gelu(F.group_norm(h.permute(0, 3, 1, 2), 32, official[p + "3.weight"], official[p + "3.bias"]))
        out = out + F.linear(h.permute(0, 2, 3, 1), official[p + "6.weight"], official[p + "6.bias"])
    return out.flatten(1, 2)


def _shards(official: dict[str, torch.Tensor], suffix: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Splits a LLaVA checkpoint into three transformers shards: the first holds only language-model tensors."""
    llm, vision = [k for k in official if k in LLM], [k for k in official if k not in LLM]
    stem = "model" if suffix == "safetensors" else "pytorch_model"
    names = [f"{stem}-0000{i}-of-00003.{suffix}" for i in (1, 2, 3)]
    groups = [llm[:3], llm[3:] + vision[: len(vision) // 2], vision[len(vision) // 2:]]
    shards = {name: {k: official[k].contiguous() for k in keys} for name, keys in zip(names, groups)}
    weight_map = {k: name for name, keys in zip(names, groups) for k in keys}
    return shards, {"metadata": {"total_size": sum(v.numel() * 4 for v in official.values())}, "weight_map": weight_map}


def _tiny_llava_kwargs(convnext: bool) -> dict:
    second = BranchCfg("convnext_atto", 96, ((0, 3), (4, 7)), model_args=dict(
        depths=(2, 1, 1, 1), dims=(32, 64, 96, 128), ls_init_value=0.5)) if convnext else _tiny_clip(64, 64, 32)
    return dict(branches=(_tiny_clip(32, 32, 64), second), interaction=InteractionCfg(num_heads=4), llm_dim=64)


@pytest.mark.parametrize("tag, convnext, suffix", [
    ("piip_llava_convnext_l_clip_l_1024_336.llava_plus_7b", True, "safetensors"),
    # an older transformers upload: pytorch_model.bin.index.json and pickled shards, found in place of the index
    ("piip_llava_clip_bl_512_256.llava_v1_5_7b", False, "bin"),
])
def test_llava_tag_loads_the_tower_from_a_sharded_offline_cache(tag, convnext, suffix, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    kwargs = _tiny_llava_kwargs(convnext)
    source = PIIPLlava(**kwargs)
    ours = {k: torch.randn_like(v) * 0.2 for k, v in source.state_dict().items()}  # open gates included
    official = with_language_model(official_llava_state_dict(source, ours))
    shards, index = _shards(official, suffix)
    serialise = save if suffix == "safetensors" else torch_bytes
    files = {name: serialise(tensors) for name, tensors in shards.items()}
    files[f"{'model.safetensors' if suffix == 'safetensors' else 'pytorch_model.bin'}.index.json"] = json.dumps(
        index).encode()
    del files[next(iter(shards))]  # the language-model-only shard is never fetched: the cache need not hold it
    seed_hub(tmp_path, timm.get_pretrained_cfg(tag).hf_hub_id, files)

    with caplog.at_level(logging.INFO, logger="piip_models"):
        model = timm.create_model(tag, pretrained=True, cache_dir=tmp_path, **kwargs).eval()
    loaded = model.state_dict()
    assert loaded.keys() == ours.keys() and all(torch.equal(loaded[k], v) for k, v in ours.items())
    layer = f"{TOWER}branch1.clip_model.encoder.layers.1.self_attn."
    assert torch.equal(model.branches[0].blocks[1].attn.qkv.weight, torch.cat(
        [official[f"{layer}{n}_proj.weight"] for n in "qkv"]))
    assert torch.equal(model.branches[0].cls_token.flatten(), official[f"{TOWER}branch1.clip_model.embeddings."
                                                                       "class_embedding"])
    assert torch.equal(model.interactions[1].units[0].branch1to2_injector.cffn_gamma,
                       official[f"{TOWER}interactions.1.interaction_units_12.branch1to2_injector.cffn_weight"])
    if convnext:
        assert torch.equal(model.branches[1].stages[2].blocks[0].gamma,
                           official[f"{TOWER}branch2.convnext_model.stages.2.blocks.0.weight"])
    assert "dropped 5 tensors: lm_head (1), model.embed_tokens (1), model.layers (2), model.norm (1)" in caplog.text

    # with closed gates the branches are independent: the CLIP tokens and the visual tokens follow from the
    # official tensors through Hugging Face CLIP's and TwoBranchMLP's own formulas
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ca_gamma", "cffn_gamma")):
                param.zero_()
        x = torch.randn(2, 3, 96 if convnext else 64, 128 if convnext else 64)
        tokens, geoms = model.forward_branches(x)
        maps = [t.transpose(1, 2).reshape(2, -1, g.height, g.width) for t, g in zip(tokens, geoms)]
        for k, branch in enumerate(model.branches):
            if isinstance(branch, ConvNeXt):
                continue
            image = F.interpolate(x, scale_factor=model.branch_sizes[k] / model.branch_sizes[-1], mode="bilinear",
                                  align_corners=False)
            reference = _hf_clip_tokens(official, f"{TOWER}branch{k + 1}.clip_model.", image, heads=2)
            torch.testing.assert_close(tokens[k], reference, rtol=1e-5, atol=1e-5)
            maps[k] = reference.transpose(1, 2).reshape(maps[k].shape)
        torch.testing.assert_close(model(x), _projected(official, maps), rtol=1e-5, atol=1e-5)


def test_llava_shard_missing_offline_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    kwargs = _tiny_llava_kwargs(convnext=True)
    official = with_language_model(official_llava_state_dict(PIIPLlava(**kwargs)))
    shards, index = _shards(official, "safetensors")
    tag = "piip_llava_convnext_b_clip_l_640_224"
    repo = timm.get_pretrained_cfg(tag).hf_hub_id
    seed_hub(tmp_path, repo, {"model.safetensors.index.json": json.dumps(index).encode(),
                              "model-00002-of-00003.safetensors": save(shards["model-00002-of-00003.safetensors"])})
    with pytest.raises(CheckpointError, match=rf"{repo}/model-00003-of-00003.safetensors \(a shard of "
                                              r"model.safetensors.index.json\) is not in the Hugging Face cache .*"
                                              rf"hf download {repo} model-00003-of-00003.safetensors"):
        timm.create_model(tag, pretrained=True, cache_dir=tmp_path, **kwargs)
