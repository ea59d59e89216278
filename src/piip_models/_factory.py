"""Listing and creating the registered PIIP models by name."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn

from .hub import fetch_model_config, read_model_config

__all__ = ["MODEL_MODULES", "check_model_name", "create_model", "list_models"]

# The model-family modules whose entrypoints this package registers in timm (timm files a model under the last
# component of its module name): one entry per model-family file.
MODEL_MODULES = ("piip_vit", "piip_convnext", "piip_h6b", "piip_llava")


def list_models(filter: str = "piip_*", pretrained: bool = False, include_tags: bool = False) -> list[str]:
    """Lists PIIP models (``timm.list_models`` restricted to this package's models)."""
    return timm.list_models(filter, module=MODEL_MODULES, pretrained=pretrained, include_tags=include_tags)


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Creates a PIIP model by name, like ``timm.create_model`` but with a helpful error for unknown names/tags.

    The ``config.json`` of an ``hf-hub:`` repo or ``local-dir:`` folder is fetched (offline: found in the cache) and
    checked before timm reads it, so a missing, malformed or non-PIIP config fails with a
    :class:`~piip_models.hub.CheckpointError` naming the file.

    Args:
        model_name: ``piip_<variant>`` optionally with ``.<tag>``, or an ``hf-hub:``/``local-dir:`` reference.
        pretrained: Load pretrained weights (a full PIIP checkpoint when the tag has one, else the branches).
        **kwargs: Model keyword arguments; unknown ones raise ``TypeError``.
    """
    source, _, location = model_name.partition(":")
    if source == "local-dir":
        read_model_config(Path(location) / "config.json", list_models())
    elif source in ("hf-hub", "hf_hub"):
        read_model_config(fetch_model_config(location, kwargs.get("cache_dir")), list_models())
    elif ":" not in model_name:
        check_model_name(model_name)
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)


def check_model_name(model_name: str) -> None:
    """Raises a RuntimeError (with the closest names, or the tags there are) unless ``model_name`` is a registered
    PIIP model with an optional known tag."""
    arch, _, tag = model_name.partition(".")
    known = list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; available: {', '.join(known)}"
        raise RuntimeError(f"Unknown PIIP model {arch!r}{hint}")
    if tag:
        tags = [name.partition(".")[2] for name in list_models(arch, include_tags=True)]
        if tag not in tags:
            raise RuntimeError(f"Unknown tag {tag!r} for {arch}; available tags: {', '.join(tags)}")
