"""The PIIP-LLaVA projector: per-branch MLPs summed into visual tokens of a language model's width."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .permute import ChannelsLast

__all__ = ["BranchMLPProjector"]


class BranchMLPProjector(nn.Module):
    """Maps every branch's feature map through Linear -> GroupNorm(32) -> GELU -> Linear and sums the results.

    This is the official ``TwoBranchMLP`` (``separate_2branch_v1``, ``norm='gn'``) for any number of branches; the
    maps must already share one grid (the official projector resizes branch 1 to branch 2's grid, bilinear in fp32,
    which is what ``PIIP.forward_features`` returns for ``head_type='none'``). Keys ``branches.{k}.{1,3,6}`` match the
    official ``branch{k+1}.{1,3,6}``.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            in_dims: Channels of each branch map, in the order they are concatenated.
            out_dim: Token width (the language model's hidden size, 4096 for Vicuna-7B, 5120 for Vicuna-13B).
            device: Parameter device.
            dtype: Parameter dtype.
        """
        super().__init__()
        if out_dim % 32:
            raise ValueError(f"the projector's GroupNorm(32, C) needs an output width divisible by 32, got {out_dim}")
        dd = {"device": device, "dtype": dtype}
        self.in_dims = tuple(in_dims)
        self.out_dim = out_dim
        self.branches = nn.ModuleList(
            nn.Sequential(
                ChannelsLast(), nn.Linear(dim, out_dim, **dd), ChannelsLast(inverse=True),
                nn.GroupNorm(32, out_dim, **dd), nn.GELU(),
                ChannelsLast(), nn.Linear(out_dim, out_dim, **dd), ChannelsLast(inverse=True),
            )
            for dim in self.in_dims
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, sum(in_dims), H, W)`` concatenated branch maps to ``(B, H * W, out_dim)`` tokens."""
        if x.dim() != 4 or x.shape[1] != sum(self.in_dims):
            raise ValueError(f"expected (B, {sum(self.in_dims)}, H, W) concatenated branch maps, got {tuple(x.shape)}")
        out = sum(mlp(part) for mlp, part in zip(self.branches, x.split(self.in_dims, dim=1)))
        # tokens of their own, not a view of the map (a view output loses hooks, e.g. FSDP2's, when changed in place)
        return out.flatten(2).transpose(1, 2).clone(memory_format=torch.contiguous_format)
