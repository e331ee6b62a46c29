"""Selectors that need no fitted model: ``first`` (the baseline) and ``consistency`` (the medoid).

``consistency`` picks the candidate with the smallest mean distance to the other candidates — the
medoid, a robust "mode" of the sampled chunks. It removes the outliers that a single noise draw
sometimes produces without any training, and is the comparison point for learned selectors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from policies.selectors.base import ChunkSelector, SelectorConfig
from vla.types import Observation, Prefix


class FirstSelector(ChunkSelector):
    """Always candidate 0: identical to sampling one chunk (the N=1 baseline at any N)."""

    name = "first"

    def score(self, candidates: Tensor, *, obs: Observation | None, prefix: Prefix | None,
              features: Tensor | None) -> Tensor:
        b, n = candidates.shape[:2]
        scores = torch.zeros(b, n, device=candidates.device)
        scores[:, 0] = 1.0
        return scores


class ConsistencySelector(ChunkSelector):
    """The medoid: score = -(mean L2 distance to the other candidates), over real action dims only."""

    name = "consistency"

    def score(self, candidates: Tensor, *, obs: Observation | None, prefix: Prefix | None,
              features: Tensor | None) -> Tensor:
        b, n, h, a = candidates.shape
        x = candidates.float()
        mask = None if prefix is None else prefix.extras.get("action_dim_mask")
        if mask is not None:  # padded action dims are zero-filled noise the robot never sees: ignore them
            x = x * mask[:, None, None, :].to(x.dtype)
        x = torch.nan_to_num(x.reshape(b, n, h * a), nan=0.0, posinf=0.0, neginf=0.0)  # select() drops those rows
        if n == 1:
            return torch.zeros(b, 1, device=candidates.device)
        dist = torch.cdist(x, x)  # (B, N, N), zero diagonal
        return -dist.sum(-1) / (n - 1)


@SelectorConfig.register_subclass("first")
@dataclass
class FirstConfig(SelectorConfig):
    def build(self, policy: Any = None) -> FirstSelector:
        return FirstSelector()


@SelectorConfig.register_subclass("consistency")
@dataclass
class ConsistencyConfig(SelectorConfig):
    def build(self, policy: Any = None) -> ConsistencySelector:
        return ConsistencySelector()
