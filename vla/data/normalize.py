"""Per-feature normalization of state and action tensors from dataset statistics.

Modes (per key):
  * ``mean_std``: ``(x - mean) / std``
  * ``quantile``: maps ``[q01, q99]`` linearly onto ``[-1, 1]`` (pi0-FAST / pi05 style): robust to
    outliers, and puts most actions in the range a discrete tokenizer bins.
  * ``identity``: unchanged.

Why values outside [q01, q99] are NOT clipped by ``normalize``: 2% of the data lies there by
definition. Clipping would (a) teach the model that the extremes never happen, so it could never
command them, and (b) make ``unnormalize(normalize(x)) != x``, which breaks the exact round trip
the checkpoints and DPO rely on. Components that need a bounded range (a tokenizer's bins) clip
themselves, where the loss of information is explicit.

Why a constant feature maps to 0 (and not ``(x - mean) / eps``): a feature with zero std (or zero
quantile range) carries no information the model could have learned; dividing by a tiny eps
turns a small deviation at inference (sensor noise on a joint that never moved in the data) into
values of 1e5 that wreck the network. Such dims normalize to exactly 0 and unnormalize to their
constant value. Everything here is finite by construction; NaN only comes out if NaN went in.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from vla.registry import unknown_name_message

MODES = ("mean_std", "quantile", "identity")
_NEEDS = {"mean_std": ("mean", "std"), "quantile": ("q01", "q99"), "identity": ()}


class Normalizer:
    """``normalize(key, x)`` / ``unnormalize(key, x)`` on tensors of shape ``(..., D)``."""

    def __init__(self, stats: Mapping[str, Mapping[str, np.ndarray]], modes: Mapping[str, str], eps: float = 1e-6):
        if eps <= 0:
            raise ValueError(f"normalization eps must be > 0, got {eps}")
        self.stats = stats
        self.modes = dict(modes)
        self.eps = float(eps)
        # key -> (center (D,), scale (D,), degenerate (D,) bool), float64 for exact-as-possible maths
        self._params: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for key, mode in self.modes.items():
            if mode not in MODES:
                raise ValueError(unknown_name_message("normalization mode", mode, MODES) + f" (for key {key!r})")
            if mode == "identity":
                continue
            if key not in stats:
                raise KeyError(f"normalization of {key!r} ({mode}) needs stats for it; stats have keys {sorted(stats)}")
            st = stats[key]
            missing = [n for n in _NEEDS[mode] if n not in st]
            if missing:
                raise KeyError(f"normalization of {key!r} ({mode}) needs stats {missing}; got {sorted(st)}")
            if mode == "mean_std":
                center = np.asarray(st["mean"], np.float64)
                spread = np.asarray(st["std"], np.float64)
                scale = spread
            else:
                lo, hi = np.asarray(st["q01"], np.float64), np.asarray(st["q99"], np.float64)
                center, spread = (lo + hi) / 2, hi - lo
                scale = spread / 2
            if center.ndim != 1 or center.shape != spread.shape:
                raise ValueError(f"stats for {key!r}: expected (D,) arrays, got {center.shape} and {spread.shape}")
            if not (np.isfinite(center).all() and np.isfinite(spread).all()):
                raise ValueError(f"stats for {key!r} contain NaN/inf: {_NEEDS[mode]}")
            degenerate = spread < self.eps
            scale = np.where(degenerate, 1.0, scale)
            self._params[key] = (torch.from_numpy(center), torch.from_numpy(scale), torch.from_numpy(degenerate))

    def dim(self, key: str) -> int | None:
        """Feature dim the stats expect for ``key`` (None for identity)."""
        return None if key not in self._params else int(self._params[key][0].shape[0])

    def _get(self, key: str, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        if key not in self.modes:
            raise KeyError(f"no normalization mode for key {key!r}; known keys {sorted(self.modes)}")
        if key not in self._params:
            return None
        center, scale, deg = self._params[key]
        if x.shape[-1] != center.shape[0]:
            raise ValueError(
                f"{key}: expected last dim {center.shape[0]} (shape (..., {center.shape[0]})), "
                f"got shape {tuple(x.shape)}"
            )
        dtype = x.dtype if x.dtype == torch.float64 else torch.float32
        return center.to(x.device, dtype), scale.to(x.device, dtype), deg.to(x.device)

    @staticmethod
    def _as_float(x: Tensor) -> Tensor:
        return x if x.dtype in (torch.float32, torch.float64) else x.float()

    def normalize(self, key: str, x: Tensor) -> Tensor:
        """(..., D) raw -> (..., D) normalized (float32, or float64 for float64 input)."""
        x = self._as_float(torch.as_tensor(x))
        p = self._get(key, x)
        if p is None:
            return x
        center, scale, deg = p
        return torch.where(deg, torch.zeros((), dtype=x.dtype, device=x.device), (x - center) / scale)

    def unnormalize(self, key: str, x: Tensor) -> Tensor:
        """(..., D) normalized -> (..., D) raw. Exact inverse of :meth:`normalize` on non-constant dims."""
        x = self._as_float(torch.as_tensor(x))
        p = self._get(key, x)
        if p is None:
            return x
        center, scale, deg = p
        return torch.where(deg, center.expand_as(x), x * scale + center)
