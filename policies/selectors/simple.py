"""Selectors that need no fitted model: ``first`` (the baseline), ``consistency`` (the medoid) and
``coherence`` (the medoid that also stays close to the plan it replaces).

``consistency`` picks the candidate with the smallest mean distance to the other candidates — the
medoid, a robust "mode" of the sampled chunks. It removes the outliers that a single noise draw
sometimes produces without any training, and is the comparison point for learned selectors.

``coherence`` is Bidirectional Decoding (BID, Liu et al. 2025) without its weaker second policy: the
medoid term is BID's forward contrast with positive samples only, and a backward-coherence term
prefers candidates whose first steps agree with the actions the previous chunk had planned for them.
Receding-horizon execution re-plans every ``n_action_steps``; independently sampled chunks may then
switch between modes of the action distribution from one re-plan to the next (dithering between two
ways to reach a goal), which committing to the current plan avoids.
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


def _real_dims(x: Tensor, prefix: Prefix | None) -> Tensor:
    """(..., A) float copy with the padded action dims zeroed: they are noise the robot never sees."""
    x = x.float()
    mask = None if prefix is None else prefix.extras.get("action_dim_mask")  # (B, A)
    if mask is not None:
        x = x * mask.view(mask.shape[0], *([1] * (x.ndim - 2)), mask.shape[1]).to(x.dtype)
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # select() drops non-finite rows itself


def medoid_distance(candidates: Tensor, prefix: Prefix | None) -> Tensor:
    """(B, N, H, A) -> (B, N) mean L2 distance of each candidate chunk to the N - 1 others."""
    b, n, h, a = candidates.shape
    if n == 1:
        return torch.zeros(b, 1, device=candidates.device)
    x = _real_dims(candidates, prefix).reshape(b, n, h * a)
    return torch.cdist(x, x).sum(-1) / (n - 1)  # zero diagonal


class ConsistencySelector(ChunkSelector):
    """The medoid: score = -(mean L2 distance to the other candidates), over real action dims only."""

    name = "consistency"

    def score(self, candidates: Tensor, *, obs: Observation | None, prefix: Prefix | None,
              features: Tensor | None) -> Tensor:
        return -medoid_distance(candidates, prefix)


class CoherenceSelector(ChunkSelector):
    """BID-style: score = -(medoid distance + ``weight`` x backward distance to the reference plan).

    Backward distance: the L2 distance between a candidate's steps ``s .. s + H' - 1`` and ``reference``
    (B, H', A), the previous chunk's actions for those same control ticks (``s = reference_start``: 0, or
    the steps an asynchronous client will drop as late), the i-th compared step weighted by ``decay ** i``
    (the near future matters most: it is what the robot would execute next under the old plan). Without a
    reference (an episode's first chunk) this is the medoid.
    """

    name = "coherence"
    needs_reference = True

    def __init__(self, weight: float = 1.0, decay: float = 0.5) -> None:
        if not weight >= 0 or not 0 < decay <= 1:
            raise ValueError(f"coherence: expected weight >= 0 and 0 < decay <= 1, received weight={weight}, "
                             f"decay={decay}")
        self.weight, self.decay = float(weight), float(decay)

    def score(self, candidates: Tensor, *, obs: Observation | None, prefix: Prefix | None,
              features: Tensor | None, reference: Tensor | None = None, reference_start: int = 0) -> Tensor:
        dist = medoid_distance(candidates, prefix)
        if reference is None or self.weight == 0:
            return -dist
        s, k = reference_start, reference.shape[1]
        diff = _real_dims(candidates[:, :, s:s + k], prefix) - _real_dims(reference, prefix)[:, None]  # (B, N, H', A)
        w = self.decay ** torch.arange(k, device=candidates.device, dtype=diff.dtype)  # (H',)
        backward = (diff.pow(2).sum(-1) * w).sum(-1).sqrt()  # (B, N)
        return -(dist + self.weight * backward)

    def config(self) -> "CoherenceConfig":
        return CoherenceConfig(weight=self.weight, decay=self.decay)


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


@SelectorConfig.register_subclass("coherence")
@dataclass
class CoherenceConfig(SelectorConfig):
    weight: float = 1.0  # of the backward-coherence distance, relative to the medoid distance
    decay: float = 0.5  # step t of the overlap with the previous plan weighs decay ** t

    def build(self, policy: Any = None) -> CoherenceSelector:
        return CoherenceSelector(self.weight, self.decay)
