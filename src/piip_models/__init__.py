"""piip-models: Parameter-Inverted Image Pyramid networks for timm.

Importing this package registers every ``piip_*`` model in timm's registry.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm

from . import hub, internvit, piip, piip_convnext, piip_h6b, piip_llava, windowed_beit
from .piip import PIIP, BranchCfg, InteractionCfg, create_pyramid, even_segments
from .piip_llava import PIIPLlava

__version__ = "0.1.0"

__all__ = [
    "PIIP",
    "PIIPLlava",
    "BranchCfg",
    "InteractionCfg",
    "create_model",
    "create_pyramid",
    "even_segments",
    "hub",
    "internvit",
    "list_models",
    "piip",
    "piip_h6b",
    "windowed_beit",
    "piip_convnext",
    "piip_llava",
]

# The model-family modules whose entrypoints this package registers in timm (timm files a model under the last
# component of its module name): one entry per model-family file.
MODEL_MODULES = ("piip", "piip_convnext", "piip_h6b", "piip_llava")


def list_models(filter: str = "piip_*", pretrained: bool = False, include_tags: bool = False) -> list[str]:
    """Lists PIIP models (``timm.list_models`` restricted to this package's models)."""
    return timm.list_models(filter, module=MODEL_MODULES, pretrained=pretrained, include_tags=include_tags)


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> PIIP:
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
