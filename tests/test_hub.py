"""Released checkpoints: tags, official layouts through ``pretrained=True`` (seeded offline Hub cache), safe reading,
integrity checks and the Hub-format export (``convert_checkpoint`` -> ``local-dir:`` / ``hf-hub:``)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models.convnext import ConvNeXt

from piip_models import BranchCfg, cli, even_segments
from piip_models.convert import add_convert_command, convert_checkpoint, infer_model_name
from piip_models.hub import (
    OFFICIAL_REPO,
    CheckpointError,
    UnsafeCheckpointError,
    check_safetensors,
    read_checkpoint,
    verify_cached_file,
)
from piip_models.official import model_kwargs_from_official
from piip_models.weights import CheckpointMismatchError, checkpoint_filter_fn, unwrap_state_dict

from .conftest import fixtures_dir, require_fixture
from .test_pretrained import run_offline, seed_hub, torch_bytes

# the released checkpoints table (generated from the cfgs by docs/gen_tables.py)
CHECKPOINTS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "pretrained.md"
RELEASED = sorted(
    n for n in timm.list_models("piip_*", pretrained=True, include_tags=True)
    if timm.get_pretrained_cfg(n).hf_hub_id == OFFICIAL_REPO
)
DETECTOR_HEADS = {  # a few tensors of the mmdet heads a detection checkpoint carries beside the backbone
    "neck.lateral_convs.0.conv.weight": (256, 8, 1, 1),
    "rpn_head.rpn_cls.weight": (3, 256, 1, 1),
    "roi_head.bbox_head.fc_cls.weight": (81, 1024),
}


# ----------------------------------------------------------------------------------------------------------------
# Official layouts, written from the documented key rules (reference §7.2), independently of the conversion code.


def key_prefix(single: bool, k: int) -> str:
    return "" if single else f"branch{k + 1}."


# Our timm ConvNeXt names -> the Hugging Face ConvNeXt names of the official detection branches
HF_CONVNEXT_RULES = (
    (r"^stem\.0\.", "convnext_model.embeddings.patch_embeddings."),
    (r"^stem\.1\.", "convnext_model.embeddings.layernorm."),
    (r"^stages\.(\d+)\.downsample\.", r"convnext_model.encoder.stages.\1.downsampling_layer."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"convnext_model.encoder.stages.\1.layers.\2."),
    (r"\.conv_dw\.", ".dwconv."),
    (r"(layers\.\d+)\.norm\.", r"\1.layernorm."),
    (r"\.mlp\.fc([12])\.", r".pwconv\1."),
    (r"\.gamma$", ".layer_scale_parameter"),
)


def official_state_dict(model, state_dict=None) -> dict[str, torch.Tensor]:
    """The checkpoint an official module equal to ``model`` would save, from ``state_dict`` (default: the model's
    own tensors; meta tensors on a meta model)."""
    single = len(model.branches) == 1
    official: dict[str, torch.Tensor] = {}
    for key, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        if key == "branch_weights" or key.startswith("stage_branch_weights."):
            prefix = "" if key == "branch_weights" else f"intermediate_merging_{key.split('.')[1]}_"
            official.update({f"{prefix}w{k + 1}": w for k, w in enumerate(tensor)})
            continue
        match = re.fullmatch(r"branches\.(\d+)\.(.*)", key)
        if match:
            k, rest = int(match[1]), match[2]
            branch = model.branches[k]
            if isinstance(branch, ConvNeXt):
                for pattern, repl in HF_CONVNEXT_RULES:
                    rest = re.sub(pattern, repl, rest)
            else:
                beit = hasattr(branch.blocks[0].attn, "relative_position_bias_table")
                if branch.no_embed_class or beit:  # DeiT-type `vit_models` and BEiT: LayerScale named gamma_1/2
                    rest = re.sub(r"ls([12])\.gamma$", r"gamma_\1", rest)
                elif rest == "pos_embed" and branch.num_prefix_tokens == 0:  # InternViT-type: always a class slot
                    tensor = torch.cat([tensor.new_zeros(1, 1, tensor.shape[2]), tensor], dim=1)
                if beit and rest.endswith("attn.relative_position_bias_table"):  # BEiT also saves its index buffer
                    window = (math.isqrt(tensor.shape[0]) + 1) // 2
                    index = key_prefix(single, k) + rest.replace("bias_table", "index")
                    official[index] = torch.zeros(window**2, window**2, dtype=torch.long, device=tensor.device)
            key = key_prefix(single, k) + rest
        key = re.sub(r"^interactions\.(\d+)\.units\.(\d+)\.",
                     lambda m: f"interactions.{m[1]}.interaction_units_{int(m[2]) + 1}{int(m[2]) + 2}.", key)
        key = key.replace(".ffn.dwconv.", ".ffn.dwconv.dwconv.")
        key = re.sub(r"^merges\.(\d+)\.", lambda m: f"merge_branch{int(m[1]) + 1}.", key)
        key = re.sub(r"^stage_merges\.(\d+)\.(\d+)\.",
                     lambda m: f"intermediate_merging_{m[1]}_branch{int(m[2]) + 1}.", key)
        key = re.sub(r"^fpn\.p(\d)\.", lambda m: f"{'up' if single else 'fpn'}{int(m[1]) - 1}.", key)
        official[key] = tensor
    like = next(iter(official.values()))
    for k, branch in enumerate(model.branches):
        if isinstance(branch, ConvNeXt):  # the Hugging Face ConvNeXt's final (pooling) norm, unused by PIIP
            official.update({f"{key_prefix(single, k)}convnext_model.layernorm.{p}": like.new_zeros(
                branch.num_features) for p in ("weight", "bias")})
    if model.fpn is not None and "p2" not in model.fpn and len(model.branches) == 3:  # 3-branch DINO: unused fpn1
        dim = model.embed_dims[0]
        official.update({
            name: like.new_zeros(shape) for name, shape in (
                ("fpn1.0.weight", (dim, dim, 2, 2)), ("fpn1.0.bias", (dim,)), ("fpn1.1.weight", (dim,)),
                ("fpn1.1.bias", (dim,)), ("fpn1.3.weight", (dim, dim, 2, 2)), ("fpn1.3.bias", (dim,)))
        })
    return official


def official_layout(model) -> dict[str, tuple[int, ...]]:
    """Official key -> shape of the checkpoint an official module equal to ``model`` would save."""
    return {k: tuple(v.shape) for k, v in official_state_dict(model).items()}


def wrap_official(state_dict: dict[str, torch.Tensor], detection: bool) -> dict:
    """Wraps an official state dict as the released files do: classification ``{"model": ...}`` (DeiT main.py with
    its argparse args); detection an mmcv checkpoint with ``meta``, ``backbone.`` prefix and detector heads."""
    if not detection:
        return {"model": state_dict, "args": argparse.Namespace(model="piip_3branch"), "epoch": 19}
    device = next(iter(state_dict.values())).device
    heads = {k: torch.randn(shape).to(device) for k, shape in DETECTOR_HEADS.items()}
    return {
        "meta": {"CLASSES": ("person", "bicycle"), "seed": np.int64(0), "mmdet_version": "2.25.3"},
        "state_dict": {**{f"backbone.{k}": v for k, v in state_dict.items()}, **heads},
    }


def _meta_model(name: str, **kwargs):
    dense = timm.get_pretrained_cfg(name).num_classes == 0
    return timm.create_model(name, device="meta", **(dict(with_fpn=True) if dense else {}), **kwargs)


@pytest.mark.parametrize("keys_file, name", [
    ("keys_piip_3branch_tsb_368-192-128_cls_token_deit1.json", "piip_tsb"),
    ("keys_piip_3branch_sbl_384-192-128_cls_token_augreg.json", "piip_sbl"),
    ("keys_det_mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16.json", "piip_tsb_1568_1120_672"),
])
def test_key_rules_reproduce_the_released_key_lists(keys_file, name):
    path = fixtures_dir() / keys_file
    if not path.is_file():
        pytest.skip(f"{path} not available")
    released = {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
    assert official_layout(_meta_model(name)) == released


def test_every_released_tag_points_at_a_released_file():
    # the full tag (checkpoint) first, the timm-branch initialisation kept as `.branches`
    assert len(RELEASED) == 31
    page = CHECKPOINTS_PAGE.read_text()
    for name in RELEASED:
        cfg = timm.get_pretrained_cfg(name)
        arch, tag = name.split(".")
        assert timm.get_pretrained_cfg(arch).tag == tag
        assert f"{arch}.branches" in timm.list_models(arch, include_tags=True)
        tasks = ("classification",) if cfg.num_classes else ("detection", "segmentation")
        assert re.fullmatch(rf"({'|'.join(tasks)})/[\w-]+\.pth", cfg.hf_hub_filename), cfg.hf_hub_filename
        assert f"`{name}`" in page and Path(cfg.hf_hub_filename).name in page, name


@pytest.mark.parametrize("name", RELEASED)
def test_released_layout_converts_on_meta(name):
    # classification (DeiT gammas, AugReg class slots), mmdet/mmseg (backbone. prefix, heads, conv merges, fpn1/fpn2,
    # 3-branch DINO's unused fpn1, InternViT-class class slots, no-projection interactions, BEiT index buffers,
    # InternViT-6B qk norms), single-ViT baselines
    model = _meta_model(name)
    layout = official_layout(model)
    meta = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    checkpoint = wrap_official(meta, detection=model.head_type == "dense")
    converted = checkpoint_filter_fn(checkpoint, model)
    expected = model.state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)


# ----------------------------------------------------------------------------------------------------------------
# A seeded offline Hub cache in the real layout (test_pretrained.seed_hub).


@pytest.fixture
def offline(monkeypatch):
    """The Hub unreachable for this process, as HF_HUB_OFFLINE=1 would make it (no request, no retry)."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert hf_constants.is_offline_mode()


