"""Conversion of official (or piip-models) checkpoints to the Hugging Face Hub format timm loads.

:func:`convert_checkpoint` writes ``model.safetensors`` + timm ``config.json``, which
``timm.create_model("local-dir:PATH")`` and ``timm.create_model("hf-hub:ORG/REPO")`` load after ``import piip_models``
(checked before anything is written); :func:`infer_model_name` tells which registered model a checkpoint belongs to;
:func:`add_convert_command` registers the ``piip-models convert`` subcommand. A checkpoint keeps whatever classifiers
it has: the class count comes from their tensors, and a checkpoint that timm's ``train.py`` saved also names its model
(``arch``) and records ``--gp`` and ``--model-kwargs``. Conversion builds models (on the meta device), so it sits
above them; reading and verifying files is :mod:`piip_models.hub`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.models import split_model_name_tag
from timm.models._hub import save_config_for_hf

from ._factory import check_model_name
from .hub import is_sharded_index, read_checkpoint
from .piip import PIIP
from .weights import (
    CheckpointMismatchError,
    checkpoint_filter_fn,
    convert_official_state_dict,
    is_official_layout,
    unwrap_state_dict,
)

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


_CLASSIFIER_WEIGHT = re.compile(r"^(branches\.\d+\.)?head\.weight$")


def _num_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Classes of a (converted) checkpoint's classifiers: the rows of their weights; 0 without classifiers.

    Raises:
        ValueError: Classifiers of different class counts.
    """
    rows = {tuple(v.shape)[0] for k, v in state_dict.items() if _CLASSIFIER_WEIGHT.match(k)}
    if len(rows) > 1:
        raise ValueError(f"the checkpoint's classifiers disagree on the class count: {sorted(rows)}")
    return rows.pop() if rows else 0


