"""Distributed training of tiny pyramids: a DDP step and FSDP2 steps over two gloo processes give every rank the
gradients of a single-process step on the whole batch, without DDP's stride or FSDP2's view-output warnings."""

from __future__ import annotations

import socket
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from piip_models import PIIP, InteractionCfg
from piip_models.features import PIIPFeatures

from .conftest import open_gates
from .test_convnext import tiny_convnext, tiny_vit
from .test_models import tiny_branches

WORLD = 2
# One image per rank: a class token's gradient is then its slice of the sequence gradient (the DDP stride warning).
BATCH = (WORLD, 3, 80, 96)
# Warnings the two wrappers gave for PIIP before their causes were fixed.
WATCHED = ("Grad strides do not match bucket view strides", "returned a view tensor")


def classifier() -> nn.Module:
    torch.manual_seed(0)
    model = PIIP(branches=tiny_branches(), num_classes=7, global_pool="first_patch",
                 interaction=InteractionCfg(num_heads=16, drop_path_rate=0.0))
    return open_gates(model)


def feature_map_model() -> nn.Module:
    """The classifier without its heads and pooling: ``forward`` returns the fused map."""
    model = classifier()
    model.reset_classifier(0, "")
    return model


def dense_features() -> nn.Module:
    """A features_only dense pyramid (ConvNeXt and ViT branches, regular FPN), as detection fine-tuning builds it."""
    torch.manual_seed(0)
    model = PIIP(
        branches=(tiny_convnext(48), tiny_vit(64), tiny_convnext(96)), head_type="dense", class_token=False,
        num_classes=0, merge_stages=(0, 1), with_fpn=True, fpn_levels=(1, 2, 3),
        interaction=InteractionCfg(num_heads=8, drop_path_rate=0.0),
    )
    return PIIPFeatures(open_gates(model), out_indices=(0, 1, 2))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "classifier": classifier, "feature_map": feature_map_model, "dense_features": dense_features
}


def _as_list(outputs: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return outputs if isinstance(outputs, list) else [outputs]


def _loss(outputs: torch.Tensor | list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the batch of a fixed linear function of every output: per-rank means average to the whole batch's."""
    outputs = _as_list(outputs)
    return sum((out * w).sum() for out, w in zip(outputs, weights)) / outputs[0].shape[0]


def _reference(build: Callable[[], nn.Module], x: torch.Tensor) -> tuple[dict[str, torch.Tensor], list]:
    """The gradients of a single-process step on the whole batch, and the loss weights it drew."""
    model = build().train()
    with torch.no_grad():
        weights = [torch.randn_like(out) for out in _as_list(model(x))]
    _loss(model(x), weights).backward()
    return {n: p.grad for n, p in model.named_parameters()}, weights


def _shard_fsdp2(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    pyramid = model.model if isinstance(model, PIIPFeatures) else model
    for branch in pyramid.branches:
        for block in getattr(branch, "blocks", None) or [b for s in branch.stages for b in s.blocks]:
            fully_shard(block)
    for interaction in pyramid.interactions:
        fully_shard(interaction)
    return fully_shard(model)


def _step(rank: int, kind: str, wrapper: str) -> list[str]:
    """One step on this rank's image; checks the gradients against the whole-batch step and the other rank."""
    torch.manual_seed(1)
    x = torch.randn(BATCH)
    expected, weights = _reference(MODELS[kind], x)
    model = MODELS[kind]().train()
    if wrapper == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        model = _shard_fsdp2(model)
    local = slice(rank, rank + 1)
    _loss(model(x[local]), [w[local] for w in weights]).backward()
    params = model.module.named_parameters() if wrapper == "ddp" else model.named_parameters()
    grads = {n: p.grad if wrapper == "ddp" else p.grad.full_tensor() for n, p in params}
    assert grads.keys() == expected.keys()
    errors = []
    for name, grad in grads.items():
        # float sums in another order (per rank, then averaged): relative to the gradient's scale
        error = (grad - expected[name]).abs().max() / expected[name].abs().max().clamp_min(1e-12)
        if error > 1e-5:
            errors.append(f"{name}: difference {error.item():.3g} of the largest entry")
    flat = torch.cat([g.flatten() for g in grads.values()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    if not torch.equal(gathered[0], gathered[1]):
        errors.append(f"{kind}/{wrapper}: the ranks' gradients differ")
    return errors


def _worker(rank: int, port: int, steps: list[tuple[str, str]]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        for kind, wrapper in steps:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                errors = _step(rank, kind, wrapper)
            errors += [f"{kind}/{wrapper} warned: {w.message}" for w in caught
                       if any(text in str(w.message) for text in WATCHED)]
            assert not errors, f"rank {rank}:\n" + "\n".join(errors)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(steps: list[tuple[str, str]]) -> None:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(_free_port(), steps), nprocs=WORLD, join=True)


def test_ddp_step_matches_a_single_process_step():
    _spawn([("classifier", "ddp"), ("dense_features", "ddp")])


def test_fsdp2_step_matches_a_single_process_step():
    _spawn([("feature_map", "fsdp2"), ("dense_features", "fsdp2")])


@pytest.mark.parametrize("build", [classifier, dense_features], ids=["classifier", "dense_features"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_gradient_comes_in_its_parameters_layout(build, batch, threads):
    """What DDP checks (every stride, size-1 dimensions included), without DDP: class tokens at batch 1, depthwise
    kernels of the interactions' ConvFFNs and of ConvNeXt branches, pointwise kernels (ConvNeXt's conv MLPs), whose
    gradient layout on the CPU depends on the thread count."""
    model = build().train()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = model(torch.randn(batch, 3, 80, 96))
        _loss(out, [torch.ones_like(o) for o in _as_list(out)]).backward()
    finally:
        torch.set_num_threads(saved)
    mismatched = [(n, p.stride(), p.grad.stride()) for n, p in model.named_parameters()
                  if p.grad.stride() != p.stride()]
    assert mismatched == []
