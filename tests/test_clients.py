"""Real clients, unchanged: timm's factory kwargs on every family, the launcher, timm's own ``train.py`` and
``validate.py`` through it, ``convert`` of a checkpoint that training wrote, ``set_grad_checkpointing`` on
``features_only`` models.

The timm scripts are the unmodified copies in ``../shared/clients/timm`` (or ``$PIIP_CLIENTS``); tests that run them
skip when that folder is absent.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.utils.checkpoint
import yaml
from safetensors.torch import save_file
from timm.layers import DropPath
from timm.models.convnext import ConvNeXt
from timm.utils import CheckpointSaver

from piip_models import PIIP, cli
from piip_models.convert import convert_checkpoint, infer_model_name
from piip_models.features import PIIPFeatures
from piip_models.hub import read_checkpoint
from piip_models.run import main as run_main
from piip_models.weights import CheckpointMismatchError

from .test_grad_ckpt import tiny_dense_model
from .test_llava import _tiny_tower
from .test_models import tiny_branches

# One registered model per family file (and both heads of the ViT family).
FAMILY_MODELS = [
    "piip_tsb",  # piip_vit, separate-head classifier
    "piip_tsb_1120_896_448",  # piip_vit, dense backbone
    "piip_ct_cs_vb_1024_672_448",  # piip_convnext (ConvNeXt and ViT branches)
    "piip_h6b_1024_512",  # piip_h6b
    "piip_llava_clip_bl_512_256",  # piip_llava
]


def clients_dir() -> Path:
    """``../shared/clients/timm`` beside the checkout, or ``$PIIP_CLIENTS``."""
    env = os.environ.get("PIIP_CLIENTS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "clients" / "timm"


def require_client(script: str) -> Path:
    path = clients_dir() / script
    if not path.is_file():
        pytest.skip(f"timm client script {script} not available at {path}")
    return path


def block_rates(branch: torch.nn.Module) -> list[float]:
    """Drop-path probability of every block of a timm ViT or ConvNeXt branch (0 for none)."""
    if isinstance(branch, ConvNeXt):
        paths = [block.drop_path for stage in branch.stages for block in stage.blocks]
    else:
        paths = [block.drop_path1 for block in branch.blocks]
        assert [type(b.drop_path1) for b in branch.blocks] == [type(b.drop_path2) for b in branch.blocks]
    return [path.drop_prob if isinstance(path, DropPath) else 0.0 for path in paths]


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_timm_factory_kwargs_on_every_family(name):
    model = timm.create_model(name, device="meta", drop_rate=0.25, drop_path_rate=0.2, global_pool="avg", img_size=256)
    assert model.global_pool == "avg" and model.head.drop.p == 0.25
    assert model.branch_sizes[-1] == 256
    for branch in model.branches:
        rates = block_rates(branch)
        # timm's meaning: a linear schedule over each branch's blocks, 0 first, drop_path_rate last
        assert rates == pytest.approx([0.2 * i / (len(rates) - 1) for i in range(len(rates))])
    assert {cfg.drop_path_mode for cfg in model.branch_cfgs} == {"linear"}
    # the interactions keep their own stochastic depth
    injector = model.interactions[0].units[0].branch2to1_injector
    assert injector.drop_path.drop_prob == model.interaction_cfg.drop_path_rate == 0.4


def test_drop_path_rate_is_timms_schedule_and_unknown_kwargs_fail_like_timm():
    model = PIIP(branches=tiny_branches(), num_classes=7, drop_path_rate=0.3, device="meta")
    vit = timm.create_model("vit_small_patch16_224", depth=4, drop_path_rate=0.3, device="meta")
    for branch in model.branches:
        assert block_rates(branch) == pytest.approx(block_rates(vit))
    # without it the branch configs rule (the official constant per-branch rates)
    tsb = timm.create_model("piip_tsb", device="meta")
    assert [block_rates(b)[0] for b in tsb.branches] == [0.2, 0.05, 0.05]
    # exactly what train.py passes (create_model drops the None values)
    args = dict(pretrained=False, in_chans=3, num_classes=2, drop_rate=0.0, drop_path_rate=0.1, drop_block_rate=None,
                global_pool=None, bn_momentum=None, bn_eps=None, scriptable=None, checkpoint_path=None)
    assert block_rates(timm.create_model("piip_tsb", device="meta", **args).branches[0])[-1] == pytest.approx(0.1)
    # --drop-block: a CNN argument that timm's own ViT rejects too
    for arch in ("deit_tiny_patch16_224", "piip_tsb"):
        with pytest.raises(TypeError, match="drop_block_rate"):
            timm.create_model(arch, device="meta", drop_block_rate=0.1)
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\], got 1.5"):
        PIIP(branches=tiny_branches(), drop_path_rate=1.5, device="meta")


def test_llava_tower_pool_and_dropout():
    tokens_model = _tiny_tower().eval()
    pooled = _tiny_tower(global_pool="avg", drop_rate=0.5)
    pooled.load_state_dict(tokens_model.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        tokens = tokens_model(x)
        torch.testing.assert_close(pooled.eval()(x), tokens.mean(1))
        pooled.train()
        torch.manual_seed(0)
        dropped = pooled(x)
    assert dropped.shape == (2, 64) and not torch.allclose(dropped, tokens.mean(1))
    assert pooled.head.drop.p == 0.5


def test_launcher_runs_a_script_as_main(tmp_path, capsys):
    script = tmp_path / "client.py"
    script.write_text(
        "import json, sys, timm\n"
        "print(json.dumps({'argv': sys.argv, 'name': __name__, 'known': timm.is_model('piip_tsb'),\n"
        "                  'path0': sys.path[0]}))\n"
        "if '--fail' in sys.argv:\n"
        "    sys.exit(3)\n"
    )
    argv, path = list(sys.argv), list(sys.path)
    assert cli.main(["run", str(script), "--model", "piip_tsb", "-h"]) == 0
    seen = json.loads(capsys.readouterr().out)
    assert seen == {"argv": [str(script), "--model", "piip_tsb", "-h"], "name": "__main__", "known": True,
                    "path0": str(tmp_path.resolve())}
    assert sys.argv == argv and sys.path == path
    with pytest.raises(SystemExit) as exit_info:
        run_main([str(script), "--fail"])
    assert exit_info.value.code == 3
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(tmp_path / "missing.py")])
    assert exit_info.value.code == 2 and "script " in capsys.readouterr().err


def _image_folder(root: Path) -> Path:
    """A synthetic two-class ImageFolder with train and validation splits (two 48-px images per class)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "validation"):
        for label, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                pixels = torch.randint(0, 128, (48, 48, 3), generator=generator, dtype=torch.uint8) + 100 * label
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.png")
    return root


