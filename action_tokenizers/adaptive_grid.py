"""Adaptive Gaussian action grids (SpatialVLA).

Uniform bins waste tokens: most actions sit near the mean, so most bins of a uniform grid are
rarely used. SpatialVLA fits a Gaussian per dimension and places bin edges at equal-probability
quantiles of it, so every token is used about equally often and bins are narrow where data is dense.

* Fit: per dimension mean ``mu`` and std ``sigma`` (floored at ``min_sigma``, so a constant dimension
  gets a narrow grid instead of NaN).
* Edges: ``mu + sigma * ndtri(p)`` for ``p = linspace(tail_prob, 1 - tail_prob, n_bins + 1)``. The
  outermost ``tail_prob`` of each side is clipped into the edge bins, which keeps every bin finite.
* Decode (``centre``): ``"midpoint"`` (default) = the middle of the bin in value space, so the
  round-trip error within the grid is at most half the bin's width; ``"conditional_mean"`` =
  E[x | x in bin] under the fitted Gaussian, the least-squares choice for Gaussian data.
* Vocabulary: each dimension has its own ``n_bins`` tokens (code ``a * n_bins + k``), because a bin
  index means a different value in each dimension; a chunk is ``H * A`` tokens, time-major.
* ``refit(new_actions, old_embeddings)``: fit to a new dataset and move the old per-token embeddings
  onto the new bin centres by linear interpolation in value space (SpatialVLA's grid re-initialization
  for a new robot), so fine-tuning starts from embeddings that mean nearby values.

Not implemented: SpatialVLA's spherical-coordinate grid for the translation (r, theta, phi) with joint
3-D tokens; every dimension here is gridded independently in Cartesian coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from action_tokenizers.base import ActionTokenizer, TokenizerConfig, as_chunks

CENTRES = ("midpoint", "conditional_mean")


@TokenizerConfig.register_subclass("adaptive_grid")
@dataclass
class AdaptiveGridConfig(TokenizerConfig):
    n_bins: int = 256  # per dimension
    min_sigma: float = 1e-3
    tail_prob: float = 1e-3  # probability mass beyond each outer edge (clipped into the edge bin)
    centre: str = "midpoint"  # "midpoint" | "conditional_mean"

    @classmethod
    def tiny(cls) -> "AdaptiveGridConfig":
        return cls(n_bins=16)

    def build(self) -> "AdaptiveGridTokenizer":
        return AdaptiveGridTokenizer(self)


def _norm_pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)


class AdaptiveGridTokenizer(ActionTokenizer):
    config: AdaptiveGridConfig
    codes_per_step = True

    def __init__(self, config: AdaptiveGridConfig):
        if config.n_bins < 2:
            raise ValueError(f"adaptive_grid.n_bins: expected >= 2, got {config.n_bins}")
        if not 0.0 < config.tail_prob < 0.5 / config.n_bins:
            raise ValueError(f"adaptive_grid.tail_prob: expected 0 < tail_prob < 0.5 / n_bins "
                             f"(= {0.5 / config.n_bins:g}), got {config.tail_prob}")
        if config.centre not in CENTRES:
            raise ValueError(f"adaptive_grid.centre: expected one of {CENTRES}, got {config.centre!r}")
        if not config.min_sigma > 0:
            raise ValueError(f"adaptive_grid.min_sigma: expected > 0, got {config.min_sigma}")
        super().__init__(config)
        self.mu: np.ndarray | None = None  # (A,)
        self.sigma: np.ndarray | None = None  # (A,)

    @property
    def vocab_size(self) -> int:
        self._require_fitted("vocab_size")  # one token set per dimension: depends on A
        return self.config.n_bins * self.action_dim

    @property
    def edges(self) -> np.ndarray:
        """(A, n_bins + 1) bin edges per dimension, increasing."""
        from scipy.special import ndtri

        c = self.config
        z = ndtri(np.linspace(c.tail_prob, 1 - c.tail_prob, c.n_bins + 1))  # (n+1,)
        return self.mu[:, None] + self.sigma[:, None] * z[None, :]

    @property
    def centres(self) -> np.ndarray:
        """(A, n_bins) decoded value of each bin."""
        e = self.edges
        if self.config.centre == "midpoint":
            return (e[:, :-1] + e[:, 1:]) / 2
        # E[x | a < x < b] = mu + sigma * (pdf(alpha) - pdf(beta)) / (cdf(beta) - cdf(alpha))
        z = (e - self.mu[:, None]) / self.sigma[:, None]
        mass = (1 - 2 * self.config.tail_prob) / self.config.n_bins  # equal by construction
        return self.mu[:, None] + self.sigma[:, None] * (_norm_pdf(z[:, :-1]) - _norm_pdf(z[:, 1:])) / mass

    def _fit(self, x: np.ndarray) -> None:
        flat = x.reshape(-1, x.shape[-1])
        self.mu = flat.mean(0)
        self.sigma = np.maximum(flat.std(0), self.config.min_sigma)

    def _encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, A = self.config.n_bins, self.action_dim
        inner = self.edges[:, 1:-1]  # (A, n-1): values below inner[a, 0] -> bin 0, above the last -> n-1
        k = np.stack([np.searchsorted(inner[a], x[..., a], side="right") for a in range(A)], axis=-1)
        codes = (k + np.arange(A) * n).reshape(len(x), -1)  # (N, H*A), code = a * n + k
        return codes, np.ones(codes.shape, dtype=bool)

    def _decode(self, codes: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        H, A, n = self.horizon, self.action_dim, self.config.n_bins
        c = codes.reshape(-1, H, A)
        # a code must be a token of the dimension at its position, not just any id below vocab_size
        in_dim = (c >= 0) & (c // n == np.arange(A))
        valid = self._fixed_length_checks(codes, mask, H * A, self.vocab_size) & in_dim.reshape(len(c), -1).all(1)
        k = np.where(in_dim, c - np.arange(A) * n, 0)
        out = self.centres[np.arange(A), k]  # (N, H, A)
        return out, valid

    def allowed_codes(self, length: int) -> np.ndarray:
        """Position ``i`` holds a token of dimension ``i % A``: ids ``[a * n, (a + 1) * n)``."""
        self._require_fitted("allowed_codes")
        dim_of_id = np.arange(self.vocab_size) // self.config.n_bins  # (V,)
        return dim_of_id[None, :] == (np.arange(length) % self.action_dim)[:, None]

    def refit(self, new_actions: Any, old_embeddings: Any) -> Any:
        """Fit to ``new_actions`` (N, H, A) and map ``old_embeddings`` (A * n_bins, D) — one row per
        token of the old grid — onto the new grid: row ``(a, j)`` is the linear interpolation of the
        old dimension-``a`` embeddings at the new bin centre ``j`` (clamped at the old grid's ends).
        Returns ``(A * n_bins, D)`` of the same kind (numpy array or torch tensor) as the input."""
        self._require_fitted("refit")
        x = as_chunks(new_actions, "new_actions")
        if x.shape[2] != self.action_dim:
            raise ValueError(f"new_actions: expected action_dim {self.action_dim} (the old grid's), got {x.shape[2]}")
        n, A = self.config.n_bins, self.action_dim
        if tuple(old_embeddings.shape[:1]) != (n * A,) or len(old_embeddings.shape) != 2:
            raise ValueError(f"old_embeddings: expected shape ({n * A}, D) (one row per token), "
                             f"got {tuple(old_embeddings.shape)}")
        old_c = self.centres  # (A, n), increasing per dimension
        self.fit(x)
        new_c = self.centres
        lo_idx = np.empty((A, n), dtype=np.int64)
        w = np.empty((A, n))
        for a in range(A):
            t = np.clip(new_c[a], old_c[a, 0], old_c[a, -1])
            i = np.clip(np.searchsorted(old_c[a], t, side="right") - 1, 0, n - 2)
            lo_idx[a] = i + a * n
            w[a] = (t - old_c[a, i]) / (old_c[a, i + 1] - old_c[a, i])
        lo_idx, w = lo_idx.reshape(-1), w.reshape(-1, 1)
        if hasattr(old_embeddings, "detach"):  # torch: keep dtype/device (and autograd)
            import torch

            idx = torch.as_tensor(lo_idx, device=old_embeddings.device)
            wt = torch.as_tensor(w, dtype=old_embeddings.dtype, device=old_embeddings.device)
            return (1 - wt) * old_embeddings[idx] + wt * old_embeddings[idx + 1]
        old = np.asarray(old_embeddings)
        return ((1 - w) * old[lo_idx] + w * old[lo_idx + 1]).astype(old.dtype, copy=False)

    def _state(self) -> dict[str, np.ndarray]:
        return {"mu": self.mu, "sigma": self.sigma}

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        self.mu, self.sigma = state["mu"], state["sigma"]
