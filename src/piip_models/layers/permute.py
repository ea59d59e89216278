"""Memory layouts: a permutation usable inside ``nn.Sequential``, channels-last depthwise kernels."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ChannelsLast", "depthwise_kernels_channels_last"]


class ChannelsLast(nn.Module):
    """Permutes NCHW to NHWC (``inverse``: back), so Linear layers can act on channels inside a Sequential."""

    def __init__(self, inverse: bool = False) -> None:
        super().__init__()
        self.dims = (0, 3, 1, 2) if inverse else (0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def depthwise_kernels_channels_last(model: nn.Module) -> None:
    """Stores every depthwise kernel ``(C, 1, k, k)`` of ``model`` channels-last, the layout its gradient comes in.

    PIIP's maps are tokens viewed channels-last, so its convolutions (the interactions' and the ConvNeXt branches')
    run channels-last and return kernel gradients in that layout. A depthwise kernel's two layouts differ only in the
    stride of its size-1 dimension, which autograd's layout contract ignores, so the gradient is kept as it comes;
    DDP compares every stride and warned "Grad strides do not match bucket view strides". The bytes are the same in
    both layouts (state dicts and safetensors files do not change).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.weight.shape[1] == 1:
            module.weight.data = module.weight.data.to(memory_format=torch.channels_last)
