"""piip-models: Parameter-Inverted Image Pyramid networks for timm.

Importing this package registers every ``piip_*`` model in timm's registry.
"""

from __future__ import annotations

from . import internvit, piip_convnext, piip_h6b, piip_llava, piip_vit, windowed_beit  # noqa: F401  (registration)
from ._builder import create_pyramid
from ._factory import MODEL_MODULES, create_model, list_models
from .config import BranchCfg, InteractionCfg, even_segments
from .piip import PIIP
from .piip_llava import PIIPLlava

__version__ = "0.1.0"

__all__ = [
    "MODEL_MODULES",
    "PIIP",
    "PIIPLlava",
    "BranchCfg",
    "InteractionCfg",
    "create_model",
    "create_pyramid",
    "even_segments",
    "list_models",
]
