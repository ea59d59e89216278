"""A PIIP feature pyramid as the backbone torchvision's detectors take.

torchvision's ``BackboneWithFPN`` cannot wrap a PIIP model: its ``IntermediateLayerGetter`` replays the child modules
in registration order, which is not how a pyramid of branches runs. :class:`PIIPBackboneWithFPN` calls the timm
``features_only`` model instead and feeds its maps to a torchvision ``FeaturePyramidNetwork``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import timm
import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

__all__ = ["PIIPBackboneWithFPN"]


class PIIPBackboneWithFPN(nn.Module):
    """PIIP feature maps followed by a torchvision FPN: ``out_channels`` and an ordered dict of maps, as
    ``torchvision.models.detection.MaskRCNN``/``FasterRCNN`` expect from a backbone.

    The output keys are ``"0"``, ``"1"``, ... (one per PIIP level, finest first: what torchvision's RoI poolers
    read) and ``"pool"``, a stride-2 max-pool of the coarsest level (``LastLevelMaxPool``, mmdet's
    ``FPN(add_extra_convs=False)`` fifth level). With the released detectors' pyramid the maps have strides
    4, 8, 16, 32 and 64.

    Attributes:
        body: The timm ``features_only`` model (its PIIP model is ``body.model``).
        fpn: The feature pyramid network (mmdet's ``neck``).
        out_channels: Channels of every output map.

    Args:
        body: A dense PIIP model name (``"piip_tsb_1568_1120_672"``, built with ``timm.create_model(body,
            features_only=True, **kwargs)``), or a timm ``features_only`` model (anything with ``feature_info``
            whose forward returns a list of NCHW maps).
        out_channels: FPN width.
        extra_blocks: Extra pyramid levels after the FPN (default: ``LastLevelMaxPool``).
        **kwargs: ``timm.create_model`` arguments when ``body`` is a name (``pretrained``, ``img_size``,
            ``branch_sizes``, ...).
    """

    def __init__(
        self,
        body: str | nn.Module,
        out_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(body, str):
            body = timm.create_model(body, features_only=True, **kwargs)
        elif kwargs:
            raise TypeError(f"model arguments {sorted(kwargs)} need a model name, not a built {type(body).__name__}")
        if not hasattr(body, "feature_info"):
            raise TypeError(
                f"{type(body).__name__} has no feature_info; build the PIIP model with timm.create_model(name, "
                "features_only=True)"
            )
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool() if extra_blocks is None
            else extra_blocks
        )
        self.out_channels = out_channels

    @property
    def strides(self) -> tuple[int, ...]:
        """Strides of the PIIP levels (the FPN's extra levels not included)."""
        return tuple(self.body.feature_info.reduction())

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The PIIP model's timm ``pretrained_cfg`` (normalisation, input size, weights)."""
        return self.body.pretrained_cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the PIIP model's activations in the backward pass (through ``body.model`` when the body is a
        plain timm feature wrapper, which does not pass the call on)."""
        getattr(self.body, "model", self.body).set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(features)))