def _fixture_case(name: str):
    path = require_fixture(name)
    config = json.loads((path / "config.json").read_text())
    return config, load_file(path / "state_dict.safetensors"), load_file(path / "io.safetensors")


# fixture -> (tag it is served as, model kwargs beyond the config, official wrapper)
FIXTURE_TAGS = {
    "cls_3branch_deit_small": ("piip_tsb.in1k", {}),
    "cls_3branch_augreg_small": ("piip_sbl.in1k", {}),
    # the DeiT fixture ran the official non-flash window attention (pad after qkv), the AugReg one pad-before-qkv
    "det_3branch_small": ("piip_tsb_1568_1120_672.coco_mask_rcnn", dict(window_padding="after_qkv")),
    "det_3branch_augreg_small": ("piip_sbl_1568_1120_672_augreg.coco_mask_rcnn", {}),
}


@pytest.mark.parametrize("fixture", sorted(FIXTURE_TAGS))
def test_pretrained_tag_loads_official_checkpoint_from_offline_cache(fixture, tmp_path, offline, caplog):
    tag, extra = FIXTURE_TAGS[fixture]
    config, state_dict, io = _fixture_case(fixture)
    detection = fixture.startswith("det")
    filename = timm.get_pretrained_cfg(tag).hf_hub_filename
    seed_hub(tmp_path, OFFICIAL_REPO, {filename: torch_bytes(wrap_official(state_dict, detection))})
    kwargs = dict(model_kwargs_from_official(config["kwargs"]), **extra)
    kwargs.pop("with_fpn", None)  # features_only builds the pyramid of a dense model

    with caplog.at_level(logging.INFO, logger="piip_models"):
        model = timm.create_model(tag, pretrained=True, cache_dir=tmp_path, features_only=detection, **kwargs)
    with torch.no_grad():
        out = model.eval()(io["input"])
    if detection:
        for level, feature in enumerate(out):
            torch.testing.assert_close(feature, io[f"fpn{level + 1}"], rtol=1e-4, atol=2e-4)
        assert "dropped 3 tensors: neck (1), roi_head (1), rpn_head (1)" in caplog.text
    else:
        torch.testing.assert_close(out, io["logits"], rtol=1e-4, atol=1e-4)


