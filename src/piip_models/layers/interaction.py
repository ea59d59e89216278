"""PIIP cross-branch interaction: injectors, bidirectional units and interaction blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import DropPath, trunc_normal_

from .msdeform_attn import MSDeformAttn
from .permute import kernels_channels_last

__all__ = [
    "BidirectionalInteractionUnit",
    "BranchGeometry",
    "ConvFFN",
    "InteractionBlock",
    "Injector",
    "init_piip_weights",
]


@dataclass(frozen=True)
class BranchGeometry:
    """Token grid of one branch and the reference points of its pixel centres."""

    height: int
    width: int
    ref_points: torch.Tensor

    @property
    def spatial_shapes(self) -> tuple[tuple[int, int]]:
        """The grid as deformable attention takes its value levels: one ``(height, width)`` level."""
        return ((self.height, self.width),)


class ConvFFN(nn.Module):
    """Linear -> depthwise 3x3 conv over the token grid -> GELU -> Linear."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, groups=hidden_dim, **dd)
        kernels_channels_last(self.dwconv)  # it runs on the tokens' channels-last layout
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, **dd)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.fc1(x)
        batch, _, channels = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(batch, channels, height, width)).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class Injector(nn.Module):
    """Updates query tokens with deformable attention over another branch and a gated ConvFFN.

    Both residuals are scaled by zero-initialised gates, so a fresh injector is the identity.
    """

    def __init__(
        self,
        dim: int,
        feat_dim: int,
        num_heads: int = 16,
        n_points: int = 4,
        deform_ratio: float = 0.5,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        drop_path: float = 0.0,
        with_norm: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}

        def norm(width: int) -> nn.Module:
            return nn.LayerNorm(width, eps=1e-6, **dd) if with_norm else nn.Identity()

        self.query_norm = norm(dim)
        self.feat_norm = norm(feat_dim)
        self.attn = MSDeformAttn(dim, 1, num_heads, n_points, ratio=deform_ratio, d_feat=feat_dim, **dd)
        self.ca_gamma = nn.Parameter(torch.zeros(dim, **dd))
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio), **dd)
            self.ffn_norm = norm(dim)
            self.cffn_gamma = nn.Parameter(torch.zeros(dim, **dd))
            self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, query: torch.Tensor, feat: torch.Tensor, query_geom: BranchGeometry, feat_geom: BranchGeometry):
        attn = self.attn(self.query_norm(query), query_geom.ref_points, self.feat_norm(feat), feat_geom.spatial_shapes)
        query = query + self.ca_gamma * attn
        if self.with_cffn:
            ffn = self.ffn(self.ffn_norm(query), query_geom.height, query_geom.width)
            query = query + self.drop_path(self.cffn_gamma * ffn)
        return query


class BidirectionalInteractionUnit(nn.Module):
    """Exchanges information between adjacent branches ``a`` (larger model, smaller image) and ``b``.

    Both directions read the pre-update tokens of the other branch.
    """

    def __init__(
        self,
        dim_a: int,
        dim_b: int,
        with_proj: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **injector_kwargs,
    ) -> None:
        """
        Args:
            dim_a: Width of branch ``a``.
            dim_b: Width of branch ``b``.
            with_proj: Project the other branch to the query width before attending (else attend across widths).
            device: Parameter device.
            dtype: Parameter dtype.
            **injector_kwargs: Keyword arguments of :class:`Injector` shared by both directions.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.branch2to1_proj = nn.Linear(dim_b, dim_a, **dd) if with_proj else nn.Identity()
        self.branch1to2_proj = nn.Linear(dim_a, dim_b, **dd) if with_proj else nn.Identity()
        self.branch2to1_injector = Injector(dim_a, dim_a if with_proj else dim_b, **injector_kwargs, **dd)
        self.branch1to2_injector = Injector(dim_b, dim_b if with_proj else dim_a, **injector_kwargs, **dd)

    def forward(
        self, x_a: torch.Tensor, x_b: torch.Tensor, geom_a: BranchGeometry, geom_b: BranchGeometry
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feat_for_a = self.branch2to1_proj(x_b)
        feat_for_b = self.branch1to2_proj(x_a)
        x_a = self.branch2to1_injector(x_a, feat_for_a, geom_a, geom_b)
        x_b = self.branch1to2_injector(x_b, feat_for_b, geom_b, geom_a)
        return x_a, x_b


class InteractionBlock(nn.Module):
    """One interaction step over N branches: a unit per adjacent pair, applied from the high-resolution end."""

    def __init__(
        self,
        dims: Sequence[int],
        with_proj: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **injector_kwargs,
    ) -> None:
        super().__init__()
        self.units = nn.ModuleList(
            BidirectionalInteractionUnit(
                dims[i], dims[i + 1], with_proj=with_proj, device=device, dtype=dtype, **injector_kwargs
            )
            for i in range(len(dims) - 1)
        )

    def forward(self, tokens: list[torch.Tensor], geoms: Sequence[BranchGeometry]) -> list[torch.Tensor]:
        tokens = list(tokens)
        # Units run from the last pair to the first, so an update of branch k+1 reaches branch k in the same block.
        for i in range(len(self.units) - 1, -1, -1):
            tokens[i], tokens[i + 1] = self.units[i](tokens[i], tokens[i + 1], geoms[i], geoms[i + 1])
        return tokens


def init_piip_weights(module: nn.Module) -> None:
    """Official init of PIIP's own modules: truncated-normal Linears, He-normal (transposed) convs, unit norms,
    then the deformable grid init (``Module.apply`` visits children first, so it runs last)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, MSDeformAttn):
        module.reset_parameters()
