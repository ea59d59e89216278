"""Shared test helpers: the official fixtures folder and small model factories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import piip_models  # noqa: F401  (registers the piip_* models before any test collects them)
from piip_models.official import build_from_official
from piip_models.weights import checkpoint_filter_fn


def fixtures_dir() -> Path:
    """``../shared/fixtures`` beside the checkout, or ``$PIIP_FIXTURES``."""
    env = os.environ.get("PIIP_FIXTURES")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def require_fixture(name: str) -> Path:
    path = fixtures_dir() / name
    if not path.is_dir():
        pytest.skip(f"official fixture {name} not available at {path}")
    return path


def cpu_sized(names: list[str]) -> list[str]:
    """Drops the InternViT-6B models (6-7.5 B parameters, about 30 GB of fp32 weights) from real-tensor sweeps."""
    return [n for n in names if "6b" not in n]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test on one thread: two OpenMP threads on two shared cores stall on each other's barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def open_gates(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Draws the interaction gates (``ca_gamma``, ``cffn_gamma``) from N(0, std): zero-initialised, they would leave
    the deformable attention without effect and without gradients. Returns ``model``."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_gamma"):
                param.normal_(std=std)
    return model


def capture_intermediates(model):
    """Hooks recording what the fixtures record: branch images and logits, tokens, cls tokens, merges, deform inputs."""
    records: dict[str, torch.Tensor] = {}
    handles = []
    for k, branch in enumerate(model.branches):
        handles.append(branch.patch_embed.register_forward_pre_hook(
            lambda m, args, k=k: records.__setitem__(f"branch{k + 1}.image", args[0])))
        handles.append(branch.head.register_forward_hook(
            lambda m, args, out, k=k: records.__setitem__(f"branch{k + 1}.logits", out)))
        for i, (_, end) in enumerate(model.segments[k]):
            handles.append(branch.blocks[end].register_forward_hook(
                lambda m, args, out, k=k, i=i: records.__setitem__(f"interaction{i}.cls{k + 1}", out[:, :1])))
    for k, merge in enumerate(model.merges or ()):
        handles.append(merge.register_forward_hook(
            lambda m, args, out, k=k: records.__setitem__(f"merge_branch{k + 1}.out", out)))
    for i, block in enumerate(model.interactions):
        handles.append(block.register_forward_hook(
            lambda m, args, out, i=i: records.update({f"interaction{i}.x{k + 1}": t for k, t in enumerate(out)})))
    for u, unit in enumerate(model.interactions[0].units):
        for side in ("branch2to1", "branch1to2"):
            attn = getattr(unit, f"{side}_injector").attn
            prefix = f"deform.interaction_units_{u + 1}{u + 2}.{side}."
            handles.append(attn.register_forward_pre_hook(
                lambda m, args, prefix=prefix: records.update({
                    prefix + "reference_points": args[1],
                    prefix + "spatial_shapes": torch.tensor(args[3]),
                })))
    return records, handles


def load_official_fixture(name: str, **model_kwargs):
    """The PIIP equivalent of an official fixture with its converted weights (strict load), and its recorded I/O."""
    path = require_fixture(name)
    config = json.loads((path / "config.json").read_text())
    model = build_from_official(config["kwargs"], **model_kwargs).eval()
    model.load_state_dict(checkpoint_filter_fn(load_file(path / "state_dict.safetensors"), model), strict=True)
    return model, load_file(path / "io.safetensors")


def compare_intermediates(
    name: str, io: dict[str, torch.Tensor], records: dict[str, torch.Tensor], skip: tuple[str, ...] = (), **tol
) -> int:
    """Compares every recorded ``intermediate.*`` tensor except ``skip`` with its capture; returns how many matched."""
    checked = 0
    for key, expected in io.items():
        short = key[len("intermediate."):]
        if not key.startswith("intermediate.") or short in skip:
            continue
        if short.endswith("level_start_index"):
            assert expected.tolist() == [0]  # a single value level
            continue
        assert short in records, f"no capture for {short}"
        actual = records[short]
        if short.endswith(".image"):
            # a stride-16 patch conv ignores the remainder rows/columns; the model crops them before embedding
            expected = expected[..., : actual.shape[-2], : actual.shape[-1]]
            assert expected.shape[-2] - io[key].shape[-2] > -16 and expected.shape[-1] - io[key].shape[-1] > -16
        if short.endswith("reference_points"):
            actual = actual.expand_as(expected)
        torch.testing.assert_close(actual.to(expected.dtype), expected, **tol, msg=f"{name}: {short}")
        checked += 1
    return checked
