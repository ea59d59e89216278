"""Listing and creating the registered PIIP models by name."""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch.nn as nn

__all__ = ["MODEL_MODULES", "create_model", "list_models"]

# The model-family modules whose entrypoints this package registers in timm (timm files a model under the last
# component of its module name): one entry per model-family file.
MODEL_MODULES = ("piip_vit", "piip_convnext", "piip_h6b", "piip_llava")


def list_models(filter: str = "piip_*", pretrained: bool = False, include_tags: bool = False) -> list[str]:
    """Lists PIIP models (``timm.list_models`` restricted to this package's models)."""
    return timm.list_models(filter, module=MODEL_MODULES, pretrained=pretrained, include_tags=include_tags)


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Creates a PIIP model by name, like ``timm.create_model`` but with a helpful error for unknown names/tags.

    Args:
        model_name: ``piip_<variant>`` optionally with ``.<tag>``, or an ``hf-hub:``/``local-dir:`` reference.
        pretrained: Load pretrained weights (a full PIIP checkpoint when the tag has one, else the branches).
        **kwargs: Model keyword arguments; unknown ones raise ``TypeError``.
    """
    if ":" not in model_name:
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
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)