def test_baseline_tag_loads_the_single_vit_layout_with_a_layernorm_pyramid(tmp_path, offline):
    branch = BranchCfg("deit3_base_patch16_224", 64, even_segments(4, 4), model_args=dict(
        embed_dim=64, depth=4, num_heads=2, init_values=1.0), pos_embed_size=64, window_size=2, global_blocks=(2,))
    reference = timm.create_model("piip_baseline_vit_b_1024", branches=(branch,), with_fpn=True)
    official = {k: torch.randn(shape) for k, shape in official_layout(reference).items()}
    assert "up1.1.weight" in official and "blocks.0.gamma_1" in official and "patch_embed.proj.weight" in official
    filename = timm.get_pretrained_cfg("piip_baseline_vit_b_1024").hf_hub_filename
    seed_hub(tmp_path, OFFICIAL_REPO, {filename: torch_bytes(wrap_official(official, detection=True))})

    model = timm.create_model("piip_baseline_vit_b_1024", pretrained=True, cache_dir=tmp_path, branches=(branch,),
                              with_fpn=True).eval()
    assert torch.equal(model.branches[0].blocks[3].ls2.gamma, official["blocks.3.gamma_2"])
    assert torch.equal(model.fpn.p3[0].weight, official["up2.0.weight"])
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        p2 = model.forward_pyramid(features, levels=[0])[0]
        # the official stride-4 level: ConvT, channels-first LayerNorm (eps 1e-6, statistics over channels), GELU, ConvT
        y = F.conv_transpose2d(features, official["up1.0.weight"], official["up1.0.bias"], stride=2)
        y = (y - y.mean(1, keepdim=True)) / torch.sqrt(y.var(1, unbiased=False, keepdim=True) + 1e-6)
        y = official["up1.1.weight"][:, None, None] * y + official["up1.1.bias"][:, None, None]
        y = F.conv_transpose2d(F.gelu(y), official["up1.3.weight"], official["up1.3.bias"], stride=2)
    torch.testing.assert_close(p2, y, rtol=1e-5, atol=1e-5)


