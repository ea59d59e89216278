"""Gradient checkpointing of a dense PIIP: same outputs and gradients, with drop path active."""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from piip_models import PIIP, BranchCfg, even_segments

from .conftest import open_gates


def tiny_dense_model() -> PIIP:
    branches = tuple(
        BranchCfg(
            "vit_small_patch16_224",
            size,
            even_segments(4, 2),
            drop_path_rate=0.2,
            model_args=dict(embed_dim=dim, depth=4, num_heads=2, init_values=1.0, no_embed_class=True),
            window_size=2,
        )
        for dim, size in zip((96, 64, 32), (32, 48, 80))
    )
    return open_gates(PIIP(branches=branches, head_type="dense", class_token=False, num_classes=0)).train()


def loss_and_grads(model: PIIP, x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # same drop-path draws in both runs
    features = model.forward_intermediates(x, intermediates_only=True)
    loss = sum((f * w).sum() for f, w in zip(features, weights))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_gives_identical_gradients(monkeypatch, one_thread):
    model = tiny_dense_model()
    x = torch.randn(2, 3, 80, 112)
    with torch.no_grad():
        weights = [torch.randn_like(f) for f in model.forward_intermediates(x, intermediates_only=True)]

    loss_ref, grads_ref = loss_and_grads(model, x, weights)

    calls = 0
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        nonlocal calls
        calls += 1
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    model.set_grad_checkpointing(True)
    loss_ckpt, grads_ckpt = loss_and_grads(model, x, weights)

    # every branch segment and every interaction is recomputed
    assert calls >= len(model.interactions) * (len(model.branches) + 1)
    torch.testing.assert_close(loss_ckpt, loss_ref, rtol=1e-4, atol=0)
    assert grads_ckpt.keys() == grads_ref.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    nonzero = [n for n, g in grads_ref.items() if g.abs().sum() > 0]
    assert len(nonzero) > 0.9 * len(grads_ref), sorted(set(grads_ref) - set(nonzero))
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
