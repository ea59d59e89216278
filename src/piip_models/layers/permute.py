"""Layout permutation usable inside ``nn.Sequential``."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ChannelsLast"]


class ChannelsLast(nn.Module):
    """Permutes NCHW to NHWC (``inverse``: back), so Linear layers can act on channels inside a Sequential."""

    def __init__(self, inverse: bool = False) -> None:
        super().__init__()
        self.dims = (0, 3, 1, 2) if inverse else (0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)
