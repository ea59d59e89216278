"""Shared test helpers: the official fixtures folder and small model factories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import piip_models  # noqa: F401  (registers the piip_* models before any test collects them)


def fixtures_dir() -> Path:
    """``../shared/fixtures`` beside the checkout, or ``$PIIP_FIXTURES``."""
    env = os.environ.get("PIIP_FIXTURES")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def require_fixture(name: str) -> Path:
    path = fixtures_dir() / name
    if not path.is_dir():
        pytest.skip(f"official fixture {name} not available at {path}")
    return path


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
