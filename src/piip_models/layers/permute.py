"""Memory layouts: a permutation usable inside ``nn.Sequential``, channels-last depthwise and pointwise kernels."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ChannelsLast", "kernels_channels_last"]


class ChannelsLast(nn.Module):
    """Permutes NCHW to NHWC (``inverse``: back), so Linear layers can act on channels inside a Sequential."""

    def __init__(self, inverse: bool = False) -> None:
        super().__init__()
        self.dims = (0, 3, 1, 2) if inverse else (0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def kernels_channels_last(model: nn.Module) -> None:
    """Stores every depthwise ``(C, 1, k, k)`` and pointwise ``(O, I, 1, 1)`` kernel of ``model`` channels-last, the
    layout their gradients come in.

    PIIP's maps are tokens viewed channels-last, so its convolutions (the interactions' and the ConvNeXt branches')
    run channels-last, and the CPU and CUDA backends may return kernel gradients channels-last. For these kernels
    the two layouts differ only in the strides of size-1 dimensions, which autograd's layout contract ignores, so the
    gradient is kept as it comes, and which layout comes depends on the backend (a pointwise kernel's gradient on
    the CPU is channels-last with two threads and contiguous with one, unless the kernel itself is channels-last).
    DDP compares every stride and warned "Grad strides do not match bucket view strides". The strides are set
    explicitly because ``.to(memory_format=...)`` keeps a tensor it already considers channels-last; the bytes are
    the same in both layouts (state dicts and safetensors files do not change).
    """
    for module in model.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        weight = module.weight.data
        _, in_channels, height, width = weight.shape
        if in_channels == 1 or (height, width) == (1, 1):
            strides = (in_channels * height * width, 1, width * in_channels, in_channels)
            module.weight.data = torch.empty_strided(weight.shape, strides, dtype=weight.dtype,
                                                     device=weight.device).copy_(weight)