def test_num_classes_override_keeps_a_fresh_head(tmp_path, offline):
    config, state_dict, _ = _fixture_case("cls_3branch_deit_small")
    seed_hub(tmp_path, OFFICIAL_REPO, {timm.get_pretrained_cfg("piip_tsb").hf_hub_filename: torch_bytes(
        wrap_official(state_dict, detection=False))})
    kwargs = dict(model_kwargs_from_official(config["kwargs"]), num_classes=5)
    model = timm.create_model("piip_tsb.in1k", pretrained=True, cache_dir=tmp_path, **kwargs)
    assert model.branches[0].head.weight.shape[0] == 5
    assert torch.equal(model.branches[2].blocks[1].ls1.gamma, state_dict["branch3.blocks.1.gamma_1"])


def test_offline_without_cache_names_the_file_to_fetch_quickly(tmp_path):
    out = run_offline(tmp_path / "empty", """
        import time, timm, piip_models
        start = time.time()
        try:
            timm.create_model("piip_tsb", pretrained=True)
        except Exception as e:
            print(type(e).__name__, round(time.time() - start, 2), str(e))
    """)
    name, seconds, message = out.split(" ", 2)
    assert name == "CheckpointError" and float(seconds) < 5, out
    assert "OpenGVLab/PIIP/classification/piip_3branch_tsb_368-192-128_cls_token_deit1.pth" in message
    assert "HF_HUB_OFFLINE=1" in message and "hf download OpenGVLab/PIIP" in message


# ----------------------------------------------------------------------------------------------------------------
# Safe reading and integrity