def _training_kwargs(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Model arguments timm's ``train.py`` saved beside the weights (its ``args``): ``--gp`` and ``--model-kwargs``."""
    args = checkpoint.get("args")
    kwargs = dict(getattr(args, "model_kwargs", None) or {})
    if getattr(args, "gp", None):
        kwargs["global_pool"] = args.gp
    return kwargs


def _meta_model(
    model_name: str, state_dict: Mapping[str, torch.Tensor], model_kwargs: Mapping[str, Any] | None = None
) -> PIIP:
    """The model on ``meta`` with the checkpoint's classifiers (``num_classes`` from their tensors); dense backbones
    get their pyramid when the checkpoint has pyramid weights."""
    kwargs = {"num_classes": _num_classes(state_dict), **(model_kwargs or {})}
    model = timm.create_model(model_name, device="meta", **kwargs)
    if not isinstance(model, PIIP):
        raise ValueError(f"{model_name} is not a PIIP model ({type(model).__name__})")
    if model.head_type == "dense" and any(k.startswith("fpn.") for k in state_dict):
        model = timm.create_model(model_name, device="meta", with_fpn=True, **kwargs)
    return model


def _as_tuple(names: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names or ())


def _fits(model_name: str, state_dict: Mapping[str, torch.Tensor]) -> bool:
    try:
        checkpoint_filter_fn(state_dict, _meta_model(model_name, state_dict))
    except RuntimeError:  # a mismatch, or position embeddings that cannot be resampled to this model
        return False
    return True


def _classifier_kind(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """What reads out a checkpoint: ``'branches'`` (a classifier per branch), ``'head'`` (one over the merged map),
    ``'projector'`` (a LLaVA tower's), or None."""
    for kind, pattern in (("branches", r"branches\.\d+\.head\."), ("head", r"head\."), ("projector", r"projector\.")):
        if any(re.match(pattern, k) for k in state_dict):
            return kind
    return None


def _identify(
    path: str | os.PathLike, checkpoint: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> tuple[str, str]:
    """The registered model (with tag) a checkpoint (``state_dict``: its tensors converted) belongs to, and how it was
    told."""
    by_file = _registered_checkpoints().get(Path(path).stem)
    if by_file:
        return by_file, "its released file name"
    arch = checkpoint.get("arch")
    if isinstance(arch, str) and split_model_name_tag(arch)[0] in timm.list_models("piip_*"):
        return arch, "the checkpoint's 'arch' entry, the --model of timm's train.py"
    # only models with as many branches and the same kind of classifier (or projector) are built (on meta) and tried
    num_branches = len({k.split(".")[1] for k in state_dict if k.startswith("branches.")})
    kind = _classifier_kind(state_dict)
    candidates = [
        name for name, cfg in ((n, timm.get_pretrained_cfg(n)) for n in timm.list_models("piip_*"))
        if len(_as_tuple(cfg.first_conv)) == num_branches and (
            cfg.classifier == kind if kind in ("head", "projector") else
            isinstance(cfg.classifier, tuple) if kind == "branches" else cfg.classifier != "projector"
        )
    ]
    matches = [name for name in candidates if _fits(name, state_dict)]
    if len(matches) == 1:
        return matches[0], "its keys and shapes"
    found = f"several models fit its keys and shapes ({', '.join(matches)})" if matches else (
        "no registered PIIP model fits its keys and shapes")
    raise ValueError(f"cannot tell which model {Path(path).name} is for: {found}; pass the model name")


def infer_model_name(path: str | os.PathLike, checkpoint: Mapping[str, Any]) -> str:
    """The registered model (with tag) a checkpoint belongs to: by released file name, by the ``arch`` entry of a
    timm ``train.py`` checkpoint, else by keys and shapes.

    Raises:
        ValueError: No registered model fits, or several do (e.g. detection variants that differ only in
            resolution); pass the model name explicitly then.
    """
    return _identify(path, checkpoint, _converted(checkpoint))[0]


def _check_loadable(folder: Path, tensors: Mapping[str, torch.Tensor], out_dir: Path) -> None:
    """Raises unless the model built by ``local-dir:`` from ``folder``'s config.json takes exactly ``tensors``."""
    model = timm.create_model(f"local-dir:{folder}", device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in tensors.items()}
    differ = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
    if differ:
        listed = ", ".join(f"{k} (converted {actual.get(k)}, rebuilt {expected.get(k)})" for k in differ[:5])
        raise CheckpointMismatchError(
            f"refused to write {out_dir}: the model its config.json rebuilds does not take the converted tensors "
            f"({len(differ)} differ: {listed}{', ...' if len(differ) > 5 else ''})"
        )


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
    Detection checkpoints keep their feature pyramid (``with_fpn=True`` is recorded in ``model_args``), fine-tuned
    ones their classifiers (``num_classes`` from the tensors); nothing is written unless the folder's
    ``config.json`` rebuilds a model that takes every converted tensor. What was inferred is logged (INFO).

    Args:
        src: Checkpoint file (``.pth`` read with ``weights_only=True``, or ``.safetensors``), or the index of a
            sharded checkpoint (a PIIP-LLaVA model: its vision tower and projector are converted).
        out_dir: Output folder (created); checked before anything is read.
        model_name: Registered name, optionally with a tag whose ``pretrained_cfg`` is written
            (``piip_tsb.in1k``); inferred from the released file name, a timm ``train.py`` checkpoint's ``arch``, or
            keys and shapes, when omitted.
        overwrite: Replace the model files of a folder that is not empty (else it is refused).

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` is not empty (without ``overwrite``) or is a file.
        PermissionError: ``out_dir`` cannot be created or written.
        CheckpointError: ``src`` is missing, corrupt or unsafe.
        CheckpointMismatchError: The tensors do not fit the model, or the written folder would not load.
    """
    _check_out_dir(Path(out_dir), overwrite)
    if model_name is not None:
        check_model_name(model_name)
    checkpoint = read_checkpoint(src)
    state_dict = _converted(checkpoint)
    model_name, how = (model_name, "as given") if model_name else _identify(src, checkpoint, state_dict)
    model = _meta_model(model_name, state_dict, _training_kwargs(checkpoint))
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
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.json"
        save_config_for_hf(model, config)
        _check_loadable(Path(folder), tensors, out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
        (out_dir / "config.json").write_bytes(config.read_bytes())
    args = {k: v for k, v in model._model_args.items() if k in ("num_classes", "global_pool", "with_fpn")}
    _logger.info("model %s, identified by %s; %s; %d tensors", model_name, how,
                 ", ".join(f"{k}={v!r}" for k, v in args.items()), len(tensors))
    _logger.info("converted %s to %s", src, out_dir)
    return out_dir


@contextlib.contextmanager
def _reporting() -> Iterator[None]:
    """Shows piip_models' INFO messages (what was inferred, converted and dropped) on stderr."""
    logger = logging.getLogger("piip_models")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _convert_command(args: argparse.Namespace) -> int:
    with _reporting():
        out_dir = convert_checkpoint(args.src, args.out, model_name=args.model, overwrite=args.force)
    print(f"wrote {out_dir / 'model.safetensors'} and {out_dir / 'config.json'}; load it with "
          f"timm.create_model('local-dir:{out_dir}', pretrained=True) after import piip_models")
    return 0


def add_convert_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers the ``convert`` subcommand (``args.func(args)`` runs it and returns the exit code)."""
    parser = subparsers.add_parser(
        "convert",
        help="convert an official PIIP checkpoint to model.safetensors + timm config.json",
        description="Convert an official OpenGVLab/PIIP checkpoint, one that timm's train.py saved, or a piip-models "
        "state dict to a timm Hub folder: model.safetensors + config.json, loadable with "
        "timm.create_model('local-dir:OUT'). Classifiers are kept (their class count read from the tensors); what "
        "was inferred is reported.",
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
