"""Reusable PIIP layers."""

from .interaction import BidirectionalInteractionUnit, BranchGeometry, ConvFFN, Injector, InteractionBlock
from .msdeform_attn import MSDeformAttn, reference_points

__all__ = [
    "BidirectionalInteractionUnit",
    "BranchGeometry",
    "ConvFFN",
    "InteractionBlock",
    "Injector",
    "MSDeformAttn",
    "reference_points",
]
