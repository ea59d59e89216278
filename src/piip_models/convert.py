"""Conversion of official (or piip-models) checkpoints to the Hugging Face Hub format timm loads.

:func:`convert_checkpoint` writes ``model.safetensors`` + timm ``config.json``, which
``timm.create_model("local-dir:PATH")`` and ``timm.create_model("hf-hub:ORG/REPO")`` load after ``import piip_models``;
:func:`infer_model_name` tells which registered model a checkpoint belongs to; :func:`add_convert_command` registers
the ``piip-models convert`` subcommand. Conversion builds models (on the meta device), so it sits above them; reading
and verifying files is :mod:`piip_models.hub`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.models._hub import save_config_for_hf

from ._factory import check_model_name
from .hub import is_sharded_index, read_checkpoint
from .piip import PIIP
from .weights import checkpoint_filter_fn, convert_official_state_dict, is_official_layout, unwrap_state_dict

__all__ = ["add_convert_command", "convert_checkpoint", "infer_model_name"]

_logger = logging.getLogger(__name__)


def _registered_checkpoints() -> dict[str, str]:
    """Hub file stem -> ``model.tag`` for every registered PIIP tag with a released file of its own name (sharded
    models all call their index ``model.safetensors.index.json``: those are told apart by keys and shapes)."""
    stems = {}
    for name in timm.list_models("piip_*", pretrained=True, include_tags=True):
        filename = timm.get_pretrained_cfg(name).hf_hub_filename
        if filename and not is_sharded_index(filename):
            stems[Path(filename).stem] = name
    return stems


def _converted(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    state_dict = unwrap_state_dict(checkpoint)
    return convert_official_state_dict(state_dict) if is_official_layout(state_dict) else state_dict


def _meta_model(model_name: str, state_dict: Mapping[str, torch.Tensor]) -> PIIP:
    """The model on ``meta``; dense backbones get their pyramid when the checkpoint has pyramid weights."""
    model = timm.create_model(model_name, device="meta")
    if not isinstance(model, PIIP):
        raise ValueError(f"{model_name} is not a PIIP model ({type(model).__name__})")
    if model.head_type == "dense" and any(k.startswith("fpn.") for k in state_dict):
        model = timm.create_model(model_name, device="meta", with_fpn=True)
    return model


def _as_tuple(names: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names or ())


def _fits(model_name: str, state_dict: Mapping[str, torch.Tensor]) -> bool:
    try:
        checkpoint_filter_fn(state_dict, _meta_model(model_name, state_dict))
    except RuntimeError:  # a mismatch, or position embeddings that cannot be resampled to this model
        return False
    return True


def infer_model_name(path: str | os.PathLike, checkpoint: Mapping[str, Any]) -> str:
    """The registered model (with tag) a checkpoint belongs to: by released file name, else by keys and shapes.

    Raises:
        ValueError: No registered model fits, or several do (e.g. detection variants that differ only in
            resolution); pass the model name explicitly then.
    """
    by_file = _registered_checkpoints().get(Path(path).stem)
    if by_file:
        return by_file
    state_dict = _converted(checkpoint)
    # only models with as many branches, a classifier iff the checkpoint has one and a LLaVA projector iff it has
    # one are built (on meta) and tried
    num_branches = len({k.split(".")[1] for k in state_dict if k.startswith("branches.")})
    classifier = any(re.match(r"(branches\.\d+\.)?head\.", k) for k in state_dict)
    projector = any(k.startswith("projector.") for k in state_dict)
    candidates = [
        name for name, cfg in ((n, timm.get_pretrained_cfg(n)) for n in timm.list_models("piip_*"))
        if len(_as_tuple(cfg.first_conv)) == num_branches and bool(cfg.num_classes) == classifier
        and (cfg.classifier == "projector") == projector
    ]
    matches = [name for name in candidates if _fits(name, state_dict)]
    if len(matches) == 1:
        return matches[0]
    found = f"several models fit its keys and shapes ({', '.join(matches)})" if matches else (
        "no registered PIIP model fits its keys and shapes")
    raise ValueError(f"cannot tell which model {Path(path).name} is for: {found}; pass the model name")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuses, before any work, an output folder that cannot be written or would lose files (unless ``overwrite``)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output folder {out_dir} exists and is not a folder")
    if out_dir.is_dir() and not overwrite:
        held = sorted(p.name for p in out_dir.iterdir())
        if held:
            listed = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
            raise FileExistsError(
                f"output folder {out_dir} is not empty (it holds {listed}); pass overwrite=True "
                "(piip-models convert --force) to replace its model files"
            )
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PermissionError(f"cannot write the output folder {out_dir}: {existing} is not a writable folder")


def convert_checkpoint(
    src: str | os.PathLike, out_dir: str | os.PathLike, model_name: str | None = None, overwrite: bool = False
) -> Path:
    """Writes an official (or piip-models) checkpoint as ``model.safetensors`` + timm ``config.json``.

    The result loads with ``timm.create_model("local-dir:<out_dir>", pretrained=True)`` after ``import
    piip_models``, and, uploaded to a Hub repo, with ``timm.create_model("hf-hub:<org>/<repo>", pretrained=True)``.
    Detection checkpoints keep their feature pyramid (``with_fpn=True`` is recorded in ``model_args``).

    Args:
        src: Checkpoint file (``.pth`` read with ``weights_only=True``, or ``.safetensors``), or the index of a
            sharded checkpoint (a PIIP-LLaVA model: its vision tower and projector are converted).
        out_dir: Output folder (created); checked before anything is read.
        model_name: Registered name, optionally with a tag whose ``pretrained_cfg`` is written
            (``piip_tsb.in1k``); inferred from the released file name, or from keys and shapes, when omitted.
        overwrite: Replace the model files of a folder that is not empty (else it is refused).

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` is not empty (without ``overwrite``) or is a file.
        PermissionError: ``out_dir`` cannot be created or written.
        CheckpointError: ``src`` is missing, corrupt or unsafe.
    """
    _check_out_dir(Path(out_dir), overwrite)
    if model_name is not None:
        check_model_name(model_name)
    checkpoint = read_checkpoint(src)
    model_name = model_name or infer_model_name(src, checkpoint)
    state_dict = _converted(checkpoint)
    model = _meta_model(model_name, state_dict)
    state_dict = checkpoint_filter_fn(state_dict, model)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    tensors, storages = {}, set()
    for key, value in state_dict.items():
        value = value.detach().to(dtypes[key]).contiguous()
        if value.untyped_storage().data_ptr() in storages:
            value = value.clone()  # safetensors refuses tensors that share memory
        storages.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    save_config_for_hf(model, out_dir / "config.json")
    _logger.info("converted %s (%s) to %s", src, model_name, out_dir)
    return out_dir


def _convert_command(args: argparse.Namespace) -> int:
    out_dir = convert_checkpoint(args.src, args.out, model_name=args.model, overwrite=args.force)
    print(f"wrote {out_dir / 'model.safetensors'} and {out_dir / 'config.json'}; load it with "
          f"timm.create_model('local-dir:{out_dir}', pretrained=True) after import piip_models")
    return 0


def add_convert_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers the ``convert`` subcommand (``args.func(args)`` runs it and returns the exit code)."""
    parser = subparsers.add_parser(
        "convert",
        help="convert an official PIIP checkpoint to model.safetensors + timm config.json",
        description="Convert an official OpenGVLab/PIIP checkpoint (or a piip-models state dict) to a timm Hub "
        "folder: model.safetensors + config.json, loadable with timm.create_model('local-dir:OUT').",
    )
    parser.add_argument(
        "src", help="checkpoint file (.pth is read with weights_only=True, or .safetensors), or the "
        "model.safetensors.index.json of a sharded PIIP-LLaVA checkpoint (its vision tower and projector)"
    )
    parser.add_argument("--out", required=True, help="output folder (refused when not empty, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace the model files of a non-empty output folder")
    parser.add_argument(
        "--model", default=None, help="model name[.tag]; inferred from the file name or its keys when omitted"
    )
    parser.set_defaults(func=_convert_command)
    return parser