def _run_client(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


COMMON = ["--num-classes", "2", "--img-size", "64", "--device", "cpu", "--workers", "0", "--no-prefetcher"]


def test_timm_train_validate_and_convert_through_the_launcher(tmp_path, capsys):
    train, validate = require_client("train.py"), require_client("validate.py")
    data = _image_folder(tmp_path / "data")
    _run_client([
        sys.executable, "-m", "piip_models.run", str(train), "--data-dir", str(data), "--model", "piip_tsb",
        "--drop-path", "0.1", "-b", "2", "--epochs", "1", "--warmup-epochs", "0", "--smoothing", "0",
        "--output", str(tmp_path / "out"), "--experiment", "ft", "--checkpoint-hist", "1", *COMMON,
    ], tmp_path)
    run_dir = tmp_path / "out" / "ft"
    assert yaml.safe_load((run_dir / "args.yaml").read_text())["drop_path"] == 0.1
    (summary,) = list(csv.DictReader((run_dir / "summary.csv").open()))
    assert float(summary["train_loss"]) > 0

    results = tmp_path / "validate.json"
    _run_client([
        "piip-models", "run", str(validate), "--data-dir", str(data), "--split", "validation", "--model",
        "piip_tsb", "--checkpoint", str(run_dir / "last.pth.tar"), "-b", "2", "--results-file", str(results),
        "--results-format", "json", *COMMON,
    ], tmp_path)
    # validate.py reproduces the evaluation train.py ran after its epoch
    assert json.loads(results.read_text())["top1"] == float(summary["eval_top1"])

    # convert keeps the two-class heads; the folder loads to the same model train.py saved
    assert cli.main(["convert", str(run_dir / "last.pth.tar"), "--out", str(tmp_path / "hub")]) == 0
    assert "num_classes=2" in capsys.readouterr().err
    exported = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    trained = timm.create_model("piip_tsb", num_classes=2, checkpoint_path=str(run_dir / "last.pth.tar")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(exported(x), trained(x))


def test_timm_train_fine_tunes_a_detection_backbones_classification_twin(tmp_path):
    train = require_client("train.py")
    data = _image_folder(tmp_path / "data")
    _run_client([
        "piip-models", "run", str(train), "--data-dir", str(data), "--model", "piip_tsb_1120_896_448",
        "--drop-path", "0.1", "--grad-checkpointing", "-b", "2", "--epochs", "1", "--warmup-epochs", "0",
        "--smoothing", "0", "--output", str(tmp_path / "out"), "--experiment", "twin", *COMMON,
    ], tmp_path)
    state = read_checkpoint(tmp_path / "out" / "twin" / "last.pth.tar")["state_dict"]
    assert state["head.weight"].shape == (2, 768)  # a linear classifier over the merged map


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A two-class piip_tsb checkpoint as timm's train.py saves it (its CheckpointSaver, its args)."""
    folder = tmp_path_factory.mktemp("finetuned")
    torch.manual_seed(0)
    model = timm.create_model("piip_tsb", num_classes=2, global_pool="avg")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("_gamma", "head.weight")):
                param.normal_(std=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model="piip_tsb", gp="avg", model_kwargs={}, num_classes=2, drop_path=0.1)
    saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(folder), max_history=1)
    saver.save_checkpoint(epoch=0, metric=1.0)
    return folder / "last.pth.tar", model.eval()


