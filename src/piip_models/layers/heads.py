"""PIIP heads: pooling, dropout and the classifier(s) of a fused feature map.

Every head takes the fused map channels-last, ``(B, H, W, C)``, and returns pooled ``(B, C)`` features or logits, or,
without pooling (``global_pool=''``), a channels-first ``(B, C, H, W)`` map. Like timm's ``ClassifierHead``, a head
owns its pooling and is rebuilt in place by :meth:`FeatureHead.reset`.

* :class:`FeatureHead`: pooling and dropout only (the multimodal towers, which project instead of classify).
* :class:`LinearHead`: one linear classifier over the merged map (the merged and dense heads).
* :class:`BranchHeads`: one classifier per branch, logits averaged (the released separate-head classifiers); the
  classifiers stay the branches' own ``head`` modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

__all__ = ["BranchHeads", "FeatureHead", "LinearHead"]


class FeatureHead(nn.Module):
    """Pools a channels-last map (``'avg'``, or ``''`` to keep it) and applies dropout; it has no classifier."""

    pools: tuple[str, ...] = ("avg", "")

    def __init__(self, global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        self.global_pool = self._checked_pool(global_pool)
        self.drop = nn.Dropout(drop_rate)

    def _checked_pool(self, global_pool: str) -> str:
        if global_pool not in self.pools:
            raise ValueError(
                f"global_pool for a {type(self).__name__} must be one of {self.pools}, got {global_pool!r}"
            )
        return global_pool

    @property
    def num_classes(self) -> int:
        return 0

    def classifier(self) -> nn.Module | tuple[nn.Module, ...]:
        """The classifier module(s): what ``get_classifier`` returns."""
        return ()

    def reset(
        self,
        num_classes: int,
        global_pool: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Replaces the classifier with a fresh one for ``num_classes`` (0: none) and, if given, the pooling.

        Args:
            num_classes: Classes of the new classifier.
            global_pool: New pooling; the current one when None.
            device: Device of the new classifier parameters.
            dtype: Dtype of the new classifier parameters.
        """
        pool = self.global_pool if global_pool is None else self._checked_pool(global_pool)
        self._build_classifier(num_classes, device, dtype)
        self.global_pool = pool

    def _build_classifier(self, num_classes: int, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        if num_classes:
            raise ValueError(
                f"a {type(self).__name__} has no classifier; only num_classes=0 applies, got {num_classes}"
            )

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` to ``(B, C)``, or the map itself without pooling."""
        if self.global_pool == "avg":
            return x.mean(dim=(1, 2))
        return x

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of channels-last features (here: the features)."""
        return x

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """
        Args:
            x: ``(B, H, W, C)`` fused map.
            pre_logits: Return the pooled features instead of logits.
        """
        x = self.drop(self.pool(x))
        if not pre_logits:
            x = self.classify(x)
        # An unpooled map leaves as a tensor of its own, not a view: a view output loses the hooks registered on it
        # (FSDP2's pre-backward all-gather, which warns of views) when the caller changes it in place.
        return x if self.global_pool else x.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


class LinearHead(FeatureHead):
    """Pooling, dropout and one linear classifier over the merged map.

    The classifier's ``weight`` and ``bias`` are parameters of the head itself (state-dict keys ``head.weight`` /
    ``head.bias``, the released merged-head layout after conversion); without classes there are none.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(global_pool, drop_rate)
        self.in_features = in_features
        self._build_classifier(num_classes, device, dtype)
        if self.weight is not None:
            trunc_normal_(self.weight, std=0.02)
            nn.init.zeros_(self.bias)

    def _build_classifier(self, num_classes: int, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        self._num_classes = num_classes
        if num_classes > 0:
            linear = nn.Linear(self.in_features, num_classes, device=device, dtype=dtype)
            self.weight, self.bias = linear.weight, linear.bias
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def out_features(self) -> int:
        """Output width of the classifier, as ``nn.Linear`` names it."""
        return self._num_classes

    def classifier(self) -> nn.Module:
        """The head itself: it holds the classifier's ``weight`` and ``bias``."""
        return self

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of channels-last features (the features themselves without classes)."""
        return x if self.weight is None else F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, global_pool={self.global_pool!r}"


class BranchHeads(FeatureHead):
    """One classifier per branch over its slice of the concatenated map, logits averaged.

    ``global_pool='first_patch'`` reads every branch's first patch token (the official separate-head readout). The
    classifiers are the branches' own ``head`` modules (keys ``branches.{k}.head.*``, as timm ViTs name them); this
    head refers to the branches without registering them a second time.
    """

    pools = ("first_patch", "avg", "")

    def __init__(
        self, branches: Sequence[nn.Module], widths: Sequence[int], global_pool: str = "first_patch",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(global_pool, drop_rate)
        self._branches = tuple(branches)
        self.widths = tuple(widths)

    @property
    def num_classes(self) -> int:
        return self._branches[0].num_classes

    def classifier(self) -> tuple[nn.Module, ...]:
        """Every branch's ``head``."""
        return tuple(branch.head for branch in self._branches)

    def _build_classifier(self, num_classes: int, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        for branch, width in zip(self._branches, self.widths):
            head = nn.Linear(width, num_classes, device=device, dtype=dtype) if num_classes else nn.Identity()
            branch.head = head.train(self.training)
            branch.num_classes = num_classes

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``'first_patch'`` reads the first token of every branch's slice; otherwise as :class:`FeatureHead`."""
        # a copy, not a view of the map: without a classifier the readout is the output (see FeatureHead.forward)
        return x[:, 0, 0].clone() if self.global_pool == "first_patch" else super().pool(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of every branch classifier's logits over its slice of the channels."""
        if not self.num_classes:
            return x
        parts = x.split(list(self.widths), dim=-1)
        return torch.stack([branch.head(part) for branch, part in zip(self._branches, parts)]).mean(0)