class _Payload:
    """Unpickling this runs code: it would write ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _malicious_files(tmp_path: Path) -> dict[str, Path]:
    import pickle

    marker = tmp_path / "pwned"
    checkpoint = {"model": {"w": torch.ones(1)}, "payload": _Payload(marker)}
    files = {"zip": tmp_path / "zip.pth", "legacy": tmp_path / "legacy.pth", "pickle4": tmp_path / "p4.pth"}
    torch.save(checkpoint, files["zip"])
    torch.save(checkpoint, files["legacy"], _use_new_zipfile_serialization=False)
    files["pickle4"].write_bytes(pickle.dumps(checkpoint, protocol=4))  # a bare pickle, not torch.save
    return {**files, "marker": marker}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind, reason", [
    ("zip", "calls (builtins\\.)?exec"),
    ("legacy", "calls (builtins\\.)?exec"),
    ("pickle4", "uses pickle instructions it cannot check"),
])
def test_malicious_pickle_is_refused_not_run(kind, reason, tmp_path):
    files = _malicious_files(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=rf"refused to read .*: its pickle {reason}"):
        read_checkpoint(files[kind])
    with pytest.raises(UnsafeCheckpointError):
        convert_checkpoint(files[kind], tmp_path / "out", model_name="piip_tsb")
    assert not files["marker"].exists()


def test_malicious_hub_checkpoint_is_refused_and_safetensors_preferred(tmp_path, offline):
    files = _malicious_files(tmp_path)
    config, state_dict, io = _fixture_case("cls_3branch_deit_small")
    kwargs = model_kwargs_from_official(config["kwargs"])
    filename = timm.get_pretrained_cfg("piip_tsb").hf_hub_filename
    seed_hub(tmp_path / "bad", OFFICIAL_REPO, {filename: files["zip"].read_bytes()})
    with pytest.raises(UnsafeCheckpointError):
        timm.create_model("piip_tsb", pretrained=True, cache_dir=tmp_path / "bad", **kwargs)
    assert not files["marker"].exists()

    # beside the same pickle, a .safetensors file of the same name is what gets read
    safe = tmp_path / "sd.safetensors"
    save_file(state_dict, safe)
    seed_hub(tmp_path / "good", OFFICIAL_REPO, {filename: files["zip"].read_bytes(),
                                                filename.replace(".pth", ".safetensors"): safe.read_bytes()})
    model = timm.create_model("piip_tsb", pretrained=True, cache_dir=tmp_path / "good", **kwargs).eval()
    assert not files["marker"].exists()
    with torch.no_grad():
        torch.testing.assert_close(model(io["input"]), io["logits"], rtol=1e-4, atol=1e-4)


def test_metadata_types_of_training_checkpoints_are_readable(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"meta": {"seed": np.int64(3), "score": np.float64(0.5)}, "args": argparse.Namespace(lr=3e-5),
                "state_dict": {"backbone.w1": torch.ones(())}}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint["meta"]["seed"] == 3 and checkpoint["args"].lr == 3e-5
    assert unwrap_state_dict(checkpoint) == {"w1": torch.ones(())}
    # the same file as numpy 1 writes it (the released checkpoints predate numpy 2)
    numpy1 = tmp_path / "numpy1.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(numpy1, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(item, data)
    assert read_checkpoint(numpy1)["meta"]["score"] == 0.5


def test_truncated_or_corrupt_files_raise_clear_errors(tmp_path, offline):
    good = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(8)}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    check_safetensors(good)
    with pytest.raises(CheckpointError, match=r"truncated or corrupt: its header describes \d+ bytes, the file has"):
        read_checkpoint(truncated)
    (tmp_path / "stub.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        read_checkpoint(tmp_path / "stub.safetensors")
    pickled = tmp_path / "x.pth"
    torch.save({"model": {"w": torch.randn(1000)}}, pickled)
    (tmp_path / "cut.pth").write_bytes(pickled.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.pth")

    # a cached Hub file whose content no longer matches the Hub's sha256 (an interrupted or damaged download)
    filename = timm.get_pretrained_cfg("piip_tsb").hf_hub_filename
    seed_hub(tmp_path / "hub", OFFICIAL_REPO, {filename: pickled.read_bytes()})
    blob = next((tmp_path / "hub").glob("models--*/blobs/*"))
    blob.write_bytes(pickled.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"corrupt or truncated .* its sha256 is [0-9a-f]{64}, the Hub's is"):
        timm.create_model("piip_tsb", pretrained=True, cache_dir=tmp_path / "hub")


def test_cache_files_are_verified_by_their_content_address(tmp_path):
    seed_hub(tmp_path, "org/repo", {"config.json": b'{"a": 1}', "model.safetensors": b"x" * 100})
    snapshot = next(tmp_path.glob("models--org--repo/snapshots/*"))
    assert verify_cached_file(snapshot / "config.json") and verify_cached_file(snapshot / "model.safetensors")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"no content address")
    assert not verify_cached_file(plain)


def test_checkpoint_for_another_model_lists_the_mismatches_and_loads_nothing(tmp_path):
    deit_config, _, _ = _fixture_case("cls_3branch_deit_small")
    _, augreg_state_dict, _ = _fixture_case("cls_3branch_augreg_small")
    model = timm.create_model("piip_tsb", **model_kwargs_from_official(deit_config["kwargs"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "augreg.pth"
    torch.save({"model": augreg_state_dict}, path)
    with pytest.raises(CheckpointMismatchError) as error:
        model.load_pretrained(str(path))
    message = str(error.value)
    assert re.search(r"checkpoint does not fit piip_tsb \(nothing was loaded\): \d+ missing, \d+ unexpected and "
                     r"\d+ mis-shaped", message)
    # DeiT LayerScale the AugReg checkpoint lacks; its branch 1 has 6 blocks, not 4, and other widths
    assert "missing from the checkpoint (24):\n    branches.0.blocks.0.ls1.gamma (128,)" in message
    assert "not in the model (24):\n    branches.0.blocks.4.attn.proj.bias (96,)" in message
    assert "shape mismatch (341):\n    branches.0.blocks.0.attn.proj.bias: checkpoint (96,), model (128,)" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_released_checkpoint_of_another_model_is_refused_on_meta():
    path = fixtures_dir() / "keys_piip_3branch_sbl_384-192-128_cls_token_augreg.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    sbl = {k: torch.empty(v, device="meta") for k, v in json.loads(path.read_text()).items()}
    with pytest.raises(CheckpointMismatchError, match=r"not in the model \(144\):\n    branches\.0\.blocks\.12\."):
        checkpoint_filter_fn({"model": sbl}, timm.create_model("piip_tsb", device="meta"))


def test_detector_heads_are_dropped_with_a_report(caplog):
    checkpoint = {"state_dict": {"backbone.w1": torch.ones(()), "neck.a": torch.ones(1), "neck.b": torch.ones(1),
                                 "bbox_head.c": torch.ones(1)}, "optimizer": {"state": {}}}
    with caplog.at_level(logging.INFO, logger="piip_models.weights"):
        assert unwrap_state_dict(checkpoint) == {"w1": torch.ones(())}
    assert "dropped 3 tensors: bbox_head (1), neck (2)" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Export: official -> convert -> local-dir: / hf-hub:, bit for bit


@pytest.fixture(scope="module")
def released_tsb(tmp_path_factory):
    """A random official-layout PIIP-TSB classification checkpoint under its released file name."""
    folder = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    layout = official_layout(timm.create_model("piip_tsb", device="meta"))
    state_dict = {k: torch.randn(shape) * 0.05 for k, shape in layout.items()}
    path = folder / Path(timm.get_pretrained_cfg("piip_tsb").hf_hub_filename).name
    torch.save(wrap_official(state_dict, detection=False), path)
    return path


def test_official_convert_local_dir_and_hf_hub_round_trip(released_tsb, tmp_path, offline):
    out = convert_checkpoint(released_tsb, tmp_path / "export")  # the model is inferred from the file name
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "piip_tsb" and config["pretrained_cfg"]["tag"] == "in1k"
    assert "hf_hub_id" not in config["pretrained_cfg"] and config["model_args"]["global_pool"] == "first_patch"

    x = torch.randn(1, 3, 96, 112)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model.pretrained_cfg["source"] == "local-dir"
    with torch.no_grad():
        exported = model(x)
        model.load_pretrained(str(released_tsb))  # the official file itself, into the same model
        assert torch.equal(model(x), exported)
    # timm's push_to_hf_hub uploads what save_for_hf writes: the same weights and model arguments
    timm.models.save_for_hf(model, tmp_path / "push", safe_serialization=True)
    pushed = json.loads((tmp_path / "push" / "config.json").read_text())
    assert pushed["architecture"] == "piip_tsb" and pushed["model_args"] == config["model_args"]
    with safe_open(tmp_path / "push" / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert torch.equal(a.get_tensor("branches.0.pos_embed"), b.get_tensor("branches.0.pos_embed"))

    seed_hub(tmp_path / "hub", "someone/piip-tsb-in1k", {p.name: p.read_bytes() for p in out.iterdir()})
    hub = timm.create_model("hf-hub:someone/piip-tsb-in1k", pretrained=True, cache_dir=tmp_path / "hub")
    assert hub.pretrained_cfg["source"] == "hf-hub"
    reference = model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in hub.state_dict().items())  # same weights: same outputs
    del model, hub

    # the same folder with its weights cut short: a clear error before timm reads it
    shutil.copy(out / "config.json", tmp_path / "config.json")
    with (out / "model.safetensors").open("rb") as src:
        (tmp_path / "model.safetensors").write_bytes(src.read(1 << 20))
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)


def test_convert_command_infers_the_model_from_keys(released_tsb, tmp_path):
    renamed = tmp_path / "my_finetune.pth"
    shutil.copy(released_tsb, renamed)
    assert infer_model_name(renamed, read_checkpoint(renamed)) == "piip_tsb"

    parser = argparse.ArgumentParser(prog="piip-models")
    add_convert_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", str(renamed), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architecture"] == "piip_tsb"
    exported = load_file(tmp_path / "out" / "model.safetensors")
    original = read_checkpoint(renamed)["model"]
    assert torch.equal(exported["branches.2.blocks.11.ls2.gamma"], original["branch3.blocks.11.gamma_2"])
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", str(renamed)])  # --out is required
    # the piip-models command carries the same subcommand
    assert cli.main(["convert", str(renamed), "--out", str(tmp_path / "cli"), "--model", "piip_tsb"]) == 0
    assert torch.equal(load_file(tmp_path / "cli" / "model.safetensors")["branches.2.blocks.11.ls2.gamma"],
                       exported["branches.2.blocks.11.ls2.gamma"])
