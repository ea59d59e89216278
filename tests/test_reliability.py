"""Reliability (issue 16): one test per class of failure, over the neighbours of each example a careless or hostile
user would try. Each asserts the error type, that the message names the problem, and that nothing changed
(parameters, files on disk) or was built."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from piip_models.kernels import multi_scale_deformable_attention
from safetensors.torch import save_file

import piip_models
import piip_models.piip as piip_module
from piip_models import PIIP, BranchCfg, InteractionCfg, PIIPLlava, cli, create_pyramid, even_segments
from piip_models.bench import measure_in_subprocess
from piip_models.counting import count_flops
from piip_models.detection import PIIPBackboneWithFPN, load_mmdet_checkpoint, mask_rcnn
from piip_models.hub import CheckpointError, fetch_checkpoint, read_checkpoint
from piip_models.official import build_from_official
from piip_models.weights import CheckpointMismatchError, checkpoint_filter_fn

from .test_detection import _tiny_checkpoint
from .test_hub import offline  # noqa: F401  (a fixture)
from .test_models import tiny_branches
from .test_pretrained import seed_hub


def _branches(window: int = 0) -> tuple[BranchCfg, ...]:
    return tuple(replace(b, window_size=window) for b in tiny_branches())


def _classifier() -> PIIP:
    return PIIP(tiny_branches(), num_classes=7, global_pool="first_patch").eval()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


@pytest.fixture
def builds(monkeypatch):
    """The device of every branch build (``'meta'`` for the structure checks, else real weights)."""
    calls: list[str] = []
    real = piip_module.build_branch

    def spy(*args):
        device = args[-1].get("device")
        calls.append("meta" if device is not None and torch.device(device).type == "meta" else "weights")
        return real(*args)

    monkeypatch.setattr(piip_module, "build_branch", spy)
    return calls


# ----------------------------------------------------------------------------------------------------------------
# 1. Counting never mutates a model another thread uses


@pytest.mark.parametrize("convention", ["paper", "full"])
def test_1_counting_never_touches_a_model_serving_inference(convention, one_thread):
    model = PIIP(_branches(window=2), head_type="dense", class_token=False, num_classes=0, with_fpn=True).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ca_gamma", "cffn_gamma")):
                param.normal_(std=0.5)  # open gates: the windows change the output
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        reference = model.forward_features(x)
    expected = count_flops(model, 80, convention)
    windows = model.windows
    outputs, counts, errors = [], [], []
    counting_done = threading.Event()

    def infer():
        try:
            while not counting_done.is_set() or not outputs:
                with torch.no_grad():
                    outputs.append(model.forward_features(x))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    def count():
        try:
            counts.extend(count_flops(model, 80, convention) for _ in range(3))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    inference = threading.Thread(target=infer)
    counters = [threading.Thread(target=count) for _ in range(2)]
    for thread in (inference, *counters):
        thread.start()
    for thread in counters:
        thread.join()
    counting_done.set()
    inference.join()
    assert not errors
    assert counts == [expected] * 6
    assert outputs and all(torch.equal(out, reference) for out in outputs)
    assert model.windows == windows and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------------------------------
# 2. Loads copy everything they promised or nothing


def _broken(state_dict: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    return {**state_dict, key: torch.zeros(3)}


@pytest.mark.parametrize("entry", ["strict", "strict=False", "branches", "mmdet strict=False"])
def test_2_a_load_that_cannot_finish_copies_nothing(entry, tmp_path, offline):  # noqa: F811
    if entry == "mmdet strict=False":
        model = mask_rcnn("piip_tsb_1568_1120_672", backbone_kwargs=dict(branches=tiny_branches()))
        checkpoint = _tiny_checkpoint(model)
        checkpoint["state_dict"]["roi_head.mask_head.convs.3.conv.weight"] = torch.zeros(3)
        before = _snapshot(model)
        with pytest.raises(CheckpointMismatchError, match=r"roi_heads\.mask_head\.3\.0\.weight: checkpoint \(3,\)"):
            load_mmdet_checkpoint(model, checkpoint, strict=False)
        assert _unchanged(model, before)
        return
    model = _classifier()
    before = _snapshot(model)
    if entry == "branches":
        # branch 2's weights do not fit: branches 0 and 1, which would load, must stay as they are
        for k, branch in enumerate(model.branches):
            weights = {n: torch.randn_like(v) for n, v in branch.state_dict().items()}
            branch.pretrained_cfg = dict(branch.pretrained_cfg, state_dict=_broken(weights, "blocks.1.mlp.fc1.weight")
                                         if k == 2 else weights)
        with pytest.raises(CheckpointMismatchError, match=r"blocks\.1\.mlp\.fc1\.weight: checkpoint \(3,\)"):
            model.load_branch_weights()
        assert _unchanged(model, before)
        return
    weights = {k: torch.randn_like(v) for k, v in before.items()}
    path = tmp_path / "ckpt.safetensors"
    save_file(_broken(weights, "branches.1.blocks.2.attn.proj.weight"), path)
    strict = entry == "strict"
    with pytest.raises(CheckpointMismatchError, match=r"nothing was loaded.*\n.*\n +branches\.1\.blocks\.2\.attn\."
                                                      r"proj\.weight: checkpoint \(3,\), model \(64, 64\)"):
        model.load_pretrained(str(path), strict=strict)
    assert _unchanged(model, before)
    if not strict:  # what strict=False is for still works: skip missing and unexpected tensors, load the rest
        del weights["branches.1.blocks.2.attn.proj.weight"]
        save_file({**weights, "extra.weight": torch.ones(2)}, path)
        model.load_pretrained(str(path), strict=False)
        assert torch.equal(model.branches[0].pos_embed, weights["branches.0.pos_embed"])
        assert torch.equal(model.branches[1].blocks[2].attn.proj.weight,
                           before["branches.1.blocks.2.attn.proj.weight"])


# ----------------------------------------------------------------------------------------------------------------
# 3. Shard names stay in their folder


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "{outside}",
                                   "..\\outside.safetensors", "link.safetensors", "hub"])
def test_3_shards_are_read_only_from_the_index_folder(shard, tmp_path, offline):  # noqa: F811
    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.ones(2)}, outside)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "link.safetensors").symlink_to(outside)
    if shard == "hub":  # a Hub repo's index naming a file outside the repo: refused before anything is fetched
        seed_hub(tmp_path / "cache", "org/repo", {
            "model.safetensors.index.json": json.dumps({"weight_map": {"w": "../../other/x.safetensors"}}).encode()})
        with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json puts 'w' in the shard "
                                                  r"'\.\./\.\./other/x\.safetensors', outside the index's folder"):
            fetch_checkpoint("org/repo", "model.safetensors.index.json", cache_dir=tmp_path / "cache")
        return
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": shard.format(outside=outside)}}))
    model = _classifier()
    before = _snapshot(model)
    for read in (read_checkpoint, model.load_pretrained):
        with pytest.raises(CheckpointError, match="outside the (index's folder|folder of model.safetensors.index)"):
            read(index)
    assert _unchanged(model, before)


def test_3_shards_beside_the_index_and_in_the_hub_cache_still_load(tmp_path, offline):  # noqa: F811
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    save_file({"a": torch.ones(2)}, folder / "sub" / "one.safetensors")
    save_file({"b": torch.zeros(3)}, folder / "two.safetensors")
    (folder / "alias.safetensors").symlink_to(folder / "two.safetensors")
    index = {"weight_map": {"a": "sub/one.safetensors", "b": "alias.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert read_checkpoint(folder / "model.safetensors.index.json").keys() == {"a", "b"}
    # the Hub cache: snapshot files are links into the repo's blobs
    seed_hub(tmp_path / "cache", "org/repo", {"model.safetensors.index.json": json.dumps(index).encode(),
                                              "sub/one.safetensors": (folder / "sub/one.safetensors").read_bytes(),
                                              "alias.safetensors": (folder / "two.safetensors").read_bytes()})
    path = fetch_checkpoint("org/repo", "model.safetensors.index.json", cache_dir=tmp_path / "cache")
    assert torch.equal(read_checkpoint(path)["b"], torch.zeros(3))


# ----------------------------------------------------------------------------------------------------------------
# 4. Integer and bool tensors are never cast into float weights


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
@pytest.mark.parametrize("entry", ["load_pretrained", "strict=False", "filter (hf-hub, local-dir)", "branches",
                                   "mmdet"])
def test_4_integer_tensors_are_refused_for_float_weights(entry, dtype, tmp_path, offline):  # noqa: F811
    if entry == "mmdet":
        model = mask_rcnn("piip_tsb_1568_1120_672", backbone_kwargs=dict(branches=tiny_branches()))
        checkpoint = _tiny_checkpoint(model)
        checkpoint["state_dict"]["rpn_head.rpn_conv.bias"] = torch.ones(256, dtype=dtype)
        before = _snapshot(model)
        with pytest.raises(CheckpointMismatchError, match=rf"rpn\.head\.conv\.0\.0\.bias: checkpoint {dtype}, model "
                                                          r"torch\.float32"):
            load_mmdet_checkpoint(model, checkpoint)
        assert _unchanged(model, before)
        return
    model = _classifier()
    before = _snapshot(model)
    key = "branches.1.pos_embed"
    bad = {**before, key: torch.full_like(before[key], -3).to(dtype)}  # a uint8 -3 would become 253.0
    expected = rf"1 wrong-dtype tensors.*\n.*\n +{re.escape(key)}: checkpoint {dtype}, model torch\.float32"
    if entry == "filter (hf-hub, local-dir)":
        with pytest.raises(CheckpointMismatchError, match=expected):
            checkpoint_filter_fn(bad, model, strict=False)
    elif entry == "branches":
        for k, branch in enumerate(model.branches):  # weights in the cfg: nothing is fetched
            weights = {n: v.clone() for n, v in branch.state_dict().items()}
            branch.pretrained_cfg = dict(branch.pretrained_cfg, state_dict={**weights, "pos_embed": bad[key]}
                                         if k == 1 else weights)
        with pytest.raises(CheckpointMismatchError, match=rf"pos_embed: checkpoint {dtype}, model torch\.float32"):
            model.load_branch_weights()
    else:
        save_file(bad, tmp_path / "int.safetensors")
        with pytest.raises(CheckpointMismatchError, match=expected):
            model.load_pretrained(str(tmp_path / "int.safetensors"), strict=entry != "strict=False")
    assert _unchanged(model, before)


# ----------------------------------------------------------------------------------------------------------------
# 5. Every read failure is a CheckpointError naming the file


def _safetensors_with_header(path: Path, edit) -> None:
    save_file({"a": torch.zeros(4, 4)}, path)
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    edit(header["a"])
    raw = json.dumps(header).encode().ljust(size)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + size:])


def _link_to_text(path: Path) -> None:
    (path.parent / "notes.txt").write_text("x" * 100)
    path.symlink_to(path.parent / "notes.txt")


BAD_FILES = {
    "shape vs offsets.safetensors": lambda p: _safetensors_with_header(p, lambda t: t.update(shape=[8, 8])),
    "unknown dtype.safetensors": lambda p: _safetensors_with_header(p, lambda t: t.update(dtype="XX")),
    "empty.safetensors": lambda p: p.write_bytes(b""),
    "text.pth": lambda p: p.write_text("hello, not a checkpoint\n"),
    "empty.pth": lambda p: p.write_bytes(b""),
    "link to text.pth": lambda p: _link_to_text(p),
    "broken link.pth": lambda p: p.symlink_to(p.parent / "gone.pth"),
    "folder.pth": lambda p: p.mkdir(),
    "missing.pth": lambda p: None,
    "list.pth": lambda p: torch.save([torch.ones(1)], p),
    "no tensors.pth": lambda p: torch.save({"epoch": 3, "args": {"lr": 0.1}}, p),
    "not json.index.json": lambda p: p.write_text("{nope"),
    "json list.index.json": lambda p: p.write_text("[1, 2]"),
    "weight_map list.index.json": lambda p: p.write_text('{"weight_map": [1]}'),
    "shard not a name.index.json": lambda p: p.write_text('{"weight_map": {"a": 3}}'),
    "empty weight_map.index.json": lambda p: p.write_text('{"weight_map": {}}'),
    "missing shard.index.json": lambda p: p.write_text('{"weight_map": {"a": "gone.safetensors"}}'),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_5_unreadable_checkpoints_raise_checkpoint_errors_naming_the_file(name, tmp_path):
    path = tmp_path / name
    BAD_FILES[name](path)
    model = _classifier()
    before = _snapshot(model)
    for read in (read_checkpoint, model.load_pretrained):
        with pytest.raises(CheckpointError) as error:
            read(path)
        assert ("gone.safetensors" if name.startswith("missing shard") else name) in str(error.value)
    assert _unchanged(model, before)


TSB_CONFIG = {"architecture": "piip_tsb", "pretrained_cfg": {"num_classes": 1000}, "model_args": {}}
BAD_CONFIGS = {
    "no architecture": ({"pretrained_cfg": {}}, r"'architecture' must name a registered PIIP model, got None \(the "),
    "architecture not a name": ({"architecture": 3}, "'architecture' must name a registered PIIP model, got 3"),
    "not a PIIP model": ({"architecture": "resnet50"}, "got 'resnet50'"),
    "a list": ([1], "holds a JSON list, not an object"),
    "not json": ("{nope", "is not valid JSON"),
    "pretrained_cfg not an object": (dict(TSB_CONFIG, pretrained_cfg=5), "'pretrained_cfg' must be an object"),
    "model_args not an object": (dict(TSB_CONFIG, model_args=[1]), "'model_args' must be an object"),
    "unknown cfg field": (dict(TSB_CONFIG, pretrained_cfg={"bogus": 1}), r"does not know: \['bogus'\]"),
    "flat layout with model_args": ({"architecture": "piip_tsb", "model_args": {}}, r"does not know: \['model_args'"),
    "negative num_classes": (dict(TSB_CONFIG, num_classes=-1), "'num_classes' must be a count of classes, got -1"),
    "bad input_size": (dict(TSB_CONFIG, pretrained_cfg={"input_size": [3, 0]}), "'input_size' must be \\[channels"),
    "no config": (None, r"model config .*config\.json does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("source", ["local-dir", "hf-hub"])
def test_5_model_configs_are_checked_before_timm_reads_them(case, source, tmp_path, offline, builds):  # noqa: F811
    config, problem = BAD_CONFIGS[case]
    files = {} if config is None else {"config.json": config.encode() if isinstance(config, str) else
                                       json.dumps(config).encode()}
    if source == "local-dir":
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        reference, error = f"local-dir:{tmp_path}", CheckpointError
    else:
        seed_hub(tmp_path, "org/piip", files)
        reference = "hf-hub:org/piip"
        if config is None:  # offline, and the cache has no config.json
            problem = r"org/piip/config\.json is not in the Hugging Face cache .* and HF_HUB_OFFLINE=1"
    with pytest.raises(CheckpointError, match=problem) as error:
        piip_models.create_model(reference, pretrained=True, cache_dir=tmp_path)
    assert "config.json" in str(error.value) and builds == []


def test_5_bad_model_args_of_a_model_folder_are_refused_before_building(tmp_path, builds):
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(dict(TSB_CONFIG, model_args={"num_classes": -1})))
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0, got -1"):
        piip_models.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert builds == []


# ----------------------------------------------------------------------------------------------------------------
# 6. Offline without a cache: name the repo and file, before any model is built


@pytest.mark.parametrize("entry", [".branches", "create_pyramid", "hf-hub config", "hf-hub weights", "released tag"])
def test_6_offline_failures_name_repo_and_file_before_building(entry, tmp_path, offline, builds,  # noqa: F811
                                                               monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # an empty default cache
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as error:
        if entry == ".branches":
            timm.create_model("piip_tsb.branches", pretrained=True, cache_dir=tmp_path)
        elif entry == "create_pyramid":
            create_pyramid([("deit_small_patch16_224.fb_in1k", 64), ("deit_tiny_patch16_224.fb_in1k", 96)],
                           pretrained=True)
        elif entry == "hf-hub config":
            piip_models.create_model("hf-hub:org/piip", pretrained=True)
        elif entry == "hf-hub weights":
            seed_hub(tmp_path, "org/piip", {"config.json": json.dumps(TSB_CONFIG).encode()})
            piip_models.create_model("hf-hub:org/piip", pretrained=True)
        else:
            timm.create_model("piip_tsb", pretrained=True)
    expected = {
        ".branches": "timm/deit_base_patch16_224.fb_in1k/pytorch_model.bin (nor its safetensors sibling "
                     "model.safetensors) (deit_base_patch16_224.fb_in1k's pretrained weights)",
        "create_pyramid": "timm/deit_small_patch16_224.fb_in1k/pytorch_model.bin",
        "hf-hub config": "org/piip/config.json",
        "hf-hub weights": "org/piip/pytorch_model.bin (nor its safetensors sibling model.safetensors)",
        "released tag": "OpenGVLab/PIIP/classification/piip_3branch_tsb_368-192-128_cls_token_deit1.pth",
    }[entry]
    assert expected in str(error.value) and "is not in the Hugging Face cache" in str(error.value)
    assert "HF_HUB_OFFLINE=1" in str(error.value)
    assert builds == [] and time.perf_counter() - start < 10


# ----------------------------------------------------------------------------------------------------------------
# 7. Configurations that cannot work are refused before any weight is allocated


def _tsb(**kwargs):
    return timm.create_model("piip_tsb", **kwargs)


def _piip(**kwargs):
    return PIIP(**{"branches": tiny_branches(), **kwargs})


BAD_ARGS = {
    "num_interactions=0": (lambda: create_pyramid([("deit_tiny_patch16_224", 64)], num_interactions=0), ValueError,
                           "num_interactions must be an integer >= 1, got 0"),
    "num_interactions=2.5": (lambda: create_pyramid([("deit_tiny_patch16_224", 64)], num_interactions=2.5),
                             TypeError, "num_interactions must be an integer, got 2.5"),
    "llm_dim 0": (lambda: PIIPLlava(tiny_branches(), llm_dim=0), ValueError, "llm_dim must be an integer >= 1"),
    "create_pyramid([])": (lambda: create_pyramid([]), ValueError, "non-empty sequence"),
    "create_pyramid ResNet": (lambda: create_pyramid([("resnet18", 64)]), TypeError, "timm ResNet; a PIIP branch"),
    "PIIP ResNet": (lambda: _piip(branches=(BranchCfg("resnet18", 64, ((0, 0),)),)), TypeError, "branch 0: resnet18"),
    "branch below a patch": (lambda: _piip(branch_sizes=(8, 8, 8)), ValueError, "at 8 px is smaller than the 16x16"),
    "img_size 0": (lambda: _piip(img_size=0), ValueError, "img_size must be an integer >= 1"),
    "img_size (0, 5)": (lambda: _piip(img_size=(0, 5)), ValueError, r"img_size\[0\] must be an integer >= 1"),
    "in_chans 0": (lambda: _piip(in_chans=0), ValueError, "in_chans must be an integer >= 1"),
    "num_classes -1": (lambda: _tsb(num_classes=-1), ValueError, "num_classes must be an integer >= 0"),
    "num_classes 2.5": (lambda: _piip(num_classes=2.5), TypeError, "num_classes must be an integer, got 2.5"),
    "drop_rate 2": (lambda: _tsb(drop_rate=2.0), ValueError, r"drop_rate must be in \[0, 1\]"),
    "head_type": (lambda: _piip(head_type="fused"), ValueError, "head_type must be one of"),
    "window_padding": (lambda: _piip(window_padding="inside"), ValueError, "window_padding must be one of"),
    "fpn_levels twice": (lambda: _piip(head_type="dense", num_classes=0, with_fpn=True, fpn_levels=(1, 1)), ValueError,
                         "fpn_levels must be increasing"),
    "merge_stages": (lambda: _piip(head_type="dense", num_classes=0, merge_stages=(1,)), ValueError,
                     "merge_stages must be increasing interaction stages before the last"),
    "branches not BranchCfg": (lambda: _piip(branches=(("vit_small_patch16_224", 64),)), TypeError,
                               "branch 0 must be a BranchCfg"),
    "no branches": (lambda: _tsb(branches=()), ValueError, "non-empty sequence of BranchCfg"),
    "interaction dict": (lambda: _piip(interaction={"num_heads": 2}), TypeError, "must be an InteractionCfg"),
    "widths grow": (lambda: _piip(branches=tiny_branches()[::-1], branch_sizes=(32, 48, 80)), ValueError,
                    "widths .* must not grow"),
    "global_blocks beyond depth": (lambda: _piip(branches=tuple(replace(b, window_size=2, global_blocks=(9,)) for b
                                                                in tiny_branches()), class_token=False),
                                   ValueError, r"global_blocks \[9\] lie beyond its 4 blocks"),
    "heads do not divide": (lambda: _piip(interaction=InteractionCfg(num_heads=5)), ValueError,
                            "must be a positive multiple of num_heads 5"),
    "no ConvFFN channel": (lambda: _piip(interaction=InteractionCfg(cffn_ratio=0.001)), ValueError,
                           "leaves the ConvFFN of a 32-wide branch no hidden channel"),
    "out_indices twice": (lambda: _tsb(features_only=True, out_indices=(1, 1)), ValueError,
                          "select a feature tap twice"),
    "out_indices empty": (lambda: _tsb(features_only=True, out_indices=()), ValueError, "at least one of the 12"),
    "out_indices beyond": (lambda: _tsb(features_only=True, out_indices=(12,)), ValueError, "beyond the 12"),
    "official: no branches": (lambda: build_from_official({"deform_num_heads": 2}), ValueError, "branch1, branch2"),
    "official: no segments": (lambda: build_from_official({"branch1": {"img_size": 64}}), ValueError,
                              "lacks or malforms 'interaction_indexes'"),
    "BranchCfg window -2": (lambda: BranchCfg("vit_small_patch16_224", 64, ((0, 11),), window_size=-2), ValueError,
                            "window_size must be an integer >= 0"),
    "BranchCfg drop_path_rate 1.5": (lambda: BranchCfg("vit_small_patch16_224", 64, ((0, 11),), 1.5), ValueError,
                                     r"drop_path_rate must be in \[0, 1\]"),
    "BranchCfg no segments": (lambda: BranchCfg("vit_small_patch16_224", 64, ()), ValueError, "non-empty sequence"),
    "BranchCfg float segment": (lambda: BranchCfg("vit_small_patch16_224", 64, ((0, 5.5),)), TypeError,
                                r"segments\[0\]\[1\] must be an integer"),
    "BranchCfg drop_path_mode": (lambda: BranchCfg("vit_small_patch16_224", 64, ((0, 11),), drop_path_mode="cos"),
                                 ValueError, "drop_path_mode must be one of"),
    "BranchCfg pos_embed_size 0": (lambda: BranchCfg("vit_small_patch16_224", 64, ((0, 11),), pos_embed_size=0),
                                   ValueError, "pos_embed_size must be an integer >= 1"),
    "InteractionCfg num_heads 0": (lambda: InteractionCfg(num_heads=0), ValueError,
                                   "num_heads must be an integer >= 1"),
    "InteractionCfg n_points 0": (lambda: InteractionCfg(n_points=0), ValueError, "n_points must be an integer >= 1"),
    "InteractionCfg deform_ratio 0": (lambda: InteractionCfg(deform_ratio=0), ValueError, "deform_ratio must be a "
                                      "finite number > 0"),
    "InteractionCfg drop_path_rate nan": (lambda: InteractionCfg(drop_path_rate=math.nan), ValueError,
                                          r"drop_path_rate must be in \[0, 1\]"),
    "InteractionCfg with_cffn 'no'": (lambda: InteractionCfg(with_cffn="no"), TypeError, "must be True or False"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_7_bad_configurations_are_refused_before_any_weight_is_allocated(case, builds):
    build, error, problem = BAD_ARGS[case]
    with pytest.raises(error, match=problem):
        build()
    assert "weights" not in builds  # at most the meta-device structure checks ran


# ----------------------------------------------------------------------------------------------------------------
# 8. An empty batch runs


def _windowed_dense(padding: str) -> PIIP:
    return PIIP(_branches(window=2), head_type="dense", class_token=False, num_classes=0, with_fpn=True,
                window_padding=padding)


BEIT_BRANCH = BranchCfg("windowed_beitv2_base_patch16_224", 32, even_segments(2, 2), window_size=2,
                        model_args=dict(embed_dim=64, depth=2, num_heads=2, window_size=2))
EMPTY_BATCH_MODELS = {
    "separate": (_classifier, 80),
    "merged": (lambda: PIIP(tiny_branches(), head_type="merged", num_classes=5), 80),
    "windowed pyramid, pad before qkv": (lambda: partial(_windowed_dense("before_qkv").forward_intermediates,
                                                         intermediates_only=True), 80),
    "windowed pyramid, pad after qkv": (lambda: partial(_windowed_dense("after_qkv").forward_intermediates,
                                                        intermediates_only=True), 80),
    "features_only": (lambda: timm.create_model("piip_tsb_1120_896_448", branches=_branches(2), features_only=True),
                      80),
    "windowed BEiT": (lambda: PIIP((BEIT_BRANCH, _branches(2)[2]), class_token=False, head_type="dense",
                                   num_classes=0), 80),
    "ConvNeXt + ViT": (lambda: PIIPLlava((BranchCfg("vit_small_patch16_224", 64, even_segments(2, 2), model_args=dict(
        embed_dim=64, depth=2, num_heads=2)), BranchCfg("convnext_atto", 96, ((0, 3), (4, 7)), model_args=dict(
            depths=(2, 1, 1, 1), dims=(32, 64, 96, 128)))), InteractionCfg(num_heads=4), llm_dim=32), 96),
    "detection backbone": (lambda: PIIPBackboneWithFPN("piip_tsb_1120_896_448", branches=_branches(2)), 80),
}


@pytest.mark.parametrize("variant", sorted(EMPTY_BATCH_MODELS))
def test_8_an_empty_batch_gives_empty_outputs(variant, one_thread):
    build, side = EMPTY_BATCH_MODELS[variant]
    model = build()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        empty, full = model(x[:0]), model(x)

    def flat(out):
        return list(out.values()) if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else [out]

    assert [tuple(t.shape) for t in flat(empty)] == [(0, *t.shape[1:]) for t in flat(full)]


def test_8_an_empty_batch_trains(one_thread):
    model = _windowed_dense("before_qkv").train()
    maps = model.forward_intermediates(torch.randn(0, 3, 80, 80), intermediates_only=True)
    sum(m.sum() for m in maps).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def _msda_inputs(heads: int = 2, dim: int = 8, shapes=((2, 2),)):
    levels, points, queries = len(shapes), 2, 3
    return (torch.randn(1, 4, heads, dim), shapes, None, torch.rand(1, queries, heads, levels, points, 2),
            torch.rand(1, queries, heads, levels, points))


@pytest.mark.parametrize("inputs, problem", [
    (_msda_inputs(heads=0), "head"),
    (_msda_inputs(dim=0), "head"),
    (_msda_inputs(shapes=torch.tensor([[-2, -2]])), "spatial_shapes"),
    (_msda_inputs(shapes=torch.tensor([[2.0, 2.0]])), "spatial_shapes"),
    (_msda_inputs(shapes=((2.0, 2.0),)), "spatial_shapes"),
    (_msda_inputs(shapes=((0, 4),)), "spatial_shapes"),
    (_msda_inputs(shapes=((2, 2, 1),)), "spatial_shapes"),
], ids=["0 heads", "head dim 0", "negative spatial_shapes", "float spatial_shapes", "float pairs", "zero height",
        "not a pair"])
def test_8_msda_refuses_what_it_cannot_sample(inputs, problem):
    with pytest.raises(ValueError, match=problem):
        multi_scale_deformable_attention(*inputs)


# ----------------------------------------------------------------------------------------------------------------
# 9. The command line: checked before work, one-line errors, no tracebacks, --force to overwrite


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CLI_CASES = {
    "convert: missing file": (["convert", "{tmp}/missing.pth", "--out", "{tmp}/out"], "missing.pth does not exist"),
    "convert: a folder": (["convert", "{tmp}/kept", "--out", "{tmp}/out"], "kept is not a file but a directory"),
    "convert: corrupt file": (["convert", "{tmp}/text.pth", "--out", "{tmp}/out"], "text.pth is not a PyTorch"),
    "convert: non-empty --out": (["convert", "{tmp}/text.pth", "--out", "{tmp}/kept"], "kept is not empty .* --force"),
    "convert --force: goes on to the source": (["convert", "{tmp}/text.pth", "--out", "{tmp}/kept", "--force"],
                                               "text.pth is not a PyTorch checkpoint"),
    "convert: unknown --model": (["convert", "{tmp}/missing.pth", "--out", "{tmp}/out", "--model", "piip_tbs"],
                                 "Unknown PIIP model 'piip_tbs'; did you mean piip_tsb"),
    "convert: --out is a file": (["convert", "{tmp}/text.pth", "--out", "{tmp}/text.pth"], "is not a folder"),
    "flops: --json under a file": (["flops", "--json", "{tmp}/text.pth/rows.json"], "a file is in the way"),
    "flops: --csv is a folder": (["flops", "--csv", "{tmp}/kept"], "kept is a folder"),
    "flops: --scale 0": (["flops", "--scale", "0"], "argument --scale: must be > 0, got 0"),
    "flops: --scale nan": (["flops", "--scale", "nan"], "argument --scale: must be > 0, got nan"),
    "bench: --repeats 0": (["bench", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    "bench: --warmup 0": (["bench", "--warmup", "0"], "argument --warmup: must be >= 1, got 0"),
    "bench: --threads -3": (["bench", "--threads", "-3"], "argument --threads: must be >= 0, got -3"),
    "bench: --batch 0": (["bench", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    "bench: --batch two": (["bench", "--batch", "two"], "argument --batch: 'two' is not an integer"),
    "info: unknown model": (["info", "piip_nope"], "no model matches 'piip_nope'"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_9_cli_refuses_bad_input_in_one_line_before_any_work(case, tmp_path, capsys, monkeypatch):
    argv, problem = CLI_CASES[case]
    (tmp_path / "text.pth").write_text("not a checkpoint")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "config.json").write_text("{}")
    before = _files(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(cli, "benchmark", no_work)
    try:
        status = cli.main([arg.format(tmp=tmp_path) for arg in argv])
    except SystemExit as exit_:  # argparse's own refusals
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(problem, err), err
    assert _files(tmp_path) == before and not (tmp_path / "out").exists()


def test_9_output_folders_are_created_up_front(tmp_path, capsys):
    target = tmp_path / "new" / "deeper" / "rows.json"
    assert cli.main(["flops", "--models", "piip_tsb", "--json", str(target)]) == 0
    assert [row["model"] for row in json.loads(target.read_text())] == ["deit_base_patch16_224", "piip_tsb"]


def test_9_benchmark_worker_errors_are_one_line():
    with pytest.raises(RuntimeError) as error:
        measure_in_subprocess("piip_tsb", 64, repeats=0)
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.endswith("ValueError: batch_size, warmup and repeats must be >= 1 and threads >= 0, got 1, 1, 0 "
                            "and 0"), message
