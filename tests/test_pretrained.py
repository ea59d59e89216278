"""``pretrained=True`` through timm's real Hub download path, against a seeded offline Hugging Face cache."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import timm
import torch
from safetensors.torch import save

REVISION = "0123456789abcdef0123456789abcdef01234567"


def seed_hub(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Writes ``files`` into ``cache`` in the Hub's layout: blobs named by the Hub's hash, snapshot symlinks,
    refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    for name, data in files.items():
        lfs = not name.endswith(".json")  # small git files are addressed by their git blob sha1, LFS ones by sha256
        digest = hashlib.sha256(data) if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data)
        blob = repo / "blobs" / digest.hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        pointer = repo / "snapshots" / REVISION / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(blob)


def torch_bytes(obj) -> bytes:
    """``torch.save`` output as bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def seed_hf_cache(cache: Path, repo_id: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Writes ``state_dict`` as the ``model.safetensors`` of ``repo_id`` in the HF cache layout."""
    seed_hub(cache, repo_id, {"model.safetensors": save({k: v.contiguous() for k, v in state_dict.items()})})


def run_offline(cache: Path, code: str) -> str:
    """Runs ``code`` in a fresh interpreter with the Hub offline and the cache at ``cache`` (no network, no retries)."""
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_pretrained_branches_load_from_seeded_offline_cache(tmp_path):
    reference = timm.create_model("test_vit.r160_in1k")
    state_dict = {k: torch.randn_like(v) for k, v in reference.state_dict().items()}
    seed_hf_cache(tmp_path / "hub", "timm/test_vit.r160_in1k", state_dict)
    torch.save(state_dict, tmp_path / "source.pt")

    out = run_offline(tmp_path / "hub", f"""
        import torch, timm, piip_models
        from piip_models import BranchCfg, even_segments
        src = torch.load({str(tmp_path / "source.pt")!r})
        branches = (BranchCfg("test_vit.r160_in1k", 64, even_segments(6, 3)),
                    BranchCfg("test_vit.r160_in1k", 128, even_segments(6, 3)))
        # a registered entrypoint with other branches: the same build_piip path as piip_tsb.branches
        model = timm.create_model("piip_tsb.branches", pretrained=True, branches=branches)
        custom = piip_models.create_pyramid([("test_vit.r160_in1k", 64), ("test_vit.r160_in1k", 128)],
                                            num_interactions=3, pretrained=True)
        for m in (model, custom):
            b0, b1 = m.branches
            assert torch.equal(b1.blocks[3].mlp.fc1.weight, src["blocks.3.mlp.fc1.weight"])
            assert torch.equal(b0.head.weight, src["head.weight"])
            # the 10x10 (+cls) pretrained grid is resampled to each branch grid, the class slot kept
            assert b0.pos_embed.shape == (1, 17, 64) and b1.pos_embed.shape == (1, 65, 64)
            assert torch.equal(b1.pos_embed[:, 0], src["pos_embed"][:, 0])
            gates = [p for n, p in m.named_parameters() if n.endswith(("ca_gamma", "cffn_gamma"))]
            assert gates and all(g.abs().sum() == 0 for g in gates)
        # features_only wraps the model before the branches load
        feats = timm.create_model("piip_tsb.branches", pretrained=True, branches=branches, features_only=True)
        assert torch.equal(feats.model.branches[1].blocks[3].mlp.fc1.weight, src["blocks.3.mlp.fc1.weight"])
        print("ok", sum(p.numel() for p in model.parameters()))
    """)
    assert out.startswith("ok")


def test_pretrained_without_cache_fails_fast_offline(tmp_path):
    out = run_offline(tmp_path / "empty", """
        import time, timm, piip_models
        from piip_models import BranchCfg, even_segments
        branches = (BranchCfg("test_vit.r160_in1k", 64, even_segments(6, 3)),
                    BranchCfg("test_vit.r160_in1k", 128, even_segments(6, 3)))
        start = time.time()
        try:
            timm.create_model("piip_tsb.branches", pretrained=True, branches=branches)
        except Exception as e:
            print(type(e).__name__, round(time.time() - start, 1), str(e)[:300])
    """)
    assert "test_vit.r160_in1k" in out or "LocalEntryNotFound" in out
    assert float(out.split()[1]) < 10
