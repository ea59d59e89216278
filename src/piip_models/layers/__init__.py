"""Reusable PIIP layers."""

from .interaction import BidirectionalInteractionUnit, BranchGeometry, ConvFFN, Injector, InteractionBlock
from .msdeform_attn import MSDeformAttn, reference_points
from .qk_norm_attention import FullWidthQkNormAttention
from .rms_norm import MultiHeadRmsNorm, RmsNorm

__all__ = [
    "BidirectionalInteractionUnit",
    "BranchGeometry",
    "ConvFFN",
    "FullWidthQkNormAttention",
    "InteractionBlock",
    "Injector",
    "MSDeformAttn",
    "MultiHeadRmsNorm",
    "RmsNorm",
    "reference_points",
]