def test_convert_keeps_the_heads_of_a_finetuned_checkpoint(finetuned, tmp_path, capsys):
    path, model = finetuned
    assert cli.main(["convert", str(path), "--out", str(tmp_path / "hub")]) == 0
    report = capsys.readouterr().err
    assert "piip_tsb, identified by the checkpoint's 'arch' entry" in report
    assert "num_classes=2" in report and "global_pool='avg'" in report
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["num_classes"] == 2 and config["model_args"]["global_pool"] == "avg"
    exported = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=0, atol=0)
    # without the arch entry the keys tell the model; the class count still comes from the tensors
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": read_checkpoint(path)["state_dict"]}, plain)
    assert infer_model_name(plain, read_checkpoint(plain)) == "piip_tsb"


def test_convert_refuses_a_folder_that_would_not_load(finetuned, tmp_path, monkeypatch):
    from piip_models import convert

    save_config = convert.save_config_for_hf

    def config_of_another_model(model, path):  # what convert wrote before: the registered default heads
        save_config(model, path)
        config = json.loads(Path(path).read_text())
        config["num_classes"] = config["model_args"]["num_classes"] = config["pretrained_cfg"]["num_classes"] = 1000
        Path(path).write_text(json.dumps(config))

    monkeypatch.setattr(convert, "save_config_for_hf", config_of_another_model)
    with pytest.raises(CheckpointMismatchError, match=r"refused to write .*hub.*branches\.0\.head\.bias"):
        convert_checkpoint(finetuned[0], tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


def test_pretrained_with_another_class_count_loads_all_but_the_heads(finetuned, tmp_path, one_thread):
    """``train.py --pretrained --num-classes 10`` from a two-class checkpoint: timm's loader drops every branch head
    (the pretrained cfg names them all) and loads the rest."""
    _, source = finetuned
    path = tmp_path / "two_classes.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    overlay = dict(file=str(path), num_classes=2)
    model = timm.create_model("piip_tsb", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay)
    state, loaded = source.state_dict(), model.state_dict()
    heads = {k for k in state if k.startswith("branches.") and ".head." in k}
    assert len(heads) == 6 and all(loaded[k].shape[0] == 10 for k in heads)
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k not in heads)


def test_features_only_models_take_set_grad_checkpointing(monkeypatch, one_thread):
    registered = timm.create_model("piip_tsb_1120_896_448", features_only=True, device="meta")
    assert isinstance(registered, PIIPFeatures)
    registered.set_grad_checkpointing()
    assert registered.model.grad_checkpointing

    features = PIIPFeatures(tiny_dense_model().eval(), out_indices=(0, 1))
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        expected = features(x)
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    features.set_grad_checkpointing(True)
    out = features(x)
    assert len(calls) >= len(features.model.interactions) * (len(features.model.branches) + 1)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want)
    sum(f.sum() for f in out).backward()
    assert all(p.grad is not None for p in features.parameters())
