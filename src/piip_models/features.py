"""The ``features_only`` wrapper of PIIP models: timm's getter over the feature taps, with the model's training
switches reachable on it."""

from __future__ import annotations

import torch
from timm.models._features import FeatureGetterNet

__all__ = ["PIIPFeatures"]


class PIIPFeatures(FeatureGetterNet):
    """timm's :class:`~timm.models.FeatureGetterNet` (``forward`` returns the taps of ``forward_intermediates``) for a
    PIIP; what ``create_model(..., features_only=True)`` returns. The wrapped model stays ``.model``."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each branch segment and interaction in the backward pass to save activation memory."""
        self.model.set_grad_checkpointing(enable)
